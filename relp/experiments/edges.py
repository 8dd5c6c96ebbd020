"""The IOI and faithfulness experiments at the level of edges (``--level edges``).

``relp ioi --level edges``: every method scores every edge of the model's graph (:mod:`relp.edges`) on each
layout batch (scores pooled over batches, weighted by prompts). The reference is exact edge patching, which
costs one forward pass per edge, so it runs on a *verification set* of ``--verify-edges`` edges: half the
strongest edges of the estimates (an equal share per method, by |pooled score|), half a random sample of the
rest (seed ``--seed``). Agreement (Pearson, Spearman, top-k overlap) is measured on that set. The run also
times node-level RelP on the same batches, so that each method's cost reads as a multiple of it. Each
method's circuit (its top ``--edge-count`` edges by signed score, pruned to the paths from the input to the
logits) is drawn (``circuit_<method>.png``) and written in MIB's JSON (``circuits/<method>.json``).

``relp faithfulness --level edges``: edges are scored on the scoring prompts (all layouts, summed over
positions, as MIB's edges are), and the top-k% edge circuits evaluated on the held-out prompts with every
other edge ablated (``--ablation``), CPR and CMD with the random baseline, as for nodes.

Edge-level methods are the keys of :data:`relp.edges.EDGE_METHOD_KEYS` (``ap`` = exact edge patching: in the
IOI experiment on the verification set, in the faithfulness experiment on every edge, which only tiny models
afford).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from relp import plotting
from relp.edges import (
    EDGE_METHOD_KEYS,
    EdgeCircuitEvaluator,
    edge_cpr_cmd,
    edge_patching,
    edge_random_baseline,
    empty_edge_circuit,
    pool_edge_scores,
    score_edges,
    select_edges,
)
from relp.edges.methods import DEFAULT_K
from relp.experiments.common import versions
from relp.methods import method_label
from relp.metrics import LogitDiff, _correlation, _top_k_overlap
from relp.mib import to_mib_json

LEVELS = ("nodes", "edges")
#: ``relp faithfulness --level edges`` without --methods (``ap`` there would patch every edge)
DEFAULT_EDGE_FAITHFULNESS_METHODS = ("atp", "relp", "atp_verify")


def add_level_arguments(parser, *, ioi: bool) -> None:
    """--level and the edge-level options of the IOI (``ioi=True``) or the faithfulness experiment."""
    parser.add_argument("--level", default="nodes", choices=LEVELS,
                        help="score nodes (components x layers x positions) or the edges between them (relp.edges; default: nodes)")
    parser.add_argument("--k", type=float, default=DEFAULT_K,
                        help=f"edges, estimate-then-verify methods (atp_verify, verify): share of edges verified by exact edge patching (default: {DEFAULT_K})")
    parser.add_argument("--steps", type=int, default=None, help="edges, ig_inputs methods: interpolation steps (default: relp's)")
    if ioi:
        parser.add_argument("--verify-edges", type=int, default=200,
                            help="edges: size of the verification set patched exactly (default: 200)")
        parser.add_argument("--edge-count", type=int, default=100,
                            help="edges: circuit drawn and exported per method: its top n edges, pruned (default: 100)")


def check_level_arguments(args) -> None:
    """A clear error (before any model is loaded) for edge-level arguments that cannot work."""
    if getattr(args, "level", "nodes") != "edges":
        return
    unknown = [m for m in args.methods if m not in EDGE_METHOD_KEYS]
    if unknown:
        raise ValueError(f"--level edges: no edge version of {unknown}; expected methods from {list(EDGE_METHOD_KEYS)}")
    if not 0 < args.k <= 1:
        raise ValueError(f"--k must be a share of the edges in (0, 1]; got {args.k:g}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be a positive number of interpolation steps; got {args.steps}")
    for name in ("verify_edges", "edge_count"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive; got {value}")


def _score(model, jobs, methods, args) -> dict:
    """{method: pooled EdgeScores} over the (batch, metric, label) jobs, every method but ``ap``."""
    pooled = {}
    for method in methods:
        per_batch = []
        for batch, metric, label in jobs:
            print(f"  {label}: {method} (edges)")
            per_batch.append(score_edges(
                model, batch.clean_tokens, batch.corrupted_tokens, metric, method, rules=args.rules, steps=args.steps, k=args.k,
                batch_size=args.batch_size, logits_to_keep=1,
            ))
        pooled[method] = pool_edge_scores(per_batch)
    return pooled


def _agreement(estimate: np.ndarray, exact: np.ndarray, top_k: int) -> dict:
    """Pearson, Spearman and top-k overlap, by relp.agreement's own rules (NaN for a constant side, or
    when k covers every edge)."""
    return {
        "pearson": _correlation(stats.pearsonr, estimate, exact), "spearman": _correlation(stats.spearmanr, estimate, exact),
        f"top{top_k}_overlap": _top_k_overlap(estimate, exact, top_k), "n_edges": int(estimate.size),
    }


def _circuit_outputs(model, out: Path, scores: dict, count: int, figures: bool, title: str) -> dict:
    """Each method's pruned top-`count` circuit: drawn and written as MIB JSON; returns its summary."""
    summary = {}
    for method, pooled in scores.items():
        circuit = select_edges(pooled, count=min(count, pooled.graph.n_edges), prune=True)
        to_mib_json(circuit, out / "circuits" / f"{method}.json", model=model)
        summary[method] = {"n_edges": circuit.n_edges, "nodes": circuit.nodes(), "edges": circuit.edge_names()}
        if figures:
            import matplotlib.pyplot as plt

            figure = plotting.plot_circuit_graph(circuit, title=f"{title}: {method_label(method)}, top {count} edges, pruned")
            figure.savefig(out / f"circuit_{method}.png", dpi=150, bbox_inches="tight")
            plt.close(figure)
    return summary


