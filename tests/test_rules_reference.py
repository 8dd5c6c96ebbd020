"""Each LRP rule's gradient equals a hand-written float64 reference, on GPT-2, Llama and BERT shapes.

For every architecture this file has an independent forward pass written in plain torch, reading the
weights of a deep copy of the Hugging Face model (taken before the bridge rewires the original in
place). It starts at the residual stream entering block 0 and ends at the logits, and implements each
LRP rule the textbook way (a detached normaliser, ``x * (act(x) / x).detach()``, a detached pattern,
...). The tests compare, in float64, the gradient of a fixed random linear functional of the last
position's logits with respect to ``blocks.0.hook_resid_pre`` between

* the bridge under ``relp.rules.lrp_rules(model, rules)``, and
* the reference with the same rules,

for every single rule that applies, the presets, and no rule at all (which validates the reference
itself against autograd through the real model). Forward logits are compared too.

Float32 islands. Hugging Face's ``LlamaRMSNorm`` upcasts to float32 even in a float64 model, and
TransformerLens's rotary attention computes the softmax in float32 (as HF's eager attention does), so
a float64 Llama is only float32-accurate. To compare at float64 precision:

* the RMSNorms of the bridged Llama are made to compute in their input dtype (same formula, no cast:
  see ``_rmsnorm_in_input_dtype``); relp's LN-rule only sees the norm's input and output, so this
  changes nothing about what is tested;
* the Llama reference computes the softmax exactly as the bridge does (``softmax(scores, dtype=float32)``
  cast back), and the rotary cos/sin the way ``LlamaRotaryEmbedding`` does (float32 angles). Both are
  deterministic functions of float64 inputs, so reference and bridge agree to float64 rounding.

Also here: rules never change forward values (bitwise, float32, all three architectures), and the
Identity-rule at exactly-zero pre-activations gives the plain derivative act'(0) instead of NaN.
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import relp.loading
import relp.testing
from relp.rules import _hf_configs, lrp_rules, pattern_hook_is_live, resolve_rules

ARCHS = ("gpt2", "llama", "bert")

# Single rules, and presets, that are live on each architecture. The Half-rule needs a gated MLP
# (Llama). BERT's attention is delegated to Hugging Face, so detaching the pattern at hook_pattern would
# not reach the gradient there; relp applies the AH-rule through a custom attention function instead
# (the float64 reference below checks that it is live and correct). AttnLRP acts on q, k, v, which are
# bridge LinearBridges on BERT too.
SINGLE_RULES = {
    "gpt2": ("ln", "identity", "ah", "attnlrp"),
    "llama": ("ln", "identity", "half", "ah", "attnlrp"),
    "bert": ("ln", "identity", "ah", "attnlrp"),
}
PRESETS = {
    "gpt2": ("relp", "relp+ah", "attnlrp"),
    "llama": ("relp", "relp+ah", "attnlrp"),
    "bert": ("relp", "relp+ah", "attnlrp"),  # half: not applicable (no gated MLP), recorded, not an error
}
# What each preset means, written out here (not read from relp) for the reference side.
PRESET_RULES = {
    "relp": {"ln", "identity", "half"},
    "relp+ah": {"ln", "identity", "half", "ah"},
    "attnlrp": {"ln", "identity", "half", "attnlrp"},
}
SEQ_LEN = 7

# Tolerance. Both sides compute the same real-valued function in float64 (unit roundoff 1.1e-16), by
# different sequences of operations: a few hundred roundings along any path through two tiny blocks,
# amplified by at most the conditioning of LayerNorm/softmax (O(10) here). Observed deviations are
# <= 2e-15 relative to the largest entry (each test prints its own; run with -s). rtol 1e-9 leaves
# a margin of ~10^5-10^6 over that, while each rule changes the gradient by 10-120% here, and subtle
# bugs stay far above it: a norm epsilon off by 1e-5 (checked by mutating relp: caught on all three
# architectures, even BERT's 1e-12 -> 1e-5) or a wrong AttnLRP factor. The absolute part only guards
# entries near zero, at float64 resolution of the gradient's own scale.
RTOL = 1e-9
ATOL_REL = 1e-10  # absolute tolerance, as a fraction of the largest |reference gradient| entry


# ----------------------------------------------------------------------------------------------
# Models


@dataclass
class Case:
    arch: str
    bridge: object  # TransformerBridge (float64)
    ref: torch.nn.Module  # untouched deep copy of the HF model: the reference reads its weights
    tokens: torch.Tensor  # [1, SEQ_LEN]
    direction: torch.Tensor  # [d_vocab], the linear functional of the last position's logits


def _rmsnorm_in_input_dtype(self, hidden_states):
    """LlamaRMSNorm.forward without the float32 upcast: ``w * (x * rsqrt(mean(x^2) + eps))``."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


