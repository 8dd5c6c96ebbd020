"""Circuits: sets of nodes picked out of a score map, and their MIB JSON form.

Nodes
-----
A *node* is one scored cell of a component (see :mod:`relp.components`), either per position or
summed over positions:

==============  ==========================  ==========================  ===========================
component       per_position=True           per_position=False          MIB-style name
==============  ==========================  ==========================  ===========================
head            (layer, head, position)     (layer, head)               ``a{l}.h{h}``
mlp_out         (layer, position)           (layer)                     ``m{l}``
attn_out        (layer, position)           (layer)                     ``a{l}`` (whole attention)
neuron          (layer, position, neuron)   (layer, neuron)             ``m{l}.n{i}`` (MLP unit i)
resid_pre/...   (layer, position)           (layer)                     ``resid_pre.{l}``
==============  ==========================  ==========================  ===========================

Per-position names get a suffix ``@{position}`` (``m3@7``). Only ``a{l}.h{h}`` and ``m{l}`` are MIB
node names; the others are relp's extensions of the same scheme.

A summed node's score is the sum of its cells' scores over positions. For attribution and relevance
patching that is exactly their linear estimate of patching the whole node at every position; for
activation patching it is the sum of the single-position effects.

Overlapping node types are refused: ``head`` with ``attn_out`` (heads make up the attention output),
``neuron`` with ``mlp_out``, and a residual-stream component (``resid_pre``, ``resid_mid``,
``resid_post``) with any other component, since the stream at a layer holds every earlier output.
A circuit over one residual component is allowed: ablating its nodes replaces the stream at those
(layer, position) cells, in layer order (see :mod:`relp.faithfulness`).

Selection
---------
:func:`select_circuit` takes the top ``count`` nodes, the top ``percent`` of them (``int(percent / 100 *
n_nodes)`` nodes, as MIB counts them), or every node whose score is at least ``threshold``; by signed
score (default) or by absolute score (``absolute=True``). Ties keep the node order (components in the
given order, then C order of the node axes), so a selection is deterministic.

MIB JSON
--------
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

import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from relp.components import COMPONENTS, check_component_names

RESIDUAL_COMPONENTS = ("resid_pre", "resid_mid", "resid_post")
_OVERLAPS = (("head", "attn_out"), ("neuron", "mlp_out"))
FORMAT = "relp.Circuit/1"


# ----------------------------------------------------------------------------------------------
# Node spaces


def node_axes(component: str, per_position: bool = True) -> tuple[str, ...]:
    """Axes of one component's node tensor: its score axes, without ``position`` when summed."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected names from {sorted(COMPONENTS)}")
    return COMPONENTS[component].node_axes(per_position)


def check_node_components(components: Sequence[str]) -> None:
    """A clear error for unknown, repeated or overlapping node types (see the module docstring)."""
    components = list(components)
    check_component_names(components)
    residual = [c for c in components if c in RESIDUAL_COMPONENTS]
    if residual and len(components) > 1:
        raise ValueError(
            f"circuit nodes {components} mix the residual stream ({residual}) with other components; the "
            "stream at a layer contains every earlier output, so the ablation sets would overlap. Use one "
            "residual component alone, or attn_out/mlp_out/head/neuron nodes"
        )
    for a, b in _OVERLAPS:
        if a in components and b in components:
            raise ValueError(
                f"circuit nodes {components} mix {a!r} and {b!r}, which overlap ({b} is made of the {a}s); "
                f"choose one of them"
            )


@dataclass(frozen=True)
class _Source:
    """Node scores with the facts needed to make circuits from them."""

    scores: dict[str, torch.Tensor]
    per_position: bool
    layers: tuple[int, ...]
    metadata: dict


def _as_score_tensors(source) -> tuple[dict[str, torch.Tensor], tuple[int, ...] | None, dict, int | None]:
    from relp.results import PatchingResult

    if isinstance(source, PatchingResult):
        meta = {"method": source.method, "label": source.label, "metric": source.metric, "model": source.model}
        return dict(source.scores), tuple(source.layers) or None, meta, source.metadata.get("n_prompts")
    if isinstance(source, Mapping):
        return {str(k): torch.as_tensor(v) for k, v in source.items()}, None, {}, None
    raise TypeError(
        f"scores must be a PatchingResult, a list of them, a Circuit or a mapping component -> tensor; got "
        f"{type(source).__name__}"
    )


