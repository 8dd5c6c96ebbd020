"""Embedding models: activation patching as ground truth, AtP and RelP against it, on contrast pairs.

Each example is an anchor sentence, a clean candidate (a paraphrase of the anchor) and a corrupted
candidate (the clean one with one word swapped, which changes the subject, the object or the meaning;
see :mod:`relp.tasks.contrast`). The metric is the normalised similarity difference
``(cos(e, anchor) - sim_corrupted) / (sim_clean - sim_corrupted)`` of the candidate's pooled embedding
``e`` (the anchor is embedded once and not patched): 0 on the corrupted candidate, 1 on the clean one.
Every method scores the layer x position grid (and heads) of each component in the denoising
direction; agreement with activation patching pools the cells of all layouts (same token length and
named positions).

    python -m relp embedding --out runs/embedding               # all-MiniLM-L6-v2 (offline), mean pooling
    python -m relp embedding --model SmolLM2-135M-Instruct --pooling last --out runs/embedding-smollm2

Writes results.json, results.md, positions.csv (scores per named position) and PNG figures, in the
same layout as the IOI experiment.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import relp
from relp.embeddings import SentenceEmbedding
from relp.experiments.common import (
    add_method_arguments,
    agreement_markdown,
    finish,
    parse_arguments,
    position_tables,
    require_reference,
    score_batches,
)
from relp.metrics import CosineSimilarity, SimilarityDifference
from relp.tasks import make_contrast_dataset

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relp embedding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec for relp.load_model (default: {DEFAULT_MODEL}, offline from its package)")
    parser.add_argument("--pooling", default=None, choices=["mean", "cls", "last", "max"], help="pooling of the final hidden states (default: the model's trained pooling; needed for models without one, e.g. decoders)")
    parser.add_argument("--no-normalize", action="store_true", help="with --pooling: do not L2-normalise the pooled embedding")
    add_method_arguments(parser)
    parser.add_argument("--n-pairs", type=int, default=32, help="number of contrast pairs (default: 32)")
    parser.add_argument("--changes", nargs="+", default=["all"], help="kinds of change: all, or some of subject, object, antonym")
    parser.add_argument("--components", nargs="+", default=["resid_pre", "attn_out", "mlp_out", "head"], help="components to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward pass in activation patching (default: chosen from free memory)")
    parser.add_argument("--top-k", type=int, default=10, help="k of the top-k overlap")
    parser.add_argument("--out", default="runs/embedding", help="output directory")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    return parser


def run(args: argparse.Namespace, model=None) -> dict:
    """Run the experiment described by parsed `args`; `model` overrides ``args.model`` (e.g. for tests).
    Returns the summary written to results.json."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    require_reference(args.methods, "embedding")
    started = time.perf_counter()
    if model is None:
        model = relp.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    load_seconds = time.perf_counter() - started
    model_name = str(model.cfg.model_name if args.model is None else args.model)
    if args.pooling is not None:
        embedding = SentenceEmbedding(args.pooling, normalize=not args.no_normalize)
    else:
        try:
            embedding = SentenceEmbedding.from_model(model)
        except ValueError as error:
            raise SystemExit(f"{error}; pass --pooling") from None
    changes = "all" if args.changes == ["all"] else args.changes
    data = make_contrast_dataset(model, args.n_pairs, changes=changes, seed=args.seed)
    batches = list(data.batches())
    print(f"{model_name}: {len(data)} contrast pairs, {embedding.name}, {len(batches)} layout batch(es)")

    jobs, clean_similarities, corrupted_similarities = [], [], []
    for index, batch in enumerate(batches):
        metric, clean, corrupted = contrast_metric(model, batch, embedding)
        clean_similarities.append(clean)
        corrupted_similarities.append(corrupted)
        jobs.append((batch, metric, f"batch {index + 1}/{len(batches)} ({len(batch)} pairs, {batch.length} tokens)"))
    settings = {"batch_size": args.batch_size, "progress": True, "rules": args.rules}
    results = score_batches(model, jobs, args.methods, args.components, settings)

    clean_similarity = torch.cat(clean_similarities)
    corrupted_similarity = torch.cat(corrupted_similarities)
    summary = {
        "model": model_name,
        "n_prompts": len(data),
        "changes": list(data.changes),
        "pooling": embedding.pooling,
        "normalize": embedding.normalize,
        "seed": args.seed,
        "components": list(args.components),
        "rules": args.rules,
        "metric": "similarity_difference",
        "clean_similarity": clean_similarity.mean().item(),
        "corrupted_similarity": corrupted_similarity.mean().item(),
        "clean_above_corrupted_fraction": (clean_similarity > corrupted_similarity).float().mean().item(),
        "n_layout_batches": len(batches),
        "load_seconds": load_seconds,
    }
    return finish(out, summary, results_markdown, results, position_tables(results, batches, args.components), args, started)


def contrast_metric(model, batch, embedding: SentenceEmbedding) -> tuple[SimilarityDifference, torch.Tensor, torch.Tensor]:
    """The batch's normalised similarity difference, with the clean and corrupted candidates' cosine
    similarities to their anchors."""
    anchors = embedding.embed(model, batch.anchor_texts)
    similarity = CosineSimilarity(anchors, embedding)
    with torch.no_grad():
        clean = similarity.per_text(embedding(model, batch.clean_tokens))
        corrupted = similarity.per_text(embedding(model, batch.corrupted_tokens))
    return SimilarityDifference(anchors, clean.mean().item(), corrupted.mean().item(), embedding), clean, corrupted


def results_markdown(summary: dict, *, top_k: int = 10) -> str:
    header = [
        f"# Embedding contrast pairs: agreement with activation patching ({summary['model']})",
        "",
        f"{summary['n_prompts']} pairs, changes {summary['changes']}, pooling `{summary['pooling']}`"
        f"{' (normalised)' if summary['normalize'] else ''}, seed {summary['seed']}, RelP rules `{summary['rules']}`. "
        f"Mean cosine similarity to the anchor: clean {summary['clean_similarity']:.3f}, corrupted "
        f"{summary['corrupted_similarity']:.3f} (clean higher on {100 * summary['clean_above_corrupted_fraction']:.0f}% of pairs).",
        "",
    ]
    return "\n".join(header) + agreement_markdown(summary, top_k=top_k)


def main(argv=None) -> dict:
    return run(parse_arguments(build_parser(), argv, compares="embedding"))


if __name__ == "__main__":
    main()
