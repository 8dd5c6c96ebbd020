"""Edge circuits: sets of edges picked from edge scores, pruned to what connects the input to the logits,
and their faithfulness with every ablation nodes have (MIB's edge-level evaluation).

Selection (:func:`select_edges`): the top ``count`` edges, the top ``percent`` of them (``int(percent / 100
* n_edges)``, as MIB counts), every edge scoring at least ``threshold``, by signed score or by |score|;
or ``greedy=True``: MIB's greedy search from the logits, which adds, one at a time, the best edge whose
receiver already reaches the logits through the circuit. ``prune=True`` then removes, until nothing
changes, every edge whose sender receives no edge in the circuit (the input excepted) or whose receiver's
node sends none (the logits excepted): the edges left lie on a path from the input to the logits.

Evaluation (:class:`EdgeCircuitEvaluator`): the model runs on the clean prompts; every edge outside the
circuit carries its sender's ablated output (``corrupt``: the sender's output on the corrupted prompt of
the row, ``mean``, ``mean_positional``, ``zero``; :mod:`relp.faithfulness` defines them for nodes), every
edge inside it the sender's live output (:func:`relp.edges.intervention.run_edges`). m(full) is the
clean run, m(empty) the run with every edge ablated; faithfulness, CPR and CMD are those of
:mod:`relp.faithfulness` with edges in place of nodes (``n_nodes`` counts edges).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from relp.circuits import check_one_selection, selection_size
from relp.edges.attribution import EdgeScores
from relp.edges.graph import EdgeGraph
from relp.edges.intervention import edge_rows_per_pass, run_edges, sender_values
from relp.faithfulness import (
    MIB_PERCENTAGES,
    CircuitEvaluator,
    FaithfulnessSummary,
    RandomBaseline,
    _evaluate_curves,
)


@dataclass
class EdgeCircuit:
    """A set of edges of `graph`: ``edges`` is bool [sender, receiver] (or [position, sender, receiver]),
    True on the circuit's edges (only entries of ``graph.allowed``). ``scores`` (optional) are the edge
    scores it was selected from, of the same shape."""

    graph: EdgeGraph
    edges: torch.Tensor
    scores: torch.Tensor | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.edges = torch.as_tensor(self.edges).detach().to("cpu", torch.bool)
        if self.edges.ndim not in (2, 3) or tuple(self.edges.shape[-2:]) != tuple(self.graph.allowed.shape):
            raise ValueError(
                f"edge masks must be [sender, receiver] = {tuple(self.graph.allowed.shape)} or [position, sender, receiver]; "
                f"got {tuple(self.edges.shape)}"
            )
        outside = self.edges & ~self.graph.allowed
        if outside.any():
            raise ValueError(f"{int(outside.sum())} entries of the edge mask are not edges of {self.graph!r}")
        if self.scores is not None:
            self.scores = torch.as_tensor(self.scores).detach().to("cpu", torch.float64)
            if self.scores.shape != self.edges.shape:
                raise ValueError(f"scores {tuple(self.scores.shape)} do not match the edge mask {tuple(self.edges.shape)}")

    # --- sizes (the interface relp.faithfulness evaluates) ---
    @property
    def per_position(self) -> bool:
        return self.edges.ndim == 3

    @property
    def n_positions(self) -> int | None:
        return self.edges.shape[0] if self.per_position else None

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    n_nodes = n_edges  # relp.faithfulness counts circuit members as "nodes"

    @property
    def n_total(self) -> int:
        return self.graph.n_edges * (self.n_positions or 1)

    @property
    def fraction(self) -> float:
        return self.n_edges / self.n_total

    def flat(self) -> torch.Tensor:
        """The mask in edge order (position-major per position)."""
        return self.graph.flat(self.edges).reshape(-1)

    def flat_scores(self) -> torch.Tensor:
        if self.scores is None:
            raise ValueError(f"{self!r} carries no scores")
        return self.graph.flat(self.scores).reshape(-1)

    def from_flat(self, flat: torch.Tensor, **metadata) -> "EdgeCircuit":
        flat = torch.as_tensor(flat, dtype=torch.bool)
        if flat.shape != (self.n_total,):
            raise ValueError(f"flat mask must have {self.n_total} entries; got shape {tuple(flat.shape)}")
        shaped = flat.reshape(self.n_positions, -1) if self.per_position else flat
        return self._with(self.graph.unflat(shaped, fill=False), **metadata)

    def _with(self, edges: torch.Tensor, **metadata) -> "EdgeCircuit":
        return EdgeCircuit(self.graph, edges, self.scores, {**self.metadata, **metadata})

    def empty(self) -> "EdgeCircuit":
        return self._with(torch.zeros_like(self.edges))

    def full(self) -> "EdgeCircuit":
        return self._with(self.graph.allowed.expand_as(self.edges).clone())

    def complement(self) -> "EdgeCircuit":
        return self._with(self.graph.allowed & ~self.edges, complement=True)

    def space_key(self) -> tuple:
        return ("edges", self.graph.key(), tuple(self.edges.shape))

    def mask_key(self) -> bytes:
        return np.packbits(self.edges.numpy().ravel()).tobytes()

    # --- structure ---
    def summed_edges(self) -> torch.Tensor:
        """[sender, receiver]: edges in the circuit at any position."""
        return self.edges.any(0) if self.per_position else self.edges

    def nodes(self) -> list[str]:
        """Nodes on the circuit's edges (senders, and the nodes of its receivers), in graph order."""
        edges = self.summed_edges()
        fed = (_receiver_senders(self.graph) & edges.any(0).unsqueeze(1)).any(0)  # a key/value receiver feeds its group
        used = set(np.array(self.graph.senders)[(edges.any(1) | fed).numpy()].tolist())
        if edges[:, [r.kind == "logits" for r in self.graph.receivers]].any():
            used.add("logits")
        order = list(self.graph.senders) + ["logits"]
        return [n for n in order if n in used]

    def edge_names(self) -> list[str]:
        names = self.graph.edge_names()
        return [names[i] for i in self.graph.flat(self.summed_edges()).nonzero().flatten().tolist()]

    def pruned(self) -> "EdgeCircuit":
        """The circuit without edges off every input-to-logits path (see the module docstring)."""
        return self._with(prune(self.graph, self.edges), pruned=True)

    def __repr__(self) -> str:
        label = f"{self.metadata['label']} " if self.metadata.get("label") else ""
        where = "per position" if self.per_position else "summed over positions"
        return f"EdgeCircuit({label}{self.n_edges} of {self.n_total} edges ({100 * self.fraction:.3g}%); {where}; {self.graph!r})"


