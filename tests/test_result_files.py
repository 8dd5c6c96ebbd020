"""Saved results (issue 15, item 10): a format version and a checksum written by PatchingResult.save and
checked by load; one error type (ResultFileError) for files that are not results or were damaged;
metadata that JSON cannot hold is refused at save time instead of coming back as strings; files of the
first format (tests/data/result_format1.pt, written by the code before this change) still load."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from relp import ResultFileError
from relp.results import RESULT_FORMAT, PatchingResult

DATA = Path(__file__).parent / "data"


def make_result(**metadata) -> PatchingResult:
    g = torch.Generator().manual_seed(0)
    return PatchingResult(
        scores={"resid_pre": torch.randn(2, 5, generator=g), "head": torch.randn(2, 4, 5, generator=g).double()},
        method="attribution_patching", metric="logit_diff", direction="noising", rules=(), seconds=0.75,
        model="tiny", layers=(0, 1), tokens=("<s>", " a", " b", " c", " d"),
        metadata={"n_prompts": 3, "n_positions": 5, **metadata},
    )


def _assert_same(loaded: PatchingResult, result: PatchingResult) -> None:
    assert loaded.components == result.components
    for name in result.components:
        assert loaded[name].dtype == result[name].dtype and torch.equal(loaded[name], result[name])
    for field in ("method", "metric", "direction", "rules", "seconds", "model", "layers", "tokens"):
        assert getattr(loaded, field) == getattr(result, field), field


def test_round_trip_keeps_metadata_types(tmp_path):
    metadata = {
        "labels": ("BOS", "IO"), "nested": {"pair": (1, (2.5, None)), "list": [1, "x", True]},
        "nan": float("nan"), "inf": -math.inf, "np_int": np.int64(7), "np_float": np.float32(0.5), "np_bool": np.bool_(True),
    }
    result = make_result(**metadata)
    loaded = PatchingResult.load(result.save(tmp_path / "r.pt"))
    _assert_same(loaded, result)
    m = loaded.metadata
    assert m["labels"] == ("BOS", "IO") and isinstance(m["labels"], tuple)
    assert m["nested"] == {"pair": (1, (2.5, None)), "list": [1, "x", True]} and isinstance(m["nested"]["pair"][1], tuple)
    assert math.isnan(m["nan"]) and m["inf"] == -math.inf
    assert (m["np_int"], m["np_float"], m["np_bool"]) == (7, 0.5, True)
    assert type(m["np_int"]) is int and type(m["np_bool"]) is bool
    assert torch.load(tmp_path / "r.pt", weights_only=True)["format"] == RESULT_FORMAT


@pytest.mark.parametrize(
    "value, where",
    [
        (torch.tensor([1.0, 2.0]), r"metadata\['bad'\] is a torch.Tensor"),
        (np.arange(3), r"metadata\['bad'\] is a numpy.ndarray"),
        ({1: "a"}, r"metadata\['bad'\] has the key 1 \(int\)"),
        ([1, {"deep": object()}], r"metadata\['bad'\]\[1\]\['deep'\] is a builtins.object"),
        (Path("/tmp"), r"metadata\['bad'\] is a pathlib"),
        ({1, 2}, r"metadata\['bad'\] is a builtins.set"),
    ],
)
def test_metadata_json_cannot_hold_is_refused_at_save(tmp_path, value, where):
    with pytest.raises(TypeError, match=where + r".*JSON"):
        make_result(bad=value).save(tmp_path / "r.pt")
    assert not (tmp_path / "r.pt").exists()


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _score_offset(data: bytes, result: PatchingResult) -> int:
    """Where the first score tensor's bytes lie in the file (torch stores tensor data uncompressed)."""
    at = data.find(result["resid_pre"].numpy().tobytes())
    assert at > 0
    return at