WEIGHT_GAIN = 8.0


def _randomise(hf, seed: int = 1) -> None:
    """Make every rule matter: the initialisation (std 0.02, unit norms, zero biases) leaves the
    attention patterns nearly uniform and the branches tiny next to the residual stream, so rules
    would change gradients little. Scale the projections (std ~ 1/sqrt(fan_in)) and randomise the
    norms' weights and all biases. Embeddings and unembeddings (tied in GPT-2 and BERT) are kept."""
    generator = torch.Generator().manual_seed(seed)

    def noise(t, std):
        return (std * torch.randn(t.shape, generator=generator, dtype=torch.float64)).to(t.dtype)

    with torch.no_grad():
        for name, module in hf.named_modules():
            kind = type(module).__name__
            if kind in ("Linear", "Conv1D") and not name.endswith(("lm_head", "decoder")):
                module.weight.mul_(WEIGHT_GAIN)
            elif "LayerNorm" in kind or "RMSNorm" in kind:
                module.weight.copy_(1.0 + noise(module.weight, 0.2))
            else:
                continue
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(noise(module.bias, 0.1))


def _build(arch: str, *, dtype=torch.float64, seed: int = 0, float64_norms: bool = True, hf_edit=None):
    tokenizer = relp.testing.tiny_tokenizer()
    hf = relp.testing.tiny_hf_model(arch, vocab_size=len(tokenizer), seed=seed, dtype=dtype)
    _randomise(hf)
    if hf_edit is not None:
        hf_edit(hf)
    if arch == "llama" and float64_norms:
        for module in hf.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = types.MethodType(_rmsnorm_in_input_dtype, module)
    ref = copy.deepcopy(hf)  # before wrapping: the bridge replaces submodules of `hf` in place
    bridge = relp.loading.bridge_from_hf(hf, tokenizer, name=f"tiny-{arch}")
    generator = torch.Generator().manual_seed(1234)
    first_word = len(relp.testing.SPECIAL_TOKENS)
    tokens = torch.randint(first_word, len(tokenizer), (1, SEQ_LEN), generator=generator)
    tokens[0, 0] = tokenizer.bos_token_id if arch != "bert" else tokenizer.cls_token_id
    direction = torch.randn(bridge.cfg.d_vocab_out, generator=generator, dtype=torch.float64).to(dtype)
    return Case(arch, bridge, ref, tokens, direction)


_CASES: dict = {}


def case(arch: str) -> Case:
    if arch not in _CASES:
        _CASES[arch] = _build(arch)
    return _CASES[arch]


# ----------------------------------------------------------------------------------------------
# The rules, the textbook way


def _layer_norm(x, weight, bias, eps, *, ln_rule: bool):
    """LayerNorm; LN-rule: the standard deviation is a constant, the mean-centring is not."""
    centred = x - x.mean(-1, keepdim=True)
    std = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if ln_rule:
        std = std.detach()
    return centred / std * weight + bias


def _rms_norm(x, weight, eps, *, ln_rule: bool):
    """RMSNorm; LN-rule: the root mean square is a constant."""
    rms = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if ln_rule:
        rms = rms.detach()
    return x / rms * weight


def _activation(act, x, *, identity_rule: bool, identity_eps: bool = False):
    """act(x); Identity-rule: backward multiplies by act(x)/x instead of act'(x).

    At x == 0 exactly, act(x)/x is replaced by its limit, which for GELU, tanh-GELU and SiLU is 1/2 =
    act'(0): the rule and the plain derivative agree there. `identity_eps` (the RelP authors' variant):
    backward multiplies by act(x) / (x + 1e-6 * (sign(x) + (x == 0))), which is 0 at x == 0.
    """
    y = act(x)
    if identity_eps:
        ratio = (y / (x + 1e-6 * (torch.sign(x) + (x == 0).to(x.dtype)))).detach()
        return x * ratio + (y - x * ratio).detach()  # value act(x), gradient the ratio
    if not identity_rule:
        return y
    zero = x == 0
    ratio = torch.where(zero, torch.full_like(x, 0.5), y / torch.where(zero, torch.ones_like(x), x))
    return x * ratio.detach()


