"""A hand-computable micro-model: AP, AtP and RelP of single cells against closed forms derived by hand.

In the spirit of auto-circuit's micro-model tests, but on a real ``TransformerBridge`` (so relp's hooks,
hook names and rules run exactly as on any model): a one-layer Llama (RMSNorm, rotary attention, gated
MLP) in float64 whose weights are overwritten so that every quantity below can be written down with
pencil and paper. The expected values in this file come from the derivation in the comments (checked
with a few lines of plain Python arithmetic while writing it), never from relp.

The model (d_model 4, axes e0..e3, one head of size 4, one MLP unit, RMSNorm epsilon 0, norm weights 1)
--------------------------------------------------------------------------------------------------------
RMSNorm: n(x) = x / rms(x) = 2 x / |x| for d = 4. Its Jacobian is J(x) = (2/|x|) (I - x^ x^T) with
x^ = x/|x|; under the LN-rule the scale is a constant, J_ln(x) = (2/|x|) I.

Embeddings: BOS = e3, "a" = e1, "b" = -2 e1, "c" = e3, "d" = 4 e0 (words z0..z5: random, only there so
that relp's rule-liveness probe, which draws tokens from id 10 up, sees a generic model).
Attention: W_Q = W_K = 0, so every score is 0 and the causal pattern is uniform, 1/(p+1) over
positions j <= p (at p = 3 that is 1/4: exact even though the bridge takes the softmax in float32).
W_V = 6 e1 e1^T, W_O = e1 e1^T: attn_out[p] = 6/(p+1) * sum_{j<=p} n(x_j)[1] e1.
MLP (relu2: act(g) = max(g, 0)^2): gate g = (1, 1/2, 0, 0) . h, up u = (5/8, 0, 0, 0) . h, h = n(resid_mid),
hidden unit z = act(g) * u, mlp_out = 12 z e2.
Unembedding: W_U["a"] = (0, 1, 1, 0), W_U["b"] = 0; the metric is LogitDiff("a", "b") at the last position,
so m = (0, 1, 1, 0) . n(x_f) = 2 (x_f[1] + x_f[2]) / |x_f| with x_f the final residual stream.

Prompts: clean [BOS, a, c, d], corrupted [BOS, b, c, d]: only position 1 differs. One layer, so a
position other than 3 reaches the metric only through the attention of position 3.

Forward, at position 3 (the last):
  n(x_1) = 2 e1 (clean), -2 e1 (corrupted: |-2 e1| = 2, rms 1); every other n(x_j)[1] is 0.
  attn_out[3] = 6/4 * n(x_1)[1] e1 = +3 e1 (clean), -3 e1 (corrupted).
  resid_mid = 4 e0 + attn_out[3] = (4, +-3, 0, 0), |resid_mid| = 5 in both runs; h = (8/5, +-6/5, 0, 0).
  g = 8/5 +- 3/5 = 11/5 (clean), 1 (corrupted); u = 1 in both; z = g^2 u = 121/25 (clean), 1 (corrupted).
  mlp_out[3] = 12 z e2 = 1452/25 e2 (clean), 12 e2 (corrupted).
  x_f = (4, 3, 1452/25, 0) (clean): |x_f|^2 = 25 + (1452/25)^2 = 2123929/625, m_clean = 3054 / sqrt(2123929).
  x_f = (4, -3, 12, 0) (corrupted): |x_f| = 13, m_corr = 2 (-3 + 12) / 13 = 18/13.

Activation patching (denoising: base = corrupted run)
  attn_out[3] := clean makes all of position 3 clean:     AP = m_clean - m_corr = T.
  resid_pre[1] := clean gives the clean attn_out[3] exactly (nothing else of position 1 reaches the
  metric):                                                 AP = T.   head [0, 3] (the only head): AP = T.
  mlp_out[3] := 1452/25 e2 on the corrupted resid_mid: x_f = (4, -3, 1452/25, 0), same norm as the clean
  x_f, m = 2 (-3 + 1452/25) * 25 / sqrt(2123929) = 2754 / sqrt(2123929):   AP = 2754/sqrt(2123929) - 18/13.
  The hidden unit (neuron [3, 0]) gives the same (mlp_out = 12 z e2 is linear in z).
  attn_out and mlp_out at positions 1 and 2 change (their value differs between the runs) but do not
  reach position 3 in a one-layer model: 0. resid_pre at 0, 2, 3 is the same in both runs: 0.

Attribution patching (gradients at the corrupted run)
  G := dm/dx_f = (2/13) (w - (w . x^) x^), w = (0, 1, 1, 0), x^ = (4, -3, 12, 0)/13, w . x^ = 9/13:
     G = (2/2197) (-36, 196, 61, 0).   Under the LN-rule G_ln = (2/13) w.
  mlp_out[3]: delta = (1452/25 - 12) e2 = 1152/25 e2.
     AtP = 1152/25 * 122/2197.   RelP with the LN-rule: 1152/25 * 2/13.   (No other rule acts after the MLP.)
  neuron [3, 0]: delta z = 96/25, dm/dz = 12 G[2]: the same number as mlp_out[3].
  attn_out[3]: delta = 6 e1, score = 6 * k, k := dm/d resid_mid[1] = G[1] + 12 G[2] * (J_2^T dz/dh)[1],
     J_2 = J(resid_mid) = (2/5)(I - x^ x^T), x^ = (4, -3, 0, 0)/5 (LN-rule: (2/5) I).
     dz/dh = c_g (1, 1/2, 0, 0) + c_u (5/8, 0, 0, 0) with, at g = 1, u = 1:
        plain c_g = act'(g) u = 2 g u = 2,         c_u = act(g) = 1      -> dz/dh = (21/8, 1, 0, 0)
        Identity-rule: act'(g) -> act(g)/g = g:   c_g = 1,  c_u = 1      -> (13/8, 1/2, 0, 0)
        Half-rule: each factor half:              c_g = 1,  c_u = 1/2    -> (21/16, 1/2, 0, 0)
        Identity + Half:                          c_g = 1/2, c_u = 1/2   -> (13/16, 1/4, 0, 0)
     (J_2^T v)[1] = (2/5)(v[1] - x^[1] (x^ . v)) = (2/5)(v[1] + (3/5)(4 v[0] - 3 v[1])/5):
        (21/8, 1): 19/25;  (13/8, 1/2): 11/25;  (21/16, 1/2): 19/50;  under the LN-rule (2/5) v[1].
     plain:        k = 392/2197 + (1464/2197)(19/25) = 37616/54925
     identity:     k = 392/2197 + (1464/2197)(11/25) = 25904/54925
     half:         k = 392/2197 + (1464/2197)(19/50) = 23708/54925
     ln:           k = 2/13 + (24/13)(2/5)(1)   = 58/65
     relp (ln + identity + half): k = 2/13 + (24/13)(2/5)(1/4) = 22/65
  resid_pre[1]: delta = e1 - (-2 e1) = 3 e1 is parallel to the corrupted x_1 = -2 e1, so the plain RMSNorm
     Jacobian J(x_1) = (I - e1 e1^T) maps it to 0: AtP = 0, although AP = T. Under the LN-rule
     J_ln(x_1) = I: the estimated change of n(x_1) is 3 e1, of attn_out[3] 6/4 * 3 e1 = 4.5 e1 (the true
     change is 6 e1), so RelP(resid_pre[1]) = 4.5 k = 3/4 of RelP(attn_out[3]) under the same rules.
     Rule sets without the LN-rule give 0 there, like AtP.

Noising (base = clean run), activation patching:
  attn_out[3] or resid_pre[1] := corrupted:  m_corr - m_clean = -T.
  mlp_out[3] := 12 e2 on the clean resid_mid: x_f = (4, 3, 12, 0), |x_f| = 13, m = 30/13:  30/13 - m_clean.

Tolerance: everything is float64 (the RMSNorms are made to compute in their input dtype, see
``_rmsnorm_in_input_dtype``; the only float32 step, the softmax, is exact here: its outputs are 0, 1/2 and
1/4 at the positions that matter). Each expected value is a function of a few dozen float64 operations on
numbers of size <= 60 with condition O(10), so rounding gives at most ~1e-14 absolute (observed: <= 2e-15).
1e-13 leaves a margin over that and is 10^7 times smaller than the smallest mistake these numbers can
catch: an epsilon of 1e-6 in the LN-rule's scale moves RelP by 2e-6 (checked by mutating relp while
writing this file); a wrong rule factor or a position off by one moves a score by > 0.1.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

import relp
from relp.testing import tiny_tokenizer

try:  # the helper is moving from relp.models to relp.loading
    from relp.loading import bridge_from_hf
except ImportError:
    from relp.models import bridge_from_hf

WORDS = ("a", "b", "c", "d") + tuple(f"z{i}" for i in range(6))
ATOL = RTOL = 1e-13  # see the module docstring

SQRT = math.sqrt(2123929)  # 25 |x_f| on the clean run (and with mlp_out[3] patched into the corrupted run)
M_CLEAN = 3054 / SQRT
M_CORRUPTED = 18 / 13
TOTAL = M_CLEAN - M_CORRUPTED  # AP of attn_out[3], resid_pre[1] and the head at position 3
AP_MLP = 2754 / SQRT - M_CORRUPTED  # AP of mlp_out[3] and of the hidden unit at position 3

# k = dm / d resid_mid[1] at the corrupted run under each rule set, and dm / d x_f[2] (plain or LN-rule)
K = {
    "gradient": 37616 / 54925,
    "identity": 25904 / 54925,
    "half": 23708 / 54925,
    "ln": 58 / 65,
    "relp": 22 / 65,
}
G2 = {"plain": 122 / 2197, "ln": 2 / 13}  # dm / d x_f[2]: 2 * 61 / 2197, and 2/13 under the LN-rule
MLP_DELTA = 1152 / 25  # mlp_out[3] clean - corrupted, along e2


def _rmsnorm_in_input_dtype(self, hidden_states):
    """LlamaRMSNorm.forward without its float32 upcast: ``w * (x * rsqrt(mean(x^2) + eps))``."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _build():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(WORDS)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=4, intermediate_size=1, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=16, rms_norm_eps=0.0,
        hidden_act="relu2", bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False,
    )
    hf = LlamaForCausalLM(config).to(torch.float64).eval()
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ("<bos>", *WORDS)}
    e = torch.eye(4, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embed = hf.model.embed_tokens.weight
        embed.copy_(torch.randn(embed.shape, generator=generator, dtype=torch.float64))  # z0..z5 (and unused ids)
        for word, vector in (("<bos>", e[3]), ("a", e[1]), ("b", -2 * e[1]), ("c", e[3]), ("d", 4 * e[0])):
            embed[ids[word]] = vector
        layer = hf.model.layers[0]
        layer.self_attn.q_proj.weight.zero_()
        layer.self_attn.k_proj.weight.zero_()
        layer.self_attn.v_proj.weight.copy_(6 * torch.outer(e[1], e[1]))
        layer.self_attn.o_proj.weight.copy_(torch.outer(e[1], e[1]))
        layer.mlp.gate_proj.weight.copy_(torch.tensor([[1.0, 0.5, 0.0, 0.0]]))
        layer.mlp.up_proj.weight.copy_(torch.tensor([[5 / 8, 0.0, 0.0, 0.0]]))
        layer.mlp.down_proj.weight.copy_(12 * e[2][:, None])
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, hf.model.norm):
            norm.weight.fill_(1.0)
        unembed = hf.lm_head.weight
        unembed.copy_(torch.randn(unembed.shape, generator=generator, dtype=torch.float64))
        unembed[ids["a"]] = torch.tensor([0.0, 1.0, 1.0, 0.0])
        unembed[ids["b"]] = 0.0
    for module in hf.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_rmsnorm_in_input_dtype, module)
    bridge = bridge_from_hf(hf, tokenizer, name="micro-llama")
    clean = torch.tensor([[ids["<bos>"], ids["a"], ids["c"], ids["d"]]])
    corrupted = torch.tensor([[ids["<bos>"], ids["b"], ids["c"], ids["d"]]])
    metric = relp.LogitDiff(torch.tensor([ids["a"]]), torch.tensor([ids["b"]]))
    return bridge, clean, corrupted, metric