# ----------------------------------------------------------------------------------------------
# Structure: nodes of receivers, pruning


def _receiver_node_index(graph: EdgeGraph) -> torch.Tensor:
    """[receiver] -> index of its node among the senders (-1: the logits). A key/value receiver of a
    grouped head belongs to every query head of its group; it maps to the group's first query head, and
    :func:`prune` treats the group as one."""
    index = []
    group = graph.n_heads // graph.n_kv_heads
    for r in graph.receivers:
        if r.kind == "logits":
            index.append(-1)
        elif r.kind == "mlp":
            index.append(graph.sender_index[f"m{r.layer}"])
        else:
            head = r.head if r.kind == "q" else r.head * group
            index.append(graph.sender_index[f"a{r.layer}.h{head}"])
    return torch.tensor(index)


def _receiver_senders(graph: EdgeGraph) -> torch.Tensor:
    """Bool [receiver, sender]: the sender nodes each receiver feeds (a key/value receiver feeds every head
    of its group)."""
    feeds = torch.zeros(graph.n_receivers, graph.n_senders, dtype=torch.bool)
    group = graph.n_heads // graph.n_kv_heads
    for j, r in enumerate(graph.receivers):
        if r.kind == "mlp":
            feeds[j, graph.sender_index[f"m{r.layer}"]] = True
        elif r.kind in "qkv":
            heads = [r.head] if r.kind == "q" else range(r.head * group, (r.head + 1) * group)
            for h in heads:
                feeds[j, graph.sender_index[f"a{r.layer}.h{h}"]] = True
    return feeds


def prune(graph: EdgeGraph, edges: torch.Tensor) -> torch.Tensor:
    """Remove, until nothing changes, edges whose sender gets no edge in (the input excepted) and edges
    whose receiver's node sends nothing out (the logits excepted). Per-position masks are pruned on the
    union over positions (attention connects positions inside a head) and keep their positions."""
    feeds = _receiver_senders(graph)
    logits = torch.tensor([r.kind == "logits" for r in graph.receivers])
    kept = edges.clone()
    while True:
        union = kept.any(0) if kept.ndim == 3 else kept
        # a sender is fed if one of its receivers has an edge in, the input always
        fed = (union.any(0).unsqueeze(1) & feeds).any(0)
        fed[graph.sender_index["input"]] = True
        # a receiver is useful if it is the logits or its node sends something on
        sends = union.any(1)
        useful = logits | (feeds & sends.unsqueeze(0)).any(1)
        alive = fed.unsqueeze(1) & useful.unsqueeze(0)
        new = kept & alive
        if torch.equal(new, kept):
            return new
        kept = new


