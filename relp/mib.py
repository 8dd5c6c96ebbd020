"""Circuits in MIB's JSON layout: export (:func:`to_mib_json`) and import (:func:`from_mib_json`).

Node names are those of :mod:`relp.circuits` (:func:`~relp.circuits.node_name`,
:func:`~relp.circuits.parse_node_name`); only ``a{l}.h{h}`` and ``m{l}`` are MIB node names.

:func:`to_mib_json` writes MIB's circuit layout::

    {"cfg": {"n_layers": 30, "n_heads": 9, "parallel_attn_mlp": false, "d_model": 576, "relp": {...}},
     "nodes": {"input": {"in_graph": true}, "a0.h0": {"in_graph": false, "score": 0.01}, ...,
               "m29": {"in_graph": true, "score": 0.4}, "logits": {"in_graph": true}}}

``input`` and ``logits`` are always in the graph and have no score (MIB's convention for unscored
nodes: they stay in the graph). ``cfg["relp"]`` records what MIB's config cannot (components, whether
nodes are per position, the layers, the score shapes), so :func:`from_mib_json` restores the circuit
exactly; a plain MIB file without it is read as a heads + MLPs circuit summed over positions. For a
circuit over heads and/or MLPs summed over positions, the other MIB node type is written as unscored
and in the graph (relp never ablates it), and ``edges=True`` adds MIB's edge dictionary (which MIB's
``Graph.from_json`` requires): an edge is in the graph when both of its ends are, and its score is
the score of its sending node (``input``: 0).

Edge circuits (:class:`relp.edges.EdgeCircuit`) are written with MIB's full edge dictionary, in the
order of MIB's ``Graph.from_model`` (hannamw/EAP-IG, ``src/eap/graph.py``, which MIB's circuit track
loads with ``Graph.from_json``): for each layer, every upstream node (``input``, the earlier heads and
MLPs) into each of the layer's heads as ``<q>``, ``<k>``, ``<v>`` (parent-major), then every upstream
node and the layer's own heads into its MLP (with ``parallel_attn_mlp`` the MLP's edges follow each
parent's head edges and the layer's heads do not feed it), and every node into ``logits`` last::

    {"cfg": {..., "relp": {"format": "relp.EdgeCircuit/1", "n_key_value_heads": 2, "scores": true, ...}},
     "nodes": {"input": {"in_graph": true}, "a0.h0": {"in_graph": false}, ..., "logits": {"in_graph": true}},
     "edges": {"input->a0.h0<q>": {"score": 0.12, "in_graph": true}, ..., "m1->logits": {...}}}

A node is in the graph when it lies on an in-graph edge (``input`` and ``logits`` always are). MIB names
key and value edges per *query* head (its models run with grouped-query attention ungrouped); relp's
graph has one ``<k>``/``<v>`` receiver per key/value head, so each query head ``h`` of group ``g`` is
written with its group receiver's score and in_graph, and ``cfg["relp"]["n_key_value_heads"]`` says so.
Reading a file not written by relp, the per-query-head edges of a group must agree on in_graph and their
scores are summed into the group's receiver (the input gradient of a shared key/value head is the sum
of its query heads' gradients, so the sum is the score of the group edge).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from relp.circuits import Circuit, _cells, node_axes, node_name, parse_node_name, select_circuit
from relp.edges.circuits import EdgeCircuit
from relp.edges.graph import EdgeGraph

FORMAT = "relp.Circuit/1"
EDGE_FORMAT = "relp.EdgeCircuit/1"


def _mib_cfg(circuit: Circuit, model=None, cfg: Mapping | None = None) -> dict:
    out: dict = {}
    if model is not None:
        mcfg = model.cfg
        out = {
            "n_layers": int(mcfg.n_layers),
            "n_heads": int(mcfg.n_heads),
            "parallel_attn_mlp": bool(getattr(mcfg, "parallel_attn_mlp", False)),
            "d_model": int(mcfg.d_model),
        }
    elif circuit.metadata.get("cfg"):
        out = dict(circuit.metadata["cfg"])
    else:
        out = {"n_layers": max(circuit.layers) + 1}
        if "head" in circuit.nodes:
            out["n_heads"] = int(circuit.nodes["head"].shape[1])
        out["parallel_attn_mlp"] = False
    out.update(cfg or {})
    out.pop("relp", None)
    return out


def _is_mib_graph(circuit: Circuit, cfg: Mapping) -> bool:
    return (
        not circuit.per_position
        and set(circuit.components) <= {"head", "mlp_out"}
        and "n_heads" in cfg
        and circuit.layers == tuple(range(int(cfg["n_layers"])))
        and ("head" not in circuit.nodes or circuit.nodes["head"].shape[1] == int(cfg["n_heads"]))
    )


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, Mapping):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        if isinstance(value, (np.floating, np.integer)):
            return value.item()
        return str(value)


def to_mib_json(circuit, path=None, *, model=None, cfg: Mapping | None = None, edges: bool = False, **select) -> dict:
    """The circuit (with its scores, if any) as MIB's JSON dictionary; written to `path` when given.

    `circuit` is a Circuit, or scores (a PatchingResult, list of them, mapping) to export with every
    node in the graph (``select`` keywords such as ``per_position=False`` are passed to
    :func:`select_circuit`), or an :class:`~relp.edges.EdgeCircuit` summed over positions (written with
    MIB's every edge, its score and in_graph). `model` (or `cfg`) fills MIB's ``cfg`` (MIB's
    ``Graph.from_json`` needs ``d_model``). See the module docstring for the layout, the names and
    ``edges``.
    """
    if isinstance(circuit, EdgeCircuit):
        if edges or select:
            raise TypeError(
                f"edges= and selection keywords are for node circuits; an EdgeCircuit is written with all its edges "
                f"(got edges={edges!r}, {sorted(select)})"
            )
        return _edge_circuit_to_mib(circuit, path, model=model, cfg=cfg)
    if not isinstance(circuit, Circuit):
        circuit = select_circuit(circuit, percent=100, **select)
    mib_cfg = _mib_cfg(circuit, model, cfg)
    mib_graph = _is_mib_graph(circuit, mib_cfg)
    mib_cfg["relp"] = {
        "format": FORMAT,
        "components": list(circuit.components),
        "per_position": circuit.per_position,
        "layers": list(circuit.layers),
        "shapes": {c: list(s) for c, s in circuit.shapes().items()},
        "metadata": _jsonable(circuit.metadata),
    }
    nodes: dict[str, dict] = {"input": {"in_graph": True}}
    scored: dict[str, float] = {}
    for component, mask in circuit.nodes.items():
        axes = node_axes(component, circuit.per_position)
        scores = circuit.scores[component] if circuit.scores is not None else None
        for index in _cells(mask.shape):
            name = node_name(component, dict(zip(axes, index)), circuit.layers)
            entry = {"in_graph": bool(mask[index])}
            if scores is not None:
                entry["score"] = float(scores[index])
                scored[name] = entry["score"]
            nodes[name] = entry
    if mib_graph:  # the MIB node type that was not scored stays in the graph, unscored
        n_layers, n_heads = int(mib_cfg["n_layers"]), int(mib_cfg["n_heads"])
        ordered: dict[str, dict] = {"input": nodes["input"]}
        for layer in range(n_layers):
            for name in [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]:
                ordered[name] = nodes.get(name, {"in_graph": True})
        nodes = ordered
    nodes["logits"] = {"in_graph": True}
    payload = {"cfg": mib_cfg, "nodes": nodes}
    if edges:
        if not mib_graph:
            raise ValueError(
                "MIB edges exist only for circuits over heads and MLPs summed over positions, at every layer, "
                f"with the model's n_heads; this circuit has {list(circuit.components)}, "
                f"{'per position' if circuit.per_position else 'summed'}, layers {circuit.layers[0]}..{circuit.layers[-1]}"
            )
        payload["edges"] = _mib_edges(mib_cfg, nodes, scored)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))
    return payload


def _mib_edges(cfg: Mapping, nodes: Mapping[str, dict], scores: Mapping[str, float]) -> dict:
    """MIB's edges (same order as MIB's Graph.from_model): parent -> child, heads get <q>, <k>, <v>."""
    edges: dict[str, dict] = {}
    for name, parent, child, _ in _mib_edge_order(
        int(cfg["n_layers"]), int(cfg["n_heads"]), bool(cfg.get("parallel_attn_mlp", False))
    ):
        edges[name] = {
            "score": float(scores.get(parent, 0.0)),
            "in_graph": bool(nodes[parent]["in_graph"] and nodes[child]["in_graph"]),
        }
    return edges


def _mib_edge_order(n_layers: int, n_heads: int, parallel: bool) -> Iterator[tuple[str, str, str, str | None]]:
    """(name, parent, child node, q/k/v or None) of every MIB edge, in the order of MIB's
    ``Graph.from_model`` (hannamw/EAP-IG ``src/eap/graph.py``: per layer, ``for node in residual_stream:
    for attn_node in attn_nodes: for letter in 'qkv': add_edge(...)``, then the MLP's edges, then
    ``for node in residual_stream: add_edge(node, logit_node)``)."""
    upstream = ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        mlp = f"m{layer}"
        for parent in upstream:
            for head in heads:
                for letter in "qkv":
                    yield f"{parent}->{head}<{letter}>", parent, head, letter
            if parallel:
                yield f"{parent}->{mlp}", parent, mlp, None
        if not parallel:
            for parent in upstream + heads:
                yield f"{parent}->{mlp}", parent, mlp, None
        upstream = upstream + heads + [mlp]
    for parent in upstream:
        yield f"{parent}->logits", parent, "logits", None


def _mib_edge_cells(graph: EdgeGraph) -> dict[str, tuple[int, int]]:
    """MIB edge name -> (sender, receiver) of `graph`, in MIB's order. A key/value edge names a query
    head; on grouped-query attention it maps to its group's receiver (several names, one cell)."""
    group = graph.n_heads // graph.n_kv_heads
    cells = {}
    for name, parent, child, qkv in _mib_edge_order(graph.n_layers, graph.n_heads, graph.parallel_attn_mlp):
        if qkv is None:
            receiver = child
        else:
            layer, head = child[1:].split(".h")
            receiver = f"a{layer}.h{int(head) if qkv == 'q' else int(head) // group}<{qkv}>"
        cells[name] = (graph.sender_index[parent], graph.receiver_index[receiver])
    return cells


