"""relp.plotting.plot_circuit_graph: one line per drawn edge, nodes labelled, max_edges, empty circuits."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from _prompt_pairs import changed_at_2_and_4  # noqa: E402
from matplotlib.patches import PathPatch  # noqa: E402

from relp.edges import EdgeCircuit, EdgeGraph, edge_attribution, select_edges  # noqa: E402
from relp.plotting import plot_circuit_graph  # noqa: E402
from relp.testing import tiny_model  # noqa: E402

# a hand-made circuit on 2 layers x 2 heads; a0.h1 is on none of its edges
EDGES = {"input->a0.h0<q>": 0.5, "a0.h0->a1.h1<k>": -2.0, "m0->a1.h0<v>": 0.25, "a1.h1->logits": -0.125, "m1->logits": 3.0}
NODES = {"input", "a0.h0", "m0", "a1.h0", "a1.h1", "m1", "logits"}
ALL_NODES = NODES | {"a0.h1"}


def make_circuit(edges: dict[str, float], graph: EdgeGraph | None = None, scores: bool = True, **metadata) -> EdgeCircuit:
    graph = graph or EdgeGraph(2, 2)
    mask = torch.zeros_like(graph.allowed)
    values = torch.zeros(graph.allowed.shape, dtype=torch.float64)
    for name, score in edges.items():
        s, r = graph.edge_index(name)
        mask[s, r] = True
        values[s, r] = score
    return EdgeCircuit(graph, mask, values if scores else None, metadata)


def edge_patches(fig) -> dict[str, PathPatch]:
    patches = [p for p in fig.axes[0].patches if isinstance(p, PathPatch)]
    by_name = {p.get_gid(): p for p in patches}
    assert len(by_name) == len(patches)  # one patch per edge, no duplicates
    return by_name


def node_labels(fig) -> set[str]:
    return {t.get_text() for t in fig.axes[0].texts if (t.get_gid() or "").startswith("node:")}


def test_one_line_per_edge_and_a_label_per_node():
    fig = plot_circuit_graph(make_circuit(EDGES, label="RelP", metric="logit_diff"))
    patches = edge_patches(fig)
    assert set(patches) == set(EDGES)
    assert node_labels(fig) == NODES
    assert len(fig.axes) == 2  # the graph and its colour bar
    assert "RelP edge score (Δ logit_diff)" == fig.axes[1].get_ylabel()
    assert fig.axes[1].get_ylim() == pytest.approx((-3.0, 3.0))
    # width grows with |score|; colour: red for positive, blue for negative scores
    widths = {name: p.get_linewidth() for name, p in patches.items()}
    assert sorted(widths, key=widths.get) == ["a1.h1->logits", "m0->a1.h0<v>", "input->a0.h0<q>", "a0.h0->a1.h1<k>", "m1->logits"]
    red, _, blue, _ = patches["m1->logits"].get_edgecolor()
    assert red > blue
    red, _, blue, _ = patches["a0.h0->a1.h1<k>"].get_edgecolor()
    assert blue > red
    # receiver kinds differ in line style: q solid, k dashed, v dotted
    styles = {name: p.get_linestyle() for name, p in patches.items()}
    assert styles["input->a0.h0<q>"] == "-" and styles["a0.h0->a1.h1<k>"] == "--" and styles["m0->a1.h0<v>"] == ":"
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["query (box left)", "key (box middle)", "value (box right)", "logits"]
    fig.savefig(io.BytesIO(), format="png")


def test_show_all_nodes_and_max_edges():
    fig = plot_circuit_graph(make_circuit(EDGES), show_all_nodes=True)
    assert node_labels(fig) == ALL_NODES
    fig = plot_circuit_graph(make_circuit(EDGES), max_edges=2)
    assert set(edge_patches(fig)) == {"m1->logits", "a0.h0->a1.h1<k>"}  # |score| 3 and 2
    assert node_labels(fig) == {"input", "a0.h0", "a1.h1", "m1", "logits"}
    assert "2 of 5 edges" in fig.axes[0].get_title()
    assert len(edge_patches(plot_circuit_graph(make_circuit(EDGES), max_edges=10))) == 5
    with pytest.raises(ValueError, match="max_edges must be a non-negative integer"):
        plot_circuit_graph(make_circuit(EDGES), max_edges=-1)
    with pytest.raises(TypeError, match="EdgeCircuit; got dict"):
        plot_circuit_graph(EDGES)


def test_circuit_without_scores_is_uniform():
    fig = plot_circuit_graph(make_circuit(EDGES, scores=False))
    patches = edge_patches(fig)
    assert len(patches) == 5
    assert len({p.get_linewidth() for p in patches.values()}) == 1
    assert len({p.get_edgecolor() for p in patches.values()}) == 1
    assert len(fig.axes) == 1  # no colour bar
    assert "no scores" in fig.axes[0].get_title()


def test_empty_circuit_says_so():
    for circuit in (make_circuit({}), make_circuit(EDGES)):
        fig = plot_circuit_graph(circuit, max_edges=0 if circuit.n_edges else None)
        assert edge_patches(fig) == {}
        assert node_labels(fig) == {"input", "logits"}
        assert "empty circuit: no edges to draw" in [t.get_text() for t in fig.axes[0].texts]
    fig = plot_circuit_graph(make_circuit({}), show_all_nodes=True)
    assert node_labels(fig) == ALL_NODES


def test_grouped_key_value_edges_enter_the_groups_first_query_head():
    graph = EdgeGraph(1, 4, n_kv_heads=2)  # key/value head 1 serves query heads 2 and 3
    fig = plot_circuit_graph(make_circuit({"input->a0.h1<k>": 1.0, "a0.h3->logits": -1.0}, graph))
    assert set(edge_patches(fig)) == {"input->a0.h1<k>", "a0.h3->logits"}
    assert node_labels(fig) == {"input", "a0.h2", "a0.h3", "logits"}


def test_per_position_circuit_sums_scores_where_the_edge_is_in():
    graph = EdgeGraph(1, 2)
    s, r = graph.edge_index("a0.h1->logits")
    mask = torch.zeros(3, *graph.allowed.shape, dtype=torch.bool)
    scores = torch.zeros(3, *graph.allowed.shape, dtype=torch.float64)
    mask[[0, 2], s, r] = True
    scores[:, s, r] = torch.tensor([1.0, 100.0, 2.0])  # position 1 is not in the circuit
    fig = plot_circuit_graph(EdgeCircuit(graph, mask, scores))
    assert set(edge_patches(fig)) == {"a0.h1->logits"}
    assert fig.axes[1].get_ylim() == pytest.approx((-3.0, 3.0))
    assert "summed over positions" in fig.axes[0].get_title()


def test_tiny_llama_circuit(tmp_path):
    model = tiny_model("llama")
    clean, corrupted, metric = changed_at_2_and_4(model, n_prompts=2)
    scores = edge_attribution(model, clean, corrupted, metric, method="relp")
    circuit = select_edges(scores, count=15, absolute=True)
    fig = plot_circuit_graph(circuit, path=tmp_path / "graph.png")
    assert set(edge_patches(fig)) == set(circuit.edge_names())
    assert (tmp_path / "graph.png").stat().st_size > 0
