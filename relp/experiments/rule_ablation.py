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
    parser = build_parser()
    args = parser.parse_args(argv)
    run = Path(args.run)
    info = _read_run(parser, run)
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


def _read_run(parser: argparse.ArgumentParser, run: Path) -> dict:
    """The run's results.json, checked before the model is loaded (argparse's one-line error if the
    directory is not a finished `relp embedding` run)."""
    results = run / "results.json"
    if not results.is_file():
        parser.error(f"{run} is not a finished `relp embedding` run: expected {results} (and scores/)")
    try:
        info = json.loads(results.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        parser.error(f"{results} is not valid JSON ({error})")
    missing = [k for k in ("model", "pooling", "normalize", "changes", "n_prompts", "seed", "components") if k not in info]
    if missing:
        parser.error(f"{results} is not from `relp embedding`: it lacks {missing}")
    scores = run / "scores" / "ap_batch0.pt"
    if not scores.is_file():
        parser.error(f"{run} has no activation patching scores: expected {scores} (run `relp embedding` with ap in --methods)")
    return info


if __name__ == "__main__":
    main()
