"""Mistaken inputs (issue 15, items 4, 8 and 9): each gets a clear error naming what was given and what
was expected, instead of an exception from deep inside torch or relp, or a silently wrong number.

The table below is the record of the inputs tried: every row asserts the error type and that the
message names both the value given and what was expected. Rows for inputs that were already clear before
the change are kept as regression checks (marked ``was_clear``).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import relp
from relp.loading import load_model
from relp.metrics import LogitDiff, NormalizedLogitDiff, ProbDiff, agreement
from relp.results import PatchingResult
from relp.testing import tiny_hf_model, tiny_model, tiny_tokenizer
from relp.tokens import to_tokens

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = [relp.activation_patching, relp.attribution_patching, relp.relevance_patching]


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", n_layers=1, d_model=16)


@pytest.fixture(scope="module")
def batch(model):
    clean = torch.tensor([[0, 7, 8, 9, 10], [0, 11, 12, 13, 14]])
    corrupted = clean.clone()
    corrupted[:, 2] = torch.tensor([20, 21])
    return clean, corrupted, LogitDiff(torch.tensor([30, 31]), torch.tensor([32, 33]))


def _words(n: int) -> str:
    return " ".join(f"w{i % 58}" for i in range(n))


def _call(model, batch, **change):
    clean, corrupted, metric = batch
    args = dict(model=model, clean=clean, corrupted=corrupted, metric=metric, components=["resid_pre"])
    args.update(change)
    method = args.pop("method", relp.activation_patching)
    if method is relp.activation_patching:
        args["progress"] = False
    return method(args.pop("model"), args.pop("clean"), args.pop("corrupted"), args.pop("metric"), **args)


def _logits(batch=2, positions=5, vocab=66):
    return torch.randn(batch, positions, vocab, generator=torch.Generator().manual_seed(0))


# (id, action(model, batch), error type, fragments the message must contain: what was given, what was expected)
CASES = [
    # --- item 8: token ids, empty tensors
    ("token id above the vocabulary", lambda m, b: _call(m, b, clean=torch.tensor([[0, 7, 8, 9, 70], [0, 7, 8, 9, 10]])),
     ValueError, ["70", "0..65", "d_vocab=66"]),
    ("negative token id", lambda m, b: to_tokens(m, torch.tensor([[0, -1, 8]])), ValueError, ["-1", "0..65"]),
    ("zero-length token tensor", lambda m, b: _call(m, b, clean=torch.zeros(2, 0, dtype=torch.long),
                                                    corrupted=torch.zeros(2, 0, dtype=torch.long)),
     ValueError, ["empty", r"\(2, 0\)", "at least one"]),
    ("zero-prompt token tensor", lambda m, b: to_tokens(m, torch.zeros(0, 5, dtype=torch.long)),
     ValueError, ["empty", r"\(0, 5\)"]),
    # --- item 8: the model
    ("model=None", lambda m, b: _call(None, b), TypeError, ["got None", "TransformerBridge"]),
    ("model=None (AtP)", lambda m, b: _call(None, b, method=relp.attribution_patching), TypeError, ["got None", "TransformerBridge"]),
    ("raw Hugging Face model", lambda m, b: _call(tiny_hf_model("gpt2", vocab_size=66, n_layers=1, d_model=16), b,
                                                  method=relp.relevance_patching),
     TypeError, ["GPT2LMHeadModel", "TransformerBridge", "load_model"]),
    # --- item 8: layers and components
    ("layers=1", lambda m, b: _call(m, b, layers=1), TypeError, ["int 1", r"\[1\]", "iterable of layer indices"]),
    ("layers='0'", lambda m, b: _call(m, b, layers="0"), TypeError, ["'0'", "iterable of layer indices"]),
    ("layers=[0.5]", lambda m, b: _call(m, b, layers=[0.5]), TypeError, ["0.5", "integer layer indices"]),
    ("layers=[True]", lambda m, b: _call(m, b, layers=[True]), TypeError, ["True", "integer layer indices"]),
    ("layers=[5] (was_clear)", lambda m, b: _call(m, b, layers=[5]), ValueError, [r"\[5\]", "0..0"]),
    ("components=None", lambda m, b: _call(m, b, components=None), TypeError, ["None", "component name", "resid_pre"]),
    ("components=3", lambda m, b: _call(m, b, components=3, method=relp.attribution_patching), TypeError, ["got 3", "component name"]),
    # --- item 8: metrics
    ("metric=True (was_clear)", lambda m, b: _call(m, b, metric=True), TypeError, ["bool", "callable"]),
    ("bool-valued metric", lambda m, b: _call(m, b, metric=lambda logits: logits[:, -1, 30].mean() > 0),
     TypeError, ["torch.bool", "floating-point scalar"]),
    ("bool-valued metric (RelP)", lambda m, b: _call(m, b, metric=lambda logits: logits[:, -1, 30].mean() > 0,
                                                     method=relp.relevance_patching),
     TypeError, ["torch.bool", "floating-point scalar"]),
    ("answer ids as strings", lambda m, b: LogitDiff(["w3", "w4"], [32, 33]), TypeError, ["'w3'", "token ids"]),
    ("answer id as one string", lambda m, b: ProbDiff("w3", 32), TypeError, ["'w3'", "token ids"]),
    ("answer id above the vocabulary", lambda m, b: LogitDiff(torch.tensor([30, 99]), torch.tensor([32, 33]))(_logits()),
     ValueError, ["99", "0..65", "66 entries"]),
    ("answer id above the vocabulary, in patching",
     lambda m, b: _call(m, b, metric=LogitDiff(torch.tensor([30, 99]), torch.tensor([32, 33])), method=relp.attribution_patching),
     ValueError, ["99", "0..65"]),
    ("negative answer id", lambda m, b: LogitDiff([30, -2], [32, 33]), ValueError, ["-2", "0..vocab-1"]),
    ("position out of range", lambda m, b: LogitDiff([30, 31], [32, 33], position=7)(_logits()),
     IndexError, ["position 7", "5 positions", "-5..4"]),
    ("negative position out of range", lambda m, b: _call(m, b, metric=LogitDiff([30, 31], [32, 33], position=-6)),
     IndexError, ["position -6", "5 positions"]),
    ("per-prompt positions out of range", lambda m, b: LogitDiff([30, 31], [32, 33], position=torch.tensor([1, 9]))(_logits()),
     IndexError, ["9", "5 positions"]),
    ("position as a float", lambda m, b: LogitDiff([30, 31], [32, 33], position=2.0), TypeError, ["float", "int"]),
    # --- item 9: nonsense accepted silently
    ("float answer ids", lambda m, b: LogitDiff(torch.tensor([30.7, 31.2]), torch.tensor([32, 33])),
     TypeError, ["torch.float32", "integers", "not truncated"]),
    ("float wrong ids (list)", lambda m, b: NormalizedLogitDiff([30, 31], [32.0, 33.0], 1.0, 0.0), TypeError, ["float64", "integers"]),
    ("bool answer ids", lambda m, b: LogitDiff(torch.tensor([True, False]), torch.tensor([32, 33])), TypeError, ["torch.bool", "integers"]),
    ("agreement top_k=-3", lambda m, b: agreement(_result(0), _result(1), top_k=-3), ValueError, ["-3", "positive integer"]),
    ("agreement top_k=0", lambda m, b: agreement(_result(0), _result(1), top_k=0), ValueError, ["got 0", "positive integer"]),
    ("agreement top_k=2.5", lambda m, b: agreement(_result(0), _result(1), top_k=2.5), ValueError, ["2.5", "positive integer"]),
    ("rules='half' on a model without a gated MLP", lambda m, b: _call(m, b, method=relp.relevance_patching, rules="half"),
     ValueError, ["'half'", "no gated MLP", "at least one rule"]),
    ("only norm kinds the model lacks", lambda m, b: _call(m, b, method=relp.relevance_patching, rules=["ln_post", "ln_qk"]),
     ValueError, ["ln_post", "ln_qk", "at least one rule"]),
    ("load_model(bridge, dtype=float16)", lambda m, b: load_model(m, dtype=torch.float16), ValueError,
     ["torch.float16", "torch.float32", "as it is"]),
    ("load_model(bridge, device='meta')", lambda m, b: load_model(m, device="meta"), ValueError, ["'meta'", "cpu", "as it is"]),
    # --- item 4: long texts and token tensors
    ("text longer than the context", lambda m, b: to_tokens(m, _words(70)), ValueError, ["71 tokens", "n_ctx=64"]),
    ("texts equal up to the limit", lambda m, b: _call(m, b, clean=_words(63) + " w1", corrupted=_words(63) + " w2"),
     ValueError, ["65 tokens", "n_ctx=64"]),
    ("texts of different lengths beyond the limit", lambda m, b: to_tokens(m, [_words(70), _words(80)]),
     ValueError, ["71 tokens", "n_ctx=64"]),
    ("token tensor longer than the context", lambda m, b: _call(m, b, clean=torch.full((2, 65), 7), corrupted=torch.full((2, 65), 8),
                                                                 method=relp.attribution_patching),
     ValueError, ["65 tokens", "n_ctx=64"]),
]


def _result(seed: int) -> PatchingResult:
    g = torch.Generator().manual_seed(seed)
    return PatchingResult(scores={"resid_pre": torch.randn(2, 6, generator=g)}, method="attribution_patching",
                          metric="m", direction="denoising", layers=(0, 1))


@pytest.mark.parametrize("action, error, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistaken_input_gets_a_clear_error(model, batch, action, error, fragments):
    with pytest.raises(error) as info:
        action(model, batch)
    message = str(info.value)
    missing = [f for f in fragments if not re.search(f, message)]
    assert not missing, f"message {message!r} lacks {missing}"


def test_long_text_is_refused_by_the_sentence_embedding():
    encoder = tiny_model("bert", n_layers=1, d_model=16)
    readout = relp.embeddings.SentenceEmbedding()
    assert readout.embed(encoder, ["w1 w2", "w3"]).shape == (2, 16)  # short texts of any lengths still work
    with pytest.raises(ValueError, match=r"65 tokens.*n_ctx=64"):
        readout.embed(encoder, ["w1 w2", _words(64)])


def test_text_at_the_context_limit_still_works(model):
    tokens = to_tokens(model, _words(63))  # 63 words + BOS = n_ctx
    assert tokens.shape == (1, 64)
    assert tokens[0, 0] == model.tokenizer.bos_token_id


def test_valid_ids_still_accepted(model, batch):
    """Ints, lists, numpy and int32 arrays, 0-d tensors and negative positions are accepted as before."""
    logits = _logits()
    reference = logits[:, -1, 30] - logits[:, -1, 32]
    for answer, wrong in [(30, 32), ([30, 30], [32, 32]), (np.array([30, 30]), np.array([32, 32], dtype=np.int32)),
                          (torch.tensor(30), torch.tensor([32, 32], dtype=torch.int32))]:
        torch.testing.assert_close(LogitDiff(answer, wrong).per_prompt(logits), reference, rtol=0, atol=0)
    torch.testing.assert_close(LogitDiff(30, 32, position=4)(logits), reference.mean(), rtol=0, atol=0)
    assert load_model(model, dtype=torch.float32, device="cpu") is model


def test_top_k_overlap_is_nan_with_a_warning_when_k_covers_every_cell():
    a, b = _result(0), _result(1)  # 12 cells
    with pytest.warns(UserWarning, match=r"top_k=12 .*\['resid_pre'\].*\[12\] cells.*NaN"):
        table = agreement(a, b, top_k=12)
    assert np.isnan(table.loc["resid_pre", "top_k_overlap"])
    # below the number of cells the overlap is computed, against a hand count
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = agreement(a, b, top_k=3)
    top_a = set(np.argsort(-np.abs(a["resid_pre"].numpy().ravel()))[:3])
    top_b = set(np.argsort(-np.abs(b["resid_pre"].numpy().ravel()))[:3])
    assert table.loc["resid_pre", "top_k_overlap"] == len(top_a & top_b) / 3