def _edge_circuit_to_mib(circuit: EdgeCircuit, path, *, model=None, cfg: Mapping | None = None) -> dict:
    graph = circuit.graph
    if circuit.per_position:
        raise ValueError(
            f"MIB edge circuits have no positions; this EdgeCircuit is per position ({circuit.n_positions} positions). "
            "Select it summed over positions, e.g. relp.edges.select_edges(scores, ..., per_position=False)"
        )
    mib_cfg = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": graph.parallel_attn_mlp}
    known = dict(circuit.metadata.get("cfg") or {})
    if model is not None:
        model_graph = EdgeGraph.from_model(model)
        if model_graph != graph:
            raise ValueError(f"the model's edge graph {model_graph!r} is not the circuit's {graph!r}")
        known["d_model"] = int(model.cfg.d_model)
    if "d_model" in known:
        mib_cfg["d_model"] = int(known["d_model"])
    mib_cfg.update(cfg or {})
    mib_cfg.pop("relp", None)
    given = (int(mib_cfg["n_layers"]), int(mib_cfg["n_heads"]), bool(mib_cfg["parallel_attn_mlp"]))
    if given != (graph.n_layers, graph.n_heads, graph.parallel_attn_mlp):
        raise ValueError(
            f"cfg gives n_layers, n_heads, parallel_attn_mlp = {given}; the circuit's graph has "
            f"{(graph.n_layers, graph.n_heads, graph.parallel_attn_mlp)}"
        )
    mib_cfg["relp"] = {
        "format": EDGE_FORMAT,
        "n_key_value_heads": graph.n_kv_heads,
        "kv_edges": "per query head, each with its key/value head's score and in_graph",
        "scores": circuit.scores is not None,
        "model_name": graph.model_name,
        "metadata": _jsonable({k: v for k, v in circuit.metadata.items() if k != "cfg"}),
    }
    mask = circuit.edges
    values = circuit.scores
    edges: dict[str, dict] = {}
    used = {"input", "logits"}
    for name, (s, r) in _mib_edge_cells(graph).items():
        in_graph = bool(mask[s, r])
        edges[name] = {"score": float(values[s, r]) if values is not None else 0.0, "in_graph": in_graph}
        if in_graph:
            parent, child = name.split("->")
            used |= {parent, child.partition("<")[0]}
    nodes = {name: {"in_graph": name in used} for name in (*graph.senders, "logits")}
    payload = {"cfg": mib_cfg, "nodes": nodes, "edges": edges}
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))
    return payload


