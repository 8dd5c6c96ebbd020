"""IOI circuit faithfulness (MIB CPR/CMD). Same as `python -m relp faithfulness`; see relp/experiments/faithfulness.py."""

from relp.experiments.faithfulness import main

if __name__ == "__main__":
    main()
