"""The three scoring methods against independent oracles, and their input validation."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformer_lens.patching as tl_patching

import relp
from _prompt_pairs import changed_at_2_and_4
from relp.testing import tiny_model

ARCHS = ["gpt2", "llama"]


_prompts = changed_at_2_and_4


@pytest.fixture(scope="module", params=ARCHS)
def model64(request):
    return tiny_model(request.param, dtype=torch.float64, n_layers=3)


@pytest.fixture
def float64_default():
    """transformer_lens.patching stores results in the default dtype: make it float64 for the oracle."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ----------------------------------------------------------------------------------------------
# Activation patching equals transformer_lens.patching


@pytest.mark.parametrize(
    "component, tl_function, to_tl_layout",
    [
        ("resid_pre", tl_patching.get_act_patch_resid_pre, lambda s: s),
        ("attn_out", tl_patching.get_act_patch_attn_out, lambda s: s),
        ("mlp_out", tl_patching.get_act_patch_mlp_out, lambda s: s),
        # TransformerLens orders head scores [layer, pos, head]; relp uses [layer, head, pos]
        ("head", tl_patching.get_act_patch_attn_head_out_by_pos, lambda s: s.transpose(1, 2)),
    ],
)
def test_activation_patching_matches_transformer_lens(model64, component, tl_function, to_tl_layout, float64_default):
    clean, corrupted, metric = _prompts(model64)
    ours = relp.activation_patching(model64, clean, corrupted, metric, [component], progress=False, batch_size=8)
    _, clean_cache = model64.run_with_cache(clean)
    with torch.no_grad():
        corrupted_value = metric(model64(corrupted))
    theirs = tl_function(model64, corrupted, clean_cache, metric) - corrupted_value
    # float64 throughout; the only difference is the batch layout of the forward passes (rounding ~1e-15)
    torch.testing.assert_close(to_tl_layout(ours[component]).double(), theirs.double(), rtol=1e-9, atol=1e-9)
    assert ours[component].abs().max() > 1e-3  # the comparison is not between two zero maps


def test_noising_direction_matches_transformer_lens(model64, float64_default):
    clean, corrupted, metric = _prompts(model64)
    ours = relp.activation_patching(model64, clean, corrupted, metric, ["resid_pre"], direction="noising", progress=False)
    _, corrupted_cache = model64.run_with_cache(corrupted)
    with torch.no_grad():
        clean_value = metric(model64(clean))
    theirs = tl_patching.get_act_patch_resid_pre(model64, clean, corrupted_cache, metric) - clean_value
    torch.testing.assert_close(ours["resid_pre"].double(), theirs.double(), rtol=1e-9, atol=1e-9)
    assert theirs.abs().max() > 1e-3  # the comparison is not between two zero maps


def test_replaying_early_blocks_does_not_change_activation_patching(model64):
    clean, corrupted, metric = _prompts(model64)
    components = ["resid_pre", "resid_mid", "mlp_out", "head"]
    fast = relp.activation_patching(model64, clean, corrupted, metric, components, progress=False)
    slow = relp.activation_patching(model64, clean, corrupted, metric, components, progress=False, skip_early_layers=False)
    for component in components:
        torch.testing.assert_close(fast[component], slow[component], rtol=1e-9, atol=1e-12)
        # not vacuous: cells in layers >= 1 (where early blocks are replayed) carry real effects
        assert slow[component][1:].abs().max() > 1e-3, component


def test_keeping_only_the_last_logits_does_not_change_a_last_token_metric(model64):
    clean, corrupted, metric = _prompts(model64)
    full = relp.activation_patching(model64, clean, corrupted, metric, ["resid_pre", "attn_out"], progress=False)
    last = relp.activation_patching(model64, clean, corrupted, metric, ["resid_pre", "attn_out"], progress=False, logits_to_keep=1)
    for component in ("resid_pre", "attn_out"):
        torch.testing.assert_close(full[component], last[component], rtol=1e-9, atol=1e-12)
        assert full[component].abs().max() > 1e-3, component  # not a comparison of zero maps
    with pytest.raises(ValueError, match="logits_to_keep must be in 1..7"):
        relp.activation_patching(model64, clean, corrupted, metric, ["resid_pre"], progress=False, logits_to_keep=9)


