"""Method study: every registered method and preset against activation patching, with its cost.

For each *study* (a model, a task and a corruption) the prompts are built once, activation patching
(the ground truth) is computed once and cached on disk (keyed by the model's weights, the prompts, the
metric and the components: a second run of the study loads it), and every other method of the
registry (:mod:`relp.methods`: AtP, RelP, presets, AtP*, integrated gradients, two-point,
estimate-then-verify, ...) scores the same batches. Per method and component it reports Pearson,
Spearman and top-k overlap with activation patching (cells of all layout batches pooled), and the cost
in forward-pass equivalents (forward passes over the batch actually run, a backward pass counting as
two; ``metadata["forward_equivalents"]`` of each result) and in seconds.

Studies (``--studies``):

* ``ioi-abc``, ``ioi-s2_io_flip``: IOI prompts on the decoder (``--model``, default the embedded
  SmolLM2-135M-Instruct), normalised logit difference, the two corruptions of the IOI experiment;
* ``contrast``: contrast pairs on the encoder (``--encoder``, default all-MiniLM-L6-v2), normalised
  similarity difference (as ``relp embedding``).

With ``--rule-sites`` every study also measures where each rule acts: relevance patching with the
default preset with one rule site left out at a time (each kind of norm for the LN-rule, the
Identity-rule, the Half-rule) and the change in agreement it causes.

    python -m relp methods --out runs/methods                  # all studies, all methods
    python -m relp methods --studies ioi-s2_io_flip --methods ap atp relp ig --n-prompts 16

Writes, per study, ``<study>/results.json`` in the IOI experiment's layout (``agreement[method]
[component]`` with ``pearson``, ``spearman``, ``top_k``, plus ``cost[method]`` with
``forward_equivalents``, ``fraction_of_ap`` and ``seconds``), ``<study>/results.md`` and
``<study>/pareto.png`` (agreement against cost); and at the top level ``results.json`` (every study) and
``results.md`` (every table).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

import relp
from relp.ap_cache import cached_activation_patching, digest
from relp.experiments.common import _json_default, versions
from relp.methods import METHODS, forward_equivalents, get_method, reference_method

STUDIES = ("ioi-abc", "ioi-s2_io_flip", "contrast")
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
BLOCK = ["resid_pre", "attn_out", "mlp_out"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relp methods", description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES), help="default: all")
    parser.add_argument("--model", default=None, help="decoder for the IOI studies (relp.load_model spec; default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help=f"encoder for the contrast study (default: {DEFAULT_ENCODER})")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
        help="methods and presets to compare (default: every registered one: " + ", ".join(METHODS) + ")",
    )
    parser.add_argument("--n-prompts", type=int, default=32, help="IOI prompts per corruption (default: 32)")
    parser.add_argument("--n-pairs", type=int, default=32, help="contrast pairs (default: 32)")
    parser.add_argument("--templates", default="baba", help="IOI template set (default: baba)")
    parser.add_argument("--components", nargs="+", default=BLOCK, help="components of the IOI studies (default: resid_pre attn_out mlp_out)")
    parser.add_argument("--encoder-components", nargs="+", default=[*BLOCK, "head"], help="components of the contrast study (default: resid_pre attn_out mlp_out head)")
    parser.add_argument("--rules", default="relp", help="rule preset of the methods that take rules (default: relp)")
    parser.add_argument("--steps", type=int, default=None, help="integration steps of the path methods (default: each method's own)")
    parser.add_argument("--k", type=float, default=None, help="cells verified by estimate-then-verify: a count, or a fraction if < 1 (default: the method's own)")
    parser.add_argument("--rule-sites", action="store_true", help="also measure the effect of each rule site (RelP with one site left out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward pass of activation patching (default: from free memory)")
    parser.add_argument("--top-k", type=int, default=10, help="k of the top-k overlap")
    parser.add_argument("--ap-cache", default=None, help="directory of cached activation-patching results (default: <relp cache>/activation_patching)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--out", default="runs/methods", help="output directory")
    parser.add_argument("--no-figures", action="store_true", help="skip the Pareto plots")
    return parser


# ----------------------------------------------------------------------------------------------
# The tasks: batches, metrics, and a key that identifies each metric (for the AP cache)


def ioi_jobs(model, n_prompts: int, corruption: str, seed: int, templates: str) -> tuple[list, dict]:
    """[(batch, metric, metric key)] for IOI prompts, and facts about the task for results.json."""
    from relp.experiments.ioi import ioi_metrics
    from relp.tasks import make_ioi_dataset

    data = make_ioi_dataset(model, n_prompts, corruption=corruption, seed=seed, templates=templates)
    batches = list(data.batches())
    metrics, clean_ld, corrupted_ld = ioi_metrics(model, batches)
    jobs = []
    for batch, metric in zip(batches, metrics):
        key = digest(["normalized_logit_diff", metric.answer, metric.wrong, metric.clean_value, metric.corrupted_value])
        jobs.append((batch, metric, key))
    facts = {
        "task": "ioi", "corruption": corruption, "templates": templates, "n_prompts": len(data),
        "metric": "normalized_logit_diff", "clean_logit_diff": clean_ld.mean().item(),
        "corrupted_logit_diff": corrupted_ld.mean().item(),
    }
    return jobs, facts


def contrast_jobs(model, n_pairs: int, seed: int) -> tuple[list, dict]:
    """[(batch, metric, metric key)] for contrast pairs on an encoder (mean pooling as trained)."""
    from relp.embeddings import SentenceEmbedding
    from relp.experiments.embedding import contrast_metric
    from relp.tasks import make_contrast_dataset

    try:
        embedding = SentenceEmbedding.from_model(model)
    except ValueError:  # a model without a trained pooling (e.g. a random test model): mean pooling
        embedding = SentenceEmbedding("mean")
        print(f"{model.cfg.model_name}: no trained pooling recorded; using mean pooling (normalised)")
    data = make_contrast_dataset(model, n_pairs, changes="all", seed=seed)
    jobs = []
    for batch in data.batches():
        metric, _, _ = contrast_metric(model, batch, embedding)
        key = digest(["similarity_difference", embedding.name, metric.anchors, metric.clean_value, metric.corrupted_value])
        jobs.append((batch, metric, key))
    facts = {"task": "contrast", "n_prompts": len(data), "metric": "similarity_difference", "pooling": embedding.pooling}
    return jobs, facts


# ----------------------------------------------------------------------------------------------
# One study


def method_settings(args) -> dict:
    """The experiment options every method may take (each receives those its registry entry declares)."""
    settings = {"batch_size": args.batch_size, "progress": False, "rules": args.rules}
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.k is not None:
        settings["k"] = int(args.k) if args.k >= 1 else float(args.k)
    return settings


def run_study(
    name: str, model, jobs: list, components: list[str], methods: list[str], args, *, cache_dir: Path,
    logits_to_keep: int | None = None,
) -> dict:
    """Score every method on every job; returns the study's summary (agreement, cost, errors) and, under
    ``"results"``, the results per method (not written to JSON)."""
    settings = method_settings(args)
    if logits_to_keep is not None:
        settings["logits_to_keep"] = logits_to_keep
    reference = reference_method()
    results: dict[str, list] = {}
    errors: dict[str, str] = {}
    print(f"{name}: {len(jobs)} batch(es), {sum(len(b) for b, _, _ in jobs)} prompts")
    ap_options = reference.experiment_options(settings)
    results[reference.key] = []
    for batch, metric, metric_key in jobs:
        results[reference.key].append(cached_activation_patching(
            model, batch.clean_tokens, batch.corrupted_tokens, metric, components,
            cache_dir=cache_dir, metric_key=metric_key, **ap_options,
        ))
    loaded = sum(r.metadata["ap_cache"]["loaded"] for r in results[reference.key])
    print(f"  {reference.key}: {loaded}/{len(jobs)} batch(es) from the cache")
    for key in methods:
        if key == reference.key:
            continue
        method = get_method(key)
        try:
            method_results = []
            for batch, metric, _ in jobs:
                result = method(model, batch.clean_tokens, batch.corrupted_tokens, metric, components, **method.experiment_options(settings))
                method_results.append(result)
            results[key] = method_results
            print(f"  {key}: {sum(r.seconds for r in method_results):.1f} s")
        except Exception as error:  # one method failing on an architecture must not end the study
            errors[key] = f"{type(error).__name__}: {error}"
            print(f"  {key}: FAILED ({errors[key]})")
            traceback.print_exc()
    summary = summarise_study(results, top_k=args.top_k)
    summary["errors"] = errors
    summary["relp_options"] = get_method("relp").experiment_options(settings)
    summary["results"] = results
    return summary


def summarise_study(results: dict[str, list], *, top_k: int = 10) -> dict:
    """``agreement[method][component]`` (pearson, spearman, top_k) and ``cost[method]`` (forward
    equivalents summed over the batches, their fraction of activation patching's, seconds)."""
    reference = reference_method().key
    agreement, cost = {}, {}
    ap_cost = _total_cost(results[reference])
    for key, method_results in results.items():
        fe = _total_cost(method_results)
        cost[key] = {
            "forward_equivalents": fe,
            "fraction_of_ap": None if fe is None or not ap_cost else fe / ap_cost,
            "seconds": sum(r.seconds for r in method_results),
        }
        if key == reference:
            continue
        table = relp.agreement(method_results, results[reference], top_k=top_k)
        agreement[key] = {
            component: {
                "pearson": row.pearson, "spearman": row.spearman, "top_k": row.top_k_overlap,
                "pearson_without_max": row.pearson_without_max, "n_cells": int(row.n_cells),
            }
            for component, row in table.iterrows()
        }
    return {"agreement": agreement, "cost": cost, "top_k": top_k}


def _total_cost(method_results) -> float | None:
    values = [forward_equivalents(r) for r in method_results]
    return None if any(v is None for v in values) else float(sum(values))


# ----------------------------------------------------------------------------------------------
# Where each rule acts: RelP with one rule site left out


def rule_site_study(model, jobs, components, ap_results, *, preset: str, top_k: int, options: dict | None = None) -> dict:
    """{left-out site: {component: {pearson, spearman, top_k, delta_pearson, delta_spearman}}}, plus
    ``sites``: the hook points each rule site acts on in this model. The deltas are the agreement of
    the full preset minus that without the site (positive: the site helps). `options`: what relevance
    patching receives in the study besides its rules (``logits_to_keep`` for IOI)."""
    from relp.rules import resolve_rules, rule_sites

    sites = rule_sites(model)
    full = [n for n in resolve_rules(model, preset).active]
    expanded = []  # the preset as separate sites: the LN-rule split by kind of norm
    for rule in full:
        if rule == "ln":
            expanded += [s for s in sites if s.startswith("ln_") and sites[s]]
        elif sites.get(rule):
            expanded.append(rule)
    table: dict = {"sites": {s: sites[s] for s in expanded}, "preset": preset, "rules": full}

    def scored(rules):
        rs = [relp.relevance_patching(model, b.clean_tokens, b.corrupted_tokens, m, components, rules=list(rules), **(options or {}))
              for b, m, _ in jobs]
        frame = relp.agreement(rs, ap_results, top_k=top_k)
        return {c: {"pearson": row.pearson, "spearman": row.spearman, "top_k": row.top_k_overlap} for c, row in frame.iterrows()}

    baseline = scored(expanded)
    table["all"] = baseline
    table["none"] = scored([])
    for site in expanded:
        without = scored([s for s in expanded if s != site])
        table[f"without {site}"] = {
            c: {**v, "delta_pearson": baseline[c]["pearson"] - v["pearson"], "delta_spearman": baseline[c]["spearman"] - v["spearman"]}
            for c, v in without.items()
        }
    return table


# ----------------------------------------------------------------------------------------------
# Output


def study_markdown(name: str, study: dict) -> str:
    components = list(next(iter(study["agreement"].values()), {}))
    reference = reference_method().key
    lines = [f"## {name}: agreement with activation patching against cost", ""]
    facts = {k: v for k, v in study.items() if k in ("model", "n_prompts", "corruption", "metric")}
    lines += [", ".join(f"{k} {v}" for k, v in facts.items()), ""]
    header = "| method | forward eq. | % of AP | seconds | " + " | ".join(f"{c} r / rho / top-{study['top_k']}" for c in components) + " |"
    lines += [header, "|" + "---|" * (4 + len(components))]
    for key, cost in study["cost"].items():
        label = get_method(key).label if key in METHODS else key
        fe = "?" if cost["forward_equivalents"] is None else f"{cost['forward_equivalents']:.0f}"
        share = "" if cost["fraction_of_ap"] is None else f"{100 * cost['fraction_of_ap']:.2f}"
        if key == reference:
            cells = ["exact"] * len(components)
        else:
            cells = [
                f"{a['pearson']:.3f} / {a['spearman']:.3f} / {a['top_k']:.2f}"
                for a in (study["agreement"][key][c] for c in components)
            ]
        lines.append(f"| {label} (`{key}`) | {fe} | {share} | {cost['seconds']:.1f} | " + " | ".join(cells) + " |")
    for key, error in study.get("errors", {}).items():
        lines.append(f"\n`{key}` failed: {error}")
    sites = study.get("rule_sites")
    if sites:
        lines += ["", f"### Rule sites (preset `{sites['preset']}`): agreement without each site (change: full minus without)", ""]
        lines += ["| rule set | " + " | ".join(f"{c} r / rho" for c in components) + " |", "|" + "---|" * (1 + len(components))]
        for row_name, row in sites.items():
            if not isinstance(row, dict) or row_name == "sites":
                continue
            cells = []
            for c in components:
                v = row[c]
                delta = f" ({v['delta_pearson']:+.3f} / {v['delta_spearman']:+.3f})" if "delta_pearson" in v else ""
                cells.append(f"{v['pearson']:.3f} / {v['spearman']:.3f}{delta}")
            lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
        lines += ["", "Sites: " + "; ".join(f"`{s}` {len(h)} hook point(s)" for s, h in sites["sites"].items())]
    return "\n".join(lines) + "\n"


def write_study(out: Path, name: str, study: dict, *, figures: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = study.pop("results")
    (out / "results.json").write_text(json.dumps(study, indent=2, default=_json_default))
    (out / "results.md").write_text(study_markdown(name, study))
    for key, method_results in results.items():
        for i, result in enumerate(method_results):
            result.save(out / "scores" / f"{key}_batch{i}.pt")
    if figures:
        from relp.plotting import plot_pareto

        plot_pareto(study, title=f"{name} ({study.get('model', '')})", path=out / "pareto.png")


def run(args: argparse.Namespace, *, model=None, encoder=None) -> dict:
    """Run the studies of `args`; `model` / `encoder` override ``--model`` / ``--encoder`` (tests).
    Returns the top-level summary (also written to results.json)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if reference_method().key not in args.methods:
        args.methods = [reference_method().key, *args.methods]
    cache_dir = Path(args.ap_cache) if args.ap_cache else relp.default_cache_dir() / "activation_patching"
    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    summary = {"studies": {}, "methods": list(args.methods), "versions": versions(), "ap_cache": str(cache_dir)}
    for name in args.studies:
        if name.startswith("ioi"):
            if model is None:
                model = relp.load_model(args.model, device=args.device, dtype=dtype)
            study_model, components = model, list(args.components)
            jobs, facts = ioi_jobs(model, args.n_prompts, name.split("-", 1)[1], args.seed, args.templates)
            logits_to_keep = 1  # the IOI metric reads only the last token (ioi_metrics checks END is last)
        else:
            if encoder is None:
                encoder = relp.load_model(args.encoder, device=args.device, dtype=dtype)
            study_model, components = encoder, list(args.encoder_components)
            jobs, facts = contrast_jobs(encoder, args.n_pairs, args.seed)
            logits_to_keep = None
        study = run_study(
            name, study_model, jobs, components, args.methods, args, cache_dir=cache_dir, logits_to_keep=logits_to_keep
        )
        study = {"model": str(study_model.cfg.model_name), "components": components, **facts, **study}
        relp_options = {k: v for k, v in study.pop("relp_options").items() if k != "rules"}
        if args.rule_sites:
            study["rule_sites"] = rule_site_study(
                study_model, jobs, components, study["results"][reference_method().key], preset=args.rules,
                top_k=args.top_k, options=relp_options,
            )
        write_study(out / name, name, study, figures=not args.no_figures)
        summary["studies"][name] = study
        print(study_markdown(name, study))
    summary["total_seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    (out / "results.md").write_text("# Method study\n\n" + "\n".join(study_markdown(n, s) for n, s in summary["studies"].items()))
    print(f"wrote {out}/ in {summary['total_seconds']:.0f} s")
    return summary


def parse(argv=None) -> argparse.Namespace:
    """Parsed and checked arguments (every mistake is one line, before anything loads)."""
    from relp.components import check_component_names
    from relp.experiments.common import parse_arguments

    parser = build_parser()
    args = parse_arguments(parser, argv)
    try:
        check_component_names(args.encoder_components)
    except ValueError as error:
        parser.error(f"--encoder-components: {error}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive number of integration steps; got {args.steps}")
    if args.k is not None and not (args.k > 0 and (args.k < 1 or float(args.k).is_integer())):
        parser.error(f"--k must be a fraction in (0, 1) or a whole number of cells; got {args.k}")
    return args


def main(argv=None) -> dict:
    return run(parse(argv))


if __name__ == "__main__":
    main()