@pytest.fixture(scope="module")
def micro():
    return _build()


COMPONENTS = ["resid_pre", "attn_out", "mlp_out", "head", "neuron"]


def _maps(resid_pre_1: float, last_attn: float, last_mlp: float) -> dict[str, torch.Tensor]:
    """Expected score maps: everything 0 except resid_pre[1], attn_out[3] (= the head at 3), mlp_out[3]
    (= the hidden unit at 3)."""
    zero = [0.0, 0.0, 0.0]
    maps = {
        "resid_pre": [[0.0, resid_pre_1, 0.0, 0.0]],  # [layer, position]
        "attn_out": [[*zero, last_attn]],
        "mlp_out": [[*zero, last_mlp]],
        "head": [[[*zero, last_attn]]],  # [layer, head, position]
        "neuron": [[[0.0], [0.0], [0.0], [last_mlp]]],  # [layer, position, neuron]
    }
    return {component: torch.tensor(values, dtype=torch.float64) for component, values in maps.items()}


def _check(result, expected: dict[str, torch.Tensor], what: str) -> None:
    for component, values in expected.items():
        torch.testing.assert_close(
            result[component], values, rtol=RTOL, atol=ATOL,
            msg=lambda m, c=component: f"{what}, {c} (hand-derived values in tests/test_micro_model.py): {m}",
        )