def test_batch_size_does_not_change_activation_patching(model64):
    clean, corrupted, metric = _prompts(model64)
    one = relp.activation_patching(model64, clean, corrupted, metric, ["resid_pre", "head"], batch_size=1, progress=False)
    many = relp.activation_patching(model64, clean, corrupted, metric, ["resid_pre", "head"], batch_size=64, progress=False)
    for component in ("resid_pre", "head"):
        torch.testing.assert_close(one[component], many[component], rtol=1e-9, atol=1e-9)
        assert one[component].abs().max() > 1e-3, component  # not a comparison of zero maps


# ----------------------------------------------------------------------------------------------
# resid_mid: the whole residual stream between attention and MLP


def _without_mlps(architecture):
    """A float64 model whose MLPs output exactly zero, so resid_mid[l] == resid_post[l] == resid_pre[l+1]."""
    model = tiny_model(architecture, dtype=torch.float64, n_layers=3)
    for block in model.blocks:
        with torch.no_grad():
            for parameter in block.mlp.out.parameters():
                parameter.zero_()
    return model


@pytest.mark.parametrize("architecture", ARCHS)
def test_resid_mid_patches_the_residual_stream(architecture, float64_default):
    model = _without_mlps(architecture)
    clean, corrupted, metric = _prompts(model)
    components = ["resid_pre", "resid_mid", "resid_post"]
    for method in (relp.activation_patching, relp.attribution_patching):
        kwargs = {"progress": False} if method is relp.activation_patching else {}
        result = method(model, clean, corrupted, metric, components, **kwargs)
        torch.testing.assert_close(result["resid_mid"], result["resid_post"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result["resid_mid"][:-1], result["resid_pre"][1:], rtol=1e-9, atol=1e-12)
        assert result["resid_mid"].abs().max() > 1e-3
    # TransformerLens's own hook_resid_mid is the norm's input on the bridge: patching it misses the
    # residual connection, which is why relp does not use it.
    _, clean_cache = model.run_with_cache(clean)
    with torch.no_grad():
        corrupted_value = metric(model(corrupted))
    theirs = tl_patching.get_act_patch_resid_mid(model, corrupted, clean_cache, metric) - corrupted_value
    assert theirs.abs().max() < 1e-12


def test_resid_mid_is_refused_where_it_is_not_resid_pre_plus_attn_out(monkeypatch):
    """A post-LN block (BERT) without its entry in relp.architectures (read as a pre-norm decoder):
    resid_pre + attn_out is not the stream entering the MLP there, and the run check refuses resid_mid
    instead of patching a wrong sum."""
    import dataclasses

    import relp.architectures

    model = tiny_model("bert")
    unlisted = dataclasses.replace(relp.architectures.DEFAULT, name="bert", classes=("BertForMaskedLM",))
    monkeypatch.setitem(relp.architectures.ARCHITECTURES, "bert", unlisted)
    clean, corrupted, metric = _prompts(model)
    with pytest.raises(ValueError, match="resid_mid is not defined"):
        relp.attribution_patching(model, clean, corrupted, metric, ["resid_mid"])


# ----------------------------------------------------------------------------------------------
# Attribution patching is exact where the metric is linear in the component


@pytest.mark.parametrize("architecture", ARCHS)
@pytest.mark.parametrize(
    "components, zero_last_mlp",
    [(["mlp_out", "resid_post"], False), (["attn_out", "head"], True)],
)
def test_attribution_patching_is_exact_for_a_linear_metric(architecture, components, zero_last_mlp):
    """With a final norm whose epsilon dwarfs the variance, the logits are affine in the last block's
    output, so AtP must equal activation patching for mlp_out and resid_post of the last layer; with
    the last MLP switched off (output exactly zero) also for its attention output and heads."""
    model = tiny_model(architecture, dtype=torch.float64, n_layers=2)
    # the bridge computes the norm either with HF's module or on its own path with its config's eps
    final_norm = model.ln_final.original_component
    setattr(final_norm, "eps" if hasattr(final_norm, "eps") else "variance_epsilon", 1e12)
    model.ln_final.config.eps = 1e12
    if zero_last_mlp:
        with torch.no_grad():
            for parameter in model.blocks[-1].mlp.out.parameters():
                parameter.zero_()
    clean, corrupted, metric = _prompts(model)
    scale = 1e10  # logits shrink by sqrt(eps) = 1e6 and random weights are small: rescale to O(1)
    linear_metric = lambda logits: scale * metric(logits)  # noqa: E731
    last = [model.cfg.n_layers - 1]
    ap = relp.activation_patching(model, clean, corrupted, linear_metric, components, layers=last, progress=False)
    atp = relp.attribution_patching(model, clean, corrupted, linear_metric, components, layers=last)
    for component in components:
        assert ap[component].abs().max() > 1e-2
        # What is left of the norm's non-linearity is var/eps ~ 1e-15 relative. GPT-2 runs in float64
        # throughout (rounding of metric values ~30 gives ~1e-14 absolute); HF's LlamaRMSNorm computes in
        # float32 even in a float64 model, so there the metric carries float32 rounding: 30 * 6e-8 ~ 2e-6.
        atol = 1e-12 if architecture == "gpt2" else 1e-5
        torch.testing.assert_close(atp[component], ap[component], rtol=1e-10, atol=atol)
    # ...while in the first layer (activation, softmax and norms in between) AtP is only an approximation
    early_ap = relp.activation_patching(model, clean, corrupted, linear_metric, components, layers=[0], progress=False)
    early_atp = relp.attribution_patching(model, clean, corrupted, linear_metric, components, layers=[0])
    assert not torch.allclose(early_ap[components[0]], early_atp[components[0]], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["activation_patching", "attribution_patching", "relevance_patching"])
def test_float32_scores_match_float64(method, float64_default):
    """The float32 bridge path gives the same maps as float64 to float32 precision, for every method,
    and the float64 maps are true: activation patching's equal transformer_lens.patching's (float64, the
    same oracle as above); those of AtP and RelP are checked against the hand-written float64 reference
    in float32 and float64 by test_gradient_methods_equal_the_textbook_reference below.
    (Same weights: both models come from one seeded float32 initialisation. The metric is a logit
    difference of size O(1): float32 rounds it at ~1e-7; observed differences are <= 5e-8, and the
    largest scores are ~1e-2, far above atol 1e-5.)"""
    torch.set_default_dtype(torch.float32)  # both models, and their runs, as without the fixture
    model32 = tiny_model("llama", n_layers=2)
    model64 = tiny_model("llama", n_layers=2, dtype=torch.float64)
    clean, corrupted, metric = _prompts(model32)
    kwargs = {"progress": False} if method == "activation_patching" else {}
    components = ["resid_pre", "attn_out", "mlp_out"]
    s32 = getattr(relp, method)(model32, clean, corrupted, metric, components, **kwargs)
    s64 = getattr(relp, method)(model64, clean, corrupted, metric, components, **kwargs)
    torch.set_default_dtype(torch.float64)  # transformer_lens.patching's results, for the oracle
    if method == "activation_patching":
        _, clean_cache = model64.run_with_cache(clean)
        with torch.no_grad():
            corrupted_value = metric(model64(corrupted))
        for component, tl_function in [
            ("resid_pre", tl_patching.get_act_patch_resid_pre),
            ("attn_out", tl_patching.get_act_patch_attn_out),
            ("mlp_out", tl_patching.get_act_patch_mlp_out),
        ]:
            oracle = tl_function(model64, corrupted, clean_cache, metric) - corrupted_value
            torch.testing.assert_close(s64[component], oracle.double(), rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(s32[component].double(), oracle.double(), rtol=1e-4, atol=1e-5)
    for component in components:
        assert s32[component].dtype == torch.float32 and s64[component].dtype == torch.float64
        torch.testing.assert_close(s32[component].double(), s64[component], rtol=1e-4, atol=1e-5)
        assert s64[component].abs().max() > 1e-3, component  # not a comparison of zero maps


# ----------------------------------------------------------------------------------------------
# AtP and RelP equal a hand-written reference; the Half-rule conserves relevance


def _reference_prompts(c, n_prompts=2, seed=0):
    """Prompts for a case of tests/test_rules_reference.py: its first token (BOS, CLS for BERT) first,
    corrupted copies differing at positions 2 and 4, and answer / wrong token ids."""
    g = torch.Generator().manual_seed(seed)
    first, vocab = len(relp.testing.SPECIAL_TOKENS), c.bridge.cfg.d_vocab
    clean = torch.randint(first, vocab, (n_prompts, c.tokens.shape[1]), generator=g)
    clean[:, 0] = c.tokens[0, 0]
    corrupted = clean.clone()
    corrupted[:, [2, 4]] = torch.randint(first, vocab, (n_prompts, 2), generator=g)
    answer, wrong = torch.randint(first, vocab, (2, n_prompts), generator=g)
    return clean, corrupted, answer, wrong


def _reference_resid_scores(c, clean, corrupted, answer, wrong, rules) -> torch.Tensor:
    """The denoising score of ``blocks.0.hook_resid_pre`` per position, from the textbook float64
    forward pass of tests/test_rules_reference.py under `rules`: ``(embed(clean) - embed(corrupted)) .
    d LD / d resid`` at the corrupted run, summed over the batch and the hidden dimension, where LD is
    the batch mean of logit[answer] - logit[wrong] at the last position."""
    from test_rules_reference import EMBED, REFERENCE

    with torch.no_grad():
        source, base = EMBED[c.arch](c.ref, clean), EMBED[c.arch](c.ref, corrupted)
    x = base.clone().requires_grad_(True)
    logits = REFERENCE[c.arch](c.ref, x, frozenset(rules))[:, -1]
    rows = torch.arange(len(answer))
    (grad,) = torch.autograd.grad((logits[rows, answer] - logits[rows, wrong]).mean(), x)
    return ((source - base) * grad).sum(dim=(0, 2))


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "bert"])
def test_gradient_methods_equal_the_textbook_reference(architecture):
    """AtP, RelP with no rule, and RelP with the paper's rules, at the residual stream entering block 0
    (so the whole model's backward pass is in the score), equal the score computed by autograd through
    the hand-written float64 forward passes of tests/test_rules_reference.py (the rules written the
    textbook way). Float64 bridge: rtol 1e-9 as there (observed ~1e-15); float32 bridge (same weights up
    to float32 rounding of the randomised ones): rtol 1e-4 and atol 1e-5 of the largest score, as
    float32 rounding through two blocks gives ~1e-6."""
    from test_rules_reference import case, case32, rule_names

    c64 = case(architecture)
    clean, corrupted, answer, wrong = _reference_prompts(c64)
    metric = relp.LogitDiff(answer, wrong)
    paper_rules = rule_names(c64, "relp")  # ln + identity (+ half on the gated Llama MLP)
    expected = {
        "atp": _reference_resid_scores(c64, clean, corrupted, answer, wrong, ()),
        "relp": _reference_resid_scores(c64, clean, corrupted, answer, wrong, paper_rules),
    }
    # Not vacuous: the maps are far from zero, zero exactly where nothing changed (positions 0, 1, 3, 5,
    # 6), and the rules change them far beyond the tolerance.
    changed = torch.zeros(clean.shape[1], dtype=torch.bool)
    changed[[2, 4]] = True
    for scores in expected.values():
        assert scores[changed].abs().min() > 1e-3 and (scores[~changed] == 0).all()
    assert (expected["relp"] - expected["atp"]).abs().max() > 1e-2 * expected["atp"].abs().max()
    for c, rtol, atol in ((c64, 1e-9, 1e-10), (case32(architecture), 1e-4, 1e-5)):
        atp = relp.attribution_patching(c.bridge, clean, corrupted, metric, ["resid_pre"], layers=[0])
        gradient = relp.relevance_patching(c.bridge, clean, corrupted, metric, ["resid_pre"], rules="gradient", layers=[0])
        rp = relp.relevance_patching(c.bridge, clean, corrupted, metric, ["resid_pre"], layers=[0])
        assert atp.rules == () and gradient.rules == () and set(rp.rules) == paper_rules
        assert rp.method == "relevance_patching" and rp.label == "RelP" and atp.label == "AtP"
        assert ("half" in rp.metadata["rules_not_applicable"]) is (architecture != "llama")
        for result, key in ((atp, "atp"), (gradient, "atp"), (rp, "relp")):
            scale = expected[key].abs().max().item()
            torch.testing.assert_close(
                result["resid_pre"][0].double(), expected[key], rtol=rtol, atol=atol * scale,
                msg=lambda m: f"{architecture} {result.method} {result.rules} {c.bridge.cfg.dtype}: {m}",
            )


