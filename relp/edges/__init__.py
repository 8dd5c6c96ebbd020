"""Edges: attribution, exact patching and circuits over the edges between model components.

* :mod:`relp.edges.graph`: :class:`EdgeGraph`, the senders (input, heads, MLPs), receivers (each head's
  query/key/value input, each MLP's input, the logits) and edges of a model;
* :mod:`relp.edges.attribution`: :func:`edge_attribution`, AtP/RelP/... scores of every edge from one
  forward and one backward pass, as :class:`EdgeScores`;
* :mod:`relp.edges.intervention`: runs with edges replaced, and :func:`edge_patching` (exact, the oracle);
* :mod:`relp.edges.methods`: :func:`score_edges`, every edge method behind one call, with estimate-then-verify
  (:func:`verify_edges`);
* :mod:`relp.edges.circuits`: :class:`EdgeCircuit`, :func:`select_edges` (top-n, threshold, greedy,
  pruning), :class:`EdgeCircuitEvaluator` and MIB's CPR/CMD for edge circuits.

MIB's edge JSON is read and written by :mod:`relp.mib`, circuit graphs are drawn by
:func:`relp.plotting.plot_circuit_graph`.
"""

from relp.edges.attribution import EDGE_METHODS, EdgeScores, edge_attribution
from relp.edges.circuits import (
    EdgeCircuit,
    EdgeCircuitEvaluator,
    edge_cpr_cmd,
    edge_order,
    edge_random_baseline,
    empty_edge_circuit,
    prune,
    select_edges,
)
from relp.edges.graph import EdgeGraph, Receiver
from relp.edges.intervention import edge_patching, run_edges, sender_values
from relp.edges.methods import EDGE_METHOD_KEYS, pool_edge_scores, score_edges, verify_edges

__all__ = [
    "EDGE_METHODS", "EDGE_METHOD_KEYS", "pool_edge_scores", "score_edges", "verify_edges", "EdgeCircuit", "EdgeCircuitEvaluator", "EdgeGraph", "EdgeScores", "Receiver", "edge_attribution",
    "edge_cpr_cmd", "edge_order", "edge_patching", "edge_random_baseline", "empty_edge_circuit", "prune", "run_edges",
    "select_edges", "sender_values",
]
