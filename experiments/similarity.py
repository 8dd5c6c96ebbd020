"""Similarity explanations on MiniLM: token-pair relevance (BiLRP) against gradient x input and random on pairs
with known aligned words. Same as `python -m relp similarity`; see relp/experiments/similarity.py."""

from relp.experiments.similarity import main

if __name__ == "__main__":
    main()