_MIB_EDGE = re.compile(r"^(input|a\d+\.h\d+|m\d+)->(?:(a\d+\.h\d+)<([qkv])>|(m\d+|logits))$")


def _edge_circuit_from_mib(payload: Mapping) -> EdgeCircuit:
    cfg = payload["cfg"]
    if "edges" not in payload:
        raise ValueError("level='edges' needs MIB's 'edges' dictionary; this file has only " + ", ".join(sorted(payload)))
    info = cfg.get("relp") or {}
    from_relp = info.get("format") == EDGE_FORMAT
    missing_cfg = [k for k in ("n_layers", "n_heads") if k not in cfg]
    if missing_cfg:
        raise ValueError(f"MIB cfg lacks {missing_cfg}; it has {sorted(cfg)}")
    n_kv = info.get("n_key_value_heads") or cfg.get("n_key_value_heads") or cfg.get("n_kv_heads") or None
    graph = EdgeGraph(
        int(cfg["n_layers"]), int(cfg["n_heads"]), n_kv, parallel_attn_mlp=bool(cfg.get("parallel_attn_mlp", False)),
        model_name=str(info.get("model_name", "")),
    )
    cells = _mib_edge_cells(graph)
    given = payload["edges"]
    unknown = [name for name in given if name not in cells]
    if unknown:
        name = unknown[0]
        match = _MIB_EDGE.match(name)
        if match is None:
            raise ValueError(
                f"{len(unknown)} edge names are not MIB edge names, e.g. {name!r}; expected 'parent->child' with "
                "parents 'input', 'a{l}.h{h}', 'm{l}' and children 'a{l}.h{h}<q|k|v>', 'm{l}', 'logits'"
            )
        parent, head, _, other = match.groups()
        child = head or other
        if parent not in graph.sender_index or child not in {*graph.senders, "logits"}:
            raise ValueError(
                f"{len(unknown)} edges name nodes outside the cfg's graph ({graph.n_layers} layers, {graph.n_heads} heads), "
                f"e.g. {name!r}"
            )
        raise ValueError(f"{len(unknown)} entries are not edges of {graph!r}, e.g. {name!r}: {parent} does not write "
                         f"before {child} reads")
    missing = [name for name in cells if name not in given]
    if missing:
        raise ValueError(f"the file lacks {len(missing)} of the graph's {len(cells)} MIB edges, e.g. {missing[:3]}")
    edges = torch.zeros(graph.allowed.shape, dtype=torch.bool)
    scores = torch.zeros(graph.allowed.shape, dtype=torch.float64)
    first: dict[tuple[int, int], tuple[str, bool, float | None]] = {}
    has_scores = info.get("scores", True)
    for name, (s, r) in cells.items():
        entry = given[name]
        if isinstance(entry, Mapping):
            if "in_graph" not in entry:
                raise ValueError(f"edge {name!r} has no 'in_graph'; got {dict(entry)}")
            in_graph, score = bool(entry["in_graph"]), entry.get("score")
        else:  # a bare boolean, as MIB also writes for nodes
            in_graph, score = bool(entry), None
        score = None if score is None else float(score)
        has_scores = has_scores and score is not None
        if (s, r) not in first:
            first[(s, r)] = (name, in_graph, score)
            edges[s, r] = in_graph
            scores[s, r] = score if score is not None else 0.0
            continue
        # another query head of a grouped key/value head
        other, other_in_graph, other_score = first[(s, r)]
        receiver = graph.receivers[r].name
        if in_graph != other_in_graph:
            raise ValueError(
                f"{name!r} (in_graph={in_graph}) and {other!r} (in_graph={other_in_graph}) disagree: both are edges into "
                f"the key/value head receiver {receiver} shared by a group of {graph.n_heads // graph.n_kv_heads} "
                "query heads, which is in a circuit or out of it as one"
            )
        if from_relp:
            if score != other_score:
                raise ValueError(
                    f"{name!r} (score {score}) and {other!r} (score {other_score}) are copies of the key/value edge "
                    f"{graph.senders[s]}->{receiver} written by relp, but their scores differ"
                )
        elif score is not None:
            scores[s, r] += score
    metadata = dict(info.get("metadata") or {}) if from_relp else {}
    metadata["cfg"] = {k: v for k, v in cfg.items() if k != "relp"}
    return EdgeCircuit(graph, edges, scores if has_scores else None, metadata)


