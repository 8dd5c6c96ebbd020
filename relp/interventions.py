"""The intervention engine: running a model with activations read or replaced.

Everything that runs a model with hooks goes through here: activation patching, the gradient runs of
attribution and relevance patching, and the circuit evaluator's ablations.

* :func:`model_output` is what a metric reads from a forward pass: its readout's output (e.g. a pooled
  sentence embedding) or the logits, optionally only the last ``logits_to_keep`` positions of them.
* :func:`capture_hooks` and :func:`cache_activations` read activations; :func:`activation` is a
  component's activation from such a cache (for ``resid_mid``: the hooked ``attn_out`` plus its offset
  ``resid_pre``).
* :func:`run_stacked` runs ``copies`` stacked copies of one batch, each with its own
  :class:`Replacement`\\ s (a cell patched, a set of nodes ablated), and returns the metric of each copy.
  A replacement names a component's *activation* value; for ``resid_mid``, which is patched through
  ``attn_out``, the engine subtracts the copy's own ``resid_pre`` (attn_out := target - resid_pre).
* :class:`BlockReplay` records the base run's block outputs and replays them for the blocks before the
  first replaced layer, which cannot depend on the replacement.
* :class:`PrefixReuse` (causal models) records the base run's keys and values at every layer, so that a
  run whose replacements start at position p computes only positions >= p: nothing before p can change,
  at any layer.
* :func:`rows_per_pass` chooses how many rows (stacked copies x prompts) a pass may hold from the memory
  that is free on the model's device.
* :func:`check_resid_mid` checks on a run that resid_pre + attn_out is the stream entering the MLP's
  norm (:mod:`relp.architectures`), the condition under which resid_mid may be patched through attn_out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import psutil
import torch

from relp.architectures import architecture_of
from relp.components import Component
from relp.metrics import check_metric_value, metric_name

logger = logging.getLogger(__name__)


def model_output(model, tokens: torch.Tensor, metric, logits_to_keep: int | None = None, **forward_kwargs) -> torch.Tensor:
    """What `metric` reads from a forward pass: its ``readout(model, tokens)`` if it has one (e.g. the
    pooled embedding of ``relp.SentenceEmbedding``), else the logits [batch, pos, vocab] (or only the
    last `logits_to_keep` positions of them). `forward_kwargs` (e.g. a key/value cache) go to the
    model's forward pass; readouts take none."""
    readout = getattr(metric, "readout", None)
    if readout is not None:
        if forward_kwargs:
            raise ValueError(f"metric {metric_name(metric)} reads a readout, which runs the model itself; got {sorted(forward_kwargs)}")
        if logits_to_keep is not None:
            raise ValueError(
                f"logits_to_keep={logits_to_keep} applies to logits, but metric {metric_name(metric)} reads "
                f"{getattr(readout, 'name', readout)!r}; leave logits_to_keep=None"
            )
        return readout(model, tokens)
    if logits_to_keep is None:
        return model(tokens, **forward_kwargs)
    if not 1 <= logits_to_keep <= tokens.shape[1]:
        raise ValueError(f"logits_to_keep must be in 1..{tokens.shape[1]} (the prompt length); got {logits_to_keep}")
    try:
        return model(tokens, logits_to_keep=logits_to_keep, **forward_kwargs)  # HF computes the unembedding only there
    except TypeError:
        return model(tokens, **forward_kwargs)[:, -logits_to_keep:]


# ----------------------------------------------------------------------------------------------
# Reading activations


def capture_hooks(store: dict[str, torch.Tensor], names: Iterable[str], *, detach: bool) -> list:
    """Hooks that store each named activation in `store` and pass it on unchanged (``detach=True``: a
    detached copy; else the tensor itself, in the autograd graph)."""

    def capture(name):
        def hook(x, hook):
            store[name] = x.detach().clone() if detach else x
            return x  # returning it keeps reshaped views (hook_z) in the autograd graph

        return hook

    return [(name, capture(name)) for name in dict.fromkeys(names)]


