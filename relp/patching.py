"""The three scoring methods, with one signature and one result type.

Directions and signs (the same for all three methods):

* ``direction="denoising"`` (default, as in the RelP paper): the corrupted run is the base and the
  clean activation is patched in. ``AP(n) = m(corrupted | do(n := n_clean)) - m(corrupted)``, and the
  linear methods estimate it as ``(n_clean - n_corrupted) . dm/dn`` at the corrupted run.
* ``direction="noising"``: the clean run is the base and the corrupted activation is patched in.
  ``AP(n) = m(clean | do(n := n_corrupted)) - m(clean)``, estimated as ``(n_corrupted - n_clean) . dm/dn``
  at the clean run.

A positive score always means that patching the cell *raises* the metric. Patching a cell replaces
that slice of the activation in every prompt of the batch at once; the metric averages over the batch.

* :func:`activation_patching` is exact: one forward pass per cell (several cells share a forward
  pass by stacking copies of the batch, each with a different cell patched).
* :func:`attribution_patching` (AtP) uses 2 forward passes and 1 backward pass for every requested cell.
* :func:`relevance_patching` (RelP) is AtP whose backward pass follows LRP rules (``relp.rules``).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from relp.checks import activation_patching_cost, check_eval_mode, check_gradients_possible, warn_if_expensive
from relp.components import BLOCK_COMPONENTS, Component, resolve_components, resolve_layers
from relp.interventions import (
    PASS_OVERHEAD_ROWS,
    BlockReplay,
    PrefixReuse,
    Replacement,
    activation,
    cache_activations,
    capture_hooks,
    check_resid_mid,
    hook_names,
    model_output,
    plan_passes,
    rows_per_pass,
    run_stacked,
)
from relp.methods import Cost, register_method, register_preset
from relp.metrics import check_metric_value, metric_name
from relp.results import PatchingResult
from relp.rules import (
    DEFAULT_PRESET,
    RuleSet,
    applied_rules,
    check_no_rule_context,
    check_rules_live,
    resolve_rules,
    rule_forward_contexts,
)
from relp.tokens import to_tokens

Tokens = str | Sequence[str] | Int[torch.Tensor, "batch pos"]
Metric = Callable[[torch.Tensor], torch.Tensor]
DIRECTIONS = ("denoising", "noising")


@dataclass
class _Run:
    """Validated inputs shared by the three methods."""

    base: torch.Tensor  # the run whose metric is changed
    source: torch.Tensor  # the run whose activations are patched in
    clean: torch.Tensor
    components: list[Component]
    layers: list[int]
    direction: str


def _check_model(model) -> None:
    """A clear error for anything that is not a TransformerLens bridge (None, a raw Hugging Face model)."""
    if all(hasattr(model, attr) for attr in ("cfg", "hooks", "to_tokens", "run_with_hooks")):
        return
    given = "None" if model is None else f"a {type(model).__module__}.{type(model).__qualname__}"
    hint = (
        "; wrap a Hugging Face model with relp.load_model(hf_model, tokenizer=tokenizer)"
        if hasattr(model, "config") and hasattr(model, "forward") else ""
    )
    raise TypeError(
        f"model must be a TransformerLens TransformerBridge (e.g. from relp.load_model()); got {given}{hint}"
    )


def _prepare(model, clean, corrupted, metric, components, direction, layers) -> _Run:
    _check_model(model)
    # Inside `with lrp_rules(model, ...)` every method is refused (RuleContextError): its gradients would
    # follow the block's rules, not the ones it records. Named after the calling method.
    check_no_rule_context(model, f"relp.{sys._getframe(1).f_code.co_name}")
    check_eval_mode(model)  # every module, not only the root (model.blocks[0].train() enables dropout too)
    if not callable(metric):
        raise TypeError(
            f"metric must be a callable from the model's output (logits, or its readout's output) to a scalar; "
            f"got {type(metric).__name__}"
        )
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
    clean_tokens = to_tokens(model, clean)
    corrupted_tokens = to_tokens(model, corrupted)
    if clean_tokens.shape[0] != corrupted_tokens.shape[0]:
        raise ValueError(
            f"clean and corrupted batch sizes differ: {clean_tokens.shape[0]} vs {corrupted_tokens.shape[0]} "
            f"prompts (token shapes {tuple(clean_tokens.shape)} vs {tuple(corrupted_tokens.shape)}); expected "
            "one corrupted prompt per clean prompt"
        )
    if clean_tokens.shape[1] != corrupted_tokens.shape[1]:
        raise ValueError(
            f"clean and corrupted token lengths differ: {clean_tokens.shape[1]} vs {corrupted_tokens.shape[1]} "
            f"(token shapes {tuple(clean_tokens.shape)} vs {tuple(corrupted_tokens.shape)}); patching needs "
            "position-aligned prompts of equal length"
        )
    base, source = (corrupted_tokens, clean_tokens) if direction == "denoising" else (clean_tokens, corrupted_tokens)
    return _Run(
        base=base,
        source=source,
        clean=clean_tokens,
        components=resolve_components(components, model),
        layers=resolve_layers(model, layers),
        direction=direction,
    )


def _sites(run: _Run) -> list[tuple[Component, int]]:
    return [(c, layer) for c in run.components for layer in run.layers]


def _read_names(run: _Run) -> list[str]:
    """Every hook point the run's activations are read from (hooks, then resid_mid's offsets)."""
    sites = _sites(run)
    return [c.hook_name(layer) for c, layer in sites] + [n for c, layer in sites for n in hook_names(c, layer)[1:]]


def _check_sites(model, run: _Run) -> None:
    """resid_mid is patched through attn_out: check on the base run that resid_pre + attn_out is the stream."""
    if any(c.offset_template for c in run.components):
        check_resid_mid(model, run.layers, run.base)


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer (rows per forward pass) or None (from memory); got {batch_size!r}")


def _live_rules(model, rules) -> RuleSet:
    """`rules` resolved for `model` and checked live (once per model and rule)."""
    rule_set = resolve_rules(model, rules)
    check_rules_live(model, rule_set)
    return rule_set


def _root_differentiable(x, hook):
    """Hook for the first residual stream: models with frozen parameters would otherwise build no graph."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _score_dtype(model) -> torch.dtype:
    """Scores keep the model's precision, and at least float32 (half-precision sums lose too much)."""
    return torch.promote_types(model.cfg.dtype, torch.float32)


