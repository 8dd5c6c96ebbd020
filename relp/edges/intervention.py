"""Runs with edges replaced: exact edge patching, and the evaluator of edge circuits.

A run of stacked copies of a batch where, copy by copy, a set of edges ``u -> v`` carries another value:
the receiver v reads ``x_v - u_live + u_other`` instead of ``x_v`` (its stream with u's own output
swapped for u's output in the other run, or its mean, or zero). ``u_live`` is u's output *in this run*,
so a sender whose own inputs were changed upstream passes its changed output along its kept edges (MIB's
edge intervention). Only v sees the swap: the residual stream, and every other receiver, keep u's live
output. This uses the bridge's split inputs (``use_split_qkv_input``: each query head and each key/value
head reads its own copy of the stream, ``hook_q_input`` etc., normalised per head; ``use_attn_result``:
each head's output ``hook_result``; ``use_hook_mlp_in``), switched on for the duration of a run and
restored afterwards, also when an exception is raised.

* :func:`run_edges` is the engine: the metric of each copy, given a bool mask [copy, sender, receiver]
  (or [copy, position, sender, receiver]) of the edges that carry the other value.
* :func:`edge_patching` is exact edge patching (the oracle of :mod:`relp.edges.attribution`): for each
  edge alone, ``m(base | only u -> v carries u_source) - m(base)``, one forward pass per edge (edges share
  a pass as stacked copies). Directions and signs as in :mod:`relp.patching`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from relp.checks import warn_if_expensive
from relp.edges.attribution import EdgeScores
from relp.edges.graph import EdgeGraph
from relp.integrated_gradients import INPUT_HOOK
from relp.interventions import cache_activations, model_output, rows_per_pass
from relp.metrics import check_metric_value, metric_name
from relp.patching import Metric, Tokens, _check_batch_size, _prepare


@contextlib.contextmanager
def split_inputs(model) -> Iterator[None]:
    """The bridge's per-receiver inputs and per-head outputs, on for the duration of the block."""
    cfg = model.cfg
    saved = {name: bool(getattr(cfg, name, False)) for name in ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in", "use_attn_in")}
    try:
        if saved["use_attn_in"]:
            model.set_use_attn_in(False)
        model.set_use_split_qkv_input(True)
        model.set_use_attn_result(True)
        model.set_use_hook_mlp_in(True)
        yield
    finally:
        model.set_use_split_qkv_input(saved["use_split_qkv_input"])
        model.set_use_attn_result(saved["use_attn_result"])
        model.set_use_hook_mlp_in(saved["use_hook_mlp_in"])
        if saved["use_attn_in"]:
            model.set_use_attn_in(True)


def _sender_names(graph: EdgeGraph) -> list[str]:
    return [INPUT_HOOK] + [n for l in range(graph.n_layers) for n in (f"blocks.{l}.attn.hook_result", f"blocks.{l}.hook_mlp_out")]


def _sender_offsets(graph: EdgeGraph) -> list[int]:
    """Index of the first sender of each sender hook (input; per layer the heads, then the MLP)."""
    return [0] + [o for l in range(graph.n_layers) for o in (1 + l * (graph.n_heads + 1), 1 + l * (graph.n_heads + 1) + graph.n_heads)]


def _as_senders(name: str, x: torch.Tensor) -> torch.Tensor:
    """A sender hook's tensor as [rows, pos, senders, d]."""
    return x if name.endswith("hook_result") else x.unsqueeze(2)


def sender_values(model, graph: EdgeGraph, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, pos, sender, d_model]: every sender's output (the heads' ``hook_result``) on `tokens`."""
    names = _sender_names(graph)
    with split_inputs(model):
        cache = cache_activations(model, tokens, names)
    return torch.cat([_as_senders(n, cache[n]) for n in names], dim=2)


def _receiver_points(graph: EdgeGraph) -> list[tuple[str, list[int], str]]:
    """(hook name, receiver indices, kind) in forward order; kind "heads" for [rows, pos, heads, d] inputs."""
    points = []
    for layer in range(graph.n_layers):
        idx = graph.layer_receivers(layer)
        nq, nkv = graph.n_heads, graph.n_kv_heads
        points.append((f"blocks.{layer}.attn.hook_q_input", idx[:nq], "heads"))
        points.append((f"blocks.{layer}.attn.hook_k_input", idx[nq : nq + nkv], "heads"))
        points.append((f"blocks.{layer}.attn.hook_v_input", idx[nq + nkv : nq + 2 * nkv], "heads"))
        points.append((f"blocks.{layer}.hook_mlp_in", idx[-1:], "stream"))
    points.append((f"blocks.{graph.n_layers - 1}.hook_resid_post", graph.layer_receivers(graph.n_layers), "stream"))
    return points


def run_edges(
    model,
    graph: EdgeGraph,
    tokens: torch.Tensor,
    replaced: torch.Tensor,
    other: torch.Tensor,
    metric: Metric,
    *,
    labels: Sequence[str] | None = None,
    logits_to_keep: int | None = None,
) -> list[torch.Tensor]:
    """The metric of each copy of the batch `tokens` run with the edges `replaced` carrying `other`.

    `replaced` is bool [copies, sender, receiver] or [copies, position, sender, receiver]; `other` is the
    senders' other value [batch or 1, pos or 1, sender, d_model] (e.g. :func:`sender_values` of the
    corrupted prompts, or a mean). No gradient.
    """
    copies = replaced.shape[0]
    n, length = tokens.shape
    per_position = replaced.ndim == 4
    if replaced.shape[-2:] != graph.allowed.shape:
        raise ValueError(f"replaced must be [copies, (position,) sender, receiver] with {tuple(graph.allowed.shape)} last; got {tuple(replaced.shape)}")
    if per_position and replaced.shape[1] != length:
        raise ValueError(f"per-position edge masks have {replaced.shape[1]} positions; the prompts have {length}")
    device = tokens.device
    replaced = (replaced & graph.allowed).to(device)
    other = other.to(device)
    labels = list(labels) if labels is not None else [f"copy {i}" for i in range(copies)]
    # other - live for every sender so far, in one buffer filled in forward order (allocated at the first
    # sender), laid out so that a receiver's sum over senders is one batched matrix product over a prefix
    # of the senders, read in place: [copy, 1, sender, batch * pos * d] (summed edges) or [copy, pos,
    # sender, batch * d] (per position).
    state: dict = {"buffer": None, "filled": 0}
    weights_all = replaced.unsqueeze(1) if not per_position else replaced  # [copy, 1 or pos, sender, receiver]

    def record(name: str, first: int):
        def hook(x, hook):
            live = _as_senders(name, x).reshape(copies, n, x.shape[1], -1, x.shape[-1])  # [c, b, p, w, d]
            if state["filled"] != first:
                raise RuntimeError(f"{name} fired out of order (sender {first}); the edge engine needs the senders in forward order")
            width, d = live.shape[3], live.shape[4]
            if state["buffer"] is None:
                shape = (copies, length, graph.n_senders, n * d) if per_position else (copies, 1, graph.n_senders, n * length * d)
                state["buffer"] = torch.empty(shape, dtype=x.dtype, device=x.device)
            diff = other[:, :, first : first + width].unsqueeze(0).to(x.dtype) - live
            target = state["buffer"][:, :, first : first + width]
            if per_position:  # [c, p, w, b, d]
                target.view(copies, length, width, n, d).copy_(diff.permute(0, 2, 3, 1, 4))
            else:  # [c, w, b, p, d]
                target.view(copies, width, n, length, d).copy_(diff.permute(0, 3, 1, 2, 4))
            state["filled"] = first + width
            return x

        return hook

    def receive(indices: list[int], kind: str):
        weights_here = weights_all[..., indices]  # [copy, 1 or pos, sender, r]
        any_sender = weights_here.reshape(-1, *weights_here.shape[-2:]).any(0).any(-1)  # [sender]

        def hook(x, hook):
            if not bool(any_sender.any()):
                return x
            filled = state["filled"]
            buffer = state["buffer"]
            used = any_sender[:filled].nonzero().flatten()
            if 2 * used.numel() >= filled:  # most senders: the prefix, in place
                diff, weights = buffer[:, :, :filled], weights_here[:, :, :filled]
            else:
                diff, weights = buffer.index_select(2, used), weights_here.index_select(2, used)
            delta = torch.matmul(weights.transpose(-1, -2).to(diff.dtype), diff)  # [copy, 1 or pos, r, k]
            r, d = delta.shape[2], x.shape[-1]
            if per_position:
                delta = delta.view(copies, length, r, n, d).permute(0, 3, 1, 2, 4)
            else:
                delta = delta.view(copies, r, n, length, d).permute(0, 2, 3, 1, 4)
            stacked = x.reshape(copies, n, *x.shape[1:])
            stacked = stacked + (delta if kind == "heads" else delta.squeeze(3))
            return stacked.reshape(x.shape)

        return hook

    hooks = [(name, record(name, first)) for name, first in zip(_sender_names(graph), _sender_offsets(graph))]
    for name, indices, kind in _receiver_points(graph):
        hooks.append((name, receive(indices, kind)))
    # a receiver must see every sender before it: senders are registered first at a shared hook point
    # (the last block's hook_mlp_out fires before its hook_resid_post)
    with torch.no_grad(), split_inputs(model), model.hooks(fwd_hooks=hooks):
        outputs = model_output(model, tokens.repeat(copies, 1), metric, logits_to_keep)
    return [check_metric_value(metric(outputs[i * n : (i + 1) * n]), metric, label) for i, label in zip(range(copies), labels)]


def edge_rows_per_pass(model, graph: EdgeGraph, n_positions: int, logits_positions: int | None = None) -> int:
    """Rows (copies x prompts) one edge run may hold: the forward pass's own memory plus every sender's
    difference from its other value ([pos, senders, d] per row), within the share of free memory a pass takes."""
    itemsize = torch.empty((), dtype=model.cfg.dtype).element_size()
    differences = 3 * n_positions * graph.n_senders * model.cfg.d_model * itemsize
    return rows_per_pass(model, n_positions, logits_positions, extra_row_bytes=differences)


def _edge_masks(graph: EdgeGraph, edges) -> torch.Tensor:
    """A bool [sender, receiver] selection from None (all edges), names, or a bool tensor."""
    if edges is None:
        return graph.allowed.clone()
    if isinstance(edges, torch.Tensor):
        if edges.dtype != torch.bool or tuple(edges.shape) != tuple(graph.allowed.shape):
            raise ValueError(f"edges as a tensor must be bool [sender, receiver] = {tuple(graph.allowed.shape)}; got {edges.dtype} {tuple(edges.shape)}")
        outside = edges & ~graph.allowed
        if outside.any():
            raise ValueError(f"{int(outside.sum())} selected entries are not edges (see graph.allowed)")
        return edges.clone()
    if isinstance(edges, str):
        edges = [edges]
    mask = torch.zeros_like(graph.allowed)
    for name in edges:
        mask[graph.edge_index(name)] = True
    return mask


def edge_patching(
    model,
    clean: Tokens,
    corrupted: Tokens,
    metric: Metric,
    *,
    edges=None,
    per_position: bool = False,
    direction: str = "denoising",
    batch_size: int | None = None,
    logits_to_keep: int | None = None,
    progress: bool = False,
    max_forward_passes: float | None = None,
) -> EdgeScores:
    """Exact edge patching: for each selected edge alone, the metric's change when only that edge carries
    the source run's value (see the module docstring).

    `edges`: None (every edge of the graph), edge names (``"a0.h1->m2"``) or a bool [sender, receiver]
    mask. ``per_position=True`` patches each edge at each position separately. Edges not selected score
    NaN. One forward pass per patched edge (and position), stacked `batch_size` rows a pass.
    """
    start = time.perf_counter()
    _check_batch_size(batch_size)
    run = _prepare(model, clean, corrupted, metric, ["resid_pre"], direction, None)
    graph = EdgeGraph.from_model(model)
    selected = _edge_masks(graph, edges)
    n_pos = run.base.shape[1]
    cells = selected.nonzero().tolist()
    jobs = [(p, s, r) for p in range(n_pos) for s, r in cells] if per_position else [(None, s, r) for s, r in cells]
    warn_if_expensive(len(jobs) + 1, int(run.base.shape[0]), max_forward_passes, what="edge patching", per="edge")
    other = sender_values(model, graph, run.source)
    with torch.no_grad():
        base_value = check_metric_value(metric(model_output(model, run.base, metric, logits_to_keep)), metric, "the base run").item()
    rows = batch_size or edge_rows_per_pass(model, graph, n_pos, logits_to_keep)
    per_pass = max(1, rows // run.base.shape[0])
    shape = (n_pos, *graph.allowed.shape) if per_position else tuple(graph.allowed.shape)
    scores = torch.full(shape, float("nan"), dtype=torch.float64)
    scores[..., ~graph.allowed] = 0.0
    chunks = [jobs[i : i + per_pass] for i in range(0, len(jobs), per_pass)]
    for chunk in tqdm(chunks, desc="edge patching", disable=not progress, unit="pass"):
        masks = torch.zeros((len(chunk), *shape), dtype=torch.bool)
        for c, (p, s, r) in enumerate(chunk):
            masks[(c, p, s, r) if per_position else (c, s, r)] = True
        names = [f"{graph.senders[s]}->{graph.receivers[r].name}" + ("" if p is None else f"@{p}") for p, s, r in chunk]
        values = run_edges(model, graph, run.base, masks, other, metric, labels=names, logits_to_keep=logits_to_keep)
        for (p, s, r), value in zip(chunk, values):
            scores[(p, s, r) if per_position else (s, r)] = value.item() - base_value
    return EdgeScores(
        graph=graph, scores=scores, method="edge_patching", metric=metric_name(metric), direction=run.direction,
        seconds=time.perf_counter() - start, model=str(model.cfg.model_name), tokens=tuple(model.to_str_tokens(run.clean[0])),
        metadata={
            "n_prompts": int(run.clean.shape[0]), "n_positions": n_pos, "base_metric": base_value,
            "patched": selected, "forward_equivalents": float(len(jobs) + 3),
        },
    )

