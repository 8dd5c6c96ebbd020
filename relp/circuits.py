"""Circuits: sets of nodes picked out of a score map (their MIB JSON form: :mod:`relp.mib`).

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
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from relp.components import COMPONENTS, check_component_names
from relp.results import PatchingResult

RESIDUAL_COMPONENTS = ("resid_pre", "resid_mid", "resid_post")
_OVERLAPS = (("head", "attn_out"), ("neuron", "mlp_out"))


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


def check_one_selection(count, percent, threshold) -> None:
    """A clear error unless exactly one of count=, percent= and threshold= is given."""
    given = {k: v for k, v in (("count", count), ("percent", percent), ("threshold", threshold)) if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of count=, percent= or threshold=; got {sorted(given) or 'none'}")


def selection_size(count, percent, threshold, n_total: int, members: str = "scored nodes") -> tuple[int | None, dict]:
    """(n, selection) for a selection of one of `count`, `percent`, `threshold` (checked, see
    :func:`check_one_selection`) among `n_total` `members`: n is the number of top members (None for a
    threshold), selection what is recorded (``{"count": n}``, ``{"percent": p}``, ``{"threshold": t}``)."""
    check_one_selection(count, percent, threshold)
    if threshold is not None:
        threshold = float(threshold)
        if math.isnan(threshold):
            raise ValueError("threshold must be a number; got NaN")
        return None, {"threshold": threshold}
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
            raise TypeError(f"count must be an integer; got {count!r}")
        if not 0 <= count <= n_total:
            raise ValueError(f"count must be in [0, {n_total}] (the number of {members}); got {count}")
        return int(count), {"count": int(count)}
    return count_for_percent(percent, n_total), {"percent": float(percent)}


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
    check_one_selection(count, percent, threshold)
    if isinstance(components, str):
        components = [components]
    source = _node_source(scores, components, None if isinstance(scores, Circuit) else per_position)
    if not source.scores:
        raise ValueError("empty score map: no components to select nodes from")
    template = _circuit_template(source)
    flat = torch.cat([s.reshape(-1) for s in source.scores.values()])
    n_total = flat.numel()
    n, selection = selection_size(count, percent, threshold, n_total)
    if n is None:
        key = flat.abs() if absolute else flat
        mask = key >= selection["threshold"]
    else:
        mask = torch.zeros(n_total, dtype=torch.bool)
        mask[node_order(source.scores, absolute)[:n]] = True
    selection["absolute"] = bool(absolute)
    return template.from_flat(mask, selection=selection)


# ----------------------------------------------------------------------------------------------
# Node names


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
