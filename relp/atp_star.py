"""AtP*: attribution patching with the QK-fix and GradDrop (Kramar et al. 2024, arXiv 2403.00745).

AtP estimates ``AP(n) = m(base | do(n := n_source)) - m(base)`` as ``(n_source - n_base) . dm/dn`` at
the base run (:func:`relp.patching.attribution_patching`). AtP* fixes its two failure modes:

* **QK-fix** (``qk_fix=True``, the default). For ``query`` and ``key`` cells the linearisation runs
  through the attention softmax, which saturates. Instead, the attention pattern with the one cell
  patched is computed exactly, and only the rest of the model is linearised::

      AtP*(n) = sum over the affected pattern rows of (pattern_patched - pattern_base) . dm/d(pattern)

  A query cell (head h, position s) changes row s of head h; a key cell (key/value head g, position t)
  changes column t of every query head of group g (grouped-query attention), in every row that may
  attend to t (s >= t under the causal mask). The scores are recomputed from ``hook_q`` / ``hook_k``
  exactly as the model does (scale, rotary embedding, which the bridge applies after ``hook_q`` /
  ``hook_k``, shared key heads, the mask read from ``hook_attn_scores``, the softmax in the model's
  precision), and the recomputed base scores and pattern are checked against ``hook_attn_scores`` and
  ``hook_pattern`` on every run; an architecture where they differ (BERT-style models, whose bridge
  delegates attention to Hugging Face) is refused. All query cells of a layer take one extra
  attention computation; key cells one per key position, batched in chunks.
* **GradDrop** (``grad_drop=True``). Cancellation between paths can make a gradient small although
  patching matters. For each layer l, ``AtP_l`` is AtP with the gradient that flows through layer l's
  block outputs (``attn_out`` and ``mlp_out``, what the block adds to the residual stream) set to zero
  (one forward pass, then one backward pass per layer, ``retain_graph``; a custom autograd function at
  those outputs zeroes the gradient of the layer being dropped). The score is
  ``(1 / (L - 1)) * sum over l != layer(n) of |AtP_l(n)|``: the drop of the cell's own layer is skipped
  (the paper's nodes are attention and MLP units, whose gradient that drop would zero; ``resid_pre`` at
  layer l counts as in layer l). Dropping a layer before the cell's leaves its gradient unchanged, so
  those ``layer(n)`` terms are ``|AtP(n)|`` and only layers after the first requested one are
  backpropagated. ``metadata["grad_drop_layers_reached"]`` lists the dropped layers the backward pass
  went through: with a metric on the logits that must be all of them (else an error: the bridge
  discarded the gates); a readout that reads an earlier layer does not reach the later ones, whose
  drop then rightly changes nothing. **GradDrop scores are unsigned** (>= 0, a magnitude of effect); the result records
  ``metadata["signed"] = False``. With the QK-fix, ``AtP_l`` of query and key cells uses the pattern
  gradient of that backward pass.

With `rules` (a preset or rule names from :mod:`relp.rules`) every backward pass follows the LRP rules,
as in :func:`relp.patching.relevance_patching`; ``atp_star(..., rules="relp")`` is RelP with the
QK-fix. For QK-fixed cells the rules shape the gradient down to ``hook_pattern`` only: a rule that
acts on the gradients reaching q and k (``attnlrp``'s 1/4) does not change them. Cells of other components get the plain AtP (or RelP) score, equal to
:func:`relp.patching.attribution_patching` (:func:`relp.patching.relevance_patching`).

Cost: 2 forward passes (source, base) and 1 backward pass, plus one backward pass per dropped layer
with GradDrop; ``metadata["forward_equivalents"]`` counts a backward pass as two forward passes. The
QK-fix's attention recomputations are small next to a forward pass and are recorded separately.
Signs and directions as in :mod:`relp.patching`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import torch

from relp.components import BLOCK_COMPONENTS, Component, component_for
from relp.interventions import activation, capture_hooks, model_output
from relp.methods import Cost, register_method, register_preset
from relp.metrics import check_metric_value, metric_name
from relp.patching import (
    Metric,
    Tokens,
    _check_sites,
    _live_rules,
    _prepare,
    _read_names,
    _result,
    _root_differentiable,
    _score_dtype,
    _sites,
)
from relp.results import PatchingResult
from relp.rules import applied_rules, rule_forward_contexts

QK_COMPONENTS = ("query", "key")
_MASKED = torch.finfo(torch.float32).min / 2  # hook_attn_scores at or below this is masked out
_CHUNK_ELEMENTS = 1 << 24  # elements of one chunk of patched key patterns


class _DropGradient(torch.autograd.Function):
    """Identity in the forward pass; in the backward pass, zero gradient while ``state["drop"]`` is this
    layer (GradDrop). Records in ``state["reached"]`` that the backward pass went through it."""

    @staticmethod
    def forward(ctx, x, state, layer):
        ctx.state, ctx.layer = state, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.state["reached"].add(ctx.layer)
        return (torch.zeros_like(grad) if ctx.state["drop"] == ctx.layer else grad), None, None


def _attn(layer: int, name: str) -> str:
    return f"blocks.{layer}.attn.{name}"


def _rotate(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """The rotary embedding of x [batch, pos, head, d_head] (Hugging Face's ``rotate_half`` convention;
    only the first ``cos.shape[-1]`` dimensions rotate when the rotary dimension is smaller)."""
    if cos is None:
        return x
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)  # [1 or batch, pos, 1, rot]
    rot, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
    half = rot.shape[-1] // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class _Attention:
    """One layer's attention pattern recomputed from hook_q / hook_k of the base run, checked against the
    model's hook_attn_scores and hook_pattern; patterns with a patched query or key from it."""

    def __init__(self, model, layer: int, base: dict[str, torch.Tensor]):
        self.layer = layer
        q, k = base[_attn(layer, "hook_q")], base[_attn(layer, "hook_k")]
        self.cos, self.sin = base.get(_attn(layer, "hook_cos")), base.get(_attn(layer, "hook_sin"))
        if q.shape[2] % k.shape[2]:
            raise ValueError(f"layer {layer}: {q.shape[2]} query heads are not a multiple of {k.shape[2]} key heads")
        self.group = q.shape[2] // k.shape[2]
        module = getattr(model.blocks[layer].attn, "original_component", None)
        scaling = getattr(module, "scaling", None)
        self.scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
        self.q, self.k = _rotate(q, self.cos, self.sin), _rotate(k, self.cos, self.sin)
        scores = base[_attn(layer, "hook_attn_scores")]
        self.mask = scores <= _MASKED  # [batch, head, query pos, key pos]
        self.dtype = q.dtype
        rot_q = base.get(_attn(layer, "hook_rot_q"))
        if rot_q is not None and rot_q.shape == self.q.shape:
            self._check("the rotated queries (hook_rot_q)", self.q, rot_q, self.q.abs().max())
        recomputed = self.scores(self.q, self.k)
        bound = self.scale * self.q.norm(dim=-1).max() * self.k.norm(dim=-1).max()
        eps = torch.finfo(self.dtype).eps
        tolerance = 16 * q.shape[-1] * eps * bound
        self._check("the attention scores (hook_attn_scores)", recomputed[~self.mask], scores[~self.mask], tolerance)
        # The bridge computes some softmaxes in float32 whatever the model's dtype: follow the model.
        pattern = base[_attn(layer, "hook_pattern")]
        errors = {}
        for dtype in dict.fromkeys((self.dtype, torch.float32)):
            self.softmax_dtype = dtype
            errors[dtype] = (self.pattern(recomputed) - pattern).abs().max().item()
        self.softmax_dtype = min(errors, key=errors.get)
        self._check(
            "the attention pattern (hook_pattern)", self.pattern(recomputed), pattern,
            tolerance + 16 * torch.finfo(self.softmax_dtype).eps,
        )
        self.base_pattern = self.pattern(recomputed)
        self.base_scores = recomputed

    def _check(self, what: str, mine: torch.Tensor, model: torch.Tensor, tolerance) -> None:
        error = (mine - model).abs().max().item() if mine.numel() else 0.0
        if not error <= float(tolerance):
            raise ValueError(
                f"the QK-fix cannot reproduce {what} of layer {self.layer} from hook_q/hook_k: max difference "
                f"{error:.3g}, tolerance {float(tolerance):.3g}. This architecture computes attention in a way "
                "relp does not recompute (e.g. BERT-style models, whose bridge delegates attention to Hugging "
                "Face, or score soft-capping); use qk_fix=False"
            )

    def scores(self, q_rotated: torch.Tensor, k_rotated: torch.Tensor) -> torch.Tensor:
        """Pre-softmax scores [batch, head, query pos, key pos] of rotated q [b, p, h, dh], k [b, p, hkv, dh]."""
        k_rotated = k_rotated.repeat_interleave(self.group, dim=2)
        return torch.einsum("bshd,bthd->bhst", q_rotated, k_rotated) * self.scale

    def pattern(self, scores: torch.Tensor) -> torch.Tensor:
        masked = scores.masked_fill(self.mask, float("-inf"))
        pattern = torch.softmax(masked.to(self.softmax_dtype), dim=-1).to(self.dtype)
        return pattern.masked_fill(self.mask.all(dim=-1, keepdim=True), 0.0)  # fully masked rows: 0, as the bridge

    def query_delta(self, q_source: torch.Tensor) -> torch.Tensor:
        """Pattern change [batch, head, s, t] when every query is patched: row s of head h is the change of
        patching query cell (h, s) alone (a row depends on its own query only)."""
        return self.pattern(self.scores(_rotate(q_source, self.cos, self.sin), self.k)) - self.base_pattern

    def key_scores(self, k_source: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Score [key head, t] of patching key cell (g, t) alone: the exact pattern change in every row of the
        query heads of group g, dotted with dm/d(pattern) `grad` [batch, head, s, t]."""
        cross = self.scores(self.q, _rotate(k_source, self.cos, self.sin))  # column t: key t patched
        batch, heads, length, _ = cross.shape
        chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * length * length))
        out = []
        for begin in range(0, length, chunk):
            positions = torch.arange(begin, min(begin + chunk, length), device=cross.device)
            column = torch.arange(length, device=cross.device) == positions[:, None]  # [chunk, t]
            patched = torch.where(column[:, None, None, None, :], cross, self.base_scores)  # [chunk, b, h, s, t]
            delta = self.pattern(patched) - self.base_pattern
            out.append((delta * grad).sum(dim=(1, 3, 4)))  # [chunk, head]
        per_head = torch.cat(out)  # [t, head]
        return per_head.reshape(length, heads // self.group, self.group).sum(-1).T  # [key head, t]


def _drop_hooks(model, layers: Iterable[int], state: dict, names) -> list:
    """GradDrop gates at every block output (attn_out, mlp_out) of `layers` that the model has."""

    def gate(layer):
        return lambda x, hook: _DropGradient.apply(x, state, layer)

    hooks = []
    for layer in layers:
        for component in ("attn_out", "mlp_out"):
            name = component_for(model, component).hook_name(layer)
            if name in names:
                hooks.append((name, gate(layer)))
    return hooks


@register_method(
    "atp_star", label="AtP*", display_name="AtP* (QK-fix, GradDrop)", color="tab:brown",
    options=("logits_to_keep",), cost=Cost(forward=2, backward=1),
)
def atp_star(
    model,
    clean: Tokens,
    corrupted: Tokens,
    metric: Metric,
    components: str | Iterable[str] = BLOCK_COMPONENTS,
    *,
    qk_fix: bool = True,
    grad_drop: bool = False,
    rules: str | Iterable[str] | None = None,
    direction: str = "denoising",
    layers: Iterable[int] | None = None,
    logits_to_keep: int | None = None,
) -> PatchingResult:
    """AtP* (module docstring): attribution patching with the QK-fix for ``query``/``key`` cells and,
    optionally, GradDrop.

    Parameters
    ----------
    qk_fix : compute the attention pattern exactly for patched queries and keys (default True).
    grad_drop : average |AtP| over the backward passes with each later layer's block outputs dropped
        (one backward pass per layer). The scores are then **unsigned**.
    rules : None (plain gradients) or LRP rules as in :func:`relp.patching.relevance_patching`.
    logits_to_keep : as in :func:`relp.patching.attribution_patching`.
    """
    start = time.perf_counter()
    run = _prepare(model, clean, corrupted, metric, components, direction, layers)
    for name, value in (("qk_fix", qk_fix), ("grad_drop", grad_drop)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False; got {value!r}")
    n_layers = model.cfg.n_layers
    if grad_drop and n_layers < 2:
        raise ValueError(f"GradDrop averages over the other layers (1/(L-1)); {model.cfg.model_name} has {n_layers} layer")
    rule_set = _live_rules(model, rules) if rules is not None else None
    ruled = rule_set is not None and bool(rule_set.active)
    _check_sites(model, run)
    fixed = {c.name for c in run.components if qk_fix and c.name in QK_COMPONENTS}
    fixed_layers = run.layers if fixed else []
    names = _read_names(run)
    qk_names = [_attn(layer, h) for layer in fixed_layers for h in ("hook_q", "hook_k")]
    hook_names = model.hook_dict  # read once (a property that rebuilds the registry)
    extra = [
        _attn(layer, h) for layer in fixed_layers
        for h in ("hook_cos", "hook_sin", "hook_attn_scores", "hook_rot_q") if _attn(layer, h) in hook_names
    ]
    readout = getattr(metric, "readout", None)

    source: dict[str, torch.Tensor] = {}
    with torch.no_grad(), rule_forward_contexts(model, rule_set) if ruled else contextlib.nullcontext():
        with model.hooks(fwd_hooks=capture_hooks(source, names + qk_names, detach=True)):
            model_output(model, run.source, metric, None if readout is not None else 1)

    state = {"drop": None, "reached": set()}
    first = min(run.layers)
    dropped = list(range(first + 1, n_layers)) if grad_drop else []
    in_graph = [n for c, layer in _sites(run) if c.name not in fixed for n in [c.hook_name(layer)]]
    in_graph += [_attn(layer, "hook_pattern") for layer in fixed_layers]
    in_graph = list(dict.fromkeys(in_graph))
    captured: dict[str, torch.Tensor] = {}
    detached: dict[str, torch.Tensor] = {}
    hooks = [
        ("blocks.0.hook_resid_pre", _root_differentiable),
        *capture_hooks(captured, in_graph, detach=False),
        *capture_hooks(detached, names + qk_names + extra + [_attn(layer, "hook_pattern") for layer in fixed_layers], detach=True),
        *_drop_hooks(model, dropped, state, hook_names),  # after the captures: they see the gate's input
    ]
    grads: dict[int | None, dict[str, torch.Tensor]] = {}
    with torch.enable_grad(), applied_rules(model, rule_set) if ruled else contextlib.nullcontext():
        with model.hooks(fwd_hooks=hooks):
            value = check_metric_value(metric(model_output(model, run.base, metric, logits_to_keep)), metric, "the base run")
            if not value.requires_grad:
                raise ValueError(f"metric {metric_name(metric)} is not differentiable in the model's output (no gradient)")
            inputs = [captured[name] for name in in_graph]
            for i, drop in enumerate([None, *dropped]):
                state["drop"] = drop
                result = torch.autograd.grad(value, inputs, retain_graph=i < len(dropped), allow_unused=True)
                grads[drop] = dict(zip(in_graph, result))
                missing = sorted(set(dropped) - state["reached"])
                if drop is None and missing and readout is None:
                    # Every block output reaches the logits: a gate the backward pass missed was discarded.
                    raise RuntimeError(
                        f"GradDrop: the backward pass did not go through the block outputs of layer(s) {missing} "
                        "(the bridge discards their hooks' edits on this model); use grad_drop=False"
                    )

    attention = {layer: _Attention(model, layer, detached) for layer in fixed_layers}
    query_delta = {layer: attention[layer].query_delta(source[_attn(layer, "hook_q")]) for layer in fixed_layers} if "query" in fixed else {}

    def cell_scores(component: Component, layer: int, grad_of: dict[str, torch.Tensor]) -> torch.Tensor:
        if component.name in fixed:
            grad = grad_of[_attn(layer, "hook_pattern")]
            if grad is None:
                raise RuntimeError(f"no gradient reached {_attn(layer, 'hook_pattern')}: it is not in the computation of the metric")
            if component.name == "query":
                return (query_delta[layer] * grad).sum(dim=(0, 3))  # [head, s]
            return attention[layer].key_scores(source[_attn(layer, "hook_k")], grad)
        grad = grad_of[component.hook_name(layer)]
        if grad is None:
            raise RuntimeError(f"no gradient reached {component.hook_name(layer)}: its hook is not in the computation of the metric")
        delta = activation(component, layer, source) - activation(component, layer, detached)
        return component.cell_scores(delta * grad)

    dtype = _score_dtype(model)
    scores = {}
    for component in run.components:
        per_layer = []
        for layer in run.layers:
            plain = cell_scores(component, layer, grads[None]).to(dtype)
            if grad_drop:
                later = [cell_scores(component, layer, grads[d]).to(dtype).abs() for d in dropped if d > layer]
                plain = (layer * plain.abs() + sum(later, torch.zeros_like(plain))) / (n_layers - 1)
            per_layer.append(plain)
        scores[component.name] = torch.stack(per_layer).detach().cpu()
    return _result(
        model, run, scores, "atp_star", metric, rule_set.active if rule_set is not None else (), start,
        base_metric=value.item(), forward_equivalents=2 + 2 * (1 + len(dropped)),
        qk_fix=bool(qk_fix), qk_fixed_components=sorted(fixed), grad_drop=bool(grad_drop), signed=not grad_drop,
        grad_drop_layers=dropped, grad_drop_layers_reached=sorted(state["reached"]), backward_passes=1 + len(dropped),
        softmax_dtypes={str(layer): str(a.softmax_dtype) for layer, a in attention.items()},
        **({"rules_not_applicable": rule_set.not_applicable} if rule_set is not None else {}),
    )


register_preset(
    "relp_qk", "atp_star", {"rules": "relp"}, label="RelP+QK", display_name="relevance patching with AtP*'s QK-fix",
    color="tab:pink",
)
