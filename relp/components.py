"""What can be scored: a small vocabulary of component types, mapped to hook names in one place.

=============  ==============================  ===================  ===============================
component      hook (per layer)                activation shape     score axes
=============  ==============================  ===================  ===============================
resid_pre      blocks.{l}.hook_resid_pre       [batch, pos, d]      (layer, position)
resid_mid      resid_pre + attn_out (see below)  [batch, pos, d]      (layer, position)
resid_post     blocks.{l}.hook_resid_post      [batch, pos, d]      (layer, position)
attn_out       blocks.{l}.hook_attn_out        [batch, pos, d]      (layer, position)
mlp_out        blocks.{l}.hook_mlp_out         [batch, pos, d]      (layer, position)
head           blocks.{l}.attn.hook_z          [batch, pos, h, dh]  (layer, head, position)
neuron         blocks.{l}.mlp.hook_post        [batch, pos, d_mlp]  (layer, position, neuron)
query          blocks.{l}.attn.hook_q          [batch, pos, h, dh]  (layer, head, position)
key            blocks.{l}.attn.hook_k          [batch, pos, hkv, dh] (layer, head, position)
=============  ==============================  ===================  ===============================

``resid_mid`` is not hooked at ``blocks.{l}.hook_resid_mid``: in TransformerLens 4.x that name is an alias
of the second norm's input, so an edit there reaches the MLP but not the residual connection around it
(patching it would silently be "patch the MLP input"). relp defines resid_mid as resid_pre + attn_out,
patches it through hook_attn_out (attn_out := target - resid_pre) and takes its gradient there, which
is exact for sequential blocks; it is refused for parallel attention/MLP blocks and checked on the run
(resid_pre + attn_out must equal the stream entering the second norm).

A *cell* is one entry of the score tensor of one layer: a position (block components), a
(head, position) pair, or a (position, neuron) pair. Patching a cell replaces that slice of the
activation in every prompt of the batch at once.

Geometry is data: each component declares the axes of its hooked activation (``activation_axes``,
e.g. ``("batch", "position", "head", "d_head")``) and of its scores (``axes``, e.g. ``("layer", "head",
"position")``). Score axes name activation axes; every other activation axis (the batch and the hidden
dimension) is summed. Cell shapes, cell indices, per-cell sums and the masks that ablate nodes all
follow from those two tuples, so no code branches on a component's name.

Some architectures name these hook points differently: their entries in
:data:`relp.architectures.ARCHITECTURES` override the defaults below. On BERT (post-LayerNorm blocks) ``attn_out`` is ``blocks.{l}.attn.o.hook_out``, because the bridge's
``hook_attn_out`` there already includes the residual sum and the post-attention LayerNorm, and
``resid_mid`` is that norm's output ``blocks.{l}.ln1.hook_out`` (the stream entering the MLP and its
residual connection).

``head`` uses the per-query-head attention output ``z`` (the input of the output projection), so with
grouped-query attention each of the ``n_heads`` query heads is its own component even though key and
value heads are shared. ``query`` and ``key`` are the per-head query and key vectors (``hook_q``, ``hook_k``). On rotary models
(Llama) the bridge fires them *before* the rotary embedding (the rotated ones are ``hook_rot_q`` and
``hook_rot_k``); patching them patches the vector that is then rotated at its own position. With
grouped-query attention ``key`` has ``n_key_value_heads`` heads (a key cell is shared by the
``n_heads / n_key_value_heads`` query heads of its group). Activation patching of both is checked
against a hand patch on GPT-2- and Llama-style models (``tests/test_atp_star.py``); on BERT-style
models the bridge delegates attention to Hugging Face and its ``hook_attn_scores`` is not the
pre-softmax score, so :func:`relp.atp_star.atp_star`'s QK-fix refuses them.

``neuron`` uses the MLP hidden units that enter the output projection
(``act(gate) * up`` for gated MLPs).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from relp.architectures import architecture_of

#: Activation axes that are summed into a cell (never score axes).
SUMMED_AXES = ("batch", "d_model", "d_head")


@dataclass(frozen=True)
class Component:
    """One component type: where it is hooked and how its activations map to score cells."""

    name: str
    hook_template: str  # where the activation is patched and its gradient taken
    axes: tuple[str, ...]  # axes of the score tensor, the first is always "layer"
    activation_axes: tuple[str, ...]  # axes of the hooked activation, the first is always "batch"
    description: str
    offset_template: str | None = None  # activation = hooked tensor + this one (resid_mid only)

    def __post_init__(self):
        missing = [a for a in self.cell_axes if a not in self.activation_axes]
        if self.axes[:1] != ("layer",) or self.activation_axes[:1] != ("batch",) or missing:
            raise ValueError(
                f"component {self.name!r}: score axes {self.axes} must start with 'layer' and name axes of the "
                f"activation {self.activation_axes} (which starts with 'batch'); not found: {missing}"
            )

    def hook_name(self, layer: int) -> str:
        return self.hook_template.format(layer=layer)

    def offset_name(self, layer: int) -> str | None:
        return self.offset_template.format(layer=layer) if self.offset_template else None

    @property
    def cell_axes(self) -> tuple[str, ...]:
        """The score axes of one layer (``axes`` without ``layer``)."""
        return self.axes[1:]

    def node_axes(self, per_position: bool = True) -> tuple[str, ...]:
        """Axes of this component's circuit nodes: its score axes, without ``position`` when summed."""
        return self.axes if per_position else tuple(a for a in self.axes if a != "position")

    def cell_scores(self, values: torch.Tensor) -> torch.Tensor:
        """Reduce per-element contributions [batch, pos, ...] of one layer to cells, summed over the batch
        and the hidden dimension: [pos] for block components, [head, pos] for heads, [pos, neuron] for
        neurons (the order of ``cell_axes``)."""
        summed = tuple(i for i, a in enumerate(self.activation_axes) if a not in self.cell_axes)
        kept = [a for a in self.activation_axes if a in self.cell_axes]
        reduced = values.sum(dim=summed)
        order = [kept.index(a) for a in self.cell_axes]
        return reduced if order == sorted(order) else reduced.permute(order)

    def cell_shape(self, activation: torch.Tensor) -> tuple[int, ...]:
        """Shape of one layer's score tensor for an activation [batch, pos, ...]."""
        return tuple(activation.shape[self.activation_axes.index(a)] for a in self.cell_axes)

    def cell_index(self, cell: tuple[int, ...]) -> tuple:
        """Index into an activation [batch, pos, ...] that selects one cell (for every prompt)."""
        where = dict(zip(self.cell_axes, cell))
        index = [where.get(a, slice(None)) for a in self.activation_axes]
        while index and isinstance(index[-1], slice):
            index.pop()  # trailing full slices select nothing more
        return tuple(index) if index else (slice(None),)

    def activation_mask(self, mask: torch.Tensor, per_position: bool = True) -> torch.Tensor:
        """Node masks [copies, *node axes without layer] -> [copies, *activation axes] with size 1 on
        every axis the nodes do not have (the batch, the hidden dimension, positions when summed), to
        broadcast against the stacked activations of `copies` copies of a batch."""
        node_axes = self.node_axes(per_position)[1:]
        if mask.ndim != 1 + len(node_axes):
            raise ValueError(f"{self.name} node masks must be [copies, {', '.join(node_axes)}]; got shape {tuple(mask.shape)}")
        order = [a for a in self.activation_axes if a in node_axes]
        permuted = mask.permute(0, *[1 + node_axes.index(a) for a in order])
        sizes = dict(zip(order, permuted.shape[1:]))
        return permuted.reshape(mask.shape[0], *[sizes.get(a, 1) for a in self.activation_axes])


