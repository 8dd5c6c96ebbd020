"""Estimate, then verify: exact activation patching on the cells an estimate ranks highest.

A linear estimate (AtP, RelP) scores every cell for 2 forward + 1 backward passes; activation
patching (AP) is exact but costs one forward pass per cell. :func:`verify` spends AP's cost only where
it matters: it patches the k highest-|score| cells of an estimate exactly (``relevance_patching``'s
ranking is good enough to find them, arXiv 2508.21258; AtP* makes the same argument for AtP,
arXiv 2403.00745, whose verification step patches the top cells). The result holds the exact AP value
on those cells and the estimate's value everywhere else, so its top of the ranking is exact.

What the estimate may have missed (a cell it ranks low whose true effect is large) is estimated from
a uniform random sample of the other cells, also patched exactly: the share of sampled cells whose
|AP| exceeds the smallest verified |AP|, times the number of unverified cells, estimates how many
unverified cells belong in the top. The sampled cells keep the estimate's value in the scores (so
the scores do not depend on the random draw); their AP values are in the metadata.

Conventions:

* The k cells are ranked within each component (``per_component=True``, the default: every component
  gets its share, which matters when one component's effects dwarf another's), or over all components
  together (their scores are all in the metric's units, as in :meth:`relp.PatchingResult.top`); ties
  broken by component order then cell index. `k` is a number of cells (an int) or a share (a float in
  (0, 1], rounded up) of the *changed* cells, whose activation differs between the runs (found with 2
  forward passes). A cell whose activation is the same in both runs (every position before the first
  changed token of a causal model) has an AP of exactly 0 under every method and is never verified.
* Cost: the estimate's own forward-pass equivalents plus AP's: one forward pass per patched cell
  that differs between the runs, plus the source and base runs, plus the two runs that find the changed
  cells (``metadata["forward_equivalents"]``).
* :func:`estimate_then_verify` (registry key ``verify``, label ``RelP+verify``) runs a registered
  estimate (default: RelP) and then :func:`verify`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import numpy as np
import torch

import relp.components

from relp.components import BLOCK_COMPONENTS, resolve_layers
from relp.methods import Cost, Method, _accepts, get_method, register_method, register_preset
from relp.metrics import metric_name
from relp.results import PatchingResult
from relp.tokens import to_tokens

#: Components that are the residual stream (verified along the changed tokens with ``token_columns``).
RESIDUAL_STREAMS = ("resid_pre", "resid_mid", "resid_post")

#: Metadata copied from the estimate (what describes the prompts, not the method).
_KEPT_METADATA = ("n_prompts", "n_positions", "readout", "position_labels")


def _count(value, n: int, name: str, what: str) -> int:
    """`value` cells of `n`: an int (0..n) or a share (a float in (0, 1], rounded up)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be an int (a number of cells) or a float in (0, 1] (a share of {what}); got {value!r}")
    if isinstance(value, (int, np.integer)):
        if not 0 <= value <= n:
            raise ValueError(f"{name}={value} cells, but there are {n} {what}; expected 0..{n} (or a share in (0, 1])")
        return int(value)
    if not 0 < value <= 1:
        raise ValueError(f"{name}={value} as a share of {what} must be in (0, 1]; give an int for a number of cells")
    exact = value * n
    return min(n, round(exact) if abs(exact - round(exact)) < 1e-9 else math.ceil(exact))