def _result(model, run: _Run, scores, method, metric, rules, start, **metadata) -> PatchingResult:
    return PatchingResult(
        scores=scores,
        method=method,
        metric=metric_name(metric),
        direction=run.direction,
        rules=tuple(rules),
        seconds=time.perf_counter() - start,
        model=str(model.cfg.model_name),
        layers=tuple(run.layers),
        tokens=tuple(model.to_str_tokens(run.clean[0])),
        metadata={
            "n_prompts": int(run.clean.shape[0]),
            "n_positions": int(run.clean.shape[1]),
            "readout": str(getattr(getattr(metric, "readout", None), "name", "logits")),
            **metadata,
        },
    )


def changed_cells(
    model, clean: Tokens, corrupted: Tokens, components: str | Iterable[str] = BLOCK_COMPONENTS, *,
    direction: str = "denoising", layers: Iterable[int] | None = None,
) -> dict[str, torch.Tensor]:
    """{component: bool tensor [layer, *cell axes]}: the cells whose activation differs between the two
    runs (2 forward passes). The others score exactly 0 under every method and need no patching."""
    def unused_metric(output):
        return output.sum()

    run = _prepare(model, clean, corrupted, unused_metric, components, direction, layers)
    names = _read_names(run)
    source = cache_activations(model, run.source, names)
    base = cache_activations(model, run.base, names)
    return {
        component.name: torch.stack([
            component.cell_scores((activation(component, layer, source) != activation(component, layer, base)).to(torch.int32)) > 0
            for layer in run.layers
        ]).cpu()
        for component in run.components
    }


# ----------------------------------------------------------------------------------------------
# Activation patching


