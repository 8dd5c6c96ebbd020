"""Similarity explanations (relp.similarity): token-pair relevance (BiLRP) and interaction patching.

Oracles, all independent of the code under test:

* a bilinear toy encoder (a tiny BERT read at its input embeddings, pooled by a mean and mapped by a
  fixed matrix W, no bias): its pair relevance is exactly ``X_a W W^T X_b^T / (T_a T_b)``, written here
  from the input embeddings captured with a plain hook, and sums to the similarity;
* on the nonlinear tiny model, the explicit ``R_a R_b^T`` from one gradient per embedding dimension
  under ``relp.lrp_rules`` (the fast path uses batched VJPs and the transposition trick);
* the similarities of the four clean/corrupted combinations, recomputed with ``SentenceEmbedding.embed``.

Everything runs in float64, so equalities hold to ~1e-12 (sums of a few hundred products of O(1) terms
lose a few ulps, 1e-16 each); the projection test's bounds follow from the estimate's variance.
"""

from __future__ import annotations

import math

import pytest
import torch

import relp
from relp.embeddings import SentenceEmbedding
from relp.similarity import INPUT_HOOK, interaction_patching, pair_relevance, projection_error
from relp.testing import tiny_model

TEXT_A = "w1 w2 w3 w4"
TEXT_B = "w5 w6 w7 w8 w9 w10"
TOL = 1e-10


@pytest.fixture(scope="module")
def bert(single_thread):
    return tiny_model("bert", n_layers=2, dtype=torch.float64)


class LinearReadout:
    """The bilinear toy: the mean of the input embeddings times W (bias-free, linear in the inputs)."""

    name = "toy linear readout"

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.mean = SentenceEmbedding("mean", normalize=False, hook=INPUT_HOOK)

    def __call__(self, model, tokens):
        return self.mean(model, tokens) @ self.weight


def _inputs(model, text) -> torch.Tensor:
    """The input embeddings [pos, d] of a text, captured by a plain hook."""
    _, cache = model.run_with_cache(relp.to_tokens(model, text), names_filter=INPUT_HOOK)
    return cache[INPUT_HOOK][0].double()


def _hook_count(model) -> int:
    return sum(len(h._forward_hooks) + len(h._backward_hooks) for h in model.hook_dict.values())


