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
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int

from relp.components import BLOCK_COMPONENTS, Component, resolve_components, resolve_layers
from relp.metrics import check_metric_value, metric_name
from relp.results import PatchingResult
from relp.rules import DEFAULT_PRESET, lrp_rules
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


def _prepare(model, clean, corrupted, metric, components, direction, layers) -> _Run:
    if model.training:
        raise RuntimeError(
            "the model is in training mode (dropout would make every score random); call model.eval() first"
        )
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


def _hook_names(run: _Run) -> list[tuple[Component, int, str]]:
    return [(c, layer, c.hook_name(layer)) for c in run.components for layer in run.layers]


def _offset_names(run: _Run) -> list[str]:
    return [c.offset_name(layer) for c in run.components for layer in run.layers if c.offset_template]


def _activation(component: Component, layer: int, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """The component's activation from a cache: the hooked tensor, plus the offset for resid_mid."""
    value = cache[component.hook_name(layer)]
    offset = component.offset_name(layer)
    return value if offset is None else value + cache[offset]


def _check_resid_mid(model, run: _Run, tokens: torch.Tensor) -> None:
    """resid_pre + attn_out must be the stream entering the second norm, else resid_mid is undefined."""
    layers = [layer for layer in run.layers]
    names = [f"blocks.{l}.{h}" for l in layers for h in ("hook_resid_pre", "hook_attn_out", "ln2.hook_in")]
    cache = _cache_activations(model, tokens[:1], names)
    for layer in layers:
        mid = cache[f"blocks.{layer}.hook_resid_pre"] + cache[f"blocks.{layer}.hook_attn_out"]
        stream = cache[f"blocks.{layer}.ln2.hook_in"]
        if not torch.allclose(mid, stream, rtol=1e-4, atol=1e-4 * stream.abs().max().item()):
            raise ValueError(
                f"on {model.cfg.model_name}, resid_pre + attn_out is not the stream entering the MLP's norm at "
                f"layer {layer} (max difference {(mid - stream).abs().max().item():.3g}); resid_mid is not "
                "defined for this architecture. Use resid_pre, attn_out or mlp_out"
            )


def _capture_hooks(store: dict[str, torch.Tensor], names: Iterable[str], *, detach: bool) -> list:
    """Hooks that store each named activation in `store` and pass it on unchanged."""

    def capture(name):
        def hook(x, hook):
            store[name] = x.detach().clone() if detach else x
            return x  # returning it keeps reshaped views (hook_z) in the autograd graph

        return hook

    return [(name, capture(name)) for name in dict.fromkeys(names)]


def _cache_activations(model, tokens: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    cache: dict[str, torch.Tensor] = {}
    with torch.no_grad(), model.hooks(fwd_hooks=_capture_hooks(cache, names, detach=True)):
        model(tokens)
    return cache


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


# ----------------------------------------------------------------------------------------------
# Activation patching


def activation_patching(
    model,
    clean: Tokens,
    corrupted: Tokens,
    metric: Metric,
    components: str | Iterable[str] = BLOCK_COMPONENTS,
    *,
    direction: str = "denoising",
    layers: Iterable[int] | None = None,
    batch_size: int = 64,
    progress: bool = True,
    skip_early_layers: bool = True,
    logits_to_keep: int | None = None,
) -> PatchingResult:
    """Exact patching: the metric's change when each cell is patched, one cell at a time.

    Several cells share one forward pass: the base batch is stacked up to `batch_size` rows, each copy
    with a different cell patched, and the metric is evaluated on each copy's logits separately.
    Cells whose activation is the same in both runs score exactly 0 without a forward pass. With
    `skip_early_layers`, blocks before the patched layer are not recomputed: their outputs from the
    base run are replayed (they cannot depend on the patch), which halves the cost on average.
    With `logits_to_keep=k` the metric receives only the logits of the last k positions
    (``[batch, k, vocab]``), and the unembedding is computed only there: for metrics that read the last
    token (IOI's logit difference) this saves a large share of a small model's forward pass.
    """
    start = time.perf_counter()
    run = _prepare(model, clean, corrupted, metric, components, direction, layers)
    names = _hook_names(run)
    if any(c.offset_template for c in run.components):
        _check_resid_mid(model, run, run.base)
    all_names = [name for _, _, name in names] + _offset_names(run)
    source = _cache_activations(model, run.source, all_names)
    base: dict[str, torch.Tensor] = {}
    replay = _BlockReplay(model, run.base.shape[0]) if skip_early_layers else None
    with torch.no_grad(), model.hooks(fwd_hooks=_capture_hooks(base, all_names, detach=True)):
        with replay.recording() if replay else contextlib.nullcontext():
            base_value = check_metric_value(metric(_output(model, run.base, metric, logits_to_keep)), metric, "the base run")
    n_prompts = run.base.shape[0]
    copies_per_pass = max(1, batch_size // n_prompts)

    # Cells whose activation is identical in both runs (e.g. positions before the first changed token)
    # score exactly 0 and need no forward pass.
    scores = {c.name: {} for c in run.components}
    jobs = []
    skipped = 0
    for component, layer, name in names:
        shape = component.cell_shape(source[name])
        scores[component.name][layer] = torch.zeros(shape, dtype=_score_dtype(model))
        changed = component.cell_scores((_activation(component, layer, source) != _activation(component, layer, base)).to(torch.int32))
        cells = [cell for cell in itertools.product(*map(range, shape)) if changed[cell] > 0]
        skipped += changed.numel() - len(cells)
        jobs += [(component, layer, name, cells[i : i + copies_per_pass]) for i in range(0, len(cells), copies_per_pass)]

    from tqdm.auto import tqdm

    for component, layer, name, cells in tqdm(jobs, desc="activation patching", disable=not progress, unit="pass"):
        copies = len(cells)
        target = _activation(component, layer, source)
        offset_name = component.offset_name(layer)
        current: dict[str, torch.Tensor] = {}
        hooks = _capture_hooks(current, [offset_name], detach=True) if offset_name else []

        def patch(x, hook, component=component, cells=cells, copies=copies, target=target, offset_name=offset_name):
            x = x.clone()
            stacked = x.view(copies, n_prompts, *x.shape[1:])
            # resid_mid is patched through attn_out: attn_out := target - resid_pre (this run's)
            offset = current[offset_name].view(copies, n_prompts, *x.shape[1:]) if offset_name else None
            for i, cell in enumerate(cells):
                index = component.cell_index(cell)
                stacked[i][index] = target[index] if offset is None else target[index] - offset[i][index]
            return x

        hooks.append((name, patch))
        skip = replay.skipping(layer, copies) if replay else contextlib.nullcontext()
        with torch.no_grad(), model.hooks(fwd_hooks=hooks), skip:
            outputs = _output(model, run.base.repeat(copies, 1), metric, logits_to_keep)
        layer_scores = scores[component.name][layer]
        for i, cell in enumerate(cells):
            chunk = outputs[i * n_prompts : (i + 1) * n_prompts]
            value = check_metric_value(metric(chunk), metric, f"{name} cell {cell}")
            layer_scores[cell] = (value - base_value).item()

    stacked_scores = {c: torch.stack([by_layer[layer] for layer in run.layers]) for c, by_layer in scores.items()}
    return _result(
        model, run, stacked_scores, "activation_patching", metric, (), start,
        base_metric=base_value.item(), forward_passes=len(jobs) + 3, cells_skipped_unchanged=skipped,
    )


def _output(model, tokens: torch.Tensor, metric, logits_to_keep: int | None = None) -> torch.Tensor:
    """What `metric` reads from a forward pass: its ``readout(model, tokens)`` if it has one (e.g. the
    pooled embedding of ``relp.SentenceEmbedding``), else the logits [batch, pos, vocab] (or only the
    last `logits_to_keep` positions of them)."""
    readout = getattr(metric, "readout", None)
    if readout is not None:
        if logits_to_keep is not None:
            raise ValueError(
                f"logits_to_keep={logits_to_keep} applies to logits, but metric {metric_name(metric)} reads "
                f"{getattr(readout, 'name', readout)!r}; leave logits_to_keep=None"
            )
        return readout(model, tokens)
    if logits_to_keep is None:
        return model(tokens)
    if not 1 <= logits_to_keep <= tokens.shape[1]:
        raise ValueError(f"logits_to_keep must be in 1..{tokens.shape[1]} (the prompt length); got {logits_to_keep}")
    try:
        return model(tokens, logits_to_keep=logits_to_keep)  # HF computes the unembedding only there
    except TypeError:
        return model(tokens)[:, -logits_to_keep:]


class _BlockReplay:
    """Replays the base run's block outputs for the blocks before the patched layer.

    Blocks before layer l compute the same thing with or without a patch at layer l, so their output
    can be taken from the base run instead of being recomputed (expanded to the stacked copies).
    Disabled by itself when a block's output is not a batch-first tensor or a tuple of them.
    """

    def __init__(self, model, n_prompts: int):
        self.blocks = list(getattr(model, "blocks", []))
        self.n_prompts = n_prompts
        self.outputs: list = [None] * len(self.blocks)
        self.usable = bool(self.blocks)
        self._expanded: dict[tuple[int, int], object] = {}

    @contextlib.contextmanager
    def recording(self):
        def record(index):
            def hook(module, args, output):
                self.outputs[index] = output

            return hook

        handles = [block.register_forward_hook(record(i)) for i, block in enumerate(self.blocks)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.usable = self.usable and all(self._replayable(o) for o in self.outputs)

    def _replayable(self, output) -> bool:
        if isinstance(output, torch.Tensor):
            return output.ndim >= 1 and output.shape[0] == self.n_prompts
        if isinstance(output, tuple) and output:
            return self._replayable(output[0]) and all(o is None or self._replayable(o) for o in output[1:])
        return False

    def _expand(self, output, copies: int):
        if isinstance(output, torch.Tensor):
            return output.repeat(copies, *([1] * (output.ndim - 1)))
        return tuple(None if o is None else self._expand(o, copies) for o in output)

    @contextlib.contextmanager
    def skipping(self, layer: int, copies: int):
        if not self.usable or layer == 0:
            yield
            return
        replaced = []
        try:
            for index in range(layer):
                key = (index, copies)
                if key not in self._expanded:
                    self._expanded = {k: v for k, v in self._expanded.items() if k[1] == copies}
                    self._expanded[key] = self._expand(self.outputs[index], copies)
                block = self.blocks[index]
                # object.__setattr__: bridge components forward attribute writes to the HF module
                object.__setattr__(block, "forward", lambda *args, _output=self._expanded[key], **kwargs: _output)
                replaced.append(block)
            yield
        finally:
            for block in replaced:
                object.__delattr__(block, "forward")  # back to the class's forward


# ----------------------------------------------------------------------------------------------
# Gradient-based: attribution patching and relevance patching


def _gradient_scores(model, run: _Run, metric: Metric) -> tuple[dict[str, torch.Tensor], float]:
    """(source - base) . dm/d(activation) at the base run, for every requested cell (2 forward, 1 backward)."""
    names = _hook_names(run)
    if any(c.offset_template for c in run.components):
        _check_resid_mid(model, run, run.base)
    offsets = _offset_names(run)
    source = _cache_activations(model, run.source, [name for _, _, name in names] + offsets)
    captured: dict[str, torch.Tensor] = {}

    def make_root_differentiable(x, hook):
        # Models with frozen parameters would otherwise build no graph at all.
        return x if x.requires_grad else x.detach().requires_grad_(True)

    ordered = list(dict.fromkeys(name for _, _, name in names))
    hooks = [("blocks.0.hook_resid_pre", make_root_differentiable), *_capture_hooks(captured, ordered + offsets, detach=False)]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        value = check_metric_value(metric(_output(model, run.base, metric)), metric, "the base run")
        if not value.requires_grad:
            raise ValueError(f"metric {metric_name(metric)} is not differentiable in the model's output (no gradient)")
        grads = torch.autograd.grad(value, [captured[name] for name in ordered], allow_unused=True)
    grad_of = dict(zip(ordered, grads))
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
            base_activation = _activation(component, layer, {k: v.detach() for k, v in captured.items()})
            delta = _activation(component, layer, source) - base_activation
            per_layer.append(component.cell_scores((delta * grad).to(_score_dtype(model))))
        scores[component.name] = torch.stack(per_layer).detach().cpu()
    return scores, value.item()


def attribution_patching(
    model,
    clean: Tokens,
    corrupted: Tokens,
    metric: Metric,
    components: str | Iterable[str] = BLOCK_COMPONENTS,
    *,
    direction: str = "denoising",
    layers: Iterable[int] | None = None,
) -> PatchingResult:
    """Attribution patching (AtP): ``(source - base) . dm/dn`` at the base run, plain gradients."""
    start = time.perf_counter()
    run = _prepare(model, clean, corrupted, metric, components, direction, layers)
    scores, base_value = _gradient_scores(model, run, metric)
    return _result(model, run, scores, "attribution_patching", metric, (), start, base_metric=base_value)


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
) -> PatchingResult:
    """Relevance patching (RelP): attribution patching whose backward pass follows LRP `rules`.

    `rules` is a preset name from ``relp.rules.PRESETS`` (default ``"relp"``: LN + Identity + Half) or
    an iterable of rule names. Both runs are taken under the rules (they do not change forward values).
    """
    start = time.perf_counter()
    run = _prepare(model, clean, corrupted, metric, components, direction, layers)
    with lrp_rules(model, rules) as rule_set:
        scores, base_value = _gradient_scores(model, run, metric)
    return _result(
        model, run, scores, "relevance_patching", metric, rule_set.active, start,
        base_metric=base_value, rules_not_applicable=rule_set.not_applicable,
    )