def cache_activations(model, tokens: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named activations of one no-grad forward pass (detached copies)."""
    cache: dict[str, torch.Tensor] = {}
    with torch.no_grad(), model.hooks(fwd_hooks=capture_hooks(cache, names, detach=True)):
        model(tokens)
    return cache


def hook_names(component: Component, layer: int) -> list[str]:
    """The hook points a component's activation at `layer` is read from: its hook and its offset."""
    offset = component.offset_name(layer)
    return [component.hook_name(layer)] + ([offset] if offset else [])


def activation(component: Component, layer: int, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """The component's activation from a cache: the hooked tensor, plus the offset for resid_mid."""
    value = cache[component.hook_name(layer)]
    offset = component.offset_name(layer)
    return value if offset is None else value + cache[offset]


def check_resid_mid(model, layers: Sequence[int], tokens: torch.Tensor) -> None:
    """resid_pre + attn_out must be the stream entering the MLP's norm, else resid_mid is undefined."""
    stream_template = architecture_of(model).mlp_input_stream
    if stream_template is None:
        raise ValueError(
            f"on {model.cfg.model_name} ({model.cfg.architecture}) relp knows no stream entering the MLP's norm "
            "to check resid_pre + attn_out against; resid_mid is not defined for this architecture. Use resid_pre, "
            "attn_out or mlp_out"
        )
    names = [n for l in layers for n in (f"blocks.{l}.hook_resid_pre", f"blocks.{l}.hook_attn_out", stream_template.format(layer=l))]
    cache = cache_activations(model, tokens[:1], names)
    for layer in layers:
        mid = cache[f"blocks.{layer}.hook_resid_pre"] + cache[f"blocks.{layer}.hook_attn_out"]
        stream = cache[stream_template.format(layer=layer)]
        if not torch.allclose(mid, stream, rtol=1e-4, atol=1e-4 * stream.abs().max().item()):
            raise ValueError(
                f"on {model.cfg.model_name}, resid_pre + attn_out is not the stream entering the MLP's norm at "
                f"layer {layer} (max difference {(mid - stream).abs().max().item():.3g}); resid_mid is not "
                "defined for this architecture. Use resid_pre, attn_out or mlp_out"
            )


# ----------------------------------------------------------------------------------------------
# Replacing activations in stacked copies of a batch


@dataclass(frozen=True)
class Replacement:
    """Replace one component's activation at one layer, copy by copy.

    ``keep`` is a boolean mask broadcastable to the stacked activations [copies, batch, *activation
    axes] (see :meth:`relp.components.Component.activation_mask`): True keeps the run's own value,
    False takes ``value``. ``value`` is the component's replacement activation for one copy: a tensor
    broadcastable to [batch, *activation axes] (e.g. the other run's activation, a mean with size-1
    axes) or a scalar.
    """

    component: Component
    layer: int
    keep: torch.Tensor
    value: torch.Tensor

    def from_position(self, start: int, length: int) -> "Replacement":
        """The replacement for a run of positions ``start..length-1`` only (prefix reuse): the mask and
        the value are cut along the position axis where they span all `length` positions."""
        axis = self.component.activation_axes.index("position")

        def cut(tensor: torch.Tensor, axis: int) -> torch.Tensor:
            return tensor.narrow(axis, start, length - start) if tensor.ndim > axis and tensor.shape[axis] == length else tensor

        return dataclasses.replace(self, keep=cut(self.keep, 1 + axis), value=cut(self.value, axis))


def _replace_hook(replacement: Replacement, copies: int, n: int, offsets: dict[str, torch.Tensor]) -> Callable:
    offset_name = replacement.component.offset_name(replacement.layer)
    keep, value = replacement.keep, replacement.value

    def hook(x, hook):
        stacked = x.reshape(copies, n, *x.shape[1:])
        target = value.to(x.dtype)
        if target.ndim:
            target = target.unsqueeze(0)  # [1, n or 1, pos or 1, ...]: the same for every copy
        if offset_name is not None:  # resid_mid through attn_out: attn_out := target - resid_pre (this copy's)
            target = target - offsets[offset_name].reshape(copies, n, *x.shape[1:])
        return torch.where(keep.to(x.device), stacked, target).reshape(x.shape)

    return hook


def replacement_hooks(replacements: Sequence[Replacement], copies: int, n: int) -> list:
    """The forward hooks that carry out `replacements` on `copies` stacked copies of a batch of `n`."""
    offsets: dict[str, torch.Tensor] = {}
    hooks = []
    for replacement in replacements:
        offset_name = replacement.component.offset_name(replacement.layer)
        if offset_name is not None:
            hooks += capture_hooks(offsets, [offset_name], detach=True)
        hooks.append((replacement.component.hook_name(replacement.layer), _replace_hook(replacement, copies, n, offsets)))
    return hooks


def run_stacked(
    model,
    tokens: torch.Tensor,
    copies: int,
    replacements: Sequence[Replacement],
    metric,
    *,
    labels: Sequence[str],
    logits_to_keep: int | None = None,
    replay: "BlockReplay | None" = None,
    prefix: "PrefixReuse | None" = None,
    start: int = 0,
) -> list[torch.Tensor]:
    """The metric of each of `copies` stacked copies of the batch `tokens`, run with `replacements`
    (no gradient). `labels` name the copies in errors (a metric that is not a scalar, ...). With a
    recorded `replay`, the blocks before the first replaced layer are replayed, not recomputed. With a
    recorded `prefix` and ``start > 0`` (the replacements change nothing before position `start`), only
    positions from `start` on are computed, on the base run's keys and values for the others."""
    n, length = tokens.shape
    first_layer = min((r.layer for r in replacements), default=0)
    start = prefix.usable_start(start, logits_to_keep) if prefix is not None else 0
    forward_kwargs: dict = {}
    if start:
        replacements = [r.from_position(start, length) for r in replacements]
        tokens = tokens[:, start:]
        forward_kwargs = prefix.forward_kwargs(start, copies)
    skip = replay.skipping(first_layer, copies, start) if replay is not None else contextlib.nullcontext()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(model.hooks(fwd_hooks=replacement_hooks(replacements, copies, n)))
        stack.enter_context(skip)
        if start:
            stack.enter_context(_cache_reaches_attention(model))
        outputs = model_output(model, tokens.repeat(copies, 1), metric, logits_to_keep, **forward_kwargs)
    if start and logits_to_keep is None:  # the positions before `start` are the base run's, unchanged
        outputs = torch.cat([prefix.logits[:, :start].repeat(copies, 1, 1), outputs], dim=1)
    return [
        check_metric_value(metric(outputs[i * n : (i + 1) * n]), metric, label) for i, label in zip(range(copies), labels)
    ]


class BlockReplay:
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

    def _expand(self, output, copies: int, start: int):
        if isinstance(output, torch.Tensor):
            if start:  # the hidden state [batch, pos, ...]: only the positions the run computes
                output = output[:, start:]
            return output.repeat(copies, *([1] * (output.ndim - 1)))
        # a tuple: the hidden state first, then extras (e.g. attention weights) whose axis 1 is not positions
        first, *rest = output
        return (self._expand(first, copies, start), *(None if o is None else self._expand(o, copies, 0) for o in rest))

    @contextlib.contextmanager
    def skipping(self, layer: int, copies: int, start: int = 0):
        """Blocks before `layer` return the base run's outputs (positions from `start` on), expanded to
        `copies` stacked copies."""
        if not self.usable or layer == 0:
            yield
            return
        replaced = []
        try:
            for index in range(layer):
                key = (index, copies, start)
                if key not in self._expanded:
                    self._expanded = {k: v for k, v in self._expanded.items() if k[1:] == (copies, start)}
                    self._expanded[key] = self._expand(self.outputs[index], copies, start)
                block = self.blocks[index]
                # object.__setattr__: bridge components forward attribute writes to the HF module
                object.__setattr__(block, "forward", lambda *args, _output=self._expanded[key], **kwargs: _output)
                replaced.append(block)
            yield
        finally:
            for block in replaced:
                object.__delattr__(block, "forward")  # back to the class's forward


# ----------------------------------------------------------------------------------------------
# Prefix reuse (causal models)


@contextlib.contextmanager
def _cache_reaches_attention(model) -> Iterator[None]:
    """Hand the key/value cache to the bridge's attention components.

    transformers 5 passes the cache to attention as ``cache=``; TransformerLens 4.3's attention bridge
    reads ``past_key_values=`` (or ``layer_past=``) and otherwise leaves the cache empty without a word.
    This forward pre-hook gives it the name it reads, for the duration of the block.
    """

    def rename(module, args, kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        return args, kwargs

    handles = [block.attn.register_forward_pre_hook(rename, with_kwargs=True) for block in model.blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class PrefixReuse:
    """The base run's keys and values, so that runs patched from position p on compute only p onwards.

    In a causal model a replacement at position p cannot change any position before p, at any layer:
    their residual streams, keys and values are the base run's. :meth:`recording` fills the model's own
    key/value cache during the base run and checks that it filled (else reuse is off and runs compute
    every position, with the same results); :meth:`forward_kwargs` then gives each run a cache of the
    first p positions for its stacked copies. Bidirectional models (BERT) and readout metrics (which
    run the model themselves) never reuse a prefix.
    """

    def __init__(self, model, tokens: torch.Tensor):
        self.model = model
        self.length = int(tokens.shape[1])
        self.usable = getattr(model.cfg, "attention_dir", "causal") == "causal" and bool(list(getattr(model, "blocks", [])))
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.logits: torch.Tensor | None = None  # the base run's output, for the positions before p
        # transformers renamed the forward's cache argument (past_key_values -> cache, with a deprecation
        # warning for the old name): use the one this model's forward takes
        hf_model = getattr(model, "original_model", None)
        parameters = inspect.signature(hf_model.forward).parameters if hf_model is not None else {}
        self._keyword = "cache" if "cache" in parameters else "past_key_values"

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict]:
        """Yields the forward keywords for the base run (a cache to fill); checks it filled afterwards."""
        if not self.usable:
            yield {}
            return
        from transformers import DynamicCache  # loaded with the model already; not at import time

        cache = DynamicCache()
        with _cache_reaches_attention(self.model):
            yield {self._keyword: cache, "use_cache": True}
        kinds = {type(layer).__name__ for layer in cache.layers}
        if cache.get_seq_length() != self.length or len(cache.layers) != len(self.model.blocks) or kinds != {"DynamicLayer"}:
            logger.info("prefix reuse is off for %s: its key/value cache did not fill (%s layers, %s positions, %s)",
                        self.model.cfg.model_name, len(cache.layers), cache.get_seq_length(), sorted(kinds))
            self.usable = False
            return
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]

    def usable_start(self, start: int, logits_to_keep: int | None) -> int:
        """`start` if a run can begin there (and still produce the logits it must return), else 0."""
        if not (self.usable and self.layers) or start <= 0:
            return 0
        if logits_to_keep is None and self.logits is None:
            return 0
        return min(start, self.length - (logits_to_keep or 1))

    def forward_kwargs(self, start: int, copies: int) -> dict:
        """A cache of the base run's first `start` positions for `copies` stacked copies of the batch."""
        from transformers import DynamicCache

        prefix = [(k[:, :, :start].repeat(copies, 1, 1, 1), v[:, :, :start].repeat(copies, 1, 1, 1)) for k, v in self.layers]
        return {self._keyword: DynamicCache(ddp_cache_data=prefix), "use_cache": True}


# ----------------------------------------------------------------------------------------------
# Memory


#: Share of the free memory one pass may take.
MEMORY_FRACTION = 0.25
#: Most rows per pass: beyond this a CPU gains nothing and a progress bar stalls.
MAX_ROWS = 1024


def row_bytes(model, n_positions: int, logits_positions: int | None = None) -> int:
    """Bytes one row (one prompt) of a no-grad forward pass keeps alive at its peak, estimated: a few
    copies of the residual stream, the MLP's hidden units, one layer's attention scores and pattern, and
    the logits of `logits_positions` positions (default: all)."""
    cfg = model.cfg
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    # a model whose config names no vocabulary (a hand-made test model) outputs no wider than its stream
    d_out = getattr(cfg, "d_vocab_out", None) or getattr(cfg, "d_vocab", None) or cfg.d_model
    logits = (n_positions if logits_positions is None else logits_positions) * d_out
    return itemsize * (n_positions * (8 * cfg.d_model + 3 * d_mlp + 2 * cfg.n_heads * n_positions) + logits)


def free_memory(device: torch.device | str) -> int:
    """Free memory in bytes on `device`: CUDA's free memory, else the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def rows_per_pass(model, n_positions: int, logits_positions: int | None = None, *, extra_row_bytes: int = 0) -> int:
    """Rows (stacked copies x prompts) a pass may hold: :data:`MEMORY_FRACTION` of the free memory on
    the model's device divided by :func:`row_bytes` (plus `extra_row_bytes`, what a caller keeps per row
    besides the forward pass), at most :data:`MAX_ROWS`, at least 1."""
    budget = MEMORY_FRACTION * free_memory(model.cfg.device)
    per_row = row_bytes(model, n_positions, logits_positions) + extra_row_bytes
    return int(max(1, min(MAX_ROWS, budget // per_row)))


#: Fixed cost of one pass per block it computes, in row-positions of compute (the cost of computing
#: one position of one row through a block): Python, hook and kernel-launch overhead. Measured on the
#: embedded SmolLM2 on one CPU thread: a pass's overhead is about 5.6 ms per block, a row-position
#: 0.15 ms, so about 40; 64 on CPUs (more threads make compute cheaper, not the overhead). On a GPU a
#: small model's pass costs its kernel launches at any size relp makes: passes are never split there.
PASS_OVERHEAD_ROWS = {"cpu": 64.0, "cuda": float(1 << 20)}


def plan_passes(
    starts: Sequence[int], rows_per_copy: int, max_copies: int, positions_from: Callable[[int], int], overhead: float
) -> list[tuple[int, int]]:
    """Split copies into passes: ``[(begin, end), ...]`` slices of the copies, whose first patched
    positions `starts` are sorted.

    A pass costs `overhead` plus its rows times the positions it computes, ``positions_from(p)`` for
    its first copy's position p (all positions without prefix reuse, those from p on with it). One
    pass for all copies wastes the positions between p and each later copy's own first position;
    one pass per position pays the overhead many times. The cheapest split (passes cut only where the
    position changes, each at most `max_copies` copies) is found by dynamic programming over the
    distinct positions.
    """
    if list(starts) != sorted(starts):
        raise ValueError("plan_passes needs the copies sorted by their first position")
    n = len(starts)
    bounds = [i for i in range(n) if i == 0 or starts[i] != starts[i - 1]] + [n]

    def chunks(begin: int, end: int) -> list[tuple[int, int]]:
        return [(i, min(i + max_copies, end)) for i in range(begin, end, max_copies)]

    def cost(begin: int, end: int) -> float:
        return sum(overhead + (b - a) * rows_per_copy * positions_from(starts[a]) for a, b in chunks(begin, end))

    best = [0.0] + [float("inf")] * (len(bounds) - 1)  # best[j]: cheapest plan of copies before bounds[j]
    cut = [0] * len(bounds)
    for j in range(1, len(bounds)):
        for i in range(j):
            c = best[i] + cost(bounds[i], bounds[j])
            if c < best[j]:
                best[j], cut[j] = c, i
    plan, j = [], len(bounds) - 1
    while j > 0:
        plan = chunks(bounds[cut[j]], bounds[j]) + plan
        j = cut[j]
    return plan