# ----------------------------------------------------------------------------------------------
# Selection


def _source(scores) -> tuple[EdgeGraph, torch.Tensor, dict]:
    if isinstance(scores, EdgeScores):
        meta = {"method": scores.method, "label": scores.label, "metric": scores.metric, "model": scores.model}
        return scores.graph, scores.scores.detach().to("cpu", torch.float64), meta
    if isinstance(scores, EdgeCircuit):
        if scores.scores is None:
            raise ValueError(f"{scores!r} carries no scores to rank edges by")
        return scores.graph, scores.scores, dict(scores.metadata)
    raise TypeError(f"scores must be relp.edges.EdgeScores or an EdgeCircuit with scores; got {type(scores).__name__}")


def empty_edge_circuit(scores, *, per_position: bool | None = None) -> EdgeCircuit:
    """The empty circuit over the edges of `scores` (EdgeScores or an EdgeCircuit), carrying the scores;
    ``per_position=False`` sums per-position scores over positions."""
    graph, values, meta = _source(scores)
    if per_position is False and values.ndim == 3:
        values = values.sum(0)
    elif per_position and values.ndim == 2:
        raise ValueError("these edge scores are summed over positions; per_position=True needs per-position scores")
    if not torch.isfinite(graph.flat(values)).all():
        raise ValueError("edge scores contain NaN or infinite values (edge_patching leaves unpatched edges NaN)")
    return EdgeCircuit(graph, torch.zeros(values.shape, dtype=torch.bool), values, meta)


def edge_order(template: EdgeCircuit, absolute: bool = False) -> torch.Tensor:
    """Flat edge indices from the highest score down (ties: edge order)."""
    flat = template.flat_scores()
    return torch.sort(flat.abs() if absolute else flat, descending=True, stable=True).indices


def select_edges(
    scores,
    *,
    count: int | None = None,
    percent: float | None = None,
    threshold: float | None = None,
    absolute: bool = False,
    greedy: bool = False,
    prune: bool = False,
    per_position: bool | None = None,
) -> EdgeCircuit:
    """The edge circuit of the best-scoring edges of `scores` (EdgeScores, or an EdgeCircuit with scores).

    Give exactly one of ``count``, ``percent`` (``int(percent/100 * n_edges)`` edges) or ``threshold``.
    ``absolute=True`` ranks by |score|; ``greedy=True`` grows the circuit from the logits (count or
    percent only); ``prune=True`` removes edges off every input-to-logits path afterwards (the circuit
    may then hold fewer edges). See the module docstring.
    """
    check_one_selection(count, percent, threshold)
    template = empty_edge_circuit(scores, per_position=per_position)
    flat = template.flat_scores()
    key = flat.abs() if absolute else flat
    n_total = template.n_total
    n, selection = selection_size(count, percent, threshold, n_total, "edges")
    if n is None:
        if greedy:
            raise ValueError("greedy selection takes count= or percent=, not threshold=")
        mask = key >= selection["threshold"]
    else:
        if greedy:
            if template.per_position:
                raise ValueError("greedy selection works on edges summed over positions; pass per_position=False")
            mask = _greedy(template.graph, template.scores.abs() if absolute else template.scores, n)
            mask = template.graph.flat(mask)
        else:
            mask = torch.zeros(n_total, dtype=torch.bool)
            mask[torch.sort(key, descending=True, stable=True).indices[:n]] = True
    selection.update(absolute=bool(absolute), greedy=bool(greedy))
    circuit = template.from_flat(mask, selection=selection)
    return circuit.pruned() if prune else circuit


def _greedy(graph: EdgeGraph, scores: torch.Tensor, n: int) -> torch.Tensor:
    """MIB's greedy search: from the logits, add the best edge into a receiver whose node is already in
    the circuit (the logits are from the start), until `n` edges."""
    feeds = _receiver_senders(graph)
    logits = torch.tensor([r.kind == "logits" for r in graph.receivers])
    in_graph = torch.zeros(graph.n_senders, dtype=torch.bool)
    chosen = torch.zeros_like(graph.allowed)
    masked = scores.masked_fill(~graph.allowed, -math.inf)
    for _ in range(n):
        reachable = logits | (feeds & in_graph.unsqueeze(0)).any(1)  # [receiver]
        candidates = masked.masked_fill(chosen | ~reachable.unsqueeze(0), -math.inf)
        best = int(torch.argmax(candidates.reshape(-1)))
        if candidates.reshape(-1)[best] == -math.inf:
            break
        s, r = divmod(best, graph.n_receivers)
        chosen[s, r] = True
        in_graph[s] = True
    return chosen


