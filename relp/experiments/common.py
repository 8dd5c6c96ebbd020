"""Pieces shared by the experiment scripts: method names, common options, library versions, and the
output files (results.json, results.md, positions.csv, scores, figures) that every experiment writes."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

METHODS = {"ap": "activation_patching", "atp": "attribution_patching", "relp": "relevance_patching"}
CORRUPTIONS = ["abc", "s2_io_flip", "io_s_swap"]


def add_model_and_method_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --templates, --methods, --rules, --device, --dtype: identical in every IOI experiment."""
    parser.add_argument("--model", default=None, help="model spec for relp.load_model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--templates", default="baba", help="template set (see relp.tasks.TEMPLATE_SETS; default: baba)")
    add_method_arguments(parser)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """--methods, --rules, --device, --dtype: identical in every experiment."""
    parser.add_argument("--methods", nargs="+", default=["ap", "atp", "relp"], choices=sorted(METHODS))
    parser.add_argument("--rules", default="relp", help="LRP rule preset for relevance patching (default: relp)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])


def score_batch(model, batch, metric, args, results: dict, tables: dict, *, label: str, ap_options=None) -> None:
    """Score one layout batch with every method of ``args.methods`` (components, rules, batch size from
    `args`); append each result to ``results[method]`` and add its per-position table to ``tables``."""
    import relp
    from relp.tasks import aggregate_by_position

    for method in args.methods:
        kwargs = {"components": args.components}
        if method == "ap":
            kwargs.update(batch_size=args.batch_size, progress=True, **(ap_options or {}))
        if method == "relp":
            kwargs.update(rules=args.rules)
        print(f"  {label}: {method}")
        result = getattr(relp, METHODS[method])(model, batch.clean_tokens, batch.corrupted_tokens, metric, **kwargs)
        result.metadata["position_labels"] = batch.position_labels()
        results[method].append(result)
        for component in args.components:
            position_dim = 1 if component == "neuron" else -1
            table = aggregate_by_position(result[component], batch, position_dim=position_dim)
            tables[method][component] = tables[method].get(component, 0) + table


def finish(out: Path, summary: dict, markdown, results: dict, tables: dict, args, started: float) -> dict:
    """Add agreement, timings and versions to `summary`, write every output file, and return it."""
    import time

    summary["agreement"] = agreement_summary(results, top_k=args.top_k)
    summary["timings_s"] = {m: sum(r.seconds for r in rs) for m, rs in results.items()}
    summary["versions"] = versions()
    summary["total_seconds"] = time.perf_counter() - started
    write_outputs(out, summary, markdown(summary, top_k=args.top_k), results, tables, args.components,
                  figures=not args.no_figures)
    print(f"wrote {out}/ in {summary['total_seconds']:.0f} s")
    return summary


def versions() -> dict:
    """Versions of the libraries a result depends on, for results files."""
    import transformer_lens
    import transformers

    import relp

    return {
        "relp": relp.__version__,
        "torch": torch.__version__,
        "transformer_lens": getattr(transformer_lens, "__version__", "unknown"),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def agreement_summary(results: dict[str, list], *, top_k: int = 10) -> dict:
    """{method: {component: statistics}} of every method against activation patching ("ap")."""
    from relp.metrics import agreement

    summary = {}
    for method, method_results in results.items():
        if method == "ap":
            continue
        table = agreement(method_results, results["ap"], top_k=top_k)
        summary[method] = {
            component: {
                "pearson": row.pearson,
                "spearman": row.spearman,
                f"top{top_k}_overlap": row.top_k_overlap,
                "pearson_without_max": row.pearson_without_max,
                "n_cells": int(row.n_cells),
            }
            for component, row in table.iterrows()
        }
    return summary


def agreement_markdown(summary: dict, *, top_k: int = 10) -> str:
    """Agreement tables (rows: model; columns: component x method) and the wall time per method."""
    components = summary["components"]
    methods = [m for m in summary["agreement"]]
    label = {"atp": "AtP", "relp": "RelP"}
    lines = []
    for statistic, title in (
        ("pearson", "Pearson r"),
        ("spearman", "Spearman rho"),
        (f"top{top_k}_overlap", f"top-{top_k} overlap"),
        ("pearson_without_max", "Pearson r without the largest-|AP| cell"),
    ):
        header = "| model | " + " | ".join(f"{c} {label.get(m, m)}" for c in components for m in methods) + " |"
        lines += [f"## {title}", "", header, "|" + "---|" * (1 + len(components) * len(methods))]
        cells = [f"{summary['agreement'][m][c][statistic]:.3f}" for c in components for m in methods]
        lines += [f"| {summary['model']} | " + " | ".join(cells) + " |", ""]
    timings = ", ".join(f"{label.get(m, m.upper())} {s:.1f} s" for m, s in summary["timings_s"].items())
    lines += [f"Wall time per method: {timings}.", ""]
    return "\n".join(lines)


def write_outputs(out: Path, summary: dict, markdown: str, results: dict, tables: dict, components, *, figures: bool) -> None:
    """results.json, results.md, positions.csv, scores/*.pt and (optionally) figures/*.png."""
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    (out / "results.md").write_text(markdown)
    _write_position_table(tables, out / "positions.csv")
    for method, method_results in results.items():
        for i, result in enumerate(method_results):
            result.save(out / "scores" / f"{method}_batch{i}.pt")
    if figures:
        _write_figures(results, list(components), out)
    print(markdown)


def _write_position_table(tables: dict, path: Path) -> None:
    import pandas as pd

    frames = []
    for method, by_component in tables.items():
        for component, table in by_component.items():
            if component in ("head",):
                frame = table.to_frame(dims=["layer", "head"])
            elif component == "neuron":
                continue
            else:
                frame = table.to_frame(dims=["layer"])
            frame.insert(0, "component", component)
            frame.insert(0, "method", method)
            frames.append(frame)
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)


def _write_figures(results: dict, components: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from relp import plotting
    from relp.results import pool_results

    figures = out / "figures"
    first = {method: rs[0] for method, rs in results.items()}
    for method, result in first.items():
        tokens = result.tokens
        labels = result.metadata.get("position_labels") or []
        position_labels = [
            f"{tok}\n({lab})" if lab not in ("other",) and i < len(labels) else tok
            for i, (tok, lab) in enumerate(zip(tokens, labels))
        ] if labels else None
        for component in components:
            if component == "neuron":
                continue
            fig = plotting.plot_scores(result, [component], position_labels=position_labels, path=figures / f"heatmap_{method}_{component}.png")
            plt.close(fig)
    reference = pool_results(results["ap"])
    for method, rs in results.items():
        if method == "ap":
            continue
        pooled = pool_results(rs)
        for component in components:
            fig, ax = plt.subplots(figsize=(5, 4.5))
            plotting.plot_scatter(pooled, reference, component, ax=ax)
            fig.savefig(figures / f"scatter_{method}_{component}.png", dpi=120, bbox_inches="tight")
            plt.close(fig)