def _ln(rules, kind: str) -> bool:
    """Whether the LN-rule applies at a norm of `kind`: rule ``ln`` (every norm) or ``ln_<kind>``."""
    return "ln" in rules or f"ln_{kind}" in rules


SOFTMAX_T = 2.0


class _SoftmaxBackwardAtT(torch.autograd.Function):
    """GIM's temperature rule, written out: forward `softmax(scores)` (the given function), backward
    ``q * (g - <g, q>)`` with q = softmax(scores / T) computed from the scores (T x the Jacobian of
    softmax(scores / T), as GIM's code; masked scores are -inf, so q = 0 there)."""

    @staticmethod
    def forward(ctx, scores, softmax):
        ctx.save_for_backward(scores)
        return softmax(scores)

    @staticmethod
    def backward(ctx, g):
        (scores,) = ctx.saved_tensors
        q = (scores / SOFTMAX_T).softmax(-1)
        return q * (g - (g * q).sum(-1, keepdim=True)), None


def _softmax(scores, rules, softmax=lambda s: s.softmax(-1)):
    """The attention softmax; softmax_t2: its backward at temperature 2 (:class:`_SoftmaxBackwardAtT`)."""
    if "softmax_t2" in rules:
        return _SoftmaxBackwardAtT.apply(scores, softmax)
    return softmax(scores)


def _gate_product(a, u, *, half_rule: bool):
    """a * u; Half-rule: each factor receives half of the gradient."""
    if not half_rule:
        return a * u
    return 0.5 * (a * u.detach()) + 0.5 * (a.detach() * u)


def _attention_rule_qkv(q, k, v, rules):
    """AttnLRP: the gradient reaching q and k is scaled by 1/4, the one reaching v by 1/2."""
    if "attnlrp" not in rules:
        return q, k, v

    def scale(t, factor):
        return t.detach() + factor * (t - t.detach())

    return scale(q, 0.25), scale(k, 0.25), scale(v, 0.5)


def _pattern_rule(pattern, rules):
    """AH-rule: the attention pattern is a constant."""
    return pattern.detach() if "ah" in rules else pattern


def _gelu_new(x):
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _causal_mask(n, device):
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


# ----------------------------------------------------------------------------------------------
# Reference forward passes: residual stream entering block 0 -> logits


def gpt2_embed(hf, tokens):
    """GPT-2's block-0 input: token embedding + learned position embedding."""
    t = hf.transformer
    return t.wte.weight[tokens] + t.wpe.weight[torch.arange(tokens.shape[1])]


def gpt2_reference(hf, resid, rules=frozenset()):
    """GPT-2 from the residual stream entering block 0 to the logits.

    Pre-LN blocks: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``; ``ln_f``; tied unembedding.
    Conv1D layers are ``x @ W + b`` (W is [in, out]). Attention: fused c_attn split into q, k, v,
    scores / sqrt(d_head), causal mask, softmax. MLP: c_fc, gelu_new (tanh), c_proj.
    """
    cfg, t = hf.config, hf.transformer
    n_heads, eps = cfg.n_head, cfg.layer_norm_epsilon
    batch, n, d = resid.shape
    d_head = d // n_heads
    x = resid
    for block in t.h:
        h = _layer_norm(x, block.ln_1.weight, block.ln_1.bias, eps, ln_rule=_ln(rules, "attn"))
        qkv = h @ block.attn.c_attn.weight + block.attn.c_attn.bias
        q, k, v = (z.view(batch, n, n_heads, d_head).transpose(1, 2) for z in qkv.split(d, dim=-1))
        q, k, v = _attention_rule_qkv(q, k, v, rules)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d_head)
        scores = scores.masked_fill(~_causal_mask(n, x.device), float("-inf"))
        pattern = _pattern_rule(_softmax(scores, rules), rules)
        z = (pattern @ v).transpose(1, 2).reshape(batch, n, d)
        x = x + z @ block.attn.c_proj.weight + block.attn.c_proj.bias
        h = _layer_norm(x, block.ln_2.weight, block.ln_2.bias, eps, ln_rule=_ln(rules, "mlp"))
        pre = h @ block.mlp.c_fc.weight + block.mlp.c_fc.bias
        post = _activation(_gelu_new, pre, identity_rule="identity" in rules, identity_eps="identity_eps" in rules)
        x = x + post @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
    x = _layer_norm(x, t.ln_f.weight, t.ln_f.bias, eps, ln_rule=_ln(rules, "final"))
    return x @ hf.lm_head.weight.T


