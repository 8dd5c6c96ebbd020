"""MIB's edge JSON: edge circuits out (relp.mib.to_mib_json) and in (from_mib_json(level="edges")).

Expected edge lists are typed out from MIB's Graph.from_model (hannamw/EAP-IG, src/eap/graph.py): per layer,
each upstream node into each head's q, k, v (parent-major), then the upstream nodes and the layer's heads
into its MLP, and every node into the logits last.
"""

from __future__ import annotations

import json

import pytest
import torch

from _prompt_pairs import changed_at_2_and_4

from relp.circuits import Circuit
from relp.edges import EdgeCircuit, EdgeGraph, edge_attribution
from relp.mib import from_mib_json, to_mib_json
from relp.testing import tiny_model

# MIB's edges of a 1-layer, 2-head sequential model, typed from Graph.from_model
ONE_LAYER_TWO_HEADS = [
    "input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>",
    "input->a0.h1<q>", "input->a0.h1<k>", "input->a0.h1<v>",
    "input->m0", "a0.h0->m0", "a0.h1->m0",
    "input->logits", "a0.h0->logits", "a0.h1->logits", "m0->logits",
]  # fmt: skip
# 2 layers, 1 head
TWO_LAYERS_ONE_HEAD = [
    "input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>",
    "input->m0", "a0.h0->m0",
    "input->a1.h0<q>", "input->a1.h0<k>", "input->a1.h0<v>",
    "a0.h0->a1.h0<q>", "a0.h0->a1.h0<k>", "a0.h0->a1.h0<v>",
    "m0->a1.h0<q>", "m0->a1.h0<k>", "m0->a1.h0<v>",
    "input->m1", "a0.h0->m1", "m0->m1", "a1.h0->m1",
    "input->logits", "a0.h0->logits", "m0->logits", "a1.h0->logits", "m1->logits",
]  # fmt: skip
# 1 layer, 2 heads, parallel attention and MLP: each parent's MLP edge follows its head edges; heads do not feed m0
ONE_LAYER_PARALLEL = [
    "input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>",
    "input->a0.h1<q>", "input->a0.h1<k>", "input->a0.h1<v>",
    "input->m0",
    "input->logits", "a0.h0->logits", "a0.h1->logits", "m0->logits",
]  # fmt: skip


def random_circuit(graph: EdgeGraph, seed: int = 0, p: float = 0.3, scores: torch.Tensor | None = None) -> EdgeCircuit:
    g = torch.Generator().manual_seed(seed)
    if scores is None:
        scores = torch.randn(graph.allowed.shape, generator=g, dtype=torch.float64) * graph.allowed
    edges = (torch.rand(graph.allowed.shape, generator=g) < p) & graph.allowed
    return EdgeCircuit(graph, edges, scores, {"label": "test", "selection": {"count": int(edges.sum())}})


def cell(graph: EdgeGraph, sender: str, receiver: str) -> tuple[int, int]:
    return graph.sender_index[sender], graph.receiver_index[receiver]


@pytest.mark.parametrize(
    "graph, expected",
    [
        (EdgeGraph(1, 2), ONE_LAYER_TWO_HEADS),
        (EdgeGraph(2, 1), TWO_LAYERS_ONE_HEAD),
        (EdgeGraph(1, 2, parallel_attn_mlp=True), ONE_LAYER_PARALLEL),
    ],
)
def test_edges_are_mibs_names_in_mibs_order(graph, expected):
    payload = to_mib_json(EdgeCircuit(graph, torch.zeros_like(graph.allowed)))
    assert list(payload["edges"]) == expected
    heads = [f"a{l}.h{h}" for l in range(graph.n_layers) for h in range(graph.n_heads)]
    assert set(payload["nodes"]) == {"input", "logits", *heads, *[f"m{l}" for l in range(graph.n_layers)]}
    assert list(payload["nodes"])[0] == "input" and list(payload["nodes"])[-1] == "logits"


