"""Method study: every registered method and preset against activation patching. Same as `python -m relp methods`;
see relp/experiments/methods.py."""

from relp.experiments.methods import main

if __name__ == "__main__":
    main()