def llama_embed(hf, tokens):
    """Llama's block-0 input: token embedding only (positions enter through rotary)."""
    return hf.model.embed_tokens.weight[tokens]


def _rotary_cos_sin(config, n, d_head):
    """cos, sin [n, d_head] as LlamaRotaryEmbedding computes them (float32 angles, halves duplicated)."""
    theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.int64).float() / d_head))
    angles = torch.arange(n).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def llama_reference(hf, resid, rules=frozenset()):
    """Llama from the residual stream entering block 0 to the logits.

    Pre-RMSNorm blocks ``x + attn(rms1(x))``, ``x + mlp(rms2(x))``; final RMSNorm; untied lm_head.
    RMSNorm: ``x / sqrt(mean(x^2) + eps) * w``. Attention: q, k, v projections without bias,
    rotary embedding (rotate-half convention, rope_theta from the config) on q and k, grouped-query
    attention (each key/value head serves n_heads / n_kv_heads consecutive query heads), scores /
    sqrt(d_head), causal mask, softmax computed in float32 and cast back (as the bridge and HF's eager
    attention do). MLP: SwiGLU ``down(silu(gate(x)) * up(x))``.
    """
    cfg = hf.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    eps = cfg.rms_norm_eps
    batch, n, d = resid.shape
    d_head = d // n_heads
    cos, sin = (c.to(resid.dtype) for c in _rotary_cos_sin(cfg, n, d_head))
    x = resid
    for layer in hf.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        h = _rms_norm(x, layer.input_layernorm.weight, eps, ln_rule=_ln(rules, "attn"))
        q = (h @ attn.q_proj.weight.T).view(batch, n, n_heads, d_head).transpose(1, 2)
        k = (h @ attn.k_proj.weight.T).view(batch, n, n_kv, d_head).transpose(1, 2)
        v = (h @ attn.v_proj.weight.T).view(batch, n, n_kv, d_head).transpose(1, 2)
        q, k, v = _attention_rule_qkv(q, k, v, rules)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        group = n_heads // n_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d_head)
        scores = scores.masked_fill(~_causal_mask(n, x.device), float("-inf"))
        softmax = lambda s: torch.softmax(s, -1, dtype=torch.float32).to(s.dtype)  # noqa: E731
        pattern = _pattern_rule(_softmax(scores, rules, softmax), rules)
        z = (pattern @ v).transpose(1, 2).reshape(batch, n, d)
        x = x + z @ attn.o_proj.weight.T
        h = _rms_norm(x, layer.post_attention_layernorm.weight, eps, ln_rule=_ln(rules, "mlp"))
        gate = h @ mlp.gate_proj.weight.T
        up = h @ mlp.up_proj.weight.T
        a = _activation(F.silu, gate, identity_rule="identity" in rules, identity_eps="identity_eps" in rules)
        x = x + _gate_product(a, up, half_rule="half" in rules) @ mlp.down_proj.weight.T
    x = _rms_norm(x, hf.model.norm.weight, eps, ln_rule=_ln(rules, "final"))
    return x @ hf.lm_head.weight.T


def bert_embed(hf, tokens):
    """BERT's block-0 input: LayerNorm(word + position + token-type-0 embeddings)."""
    e = hf.bert.embeddings
    summed = e.word_embeddings.weight[tokens] + e.position_embeddings.weight[torch.arange(tokens.shape[1])]
    summed = summed + e.token_type_embeddings.weight[0]
    return F.layer_norm(summed, summed.shape[-1:], e.LayerNorm.weight, e.LayerNorm.bias, e.LayerNorm.eps)