_BLOCK_AXES = ("layer", "position")
_BLOCK_ACTIVATION = ("batch", "position", "d_model")

COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("resid_pre", "blocks.{layer}.hook_resid_pre", _BLOCK_AXES, _BLOCK_ACTIVATION, "residual stream before the block"),
        Component(
            "resid_mid", "blocks.{layer}.hook_attn_out", _BLOCK_AXES, _BLOCK_ACTIVATION,
            "residual stream between attention and MLP", offset_template="blocks.{layer}.hook_resid_pre",
        ),
        Component("resid_post", "blocks.{layer}.hook_resid_post", _BLOCK_AXES, _BLOCK_ACTIVATION, "residual stream after the block"),
        Component("attn_out", "blocks.{layer}.hook_attn_out", _BLOCK_AXES, _BLOCK_ACTIVATION, "attention output (all heads)"),
        Component("mlp_out", "blocks.{layer}.hook_mlp_out", _BLOCK_AXES, _BLOCK_ACTIVATION, "MLP output"),
        Component(
            "head", "blocks.{layer}.attn.hook_z", ("layer", "head", "position"), ("batch", "position", "head", "d_head"),
            "one attention head's output z",
        ),
        Component(
            "neuron", "blocks.{layer}.mlp.hook_post", ("layer", "position", "neuron"), ("batch", "position", "neuron"),
            "one MLP hidden unit",
        ),
        Component(
            "query", "blocks.{layer}.attn.hook_q", ("layer", "head", "position"), ("batch", "position", "head", "d_head"),
            "one query head's query vector (before the rotary embedding on rotary models)",
        ),
        Component(
            "key", "blocks.{layer}.attn.hook_k", ("layer", "head", "position"), ("batch", "position", "head", "d_head"),
            "one key/value head's key vector (before the rotary embedding on rotary models)",
        ),
    )
}