def test_half_rule_conserves_relevance_across_the_gate_product():
    """Under identity + half, g.dm/dg + u.dm/du equals h.dm/dh for h = act(g) * u, per position."""
    model = tiny_model("llama", dtype=torch.float64)
    tokens, _, metric = _prompts(model, n_prompts=2)
    store = {}

    def keep(name):
        def hook(x, hook):
            store[name] = x
            return x

        return hook

    with relp.lrp_rules(model, "relp"):
        hooks = [(f"blocks.1.mlp.{n}", keep(n)) for n in ("hook_pre", "hook_pre_linear", "hook_post")]
        with model.hooks(fwd_hooks=hooks):
            value = metric(model(tokens))
            grads = torch.autograd.grad(value, [store[n] for n in ("hook_pre", "hook_pre_linear", "hook_post")])
    gate, up, hidden = (store[n].detach() for n in ("hook_pre", "hook_pre_linear", "hook_post"))
    relevance_in = gate * grads[0] + up * grads[1]
    relevance_out = hidden * grads[2]
    torch.testing.assert_close(relevance_in, relevance_out, rtol=1e-10, atol=1e-14)
    assert relevance_out.abs().max() > 1e-6


# ----------------------------------------------------------------------------------------------
# Hooks are always removed


def _n_hooks(model) -> int:
    return sum(len(h._forward_hooks) + len(h._backward_hooks) for h in model.hook_dict.values())