def _check_matches(result: PatchingResult, model, clean, corrupted, metric, direction, layers) -> None:
    """A clear error when `result` was not computed on this model, these prompts, metric, direction, layers."""
    problems = []
    if result.model != str(model.cfg.model_name):
        problems.append(f"model {result.model!r} (given {model.cfg.model_name!r})")
    shape = (result.metadata.get("n_prompts"), result.metadata.get("n_positions"))
    if result.metadata.get("pooled") or None in shape:
        raise ValueError(
            f"the {result.label} result records no single batch of prompts (pooled or saved without n_prompts/"
            "n_positions): verify needs the result of one method call on the given prompts"
        )
    if shape != tuple(clean.shape) or shape != tuple(corrupted.shape):
        problems.append(f"prompts of shape {shape} (given clean {tuple(clean.shape)}, corrupted {tuple(corrupted.shape)})")
    elif result.tokens and tuple(result.tokens) != tuple(model.to_str_tokens(clean[0])):
        problems.append(f"other clean prompts (its first prompt is {' '.join(result.tokens)!r})")
    if direction is not None and direction != result.direction:
        problems.append(f"direction {result.direction!r} (given {direction!r})")
    if layers is not None and list(resolve_layers(model, layers)) != list(result.layers):
        problems.append(f"layers {list(result.layers)} (given {list(layers)})")
    if metric_name(metric) != result.metric:
        problems.append(f"metric {result.metric!r} (given {metric_name(metric)!r})")
    if problems:
        raise ValueError(f"the {result.label} result to verify was computed with " + "; ".join(problems))
    for name, scores in result.scores.items():
        if scores.shape[0] != len(result.layers):
            raise ValueError(f"{result.label} scores[{name!r}] have {scores.shape[0]} layers; the result records layers {result.layers}")
        if torch.isnan(scores).any():
            raise ValueError(
                f"{result.label} scores[{name!r}] hold NaN (cells not computed): every cell needs an estimate to be ranked"
            )