BLOCK_COMPONENTS = ("resid_pre", "attn_out", "mlp_out")


def check_component_names(names: Sequence[str]) -> None:
    """A clear error for an empty selection, an unknown name or a name given twice."""
    names = list(names)
    if not names:
        raise ValueError(f"no components given; expected some of {sorted(COMPONENTS)}")
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; expected names from {sorted(COMPONENTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"components given twice: {names}")


def resolve_components(components: str | Iterable[str], model=None) -> list[Component]:
    """Component objects for names; a clear error for an unknown name, an empty selection, or a
    component the model does not have."""
    if components is None or not isinstance(components, (str, Iterable)):
        raise TypeError(
            f"components must be a component name or an iterable of names from {sorted(COMPONENTS)}; "
            f"got {components!r}"
        )
    names: Sequence[str] = [components] if isinstance(components, str) else list(components)
    check_component_names(names)
    if model is not None and "resid_mid" in names and getattr(model.cfg, "parallel_attn_mlp", False):
        raise ValueError(
            f"{model.cfg.model_name} runs attention and MLP in parallel: there is no resid_mid; "
            "use resid_pre, attn_out or mlp_out"
        )
    return [component_for(model, n) for n in names]


def component_for(model, name: str) -> Component:
    """The component `name` with this model's hook points (its entry in
    :data:`relp.architectures.ARCHITECTURES`); `model` may be None (the defaults)."""
    component = COMPONENTS[name]
    override = architecture_of(model).hooks.get(name)
    return component if override is None else dataclasses.replace(component, **override)


def resolve_layers(model, layers: Iterable[int] | None) -> list[int]:
    n_layers = model.cfg.n_layers
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(
            f"layers must be an iterable of layer indices (e.g. [{layers!r}]) or None (all layers); got "
            f"{type(layers).__name__} {layers!r}"
        )
    chosen = list(layers)
    not_ints = [layer for layer in chosen if isinstance(layer, bool) or not isinstance(layer, numbers.Integral)]
    if not_ints:
        raise TypeError(f"layers must be integer layer indices; got {not_ints!r} in {chosen!r}")
    chosen = [int(layer) for layer in chosen]
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad or not chosen:
        raise ValueError(f"layers {chosen} out of range; the model has layers 0..{n_layers - 1}")
    return chosen