def test_rules_can_be_entered_inside_no_grad():
    model = tiny_model("llama")
    tokens, _, _ = _prompts(model)
    with torch.no_grad():
        plain = model(tokens)
        with relp.lrp_rules(model, "relp"):
            ruled = model(tokens)
    assert torch.equal(plain, ruled)


def test_hooks_are_removed_after_an_exception_inside_the_rules_context():
    model = tiny_model("llama")
    assert _n_hooks(model) == 0
    with pytest.raises(KeyError):
        with relp.lrp_rules(model, "relp+ah"):
            assert _n_hooks(model) > 0
            raise KeyError("boom")
    assert _n_hooks(model) == 0


@pytest.mark.parametrize("method", ["activation_patching", "attribution_patching", "relevance_patching"])
def test_hooks_are_removed_when_the_metric_fails(method):
    model = tiny_model("gpt2")
    clean, corrupted, _ = _prompts(model)

    def failing_metric(logits):
        raise ZeroDivisionError("metric failed")

    with pytest.raises(ZeroDivisionError):
        getattr(relp, method)(model, clean, corrupted, failing_metric)
    assert _n_hooks(model) == 0


# ----------------------------------------------------------------------------------------------
# Bad input gives a clear error


@pytest.fixture(scope="module")
def small():
    return tiny_model("gpt2")


