"""Circuit faithfulness on IOI (MIB's CPR and CMD): which method's scores pick out circuits that work?

Every method scores the nodes on a set of scoring prompts; the circuits made of its top k% nodes
(k in MIB's grid 0.1 ... 100) are then evaluated on *held-out* IOI prompts, with every other node
ablated (``--ablation``, default: the corrupted prompt's activation). The metric is the logit
difference ``logit[IO] - logit[S]`` at the last token, averaged over prompts (as in MIB's IOI).
CPR is the area under f(k) for circuits ranked by signed score, CMD the area under |1 - f(k)| for
circuits ranked by |score|; random node orders give the baseline (mean and standard deviation over
``--seeds``).

Nodes (default): ``attn_out`` and ``mlp_out`` at every (layer, position), so scoring and evaluation
prompts share one layout (the most common layout among generated prompts is used). With
``--summed`` the nodes are summed over positions (e.g. ``--components head mlp_out --summed`` for
MIB's heads + MLPs) and prompts of every layout are used.

    python -m relp faithfulness --out runs/faithfulness     # the embedded SmolLM2, default settings
    python experiments/faithfulness.py --model gpt2 --components head mlp_out --summed
    python -m relp faithfulness --level edges               # edges (relp.experiments.edges); methods
                                                            # default to atp relp atp_verify there

Writes faithfulness.json ({method: {"cpr", "cmd", "curve": [[k, f], ...], "seconds", ...}, "random":
{...}}), faithfulness.md (the table), run.json (settings, timings, m(M), m(empty)), faithfulness.png
(the curves), circuits/<method>.json (MIB JSON: scores, top ``--export-percent``% in the graph) and
scores/<method>_batch<i>.pt (the PatchingResults).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

import relp
from relp.circuits import empty_circuit, select_circuit
from relp.experiments.common import (
    CORRUPTIONS,
    add_model_and_method_arguments,
    parse_arguments,
    require_end_last,
    score_batches,
    versions,
)
from relp.experiments.edges import DEFAULT_EDGE_FAITHFULNESS_METHODS, add_level_arguments
from relp.faithfulness import CircuitEvaluator, PooledEvaluator, cpr_cmd, random_baseline
from relp.methods import method_label, standard_methods
from relp.metrics import LogitDiff
from relp.mib import to_mib_json
from relp.plotting import plot_faithfulness
from relp.tasks import make_ioi_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relp faithfulness", description=__doc__.split("\n\n")[0])
    add_model_and_method_arguments(parser)
    parser.add_argument("--n-prompts", type=int, default=16, help="IOI prompts to score nodes on (default: 16)")
    parser.add_argument("--n-eval", type=int, default=32, help="held-out IOI prompts to evaluate circuits on (default: 32)")
    parser.add_argument("--corruption", default="abc", choices=CORRUPTIONS)
    parser.add_argument("--components", nargs="+", default=["attn_out", "mlp_out"], help="node types (default: attn_out mlp_out)")
    parser.add_argument("--summed", action="store_true", help="nodes summed over positions (default: one node per position)")
    parser.add_argument("--ablation", default="corrupt", choices=["corrupt", "mean", "mean_positional", "zero"])
    parser.add_argument("--seeds", type=int, default=5, help="random circuits: number of seeds (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="prompt generation seed")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (activation patching and evaluation) (default: chosen from free memory)")
    parser.add_argument("--export-percent", type=float, default=5.0, help="circuits/<method>.json: top k%% in the graph (default: 5)")
    parser.add_argument("--out", default="runs/faithfulness", help="output directory")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figure")
    add_level_arguments(parser, ioi=False)
    return parser


def _split_prompts(model, args):
    """(scoring batches, evaluation batches, description): disjoint prompts; one layout when per position."""
    needed = args.n_prompts + args.n_eval
    if args.n_prompts < 1 or args.n_eval < 1:
        raise SystemExit(f"need at least one scoring and one evaluation prompt; got {args.n_prompts} and {args.n_eval}")
    if args.summed:
        data = make_ioi_dataset(model, needed, corruption=args.corruption, seed=args.seed, templates=args.templates)
        scoring, evaluation = data[: args.n_prompts], data[args.n_prompts :]
        return list(scoring.batches()), list(evaluation.batches()), f"{len(data)} prompts, all layouts"
    n = needed
    for _ in range(8):  # generate more prompts until one layout has enough of them
        data = make_ioi_dataset(model, n, corruption=args.corruption, seed=args.seed, templates=args.templates)
        layouts = Counter(example.layout for example in data)
        layout, count = max(layouts.items(), key=lambda item: (item[1], -item[0][0]))
        if count >= needed:
            break
        n *= 2
    else:
        raise SystemExit(f"no prompt layout has {needed} prompts among {n} generated; lower --n-prompts/--n-eval or use --summed")
    chosen = [i for i, example in enumerate(data) if example.layout == layout][:needed]
    scoring, evaluation = data[chosen[: args.n_prompts]], data[chosen[args.n_prompts :]]
    names = ", ".join(f"{k}@{v}" for k, v in layout[1])
    return [scoring], [evaluation], f"one layout ({layout[0]} tokens, {names}) of {n} generated prompts"


def run(args: argparse.Namespace, model=None) -> dict:
    """Run the experiment described by parsed `args`; `model` overrides ``args.model`` (e.g. for tests).
    Returns {"table": faithfulness.json's content, "run": run.json's content}."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if model is None:
        model = relp.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    load_seconds = time.perf_counter() - started
    model_name = str(args.model or model.cfg.model_name)
    if args.level == "edges":
        from relp.experiments import edges

        args.summed = True  # MIB's edges are summed over positions: prompts of every layout
        scoring_batches, eval_batches, prompt_note = _split_prompts(model, args)
        return edges.run_faithfulness(args, model, scoring_batches, eval_batches, prompt_note, started, load_seconds)
    scoring_batches, eval_batches, prompt_note = _split_prompts(model, args)
    per_position = not args.summed
    print(
        f"{model_name}: {args.n_prompts} scoring + {args.n_eval} held-out IOI prompts ({args.corruption}, {prompt_note}); "
        f"nodes {'+'.join(args.components)} {'per position' if per_position else 'summed over positions'}; "
        f"ablation {args.ablation}"
    )

    # --- scoring ---
    for batch in scoring_batches:
        require_end_last(batch)
    jobs = [
        (batch, LogitDiff(batch.answer_tokens, batch.wrong_tokens), f"scoring batch {i + 1}/{len(scoring_batches)}")
        for i, batch in enumerate(scoring_batches)
    ]
    settings = {"batch_size": args.batch_size, "progress": True, "logits_to_keep": 1, "rules": args.rules}
    results = score_batches(model, jobs, args.methods, args.components, settings)
    scoring_seconds = {method: sum(r.seconds for r in rs) for method, rs in results.items()}
    for method, seconds in scoring_seconds.items():
        print(f"  {method_label(method)} scores: {seconds:.1f} s")

    # --- evaluation: one evaluator per layout batch, caches shared by every method and seed ---
    evaluator, evaluators = make_evaluator(model, eval_batches, args)
    template = empty_circuit(results[args.methods[0]], args.components, per_position=per_position)
    m_empty, m_full, shared_seconds = full_and_empty(evaluator, template, "nodes")

    table: dict[str, dict] = {}
    summaries = {}
    for method in args.methods:
        summary = cpr_cmd(evaluator, results[method], components=args.components, per_position=per_position, label=method_label(method))
        summaries[method] = summary
        entry = summary.to_dict()
        entry["scoring_seconds"] = scoring_seconds[method]
        entry["evaluation_seconds"] = summary.seconds
        entry["seconds"] = scoring_seconds[method] + summary.seconds
        table[method] = entry
        print(f"  {method_label(method)}: CPR {summary.cpr:.3f}, CMD {summary.cmd:.3f} (evaluation {summary.seconds:.1f} s)")
        circuit = select_circuit(results[method], percent=args.export_percent, components=args.components, per_position=per_position)
        to_mib_json(circuit, out / "circuits" / f"{method}.json", model=model)
    baseline = random_baseline(evaluator, template, seeds=args.seeds)
    table["random"] = baseline.to_dict()
    print(f"  random: CPR {baseline.cpr[0]:.3f} ± {baseline.cpr[1]:.3f}, CMD {baseline.cmd[0]:.3f} ± {baseline.cmd[1]:.3f} ({baseline.seconds:.1f} s)")
    total_seconds = time.perf_counter() - started

    forward_passes = sum(e.forward_passes for e in evaluators)
    run_info = {
        "model": model_name,
        "n_prompts": args.n_prompts,
        "n_eval": args.n_eval,
        "prompts": prompt_note,
        "corruption": args.corruption,
        "templates": args.templates,
        "seed": args.seed,
        "components": list(args.components),
        "per_position": per_position,
        "n_nodes": template.n_total,
        "ablation": args.ablation,
        "rules": args.rules,
        "metric": "logit_diff (IO - S, last token, mean over prompts)",
        "m_full": m_full,
        "m_empty": m_empty,
        "random_seeds": args.seeds,
        "timings_s": {
            "load": load_seconds,
            "scoring": scoring_seconds,
            "evaluation": {m: s.seconds for m, s in summaries.items()},
            "shared_full_and_empty": shared_seconds,
            "random": baseline.seconds,
            "total": total_seconds,
        },
        "evaluation_forward_passes": forward_passes,
        "versions": versions(),
    }
    (out / "faithfulness.json").write_text(json.dumps(table, indent=2))
    (out / "run.json").write_text(json.dumps(run_info, indent=2))
    markdown = results_markdown(table, run_info)
    (out / "faithfulness.md").write_text(markdown)
    for method, rs in results.items():
        for i, result in enumerate(rs):
            result.save(out / "scores" / f"{method}_batch{i}.pt")
    if not args.no_figures:
        plot_faithfulness(
            {method_label(m): s for m, s in summaries.items()}, baseline,
            title=f"{model_name}: IOI, {'+'.join(args.components)}, {args.ablation} ablation",
            path=out / "faithfulness.png",
        )
    print(markdown)
    print(f"wrote {out}/ in {total_seconds:.0f} s")
    return {"table": table, "run": run_info}


