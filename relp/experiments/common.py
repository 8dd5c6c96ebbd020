"""Pieces shared by the experiment scripts: method options, scoring, agreement, library versions, and the
output files (results.json, results.md, positions.csv, scores, figures) that every experiment writes.

An experiment scores (:func:`score_batches`), then summarises (:func:`position_tables`,
:func:`summarise`), then writes (:func:`write_outputs`); each step returns what it made. Methods,
their options and their labels come from the method registry (:mod:`relp.methods`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import relp
from relp import plotting
from relp.methods import METHODS, get_method, method_label, reference_method, standard_methods
from relp.metrics import agreement
from relp.results import pool_results
from relp.tasks import aggregate_by_position

CORRUPTIONS = ["abc", "s2_io_flip", "io_s_swap"]


def add_model_and_method_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --templates, --methods, --rules, --device, --dtype: identical in every IOI experiment."""
    parser.add_argument("--model", default=None, help="model spec for relp.load_model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--templates", default="baba", help="template set (see relp.tasks.TEMPLATE_SETS; default: baba)")
    add_method_arguments(parser)


def add_method_arguments(parser: argparse.ArgumentParser, *, default_methods: list[str] | None = None) -> None:
    """--methods (any registered method; default: the standard ones, AP, AtP and RelP), --rules, --device,
    --dtype: identical in every experiment."""
    default_methods = standard_methods() if default_methods is None else default_methods
    parser.add_argument(
        "--methods", nargs="+", default=default_methods, choices=list(METHODS),
        help=f"scoring methods (relp.methods registry; default: {' '.join(default_methods)}; any of: " + ", ".join(
            f"{m.key} = {m.display_name}" for m in METHODS.values()) + ")",
    )
    parser.add_argument("--rules", default="relp", help="LRP rule preset for relevance patching (default: relp)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])


def parse_arguments(parser: argparse.ArgumentParser, argv=None, *, compares: str | None = None) -> argparse.Namespace:
    """Parse `argv` and check every argument (:func:`check_arguments`) before anything is loaded; a
    mistaken one ends the program with argparse's one-line error (exit status 2), no traceback.
    `compares` names an experiment that compares methods with the exact one (:func:`require_reference`)."""
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        if compares is not None:
            require_reference(args.methods, compares)
    except (ValueError, SystemExit) as error:
        parser.error(str(error))
    return args


_POSITIVE = {  # argument -> what it counts (checked when the experiment has it)
    "n_prompts": "prompts", "n_eval": "held-out prompts", "n_pairs": "contrast pairs", "seeds": "random circuits",
    "top_k": "cells in the top-k overlap", "batch_size": "rows per forward pass",
}


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the first mistaken argument of an experiment's parsed `args`, and what is
    expected. Needs no model: rule names are checked against ``relp.rules.PRESETS``/``RULES``, component
    names with ``relp.components.check_component_names``, template sets against
    ``relp.tasks.TEMPLATE_SETS``, change kinds against ``relp.tasks.CONTRAST_CHANGES``."""
    from relp.components import check_component_names
    from relp.rules import PRESETS, RULES
    from relp.tasks import CONTRAST_CHANGES, TEMPLATE_SETS

    given = vars(args)
    for name, counts in _POSITIVE.items():
        value = given.get(name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number of {counts}; got {value}")
    if "rules" in given and given["rules"] not in PRESETS and given["rules"] not in RULES:
        raise ValueError(
            f"--rules {given['rules']!r} is neither a rule preset nor a rule; expected a preset from "
            f"{sorted(PRESETS)} or a rule from {sorted(RULES)}"
        )
    if "components" in given:
        try:
            check_component_names(given["components"])
        except ValueError as error:
            raise ValueError(f"--components: {error}") from None
    if "templates" in given and given["templates"] not in TEMPLATE_SETS:
        raise ValueError(f"--templates {given['templates']!r} is not a template set; expected one of {sorted(TEMPLATE_SETS)}")
    changes = given.get("changes")
    if changes is not None and changes != ["all"]:
        unknown = [c for c in changes if c not in CONTRAST_CHANGES]
        if unknown or len(set(changes)) != len(changes):
            raise ValueError(
                f"--changes {' '.join(changes)}: expected 'all' or distinct kinds from {list(CONTRAST_CHANGES)}"
                + (f"; unknown: {unknown}" if unknown else "")
            )
    if given.get("no_normalize") and given.get("pooling", "") is None:
        raise ValueError("--no-normalize needs --pooling (the model's trained pooling fixes its own normalisation)")
    percent = given.get("export_percent")
    if percent is not None and not 0 < percent <= 100:
        raise ValueError(f"--export-percent must be in (0, 100]; got {percent:g}")
    if "device" in given:
        _check_device(given["device"])
    if given.get("level") == "edges":
        from relp.experiments.edges import check_level_arguments

        check_level_arguments(args)
    out = given.get("out")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file; expected a directory (new or existing)")


def _check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device {device!r} is not a torch device ({error}); expected e.g. cpu, cuda, cuda:1, mps") from None
    if parsed.type == "cuda":
        available = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= available or not available:
            raise ValueError(f"--device {device}: this machine has {available} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine")


def require_reference(methods, experiment: str) -> None:
    """Agreement needs the exact method: a clear exit when it is not among `methods`."""
    reference = reference_method()
    if reference.key not in methods:
        raise SystemExit(
            f"the {experiment} experiment compares methods with {reference.display_name}: keep '{reference.key}' in --methods"
        )


def require_end_last(batch) -> None:
    """IOI's metric reads the last token, so the experiments keep only its logits (logits_to_keep=1):
    refuse a batch whose END position is not the last one."""
    if not all(position == batch.length - 1 for position in batch.positions["END"].tolist()):
        raise ValueError("IOI prompts must end at the END position: the metric reads the last token")


def score_batches(model, jobs, methods, components, settings: dict) -> dict[str, list]:
    """{method key: [PatchingResult per batch]}: every method of `methods` on every job.

    `jobs` are (batch, metric, label) triples (a layout batch of clean/corrupted tokens, its metric, a
    label for progress lines); `settings` holds the experiment's options (``batch_size``, ``progress``,
    ``logits_to_keep``, ``rules``), of which each method receives the ones its registry entry declares.
    Each result carries the batch's position labels in ``metadata["position_labels"]``.
    """
    results: dict[str, list] = {key: [] for key in methods}
    for batch, metric, label in jobs:
        for key in methods:
            method = get_method(key)
            print(f"  {label}: {key}")
            result = method(model, batch.clean_tokens, batch.corrupted_tokens, metric, components, **method.experiment_options(settings))
            result.metadata["position_labels"] = batch.position_labels()
            results[key].append(result)
    return results


def position_tables(results: dict[str, list], batches, components) -> dict[str, dict]:
    """{method: {component: PositionScores}}: each method's scores per named position, over all batches."""
    tables: dict[str, dict] = {}
    for key, method_results in results.items():
        tables[key] = {}
        for component in components:
            position_dim = relp.COMPONENTS[component].axes.index("position")
            for result, batch in zip(method_results, batches):
                table = aggregate_by_position(result[component], batch, position_dim=position_dim)
                tables[key][component] = tables[key].get(component, 0) + table
    return tables


