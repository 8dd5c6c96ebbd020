"""Rule-by-rule ablation on the activation-patching maps of a finished `relp embedding` run.

Re-creates the run's contrast pairs and metric from its results.json, loads its saved AP scores, and
recomputes relevance patching under each rule set (cheap: one forward/backward pair per batch and rule
set), printing Pearson / Spearman against AP per component and writing ablation.json into the run:

    python -m relp embedding --out runs/embedding
    python -m relp embedding-rule-ablation runs/embedding     # or: python experiments/embedding_rule_ablation.py runs/embedding
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import relp
from relp.embeddings import SentenceEmbedding
from relp.experiments.embedding import contrast_metric
from relp.metrics import agreement
from relp.results import PatchingResult
from relp.tasks import make_contrast_dataset

RULE_SETS = {
    "none (AtP)": "gradient",
    "ln": ["ln"],
    "identity": ["identity"],
    "ah": ["ah"],
    "attnlrp (q, k, v only)": ["attnlrp"],
    "relp": "relp",
    "relp+ah": "relp+ah",
    "attnlrp preset": "attnlrp",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relp embedding-rule-ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="output directory of `relp embedding` (with results.json and scores/)")
    return parser


def main(argv=None) -> dict:
    """Score every rule set of RULE_SETS on the run's pairs; returns {rule set: {component: {pearson,
    spearman}}} as written to ablation.json."""
    args = build_parser().parse_args(argv)
    run = Path(args.run)
    info = json.loads((run / "results.json").read_text())
    model = relp.load_model(info["model"])
    embedding = SentenceEmbedding(info["pooling"], info["normalize"])
    changes = info["changes"]
    data = make_contrast_dataset(model, info["n_prompts"], changes=changes, seed=info["seed"])
    batches = list(data.batches())
    ap = [PatchingResult.load(run / "scores" / f"ap_batch{i}.pt") for i in range(len(batches))]
    components = info["components"]
    metrics = [contrast_metric(model, batch, embedding)[0] for batch in batches]
    table = {}
    for name, rules in RULE_SETS.items():
        results = [
            relp.relevance_patching(model, b.clean_tokens, b.corrupted_tokens, m, components, rules=rules)
            for b, m in zip(batches, metrics)
        ]
        scores = agreement(results, ap)
        table[name] = {c: {"pearson": scores.loc[c, "pearson"], "spearman": scores.loc[c, "spearman"]} for c in components}
        print(f"{name:24s}" + "  ".join(f"{c} {v['pearson']:.3f}/{v['spearman']:.3f}" for c, v in table[name].items()), flush=True)
    (run / "ablation.json").write_text(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    main()