def from_mib_json(source, level: str | None = None) -> Circuit | EdgeCircuit:
    """A Circuit (``level="nodes"``) or an EdgeCircuit (``level="edges"``) from MIB JSON (a path, a JSON
    string or the parsed dictionary); ``level=None`` reads edges from files :func:`to_mib_json` wrote
    from an EdgeCircuit and nodes from any other file.

    Files written by :func:`to_mib_json` come back exactly (components, per-position layout, layers,
    scores, in_graph; for edges the graph, scores, in_graph and metadata). A plain MIB file (no
    ``cfg["relp"]``) is read as heads + MLPs summed over positions, with scores when every such node
    has one; with ``level="edges"``, as MIB's edges (every edge of the cfg's graph must be there),
    with scores when every edge has one. Its key/value heads are ``cfg["n_key_value_heads"]`` (or
    ``n_kv_heads``) when given, else one per head; see the module docstring for grouped heads.
    """
    if isinstance(source, Mapping):
        payload = source
    else:
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        payload = json.loads(text)
    if "cfg" not in payload or "nodes" not in payload:
        raise ValueError(f"not MIB circuit JSON: expected keys 'cfg' and 'nodes'; got {sorted(payload)}")
    cfg, nodes = payload["cfg"], payload["nodes"]
    info = cfg.get("relp")
    edge_file = info is not None and info.get("format") == EDGE_FORMAT
    if level is None:
        level = "edges" if edge_file else "nodes"
    if level == "edges":
        return _edge_circuit_from_mib(payload)
    if level != "nodes":
        raise ValueError(f"level must be 'nodes', 'edges' or None (from the file); got {level!r}")
    if edge_file:
        raise ValueError("this file holds a relp EdgeCircuit; read it with level='edges' (or level=None)")
    if info is not None:
        components = list(info["components"])
        per_position = bool(info["per_position"])
        layers = tuple(info["layers"])
        shapes = {c: tuple(s) for c, s in info["shapes"].items()}
        metadata = dict(info.get("metadata") or {})
    else:
        n_layers, n_heads = int(cfg["n_layers"]), int(cfg["n_heads"])
        components, per_position, layers = ["head", "mlp_out"], False, tuple(range(n_layers))
        shapes = {"head": (n_layers, n_heads), "mlp_out": (n_layers,)}
        metadata = {}
    metadata["cfg"] = {k: v for k, v in cfg.items() if k != "relp"}
    layer_index = {layer: i for i, layer in enumerate(layers)}
    masks = {c: torch.zeros(shapes[c], dtype=torch.bool) for c in components}
    scores = {c: torch.full(shapes[c], float("nan"), dtype=torch.float64) for c in components}
    seen = {c: torch.zeros(shapes[c], dtype=torch.bool) for c in components}
    for name, entry in nodes.items():
        if name in ("input", "logits"):
            continue
        component, index = parse_node_name(name)
        if component not in masks:
            if info is None:
                raise ValueError(f"node {name!r} is not a head or an MLP; plain MIB files hold only those")
            continue  # an unscored MIB node written for completeness
        if ("position" in index) != per_position:
            raise ValueError(f"node {name!r} does not match the file's per_position={per_position}")
        if index["layer"] not in layer_index:
            raise ValueError(f"node {name!r} is at a layer outside the file's layers {layers}")
        index["layer"] = layer_index[index["layer"]]
        cell = tuple(index[a] for a in node_axes(component, per_position))
        if any(not 0 <= i < n for i, n in zip(cell, shapes[component])):
            raise ValueError(f"node {name!r} is outside the {component} shape {shapes[component]}")
        in_graph = entry["in_graph"] if isinstance(entry, Mapping) else entry  # MIB also writes bare booleans
        masks[component][cell] = bool(in_graph)
        seen[component][cell] = True
        if isinstance(entry, Mapping) and entry.get("score") is not None:
            scores[component][cell] = float(entry["score"])
    missing = [c for c, s in seen.items() if not s.all()]
    if missing and info is not None:
        raise ValueError(f"the file lacks some {missing} nodes its cfg['relp'] shapes promise")
    for component in missing:  # plain MIB file without some nodes: they were never ablated
        masks[component] |= ~seen[component]
    has_scores = all(torch.isfinite(s).all() for s in scores.values())
    return Circuit(masks, per_position, layers, scores if has_scores else None, metadata)