def verify(
    result: PatchingResult,
    model,
    clean,
    corrupted,
    metric,
    *,
    k: int | float = 0.05,
    sample: int | float = 0,
    seed: int = 0,
    per_component: bool = True,
    token_columns: bool | str = False,
    direction: str | None = None,
    layers: Iterable[int] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    logits_to_keep: int | None = None,
) -> PatchingResult:
    """Exact activation patching on an estimate's `k` highest-|score| cells and on a random sample of the rest.

    Parameters
    ----------
    result : the estimate (any method's result on these prompts, metric, direction and layers).
    model, clean, corrupted, metric : what `result` was computed on (checked: a clear error otherwise).
    k : cells to verify: an int, or a float in (0, 1] for a share (rounded up) of the changed cells
        (whose activation differs between the runs; the others have an AP of exactly 0). With
        `per_component` (default) the k highest-|score| cells of each component (an int k: at most k per
        component); else of all components together.
    token_columns : also verify, at every position where the clean and corrupted tokens differ, the
        residual stream (resid_pre, resid_mid, resid_post) at every layer and every other component's
        cells of layer 0 (the top-k cells are then chosen from the rest). Patching the stream at a changed
        token swaps the token, and the first block reads the token itself: the most nonlinear cells of a
        map, where linear estimates can miss by the whole effect, with either sign (see the README).
        ``"blocks"``: attn_out and mlp_out too at every layer (on an encoder every layer's attention and MLP
        at a changed token read it: MiniLM); ``"all"``: every component, heads and neurons included (costs
        layers x changed tokens x cells per position).
    sample : unverified cells to patch as well, drawn uniformly (``torch.Generator`` seeded with `seed`):
        an int, or a float in (0, 1] for a share of the unverified cells.
    direction, layers : None (the result's), or the expected ones (checked).
    batch_size, progress, logits_to_keep : as in :func:`relp.activation_patching`.

    Returns
    -------
    PatchingResult
        Method ``estimate_then_verify`` (label RelP+verify) for a RelP estimate, else ``"<label>+verify"``.
        Scores: AP on verified cells, the estimate elsewhere (sampled cells included). Metadata:
        ``estimate`` (method, label, rules, forward_equivalents, seconds), ``verified`` and ``sampled``
        ({component: flat cell indices into its score tensor}, see :func:`cell_masks`), ``sampled_ap``
        ({component: AP values, in the order of ``sampled``}), ``verified_min_abs_ap`` (the smallest
        |AP| among verified cells), ``verified_mean_abs_error`` and ``sample_mean_abs_error`` (mean
        |AP - estimate|), ``sample_max_abs_ap``, ``sample_above_verified`` (sampled cells with |AP|
        above ``verified_min_abs_ap``), ``missed_estimate`` (that count extrapolated to all unverified
        cells), ``n_cells``, ``n_verified``, ``n_sampled``, ``n_unverified``, ``forward_equivalents``
        (the estimate's plus AP's), ``verify_seconds`` (AP's part of ``seconds``).
    """
    from relp import patching  # looked up at call time (tests replace it)

    start = time.perf_counter()
    if not isinstance(result, PatchingResult):
        raise TypeError(f"result must be a relp.PatchingResult (an estimate to verify); got {type(result).__name__}")
    clean_tokens, corrupted_tokens = to_tokens(model, clean), to_tokens(model, corrupted)
    _check_matches(result, model, clean_tokens, corrupted_tokens, metric, direction, layers)

    names = list(result.components)
    flat = [result.scores[name].detach().cpu().double().reshape(-1) for name in names]
    sizes = [len(values) for values in flat]
    offsets = np.cumsum([0, *sizes])
    everything = torch.cat(flat).numpy()
    n_cells = len(everything)
    # Candidates: cells whose activation differs between the runs (2 forward passes). The others score
    # exactly 0 under every method and need no verification. (A cell's estimate can be 0 where AP is not,
    # e.g. a ReLU unit switched on by the patch: AtP's gradient is 0 there; it stays a candidate.)
    changed = patching.changed_cells(
        model, clean_tokens, corrupted_tokens, names, direction=result.direction, layers=result.layers
    )
    candidates = np.flatnonzero(torch.cat([changed[name].reshape(-1) for name in names]).numpy())
    groups = (
        [candidates[(candidates >= offsets[j]) & (candidates < offsets[j + 1])] for j in range(len(names))]
        if per_component else [candidates]
    )
    chosen = []
    if not any(token_columns is value or token_columns == value for value in (False, True, "blocks", "all")):
        raise ValueError(
            f"token_columns must be False, True (the residual stream), 'blocks' (and attn_out, mlp_out) or 'all' "
            f"(every component); got {token_columns!r}"
        )
    if token_columns:
        # the residual stream at every changed token, all layers, and the first block's cells there: they
        # carry (or read) the swapped token itself, the most nonlinear effect of all (AtP and RelP can miss
        # it by the whole effect, with either sign)
        differs = (clean_tokens != corrupted_tokens).any(dim=0).cpu()
        first = [i for i, layer in enumerate(result.layers) if layer == 0]
        every_layer = {
            True: set(RESIDUAL_STREAMS), "blocks": {*RESIDUAL_STREAMS, "attn_out", "mlp_out"}, "all": set(names)
        }[token_columns]
        for j, name in enumerate(names):
            if name not in every_layer and not first:
                continue
            component = relp.components.COMPONENTS[name]
            column = torch.zeros(result.scores[name].shape, dtype=torch.bool)
            index = [slice(None)] * column.ndim
            index[component.axes.index("position")] = differs
            if name not in every_layer:  # the first block's cells at a changed token
                index[0] = first[0]
            column[tuple(index)] = True
            chosen.append(np.flatnonzero(column.reshape(-1).numpy()) + offsets[j])
        taken = np.concatenate(chosen) if chosen else np.array([], dtype=np.int64)
        groups = [np.setdiff1d(group, taken) for group in groups]
    for group in groups:
        count = min(int(k), len(group)) if per_component and not isinstance(k, float) else None
        count = _count(k, len(group), "k", "changed cells") if count is None else count
        # ties: component order, then cell index
        chosen.append(group[np.argsort(-np.abs(everything[group]), kind="stable")[:count]])
    verified = np.unique(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)
    n_verified = len(verified)
    rest = np.setdiff1d(np.arange(n_cells), verified)
    n_sampled = _count(sample, len(rest), "sample", "unverified cells") if sample else 0
    generator = torch.Generator().manual_seed(int(seed))
    sampled = np.sort(rest[torch.randperm(len(rest), generator=generator)[:n_sampled].numpy()])

    def by_component(indices: np.ndarray) -> dict[str, list[int]]:
        return {
            name: (indices[(indices >= offsets[j]) & (indices < offsets[j + 1])] - offsets[j]).tolist()
            for j, name in enumerate(names)
        }

    verified_cells, sampled_cells = by_component(verified), by_component(sampled)
    masks = {name: _mask(result.scores[name].shape, verified_cells[name] + sampled_cells[name]) for name in names}
    if n_verified + n_sampled:
        ap = patching.activation_patching(
            model, clean_tokens, corrupted_tokens, metric, names, direction=result.direction, layers=result.layers,
            batch_size=batch_size, progress=progress, logits_to_keep=logits_to_keep, cells=masks,
        )
        ap_cost = ap.metadata["forward_equivalents"] + 2  # and the two runs of changed_cells
    else:
        ap, ap_cost = None, 2

    scores, sampled_ap, errors = {}, {}, {"verified": [], "sampled": []}
    abs_verified, abs_sampled = [], []
    for name in names:
        estimate = result.scores[name].detach().cpu()
        exact = ap.scores[name] if ap is not None else torch.full_like(estimate, float("nan"))
        dtype = torch.promote_types(estimate.dtype, exact.dtype)
        combined = estimate.to(dtype).clone()
        chosen = _mask(estimate.shape, verified_cells[name])
        combined[chosen] = exact.to(dtype)[chosen]
        scores[name] = combined
        exact_flat, estimate_flat = exact.double().reshape(-1), estimate.double().reshape(-1)
        v, s = torch.tensor(verified_cells[name], dtype=torch.long), torch.tensor(sampled_cells[name], dtype=torch.long)
        sampled_ap[name] = exact_flat[s].tolist()
        errors["verified"] += (exact_flat[v] - estimate_flat[v]).abs().tolist()
        errors["sampled"] += (exact_flat[s] - estimate_flat[s]).abs().tolist()
        abs_verified += exact_flat[v].abs().tolist()
        abs_sampled += exact_flat[s].abs().tolist()

    threshold = min(abs_verified) if abs_verified else None
    above = sum(value > threshold for value in abs_sampled) if threshold is not None and abs_sampled else None
    n_unverified = n_cells - n_verified
    estimate_cost = result.metadata.get("forward_equivalents")
    own_seconds = time.perf_counter() - start
    return PatchingResult(
        scores=scores,
        method="estimate_then_verify" if result.method == "relevance_patching" else f"{result.label}+verify",
        metric=result.metric,
        direction=result.direction,
        rules=tuple(result.rules),
        seconds=(result.seconds if math.isfinite(result.seconds) else 0.0) + own_seconds,
        model=result.model,
        layers=tuple(result.layers),
        tokens=tuple(result.tokens),
        metadata={
            **{key: result.metadata[key] for key in _KEPT_METADATA if key in result.metadata},
            "estimate": {
                "method": result.method, "label": result.label, "rules": list(result.rules),
                "forward_equivalents": estimate_cost, "seconds": result.seconds,
            },
            "k": k, "sample": sample, "seed": int(seed), "per_component": per_component, "token_columns": token_columns,
            "n_candidates": int(len(candidates)),
            "n_cells": n_cells, "n_verified": n_verified, "n_sampled": n_sampled, "n_unverified": n_unverified,
            "verified": verified_cells,
            "sampled": sampled_cells,
            "sampled_ap": sampled_ap,
            "verified_min_abs_ap": threshold,
            "verified_mean_abs_error": _mean(errors["verified"]),
            "sample_mean_abs_error": _mean(errors["sampled"]),
            "sample_max_abs_ap": max(abs_sampled) if abs_sampled else None,
            "sample_above_verified": above,
            # the share of sampled cells above the threshold, times the unverified cells
            "missed_estimate": above * n_unverified / n_sampled if above is not None else None,
            "ap_base_metric": ap.metadata["base_metric"] if ap is not None else None,
            "cells_patched": ap.metadata["cells_patched"] if ap is not None else 0,
            "forward_equivalents": (estimate_cost if estimate_cost is not None else float("nan")) + ap_cost,
            "verify_seconds": own_seconds,
        },
    )


