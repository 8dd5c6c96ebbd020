"""Command line: ``relp <experiment> [options]`` (or ``python -m relp <experiment>``)."""

from __future__ import annotations

import sys

EXPERIMENTS = {
    "ioi": "relp.experiments.ioi",
    "faithfulness": "relp.experiments.faithfulness",
    "embedding": "relp.experiments.embedding",
    "embedding-rule-ablation": "relp.experiments.rule_ablation",
    "methods": "relp.experiments.methods",
    "similarity": "relp.experiments.similarity",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in EXPERIMENTS:
        known = ", ".join(EXPERIMENTS)
        message = f"usage: relp {{{known}}} [options]   (relp <experiment> --help for its options)"
        if argv and argv[0] not in ("-h", "--help"):
            print(f"relp: unknown experiment {argv[0]!r}; expected one of: {known}", file=sys.stderr)
            print(message, file=sys.stderr)
            return 2
        print(message)
        return 0
    import importlib

    importlib.import_module(EXPERIMENTS[argv[0]]).main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