# ----------------------------------------------------------------------------------------------
# Pair relevance


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("texts", [(TEXT_A, TEXT_B), (TEXT_B, TEXT_A)])
def test_bilinear_toy_is_exact(bert, similarity, texts):
    """R equals the closed form and sums to the similarity (both orders: the shorter text is the one
    whose per-dimension relevances are computed in full)."""
    weight = torch.randn(bert.cfg.d_model, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    readout = LinearReadout(weight)
    result = pair_relevance(bert, *texts, similarity=similarity, readout=readout)
    x_a, x_b = _inputs(bert, texts[0]), _inputs(bert, texts[1])
    e_a, e_b = x_a.mean(0) @ weight, x_b.mean(0) @ weight
    expected = (x_a @ weight) @ (x_b @ weight).T / (len(x_a) * len(x_b))
    score = float(e_a @ e_b)
    if similarity == "cosine":
        expected = expected / (e_a.norm() * e_b.norm())
        score = score / float(e_a.norm() * e_b.norm())
    assert result.matrix.shape == (len(x_a), len(x_b))
    torch.testing.assert_close(result.matrix, expected, rtol=0, atol=TOL * float(expected.abs().max()))
    assert result.similarity == pytest.approx(score, abs=TOL)
    assert abs(result.conservation_gap) < TOL
    assert result.tokens_a[0] == "<bos>" and len(result.tokens_b) == len(x_b)


def test_fast_path_equals_explicit_per_dimension_relevances(bert):
    """On the nonlinear model under the RelP rules: the batched, transposed computation equals R_a R_b^T
    built from one gradient per embedding dimension and side."""
    readout = SentenceEmbedding("mean", normalize=False)

    def per_dimension(text):
        store = {}

        def leaf(x, hook):
            store["x"] = x.detach().requires_grad_(True)
            return store["x"]

        with relp.lrp_rules(bert, "relp"), bert.hooks(fwd_hooks=[(INPUT_HOOK, leaf)]):
            u = readout(bert, relp.to_tokens(bert, text))[0]
            rows = [
                (torch.autograd.grad(u[m], store["x"], retain_graph=True)[0][0] * store["x"][0]).sum(-1)
                for m in range(u.shape[0])
            ]
        return torch.stack(rows, 1).detach(), u.detach()  # [pos, D]

    r_a, u_a = per_dimension(TEXT_A)
    r_b, u_b = per_dimension(TEXT_B)
    expected = r_a @ r_b.T
    for mode in ("forward", "reverse"):  # forward-mode rows of both sides; batched VJPs, transposed
        result = pair_relevance(bert, TEXT_A, TEXT_B, similarity="dot", readout=readout, rules="relp", mode=mode)
        torch.testing.assert_close(result.matrix, expected, rtol=0, atol=TOL * float(expected.abs().max()))
        assert result.metadata["computed_by"].startswith(mode)
    result = pair_relevance(bert, TEXT_A, TEXT_B, similarity="dot", readout=readout, rules="relp")
    assert result.metadata["computed_by"] == "forward mode: 2 passes"  # auto: forward mode where the rules allow
    assert result.similarity == pytest.approx(float(u_a @ u_b), abs=TOL)
    assert result.rules == ("ln", "identity")  # half does not apply to BERT
    # plain gradients are a different matrix (the rules act)
    plain = pair_relevance(bert, TEXT_A, TEXT_B, similarity="dot", readout=readout, rules="gradient")
    assert plain.rules == () and (plain.matrix - result.matrix).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("texts", [(TEXT_A, TEXT_B), ("w1 w2 w3", "w4 w5 w6")])
def test_swapping_texts_transposes(bert, texts):
    forward = pair_relevance(bert, *texts, readout=SentenceEmbedding("mean"))
    backward = pair_relevance(bert, *reversed(texts), readout=SentenceEmbedding("mean"))
    torch.testing.assert_close(backward.matrix, forward.matrix.T, rtol=0, atol=TOL * float(forward.matrix.abs().max()))
    assert backward.similarity == pytest.approx(forward.similarity, abs=TOL)
    assert backward.tokens_a == forward.tokens_b
    torch.testing.assert_close(forward.transpose().matrix, backward.matrix, rtol=0, atol=TOL)


def test_random_projection_converges_to_exact(bert):
    """E[P P^T] = I, so the estimate is unbiased and its relative error falls like 1/sqrt(k): averaged over
    3 seeds it shrinks from k=8 to k=4096 (by ~sqrt(512) ~ 23 in expectation; asserted: by 5) and is
    below 0.1 at k=4096 (about 0.03 expected for a 32-dimensional embedding)."""
    rows = projection_error(bert, TEXT_A, TEXT_B, ks=(8, 128, 4096), readout=SentenceEmbedding("mean"))
    errors = [row["relative_error"] for row in rows[1:]]
    assert rows[0]["k"] is None and rows[0]["relative_error"] == 0.0
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1 and errors[2] < errors[0] / 5
    # the same seed gives the same estimate, another seed another one
    one = pair_relevance(bert, TEXT_A, TEXT_B, readout=SentenceEmbedding("mean"), projection=8, seed=3)
    again = pair_relevance(bert, TEXT_A, TEXT_B, readout=SentenceEmbedding("mean"), projection=8, seed=3)
    other = pair_relevance(bert, TEXT_A, TEXT_B, readout=SentenceEmbedding("mean"), projection=8, seed=4)
    assert torch.equal(one.matrix, again.matrix) and not torch.equal(one.matrix, other.matrix)
    assert one.projection == 8 and one.metadata["computed_by"] == "reverse mode: 16 cotangents"


def test_result_helpers(bert):
    result = pair_relevance(bert, TEXT_A, TEXT_B, readout=SentenceEmbedding("mean"))
    top = result.top_pairs(3, exclude=("<bos>", "w1"))
    values = result.matrix.clone()
    values[[0, 1], :] = -math.inf  # tokens <bos> w1 w2 w3 w4 and <bos> w5 ... w10
    values[:, 0] = -math.inf
    flat = int(values.argmax())
    assert top[0][:2] == divmod(flat, values.shape[1]) and len(top) == 3
    assert top[0][4] >= top[1][4] >= top[2][4]
    assert result.top_pairs(1, absolute=True)[0][4] == pytest.approx(float(result.matrix.abs().max() * torch.sign(result.matrix.flatten()[result.matrix.abs().argmax()])))
    table = result.to_dataframe()
    assert len(table) == result.matrix.numel() and table.relevance.sum() == pytest.approx(float(result.matrix.sum()))
    assert "PairRelevance(cosine=" in repr(result)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        result.top_pairs(0)


# ----------------------------------------------------------------------------------------------
# Interaction patching


def test_interaction_exact_terms_sum_to_total(bert):
    readout = SentenceEmbedding("mean")
    a = ("w1 w2 w3 w4", "w1 w9 w3 w4")
    b = ("w5 w6 w7 w8 w9", "w5 w6 w7 w20 w9")
    result = interaction_patching(bert, a, b, readout=readout)
    e = readout.embed(bert, [a[0], a[1], b[0], b[1]]).double()
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    clean, corrupted = cos(e[0], e[2]), cos(e[1], e[3])
    exact = result.exact
    assert result.clean_similarity == pytest.approx(clean, abs=TOL)
    assert result.corrupted_similarity == pytest.approx(corrupted, abs=TOL)
    assert exact.total == pytest.approx(clean - corrupted, abs=TOL)
    assert exact.side_a + exact.side_b + exact.interaction == pytest.approx(exact.total, abs=TOL)
    assert exact.side_a == pytest.approx(cos(e[0], e[3]) - corrupted, abs=TOL)
    assert exact.side_b == pytest.approx(cos(e[1], e[2]) - corrupted, abs=TOL)
    # one changed token per side: its cells are the whole-text terms
    assert result.changed_a == (2,) and result.changed_b == (4,)
    assert float(exact.scores["interaction"][0, 0]) == pytest.approx(exact.interaction, abs=1e-6)  # cells are float32
    assert float(exact.scores["side_a"][0]) == pytest.approx(exact.side_a, abs=1e-6)
    with pytest.warns(UserWarning, match="top_k=1 is at least the number of cells"):
        table = result.agreement(top_k=1)  # one cell per term here: the overlap is NaN, with a warning
    assert set(table.index) == {"side_a", "side_b", "interaction"}


def test_interaction_estimate_is_exact_for_bilinear_toy(bert):
    """For an embedding linear in the inputs and the dot product, first order is exact: the estimate
    equals double patching, cell by cell (two changed tokens on side a)."""
    weight = torch.randn(bert.cfg.d_model, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = ("w1 w2 w3 w4", "w1 w9 w3 w11")
    b = ("w5 w6 w7", "w5 w6 w30")
    result = interaction_patching(bert, a, b, similarity="dot", readout=LinearReadout(weight))
    assert result.changed_a == (2, 4) and result.changed_b == (3,)
    for term in ("side_a", "side_b", "interaction"):
        torch.testing.assert_close(result.estimate.scores[term], result.exact.scores[term], rtol=0, atol=1e-5)
        assert getattr(result.estimate, term) == pytest.approx(getattr(result.exact, term), abs=TOL)


# ----------------------------------------------------------------------------------------------
# Bad input and hooks


def test_bad_inputs_are_clear_errors(bert):
    readout = SentenceEmbedding("mean")
    hooks_before = _hook_count(bert)  # the bridge's own hooks
    with pytest.raises(ValueError, match=r"similarity must be one of \('cosine', 'dot'\); got 'euclidean'"):
        pair_relevance(bert, TEXT_A, TEXT_B, similarity="euclidean", readout=readout)
    with pytest.raises(ValueError, match=r"text_b is empty \('  '\)"):
        pair_relevance(bert, TEXT_A, "  ", readout=readout)
    with pytest.raises(ValueError, match="text_a is an empty token tensor"):
        pair_relevance(bert, torch.zeros(0, dtype=torch.long), TEXT_B, readout=readout)
    with pytest.raises(ValueError, match="must be one text; got a batch of 2"):
        pair_relevance(bert, relp.to_tokens(bert, ["w1 w2", "w3 w4"]), TEXT_B, readout=readout)
    for k in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match=f"projection must be None .* or a positive integer k .*; got {k!r}"):
            pair_relevance(bert, TEXT_A, TEXT_B, readout=readout, projection=k)
    with pytest.raises(TypeError, match="model must be a TransformerLens TransformerBridge.*got None"):
        pair_relevance(None, TEXT_A, TEXT_B)
    with pytest.raises(TypeError, match="got a torch.nn.modules.linear.Linear"):
        pair_relevance(torch.nn.Linear(2, 2), TEXT_A, TEXT_B)
    # not an embedder: no trained pooling recorded, and a readout that returns logits
    with pytest.raises(ValueError, match="not loaded from a sentence-transformers checkpoint.*Pass readout="):
        pair_relevance(bert, TEXT_A, TEXT_B)
    with pytest.raises(ValueError, match=r"must return embeddings \[batch, d\]; got \(1, 5, "):
        pair_relevance(bert, TEXT_A, TEXT_B, readout=lambda model, tokens: model(tokens))
    with pytest.raises(ValueError, match="unknown rule preset 'lrp'"):
        pair_relevance(bert, TEXT_A, TEXT_B, readout=readout, rules="lrp")
    with pytest.raises(ValueError, match="different token lengths"):
        interaction_patching(bert, ("w1 w2", "w1 w2 w3"), ("w4", "w5"), readout=readout)
    with pytest.raises(ValueError, match="are the same tokens"):
        interaction_patching(bert, ("w1 w2", "w1 w2"), ("w4", "w5"), readout=readout)
    with pytest.raises(TypeError, match=r"a must be a \(clean, corrupted\) pair"):
        interaction_patching(bert, "w1 w2", ("w4", "w5"), readout=readout)
    with relp.lrp_rules(bert, "relp"), pytest.raises(relp.RuleContextError, match="relp.pair_relevance"):
        pair_relevance(bert, TEXT_A, TEXT_B, readout=readout)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        pair_relevance(bert, TEXT_A, TEXT_B, readout=readout)
    assert _hook_count(bert) == hooks_before


def test_hooks_removed_after_exceptions(bert):
    hooks_before = _hook_count(bert)  # the bridge's own hooks

    class Failing:
        name = "failing readout"

        def __call__(self, model, tokens):
            SentenceEmbedding("mean")(model, tokens)  # runs the model under the rule and input hooks
            assert _hook_count(model) > hooks_before
            raise RuntimeError("readout failed")

    for function, args in ((pair_relevance, (TEXT_A, TEXT_B)), (interaction_patching, (("w1 w2", "w1 w3"), ("w4", "w5")))):
        with pytest.raises(RuntimeError, match="readout failed"):
            function(bert, *args, readout=Failing())
        assert _hook_count(bert) == hooks_before
    result = pair_relevance(bert, TEXT_A, TEXT_B, readout=SentenceEmbedding("mean"))  # still usable
    assert torch.isfinite(result.matrix).all()


@pytest.mark.parametrize("rules", ["relp", "gim"])
def test_forward_mode_equals_reverse_mode_on_a_decoder_embedder(rules):
    """A Llama used as an embedder exercises the other rules' forward derivatives: the fused RMSNorm
    LN-rule, the Identity- and Half-rule on the gated MLP (relp), the attnlrp gradient scaling (gim)."""
    model = tiny_model("llama", n_layers=2, dtype=torch.float64)
    readout = SentenceEmbedding("mean", normalize=False)
    forward = pair_relevance(model, TEXT_A, TEXT_B, similarity="dot", readout=readout, rules=rules, mode="forward")
    reverse = pair_relevance(model, TEXT_A, TEXT_B, similarity="dot", readout=readout, rules=rules, mode="reverse")
    assert set(forward.rules) >= ({"ln", "identity", "half"} if rules == "relp" else {"ln", "attnlrp"})
    # HF's LlamaRMSNorm computes in float32 even in a float64 model: float32 rounding
    torch.testing.assert_close(forward.matrix, reverse.matrix, rtol=0, atol=1e-5 * float(reverse.matrix.abs().max()))
    assert float(reverse.matrix.abs().max()) > 0