# ----------------------------------------------------------------------------------------------
# Evaluation


class EdgeCircuitEvaluator(CircuitEvaluator):
    """Evaluates edge circuits on one batch of clean prompts (arguments as :class:`relp.CircuitEvaluator`;
    see the module docstring). Values are cached per distinct edge set."""

    circuit_type = EdgeCircuit

    def __init__(self, model, clean, corrupted=None, metric: Callable | None = None, **kwargs):
        super().__init__(model, clean, corrupted, metric, **kwargs)
        self.graph = EdgeGraph.from_model(model)
        self._other: torch.Tensor | None = None

    def __repr__(self) -> str:
        return super().__repr__().replace("CircuitEvaluator", "EdgeCircuitEvaluator", 1)

    def _other_values(self) -> torch.Tensor:
        """The senders' ablated outputs [batch or 1, pos or 1, sender, d]."""
        if self._other is not None:
            return self._other
        graph = self.graph
        if self.ablation == "zero":
            self._other = torch.zeros(1, 1, graph.n_senders, self.model.cfg.d_model, dtype=self.model.cfg.dtype)
        elif self.ablation == "corrupt":
            self._other = sender_values(self.model, graph, self.corrupted)
        else:
            total, count = 0, 0
            for tokens in self.reference:
                values = sender_values(self.model, graph, tokens).to(torch.float64)
                dims = (0, 1) if self.ablation == "mean" else (0,)
                total = total + values.sum(dim=dims, keepdim=True)
                count += tokens.shape[0] * (tokens.shape[1] if self.ablation == "mean" else 1)
            self._other = (total / count).to(self.model.cfg.dtype)
        return self._other

    def _check_space(self, circuit) -> None:
        if circuit.graph != self.graph:
            raise ValueError(f"the circuit's graph {circuit.graph!r} is not this model's {self.graph!r}")
        if circuit.per_position and circuit.n_positions != self.n_positions:
            raise ValueError(f"per-position edges of {circuit.n_positions} positions; the prompts have {self.n_positions}")

    def _run(self, items) -> None:
        rows = self.batch_size or edge_rows_per_pass(self.model, self.graph, self.n_positions, self.logits_to_keep)
        per_pass = max(1, rows // self.n_prompts)
        other = self._other_values()
        chunks = [items[i : i + per_pass] for i in range(0, len(items), per_pass)]
        for chunk in tqdm(chunks, desc="edge circuit evaluation", disable=not self.progress, unit="pass"):
            replaced = torch.stack([self.graph.allowed & ~c.edges for _, c in chunk])
            values = run_edges(
                self.model, self.graph, self.clean, replaced, other, self.metric,
                labels=[f"a circuit of {c.n_edges} edges" for _, c in chunk], logits_to_keep=self.logits_to_keep,
            )
            self.forward_passes += 1
            self.rows += len(chunk) * self.n_prompts
            for (key, _), value in zip(chunk, values):
                self._value_cache[key] = value.item()


def edge_cpr_cmd(evaluator, scores, *, percentages: Sequence[float] = MIB_PERCENTAGES, per_position: bool | None = False,
                 label: str = "") -> FaithfulnessSummary:
    """MIB's CPR (signed-score edge circuits) and CMD (|score| circuits) of edge `scores`, in one batch."""
    start = time.perf_counter()
    template = empty_edge_circuit(scores, per_position=per_position)
    label = label or template.metadata.get("label", "")
    signed, absolute = _evaluate_curves(
        evaluator, template,
        [(edge_order(template, False), False, label), (edge_order(template, True), True, label)], percentages,
    )
    return FaithfulnessSummary(signed, absolute, time.perf_counter() - start)


def edge_random_baseline(evaluator, like, *, seeds=5, percentages: Sequence[float] = MIB_PERCENTAGES,
                         per_position: bool | None = False) -> RandomBaseline:
    """Curves of random edge orders (one per seed) over the edges of `like` (scores or an EdgeCircuit)."""
    start = time.perf_counter()
    seeds = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    template = empty_edge_circuit(like, per_position=per_position)
    orders = [
        (torch.randperm(template.n_total, generator=torch.Generator().manual_seed(seed)), False, f"random seed {seed}")
        for seed in seeds
    ]
    return RandomBaseline(_evaluate_curves(evaluator, template, orders, percentages), seeds, time.perf_counter() - start)