def _mask(shape, flat_indices) -> torch.Tensor:
    mask = torch.zeros(int(np.prod(shape, dtype=np.int64)), dtype=torch.bool)
    mask[torch.as_tensor(list(flat_indices), dtype=torch.long)] = True
    return mask.reshape(tuple(shape))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def cell_masks(result: PatchingResult, which: str = "verified") -> dict[str, torch.Tensor]:
    """{component: bool tensor of its score shape}: the cells a :func:`verify` result verified (``which=
    "verified"``) or sampled (``"sampled"``)."""
    if which not in ("verified", "sampled"):
        raise ValueError(f"which must be 'verified' or 'sampled'; got {which!r}")
    if which not in result.metadata:
        raise ValueError(f"the {result.label} result records no {which} cells (not a verify result)")
    return {name: _mask(result.scores[name].shape, result.metadata[which][name]) for name in result.scores}


@register_method(
    "verify", label="RelP+verify", display_name="estimate then verify", color="tab:purple",
    options=("rules", "k", "logits_to_keep", "batch_size", "progress"),
    # RelP (2 forward + 1 backward) and AP's source and base runs (2 forward), then one forward per verified cell
    cost=Cost(forward=4, backward=1, share_of_cells=0.05),
)
def estimate_then_verify(
    model,
    clean,
    corrupted,
    metric,
    components: str | Iterable[str] = BLOCK_COMPONENTS,
    *,
    estimate: str | Method = "relp",
    k: int | float = 0.05,
    sample: int | float = 0,
    seed: int = 0,
    per_component: bool = True,
    token_columns: bool | str = False,
    rules: str | Iterable[str] | None = None,
    direction: str = "denoising",
    layers: Iterable[int] | None = None,
    logits_to_keep: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> PatchingResult:
    """Score with a registered `estimate` method (key, name or label; default RelP), then :func:`verify`
    its `k` highest-|score| cells (default: 5% of each component's changed cells) by activation patching.

    `rules` (None: the estimate's default) goes to the estimate and must be one of its options;
    `logits_to_keep`, `batch_size` and `progress` go to it when it takes them, and to activation patching.
    `sample` and `seed` as in :func:`verify`.
    """
    method = estimate if isinstance(estimate, Method) else get_method(estimate)
    if method.function is estimate_then_verify:
        raise ValueError(f"estimate must be a scoring method other than {method.key!r} itself; got {estimate!r}")
    options = {"direction": direction, "layers": layers}
    if rules is not None:
        if not _takes(method, "rules"):
            raise ValueError(f"rules={rules!r} given, but the estimate {method.key!r} takes no rules")
        options["rules"] = rules
    for name, value in (("logits_to_keep", logits_to_keep), ("batch_size", batch_size), ("progress", progress)):
        if _takes(method, name):
            options[name] = value
    result = method(model, clean, corrupted, metric, components, **options)
    return verify(
        result, model, clean, corrupted, metric, k=k, sample=sample, seed=seed, per_component=per_component, token_columns=token_columns,
        direction=direction, layers=layers,
        batch_size=batch_size, progress=progress, logits_to_keep=logits_to_keep,
    )


def _takes(method: Method, option: str) -> bool:
    return option not in method.defaults and _accepts(method.function, option)


register_preset(
    "atp_verify", "verify", {"estimate": "atp", "token_columns": True, "rules": None}, label="AtP+verify",
    color="indigo", display_name="AtP, then AP on the changed tokens' columns and on each component's top k",
)
register_preset(
    "atp_verify_blocks", "verify", {"estimate": "atp", "token_columns": "blocks", "rules": None},
    label="AtP+verify-blocks", color="slateblue",
    display_name="AtP, then AP on the residual stream, attention and MLP outputs at the changed tokens and on each component's top k",
)