def summarise(results: dict[str, list], *, top_k: int = 10) -> dict:
    """Agreement of every method with the reference (:func:`agreement_summary`) and time per method."""
    return {
        "agreement": agreement_summary(results, top_k=top_k),
        "timings_s": {key: sum(r.seconds for r in rs) for key, rs in results.items()},
    }


def finish(out: Path, summary: dict, markdown, results: dict, tables: dict, args, started: float) -> dict:
    """`summary` completed with agreement, timings, versions and the total time; every output file
    written. Returns the completed summary."""
    summary = {**summary, **summarise(results, top_k=args.top_k), "versions": versions()}
    summary["total_seconds"] = time.perf_counter() - started
    write_outputs(out, summary, markdown(summary, top_k=args.top_k), results, tables, args.components,
                  figures=not args.no_figures)
    print(f"wrote {out}/ in {summary['total_seconds']:.0f} s")
    return summary


def versions() -> dict:
    """Versions of the libraries a result depends on, for results files."""
    import importlib.metadata

    import transformers

    try:  # TransformerLens 4 has no __version__ attribute
        transformer_lens_version = importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:
        transformer_lens_version = "unknown"
    return {
        "relp": relp.__version__,
        "torch": torch.__version__,
        "transformer_lens": transformer_lens_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def agreement_summary(results: dict[str, list], *, top_k: int = 10) -> dict:
    """{method: {component: statistics}} of every method against the reference (activation patching)."""
    reference = reference_method().key
    summary = {}
    for method, method_results in results.items():
        if method == reference:
            continue
        table = agreement(method_results, results[reference], top_k=top_k)
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
    lines = []
    for statistic, title in (
        ("pearson", "Pearson r"),
        ("spearman", "Spearman rho"),
        (f"top{top_k}_overlap", f"top-{top_k} overlap"),
        ("pearson_without_max", "Pearson r without the largest-|AP| cell"),
    ):
        header = "| model | " + " | ".join(f"{c} {method_label(m)}" for c in components for m in methods) + " |"
        lines += [f"## {title}", "", header, "|" + "---|" * (1 + len(components) * len(methods))]
        cells = [f"{summary['agreement'][m][c][statistic]:.3f}" for c in components for m in methods]
        lines += [f"| {summary['model']} | " + " | ".join(cells) + " |", ""]
    timings = ", ".join(f"{method_label(m)} {s:.1f} s" for m, s in summary["timings_s"].items())
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
            axes = relp.COMPONENTS[component].axes
            if "neuron" in axes:
                continue  # one row per neuron: too long to be a table worth reading
            frame = table.to_frame(dims=[a for a in axes if a != "position"])
            frame.insert(0, "component", component)
            frame.insert(0, "method", method)
            frames.append(frame)
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)


def _write_figures(results: dict, components: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            if "neuron" in relp.COMPONENTS[component].axes:
                continue  # a layer x neuron map per method is not readable
            fig = plotting.plot_scores(result, [component], position_labels=position_labels, path=figures / f"heatmap_{method}_{component}.png")
            plt.close(fig)
    reference_key = reference_method().key
    reference = pool_results(results[reference_key])
    for method, rs in results.items():
        if method == reference_key:
            continue
        pooled = pool_results(rs)
        for component in components:
            fig, ax = plt.subplots(figsize=(5, 4.5))
            plotting.plot_scatter(pooled, reference, component, ax=ax)
            fig.savefig(figures / f"scatter_{method}_{component}.png", dpi=120, bbox_inches="tight")
            plt.close(fig)