METHODS = [relp.activation_patching, relp.attribution_patching, relp.relevance_patching]


@pytest.mark.parametrize("method", METHODS)
def test_unequal_token_lengths_are_refused(small, method):
    clean, corrupted, metric = _prompts(small)
    with pytest.raises(ValueError, match=r"token lengths differ: 7 vs 6"):
        method(small, clean, corrupted[:, :6], metric)


@pytest.mark.parametrize("method", METHODS)
def test_unequal_batch_sizes_are_refused(small, method):
    clean, corrupted, metric = _prompts(small)
    with pytest.raises(ValueError, match=r"batch sizes differ: 3 vs 2"):
        method(small, clean, corrupted[:2], metric)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_component_is_refused(small, method):
    clean, corrupted, metric = _prompts(small)
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['mlp_in'\].*resid_pre"):
        method(small, clean, corrupted, metric, ["resid_pre", "mlp_in"])


@pytest.mark.parametrize("method", METHODS)
def test_non_scalar_metric_is_refused(small, method):
    clean, corrupted, metric = _prompts(small)
    with pytest.raises(ValueError, match=r"returned shape \(3,\).*expected a scalar"):
        method(small, clean, corrupted, lambda logits: logits[:, -1, 0])


@pytest.mark.parametrize("method", METHODS)
def test_nan_metric_is_refused(small, method):
    clean, corrupted, metric = _prompts(small)
    with pytest.raises(ValueError, match=r"returned nan.*finite"):
        method(small, clean, corrupted, lambda logits: logits.sum() * float("nan"))


@pytest.mark.parametrize("method", METHODS)
def test_training_mode_is_refused(method):
    model = tiny_model("gpt2")
    clean, corrupted, metric = _prompts(model)
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        method(model, clean, corrupted, metric)


def test_texts_of_different_token_lengths_are_refused(small):
    with pytest.raises(ValueError, match=r"tokenize to different lengths \[4, 5\]"):
        relp.to_tokens(small, ["w1 w2 w3", "w1 w2 w3 w4"])


