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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from relp.circuits import Circuit, _cells, node_axes, node_name, parse_node_name, select_circuit

FORMAT = "relp.Circuit/1"


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
    :func:`select_circuit`). `model` (or `cfg`) fills MIB's ``cfg``. See the module docstring for the
    layout, the names and ``edges``.
    """
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
    n_layers, n_heads = int(cfg["n_layers"]), int(cfg["n_heads"])
    parallel = bool(cfg.get("parallel_attn_mlp", False))
    edges: dict[str, dict] = {}

    def add(parent: str, child: str, qkv: str | None = None):
        name = f"{parent}->{child}" if qkv is None else f"{parent}->{child}<{qkv}>"
        edges[name] = {
            "score": float(scores.get(parent, 0.0)),
            "in_graph": bool(nodes[parent]["in_graph"] and nodes[child]["in_graph"]),
        }

    upstream = ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        mlp = f"m{layer}"
        for parent in upstream:
            for head in heads:
                for letter in "qkv":
                    add(parent, head, letter)
            if parallel:
                add(parent, mlp)
        if not parallel:
            for parent in upstream + heads:
                add(parent, mlp)
        upstream = upstream + heads + [mlp]
    for parent in upstream:
        add(parent, "logits")
    return edges


def from_mib_json(source) -> Circuit:
    """A Circuit from MIB JSON (a path, a JSON string or the parsed dictionary).

    Files written by :func:`to_mib_json` come back exactly (components, per-position layout, layers,
    scores, in_graph). A plain MIB file (no ``cfg["relp"]``) is read as heads + MLPs summed over
    positions, with scores when every such node has one.
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
