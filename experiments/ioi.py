"""IOI reproduction (the main job). Same as `python -m relp ioi`; see relp/experiments/ioi.py."""

from relp.experiments.ioi import main

if __name__ == "__main__":
    main()
