"""Gradient methods along the path between the base and the source run (integrated gradients).

Attribution patching (AtP) scores a cell by ``delta . g(0)``, the activation difference ``delta = source
- base`` times the metric's gradient at the base run. Activation patching is the integral of the gradient
along the straight path from base to source, ``delta . integral_0^1 g(alpha) d alpha`` (for a path that
moves the whole site: completeness, the scores of a site's cells sum to the metric's change when the site
is patched). The methods here approximate that integral by quadrature; every gradient run may follow LRP
rules (``rules``, as in :func:`relp.relevance_patching`), which gives integrated relevance.

* :func:`two_point_patching` (``2pt``): ``delta . (g_base + g_source) / 2``, the gradients at the two
  endpoints of the path, taken at the base run and at the source run (trapezoid rule with one panel).
  2 forward + 2 backward passes. Exact where the metric is quadratic along the path. Equal to
  ``(AtP_denoising - AtP_noising) / 2``, the mean of attribution patching from both ends.
* :func:`integrated_gradients` (``ig``, Marks et al. 2024, "Sparse feature circuits", arXiv 2403.19647):
  for each site (component x layer) separately, the site's activation is set to ``base + alpha * delta``
  (all its cells at once) and everything downstream is recomputed; the gradient at the site is averaged
  over ``alpha``. Cost: ``steps`` forward and backward rows per site.
* :func:`integrated_gradients_inputs` (``ig_inputs``, EAP-IG over the inputs, Hanna, Pezzelle and Belinkov
  2024, "Have faith in faithfulness", arXiv 2403.17806): the model's input stream (``blocks.0.hook_resid_pre``,
  the token plus position embeddings) is interpolated, and every component's gradient is averaged over the
  path; the score multiplies it by the component's own ``source - base`` difference at the endpoints.
  Cost: ``steps`` forward and backward passes for every site at once, plus the base and source runs.

Quadrature: the ``steps`` points are the midpoints ``alpha_i = (i + 1/2) / steps``, ``i < steps`` (the
midpoint rule: error O(1/steps^2) for a smooth path, exact when the gradient is affine in alpha, i.e.
the metric quadratic in the site's activation; with ``steps=1`` the gradient at the path's midpoint).
The points are stacked copies of the batch in one pass (rows = copies x prompts, at most ``batch_size``
rows a pass); the metric is evaluated on each copy's output separately and the copies' values are summed,
so one backward pass gives every copy its own gradient.

Signs and directions as in :mod:`relp.patching`: positive = patching the cell raises the metric;
``direction="denoising"`` = corrupted base, clean source. Every method records its cost in
``metadata["forward_equivalents"]`` (forward passes over the batch; a pass over k stacked copies counts
k; a backward pass counts as two).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence

import torch

from relp.components import BLOCK_COMPONENTS
from relp.interventions import (
    BlockReplay,
    PrefixReuse,
    _cache_reaches_attention,
    activation,
    capture_hooks,
    model_output,
    rows_per_pass,
)
from relp.methods import Cost, register_method, register_preset
from relp.metrics import check_metric_value, metric_name
from relp.patching import (
    Metric,
    Tokens,
    _check_batch_size,
    _check_sites,
    _live_rules,
    _prepare,
    _read_names,
    _result,
    _root_differentiable,
    _Run,
    _score_dtype,
    _sites,
)
from relp.results import PatchingResult
from relp.rules import RuleSet, applied_rules, rule_forward_contexts

#: The model's input stream: token (and position) embeddings entering the first block.
INPUT_HOOK = "blocks.0.hook_resid_pre"
DEFAULT_STEPS = 8


def midpoints(steps: int) -> torch.Tensor:
    """The interpolation points ``(i + 1/2) / steps``, ``i < steps`` (midpoint rule), in float64."""
    return (torch.arange(steps, dtype=torch.float64) + 0.5) / steps


def _path_points(start: torch.Tensor, delta: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """``start + alpha * delta`` for each alpha, stacked as copies of the batch ([copies x batch, ...]): a
    leaf of the graph, whose gradient is the gradient along the path."""
    alphas = alphas.to(delta.device, delta.dtype)
    point = start.unsqueeze(0) + alphas.view(-1, *[1] * delta.ndim) * delta.unsqueeze(0)
    return point.reshape(len(alphas) * delta.shape[0], *delta.shape[1:]).detach().requires_grad_(True)


def _replace_with(leaf: torch.Tensor):
    """A hook that replaces its activation by `leaf` (of the same shape: a clear error otherwise)."""

    def hook(x, hook):
        if x.shape != leaf.shape:
            raise RuntimeError(f"{hook.name}: expected shape {tuple(leaf.shape)}, got {tuple(x.shape)}")
        return leaf

    return hook


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (interpolation points along the path); got {steps!r}")
    return steps


def _ruled(rules: RuleSet) -> bool:
    return bool(rules.active)


def _copies_per_pass(model, run: _Run, batch_size: int | None, logits_to_keep: int | None) -> int:
    """Stacked copies of the batch a gradient pass may hold. From memory by default: a gradient pass keeps
    every layer's activations for the backward pass, so the rows of a no-grad pass
    (:func:`relp.interventions.rows_per_pass`) are divided by the number of layers."""
    n_prompts, n_positions = run.base.shape
    if batch_size is None:
        batch_size = max(1, rows_per_pass(model, n_positions, logits_to_keep) // max(1, model.cfg.n_layers))
    return max(1, batch_size // n_prompts)


def _cache(
    model, tokens: torch.Tensor, names: Sequence[str], metric, rules: RuleSet, logits_to_keep: int | None,
    replay: BlockReplay | None = None, prefix: PrefixReuse | None = None,
):
    """The named activations of one no-grad run (with the forward parts of the rules: their hooks keep values
    bit for bit; see :func:`relp.rules.rule_forward_contexts`), and the metric's value on it. A `replay` and a
    `prefix` record the run's block outputs and its keys and values."""
    store: dict[str, torch.Tensor] = {}
    with torch.no_grad(), rule_forward_contexts(model, rules) if _ruled(rules) else contextlib.nullcontext():
        with model.hooks(fwd_hooks=capture_hooks(store, names, detach=True)):
            with replay.recording() if replay is not None else contextlib.nullcontext(), \
                    prefix.recording() if prefix is not None else contextlib.nullcontext({}) as cache_kwargs:
                output = model_output(model, tokens, metric, logits_to_keep, **cache_kwargs)
                value = check_metric_value(metric(output), metric, "an endpoint run")
    if prefix is not None and logits_to_keep is None:
        prefix.logits = output
    return store, value