def test_forward_pass_is_the_hand_computed_one(micro):
    """The model computes what the docstring says (checked on TransformerLens's own cache, not relp):
    a failure here means the construction is off, not the patching methods."""
    model, clean, corrupted, metric = micro
    for tokens, sign, z, m in ((clean, 1.0, 121 / 25, M_CLEAN), (corrupted, -1.0, 1.0, M_CORRUPTED)):
        logits, cache = model.run_with_cache(tokens)
        expected_attn = torch.zeros(1, 4, 4, dtype=torch.float64)
        expected_attn[0, 1, 1] = sign * 6.0  # attn_out[1] = 6/2 * n(x_1)[1]: changes, but never reaches the metric
        expected_attn[0, 2, 1] = sign * 4.0  # 6/3 * n(x_1)[1]: the softmax's 1/3 is float32 here, hence the loose check
        expected_attn[0, 3, 1] = sign * 3.0
        torch.testing.assert_close(cache["blocks.0.hook_attn_out"], expected_attn, rtol=0, atol=1e-6)
        torch.testing.assert_close(cache["blocks.0.hook_attn_out"][0, 3], expected_attn[0, 3], rtol=0, atol=ATOL)
        torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"][0, 0, 3], torch.full((4,), 0.25, dtype=torch.float64),
                                   rtol=0, atol=0)
        torch.testing.assert_close(cache["blocks.0.mlp.hook_post"][0, 3, 0], torch.tensor(z, dtype=torch.float64),
                                   rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(cache["blocks.0.hook_mlp_out"][0, 3], torch.tensor([0.0, 0.0, 12 * z, 0.0], dtype=torch.float64),
                                   rtol=RTOL, atol=ATOL)
        assert metric(logits).item() == pytest.approx(m, rel=RTOL, abs=ATOL)


def test_activation_patching_by_hand(micro):
    model, clean, corrupted, metric = micro
    result = relp.activation_patching(model, clean, corrupted, metric, COMPONENTS, progress=False)
    _check(result, _maps(TOTAL, TOTAL, AP_MLP), "activation patching (denoising)")
    assert result.metadata["base_metric"] == pytest.approx(M_CORRUPTED, rel=RTOL, abs=ATOL)


def test_activation_patching_noising_by_hand(micro):
    model, clean, corrupted, metric = micro
    result = relp.activation_patching(model, clean, corrupted, metric, COMPONENTS, direction="noising", progress=False)
    _check(result, _maps(-TOTAL, -TOTAL, 30 / 13 - M_CLEAN), "activation patching (noising)")
    assert result.metadata["base_metric"] == pytest.approx(M_CLEAN, rel=RTOL, abs=ATOL)


def test_attribution_patching_by_hand(micro):
    """AtP misses resid_pre[1] entirely (the RMSNorm's Jacobian annihilates a change along the stream)
    and overestimates attn_out[3] and mlp_out[3] (the clean MLP output is 4.8 times the corrupted one)."""
    model, clean, corrupted, metric = micro
    result = relp.attribution_patching(model, clean, corrupted, metric, COMPONENTS)
    expected = _maps(0.0, 6 * K["gradient"], MLP_DELTA * G2["plain"])
    _check(result, expected, "attribution patching")  # AtP - AP: -0.71, +3.40, +2.05 at the three cells
    assert result.metadata["base_metric"] == pytest.approx(M_CORRUPTED, rel=RTOL, abs=ATOL)


# id -> (rules argument, the rules relp must report as active, k of the docstring, LN-rule among them)
RULE_SETS = {
    "relp": ("relp", ("ln", "identity", "half"), K["relp"], True),  # the default preset
    "ln": (["ln"], ("ln",), K["ln"], True),
    "identity": (["identity"], ("identity",), K["identity"], False),
    "half": (["half"], ("half",), K["half"], False),
}


@pytest.mark.parametrize("rules", list(RULE_SETS))
def test_relevance_patching_by_hand(micro, rules):
    """Each rule's effect on each cell, against the hand derivation: the LN-rule alone turns resid_pre[1]
    from 0 into 3/4 of attn_out[3] and changes mlp_out[3]; Identity- and Half-rule change only the path
    through the MLP's gate product (attn_out[3], and resid_pre[1] when the LN-rule is on too)."""
    model, clean, corrupted, metric = micro
    argument, active, k, ln = RULE_SETS[rules]
    result = relp.relevance_patching(model, clean, corrupted, metric, COMPONENTS, rules=argument)
    assert result.rules == active
    expected = _maps(4.5 * k if ln else 0.0, 6 * k, MLP_DELTA * G2["ln" if ln else "plain"])
    # Not vacuous: every rule set's attn_out[3] differs from AtP's (6 * 37616/54925 = 4.11) by >= 1.2, so
    # a rule that did nothing would fail here.
    _check(result, expected, f"relevance patching, rules {rules}")
