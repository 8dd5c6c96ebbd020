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

Some architectures name these hook points differently: ``ARCHITECTURE_HOOKS`` lists the exceptions.
On BERT (post-LayerNorm blocks) ``attn_out`` is ``blocks.{l}.attn.o.hook_out``, because the bridge's
``hook_attn_out`` there already includes the residual sum and the post-attention LayerNorm, and
``resid_mid`` is that norm's output ``blocks.{l}.ln1.hook_out`` (the stream entering the MLP and its
residual connection).

``head`` uses the per-query-head attention output ``z`` (the input of the output projection), so with
grouped-query attention each of the ``n_heads`` query heads is its own component even though key and
value heads are shared. ``neuron`` uses the MLP hidden units that enter the output projection
(``act(gate) * up`` for gated MLPs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Component:
    """One component type: where it is hooked and how its activations map to score cells."""

    name: str
    hook_template: str  # where the activation is patched and its gradient taken
    axes: tuple[str, ...]  # axes of the score tensor, the first is always "layer"
    description: str
    offset_template: str | None = None  # activation = hooked tensor + this one (resid_mid only)

    def hook_name(self, layer: int) -> str:
        return self.hook_template.format(layer=layer)

    def offset_name(self, layer: int) -> str | None:
        return self.offset_template.format(layer=layer) if self.offset_template else None

    def cell_scores(self, values: torch.Tensor) -> torch.Tensor:
        """Reduce per-element contributions [batch, pos, ...] of one layer to cells, summed over batch.

        Block components and heads sum over the hidden dimension; neurons are single units.
        Returns [pos] for block components, [head, pos] for heads, [pos, neuron] for neurons.
        """
        if self.name == "head":
            return values.sum(dim=(0, 3)).transpose(0, 1)
        if self.name == "neuron":
            return values.sum(dim=0)
        return values.sum(dim=(0, 2))

    def cell_shape(self, activation: torch.Tensor) -> tuple[int, ...]:
        """Shape of one layer's score tensor for an activation [batch, pos, ...]."""
        if self.name == "head":
            return (activation.shape[2], activation.shape[1])
        if self.name == "neuron":
            return (activation.shape[1], activation.shape[2])
        return (activation.shape[1],)

    def cell_index(self, cell: tuple[int, ...]) -> tuple:
        """Index into an activation [batch, pos, ...] that selects one cell (for every prompt)."""
        if self.name == "head":
            head, position = cell
            return (slice(None), position, head)
        if self.name == "neuron":
            position, neuron = cell
            return (slice(None), position, neuron)
        (position,) = cell
        return (slice(None), position)


_BLOCK_AXES = ("layer", "position")

COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("resid_pre", "blocks.{layer}.hook_resid_pre", _BLOCK_AXES, "residual stream before the block"),
        Component(
            "resid_mid", "blocks.{layer}.hook_attn_out", _BLOCK_AXES, "residual stream between attention and MLP",
            offset_template="blocks.{layer}.hook_resid_pre",
        ),
        Component("resid_post", "blocks.{layer}.hook_resid_post", _BLOCK_AXES, "residual stream after the block"),
        Component("attn_out", "blocks.{layer}.hook_attn_out", _BLOCK_AXES, "attention output (all heads)"),
        Component("mlp_out", "blocks.{layer}.hook_mlp_out", _BLOCK_AXES, "MLP output"),
        Component("head", "blocks.{layer}.attn.hook_z", ("layer", "head", "position"), "one attention head's output z"),
        Component("neuron", "blocks.{layer}.mlp.hook_post", ("layer", "position", "neuron"), "one MLP hidden unit"),
    )
}

BLOCK_COMPONENTS = ("resid_pre", "attn_out", "mlp_out")

#: Per-architecture hook points that differ from the table above (keyed by ``model.cfg.architecture``).
#: BERT is a post-LayerNorm encoder: the bridge's ``hook_attn_out`` is the output of the whole HF
#: ``BertAttention``, i.e. ``LayerNorm(resid_pre + attention)``, which is the residual stream after
#: attention, not the attention output. The attention output proper (all heads, before the residual
#: sum and the norm) is the output projection's ``attn.o.hook_out``. (``hook_mlp_out`` is already the
#: MLP's output projection, before its residual sum and norm.)
#: In a post-LN block the residual stream between attention and MLP is the first norm's output,
#: ``LayerNorm(resid_pre + attention)``: that is resid_mid there, hooked directly (no offset).
_POST_LN_ENCODER = {
    "attn_out": {"hook_template": "blocks.{layer}.attn.o.hook_out"},
    "resid_mid": {"hook_template": "blocks.{layer}.ln1.hook_out", "offset_template": None},
}
ARCHITECTURE_HOOKS: dict[str, dict[str, dict]] = {
    "BertForMaskedLM": _POST_LN_ENCODER,
    "BertLMHeadModel": _POST_LN_ENCODER,
    "RobertaForMaskedLM": _POST_LN_ENCODER,
}


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
    names: Sequence[str] = [components] if isinstance(components, str) else list(components)
    check_component_names(names)
    if model is not None and "resid_mid" in names and getattr(model.cfg, "parallel_attn_mlp", False):
        raise ValueError(
            f"{model.cfg.model_name} runs attention and MLP in parallel: there is no resid_mid; "
            "use resid_pre, attn_out or mlp_out"
        )
    return [component_for(model, n) for n in names]


def component_for(model, name: str) -> Component:
    """The component `name` with this model's hook points (``ARCHITECTURE_HOOKS``); `model` may be None."""
    component = COMPONENTS[name]
    architecture = str(getattr(model.cfg, "architecture", "")) if model is not None else ""
    override = ARCHITECTURE_HOOKS.get(architecture, {}).get(name)
    return component if override is None else dataclasses.replace(component, **override)


def resolve_layers(model, layers: Iterable[int] | None) -> list[int]:
    n_layers = model.cfg.n_layers
    if layers is None:
        return list(range(n_layers))
    chosen = [int(layer) for layer in layers]
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad or not chosen:
        raise ValueError(f"layers {chosen} out of range; the model has layers 0..{n_layers - 1}")
    return chosen
