"""The model cache checks content, not only sizes (issue 15, item 3): a cached weights file overwritten in
place with bytes of the same size (here: NaN) used to load a model with NaN logits; it is now rebuilt.
The oracle is the source model's own logits."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest
import torch

from relp.loading import cache as loading_cache
from relp.loading import verify_cache_dir
from relp.testing import tiny_hf_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")
TOKENS = torch.tensor([[0, 7, 8, 9, 10]])


@pytest.fixture(scope="module")
def source():
    tokenizer = tiny_tokenizer()
    return tiny_hf_model("llama", vocab_size=len(tokenizer), n_layers=1, d_model=16), tokenizer


def _logits(hf_model) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(TOKENS).logits


def _builder(source, calls):
    hf_model, tokenizer = source

    def build(out_dir: Path) -> None:
        calls.append(out_dir)
        hf_model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

    return build


def _overwrite_middle_with_nan(path: Path, n_bytes: int) -> None:
    """Overwrite n_bytes in the middle of the file (inside the tensor data) with float32 NaNs, in place."""
    size = path.stat().st_size
    start = (size // 2) // 4 * 4
    with open(path, "r+b") as handle:
        handle.seek(start)
        handle.write(struct.pack("<f", float("nan")) * (n_bytes // 4))
    assert path.stat().st_size == size


def test_weights_damaged_in_place_are_rebuilt_not_loaded(tmp_path, source, caplog):
    calls = []
    build = _builder(source, calls)
    loaded, _ = loading_cache._read_cached("ckpt", build, root=tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(source[0]), rtol=0, atol=0)
    weights = tmp_path / "ckpt" / "model.safetensors"
    _overwrite_middle_with_nan(weights, min(1 << 20, weights.stat().st_size // 4))
    assert verify_cache_dir(tmp_path / "ckpt") is None  # sizes are intact: only the content check sees it
    with caplog.at_level(logging.WARNING, logger="relp.loading.cache"):
        reloaded, _ = loading_cache._read_cached("ckpt", build, root=tmp_path)
    assert len(calls) == 2, "the damaged entry was loaded instead of rebuilt"
    assert "sha256" in caplog.text and "rebuilding" in caplog.text
    logits = _logits(reloaded)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, _logits(source[0]), rtol=0, atol=0)
    assert verify_cache_dir(tmp_path / "ckpt", full=True) is None


def test_a_damaged_tokenizer_file_is_rebuilt_too(tmp_path, source):
    calls = []
    build = _builder(source, calls)
    loading_cache._read_cached("ckpt", build, root=tmp_path)
    tokenizer_file = tmp_path / "ckpt" / "tokenizer.json"
    text = tokenizer_file.read_text()
    tokenizer_file.write_text(text.replace('"w1"', '"w9"', 1))  # same size, other vocabulary
    _, tokenizer = loading_cache._read_cached("ckpt", build, root=tmp_path)
    assert len(calls) == 2 and tokenizer.convert_tokens_to_ids("w1") == source[1].convert_tokens_to_ids("w1")


def test_intact_entry_is_hashed_once_per_process(tmp_path, source, monkeypatch):
    """Repeated loads of an unchanged entry do not hash its files again (inode, size and mtime unchanged);
    a rewritten file is hashed again."""
    calls = []
    build = _builder(source, calls)
    loading_cache._read_cached("ckpt", build, root=tmp_path)
    hashed = []
    real = loading_cache._sha256
    monkeypatch.setattr(loading_cache, "_sha256", lambda path: hashed.append(path.name) or real(path))
    loading_cache._read_cached("ckpt", build, root=tmp_path)
    assert hashed == [] and len(calls) == 1
    config = tmp_path / "ckpt" / "config.json"
    config.write_bytes(config.read_bytes())  # same content, new modification time
    loading_cache._read_cached("ckpt", build, root=tmp_path)
    assert hashed == ["config.json"] and len(calls) == 1