def run_ioi(args, model, batches, metrics, summary: dict, started: float) -> dict:
    """``relp ioi --level edges`` (see the module docstring); `summary` holds the run's settings."""
    import relp

    out = Path(args.out)
    jobs = [(b, m, f"batch {i + 1}/{len(batches)} ({len(b)} prompts, {b.length} tokens)") for i, (b, m) in enumerate(zip(batches, metrics))]
    estimates = [m for m in args.methods if m != "ap"]
    scores = _score(model, jobs, estimates, args)
    graph = next(iter(scores.values())).graph if scores else relp.EdgeGraph.from_model(model)

    # node-level RelP on the same batches: the unit of cost
    t0 = time.perf_counter()
    for batch, metric, _ in jobs:
        relp.relevance_patching(model, batch.clean_tokens, batch.corrupted_tokens, metric, ["resid_pre", "attn_out", "mlp_out"],
                                rules=args.rules, logits_to_keep=1)
    node_relp_seconds = time.perf_counter() - t0

    table: dict[str, dict] = {}
    for method, pooled in scores.items():
        table[method] = {"seconds": pooled.seconds, "x_node_relp": pooled.seconds / node_relp_seconds,
                         "forward_equivalents": pooled.metadata["forward_equivalents"], "top_edges": pooled.top(15)}
    verification = None
    if "ap" in args.methods:
        generator = np.random.default_rng(args.seed)
        n = min(args.verify_edges, graph.n_edges)
        strongest: list[int] = []
        per_method = (n // 2) // max(1, len(scores))
        for pooled in scores.values():
            order = torch.sort(pooled.flat().abs(), descending=True, stable=True).indices.tolist()
            strongest += [i for i in order if i not in strongest][:per_method]
        rest = np.setdiff1d(np.arange(graph.n_edges), strongest)
        sampled = generator.choice(rest, size=min(n - len(strongest), rest.size), replace=False).tolist()
        flat = torch.zeros(graph.n_edges, dtype=torch.bool)
        flat[strongest + sampled] = True
        mask = graph.unflat(flat, fill=False)
        t0 = time.perf_counter()
        exact_batches = [
            edge_patching(model, b.clean_tokens, b.corrupted_tokens, m, edges=mask, batch_size=args.batch_size, logits_to_keep=1,
                          progress=True, max_forward_passes=float("inf"))
            for b, m, _ in jobs
        ]
        exact_seconds = time.perf_counter() - t0
        weights = [len(b) for b, _, _ in jobs]
        exact = sum(w * e.scores.nan_to_num(0.0) for w, e in zip(weights, exact_batches)) / sum(weights)
        verified = np.flatnonzero(flat.numpy())
        exact_values = graph.flat(exact)[flat].numpy()
        in_sample = np.isin(verified, sampled)
        for method, pooled in scores.items():
            values = graph.flat(pooled.summed().double())[flat].numpy()
            table[method].update(_agreement(values, exact_values, args.top_k))
            table[method]["pearson_random_sample"] = _agreement(values[in_sample], exact_values[in_sample], args.top_k)["pearson"]
        verification = {
            "n_edges": int(flat.sum()), "n_random": len(sampled), "seconds": exact_seconds,
            "edges": np.array(graph.edge_names())[verified].tolist(), "exact": exact_values.tolist(),
            "top_edges": sorted(zip(np.array(graph.edge_names())[flat.numpy()].tolist(), exact_values.tolist()),
                                key=lambda item: -abs(item[1]))[:15],
        }
    circuits = _circuit_outputs(model, out, scores, args.edge_count, not args.no_figures, summary["model"])
    summary = {
        **summary, "level": "edges", "graph": repr(graph), "n_edges": graph.n_edges, "methods": table,
        "node_relp_seconds": node_relp_seconds, "verification": verification, "circuits": circuits, "k": args.k,
        "versions": versions(), "total_seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    markdown = ioi_markdown(summary)
    (out / "results.md").write_text(markdown)
    for method, pooled in scores.items():
        torch.save({"scores": pooled.scores, "method": method, "graph": pooled.graph.key()}, out / f"edge_scores_{method}.pt")
    print(markdown)
    print(f"wrote {out}/ in {summary['total_seconds']:.0f} s")
    return summary


def ioi_markdown(summary: dict) -> str:
    lines = [
        f"# IOI edges: agreement with exact edge patching ({summary['model']})",
        "",
        f"{summary['n_prompts']} prompts, corruption `{summary['corruption']}`, {summary['graph']}; RelP rules `{summary['rules']}`.",
    ]
    verification = summary["verification"]
    if verification:
        lines.append(
            f"Exact edge patching on {verification['n_edges']} edges (the estimates' strongest, and "
            f"{verification['n_random']} at random), {verification['seconds']:.0f} s."
        )
    lines += ["", "| method | Pearson | Spearman | top-k overlap | Pearson (random part) | seconds | x node RelP |", "|---|---|---|---|---|---|---|"]
    for method, entry in summary["methods"].items():
        overlap = next((v for k, v in entry.items() if k.startswith("top") and k.endswith("_overlap")), float("nan"))
        lines.append(
            f"| {method_label(method)} | {entry.get('pearson', float('nan')):.3f} | {entry.get('spearman', float('nan')):.3f} | "
            f"{overlap:.2f} | {entry.get('pearson_random_sample', float('nan')):.3f} | {entry['seconds']:.1f} | {entry['x_node_relp']:.2f} |"
        )
    lines += ["", f"Node-level RelP (resid_pre, attn_out, mlp_out) on the same batches: {summary['node_relp_seconds']:.1f} s.", ""]
    for method, circuit in summary["circuits"].items():
        lines.append(f"{method_label(method)} circuit: {circuit['n_edges']} edges after pruning, nodes {', '.join(circuit['nodes'])}")
    return "\n".join(lines) + "\n"


def run_faithfulness(args, model, scoring_batches, eval_batches, prompt_note: str, started: float, load_seconds: float) -> dict:
    """``relp faithfulness --level edges`` (see the module docstring)."""
    out = Path(args.out)
    model_name = str(args.model or model.cfg.model_name)
    jobs = [
        (batch, LogitDiff(batch.answer_tokens, batch.wrong_tokens), f"scoring batch {i + 1}/{len(scoring_batches)}")
        for i, batch in enumerate(scoring_batches)
    ]
    scores = {}
    for method in args.methods:
        if method == "ap":
            per_batch = [edge_patching(model, b.clean_tokens, b.corrupted_tokens, m, batch_size=args.batch_size, logits_to_keep=1,
                                       progress=True) for b, m, _ in jobs]
            scores[method] = pool_edge_scores(per_batch)
        else:
            scores.update(_score(model, jobs, [method], args))
    from relp.experiments.faithfulness import full_and_empty, make_evaluator, results_markdown

    evaluator, evaluators = make_evaluator(model, eval_batches, args, EdgeCircuitEvaluator)
    template = empty_edge_circuit(next(iter(scores.values())))
    m_empty, m_full, shared_seconds = full_and_empty(evaluator, template, "edges")
    table, summaries = {}, {}
    for method, pooled in scores.items():
        summary = edge_cpr_cmd(evaluator, pooled, label=method_label(method))
        summaries[method] = summary
        entry = summary.to_dict()
        entry.update(scoring_seconds=pooled.seconds, evaluation_seconds=summary.seconds, seconds=pooled.seconds + summary.seconds,
                     forward_equivalents=pooled.metadata["forward_equivalents"])
        table[method] = entry
        print(f"  {method_label(method)}: CPR {summary.cpr:.3f}, CMD {summary.cmd:.3f} (evaluation {summary.seconds:.1f} s)")
        circuit = select_edges(pooled, percent=args.export_percent)
        to_mib_json(circuit, out / "circuits" / f"{method}.json", model=model)
    baseline = edge_random_baseline(evaluator, template, seeds=args.seeds)
    table["random"] = baseline.to_dict()
    print(f"  random: CPR {baseline.cpr[0]:.3f} ± {baseline.cpr[1]:.3f}, CMD {baseline.cmd[0]:.3f} ± {baseline.cmd[1]:.3f}")
    total_seconds = time.perf_counter() - started
    run_info = {
        "model": model_name, "level": "edges", "n_prompts": args.n_prompts, "n_eval": args.n_eval, "prompts": prompt_note,
        "corruption": args.corruption, "templates": args.templates, "seed": args.seed, "components": ["edges"],
        "per_position": False, "n_nodes": template.n_total, "graph": repr(template.graph), "ablation": args.ablation,
        "rules": args.rules, "k": args.k, "metric": "logit_diff (IO - S, last token, mean over prompts)", "m_full": m_full,
        "m_empty": m_empty, "random_seeds": args.seeds,
        "timings_s": {
            "load": load_seconds, "scoring": {m: s.seconds for m, s in scores.items()},
            "evaluation": {m: s.seconds for m, s in summaries.items()}, "shared_full_and_empty": shared_seconds,
            "random": baseline.seconds, "total": total_seconds,
        },
        "evaluation_forward_passes": sum(e.forward_passes for e in evaluators), "versions": versions(),
    }
    (out / "faithfulness.json").write_text(json.dumps(table, indent=2))
    (out / "run.json").write_text(json.dumps(run_info, indent=2))
    markdown = results_markdown(table, run_info)
    (out / "faithfulness.md").write_text(markdown)
    if not args.no_figures:
        plotting.plot_faithfulness(
            {method_label(m): s for m, s in summaries.items()}, baseline,
            title=f"{model_name}: IOI edges, {args.ablation} ablation", path=out / "faithfulness.png", unit="edges",
        )
    print(markdown)
    print(f"wrote {out}/ in {total_seconds:.0f} s")
    return {"table": table, "run": run_info}
