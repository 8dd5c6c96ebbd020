"""The rules added for GIM and rule placement: softmax_t2, identity_eps, the per-site LN-rules (ln_attn,
ln_mlp, ln_final, ln_post, ln_qk, ln_embed), the ``gim`` and ``relp_eps`` presets, per-site liveness.

Oracles:

* gradients: the float64 hand-written references of ``test_rules_reference.py`` (extended there with
  these rules: the softmax backward at T=2 written out as GIM's formula ``q * (g - <g, q>)``,
  q = softmax(scores / 2) from the scores; the authors' Identity-rule denominator; the LN-rule per norm);
* softmax_t2 on one attention layer: the gradient with respect to the scores against the same formula,
  computed directly (masked entries included), in float64 and float16;
* forward values: ``torch.equal`` of the logits with and without each rule (float32 models);
* liveness: ``check_rules_live`` must reject a rule whose hooks at one kind of site are no-ops or give
  a non-finite gradient (builders monkeypatched to do that).
"""

from __future__ import annotations

import pytest
import torch
from test_rules_reference import (
    _build,
    _layer_norm,
    _zero_unit,
    assert_forward_unchanged,
    assert_matches,
    bert_reference,
    bridge_gradient,
    case,
    case32,
    reference_gradient,
)

import relp
import relp.loading
import relp.rules as rules_module
import relp.testing
from relp.rules import (
    RuleNotLiveError,
    check_rules_live,
    lrp_rules,
    norm_kinds,
    resolve_rules,
    rule_sites,
    softmax_temperature_path,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

ARCHS = ("gpt2", "llama", "bert")
# The new single rules that apply on each architecture (norm kinds written out by hand: GPT-2 and Llama
# are pre-LN, BERT post-LN with an embedding norm; ln_final is GPT-2's ln_f, Llama's norm, BERT's MLM
# head transform LayerNorm).
NEW_RULES = {
    "gpt2": ("softmax_t2", "identity_eps", "ln_attn", "ln_mlp", "ln_final"),
    "llama": ("softmax_t2", "identity_eps", "ln_attn", "ln_mlp", "ln_final"),
    "bert": ("softmax_t2", "identity_eps", "ln_final", "ln_post"),
}
NOT_APPLICABLE = {
    "gpt2": ("ln_post", "ln_qk", "ln_embed"),
    "llama": ("ln_post", "ln_qk", "ln_embed"),
    "bert": ("ln_attn", "ln_mlp", "ln_qk"),
}
PRESET_RULES = {  # written out here, not read from relp
    "gim": {"ln", "attnlrp", "softmax_t2"},
    "relp_eps": {"ln", "identity_eps", "half"},
}
# Float32 island: the bridged Llama computes the attention softmax in float32 (see test_rules_reference),
# so its pattern is float32-rounded (relative error <= 6e-8) and softmax_t2, which rebuilds q from the
# pattern (log p), inherits that error while the reference computes q from the float64 scores.
# Observed deviations <= 3e-8; 1e-6 keeps a margin of ~40x while the rule changes the gradient by more
# than 1e-1 there.
RTOL_FLOAT32_SOFTMAX = 1e-6


def _expand(arch: str, rules) -> frozenset[str]:
    names = set(PRESET_RULES[rules]) if isinstance(rules, str) else set(rules)
    if arch != "llama":
        names.discard("half")
    return frozenset(names)


def _gradient_cases():
    for arch in ARCHS:
        for rule in NEW_RULES[arch]:
            yield pytest.param(arch, (rule,), id=f"{arch}-rule:{rule}")
        yield pytest.param(arch, ("attnlrp", "softmax_t2"), id=f"{arch}-rules:attnlrp+softmax_t2")
        for preset in PRESET_RULES:
            yield pytest.param(arch, preset, id=f"{arch}-preset:{preset}")


@pytest.mark.parametrize(("arch", "rules"), list(_gradient_cases()))
def test_new_rule_gradient_matches_reference(arch, rules):
    """Gradient w.r.t. the block-0 residual input under the new rules equals the float64 reference's."""
    c = case(arch)
    names = _expand(arch, rules)
    assert set(resolve_rules(c.bridge, rules).active) == names
    logits, resid, (grad,), _ = bridge_gradient(c, rules)
    ref_logits, ref_grad = reference_gradient(c, resid, names)
    assert_matches(logits, ref_logits, f"{arch} {rules}: logits")
    assert torch.isfinite(grad).all()
    if arch == "llama" and "softmax_t2" in names:
        scale = ref_grad.abs().max().item()
        torch.testing.assert_close(grad, ref_grad, rtol=RTOL_FLOAT32_SOFTMAX, atol=RTOL_FLOAT32_SOFTMAX * scale)
        deviation = (grad - ref_grad).abs().max().item() / scale
    else:
        deviation = assert_matches(grad, ref_grad, f"{arch} {rules}: gradient")
    _, plain = reference_gradient(c, resid, ())
    change = (ref_grad - plain).abs().max().item() / plain.abs().max().item()
    print(f"{arch} {rules}: deviation {deviation:.1e}, change from plain {change:.1e}")
    assert change > 1e-2, f"{arch} {rules}: the rules barely change the gradient ({change:.2g})"


def test_embedding_norm_rule_matches_reference():
    """ln_embed (BERT's embedding LayerNorm): gradient w.r.t. the norm's input against the reference."""
    c = case("bert")
    store = {}

    def capture(x, hook):
        store["x"] = x = x.detach().requires_grad_(True)
        return x

    e = c.ref.bert.embeddings.LayerNorm
    for rules, ln_rule in ((None, False), (("ln_embed",), True)):
        context = lrp_rules(c.bridge, rules) if rules else torch.enable_grad()
        # The capture first: the rule's own hook at the same point must see the captured leaf.
        with c.bridge.hooks(fwd_hooks=[("embed_ln.hook_in", capture)]), context:
            logits = c.bridge(c.tokens)
            (grad,) = torch.autograd.grad((logits[0, -1] * c.direction).sum(), store["x"])
        x = store["x"].detach().clone().requires_grad_(True)
        ref_logits = bert_reference(c.ref, _layer_norm(x, e.weight, e.bias, e.eps, ln_rule=ln_rule))
        (ref_grad,) = torch.autograd.grad((ref_logits[0, -1] * c.direction).sum(), x)
        assert_matches(logits.detach(), ref_logits.detach(), f"ln_embed={ln_rule}: logits")
        assert_matches(grad, ref_grad, f"ln_embed={ln_rule}: gradient")
        if ln_rule:
            assert not torch.allclose(grad, plain_grad, rtol=1e-3)  # not vacuous
        plain_grad = grad


def test_identity_eps_at_exact_zero_gives_zero_gradient():
    """identity_eps divides act(0) = 0 by 1e-6 at an exact zero: gradient 0 there (relp's identity keeps
    act'(0)); the reference writes the authors' denominator out, and nothing is NaN."""
    c = _build("gpt2", hf_edit=_zero_unit("gpt2"))
    pre = [f"blocks.{layer}.mlp.hook_pre" for layer in range(c.bridge.cfg.n_layers)]
    _, resid, (grad, *grad_pre), acts = bridge_gradient(c, ("identity_eps",), wrt_hooks=pre)
    assert (acts[pre[-1]][..., 5] == 0).all()
    assert torch.isfinite(grad).all()
    assert (grad_pre[-1][..., 5] == 0).all()
    _, ref_grad = reference_gradient(c, resid, {"identity_eps"})
    assert_matches(grad, ref_grad, "identity_eps with a zero unit")
    # The stabiliser is visible at float64 tolerance: identity and identity_eps differ beyond it.
    _, _, (grad_identity, *_), _ = bridge_gradient(c, ("identity",), wrt_hooks=pre)
    assert (grad - grad_identity).abs().max() > 1e3 * 1e-9 * grad.abs().max()


# ----------------------------------------------------------------------------------------------
# softmax_t2 on one attention layer


def _gim_score_gradient(scores, g, temperature=2.0):
    """GIM's backward of softmax at temperature T, from the scores: q * (g - <g, q>), q = softmax(s/T)."""
    q = (scores.double() / temperature).softmax(-1)
    return q * (g.double() - (g.double() * q).sum(-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_softmax_temperature_path_on_one_layer(dtype):
    """grad w.r.t. the scores through softmax_temperature_path(softmax(scores)) = GIM's formula, with a
    causal mask (-inf: p == 0 exactly) and a fully masked row; forward value bit-identical."""
    generator = torch.Generator().manual_seed(0)
    n = 6
    scores = (3 * torch.randn(2, 3, n, n, generator=generator, dtype=torch.float64)).to(dtype)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf")).requires_grad_(True)
    g = torch.randn(2, 3, n, n, generator=generator, dtype=torch.float64).to(dtype)
    pattern = scores.softmax(-1)
    out = softmax_temperature_path(pattern)
    assert torch.equal(out, pattern) and out.dtype == dtype
    assert (pattern[..., ~mask] == 0).all()
    (grad,) = torch.autograd.grad((out * g).sum(), scores)
    expected = _gim_score_gradient(scores.detach(), g)
    assert torch.isfinite(grad).all() and (grad[..., ~mask] == 0).all()
    # float64: rounding of log/softmax (~1e-15); half precision: the pattern itself is rounded to 2^-11
    # (float16) or 2^-8 (bfloat16) relative before the float32 recomputation, and the gradient is rounded
    # to the same precision on the way back.
    tol = {torch.float64: 1e-12, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(grad.double(), expected, rtol=tol, atol=tol * scale)
    # not vacuous: the plain softmax gradient differs from GIM's by far more than the tolerance
    (plain,) = torch.autograd.grad((scores.softmax(-1) * g).sum(), scores)
    assert (plain.double() - expected).abs().max() > 10 * tol * scale
    # A row with no positive entry (all masked): no NaN, no gradient.
    empty = torch.zeros(1, 4, dtype=dtype, requires_grad=True)
    out = softmax_temperature_path(empty)
    assert torch.equal(out, empty)
    (grad,) = torch.autograd.grad((out * torch.ones_like(out)).sum(), empty)
    assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------------------------
# Forward values, liveness, presets through relevance patching


def _forward_cases():
    for arch in ARCHS:
        for rules in (*[(r,) for r in NEW_RULES[arch]], *PRESET_RULES):
            yield pytest.param(arch, rules, id=f"{arch}-{rules}")


@pytest.mark.parametrize(("arch", "rules"), list(_forward_cases()))
def test_new_rules_keep_forward_values_bitwise(arch, rules):
    """Logits under each new rule / preset are bit for bit the logits without it (float32)."""
    assert_forward_unchanged(arch, rules)


def test_softmax_t2_keeps_bfloat16_forward_and_finite_gradient():
    """On a bfloat16 GPT-2 the pattern path is computed in float32 and cast back: logits bit-identical,
    gradient finite."""
    c = _build("gpt2", dtype=torch.bfloat16, float64_norms=False)
    plain = c.bridge(c.tokens)
    logits, _, (grad,), _ = bridge_gradient(c, ("softmax_t2",))
    assert torch.equal(logits, plain.detach())
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_kinds_and_rule_sites(arch):
    """Each norm classified by its position (hand-written per architecture), rule_sites lists them, and a
    rule that acts nowhere is not applicable (with a reason), not an error."""
    c = case(arch)
    if arch == "bert":
        expected = {"embed_ln": "embed", "ln_final": "final"} | {f"blocks.{i}.ln{j}": "post" for i in (0, 1) for j in (1, 2)}
    else:
        expected = {"ln_final": "final"} | {f"blocks.{i}.ln1": "attn" for i in (0, 1)} | {f"blocks.{i}.ln2": "mlp" for i in (0, 1)}
    assert norm_kinds(c.bridge) == expected
    sites = rule_sites(c.bridge)
    for kind in ("attn", "mlp", "final", "post", "qk", "embed"):
        assert sites[f"ln_{kind}"] == [p for p, k in expected.items() if k == kind], kind
    assert sorted(sites["ln"]) == sorted(expected)
    assert sites["identity_eps"] == ["blocks.0.mlp", "blocks.1.mlp"]
    fallback = " (attention function)" if arch == "bert" else ""
    assert sites["softmax_t2"] == [f"blocks.{i}.attn{fallback}" for i in (0, 1)]
    for rule in NOT_APPLICABLE[arch]:
        resolved = resolve_rules(c.bridge, ["ln", rule])
        assert resolved.active == ("ln",) and "has no" in resolved.not_applicable[rule]
        assert sites[rule] == []


@pytest.mark.parametrize("arch", ARCHS)
def test_new_rules_are_live(arch):
    c = case(arch)
    for rule in (*NEW_RULES[arch], "ln"):
        check_rules_live(c.bridge, resolve_rules(c.bridge, [rule]), force=True)


def _prompts(model, n_prompts=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(6, model.cfg.d_vocab, (n_prompts, length), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(6, model.cfg.d_vocab, (n_prompts,), generator=g)
    answer, wrong = torch.randint(6, model.cfg.d_vocab, (2, n_prompts), generator=g)
    return clean, corrupted, relp.LogitDiff(answer, wrong)


@pytest.mark.parametrize("arch", ARCHS)
def test_gim_preset_through_relevance_patching(arch):
    """rules="gim" through relevance patching: finite scores, the rules recorded, and the scores differ
    from the plain gradient's (attribution patching)."""
    model = case32(arch).bridge
    clean, corrupted, metric = _prompts(model)
    result = relp.relevance_patching(model, clean, corrupted, metric, rules="gim")
    plain = relp.relevance_patching(model, clean, corrupted, metric, rules="gradient")
    assert result.rules == ("ln", "attnlrp", "softmax_t2")
    for component in result.components:
        assert torch.isfinite(result[component]).all(), component
    assert not torch.allclose(result["resid_pre"], plain["resid_pre"], rtol=1e-3)


def _noop_at(builder, suffix: tuple[str, ...]):
    """A site builder whose hooks at names ending in one of `suffix` do nothing (return their input)."""

    def build(model, active, names):
        return [(name, (lambda x, hook: x) if name.endswith(suffix) else fn) for name, fn in builder(model, active, names)]

    return build


@pytest.mark.parametrize(("arch", "suffix", "kind"), [
    ("gpt2", ("ln_final.hook_out",), "final norms"),
    ("llama", ("ln2.hook_out",), "mlp norms"),
    ("bert", ("ln1.hook_out", "ln2.hook_out"), "post norms"),
    ("bert", ("embed_ln.hook_out",), "embed norms"),
])
def test_liveness_refuses_a_rule_ignored_at_one_site_kind(monkeypatch, arch, suffix, kind):
    """The LN-rule with its hooks at one kind of norm made no-ops must be refused, naming that kind
    (the other kinds still act, so a check of the whole rule at once would pass)."""
    c = case(arch)
    check_rules_live(c.bridge, resolve_rules(c.bridge, "ln"), force=True)  # the real rule passes
    monkeypatch.setitem(rules_module.SITE_BUILDERS, "norm", _noop_at(rules_module._norm_hooks, suffix))
    with pytest.raises(RuleNotLiveError, match=f"'ln'.*does not change the gradient at {kind}"):
        check_rules_live(c.bridge, resolve_rules(c.bridge, "ln"), force=True)


def test_liveness_refuses_a_non_finite_gradient(monkeypatch):
    c = case("gpt2")
    nan_scale = rules_module._ScaleGrad.apply

    def nan_mlp(model, active, names):
        return [(f"blocks.{layer}.mlp.hook_post", lambda x, hook: nan_scale(x, float("nan"))) for layer in range(2)]

    monkeypatch.setitem(rules_module.SITE_BUILDERS, "mlp", nan_mlp)
    with pytest.raises(RuleNotLiveError, match="non-finite gradient"):
        check_rules_live(c.bridge, resolve_rules(c.bridge, ["identity_eps"]), force=True)


@pytest.mark.parametrize(("rules", "message"), [
    (["ah", "softmax_t2"], "'ah' and 'softmax_t2'"),
    (["identity", "identity_eps"], "'identity' and 'identity_eps'"),
    (["softmax_t3"], "unknown rule"),
    ("gim2", "unknown rule preset"),
])
def test_rule_errors(rules, message):
    with pytest.raises(ValueError, match=message):
        resolve_rules(case("gpt2").bridge, rules)



# ----------------------------------------------------------------------------------------------
# ln_qk on a model with query/key norms (Qwen3)


def _qwen3_case():
    """A tiny float64 Qwen3 (query/key RMSNorms over each head), built like test_rules_reference's cases."""
    import copy
    import types

    from test_rules_reference import Case, _randomise, _rmsnorm_in_input_dtype
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = relp.testing.tiny_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=1, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"],
    )
    hf = Qwen3ForCausalLM(config).to(torch.float64).eval()
    _randomise(hf)
    for module in hf.modules():
        if type(module).__name__ == "Qwen3RMSNorm":  # float64 throughout (see _rmsnorm_in_input_dtype)
            module.forward = types.MethodType(_rmsnorm_in_input_dtype, module)
    ref = copy.deepcopy(hf)
    bridge = relp.loading.bridge_from_hf(hf, tokenizer, name="tiny-qwen3")
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(len(relp.testing.SPECIAL_TOKENS), len(tokenizer), (1, 7), generator=generator)
    tokens[0, 0] = tokenizer.bos_token_id
    direction = torch.randn(bridge.cfg.d_vocab_out, generator=generator, dtype=torch.float64)
    return Case("qwen3", bridge, ref, tokens, direction)


def qwen3_reference(hf, resid, rules=frozenset()):
    """Qwen3 from the residual stream entering block 0 to the logits: Llama's blocks (see
    test_rules_reference.llama_reference) with an RMSNorm over each query and key head (q_norm, k_norm)
    after the projections and before rotary; the LN-rule per norm kind (attn, mlp, final, qk)."""
    import math

    import torch.nn.functional as F
    from test_rules_reference import _causal_mask, _ln, _rms_norm, _rotary_cos_sin, _rotate_half

    cfg = hf.config
    n_heads, n_kv, d_head, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    batch, n, _ = resid.shape
    cos, sin = (c.to(resid.dtype) for c in _rotary_cos_sin(cfg, n, d_head))
    x = resid
    for layer in hf.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        h = _rms_norm(x, layer.input_layernorm.weight, eps, ln_rule=_ln(rules, "attn"))
        q = _rms_norm((h @ attn.q_proj.weight.T).view(batch, n, n_heads, d_head), attn.q_norm.weight, eps,
                      ln_rule=_ln(rules, "qk")).transpose(1, 2)
        k = _rms_norm((h @ attn.k_proj.weight.T).view(batch, n, n_kv, d_head), attn.k_norm.weight, eps,
                      ln_rule=_ln(rules, "qk")).transpose(1, 2)
        v = (h @ attn.v_proj.weight.T).view(batch, n, n_kv, d_head).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        group = n_heads // n_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d_head)
        scores = scores.masked_fill(~_causal_mask(n, x.device), float("-inf"))
        pattern = torch.softmax(scores, -1, dtype=torch.float32).to(x.dtype)
        x = x + (pattern @ v).transpose(1, 2).reshape(batch, n, n_heads * d_head) @ attn.o_proj.weight.T
        h = _rms_norm(x, layer.post_attention_layernorm.weight, eps, ln_rule=_ln(rules, "mlp"))
        x = x + (F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    x = _rms_norm(x, hf.model.norm.weight, eps, ln_rule=_ln(rules, "final"))
    return x @ hf.lm_head.weight.T


def test_qk_norm_rule_on_qwen3():
    """Qwen3's q_norm/k_norm are classified "qk"; ln_qk (and ln) match the float64 reference; ln_qk is
    live; the kinds partition the norms."""
    c = _qwen3_case()
    kinds = norm_kinds(c.bridge)
    assert {p for p, k in kinds.items() if k == "qk"} == {f"blocks.{i}.attn.{w}_norm" for i in (0, 1) for w in "qk"}
    assert {p for p, k in kinds.items() if k == "attn"} == {"blocks.0.ln1", "blocks.1.ln1"}
    assert rule_sites(c.bridge)["ln_qk"] == [p for p in kinds if kinds[p] == "qk"]
    check_rules_live(c.bridge, resolve_rules(c.bridge, ["ln_qk"]), force=True)
    for rules in (None, ("ln_qk",), ("ln",)):
        logits, resid, (grad,), _ = bridge_gradient(c, rules)
        x = resid.clone().requires_grad_(True)
        ref_logits = qwen3_reference(c.ref, x, frozenset(rules or ()))
        (ref_grad,) = torch.autograd.grad((ref_logits[0, -1] * c.direction).sum(), x)
        assert_matches(logits, ref_logits.detach(), f"qwen3 {rules}: logits")
        deviation = assert_matches(grad, ref_grad, f"qwen3 {rules}: gradient")
        print(f"qwen3 {rules}: deviation {deviation:.1e}")
        if rules is None:
            plain = grad
        elif rules == ("ln_qk",):  # not vacuous: the rule changes the gradient far beyond the tolerance
            assert (grad - plain).abs().max() > 1e-2 * plain.abs().max()


def test_norm_kinds_on_gemma2_with_post_sublayer_norms():
    """Gemma-2 is pre-LN with extra norms on each sublayer's output (post_attention_layernorm,
    post_feedforward_layernorm; the bridge's ln1_post, ln2_post): those are "post", ln1/ln2 "attn"/"mlp";
    each kind's rule is live."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = relp.testing.tiny_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=1, architectures=["Gemma2ForCausalLM"],
    )
    model = relp.loading.bridge_from_hf(Gemma2ForCausalLM(config).eval(), tokenizer, name="tiny-gemma2")
    expected = {"ln_final": "final"}
    for i in (0, 1):
        expected |= {f"blocks.{i}.ln1": "attn", f"blocks.{i}.ln1_post": "post", f"blocks.{i}.ln2": "mlp", f"blocks.{i}.ln2_post": "post"}
    assert norm_kinds(model) == expected
    for rule in ("ln_attn", "ln_mlp", "ln_post", "ln_final"):
        check_rules_live(model, resolve_rules(model, [rule]), force=True)