def test_gqa_writes_key_value_edges_per_query_head():
    # 1 layer, 2 query heads sharing 1 key/value head: MIB still names <k>/<v> per query head
    graph = EdgeGraph(1, 2, n_kv_heads=1)
    edges = torch.zeros_like(graph.allowed)
    scores = torch.zeros(graph.allowed.shape, dtype=torch.float64)
    edges[cell(graph, "input", "a0.h0<k>")] = True
    scores[cell(graph, "input", "a0.h0<k>")] = 0.75
    scores[cell(graph, "input", "a0.h1<q>")] = -0.5
    payload = json.loads(json.dumps(to_mib_json(EdgeCircuit(graph, edges, scores))))
    assert list(payload["edges"]) == ONE_LAYER_TWO_HEADS
    assert payload["edges"]["input->a0.h0<k>"] == {"score": 0.75, "in_graph": True}
    assert payload["edges"]["input->a0.h1<k>"] == {"score": 0.75, "in_graph": True}
    assert payload["edges"]["input->a0.h1<q>"] == {"score": -0.5, "in_graph": False}
    assert payload["edges"]["input->a0.h0<v>"] == {"score": 0.0, "in_graph": False}
    assert payload["cfg"]["relp"]["n_key_value_heads"] == 1
    # both query heads of the group are on an in-graph edge
    assert {n for n, v in payload["nodes"].items() if v["in_graph"]} == {"input", "a0.h0", "a0.h1", "logits"}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_round_trip_is_exact(arch, tmp_path):
    model = tiny_model(arch)
    clean, corrupted, metric = changed_at_2_and_4(model, n_prompts=2)
    scores = edge_attribution(model, clean, corrupted, metric, method="relp")
    circuit = random_circuit(scores.graph, seed=1, scores=scores.scores.detach().double())
    path = tmp_path / "edges.json"
    payload = to_mib_json(circuit, path, model=model)
    back = from_mib_json(path)  # level=None: relp's edge format is read as edges
    assert isinstance(back, EdgeCircuit)
    assert back.graph == circuit.graph
    assert torch.equal(back.edges, circuit.edges)
    assert torch.equal(back.scores, circuit.scores)
    assert back.metadata["selection"] == circuit.metadata["selection"]
    assert payload["cfg"]["d_model"] == 32 and payload["cfg"]["n_heads"] == 4 and payload["cfg"]["n_layers"] == 2

    # MIB names its 110 edges per query head (2 layers, 4 heads): 12 + 5 + 72 + 10 + 11
    assert len(payload["edges"]) == 110
    # each relp key/value edge of a group of query heads is written once per query head of the group
    group = 1 if arch == "gpt2" else 2
    kv = torch.tensor([r.kind in "kv" for r in circuit.graph.receivers])
    expected = int(circuit.edges[:, ~kv].sum()) + group * int(circuit.edges[:, kv].sum())
    assert sum(v["in_graph"] for v in payload["edges"].values()) == expected
    # a node is in the graph exactly when it is an end of an in-graph edge (input and logits always)
    ends = {"input", "logits"}
    for name, entry in payload["edges"].items():
        if entry["in_graph"]:
            parent, child = name.split("->")
            ends |= {parent, child.split("<")[0]}
    assert {n for n, v in payload["nodes"].items() if v["in_graph"]} == ends
    if arch == "llama":  # 2 key/value heads: query heads 0, 1 -> group 0; 2, 3 -> group 1
        for h, g in [(0, 0), (1, 0), (2, 1), (3, 1)]:
            for kind in "kv":
                s, r = cell(circuit.graph, "m0", f"a1.h{g}<{kind}>")
                assert payload["edges"][f"m0->a1.h{h}<{kind}>"] == {
                    "score": circuit.scores[s, r].item(), "in_graph": bool(circuit.edges[s, r])}


def test_round_trip_without_scores():
    graph = EdgeGraph(2, 4, n_kv_heads=2)
    circuit = random_circuit(graph, seed=3)
    circuit = EdgeCircuit(graph, circuit.edges)
    back = from_mib_json(json.dumps(to_mib_json(circuit)))
    assert back.scores is None and torch.equal(back.edges, circuit.edges)


def plain_file(edges: dict[str, tuple[float, bool]], **cfg) -> dict:
    """A MIB file as MIB's Graph.to_json writes it (no relp section)."""
    return {
        "cfg": {"n_layers": 1, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8, **cfg},
        "nodes": {n: {"in_graph": True} for n in ["input", "a0.h0", "a0.h1", "m0", "logits"]},
        "edges": {name: {"score": score, "in_graph": in_graph} for name, (score, in_graph) in edges.items()},
    }


PLAIN_EDGES = {
    "input->a0.h0<q>": (0.5, True), "input->a0.h0<k>": (-0.25, False), "input->a0.h0<v>": (0.125, True),
    "input->a0.h1<q>": (1.0, False), "input->a0.h1<k>": (2.0, False), "input->a0.h1<v>": (-1.5, True),
    "input->m0": (3.0, True), "a0.h0->m0": (-3.0, False), "a0.h1->m0": (0.75, True),
    "input->logits": (0.0, False), "a0.h0->logits": (4.0, True), "a0.h1->logits": (-4.0, False), "m0->logits": (5.0, True),
}  # fmt: skip