def _damaged_files(tmp_path: Path) -> dict[str, Path]:
    result = make_result()
    good = result.save(tmp_path / "good.pt").read_bytes()
    g = np.random.default_rng(0)
    at = _score_offset(good, result)
    files = {
        "empty": b"",
        "random": g.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text": b"scores: 1 2 3\n",
        "truncated to half": good[: len(good) // 2],
        "truncated by one byte": good[:-1],
        "one byte flipped in a score": _flip(good, at + 5),
        "three bytes flipped in a score": _flip(_flip(_flip(good, at), at + 9), at + 17),
        "one byte flipped in the metadata": good.replace(b'"n_prompts": 3', b'"n_prompts": 4'),
        "one byte flipped in the method name": good.replace(b"attribution_patching", b"attribution_patchinf"),
    }
    for name, tensor_like in {"bare tensor": torch.zeros(3), "dict of tensors": {"scores": {}}, "list": [1, 2]}.items():
        torch.save(tensor_like, tmp_path / f"{name}.pt")
    paths = {name: tmp_path / f"{name}.pt" for name in ("bare tensor", "dict of tensors", "list")}
    for name, data in files.items():
        assert name == "empty" or data != good
        (tmp_path / f"{name}.pt").write_bytes(data)
        paths[name] = tmp_path / f"{name}.pt"
    # a payload with the current format but a score changed after the checksum was computed
    payload = torch.load(tmp_path / "good.pt", weights_only=True)
    payload["scores"]["resid_pre"][0, 0] += 1e-6
    torch.save(payload, tmp_path / "edited.pt")
    paths["score edited, file rewritten"] = tmp_path / "edited.pt"
    return paths


DAMAGES = ["empty", "random", "text", "truncated to half", "truncated by one byte", "one byte flipped in a score",
           "three bytes flipped in a score", "one byte flipped in the metadata", "one byte flipped in the method name",
           "bare tensor", "dict of tensors", "list", "score edited, file rewritten"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_or_foreign_files_raise_one_error_type(tmp_path, damage):
    path = _damaged_files(tmp_path)[damage]
    with pytest.raises(ResultFileError, match=rf"{path.name}.*(not a saved relp PatchingResult|damaged)"):
        PatchingResult.load(path)


def test_result_file_error_is_a_value_error_and_missing_file_is_not_found(tmp_path):
    assert issubclass(ResultFileError, ValueError)  # code that caught ValueError before still does
    with pytest.raises(FileNotFoundError, match="no saved PatchingResult"):
        PatchingResult.load(tmp_path / "absent.pt")


def test_first_format_file_still_loads():
    """tests/data/result_format1.pt was written by PatchingResult.save before this change (format
    relp.PatchingResult/1, no checksum); its scores are torch.randn from seed 0, regenerated here."""
    loaded = PatchingResult.load(DATA / "result_format1.pt")
    g = torch.Generator().manual_seed(0)
    assert torch.equal(loaded["resid_pre"], torch.randn(2, 3, generator=g))
    assert torch.equal(loaded["head"], torch.randn(2, 4, 3, generator=g))
    assert (loaded.method, loaded.rules, loaded.layers, loaded.tokens) == (
        "relevance_patching", ("ln", "identity"), (0, 1), ("<bos>", " a", " b"))
    assert loaded.metadata == {"n_prompts": 2, "n_positions": 3, "base_metric": -0.125,
                               "position_labels": ["BOS", "A", "B"], "rules_not_applicable": {"half": "no gated MLP"}}


def test_layers_given_as_numpy_ints_still_load(tmp_path):
    """numpy ints in `layers` used to be pickled as numpy objects, which weights_only loading refuses."""
    result = make_result()
    result.layers = tuple(np.arange(2))
    loaded = PatchingResult.load(result.save(tmp_path / "r.pt"))
    assert loaded.layers == (0, 1) and all(type(layer) is int for layer in loaded.layers)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_every_single_byte_flip_is_refused_or_harmless(tmp_path):
    """Flip every third byte of a saved file in turn (one at a time): the load either raises
    ResultFileError or returns exactly the saved result (flips in parts torch does not read, such as zip
    record names and alignment padding, change nothing). Measured over every byte of a 2421-byte file:
    1563 refused (376 of them by the checksum alone), 858 identical, none different."""
    result = make_result(labels=("BOS", "A"))
    good = result.save(tmp_path / "good.pt").read_bytes()
    path = tmp_path / "flipped.pt"
    outcomes = {"refused": 0, "identical": 0}
    for at in range(0, len(good), 3):
        path.write_bytes(_flip(good, at))
        try:
            loaded = PatchingResult.load(path)
        except ResultFileError:
            outcomes["refused"] += 1
            continue
        _assert_same(loaded, result)
        assert loaded.metadata == result.metadata
        outcomes["identical"] += 1
    assert outcomes["refused"] > len(good) // 6, outcomes