def _node_source(source, components=None, per_position: bool = True) -> _Source:
    """Node scores (float64, CPU) from a result, a list of results (pooled), a mapping or a Circuit."""
    if isinstance(source, Circuit):
        if source.scores is None:
            raise ValueError(f"{source!r} carries no scores to rank nodes by")
        if per_position != source.per_position and per_position is not None:
            raise ValueError(
                f"the circuit's scores are {'per position' if source.per_position else 'summed over positions'}; "
                f"got per_position={per_position}"
            )
        scores = {c: s for c, s in source.scores.items() if components is None or c in components}
        return _Source(scores, source.per_position, source.layers, dict(source.metadata))
    if per_position is None:
        per_position = True
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    if not sources:
        raise ValueError("empty score map: no results given")
    parts = [_as_score_tensors(s) for s in sources]
    if isinstance(components, str):
        components = [components]
    chosen = list(components) if components is not None else list(parts[0][0])
    if not chosen:
        raise ValueError("empty score map: no components to select nodes from")
    check_node_components(chosen)
    pooled: dict[str, torch.Tensor] = {}
    weights = [n if n else 1 for *_, n in parts]
    layers = parts[0][1]
    for i, (scores, these_layers, _, _) in enumerate(parts):
        if these_layers != layers:
            raise ValueError(f"cannot pool scores of layers {these_layers} with scores of layers {layers}")
        missing = [c for c in chosen if c not in scores]
        if missing:
            raise ValueError(f"no scores for {missing}; this score map has {list(scores)}")
        for component in chosen:
            tensor = scores[component].detach().to("cpu", torch.float64)
            expected = len(COMPONENTS[component].axes)
            if tensor.ndim != expected:
                raise ValueError(
                    f"{component} scores must have axes {COMPONENTS[component].axes}; got shape {tuple(tensor.shape)}"
                )
            if tensor.numel() == 0:
                raise ValueError(f"empty score map: {component} scores have shape {tuple(tensor.shape)}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{component} scores contain NaN or infinite values")
            if not per_position:
                tensor = tensor.sum(dim=COMPONENTS[component].axes.index("position"))
            if component in pooled and pooled[component].shape != tensor.shape:
                raise ValueError(
                    f"cannot pool {component} scores of shapes {tuple(pooled[component].shape)} and "
                    f"{tuple(tensor.shape)} (per-position scores of prompts of different lengths); use "
                    "per_position=False or prompts of one layout"
                )
            pooled[component] = pooled.get(component, 0) + weights[i] * tensor
    total = float(sum(weights))
    pooled = {c: t / total for c, t in pooled.items()}
    n_layers = {t.shape[0] for t in pooled.values()}
    if len(n_layers) != 1:
        raise ValueError(f"components have different numbers of layers: { {c: t.shape[0] for c, t in pooled.items()} }")
    layers = layers or tuple(range(n_layers.pop()))
    meta = dict(parts[0][2])
    if len(parts) > 1:
        meta["pooled"] = len(parts)
    return _Source(pooled, bool(per_position), tuple(layers), meta)


def node_scores(scores, components: str | Iterable[str] | None = None, *, per_position: bool = True) -> dict[str, torch.Tensor]:
    """Node scores (float64) per component from a PatchingResult, a list of them or a mapping.

    A list of results (e.g. one per layout batch) is pooled as the mean weighted by each result's
    number of prompts: the change of the metric averaged over all prompts. Per-position scores can only
    be pooled when the prompts have one length; ``per_position=False`` sums each component over its
    position axis first (node axes: see :func:`node_axes`).
    """
    return _node_source(scores, components, per_position).scores


# ----------------------------------------------------------------------------------------------
# Circuits