def bert_reference(hf, resid, rules=frozenset()):
    """BERT (masked LM) from the residual stream entering block 0 to the logits.

    Post-LN encoder blocks: ``h = LN1(x + attn(x))``, ``x = LN2(h + mlp(h))``; bidirectional attention
    (all-ones mask) with biased q, k, v, o; MLP: dense, GELU (erf), dense. MLM head: dense, GELU, LN,
    decoder (with bias). Only the block MLPs' GELU is an MLP activation, so only it gets the
    Identity-rule (relp's documented scope); the head's GELU keeps its plain derivative.
    """
    cfg = hf.config
    n_heads, eps = cfg.num_attention_heads, cfg.layer_norm_eps
    batch, n, d = resid.shape
    d_head = d // n_heads
    x = resid
    for layer in hf.bert.encoder.layer:
        sa, so = layer.attention.self, layer.attention.output
        q, k, v = (
            F.linear(x, lin.weight, lin.bias).view(batch, n, n_heads, d_head).transpose(1, 2)
            for lin in (sa.query, sa.key, sa.value)
        )
        q, k, v = _attention_rule_qkv(q, k, v, rules)
        pattern = _pattern_rule(_softmax((q @ k.transpose(-1, -2)) / math.sqrt(d_head), rules), rules)
        z = (pattern @ v).transpose(1, 2).reshape(batch, n, d)
        h = _layer_norm(x + F.linear(z, so.dense.weight, so.dense.bias), so.LayerNorm.weight,
                        so.LayerNorm.bias, eps, ln_rule=_ln(rules, "post"))
        pre = F.linear(h, layer.intermediate.dense.weight, layer.intermediate.dense.bias)
        post = _activation(_gelu_erf, pre, identity_rule="identity" in rules, identity_eps="identity_eps" in rules)
        out = layer.output
        x = _layer_norm(h + F.linear(post, out.dense.weight, out.dense.bias), out.LayerNorm.weight,
                        out.LayerNorm.bias, eps, ln_rule=_ln(rules, "post"))
    head = hf.cls.predictions
    t = _gelu_erf(F.linear(x, head.transform.dense.weight, head.transform.dense.bias))
    t = _layer_norm(t, head.transform.LayerNorm.weight, head.transform.LayerNorm.bias, eps, ln_rule=_ln(rules, "final"))
    return F.linear(t, head.decoder.weight, head.decoder.bias)


EMBED = {"gpt2": gpt2_embed, "llama": llama_embed, "bert": bert_embed}
REFERENCE = {"gpt2": gpt2_reference, "llama": llama_reference, "bert": bert_reference}


# ----------------------------------------------------------------------------------------------
# Gradients on both sides


def bridge_gradient(c: Case, rules, *, wrt_hooks=()):
    """d(direction . logits[0, -1]) / d(block-0 residual input) on the bridge.

    `rules=None` means no rule context at all (plain autograd). Returns (logits, resid, grads, acts):
    grads[0] is the gradient w.r.t. the residual input, grads[1:] those w.r.t. the activations at
    `wrt_hooks` (as they enter those hook points), and acts maps each of those hook names to its value.
    """
    store: dict = {}

    def capture(x, hook):
        x = x.detach().requires_grad_(True)
        store["resid"] = x
        return x

    def keep(name):
        def hook(x, hook):
            store[name] = x
            return x

        return hook

    rule_context = contextlib.nullcontext() if rules is None else lrp_rules(c.bridge, rules)
    hooks = [("blocks.0.hook_resid_pre", capture), *[(name, keep(name)) for name in wrt_hooks]]
    with rule_context, c.bridge.hooks(fwd_hooks=hooks):
        logits = c.bridge(c.tokens)
        target = (logits[0, -1] * c.direction).sum()
        grads = torch.autograd.grad(target, [store["resid"], *[store[name] for name in wrt_hooks]])
    acts = {name: store[name].detach() for name in wrt_hooks}
    return logits.detach(), store["resid"].detach(), grads, acts


def reference_gradient(c: Case, resid, rules):
    x = resid.detach().clone().requires_grad_(True)
    logits = REFERENCE[c.arch](c.ref, x, frozenset(rules))
    target = (logits[0, -1] * c.direction).sum()
    (grad,) = torch.autograd.grad(target, x)
    return logits.detach(), grad


def rule_names(c: Case, rules) -> frozenset[str]:
    """The rules the reference applies: a preset spelled out, minus Half-rule without a gated MLP.

    Also checks that relp resolves `rules` on this model to the same set.
    """
    if rules is None:
        return frozenset()
    names = set(PRESET_RULES[rules]) if isinstance(rules, str) else set(rules)
    if c.arch != "llama":
        names.discard("half")
    assert set(resolve_rules(c.bridge, rules).active) == names
    return frozenset(names)


