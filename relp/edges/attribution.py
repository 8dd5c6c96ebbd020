"""Edge attribution: AtP, RelP and the other gradient methods for every edge, in one forward and one backward pass.

For an edge ``u -> v`` (:mod:`relp.edges.graph`) the linear estimate of patching only that edge is

    score(u -> v) = (u_source - u_base) . dm / d(input of v)

summed over the prompts and positions (or per position), where ``u_source - u_base`` is the change of the
sender's output and the gradient is taken at the receiver's *own* input: the stream entering v's norm, with
the gradient flowing only through v (not through the residual connection around it). Signs and directions
are those of :mod:`relp.patching` (``direction="denoising"``: corrupted base, clean source).

How the receivers' gradients come out of one backward pass (no per-head copies of the stream are kept):

* a query head h reads the stream x through ``q_h = W_Q^h norm(x) + b_Q^h``, so ``dm/dx`` through h's query
  is the vector-Jacobian product of the norm, at x, with ``W_Q^h dm/dq_h``; ``dm/dq_h`` is the gradient at
  ``attn.hook_q`` (before the rotary embedding). Likewise keys and values (per key/value head). The norm's
  VJP is taken through the run's own autograd graph from ``ln1.hook_out`` back to ``ln1.hook_in``, so LRP rules
  on the norm (the LN-rule) act on it exactly as in the node-level methods; under rules every gradient
  is the rules' (RelP), without them the plain one (AtP).
* the MLP's input is ``hook_mlp_in`` (= ``ln2.hook_in``, which on the bridge feeds only the MLP), the logits'
  input the last block's ``hook_resid_post``.
* a head's output is ``z_h W_O^h`` (``hook_z`` times the head's rows of W_O), an MLP's ``hook_mlp_out``, the
  input's ``blocks.0.hook_resid_pre``.

Every run checks its own decomposition: the heads' outputs sum to ``hook_attn_out`` (up to the output
bias), and the query/key/value gradients, pulled back through the norm, sum to the gradient at
``ln1.hook_in``; an architecture where either fails (a norm after q/k, scaled residuals, ...) is refused
with a clear error rather than scored wrongly.

Two identities follow from the chain rule and are tested: the incoming scores of a receiver sum to the
node-level score of its input (``(x_source - x_base) . dm/dx``), and the outgoing scores of a sender sum
to its node-level score (AtP/RelP of ``mlp_out``, of a ``head``). For a model that is linear in its
stream, the scores equal exact edge patching (:func:`relp.edges.edge_patching`).

Methods (:data:`EDGE_METHODS`): ``atp``, ``relp`` (and the rule presets ``gim``, ``relp_eps``), the
two-point estimate (``two_point``, ``two_point_relp``: the mean of the gradients at both ends) and EAP-IG
over the inputs (``ig_inputs``, ``ig_inputs_relp``: gradients averaged over ``steps`` points on the straight
path between the two runs' input embeddings, Hanna et al. 2024).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from relp.edges.graph import EdgeGraph
from relp.integrated_gradients import DEFAULT_STEPS, INPUT_HOOK, midpoints
from relp.interventions import capture_hooks, model_output
from relp.methods import get_method
from relp.metrics import check_metric_value, metric_name
from relp.patching import Metric, Tokens, _live_rules, _prepare, _root_differentiable, _score_dtype
from relp.rules import applied_rules, rule_forward_contexts

#: edge method key -> (kind, default rules). Keys are those of the node-level registry (relp.methods),
#: whose labels and colours the plots use.
EDGE_METHODS: dict[str, tuple[str, str | None]] = {
    "atp": ("point", None),
    "relp": ("point", "relp"),
    "gim": ("point", "gim"),
    "relp_eps": ("point", "relp_eps"),
    "two_point": ("two_point", None),
    "two_point_relp": ("two_point", "relp"),
    "ig_inputs": ("ig_inputs", None),
    "ig_inputs_relp": ("ig_inputs", "relp"),
}

#: Relative tolerance of the run-time decomposition checks (float32 sums over d_model terms).
CHECK_RTOL = 1e-3


# ----------------------------------------------------------------------------------------------
# Result


@dataclass
class EdgeScores:
    """Scores of every edge of a graph: ``scores`` is [sender, receiver] (``[position, sender, receiver]``
    per position), 0 off the edges (``graph.allowed``)."""

    graph: EdgeGraph
    scores: torch.Tensor
    method: str
    metric: str = ""
    direction: str = "denoising"
    rules: tuple[str, ...] = ()
    seconds: float = float("nan")
    model: str = ""
    tokens: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        shape = tuple(self.scores.shape[-2:])
        if shape != tuple(self.graph.allowed.shape) or self.scores.ndim not in (2, 3):
            raise ValueError(
                f"edge scores must be [sender, receiver] = {tuple(self.graph.allowed.shape)} or [position, sender, "
                f"receiver]; got {tuple(self.scores.shape)}"
            )

    @property
    def per_position(self) -> bool:
        return self.scores.ndim == 3

    @property
    def label(self) -> str:
        try:
            return get_method(self.method).label
        except KeyError:
            return self.method

    def summed(self) -> torch.Tensor:
        """[sender, receiver] scores summed over positions."""
        return self.scores.sum(0) if self.per_position else self.scores

    def flat(self) -> torch.Tensor:
        """The scores of the edges in flat order ([n_edges], or [position, n_edges])."""
        return self.graph.flat(self.scores)

    def sender_totals(self) -> dict[str, float]:
        """Each sender's outgoing scores summed: its node-level score (see the module docstring)."""
        totals = self.summed().sum(1)
        return dict(zip(self.graph.senders, totals.tolist()))

    def receiver_totals(self) -> dict[str, float]:
        """Each receiver's incoming scores summed: the node-level score of its input."""
        totals = self.summed().sum(0)
        return {r.name: t for r, t in zip(self.graph.receivers, totals.tolist())}

    def top(self, k: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The k strongest edges (by |score|, or signed), summed over positions, as (name, score)."""
        flat = self.graph.flat(self.summed())
        key = flat.abs() if absolute else flat
        order = torch.sort(key, descending=True, stable=True).indices[:k]
        names = self.graph.edge_names()
        return [(names[i], float(flat[i])) for i in order.tolist()]

    def to_dataframe(self):
        """Long table: edge, sender, receiver, (position,) score."""
        import pandas as pd

        names = self.graph.edge_names()
        pairs = self.graph.edge_pairs.tolist()
        senders = [self.graph.senders[s] for s, _ in pairs]
        receivers = [self.graph.receivers[r].name for _, r in pairs]
        flat = self.flat().double().numpy()
        if not self.per_position:
            return pd.DataFrame({"edge": names, "sender": senders, "receiver": receivers, "score": flat})
        n_pos = flat.shape[0]
        return pd.DataFrame({
            "edge": np.tile(names, n_pos), "sender": np.tile(senders, n_pos), "receiver": np.tile(receivers, n_pos),
            "position": np.repeat(np.arange(n_pos), len(names)), "score": flat.reshape(-1),
        })

    def __repr__(self) -> str:
        where = "per position" if self.per_position else "summed over positions"
        return f"EdgeScores({self.label}, {self.graph!r}, {where}, {self.seconds:.2f} s)"


# ----------------------------------------------------------------------------------------------
# Sender outputs and receiver gradients


def sender_hooks(n_layers: int) -> list[str]:
    """Hook points the sender outputs are computed from (input, per layer hook_z and hook_mlp_out)."""
    return [INPUT_HOOK] + [n for l in range(n_layers) for n in (f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_mlp_out")]


def output_weights(model) -> list[torch.Tensor]:
    """W_O per layer, [n_heads, d_head, d_model] (detached)."""
    return [block.attn.W_O.detach() for block in model.blocks]


def sender_outputs(graph: EdgeGraph, cache: dict[str, torch.Tensor], w_o: Sequence[torch.Tensor]) -> torch.Tensor:
    """[batch, pos, sender, d_model]: each sender's output from a cache of :func:`sender_hooks`."""
    parts = [cache[INPUT_HOOK].unsqueeze(2)]
    for layer in range(graph.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        parts.append(torch.einsum("bphe,hed->bphd", z, w_o[layer].to(z.dtype)))
        parts.append(cache[f"blocks.{layer}.hook_mlp_out"].unsqueeze(2))
    return torch.cat(parts, dim=2)


def check_head_outputs(model, graph: EdgeGraph, cache: dict[str, torch.Tensor], outputs: torch.Tensor) -> None:
    """The heads' outputs must sum to hook_attn_out up to a constant (the output bias), at every layer."""
    for layer in range(graph.n_layers):
        start = 1 + layer * (graph.n_heads + 1)
        heads = outputs[:, :, start : start + graph.n_heads].sum(2).float()
        written = cache[f"blocks.{layer}.hook_attn_out"].float()
        rest = written - heads
        rest = rest - rest.mean(dim=(0, 1), keepdim=True)
        if rest.norm() > CHECK_RTOL * written.norm() + 1e-6:
            raise ValueError(
                f"on {model.cfg.model_name}, blocks.{layer}.hook_attn_out is not the sum of its heads' outputs z_h W_O^h "
                f"(relative difference {float(rest.norm() / written.norm()):.2g}): the attention output is scaled or "
                "normalised before the residual add, so there are no head edges on this architecture"
            )


def _receiver_hooks(graph: EdgeGraph) -> list[str]:
    names = []
    for l in range(graph.n_layers):
        names += [f"blocks.{l}.attn.hook_{c}" for c in "qkv"]
        names += [f"blocks.{l}.ln{i}.hook_{end}" for i in (1, 2) for end in ("in", "out")]
    return names + [_final_stream(graph)]


def _final_stream(graph: EdgeGraph) -> str:
    return f"blocks.{graph.n_layers - 1}.hook_resid_post"


def receiver_gradients(
    model, graph: EdgeGraph, captured: dict[str, torch.Tensor], value: torch.Tensor
) -> list[torch.Tensor]:
    """Per layer (and the logits last), [batch, pos, n_receivers_of_layer, d_model]: dm/d(input of each
    receiver), from a run whose :func:`_receiver_hooks` were captured in the graph (see the module docstring).

    The stream tensor entering a norm also feeds the residual connection, so the gradient at
    ``ln1.hook_in`` is not the attention's: each receiver's gradient is the norm's VJP (``ln_out`` back to
    ``ln_in``, only the norm lies on that path) of the gradient that reaches the norm's output through that
    receiver alone. Checks that the query/key/value parts add up to the gradient at ``ln1.hook_out``."""
    L = graph.n_layers
    heads = [captured[f"blocks.{l}.attn.hook_{c}"] for l in range(L) for c in "qkv"]
    norm_outs = [captured[f"blocks.{l}.ln{i}.hook_out"] for l in range(L) for i in (1, 2)]
    final = captured[_final_stream(graph)]
    grads = torch.autograd.grad(value, heads + norm_outs + [final], retain_graph=True, allow_unused=True)

    def or_zeros(grad, like):
        return torch.zeros_like(like) if grad is None else grad

    head_grads, norm_grads, final_grad = grads[: 3 * L], grads[3 * L : 5 * L], grads[5 * L]
    out = []
    for layer in range(L):
        attn = model.blocks[layer].attn
        weights = {"q": attn.W_Q.detach(), "k": attn.W_K.detach(), "v": attn.W_V.detach()}
        ln1_in, ln1_out = captured[f"blocks.{layer}.ln1.hook_in"], captured[f"blocks.{layer}.ln1.hook_out"]
        ln2_in, ln2_out = captured[f"blocks.{layer}.ln2.hook_in"], captured[f"blocks.{layer}.ln2.hook_out"]
        cotangents = []
        for c, grad, like in zip("qkv", head_grads[3 * layer : 3 * layer + 3], heads[3 * layer : 3 * layer + 3]):
            w = weights[c]  # [heads, d_model, d_head]
            grad = or_zeros(grad, like)
            if grad.shape[2] != w.shape[0]:
                raise ValueError(f"blocks.{layer}.attn.hook_{c} has {grad.shape[2]} heads but W_{c.upper()} has {w.shape[0]}")
            cotangents.append(torch.einsum("bphe,hde->bphd", grad, w.to(grad.dtype)))
        cotangents = torch.cat(cotangents, dim=2)
        _check_attention_gradients(model, layer, cotangents.sum(2), or_zeros(norm_grads[2 * layer], ln1_out))
        attention = _norm_vjps(ln1_out, ln1_in, cotangents.movedim(2, 0))  # [receivers, batch, pos, d]
        mlp = torch.autograd.grad(ln2_out, ln2_in, or_zeros(norm_grads[2 * layer + 1], ln2_out), retain_graph=True)[0]
        out.append(torch.cat([attention.movedim(0, 2), mlp.unsqueeze(2)], dim=2))
    out.append(or_zeros(final_grad, final).unsqueeze(2))
    return out


def _norm_vjps(output: torch.Tensor, input: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """The norm's vector-Jacobian products for a stack of cotangents [n, *output.shape], in one batched
    backward pass (vmap over the graph from `input` to `output`); one pass per cotangent where the graph
    does not support batching."""
    try:
        return torch.autograd.grad(output, input, cotangents, retain_graph=True, is_grads_batched=True)[0]
    except RuntimeError:  # an autograd function without a batching rule
        return torch.stack([torch.autograd.grad(output, input, c, retain_graph=True)[0] for c in cotangents])


def _check_attention_gradients(model, layer: int, summed: torch.Tensor, reference: torch.Tensor) -> None:
    error = float((summed.float() - reference.float()).norm())
    scale = float(reference.float().norm())
    if error > CHECK_RTOL * scale + 1e-12:
        raise ValueError(
            f"on {model.cfg.model_name} at layer {layer}, W_Q^T dm/dq + W_K^T dm/dk + W_V^T dm/dv over the heads does not "
            f"add up to the gradient at ln1.hook_out (relative difference {error / max(scale, 1e-30):.2g}): q, k, v are "
            "not linear maps of the norm's output on this architecture (e.g. query/key norms), so relp cannot split "
            "the attention input into per-head receivers"
        )


def edge_products(graph: EdgeGraph, delta: torch.Tensor, gradients: Sequence[torch.Tensor], per_position: bool) -> torch.Tensor:
    """[sender, receiver] (or [pos, sender, receiver]) = sum over prompts (and positions) of delta . gradient,
    restricted to the edges. `delta` is [batch, pos, sender, d]; `gradients` per layer as from
    :func:`receiver_gradients`. One matrix product per layer, over the senders written before it (a
    prefix of the senders) and the layer's receivers."""
    batch, n_pos, n_senders, d = delta.shape
    dtype = delta.dtype
    if per_position:  # [pos, sender, batch * d]
        rows = delta.permute(1, 2, 0, 3).reshape(n_pos, n_senders, batch * d)
        scores = torch.zeros(n_pos, graph.n_senders, graph.n_receivers, dtype=dtype, device=delta.device)
    else:  # [sender, batch * pos * d]
        rows = delta.permute(2, 0, 1, 3).reshape(n_senders, batch * n_pos * d)
        scores = torch.zeros(graph.n_senders, graph.n_receivers, dtype=dtype, device=delta.device)
    for layer, grads in enumerate(gradients):
        receivers = graph.layer_receivers(layer)
        n = int(graph.allowed[:, receivers].any(1).nonzero().max()) + 1  # senders are in layer order: a prefix
        grads = grads.to(dtype)
        if per_position:
            columns = grads.permute(1, 2, 0, 3).reshape(n_pos, len(receivers), batch * d)
            block = torch.bmm(rows[:, :n], columns.transpose(1, 2))
        else:
            columns = grads.permute(2, 0, 1, 3).reshape(len(receivers), batch * n_pos * d)
            block = rows[:n] @ columns.T
        scores[..., :n, receivers[0] : receivers[-1] + 1] = block
    return scores * graph.allowed.to(scores.device)


# ----------------------------------------------------------------------------------------------
# The method


def _method(method: str, rules) -> tuple[str, str | Iterable[str] | None]:
    if method not in EDGE_METHODS:
        raise ValueError(f"unknown edge method {method!r}; expected one of {sorted(EDGE_METHODS)}")
    kind, default = EDGE_METHODS[method]
    if rules is not None and method in ("atp", "two_point", "ig_inputs"):
        raise ValueError(f"edge method {method!r} uses plain gradients; got rules={rules!r} (use 'relp', 'two_point_relp' or 'ig_inputs_relp')")
    if rules is not None and method in ("gim", "relp_eps"):
        raise ValueError(f"edge method {method!r} is a rule preset; do not pass rules= (use method='relp', rules=...)")
    return kind, (default if rules is None else rules)


def edge_attribution(
    model,
    clean: Tokens,
    corrupted: Tokens,
    metric: Metric,
    *,
    method: str = "relp",
    rules: str | Iterable[str] | None = None,
    direction: str = "denoising",
    per_position: bool = False,
    steps: int = DEFAULT_STEPS,
    logits_to_keep: int | None = None,
) -> EdgeScores:
    """Scores of every edge of the model's graph (:class:`relp.edges.EdgeGraph`) by a gradient method.

    `method` is a key of :data:`EDGE_METHODS` (``"relp"``: relevance patching with the rule set `rules`,
    default the paper's; ``"atp"``: plain gradients; ...). One forward pass of the source run, one forward
    and one backward pass of the base run (``two_point``: two of each; ``ig_inputs``: `steps` of each);
    nothing per edge is materialised. ``per_position=True`` keeps a score per position. See the module
    docstring for the definition, the checks and the identities.
    """
    start = time.perf_counter()
    kind, rules = _method(method, rules)
    run = _prepare(model, clean, corrupted, metric, ["resid_pre"], direction, None)
    graph = EdgeGraph.from_model(model)
    if kind == "ig_inputs" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    rule_set = _live_rules(model, rules) if rules is not None else None
    ruled = rule_set is not None and bool(rule_set.active)
    w_o = output_weights(model)
    dtype = _score_dtype(model)

    def ruled_forward():
        return rule_forward_contexts(model, rule_set) if ruled else contextlib.nullcontext()

    source_cache: dict[str, torch.Tensor] = {}
    with torch.no_grad(), ruled_forward():
        with model.hooks(fwd_hooks=capture_hooks(source_cache, sender_hooks(graph.n_layers), detach=True)):
            model_output(model, run.source, metric, None if getattr(metric, "readout", None) else 1)

    def gradient_run(tokens, input_value=None):
        """(sender outputs, receiver gradients, metric value) of one run with gradients under the rules."""
        captured: dict[str, torch.Tensor] = {}
        first = ("blocks.0.hook_resid_pre", _root_differentiable if input_value is None else (lambda x, hook: input_value))
        names = sender_hooks(graph.n_layers) + [f"blocks.{l}.hook_attn_out" for l in range(graph.n_layers)]
        projections = [n for n in _receiver_hooks(graph) if ".attn.hook_" in n]
        rest = [n for n in _receiver_hooks(graph) if n not in projections]
        # The query/key/value projections' outputs are captured before any rule acts there (attnlrp scales
        # the gradient reaching q, k, v: it lies behind the capture, so dm/dq includes it); the norms'
        # inputs and outputs after the rules (the LN-rule's path is what the VJP must follow).
        with torch.enable_grad(), model.hooks(fwd_hooks=capture_hooks(captured, projections, detach=False)):
            with applied_rules(model, rule_set) if ruled else contextlib.nullcontext(), model.hooks(
                fwd_hooks=[first, *capture_hooks(captured, names + rest, detach=False)]
            ):
                value = check_metric_value(metric(model_output(model, tokens, metric, logits_to_keep)), metric, "the base run")
                if not value.requires_grad:
                    raise ValueError(f"metric {metric_name(metric)} is not differentiable in the model's output (no gradient)")
                gradients = receiver_gradients(model, graph, captured, value)
        detached = {k: v.detach() for k, v in captured.items()}
        outputs = sender_outputs(graph, detached, w_o)
        check_head_outputs(model, graph, detached, outputs)
        return outputs, [g.detach() for g in gradients], value.item()

    source_outputs = sender_outputs(graph, source_cache, w_o)
    base_outputs, gradients, base_value = gradient_run(run.base)
    passes = 4.0
    if kind == "two_point":
        _, source_gradients, _ = gradient_run(run.source)
        gradients = [(a + b) / 2 for a, b in zip(gradients, source_gradients)]
        passes += 3
    elif kind == "ig_inputs":
        base_input, source_input = base_outputs[:, :, 0], source_outputs[:, :, 0]
        total = None
        for alpha in midpoints(steps).tolist():
            point = (base_input + alpha * (source_input - base_input)).detach().requires_grad_(True)
            _, point_gradients, _ = gradient_run(run.base, point)
            total = point_gradients if total is None else [t + g for t, g in zip(total, point_gradients)]
        gradients = [t / steps for t in total]
        passes += 3 * steps
    delta = (source_outputs - base_outputs).to(dtype)
    scores = edge_products(graph, delta, gradients, per_position).detach().cpu()
    return EdgeScores(
        graph=graph, scores=scores, method=method, metric=metric_name(metric), direction=run.direction,
        rules=tuple(rule_set.active) if ruled else (), seconds=time.perf_counter() - start,
        model=str(model.cfg.model_name), tokens=tuple(model.to_str_tokens(run.clean[0])),
        metadata={
            "n_prompts": int(run.clean.shape[0]), "n_positions": int(run.clean.shape[1]), "base_metric": base_value,
            "forward_equivalents": passes, "kind": kind, **({"steps": steps} if kind == "ig_inputs" else {}),
        },
    )