@dataclass
class Circuit:
    """A set of nodes: a boolean mask per component over its node axes (see :func:`node_axes`).

    ``nodes["head"]`` is [layer, head, position] (per position) or [layer, head] (summed); ``True``
    means the node is in the circuit. ``layers`` are the model layers of axis 0. ``scores`` (optional)
    are the node scores the circuit was selected from, with the same shapes.
    """

    nodes: dict[str, torch.Tensor]
    per_position: bool = True
    layers: tuple[int, ...] = ()
    scores: dict[str, torch.Tensor] | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.nodes:
            raise ValueError("a circuit needs at least one component")
        check_node_components(list(self.nodes))
        self.nodes = {c: torch.as_tensor(m).detach().to("cpu", torch.bool) for c, m in self.nodes.items()}
        for component, mask in self.nodes.items():
            axes = node_axes(component, self.per_position)
            if mask.ndim != len(axes):
                raise ValueError(
                    f"{component} node mask must have axes {axes} "
                    f"({'per position' if self.per_position else 'summed over positions'}); got shape {tuple(mask.shape)}"
                )
            if mask.numel() == 0:
                raise ValueError(f"{component} node mask is empty (shape {tuple(mask.shape)})")
        n_layers = {m.shape[0] for m in self.nodes.values()}
        if len(n_layers) != 1:
            raise ValueError(f"components have different numbers of layers: { {c: m.shape[0] for c, m in self.nodes.items()} }")
        n_layers = n_layers.pop()
        self.layers = tuple(int(layer) for layer in self.layers) or tuple(range(n_layers))
        if len(self.layers) != n_layers:
            raise ValueError(f"layers {self.layers} do not match the {n_layers} layers of the node masks")
        if self.scores is not None:
            self.scores = {c: torch.as_tensor(s).detach().to("cpu", torch.float64) for c, s in self.scores.items()}
            if set(self.scores) != set(self.nodes) or any(self.scores[c].shape != m.shape for c, m in self.nodes.items()):
                raise ValueError(
                    f"scores { {c: tuple(s.shape) for c, s in self.scores.items()} } do not match the node masks "
                    f"{ {c: tuple(m.shape) for c, m in self.nodes.items()} }"
                )

    # --- sizes ---
    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.nodes)

    @property
    def n_nodes(self) -> int:
        """Number of nodes in the circuit."""
        return int(sum(m.sum().item() for m in self.nodes.values()))

    @property
    def n_total(self) -> int:
        """Number of nodes in the node space (the circuit's and the ablated ones)."""
        return int(sum(m.numel() for m in self.nodes.values()))

    @property
    def fraction(self) -> float:
        return self.n_nodes / self.n_total

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {c: tuple(m.shape) for c, m in self.nodes.items()}

    def space_key(self) -> tuple:
        """What defines the node space (and so the empty and the full circuit)."""
        return (tuple(self.shapes().items()), self.per_position, self.layers)

    def mask_key(self) -> bytes:
        return b"".join(np.packbits(m.numpy().ravel()).tobytes() + b"|" for m in self.nodes.values())

    # --- derived circuits ---
    def _with(self, nodes: dict[str, torch.Tensor], **metadata) -> "Circuit":
        return Circuit(nodes, self.per_position, self.layers, self.scores, {**self.metadata, **metadata})

    def complement(self) -> "Circuit":
        """The nodes of the space that are not in this circuit."""
        return self._with({c: ~m for c, m in self.nodes.items()}, complement=True)

    def full(self) -> "Circuit":
        """Every node of this circuit's space (the full model M)."""
        return self._with({c: torch.ones_like(m) for c, m in self.nodes.items()})

    def empty(self) -> "Circuit":
        """No node of this circuit's space (every scored node ablated)."""
        return self._with({c: torch.zeros_like(m) for c, m in self.nodes.items()})

    def flat(self) -> torch.Tensor:
        """The node mask flattened in node order (components in order, C order within each)."""
        return torch.cat([m.reshape(-1) for m in self.nodes.values()])

    def from_flat(self, flat: torch.Tensor, **metadata) -> "Circuit":
        """A circuit of the same space from a flat mask in node order."""
        flat = torch.as_tensor(flat, dtype=torch.bool)
        if flat.shape != (self.n_total,):
            raise ValueError(f"flat mask must have {self.n_total} entries; got shape {tuple(flat.shape)}")
        nodes, start = {}, 0
        for component, mask in self.nodes.items():
            nodes[component] = flat[start : start + mask.numel()].reshape(mask.shape).clone()
            start += mask.numel()
        return self._with(nodes, **metadata)

    # --- names ---
    def node_names(self, *, in_graph_only: bool = True) -> list[str]:
        """Names of the circuit's nodes (all nodes with ``in_graph_only=False``), in node order."""
        names = []
        for component, mask in self.nodes.items():
            axes = node_axes(component, self.per_position)
            for index in _cells(mask.shape):
                if in_graph_only and not mask[index]:
                    continue
                names.append(node_name(component, dict(zip(axes, index)), self.layers))
        return names

    def __repr__(self) -> str:
        parts = ", ".join(f"{c} {int(m.sum())}/{m.numel()}" for c, m in self.nodes.items())
        where = "per position" if self.per_position else "summed over positions"
        label = f"{self.metadata['label']} " if self.metadata.get("label") else ""
        return (
            f"Circuit({label}{self.n_nodes} of {self.n_total} nodes ({100 * self.fraction:.3g}%): {parts}; {where}; "
            f"layers {self.layers[0]}..{self.layers[-1]})"
        )

    # --- JSON ---
    def to_mib_json(self, path=None, *, model=None, cfg: Mapping | None = None, edges: bool = False) -> dict:
        return to_mib_json(self, path, model=model, cfg=cfg, edges=edges)

    @classmethod
    def from_mib_json(cls, source) -> "Circuit":
        return from_mib_json(source)


