"""Rule-by-rule ablation on the activation-patching maps of a finished `relp embedding` run.

Re-creates the run's contrast pairs and metric from its results.json, loads its saved AP scores, and
recomputes relevance patching under each rule set (cheap: one forward/backward pair per batch and rule
set), printing Pearson / Spearman against AP per component and writing ablation.json into the run:

    python -m relp embedding --out runs/embedding
    python experiments/embedding_rule_ablation.py runs/embedding
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

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


def main(argv=None) -> dict:
    import relp
    from relp.embeddings import SentenceEmbedding
    from relp.metrics import CosineSimilarity, SimilarityDifference, agreement
    from relp.results import PatchingResult
    from relp.tasks import make_contrast_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="output directory of `relp embedding` (with results.json and scores/)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    info = json.loads((run / "results.json").read_text())
    model = relp.load_model(info["model"])
    embedding = SentenceEmbedding(info["pooling"], info["normalize"])
    changes = info["changes"]
    data = make_contrast_dataset(model, info["n_prompts"], changes=changes, seed=info["seed"])
    batches = list(data.batches())
    ap = [PatchingResult.load(run / "scores" / f"ap_batch{i}.pt") for i in range(len(batches))]
    components = info["components"]
    metrics = []
    for batch in batches:
        anchors = embedding.embed(model, batch.anchor_texts)
        similarity = CosineSimilarity(anchors, embedding)
        with torch.no_grad():
            clean = similarity(embedding(model, batch.clean_tokens)).item()
            corrupted = similarity(embedding(model, batch.corrupted_tokens)).item()
        metrics.append(SimilarityDifference(anchors, clean, corrupted, embedding))
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
