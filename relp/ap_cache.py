"""Activation patching results cached on disk, keyed by everything that decides them.

Activation patching (AP) is the ground truth every estimate is compared with, and its cost is one
forward pass per cell; a method study compares many estimates with the same AP maps.
:func:`cached_activation_patching` computes AP once per (model, prompts, metric, components, layers,
direction, options) and loads the saved :class:`relp.PatchingResult` afterwards.

The key is a SHA-256 over a canonical JSON description of:

* the model: its name, and for every parameter its name, shape, dtype and the bytes of up to
  :data:`SAMPLED_ELEMENTS` elements at evenly spaced flat indices (cheap on any model size, and exact:
  no floating-point reduction, so the same on every device). Any retraining or fine-tuning changes
  them; an edit that leaves every sampled element alone (one neuron's weights) is not seen: pass a
  `key_extra` that tells such models apart;
* the clean and corrupted tokens (as :func:`relp.to_tokens` makes them): shape and bytes;
* the metric: its name and the caller's `metric_key`, a string that identifies what it computes
  (metrics are callables; e.g. the IOI metric's answer ids and normalisation constants);
* the components (in order), the layers, the direction, and every option except those that change
  nothing but the float rounding of the passes (:data:`NOT_IN_KEY`: ``batch_size``, ``progress``,
  ``skip_early_layers``, ``reuse_prefix``, ``max_forward_passes``); the device is not in the key either, for the same reason;
* `key_extra` (any JSON-able value) and :data:`FORMAT`.

Files are ``<cache_dir>/ap-<model>-<key[:24]>.pt``, written atomically (a temporary file in the same
folder, then renamed), so concurrent writers and interrupted runs never leave a partial file. A loaded
result records ``metadata["ap_cache"] = {"key", "loaded": True, "path"}`` (``"loaded": False`` when
computed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from relp.components import BLOCK_COMPONENTS, check_component_names, resolve_layers
from relp.metrics import metric_name
from relp.results import PatchingResult
from relp.tokens import to_tokens

#: Elements of each parameter whose bytes enter the key.
SAMPLED_ELEMENTS = 1024
#: Options of activation patching that change only float rounding, never what is computed.
NOT_IN_KEY = ("batch_size", "progress", "skip_early_layers", "reuse_prefix", "max_forward_passes")
#: Version of the key's description; bump it when the key or what AP computes changes.
FORMAT = "relp.ap_cache/1"


def model_fingerprint(model) -> str:
    """SHA-256 over every parameter's name, shape, dtype and the bytes of up to :data:`SAMPLED_ELEMENTS`
    of its elements at evenly spaced flat indices."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        values = parameter.detach().reshape(-1)
        digest.update(f"{name}|{tuple(parameter.shape)}|{parameter.dtype}|".encode())
        if values.numel():
            # integer arithmetic: a float32 linspace rounds large indices past the end (28311551 -> 28311552)
            count = min(values.numel(), SAMPLED_ELEMENTS)
            index = torch.arange(count, dtype=torch.int64) * (values.numel() - 1) // max(count - 1, 1)
            digest.update(_tensor_bytes(values[index.to(values.device)]))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits as int16
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def _canonical(value, name: str):
    """A JSON-able description of an option value (tensors by shape, dtype and a hash of their bytes)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype), "sha256": hashlib.sha256(_tensor_bytes(value)).hexdigest()}
    if isinstance(value, dict):
        return {str(k): _canonical(v, f"{name}[{k!r}]") for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{name}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{name} of type {type(value).__name__} cannot enter the AP cache key; expected None, numbers, strings, "
        "tensors, or lists and dicts of them"
    )


def digest(value, name: str = "value") -> str:
    """A short hash of `value` (numbers, strings, tensors, lists and dicts of them; tensors by shape, dtype
    and bytes): e.g. a `metric_key` from what a metric computes."""
    text = json.dumps(_canonical(value, name), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_key(model, clean, corrupted, metric, components=BLOCK_COMPONENTS, *, metric_key: str, key_extra=None,
              direction: str = "denoising", layers: Iterable[int] | None = None, **options) -> tuple[str, dict]:
    """(hex key, the description it hashes) for :func:`cached_activation_patching`'s arguments."""
    if not isinstance(metric_key, str) or not metric_key.strip():
        raise ValueError(
            f"metric_key must be a non-empty string that identifies what the metric computes (e.g. its answer ids "
            f"and normalisation constants); got {metric_key!r}"
        )
    names = [components] if isinstance(components, str) else list(components)
    check_component_names(names)
    clean_tokens, corrupted_tokens = to_tokens(model, clean), to_tokens(model, corrupted)
    description = {
        "format": FORMAT,
        "model": {"name": str(model.cfg.model_name), "parameters": model_fingerprint(model)},
        "clean": _canonical(clean_tokens.long(), "clean"),
        "corrupted": _canonical(corrupted_tokens.long(), "corrupted"),
        "metric": {"name": metric_name(metric), "key": metric_key},
        "components": names,
        "layers": resolve_layers(model, layers),
        "direction": direction,
        "options": {k: _canonical(v, k) for k, v in sorted(options.items()) if k not in NOT_IN_KEY},
        "key_extra": _canonical(key_extra, "key_extra"),
    }
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), description


def cached_activation_patching(
    model,
    clean,
    corrupted,
    metric,
    components: str | Iterable[str] = BLOCK_COMPONENTS,
    *,
    cache_dir: str | Path,
    metric_key: str,
    key_extra=None,
    direction: str = "denoising",
    layers: Iterable[int] | None = None,
    **options,
) -> PatchingResult:
    """:func:`relp.activation_patching`, loaded from `cache_dir` when it was computed before with the same
    key (module docstring), else computed and saved there.

    `metric_key` (required) identifies the metric: a string describing what it computes. `key_extra`
    (optional, JSON-able) enters the key as well. `options` go to activation patching.
    ``metadata["ap_cache"]`` records the key, the file and whether the result was loaded.
    """
    from relp import patching  # looked up at call time (tests replace it)

    key, _ = cache_key(
        model, clean, corrupted, metric, components, metric_key=metric_key, key_extra=key_extra,
        direction=direction, layers=layers, **options,
    )
    folder = Path(cache_dir)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(model.cfg.model_name))[:64]
    path = folder / f"ap-{slug}-{key[:24]}.pt"
    if path.exists():
        try:
            result = PatchingResult.load(path)
        except Exception as error:
            raise ValueError(f"the AP cache file {path} cannot be read ({error}); delete it to recompute") from error
        stored = result.metadata.get("ap_cache", {}).get("key")
        if stored != key:
            raise ValueError(f"the AP cache file {path} holds key {stored}, not {key}; delete it to recompute")
        result.metadata["ap_cache"] = {"key": key, "loaded": True, "path": str(path)}
        return result
    result = patching.activation_patching(
        model, clean, corrupted, metric, components, direction=direction, layers=layers, **options
    )
    result.metadata["ap_cache"] = {"key": key, "loaded": False, "path": str(path)}
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=path.name + ".", suffix=".tmp")
    os.close(handle)
    try:
        result.save(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return result