def _cells(shape: Sequence[int]):
    """Every index of a tensor of `shape`, in C order."""
    return itertools.product(*map(range, shape))


def _check_percent(percent: float, what: str = "percent") -> float:
    try:
        value = float(percent)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number in [0, 100]; got {percent!r}") from None
    if not 0 <= value <= 100:
        raise ValueError(f"{what} must be in [0, 100] (a percentage of the scored nodes); got {percent}")
    return value


def count_for_percent(percent: float, n_total: int) -> int:
    """Number of nodes in the top `percent`% of `n_total`, counted as MIB does: ``int(percent/100 * n)``.

    A tolerance of 1e-9 keeps ``int(0.29 * 100)``-style rounding from dropping a node.
    """
    percent = _check_percent(percent)
    return min(n_total, int(math.floor(percent / 100 * n_total + 1e-9)))


def node_order(scores: Mapping[str, torch.Tensor], absolute: bool = False) -> torch.Tensor:
    """Flat node indices from the highest score down (ties: node order)."""
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores.values()])
    key = flat.abs() if absolute else flat
    return torch.sort(key, descending=True, stable=True).indices


def _circuit_template(source: _Source) -> Circuit:
    nodes = {c: torch.zeros(s.shape, dtype=torch.bool) for c, s in source.scores.items()}
    return Circuit(nodes, source.per_position, source.layers, source.scores, dict(source.metadata))


def empty_circuit(scores, components: str | Iterable[str] | None = None, *, per_position: bool = True) -> Circuit:
    """The empty circuit over the node space of `scores` (a PatchingResult, list of them, mapping or
    Circuit), carrying the node scores; ``.full()`` gives every node."""
    if isinstance(scores, Circuit):
        return scores.empty()
    if isinstance(components, str):
        components = [components]
    return _circuit_template(_node_source(scores, components, per_position))


