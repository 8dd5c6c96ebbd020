"""Experiment scripts that reproduce the paper's tables; each is also a `relp` sub-command."""
