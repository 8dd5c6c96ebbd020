"""Every way relp scores edges, behind one call: :func:`score_edges` (used by the experiments).

* the gradient methods of :data:`relp.edges.attribution.EDGE_METHODS` (``atp``, ``relp``, ``gim``,
  ``relp_eps``, ``two_point``, ``two_point_relp``, ``ig_inputs``, ``ig_inputs_relp``);
* estimate-then-verify (``atp_verify``, ``verify`` (RelP + verify); the method study's best, :func:`relp.verify` for
  nodes): the estimate, then exact edge patching of its top ``k`` share of edges by |score|, whose
  estimates are replaced by the exact values (:func:`verify_edges`);
* exact edge patching of every edge (``ap``; one forward pass per edge: tiny models, or a chosen subset
  with :func:`relp.edges.edge_patching`).

Keys are those of the node-level registry (:mod:`relp.methods`), whose labels and colours plots use.
"""

from __future__ import annotations

import time

import torch

from relp.edges.attribution import EDGE_METHODS, EdgeScores, edge_attribution
from relp.edges.intervention import edge_patching

VERIFY_METHODS = {"atp_verify": "atp", "verify": "relp"}
#: every key :func:`score_edges` takes
EDGE_METHOD_KEYS = (*EDGE_METHODS, *VERIFY_METHODS, "ap")
DEFAULT_K = 0.005


def verify_edges(scores: EdgeScores, model, clean, corrupted, metric, *, k: float = DEFAULT_K, batch_size: int | None = None,
                 logits_to_keep: int | None = None, progress: bool = False) -> EdgeScores:
    """`scores` with its top ``k`` share of edges (by |score|, summed over positions) replaced by exact edge
    patching; ``metadata["verified"]`` is the bool [sender, receiver] mask of the patched edges."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"k must be a share of the edges in (0, 1]; got {k!r}")
    if scores.per_position:
        raise ValueError("verify_edges works on edge scores summed over positions (per_position=False)")
    start = time.perf_counter()
    graph = scores.graph
    n = max(1, int(round(k * graph.n_edges)))
    order = torch.sort(scores.flat().abs(), descending=True, stable=True).indices[:n]
    chosen = torch.zeros(graph.n_edges, dtype=torch.bool)
    chosen[order] = True
    mask = graph.unflat(chosen, fill=False)
    exact = edge_patching(model, clean, corrupted, metric, edges=mask, direction=scores.direction, batch_size=batch_size,
                          logits_to_keep=logits_to_keep, progress=progress, max_forward_passes=float("inf"))
    verified = torch.where(mask, exact.scores.to(scores.scores.dtype), scores.scores)
    cost = scores.metadata.get("forward_equivalents", 4.0) + exact.metadata["forward_equivalents"]
    return EdgeScores(
        graph=graph, scores=verified, method=f"{scores.method}_verify", metric=scores.metric, direction=scores.direction,
        rules=scores.rules, seconds=scores.seconds + time.perf_counter() - start, model=scores.model, tokens=scores.tokens,
        metadata={**scores.metadata, "verified": mask, "k": float(k), "n_verified": n, "forward_equivalents": cost},
    )


def score_edges(model, clean, corrupted, metric, method: str, *, rules=None, steps: int | None = None, k: float | None = None,
                batch_size: int | None = None, logits_to_keep: int | None = None, progress: bool = False) -> EdgeScores:
    """Edge scores by `method` (a key of :data:`EDGE_METHOD_KEYS`), summed over positions."""
    if method not in EDGE_METHOD_KEYS:
        raise ValueError(f"unknown edge method {method!r}; expected one of {list(EDGE_METHOD_KEYS)}")
    if method == "ap":
        return edge_patching(model, clean, corrupted, metric, batch_size=batch_size, logits_to_keep=logits_to_keep, progress=progress)
    base = VERIFY_METHODS.get(method, method)
    kind, default_rules = EDGE_METHODS[base]
    options = {} if steps is None else {"steps": steps}
    if rules is not None and default_rules is not None and base in ("relp", "two_point_relp", "ig_inputs_relp"):
        options["rules"] = rules
    scores = edge_attribution(model, clean, corrupted, metric, method=base, logits_to_keep=logits_to_keep, **options)
    if method in VERIFY_METHODS:
        scores = verify_edges(scores, model, clean, corrupted, metric, k=DEFAULT_K if k is None else k, batch_size=batch_size,
                              logits_to_keep=logits_to_keep, progress=progress)
    return scores


def pool_edge_scores(results: list[EdgeScores]) -> EdgeScores:
    """Scores of several batches (e.g. one per prompt layout) as one: the mean weighted by each batch's
    number of prompts (the metric's change averaged over all prompts), summed over positions."""
    if not results:
        raise ValueError("no edge scores to pool")
    graph = results[0].graph
    if any(r.graph != graph for r in results):
        raise ValueError("cannot pool edge scores of different graphs")
    weights = [r.metadata.get("n_prompts", 1) for r in results]
    total = sum(w * r.summed().double() for w, r in zip(weights, results)) / sum(weights)
    first = results[0]
    metadata = {
        "n_prompts": int(sum(weights)), "pooled": len(results),
        "forward_equivalents": sum(r.metadata.get("forward_equivalents", 0) for r in results),
    }
    return EdgeScores(graph, total, first.method, first.metric, first.direction, first.rules,
                      sum(r.seconds for r in results), first.model, first.tokens, metadata)