def select_circuit(
    scores,
    *,
    count: int | None = None,
    percent: float | None = None,
    threshold: float | None = None,
    absolute: bool = False,
    components: str | Iterable[str] | None = None,
    per_position: bool = True,
) -> Circuit:
    """The circuit of the best-scoring nodes of `scores` (a PatchingResult, a list of them, a mapping
    component -> score tensor, or a Circuit carrying scores).

    Give exactly one of ``count`` (the top n nodes), ``percent`` (the top ``int(percent/100 * n_total)``
    nodes, percent in [0, 100]) or ``threshold`` (every node scoring at least this). ``absolute=True``
    ranks by |score|. ``components`` picks the node types (default: all in the score map);
    ``per_position=False`` sums scores over positions first.
    """
    given = {k: v for k, v in (("count", count), ("percent", percent), ("threshold", threshold)) if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of count=, percent= or threshold=; got {sorted(given) or 'none'}")
    if isinstance(components, str):
        components = [components]
    source = _node_source(scores, components, None if isinstance(scores, Circuit) else per_position)
    if not source.scores:
        raise ValueError("empty score map: no components to select nodes from")
    template = _circuit_template(source)
    flat = torch.cat([s.reshape(-1) for s in source.scores.values()])
    n_total = flat.numel()
    if threshold is not None:
        threshold = float(threshold)
        if math.isnan(threshold):
            raise ValueError("threshold must be a number; got NaN")
        key = flat.abs() if absolute else flat
        mask = key >= threshold
        selection = {"threshold": threshold}
    else:
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
                raise TypeError(f"count must be an integer; got {count!r}")
            if not 0 <= count <= n_total:
                raise ValueError(f"count must be in [0, {n_total}] (the number of scored nodes); got {count}")
            n = int(count)
            selection = {"count": n}
        else:
            n = count_for_percent(percent, n_total)
            selection = {"percent": float(percent)}
        mask = torch.zeros(n_total, dtype=torch.bool)
        mask[node_order(source.scores, absolute)[:n]] = True
    selection["absolute"] = bool(absolute)
    return template.from_flat(mask, selection=selection)


# ----------------------------------------------------------------------------------------------
# MIB JSON


_NAME = re.compile(
    r"^(?:(?P<head>a(?P<hl>\d+)\.h(?P<hh>\d+))|(?P<neuron>m(?P<nl>\d+)\.n(?P<nn>\d+))|(?P<mlp>m(?P<ml>\d+))"
    r"|(?P<attn>a(?P<al>\d+))|(?P<resid>(?P<rc>resid_pre|resid_mid|resid_post)\.(?P<rl>\d+)))(?:@(?P<pos>\d+))?$"
)


def node_name(component: str, index: Mapping[str, int], layers: Sequence[int] | None = None) -> str:
    """MIB-style name of a node; `index` maps node axes to indices (``layer`` is an index into
    `layers` when given)."""
    layer = int(index["layer"])
    if layers is not None:
        layer = layers[layer]
    if component == "head":
        name = f"a{layer}.h{index['head']}"
    elif component == "mlp_out":
        name = f"m{layer}"
    elif component == "attn_out":
        name = f"a{layer}"
    elif component == "neuron":
        name = f"m{layer}.n{index['neuron']}"
    elif component in RESIDUAL_COMPONENTS:
        name = f"{component}.{layer}"
    else:
        raise ValueError(f"unknown component {component!r}")
    return name + (f"@{index['position']}" if "position" in index else "")


def parse_node_name(name: str) -> tuple[str, dict[str, int]]:
    """(component, {axis: index}) of a node name; ``layer`` is the model layer."""
    match = _NAME.match(name)
    if not match:
        raise ValueError(
            f"unrecognised node name {name!r}; expected a{{l}}.h{{h}}, m{{l}}, a{{l}}, m{{l}}.n{{i}} or "
            "resid_pre.{l} (optionally with @{position})"
        )
    g = match.groupdict()
    if g["head"]:
        component, index = "head", {"layer": int(g["hl"]), "head": int(g["hh"])}
    elif g["neuron"]:
        component, index = "neuron", {"layer": int(g["nl"]), "neuron": int(g["nn"])}
    elif g["mlp"]:
        component, index = "mlp_out", {"layer": int(g["ml"])}
    elif g["attn"]:
        component, index = "attn_out", {"layer": int(g["al"])}
    else:
        component, index = g["rc"], {"layer": int(g["rl"])}
    if g["pos"] is not None:
        index["position"] = int(g["pos"])
    return component, index


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
