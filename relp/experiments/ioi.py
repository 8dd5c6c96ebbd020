"""IOI reproduction: activation patching as ground truth, AtP and RelP against it.

Runs the paper's protocol on IOI prompts: for every layout of prompts (same length and named
positions), the normalised logit difference ``(LD - LD_corrupted) / (LD_clean - LD_corrupted)`` with
``LD = logit[IO] - logit[S]`` at the last token, scored over the layer x position grid of each component
by every method; agreement with activation patching pools the cells of all layouts.

    python -m relp ioi --out runs/ioi                       # the embedded SmolLM2, default settings
    python experiments/ioi.py --model gpt2 --out runs/gpt2  # with network access
    python -m relp ioi --level edges --n-prompts 32         # edges: relp.experiments.edges

Writes results.json, results.md, positions.csv (scores per named position, all templates), and PNG
figures (heatmaps per method, scatter of each method against activation patching).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import relp
from relp.experiments.common import (
    CORRUPTIONS,
    add_model_and_method_arguments,
    agreement_markdown,
    finish,
    parse_arguments,
    position_tables,
    require_end_last,
    require_reference,
    score_batches,
)
from relp.experiments.edges import add_level_arguments
from relp.metrics import LogitDiff, NormalizedLogitDiff
from relp.tasks import make_ioi_dataset

PAPER_GPT2_SMALL = {  # Pearson r with activation patching, IOI, from the RelP paper (GPT-2 small)
    "resid_pre": {"atp": 0.753, "relp": 0.968},
    "attn_out": {"atp": 0.979, "relp": 0.962},
    "mlp_out": {"atp": 0.195, "relp": 0.992},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relp ioi", description=__doc__.split("\n\n")[0])
    add_model_and_method_arguments(parser)
    parser.add_argument("--n-prompts", type=int, default=128, help="number of IOI prompts (default: 128)")
    parser.add_argument("--corruption", default="s2_io_flip", choices=CORRUPTIONS, help="default: s2_io_flip, the corruption of the paper's demo (S2 replaced by IO, which flips the answer)")
    parser.add_argument("--components", nargs="+", default=["resid_pre", "attn_out", "mlp_out"], help="components to score (add 'head' for heads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward pass in activation patching (default: chosen from free memory)")
    parser.add_argument("--top-k", type=int, default=10, help="k of the top-k overlap")
    parser.add_argument("--out", default="runs/ioi", help="output directory")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    add_level_arguments(parser, ioi=True)
    return parser


def run(args: argparse.Namespace, model=None) -> dict:
    """Run the experiment described by parsed `args`; `model` overrides ``args.model`` (e.g. for tests).
    Returns the summary written to results.json."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    require_reference(args.methods, "IOI")
    dtype = getattr(torch, args.dtype)

    started = time.perf_counter()
    if model is None:
        model = relp.load_model(args.model, device=args.device, dtype=dtype)
    load_seconds = time.perf_counter() - started
    model_name = str(args.model or model.cfg.model_name)
    data = make_ioi_dataset(model, args.n_prompts, corruption=args.corruption, seed=args.seed, templates=args.templates)
    batches = list(data.batches())
    print(f"{model_name}: {len(data)} IOI prompts ({args.corruption}), {len(batches)} layout batch(es)")

    metrics, clean_ld, corrupted_ld = ioi_metrics(model, batches)
    if args.level == "edges":
        from relp.experiments import edges

        summary = {
            "model": model_name, "n_prompts": len(data), "corruption": args.corruption, "templates": args.templates,
            "seed": args.seed, "rules": args.rules, "metric": "normalized_logit_diff",
            "clean_logit_diff": clean_ld.mean().item(), "corrupted_logit_diff": corrupted_ld.mean().item(),
            "n_layout_batches": len(batches), "load_seconds": load_seconds,
        }
        return edges.run_ioi(args, model, batches, metrics, summary, started)
    jobs = [
        (batch, metric, f"batch {index + 1}/{len(batches)} ({len(batch)} prompts, {batch.length} tokens)")
        for index, (batch, metric) in enumerate(zip(batches, metrics))
    ]
    # the metric reads only the last token (END), so activation patching computes only its logits
    settings = {"batch_size": args.batch_size, "progress": True, "logits_to_keep": 1, "rules": args.rules}
    results = score_batches(model, jobs, args.methods, args.components, settings)

    summary = {
        "model": model_name,
        "n_prompts": len(data),
        "corruption": args.corruption,
        "templates": args.templates,
        "seed": args.seed,
        "components": list(args.components),
        "rules": args.rules,
        "metric": "normalized_logit_diff",
        "clean_logit_diff": clean_ld.mean().item(),
        "corrupted_logit_diff": corrupted_ld.mean().item(),
        "clean_logit_diff_positive_fraction": (clean_ld > 0).float().mean().item(),
        "n_layout_batches": len(batches),
        "load_seconds": load_seconds,
    }
    return finish(out, summary, results_markdown, results, position_tables(results, batches, args.components), args, started)


def ioi_metrics(model, batches) -> tuple[list[NormalizedLogitDiff], torch.Tensor, torch.Tensor]:
    """One normalised logit difference per layout batch, all on the whole dataset's scale, with the
    clean and corrupted logit differences per prompt (concatenated over `batches`).

    Every batch is normalised by the dataset's mean clean and corrupted LD, as in the paper
    (``LD = mean(logit[IO] - logit[S])`` over the dataset), not by its own: a batch's own gap can be
    small or even of the wrong sign (seed 0, 64 prompts: one 2-prompt batch's clean-minus-corrupted
    gap was -1.2 logits against 4-12 elsewhere), and dividing by it blows that batch's scores up
    (AtP reached 11 there) until they decide the pooled agreement. On one scale a cell's score is its
    change of the logit difference in units of the dataset's clean-corrupted gap, whichever batch it
    comes from.
    """
    clean_lds, corrupted_lds = [], []
    for batch in batches:
        require_end_last(batch)
        raw = LogitDiff(batch.answer_tokens, batch.wrong_tokens)
        with torch.no_grad():
            clean_lds.append(raw.per_prompt(model(batch.clean_tokens)))
            corrupted_lds.append(raw.per_prompt(model(batch.corrupted_tokens)))
    clean_ld, corrupted_ld = torch.cat(clean_lds), torch.cat(corrupted_lds)
    clean_value, corrupted_value = clean_ld.mean().item(), corrupted_ld.mean().item()
    metrics = [
        NormalizedLogitDiff(batch.answer_tokens, batch.wrong_tokens, clean_value, corrupted_value) for batch in batches
    ]
    return metrics, clean_ld, corrupted_ld


def results_markdown(summary: dict, *, top_k: int = 10) -> str:
    """The agreement table laid out like the paper's: rows model, columns component x method."""
    header = [
        f"# IOI: agreement with activation patching ({summary['model']})",
        "",
        f"{summary['n_prompts']} prompts, corruption `{summary['corruption']}`, templates `{summary['templates']}`, "
        f"seed {summary['seed']}, RelP rules `{summary['rules']}`. Clean logit diff {summary['clean_logit_diff']:.2f} "
        f"(positive on {100 * summary['clean_logit_diff_positive_fraction']:.0f}% of prompts), corrupted "
        f"{summary['corrupted_logit_diff']:.2f}.",
        "",
    ]
    return "\n".join(header) + agreement_markdown(summary, top_k=top_k)


def main(argv=None) -> dict:
    return run(parse_arguments(build_parser(), argv, compares="IOI"))


if __name__ == "__main__":
    main()