def assert_matches(actual, expected, what: str) -> float:
    """assert_close at float64 tolerance; returns the max deviation relative to max |expected|."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        actual, expected, rtol=RTOL, atol=ATOL_REL * scale, msg=lambda m: f"{what}: {m}"
    )
    return (actual - expected).abs().max().item() / scale


def _cases():
    """(arch, rules) pairs: rules None (no rule context), a 1-tuple (one rule) or a preset name."""
    for arch in ARCHS:
        yield pytest.param(arch, None, id=f"{arch}-plain")
        for rule in SINGLE_RULES[arch]:
            yield pytest.param(arch, (rule,), id=f"{arch}-rule:{rule}")
        for preset in PRESETS[arch]:
            yield pytest.param(arch, preset, id=f"{arch}-preset:{preset}")


# ----------------------------------------------------------------------------------------------
# Tests


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_embedding_and_forward_match_bridge(arch):
    """The reference's block-0 input and logits equal the bridge's (validates the reference forward)."""
    c = case(arch)
    logits, resid, _, _ = bridge_gradient(c, None)
    ref_resid = EMBED[arch](c.ref, c.tokens)
    assert_matches(resid, ref_resid, f"{arch} block-0 residual input")
    ref_logits, _ = reference_gradient(c, resid, ())
    deviation = assert_matches(logits, ref_logits, f"{arch} logits")
    print(f"{arch} logits: max |bridge - reference| / max |reference| = {deviation:.1e}")


@pytest.mark.parametrize(("arch", "rules"), list(_cases()))
def test_rule_gradient_matches_reference(arch, rules):
    """Gradient w.r.t. the block-0 residual input under `rules` equals the textbook reference's."""
    c = case(arch)
    logits, resid, (grad,), _ = bridge_gradient(c, rules)
    names = rule_names(c, rules)
    ref_logits, ref_grad = reference_gradient(c, resid, names)
    assert_matches(logits, ref_logits, f"{arch} {rules}: logits")
    deviation = assert_matches(grad, ref_grad, f"{arch} {rules}: gradient")
    print(f"{arch} {rules}: max |relp - reference| / max |reference| = {deviation:.1e}")
    assert torch.isfinite(grad).all()
    if names:
        # Not vacuous: the rules change the reference's gradient far beyond the tolerance.
        _, plain = reference_gradient(c, resid, ())
        change = (ref_grad - plain).abs().max().item() / plain.abs().max().item()
        print(f"{arch} {rules}: max |reference(rules) - reference(plain)| / max |plain| = {change:.1e}")
        assert change > 1e-2, f"{arch} {rules}: the rules barely change the gradient ({change:.2g})"


@pytest.mark.parametrize("arch", ARCHS)
def test_ah_rule_uses_the_attention_fallback_only_where_the_pattern_hook_is_ignored(arch):
    """GPT-2 and Llama honour edits at hook_pattern; BERT (attention delegated to Hugging Face) does not,
    so the AH-rule switches its attention implementation for the duration of the rule context only,
    and restores it also when the block raises."""
    c = case(arch)
    assert pattern_hook_is_live(c.bridge) is (arch != "bert")
    configs = [c.bridge.cfg] if arch != "bert" else _hf_configs(c.bridge)
    before = [getattr(config, "_attn_implementation", None) for config in configs]
    with pytest.raises(KeyError):
        with lrp_rules(c.bridge, "relp+ah"):
            during = [getattr(config, "_attn_implementation", None) for config in configs]
            raise KeyError("inside")
    assert [getattr(config, "_attn_implementation", None) for config in configs] == before
    if arch == "bert":
        assert before == ["eager"] * len(configs) and during == ["relp_lrp_eager"] * len(configs)
    else:
        assert during == before


# ----------------------------------------------------------------------------------------------
# Forward values: bitwise unchanged (float32, the stock Hugging Face models with their float32 islands)


_CASES32: dict = {}


def case32(arch: str) -> Case:
    if arch not in _CASES32:
        _CASES32[arch] = _build(arch, dtype=torch.float32, float64_norms=False)
    return _CASES32[arch]


def _forward_cases():
    for arch in ARCHS:
        for rule in SINGLE_RULES[arch]:
            yield pytest.param(arch, (rule,), id=f"{arch}-rule:{rule}")
        for preset in PRESETS[arch]:
            yield pytest.param(arch, preset, id=f"{arch}-preset:{preset}")