def test_unknown_rule_preset_is_refused(small):
    clean, corrupted, metric = _prompts(small)
    with pytest.raises(ValueError, match=r"unknown rule preset 'lrp'.*relp"):
        relp.relevance_patching(small, clean, corrupted, metric, rules="lrp")


def test_text_inputs_work_and_label_positions(small):
    answer, wrong = small.to_single_token("w5"), small.to_single_token("w6")
    metric = relp.LogitDiff(torch.tensor([answer]), torch.tensor([wrong]))
    result = relp.attribution_patching(small, "w1 w2 w3", "w1 w9 w3", metric)
    assert result.tokens == ("<bos>", "w1", "w2", "w3")
    assert result["resid_pre"].shape == (small.cfg.n_layers, 4)


# ----------------------------------------------------------------------------------------------
# Prefix reuse and rows per pass


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
@pytest.mark.parametrize("logits_to_keep", [None, 1])
def test_prefix_reuse_computes_only_later_positions_and_changes_nothing(architecture, logits_to_keep):
    """Causal models (GPT-2; Llama with grouped-query attention and rotary positions): a patch at position
    p is run on positions p.. only, on the base run's keys and values, and every score equals the plain
    computation to float64 rounding (the forward passes differ only in their shapes)."""
    model = tiny_model(architecture, dtype=torch.float64, n_layers=3)
    clean, corrupted, metric = _prompts(model)  # corrupted at positions 2 and 4 of 7
    components = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "head", "neuron"]
    lengths: list[int] = []

    def record_length(x, hook):
        lengths.append(x.shape[1])
        return x

    with model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", record_length)]):
        reused = relp.activation_patching(model, clean, corrupted, metric, components, progress=False,
                                          logits_to_keep=logits_to_keep, batch_size=12)
    plain = relp.activation_patching(model, clean, corrupted, metric, components, progress=False,
                                     logits_to_keep=logits_to_keep, batch_size=12, reuse_prefix=False)
    assert reused.metadata["prefix_reuse"] and not plain.metadata["prefix_reuse"]
    # three full runs (the resid_mid check, the source and the base run), then passes of positions p..6,
    # p >= 2 the first patched position of the pass (cells are ordered by position)
    assert lengths[:3] == [7, 7, 7] and max(lengths[3:]) == 7 - 2 and min(lengths[3:]) >= 1
    for component in components:
        torch.testing.assert_close(reused[component], plain[component], rtol=1e-9, atol=1e-12)
        assert reused[component].abs().max() > 1e-5  # not two maps of zeros (single neurons move the metric least)


def test_prefix_reuse_fills_the_models_own_cache_and_is_off_for_encoders():
    from relp.interventions import PrefixReuse

    for architecture, causal in (("llama", True), ("bert", False)):
        model = tiny_model(architecture, n_layers=2)
        tokens = _prompts(model)[0]
        prefix = PrefixReuse(model, tokens)
        with torch.no_grad(), prefix.recording() as kwargs:
            model(tokens, **kwargs)
        assert bool(prefix.layers) is causal
        if causal:  # one (keys, values) pair per layer, every position, grouped-query heads
            assert len(prefix.layers) == model.cfg.n_layers
            keys, values = prefix.layers[0]
            assert keys.shape[0] == tokens.shape[0] and keys.shape[2] == tokens.shape[1] == values.shape[2]
            assert keys.shape[1] == model.cfg.n_key_value_heads