def make_evaluator(model, eval_batches, args, evaluator_class=CircuitEvaluator):
    """(evaluator, per-batch evaluators): one `evaluator_class` per layout batch of held-out prompts (the
    logit difference, ``args.ablation``), pooled when there are several; caches are shared by every method
    and seed."""
    evaluators = [
        evaluator_class(
            model, batch.clean_tokens, batch.corrupted_tokens, LogitDiff(batch.answer_tokens, batch.wrong_tokens),
            ablation=args.ablation, batch_size=args.batch_size, logits_to_keep=1, progress=True,
        )
        for batch in eval_batches
    ]
    return (evaluators[0] if len(evaluators) == 1 else PooledEvaluator(evaluators)), evaluators


def full_and_empty(evaluator, template, unit: str) -> tuple[float, float, float]:
    """(m(empty), m(M), seconds) of `template`'s space, printed."""
    start = time.perf_counter()
    m_empty, m_full = evaluator.values([template.empty(), template.full()]).tolist()
    seconds = time.perf_counter() - start
    print(f"  m(M) = {m_full:.4f}, m(empty) = {m_empty:.4f} over {template.n_total} {unit} ({seconds:.1f} s)")
    return m_empty, m_full, seconds


def results_markdown(table: dict, run_info: dict) -> str:
    """The CPR/CMD table with the random baseline and each method's time."""
    lines = [
        f"# IOI circuit faithfulness ({run_info['model']})",
        "",
        f"{_space(run_info)}; scores on {run_info['n_prompts']} prompts, circuits evaluated on "
        f"{run_info['n_eval']} held-out prompts ({run_info['prompts']}); `{run_info['ablation']}` ablation; "
        f"metric: logit difference, m(M) = {run_info['m_full']:.3f}, m(empty) = {run_info['m_empty']:.3f}.",
        "",
        "| method | CPR (signed, higher is better) | CMD (absolute, lower is better) | seconds (scoring + evaluation) |",
        "|---|---|---|---|",
    ]
    for method, entry in table.items():
        if method == "random":
            continue
        lines.append(
            f"| {method_label(method)} | {entry['cpr']:.3f} | {entry['cmd']:.3f} | "
            f"{entry['seconds']:.1f} ({entry['scoring_seconds']:.1f} + {entry['evaluation_seconds']:.1f}) |"
        )
    r = table["random"]
    lines.append(
        f"| random ({len(r['seeds'])} seeds) | {r['cpr_mean']:.3f} ± {r['cpr_std']:.3f} | {r['cmd_mean']:.3f} ± "
        f"{r['cmd_std']:.3f} | {r['seconds']:.1f} |"
    )
    timings = run_info["timings_s"]
    lines += [
        "",
        f"Total wall time {timings['total']:.0f} s (model load {timings['load']:.0f} s, m(M) and m(empty) "
        f"{timings['shared_full_and_empty']:.1f} s, {run_info['evaluation_forward_passes']} evaluation forward passes).",
        "",
    ]
    return "\n".join(lines)


def _space(run_info: dict) -> str:
    """What the circuits are made of: nodes (which, per position or summed) or edges."""
    where = "per position" if run_info["per_position"] else "summed over positions"
    if run_info.get("level") == "edges":
        return f"Edges of {run_info['graph']}, {where} ({run_info['n_nodes']} edges)"
    return f"Nodes: {'+'.join(run_info['components'])} {where} ({run_info['n_nodes']} nodes)"


def main(argv=None) -> dict:
    args = parse_arguments(build_parser(), argv)
    if args.level == "edges" and args.methods == standard_methods() and not _methods_given(argv):
        args.methods = list(DEFAULT_EDGE_FAITHFULNESS_METHODS)  # exact edge patching of every edge: tiny models only
    return run(args)


def _methods_given(argv) -> bool:
    import sys

    return "--methods" in (sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    main()
