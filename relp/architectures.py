"""Every per-architecture fact relp needs, in one table.

relp reads a model through TransformerLens's hook names, which are the same on every architecture
for most purposes. Where an architecture differs, the difference is recorded here and nowhere else:

* **hook points of components** that the bridge names differently (:mod:`relp.components` holds the
  default hook of each component; an entry's ``hooks`` overrides it);
* **the final hidden state**, the tensor Hugging Face's base model returns as ``last_hidden_state``
  (read by ``relp.SentenceEmbedding``);
* **the stream entering the MLP's norm**, against which relp checks on the run that resid_pre +
  attn_out is the residual stream between attention and MLP (resid_mid);
* **bare checkpoints**: Hugging Face classes without a language-model head (``BertModel``) that load
  through this family's masked-LM class, which TransformerLens bridges.

=============================  ===========================================================================
architecture                   what differs from the default (pre-norm decoders: GPT-2, Llama, SmolLM, ...)
=============================  ===========================================================================
post-LN encoder (BERT, RoBERTa) ``attn_out`` is ``attn.o.hook_out`` (the bridge's ``hook_attn_out`` is
                               ``LayerNorm(resid_pre + attention)``); ``resid_mid`` is the first norm's
                               output ``ln1.hook_out``, hooked directly (no offset); the final hidden state
                               is the last block's output (``ln_final`` belongs to the masked-LM head);
                               ``BertModel``/``RobertaModel`` checkpoints load as ``*ForMaskedLM``; the
                               stream is renormalised after every sublayer: no edges (relp.edges)
=============================  ===========================================================================

Adding an architecture is one :class:`Architecture` entry in :data:`ARCHITECTURES` plus its oracle test
(a hand-patched Hugging Face model, as ``tests/test_embeddings.py`` does for BERT and RoBERTa). An
architecture that is not listed uses :data:`DEFAULT`. Keys are ``model.cfg.architecture``, the Hugging
Face class name the bridge records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class Architecture:
    """What relp needs to know about one family of models (see the module docstring)."""

    name: str
    #: ``model.cfg.architecture`` values of this family (Hugging Face class names)
    classes: tuple[str, ...] = ()
    #: component -> {"hook_template": ..., "offset_template": ...}: hook points that differ from the
    #: defaults in :data:`relp.components.COMPONENTS` (``{layer}`` is the block index)
    hooks: Mapping[str, Mapping[str, str | None]] = field(default_factory=dict)
    #: hook of the final hidden state (``{last}`` is the last block's index); None: the final norm's
    #: output when the model has one, else the last block's output
    final_hidden: str | None = None
    #: hook of the residual stream entering the MLP's norm (resid_pre + attn_out must equal it wherever
    #: resid_mid is patched through attn_out); None where resid_mid is hooked directly
    mlp_input_stream: str | None = "blocks.{layer}.ln2.hook_in"
    #: Hugging Face classes of checkpoints without a head that load through ``classes[0]``
    bare_checkpoints: tuple[str, ...] = ()
    #: the residual stream is a running sum of the sublayers' outputs (pre-norm blocks), so it has edges
    #: between components (:mod:`relp.edges`); post-LN blocks renormalise it after every sublayer
    additive_stream: bool = True


DEFAULT = Architecture("pre-norm decoder")

_POST_LN_HOOKS = MappingProxyType({
    "attn_out": MappingProxyType({"hook_template": "blocks.{layer}.attn.o.hook_out"}),
    "resid_mid": MappingProxyType({"hook_template": "blocks.{layer}.ln1.hook_out", "offset_template": None}),
})

ARCHITECTURES: dict[str, Architecture] = {
    entry.name: entry
    for entry in (
        DEFAULT,
        Architecture(
            "bert", classes=("BertForMaskedLM", "BertLMHeadModel"), hooks=_POST_LN_HOOKS,
            final_hidden="blocks.{last}.hook_resid_post", mlp_input_stream=None, bare_checkpoints=("BertModel",),
            additive_stream=False,
        ),
        Architecture(
            "roberta", classes=("RobertaForMaskedLM",), hooks=_POST_LN_HOOKS,
            final_hidden="blocks.{last}.hook_resid_post", mlp_input_stream=None, bare_checkpoints=("RobertaModel",),
            additive_stream=False,
        ),
    )
}


def architecture_of(model) -> Architecture:
    """The table entry of a model (by ``model.cfg.architecture``), :data:`DEFAULT` if it has none."""
    name = str(getattr(model.cfg, "architecture", "")) if model is not None else ""
    return next((entry for entry in ARCHITECTURES.values() if name in entry.classes), DEFAULT)


def class_for_checkpoint(hf_class: str | None) -> str | None:
    """The Hugging Face class a checkpoint of `hf_class` is loaded as: the family's masked-LM class for a
    bare encoder (``BertModel`` -> ``BertForMaskedLM``), else `hf_class` itself."""
    for entry in ARCHITECTURES.values():
        if hf_class in entry.bare_checkpoints:
            return entry.classes[0]
    return hf_class