@register_method(
    "ap", label="AP", display_name="activation patching", color="black", exact=True, standard=True,
    options=("batch_size", "progress", "logits_to_keep"), cost=Cost(forward=1, per_cell=True),
)
def activation_patching(
    model,
    clean: Tokens,
    corrupted: Tokens,
    metric: Metric,
    components: str | Iterable[str] = BLOCK_COMPONENTS,
    *,
    direction: str = "denoising",
    layers: Iterable[int] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    skip_early_layers: bool = True,
    reuse_prefix: bool = True,
    logits_to_keep: int | None = None,
    cells: Mapping[str, torch.Tensor] | None = None,
    max_forward_passes: float | None = None,
) -> PatchingResult:
    """Exact patching: the metric's change when each cell is patched, one cell at a time.

    Several cells share one forward pass: the base batch is stacked up to `batch_size` rows (default:
    as many as a quarter of the free memory holds, ``relp.interventions.rows_per_pass``), each copy
    with a different cell patched, and the metric is evaluated on each copy's logits separately.
    Cells whose activation is the same in both runs score exactly 0 without a forward pass. With
    `skip_early_layers`, blocks before the patched layer are not recomputed: their outputs from the
    base run are replayed (they cannot depend on the patch), which halves the cost on average. With
    `reuse_prefix` (causal models, metrics that read logits), positions before the first patched one
    are not recomputed either: they cannot depend on the patch, and the run computes only the later
    positions on the base run's keys and values (the model's own key/value cache). The cells of every
    requested component at one layer share passes, ordered by position and split where a later first
    position saves more compute than another pass costs (:func:`relp.interventions.plan_passes`).
    With `logits_to_keep=k` the metric receives only the logits of the last k positions
    (``[batch, k, vocab]``), and the unembedding is computed only there: for metrics that read the last
    token (IOI's logit difference) this saves a large share of a small model's forward pass.

    `cells` patches only some cells: ``{component name: bool tensor}`` with one entry per requested
    component, each of that component's score shape over the requested `layers` (``[layer, position]``,
    ``[layer, head, position]``, ``[layer, position, neuron]``); True selects a cell. Selected cells are
    scored exactly as without `cells` (same passes, unchanged cells exactly 0 without a pass); the
    others are NaN (not computed). ``metadata["cells_patched"]`` counts the cells that took a pass.

    Before any run the cost is estimated (:func:`relp.checks.activation_patching_cost`: one forward
    pass over the batch per cell, or per selected cell, plus two); above `max_forward_passes` (default
    :data:`relp.checks.MAX_FORWARD_PASSES`, 10,000; ``math.inf`` never warns) a
    :class:`relp.CostWarning` gives the estimate (``warnings.simplefilter("error", relp.CostWarning)``
    turns it into an error raised before any forward pass).
    """
    start = time.perf_counter()
    run = _prepare(model, clean, corrupted, metric, components, direction, layers)
    selected = None if cells is None else _check_cells(cells, run)
    estimate = (
        activation_patching_cost(model.cfg, run.components, run.layers, run.base.shape[1]) if selected is None
        else sum(int(mask.sum()) for mask in selected.values()) + 2
    )
    warn_if_expensive(estimate, run.base.shape[0], max_forward_passes)
    _check_batch_size(batch_size)
    _check_sites(model, run)
    names = _read_names(run)
    source = cache_activations(model, run.source, names)
    base: dict[str, torch.Tensor] = {}
    replay = BlockReplay(model, run.base.shape[0]) if skip_early_layers else None
    prefix = PrefixReuse(model, run.base) if reuse_prefix and getattr(metric, "readout", None) is None else None
    with torch.no_grad(), model.hooks(fwd_hooks=capture_hooks(base, names, detach=True)):
        with replay.recording() if replay else contextlib.nullcontext(), \
                prefix.recording() if prefix else contextlib.nullcontext({}) as cache_kwargs:
            base_output = model_output(model, run.base, metric, logits_to_keep, **cache_kwargs)
            base_value = check_metric_value(metric(base_output), metric, "the base run")
    if prefix is not None and logits_to_keep is None:
        prefix.logits = base_output
    n_prompts, n_positions = run.base.shape
    if batch_size is None:
        batch_size = rows_per_pass(model, n_positions, logits_to_keep)
    copies_per_pass = max(1, batch_size // n_prompts)
    # passes split where that saves more compute than a pass's overhead costs (prefix reuse)
    overhead = PASS_OVERHEAD_ROWS.get(torch.device(model.cfg.device).type, PASS_OVERHEAD_ROWS["cpu"])

    def positions_from(position: int) -> int:
        return n_positions - (prefix.usable_start(position, logits_to_keep) if prefix is not None else 0)

    # Cells whose activation is identical in both runs (e.g. positions before the first changed token)
    # score exactly 0 and need no forward pass. The other cells of one layer share passes whatever
    # their component (a pass's cost is decided by its first layer and first position, not by what is
    # patched), ordered by position, so that a pass's cells share a late first position (prefix reuse).
    scores = {c.name: {} for c in run.components}
    jobs = []
    skipped = 0
    for layer_index, layer in enumerate(run.layers):
        cells_of_layer = []
        for component in run.components:
            target = activation(component, layer, source)
            shape = component.cell_shape(target)
            scores[component.name][layer] = torch.zeros(shape, dtype=_score_dtype(model))
            changed = component.cell_scores((target != activation(component, layer, base)).to(torch.int32)) > 0
            considered = changed.numel()
            if selected is not None:
                mask = selected[component.name]
                if tuple(mask.shape[1:]) != shape:
                    raise ValueError(
                        f"cells[{component.name!r}] has shape {tuple(mask.shape)}; expected {(len(run.layers), *shape)} "
                        f"(the {component.name} score shape {component.axes} over {len(run.layers)} layer(s))"
                    )
                chosen = mask[layer_index]
                scores[component.name][layer][~chosen] = float("nan")  # not computed
                changed = changed & chosen.to(changed.device)
                considered = int(chosen.sum())
            cells = [cell for cell in itertools.product(*map(range, shape)) if changed[cell]]
            skipped += considered - len(cells)
            at = component.cell_axes.index("position")
            cells_of_layer += [(cell[at], component, cell) for cell in cells]
        cells_of_layer.sort(key=lambda entry: entry[0])
        starts = [position for position, _, _ in cells_of_layer]
        for begin, end in plan_passes(starts, n_prompts, copies_per_pass, positions_from, overhead):
            chunk = cells_of_layer[begin:end]
            jobs.append((layer, [(component, cell) for _, component, cell in chunk], chunk[0][0]))

    for layer, cells, first_position in tqdm(jobs, desc="activation patching", disable=not progress, unit="pass"):
        replacements = []
        for component in {component.name: component for component, _ in cells}.values():
            patched = torch.zeros((len(cells), *scores[component.name][layer].shape), dtype=torch.bool)
            for i, (other, cell) in enumerate(cells):
                if other.name == component.name:
                    patched[(i, *cell)] = True
            keep = ~component.activation_mask(patched)
            replacements.append(Replacement(component, layer, keep=keep, value=activation(component, layer, source)))
        values = run_stacked(
            model, run.base, len(cells), replacements, metric,
            labels=[f"{component.hook_name(layer)} cell {cell}" for component, cell in cells],
            logits_to_keep=logits_to_keep, replay=replay, prefix=prefix, start=first_position,
        )
        for (component, cell), value in zip(cells, values):
            scores[component.name][layer][cell] = (value - base_value).item()

    stacked_scores = {c: torch.stack([by_layer[layer] for layer in run.layers]) for c, by_layer in scores.items()}
    patched = sum(len(cells) for _, cells, _ in jobs)
    if selected is not None:
        extra = {"cells_selected": sum(int(mask.sum()) for mask in selected.values())}
    else:
        extra = {}
    return _result(
        model, run, stacked_scores, "activation_patching", metric, (), start,
        base_metric=base_value.item(), forward_passes=len(jobs) + 3, cells_skipped_unchanged=skipped,
        cells_patched=patched, **extra,
        # one forward pass over the batch per patched cell, plus the source and base runs
        forward_equivalents=patched + 2,
        rows_per_pass=copies_per_pass * n_prompts, prefix_reuse=bool(prefix is not None and prefix.layers),
    )


def _check_cells(cells, run: _Run) -> dict[str, torch.Tensor]:
    """The `cells` selection of :func:`activation_patching`, checked up to each tensor's cell axes (their
    sizes are known once the activations are), as CPU bool tensors."""
    if not isinstance(cells, Mapping):
        raise TypeError(f"cells must be a dict {{component name: bool tensor}} or None; got {type(cells).__name__}")
    requested = [c.name for c in run.components]
    missing = [name for name in requested if name not in cells]
    extra = [name for name in cells if name not in requested]
    if missing or extra:
        raise ValueError(
            f"cells must have one entry per requested component {requested}; "
            + "; ".join(part for part in (f"missing {missing}" if missing else "", f"not requested {extra}" if extra else "") if part)
        )
    checked = {}
    for component in run.components:
        mask = cells[component.name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            what = f"a tensor of dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"cells[{component.name!r}] must be a bool tensor; got {what}")
        if mask.ndim != len(component.axes) or mask.shape[0] != len(run.layers):
            raise ValueError(
                f"cells[{component.name!r}] has shape {tuple(mask.shape)}; expected {len(component.axes)} axes "
                f"{component.axes} with {len(run.layers)} layer(s) first (layers {run.layers})"
            )
        checked[component.name] = mask.detach().cpu()
    return checked


# ----------------------------------------------------------------------------------------------
# Gradient-based: attribution patching and relevance patching


def _gradient_scores(
    model, run: _Run, metric: Metric, *, rules: RuleSet | None = None, logits_to_keep: int | None = None
) -> tuple[dict[str, torch.Tensor], float]:
    """(source - base) . dm/d(activation) at the base run, for every requested cell (2 forward, 1 backward).

    With `rules` (checked live by the caller) the gradient run follows them. The source run, whose
    gradient is not needed, is taken without their hooks: they return their input's value bit for bit,
    so its activations are those of a run under the rules (tests check this with ``torch.equal``); only
    what changes how the forward pass is computed (the AH-rule's attention function) is kept. The source
    run's logits are never read: only the last position's are computed. `logits_to_keep` is passed to the
    gradient run's :func:`relp.interventions.model_output`.
    """
    check_gradients_possible("a gradient method (attribution or relevance patching)")
    _check_sites(model, run)
    names = _read_names(run)
    readout = getattr(metric, "readout", None)
    ruled = rules is not None and bool(rules.active)
    source: dict[str, torch.Tensor] = {}
    with torch.no_grad(), rule_forward_contexts(model, rules) if ruled else contextlib.nullcontext():
        with model.hooks(fwd_hooks=capture_hooks(source, names, detach=True)):
            model_output(model, run.source, metric, None if readout is not None else 1)
    captured: dict[str, torch.Tensor] = {}
    hooked = list(dict.fromkeys(c.hook_name(layer) for c, layer in _sites(run)))
    hooks = [("blocks.0.hook_resid_pre", _root_differentiable), *capture_hooks(captured, names, detach=False)]
    # The rules' hooks are registered first: a capture at the same hook point (the neuron component's
    # hook_post, BERT's resid_mid at ln1.hook_out) must see the rule's output.
    with torch.enable_grad(), applied_rules(model, rules) if ruled else contextlib.nullcontext():
        with model.hooks(fwd_hooks=hooks):
            value = check_metric_value(
                metric(model_output(model, run.base, metric, logits_to_keep)), metric, "the base run"
            )
            if not value.requires_grad:
                raise ValueError(f"metric {metric_name(metric)} is not differentiable in the model's output (no gradient)")
            grads = torch.autograd.grad(value, [captured[name] for name in hooked], allow_unused=True)
    grad_of = dict(zip(hooked, grads))
    detached = {k: v.detach() for k, v in captured.items()}
    scores = {}
    for component in run.components:
        per_layer = []
        for layer in run.layers:
            name = component.hook_name(layer)
            grad = grad_of[name]
            if grad is None:
                raise RuntimeError(f"no gradient reached {name}: its hook is not in the computation of the metric")
            # The gradient is taken at the hooked tensor; for resid_mid that is attn_out, and
            # d m / d resid_mid = d m / d attn_out because resid_mid = resid_pre + attn_out.
            delta = activation(component, layer, source) - activation(component, layer, detached)
            per_layer.append(component.cell_scores((delta * grad).to(_score_dtype(model))))
        scores[component.name] = torch.stack(per_layer).detach().cpu()
    return scores, value.item()


@register_method(
    "atp", label="AtP", display_name="attribution patching", color="tab:blue", options=("logits_to_keep",), standard=True,
    cost=Cost(forward=2, backward=1),
)
def attribution_patching(
    model,
    clean: Tokens,
    corrupted: Tokens,
    metric: Metric,
    components: str | Iterable[str] = BLOCK_COMPONENTS,
    *,
    direction: str = "denoising",
    layers: Iterable[int] | None = None,
    logits_to_keep: int | None = None,
) -> PatchingResult:
    """Attribution patching (AtP): ``(source - base) . dm/dn`` at the base run, plain gradients.

    With `logits_to_keep=k` the metric receives only the logits of the last k positions (``[batch, k,
    vocab]``) and the unembedding is computed, and differentiated, only there (as in
    :func:`activation_patching`); the scores are those of the full logits up to float rounding.
    """
    start = time.perf_counter()
    run = _prepare(model, clean, corrupted, metric, components, direction, layers)
    scores, base_value = _gradient_scores(model, run, metric, logits_to_keep=logits_to_keep)
    return _result(
        model, run, scores, "attribution_patching", metric, (), start, base_metric=base_value, forward_equivalents=4
    )


@register_method(
    "relp", label="RelP", display_name="relevance patching", color="tab:red", options=("rules", "logits_to_keep"), standard=True,
    cost=Cost(forward=2, backward=1),
)
def relevance_patching(
    model,
    clean: Tokens,
    corrupted: Tokens,
    metric: Metric,
    components: str | Iterable[str] = BLOCK_COMPONENTS,
    *,
    rules: str | Iterable[str] = DEFAULT_PRESET,
    direction: str = "denoising",
    layers: Iterable[int] | None = None,
    logits_to_keep: int | None = None,
) -> PatchingResult:
    """Relevance patching (RelP): attribution patching whose backward pass follows LRP `rules`.

    `rules` is a preset name from ``relp.rules.PRESETS`` (default ``"relp"``: LN + Identity + Half) or
    an iterable of rule names; they are checked live on the model first (once per model and rule). The
    gradient run is taken under the rules; the source run without their hooks, which do not change
    forward values (bit for bit), but with any rule that changes how attention is computed (the AH-rule's
    attention function on BERT-style models). `logits_to_keep` as in :func:`attribution_patching`.
    """
    start = time.perf_counter()
    run = _prepare(model, clean, corrupted, metric, components, direction, layers)
    rule_set = _live_rules(model, rules)
    scores, base_value = _gradient_scores(model, run, metric, rules=rule_set, logits_to_keep=logits_to_keep)
    return _result(
        model, run, scores, "relevance_patching", metric, rule_set.active, start,
        base_metric=base_value, rules_not_applicable=rule_set.not_applicable, forward_equivalents=4,
    )


# Presets of relevance patching: rule sets that are methods of their own in studies and tables.
register_preset(
    "gim", "relp", {"rules": "gim"}, label="GIM", color="goldenrod",
    display_name="GIM (LN frozen, q/k x1/4, v x1/2, softmax backward at T=2)",
)
register_preset(
    "relp_eps", "relp", {"rules": "relp_eps"}, label="RelP-eps", color="lightcoral",
    display_name="relevance patching with the authors' Identity-rule stabiliser",
)