def assert_forward_unchanged(arch: str, rules) -> None:
    """Logits under `rules` are bit-for-bit the logits without them (float32, grad mode on)."""
    c = case32(arch)
    plain = c.bridge(c.tokens)
    with lrp_rules(c.bridge, rules):
        ruled = c.bridge(c.tokens)
    assert ruled.dtype == torch.float32
    assert torch.equal(ruled, plain), (
        f"{arch} {rules}: forward changed, max |diff| {(ruled - plain).abs().max().item():.3g}"
    )


@pytest.mark.parametrize(("arch", "rules"), list(_forward_cases()))
def test_rules_keep_forward_values_bitwise(arch, rules):
    """Logits under a rule are bit-for-bit the logits without it (float32, grad mode on)."""
    assert_forward_unchanged(arch, rules)


# ----------------------------------------------------------------------------------------------
# Identity-rule at exactly-zero pre-activations

ZERO_UNIT = 5  # hidden unit whose pre-activation is made exactly zero, in every layer


def _zero_unit(arch):
    """HF edit: unit ZERO_UNIT's pre-activation (Llama: the gate; GPT-2: c_fc) becomes exactly 0.0."""

    def edit(hf):
        with torch.no_grad():
            if arch == "llama":  # gate_proj has no bias
                for layer in hf.model.layers:
                    layer.mlp.gate_proj.weight[ZERO_UNIT] = 0.0
            else:  # Conv1D: weight [d_model, d_mlp]
                for block in hf.transformer.h:
                    block.mlp.c_fc.weight[:, ZERO_UNIT] = 0.0
                    block.mlp.c_fc.bias[ZERO_UNIT] = 0.0

    return edit


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_identity_rule_at_exact_zero_keeps_plain_derivative(arch):
    """act(x)/x is 0/0 at x == 0; the rule must use act'(0) there (its limit), never NaN.

    Checked at the pre-activation of the zeroed unit in the last layer, where nothing between the unit
    and the logits carries another rule: under the Identity-rule alone its gradient must equal the
    plain gradient act'(0) * (up) * dm/dpost. The whole residual gradient must be finite and match the
    reference (which uses the limit 1/2 = act'(0) at zero), also under the "relp" preset.
    """
    c = _build(arch, hf_edit=_zero_unit(arch))
    last = c.bridge.cfg.n_layers - 1
    pre_hooks = [f"blocks.{layer}.mlp.hook_pre" for layer in range(last + 1)]
    _, _, (_, *plain_pre), _ = bridge_gradient(c, None, wrt_hooks=pre_hooks)
    for rules in (("identity",), "relp"):
        _, resid, (grad, *grad_pre), acts = bridge_gradient(c, rules, wrt_hooks=pre_hooks)
        for name in pre_hooks:
            assert (acts[name][..., ZERO_UNIT] == 0).all(), f"{name}: unit {ZERO_UNIT} is not exactly zero"
            assert (acts[name] != 0).float().mean() > 0.9  # the other units are not
        assert torch.isfinite(grad).all(), f"{arch} {rules}: non-finite residual gradient"
        for name, g in zip(pre_hooks, grad_pre):
            assert torch.isfinite(g).all(), f"{arch} {rules}: non-finite gradient at {name}"
        _, ref_grad = reference_gradient(c, resid, rule_names(c, rules))
        assert_matches(grad, ref_grad, f"{arch} {rules} zero unit")
    # Identity-rule alone: at the zero unit, exactly the plain derivative path ...
    _, _, (_, *identity_pre), _ = bridge_gradient(c, ("identity",), wrt_hooks=pre_hooks)
    at_zero, plain_at_zero = identity_pre[last][..., ZERO_UNIT], plain_pre[last][..., ZERO_UNIT]
    assert plain_at_zero.abs().max() > 0  # not vacuous: the unit does reach the logits
    torch.testing.assert_close(at_zero, plain_at_zero, rtol=RTOL, atol=0.0)
    # ... while at the other units the rule does act (act(x)/x differs from act'(x)).
    others = torch.ones(identity_pre[last].shape[-1], dtype=torch.bool)
    others[ZERO_UNIT] = False
    assert not torch.allclose(identity_pre[last][..., others], plain_pre[last][..., others], rtol=1e-3)
