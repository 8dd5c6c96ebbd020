"""Embedding models: AP, AtP and RelP on contrast pairs. Same as `python -m relp embedding`; see
relp/experiments/embedding.py."""

from relp.experiments.embedding import main

if __name__ == "__main__":
    main()