def _stacked_gradients(
    model,
    rows: torch.Tensor,
    copies: int,
    metric: Metric,
    targets,
    *,
    rules: RuleSet,
    logits_to_keep: int | None,
    hooks: Sequence = (),
    replay: BlockReplay | None = None,
    layer: int = 0,
    prefix: PrefixReuse | None = None,
    start: int = 0,
    what: str = "a path point",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One gradient pass over `copies` stacked copies (`rows` [copies x prompts, pos]), under `rules`.

    `hooks` (registered after the rules' hooks) edit the run; `targets()` is called after the forward pass
    and returns the tensors to differentiate at (leaves made by `hooks`, or captured activations). The metric
    is evaluated on each copy's output and the values are summed, so each copy gets its own gradient.
    With a recorded `prefix` and ``start > 0`` (checked usable by the caller), `rows` hold only positions
    from `start` on, computed on the base run's keys and values for the others.
    Returns the gradients (None is an error) and the copies' metric values.
    """
    n = rows.shape[0] // copies
    forward_kwargs = prefix.forward_kwargs(start, copies) if start else {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        if _ruled(rules):  # the rules' hooks first: edits at the same hook point must see their output
            stack.enter_context(applied_rules(model, rules))
        stack.enter_context(model.hooks(fwd_hooks=list(hooks)))
        if replay is not None:
            stack.enter_context(replay.skipping(layer, copies, start))
        if start:
            stack.enter_context(_cache_reaches_attention(model))
        outputs = model_output(model, rows, metric, logits_to_keep, **forward_kwargs)
        if start and logits_to_keep is None:  # the positions before `start` are the base run's, constants
            outputs = torch.cat([prefix.logits[:, :start].repeat(copies, 1, 1), outputs], dim=1)
        values = [check_metric_value(metric(outputs[i * n : (i + 1) * n]), metric, f"{what} (copy {i})") for i in range(copies)]
        total = torch.stack(values).sum()
        if not total.requires_grad:
            raise ValueError(f"metric {metric_name(metric)} is not differentiable in the model's output (no gradient)")
        names, tensors = zip(*targets())
        grads = torch.autograd.grad(total, list(tensors), allow_unused=True)
    for name, grad in zip(names, grads):
        if grad is None:
            raise RuntimeError(f"no gradient reached {name}: its hook is not in the computation of the metric")
    return list(grads), [v.detach() for v in values]


def _scores(model, run: _Run, source: dict, base: dict, grad_of) -> dict[str, torch.Tensor]:
    """``(source - base) . grad`` reduced to cells, for every site; `grad_of(component, layer)` [batch, ...]."""
    scores = {}
    for component in run.components:
        per_layer = []
        for layer in run.layers:
            delta = activation(component, layer, source) - activation(component, layer, base)
            per_layer.append(component.cell_scores((delta * grad_of(component, layer)).to(_score_dtype(model))))
        scores[component.name] = torch.stack(per_layer).detach().cpu()
    return scores


# ----------------------------------------------------------------------------------------------
# Two-point (trapezoid) estimate


@register_method(
    "two_point", label="2pt", display_name="two-point patching", color="tab:olive",
    options=("logits_to_keep",), cost=Cost(forward=2, backward=2),
)
def two_point_patching(
    model,
    clean: Tokens,
    corrupted: Tokens,
    metric: Metric,
    components: str | Iterable[str] = BLOCK_COMPONENTS,
    *,
    direction: str = "denoising",
    layers: Iterable[int] | None = None,
    rules: str | Iterable[str] | None = None,
    logits_to_keep: int | None = None,
) -> PatchingResult:
    """Two-point estimate: ``(source - base) . (g_base + g_source) / 2``.

    The gradients are taken at the base run and at the source run (the endpoints of the integrated-gradients
    path; trapezoid rule), both under `rules` (None: plain gradients; a preset or rule names from
    ``relp.rules``). Equals ``(AtP_denoising - AtP_noising) / 2`` (with rules: the same for RelP). Exact
    when the metric is quadratic in the site's activation and the source run is the base run with the site
    patched (e.g. the last layer's ``resid_post``). The two runs are stacked in one pass: 2 forward + 2
    backward passes over the batch.
    """
    start = time.perf_counter()
    run = _prepare(model, clean, corrupted, metric, components, direction, layers)
    rule_set = _live_rules(model, rules)
    _check_sites(model, run)
    names = _read_names(run)
    hooked = list(dict.fromkeys(c.hook_name(layer) for c, layer in _sites(run)))
    captured: dict[str, torch.Tensor] = {}
    hooks = [(INPUT_HOOK, _root_differentiable), *capture_hooks(captured, names, detach=False)]
    n = run.base.shape[0]
    grads, values = _stacked_gradients(
        model, torch.cat([run.base, run.source]), 2, metric, lambda: [(name, captured[name]) for name in hooked],
        rules=rule_set, logits_to_keep=logits_to_keep, hooks=hooks, what="the base and source runs",
    )
    both = {name: value.detach() for name, value in captured.items()}
    base = {name: value[:n] for name, value in both.items()}
    source = {name: value[n:] for name, value in both.items()}
    grad_of_name = {name: (g[:n] + g[n:]) / 2 for name, g in zip(hooked, grads)}
    scores = _scores(model, run, source, base, lambda c, layer: grad_of_name[c.hook_name(layer)])
    return _result(
        model, run, scores, "two_point_patching", metric, rule_set.active, start,
        base_metric=values[0].item(), source_metric=values[1].item(),
        rules_not_applicable=rule_set.not_applicable, forward_equivalents=6,
    )


# ----------------------------------------------------------------------------------------------
# Integrated gradients over activations, one site at a time


@register_method(
    "ig", label="IG", display_name="integrated gradients", color="tab:green",
    options=("steps", "logits_to_keep", "batch_size"),
    cost=Cost(forward=2 + DEFAULT_STEPS, backward=DEFAULT_STEPS),  # per site at the default steps, at most
)
def integrated_gradients(
    model,
    clean: Tokens,
    corrupted: Tokens,
    metric: Metric,
    components: str | Iterable[str] = BLOCK_COMPONENTS,
    *,
    direction: str = "denoising",
    layers: Iterable[int] | None = None,
    rules: str | Iterable[str] | None = None,
    steps: int = DEFAULT_STEPS,
    batch_size: int | None = None,
    skip_early_layers: bool = True,
    reuse_prefix: bool = True,
    logits_to_keep: int | None = None,
) -> PatchingResult:
    """Integrated gradients over activations (Marks et al. 2024), one site (component x layer) at a time.

    The site's activation (all its cells at once, in every prompt) is set to ``base + alpha * (source -
    base)`` at the `steps` midpoints ``alpha = (i + 1/2) / steps`` while everything downstream is recomputed
    (under `rules` if given); its gradient is averaged over alpha and multiplied by ``source - base``. A
    site's scores sum to ``m(base | do(site := source)) - m(base)`` up to the quadrature error, O(1/steps^2).
    Where a cell's effect on the metric runs only through its own slice of the site (cells of the last
    layer after attention, with a metric that adds over positions), each cell's score converges to its
    activation-patching score.

    The alphas are stacked copies of the batch, at most `batch_size` rows a pass (default: from the free
    memory). With `skip_early_layers`, blocks before the site's layer are replayed from the base run
    (:class:`relp.interventions.BlockReplay`), not recomputed. With `reuse_prefix` (causal models, metrics
    that read logits), positions before the first one where the site differs between the runs are not
    recomputed either: nothing there depends on the site's later positions, so the passes run on the base
    run's keys and values (:class:`relp.interventions.PrefixReuse`). The site's interpolated activation is a
    leaf of the graph, so the backward pass stops there. Sites whose activation is the same in both runs
    score 0 without a pass. ``metadata["forward_equivalents"]`` counts a pass through k of the model's L
    blocks as k/L of a pass (forward: the blocks computed; backward: the blocks from the site's layer on, an
    upper bound) and, with prefix reuse, the share of positions computed, plus the two endpoint runs.
    """
    start = time.perf_counter()
    run = _prepare(model, clean, corrupted, metric, components, direction, layers)
    steps = _check_steps(steps)
    _check_batch_size(batch_size)
    rule_set = _live_rules(model, rules)
    _check_sites(model, run)
    names = _read_names(run)
    n_prompts = run.base.shape[0]
    replay = BlockReplay(model, n_prompts) if skip_early_layers else None
    prefix = PrefixReuse(model, run.base) if reuse_prefix and getattr(metric, "readout", None) is None else None
    source, _ = _cache(model, run.source, names, metric, rule_set, logits_to_keep)
    base, base_value = _cache(model, run.base, names, metric, rule_set, logits_to_keep, replay, prefix)
    n_positions = run.base.shape[1]
    copies_per_pass = _copies_per_pass(model, run, batch_size, logits_to_keep)
    alphas = midpoints(steps)
    n_layers = model.cfg.n_layers
    mean_grads: dict[tuple[str, int], torch.Tensor] = {}
    equivalents, passes, sites_skipped = 2.0, 0, 0
    for component, layer in _sites(run):
        name = component.hook_name(layer)
        delta = activation(component, layer, source) - activation(component, layer, base)
        if not delta.any():
            mean_grads[(component.name, layer)] = torch.zeros_like(delta)
            sites_skipped += 1
            continue
        # positions before the first changed one: the base run's, and nothing there depends on later ones
        axis = component.activation_axes.index("position")
        changed = delta.ne(0).movedim(axis, 0).flatten(1).any(1).nonzero()
        begin_at = prefix.usable_start(int(changed[0]), logits_to_keep) if prefix is not None else 0
        hooked_base = base[name].narrow(axis, begin_at, n_positions - begin_at)
        delta_tail = delta.narrow(axis, begin_at, n_positions - begin_at)
        total = torch.zeros_like(delta_tail)
        for begin in range(0, steps, copies_per_pass):
            # the hooked tensor (for resid_mid: attn_out, whose offset resid_pre is the base run's upstream
            # of the site) moves by alpha * delta
            leaf = _path_points(hooked_base, delta_tail, alphas[begin : begin + copies_per_pass])
            copies = leaf.shape[0] // n_prompts
            (grad,), _ = _stacked_gradients(
                model, run.base[:, begin_at:].repeat(copies, 1), copies, metric, lambda _leaf=leaf, _name=name: [(_name, _leaf)],
                rules=rule_set, logits_to_keep=logits_to_keep, hooks=[(name, _replace_with(leaf))], replay=replay,
                layer=layer, prefix=prefix, start=begin_at, what=f"{component.name} layer {layer} on the path",
            )
            total += grad.reshape(copies, *delta_tail.shape).sum(0)
            passes += 1
            computed = (n_layers - layer) / n_layers * (n_positions - begin_at) / n_positions
            forward = computed if replay is not None and replay.usable else (n_positions - begin_at) / n_positions
            equivalents += copies * (forward + 2 * computed)
        if begin_at:
            total = torch.cat([torch.zeros_like(delta.narrow(axis, 0, begin_at)), total], dim=axis)
        mean_grads[(component.name, layer)] = total / steps
    scores = _scores(model, run, source, base, lambda c, layer: mean_grads[(c.name, layer)])
    return _result(
        model, run, scores, "integrated_gradients", metric, rule_set.active, start,
        base_metric=base_value.item(), steps=steps, quadrature="midpoint", forward_passes=passes + 2,
        rows_per_pass=copies_per_pass * n_prompts, sites_skipped_unchanged=sites_skipped,
        replayed_early_layers=bool(replay is not None and replay.usable),
        prefix_reuse=bool(prefix is not None and prefix.layers),
        rules_not_applicable=rule_set.not_applicable, forward_equivalents=equivalents,
    )


# ----------------------------------------------------------------------------------------------
# Integrated gradients over the inputs (EAP-IG-inputs)


@register_method(
    "ig_inputs", label="IG-in", display_name="integrated gradients (inputs)", color="tab:cyan",
    options=("steps", "logits_to_keep"), cost=Cost(forward=2 + DEFAULT_STEPS, backward=DEFAULT_STEPS),
)
def integrated_gradients_inputs(
    model,
    clean: Tokens,
    corrupted: Tokens,
    metric: Metric,
    components: str | Iterable[str] = BLOCK_COMPONENTS,
    *,
    direction: str = "denoising",
    layers: Iterable[int] | None = None,
    rules: str | Iterable[str] | None = None,
    steps: int = DEFAULT_STEPS,
    batch_size: int | None = None,
    logits_to_keep: int | None = None,
) -> PatchingResult:
    """Integrated gradients over the inputs (EAP-IG-inputs, Hanna et al. 2024), every site at once.

    The input stream (``blocks.0.hook_resid_pre``: token plus position embeddings) is set to ``base +
    alpha * (source - base)`` at the `steps` midpoints; at each point the gradient of the metric at every
    site is taken (one forward and backward pass for all sites, under `rules` if given) and averaged over
    the points. A cell's score is its site's ``source - base`` difference at the endpoint runs times that
    mean gradient (as EAP-IG does: the activations along the path are not the straight line between them,
    except at the input). The scores of ``resid_pre`` at layer 0 sum to ``m(source) - m(base)`` up to the
    quadrature error. Cost: the base and source runs, plus `steps` forward and backward passes over the
    batch (stacked, at most `batch_size` rows a pass; default from the free memory).
    """
    start = time.perf_counter()
    run = _prepare(model, clean, corrupted, metric, components, direction, layers)
    steps = _check_steps(steps)
    _check_batch_size(batch_size)
    rule_set = _live_rules(model, rules)
    _check_sites(model, run)
    names = _read_names(run)
    n_prompts = run.base.shape[0]
    source, source_value = _cache(model, run.source, [*names, INPUT_HOOK], metric, rule_set, logits_to_keep)
    base, base_value = _cache(model, run.base, [*names, INPUT_HOOK], metric, rule_set, logits_to_keep)
    copies_per_pass = _copies_per_pass(model, run, batch_size, logits_to_keep)
    alphas = midpoints(steps)
    hooked = list(dict.fromkeys(c.hook_name(layer) for c, layer in _sites(run)))
    totals = {name: torch.zeros_like(base[name]) for name in hooked}
    input_delta = source[INPUT_HOOK] - base[INPUT_HOOK]
    passes = 0
    for begin in range(0, steps, copies_per_pass):
        leaf = _path_points(base[INPUT_HOOK], input_delta, alphas[begin : begin + copies_per_pass])
        copies = leaf.shape[0] // n_prompts
        captured: dict[str, torch.Tensor] = {}
        # the input is set first, so a capture of resid_pre at layer 0 sees the path point
        hooks = [(INPUT_HOOK, _replace_with(leaf)), *capture_hooks(captured, names, detach=False)]
        grads, _ = _stacked_gradients(
            model, run.base.repeat(copies, 1), copies, metric, lambda: [(name, captured[name]) for name in hooked],
            rules=rule_set, logits_to_keep=logits_to_keep, hooks=hooks, what="the input path",
        )
        for name, grad in zip(hooked, grads):
            totals[name] += grad.reshape(copies, *totals[name].shape).sum(0)
        passes += 1
    scores = _scores(model, run, source, base, lambda c, layer: totals[c.hook_name(layer)] / steps)
    return _result(
        model, run, scores, "integrated_gradients_inputs", metric, rule_set.active, start,
        base_metric=base_value.item(), source_metric=source_value.item(), steps=steps, quadrature="midpoint",
        forward_passes=passes + 2, rows_per_pass=copies_per_pass * n_prompts,
        rules_not_applicable=rule_set.not_applicable, forward_equivalents=2 + 3 * steps,
    )


# The same methods under the LRP rules of relevance patching (the experiments' --rules goes only to
# methods whose own default is a rule set: these keys fix theirs, so a result's key says what ran).
register_preset("two_point_relp", "two_point", {"rules": "relp"}, label="2pt-RelP", color="darkolivegreen",
                display_name="two-point patching under the RelP rules")
register_preset("ig_relp", "ig", {"rules": "relp"}, label="IG-RelP", color="darkgreen",
                display_name="integrated gradients under the RelP rules")
register_preset("ig_inputs_relp", "ig_inputs", {"rules": "relp"}, label="IG-in-RelP", color="darkcyan",
                display_name="integrated gradients over the inputs under the RelP rules")