def test_plain_mib_file_is_read_as_edges(tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(plain_file(PLAIN_EDGES)))
    circuit = from_mib_json(path, level="edges")
    assert circuit.graph == EdgeGraph(1, 2)
    assert sorted(circuit.edge_names()) == sorted(
        ["input->a0.h0<q>", "input->a0.h0<v>", "input->a0.h1<v>", "input->m0", "a0.h1->m0", "a0.h0->logits", "m0->logits"]
    )
    assert circuit.scores[cell(circuit.graph, "input", "a0.h0<k>")] == -0.25
    assert circuit.scores[cell(circuit.graph, "a0.h1", "m0")] == 0.75
    assert circuit.scores[cell(circuit.graph, "m0", "logits")] == 5.0
    assert circuit.scores[cell(circuit.graph, "a0.h1", "logits")] == -4.0
    assert circuit.metadata["cfg"]["d_model"] == 8
    # without level, a plain file keeps being read as a node circuit
    assert isinstance(from_mib_json(path), Circuit)


@pytest.mark.parametrize("key", ["n_key_value_heads", "n_kv_heads"])
def test_plain_gqa_file_sums_query_heads_into_their_key_value_head(key):
    circuit = from_mib_json(plain_file(PLAIN_EDGES | {"input->a0.h1<k>": (2.0, False), "input->a0.h1<v>": (-1.5, True)},
                                       **{key: 1}), level="edges")
    graph = circuit.graph
    assert (graph.n_heads, graph.n_kv_heads) == (2, 1)
    assert circuit.scores[cell(graph, "input", "a0.h0<k>")] == -0.25 + 2.0
    assert circuit.scores[cell(graph, "input", "a0.h0<v>")] == 0.125 - 1.5
    assert circuit.scores[cell(graph, "input", "a0.h1<q>")] == 1.0
    assert bool(circuit.edges[cell(graph, "input", "a0.h0<v>")]) and not circuit.edges[cell(graph, "input", "a0.h0<k>")]


def test_plain_gqa_file_whose_query_heads_disagree_is_refused():
    edges = PLAIN_EDGES | {"input->a0.h1<v>": (-1.5, False)}  # a0.h0<v> is in the graph, a0.h1<v> is not
    with pytest.raises(ValueError, match=r"input->a0\.h1<v>.*input->a0\.h0<v>.*disagree"):
        from_mib_json(plain_file(edges, n_key_value_heads=1), level="edges")


def test_per_position_edge_circuit_is_refused():
    graph = EdgeGraph(1, 2)
    circuit = EdgeCircuit(graph, torch.zeros(3, *graph.allowed.shape, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"per position \(3 positions\).*per_position=False"):
        to_mib_json(circuit)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"drop": "a0.h1->m0"}, r"lacks 1 of the graph's 13 MIB edges.*a0\.h1->m0"),
        ({"add": "input->a0.h0"}, r"not MIB edge names.*'input->a0\.h0'"),
        ({"add": "a0.h0->a0.h1<q>"}, r"not edges.*a0\.h0 does not write before a0\.h1 reads"),
        ({"add": "a3.h0->logits"}, r"outside the cfg's graph.*'a3\.h0->logits'"),
        ({"add": "input->a0.h0<x>"}, r"not MIB edge names"),
    ],
)
def test_bad_edge_files_are_refused(change, message):
    payload = plain_file(PLAIN_EDGES)
    if "drop" in change:
        del payload["edges"][change["drop"]]
    else:
        payload["edges"][change["add"]] = {"score": 1.0, "in_graph": True}
    with pytest.raises(ValueError, match=message):
        from_mib_json(payload, level="edges")


def test_levels_that_do_not_fit_the_file_are_refused():
    nodes_only = {k: v for k, v in plain_file(PLAIN_EDGES).items() if k != "edges"}
    with pytest.raises(ValueError, match="needs MIB's 'edges'"):
        from_mib_json(nodes_only, level="edges")
    edge_file = to_mib_json(EdgeCircuit(EdgeGraph(1, 2), torch.zeros(4, 8, dtype=torch.bool)))
    with pytest.raises(ValueError, match="level='edges'"):
        from_mib_json(edge_file, level="nodes")
    with pytest.raises(ValueError, match="level must be"):
        from_mib_json(edge_file, level="neurons")