def test_rows_per_pass_follow_the_free_memory(monkeypatch):
    import relp.interventions as interventions

    model = tiny_model("llama", dtype=torch.float64, n_layers=2)
    clean, corrupted, metric = _prompts(model)
    row = interventions.row_bytes(model, clean.shape[1])
    assert row == 8 * (7 * (8 * 32 + 3 * 48 + 2 * 4 * 7) + 7 * model.cfg.d_vocab_out)
    monkeypatch.setattr(interventions, "free_memory", lambda device: 6 * row / interventions.MEMORY_FRACTION)
    assert interventions.rows_per_pass(model, clean.shape[1]) == 6
    small = relp.activation_patching(model, clean, corrupted, metric, ["resid_pre"], progress=False)
    assert small.metadata["rows_per_pass"] == 6  # two copies of the three prompts
    monkeypatch.setattr(interventions, "free_memory", lambda device: 1e15)
    assert interventions.rows_per_pass(model, clean.shape[1]) == interventions.MAX_ROWS
    large = relp.activation_patching(model, clean, corrupted, metric, ["resid_pre"], progress=False)
    torch.testing.assert_close(small["resid_pre"], large["resid_pre"], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        relp.activation_patching(model, clean, corrupted, metric, ["resid_pre"], progress=False, batch_size=0)


def _brute_force_plan_cost(starts, rows_per_copy, max_copies, positions_from, overhead):
    """The cheapest cost over every way to cut the copies where the position changes (each group then
    cut into passes of at most `max_copies`), by enumerating all subsets of cut points."""
    bounds = [i for i in range(1, len(starts)) if starts[i] != starts[i - 1]]
    best = float("inf")
    for chosen in itertools.product([False, True], repeat=len(bounds)):
        edges = [0] + [b for b, c in zip(bounds, chosen) if c] + [len(starts)]
        cost = 0.0
        for begin, end in zip(edges, edges[1:]):
            for a in range(begin, end, max_copies):
                b = min(a + max_copies, end)
                cost += overhead + (b - a) * rows_per_copy * positions_from(starts[a])
        best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_pass_plan_is_the_cheapest_split(seed):
    """plan_passes against enumeration of every split: same cost; its passes cover every copy once, in
    order, each within the copy limit and never cutting inside one position's copies unless full."""
    from relp.interventions import plan_passes

    g = torch.Generator().manual_seed(seed)
    length = 12
    starts = sorted(torch.randint(0, length, (int(torch.randint(1, 14, (), generator=g)),), generator=g).tolist())
    rows, max_copies = int(torch.randint(1, 5, (), generator=g)), int(torch.randint(1, 8, (), generator=g))
    overhead = float(torch.randint(0, 60, (), generator=g))
    positions_from = lambda p: length - p  # noqa: E731  (prefix reuse: positions p.. are computed)
    plan = plan_passes(starts, rows, max_copies, positions_from, overhead)
    assert [i for a, b in plan for i in range(a, b)] == list(range(len(starts)))
    assert all(0 < b - a <= max_copies for a, b in plan)
    cost = sum(overhead + (b - a) * rows * positions_from(starts[a]) for a, b in plan)
    assert cost == pytest.approx(_brute_force_plan_cost(starts, rows, max_copies, positions_from, overhead))


def test_pass_plan_extremes():
    from relp.interventions import plan_passes

    starts = [2, 2, 3, 5, 5, 5]
    # no prefix reuse (every pass computes every position): one pass, or as few as the limit allows
    assert plan_passes(starts, 1, 10, lambda p: 7, 0.0) == [(0, 6)]
    assert plan_passes(starts, 1, 4, lambda p: 7, 1.0) == [(0, 4), (4, 6)]
    # free passes: one per position; prohibitive passes: one in all
    assert plan_passes(starts, 1, 10, lambda p: 7 - p, 0.0) == [(0, 2), (2, 3), (3, 6)]
    assert plan_passes(starts, 1, 10, lambda p: 7 - p, 1e9) == [(0, 6)]
    with pytest.raises(ValueError, match="sorted"):
        plan_passes([3, 2], 1, 10, lambda p: 7 - p, 0.0)


def test_components_of_one_layer_share_passes(monkeypatch):
    """Cells of resid_pre, attn_out and mlp_out at one layer run in the same passes (one pass per layer
    when the rows allow and passes are never split), with the scores of one component at a time."""
    import relp.interventions as interventions

    model = tiny_model("llama", dtype=torch.float64, n_layers=3)
    clean, corrupted, metric = _prompts(model)
    components = ["resid_pre", "attn_out", "mlp_out"]
    together = relp.activation_patching(model, clean, corrupted, metric, components, progress=False, batch_size=300)
    assert together.metadata["forward_passes"] >= 3 + model.cfg.n_layers
    for key in interventions.PASS_OVERHEAD_ROWS:  # passes never split
        monkeypatch.setitem(interventions.PASS_OVERHEAD_ROWS, key, 1e12)
    packed = relp.activation_patching(model, clean, corrupted, metric, components, progress=False, batch_size=300)
    assert packed.metadata["forward_passes"] == 3 + model.cfg.n_layers
    for component in components:
        alone = relp.activation_patching(model, clean, corrupted, metric, [component], progress=False, batch_size=300)
        torch.testing.assert_close(packed[component], alone[component], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(together[component], alone[component], rtol=1e-9, atol=1e-12)
