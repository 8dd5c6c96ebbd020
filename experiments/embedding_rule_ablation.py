"""Rule-by-rule ablation of a finished `relp embedding` run. Same as `python -m relp embedding-rule-ablation RUN`;
see relp/experiments/rule_ablation.py."""

from relp.experiments.rule_ablation import main

if __name__ == "__main__":
    main()
