"""AtP* (relp.atp_star) and the query/key components against independent oracles.

* The QK-fix is exact where the softmax is the only nonlinearity between a query/key and the metric: a
  one-layer model whose metric is linear in that layer's attention output (the value path and the
  output projection are linear). There it must equal exact activation patching cell by cell, and
  plain AtP must not.
* GradDrop is checked against its definition computed another way: one forward pass per dropped layer
  with that layer's block outputs detached (instead of one forward pass and a gate in the backward).
* Other components must equal attribution_patching / relevance_patching bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tl_patching
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import relp
from relp.loading import bridge_from_hf
from relp.methods import get_method
from relp.testing import tiny_hf_model, tiny_model, tiny_tokenizer

ARCHS = ["gpt2", "llama"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    yield


def _sharp_model(architecture: str, n_layers: int = 1, sharpness: float = 15.0):
    """A float64 tiny model whose query and key weights are scaled up, so that attention patterns are far
    from uniform and the softmax is visibly nonlinear (random init gives scores ~1e-2)."""
    n_key_value_heads = None
    if architecture == "llama-mqa":  # multi-query attention: one key head shared by all four query heads
        architecture, n_key_value_heads = "llama", 1
    tokenizer = tiny_tokenizer()
    hf = tiny_hf_model(
        architecture, vocab_size=len(tokenizer), n_layers=n_layers, dtype=torch.float64, seed=1,
        n_key_value_heads=n_key_value_heads,
    )
    with torch.no_grad():
        if architecture == "gpt2":
            for block in hf.transformer.h:
                d = block.attn.c_attn.weight.shape[0]
                block.attn.c_attn.weight[:, : 2 * d] *= sharpness
        else:
            for block in hf.model.layers:
                block.self_attn.q_proj.weight *= sharpness
                block.self_attn.k_proj.weight *= sharpness
    return bridge_from_hf(hf, tokenizer, name=f"sharp-{architecture}")


def _prompts(model, n_prompts=2, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(6, model.cfg.d_vocab, (n_prompts, length), generator=g)
    clean[:, 0] = 0  # BOS
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(6, model.cfg.d_vocab, (n_prompts,), generator=g)
    corrupted[:, 4] = torch.randint(6, model.cfg.d_vocab, (n_prompts,), generator=g)
    return clean, corrupted


class _AttnOut:
    """Readout: layer 0's attention output [batch, pos, d_model] (a torch hook on its hook point, so it
    sees what the method's own hooks made of it)."""

    name = "attn_out_0"

    def __call__(self, model, tokens):
        out = {}
        handle = model.hook_dict["blocks.0.hook_attn_out"].register_forward_hook(lambda m, i, o: out.update(x=o))
        try:
            model(tokens)
        finally:
            handle.remove()
        return out["x"]


class LinearInAttnOut:
    """A metric linear in layer 0's attention output: mean over prompts of <attn_out, W>."""

    name = "linear_attn_out"
    readout = _AttnOut()

    def __init__(self, model, length, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(length, model.cfg.d_model, generator=g, dtype=torch.float64)

    def __call__(self, attn_out):
        return (attn_out * self.weight).sum() / attn_out.shape[0]


# ----------------------------------------------------------------------------------------------
# The query and key components


@pytest.mark.parametrize("architecture", ARCHS)
def test_query_key_shapes_and_rotary(architecture):
    model = tiny_model(architecture, n_layers=1, dtype=torch.float64)
    tokens, _ = _prompts(model)
    _, cache = model.run_with_cache(tokens)
    q, k = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_k"]
    n_kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    assert q.shape == (2, 6, model.cfg.n_heads, model.cfg.d_head)
    assert k.shape == (2, 6, n_kv, model.cfg.d_head)
    if architecture == "llama":
        assert n_kv < model.cfg.n_heads  # grouped-query attention: keys have the key/value heads
        # hook_q/hook_k are before the rotary embedding: Hugging Face's rotation of them is hook_rot_q/k
        rq, rk = apply_rotary_pos_emb(
            q.transpose(1, 2), k.transpose(1, 2), cache["blocks.0.attn.hook_cos"], cache["blocks.0.attn.hook_sin"]
        )
        torch.testing.assert_close(rq.transpose(1, 2), cache["blocks.0.attn.hook_rot_q"], rtol=0, atol=1e-15)
        torch.testing.assert_close(rk.transpose(1, 2), cache["blocks.0.attn.hook_rot_k"], rtol=0, atol=1e-15)
        assert not torch.allclose(rq.transpose(1, 2), q)


@pytest.mark.parametrize("architecture", ARCHS)
@pytest.mark.parametrize("component, hook", [("query", "hook_q"), ("key", "hook_k")])
def test_activation_patching_of_query_and_key_matches_a_hand_patch(architecture, component, hook):
    model = tiny_model(architecture, n_layers=2, dtype=torch.float64)
    clean, corrupted = _prompts(model)
    metric = relp.LogitDiff(torch.tensor([10, 11]), torch.tensor([12, 13]))
    ap = relp.activation_patching(model, clean, corrupted, metric, [component], progress=False)
    _, clean_cache = model.run_with_cache(clean)
    base = metric(model(corrupted))
    n_heads = clean_cache[f"blocks.0.attn.{hook}"].shape[2]
    assert ap.scores[component].shape == (2, n_heads, 6)
    for layer in range(2):
        name = f"blocks.{layer}.attn.{hook}"
        for head in range(n_heads):
            for position in (1, 2, 4):

                def patch(x, hook):
                    x = x.clone()
                    x[:, position, head] = clean_cache[name][:, position, head]
                    return x

                with model.hooks(fwd_hooks=[(name, patch)]):
                    expected = (metric(model(corrupted)) - base).item()
                assert ap.scores[component][layer, head, position].item() == pytest.approx(expected, abs=1e-13)
    assert ap.scores[component][:, :, :2].abs().max() == 0  # nothing changes before the first corrupted token
    assert ap.scores[component][:, :, 2:].abs().max() > 1e-6


def test_activation_patching_of_query_and_key_matches_transformer_lens():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # transformer_lens.patching stores its results in it
    try:
        model = tiny_model("gpt2", n_layers=2, dtype=torch.float64)
        clean, corrupted = _prompts(model)
        metric = relp.LogitDiff(torch.tensor([10, 11]), torch.tensor([12, 13]))
        ap = relp.activation_patching(model, clean, corrupted, metric, ["query", "key"], progress=False)
        _, cache = model.run_with_cache(clean)
        for component, function in (
            ("query", tl_patching.get_act_patch_attn_head_q_by_pos), ("key", tl_patching.get_act_patch_attn_head_k_by_pos)
        ):
            expected = function(model, corrupted, cache, metric) - metric(model(corrupted))  # [layer, pos, head]
            torch.testing.assert_close(ap.scores[component], expected.transpose(1, 2), rtol=0, atol=1e-13)
    finally:
        torch.set_default_dtype(previous)


# ----------------------------------------------------------------------------------------------
# QK-fix: exact where the softmax is the only nonlinearity


@pytest.mark.parametrize("architecture", [*ARCHS, "llama-mqa"])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_qk_fix_equals_activation_patching_on_one_layer(architecture, direction):
    model = _sharp_model(architecture)
    clean, corrupted = _prompts(model)
    metric = LinearInAttnOut(model, clean.shape[1])
    components = ["query", "key"]
    ap = relp.activation_patching(model, clean, corrupted, metric, components, direction=direction, progress=False)
    star = relp.atp_star(model, clean, corrupted, metric, components, direction=direction)
    plain = relp.attribution_patching(model, clean, corrupted, metric, components, direction=direction)
    # The bridge computes Llama's softmax in float32 (also for a float64 model); the QK-fix follows the
    # model and reproduces those patterns bit for bit, so only float64 rounding remains (measured ~2e-15
    # relative on both architectures; AtP is off by 40-190%).
    softmax_eps = torch.finfo(torch.float64).eps
    for component in components:
        exact = ap.scores[component]
        scale = exact.abs().max().item()
        assert scale > 1e-3  # the patches matter
        tolerance = 64 * softmax_eps * scale
        torch.testing.assert_close(star.scores[component], exact, rtol=0, atol=tolerance)
        # AtP linearises the softmax: far from exact here
        assert (plain.scores[component] - exact).abs().max().item() > 0.01 * scale
        unfixed = relp.atp_star(model, clean, corrupted, metric, [component], direction=direction, qk_fix=False)
        assert torch.equal(unfixed.scores[component], plain.scores[component])
    assert star.metadata["qk_fixed_components"] == ["key", "query"]
    assert star.scores["key"].shape[1] == (model.cfg.n_key_value_heads or model.cfg.n_heads)
    assert star.metadata["softmax_dtypes"] == {"0": str(torch.float64 if architecture == "gpt2" else torch.float32)}


def test_qk_fix_key_cells_share_their_query_heads():
    """Llama's key head g serves query heads 2g and 2g+1: patching one key cell moves both heads'
    patterns, and the score is their sum (checked against exact patching above); here its size."""
    model = _sharp_model("llama")
    assert model.cfg.n_key_value_heads == model.cfg.n_heads // 2
    clean, corrupted = _prompts(model)
    star = relp.atp_star(model, clean, corrupted, LinearInAttnOut(model, 6), ["query", "key"])
    assert star.scores["key"].shape == (1, model.cfg.n_key_value_heads, 6)
    assert star.scores["query"].shape == (1, model.cfg.n_heads, 6)


# ----------------------------------------------------------------------------------------------
# Other components: AtP / RelP unchanged


@pytest.mark.parametrize("architecture", ARCHS)
def test_other_components_equal_attribution_and_relevance_patching(architecture):
    model = tiny_model(architecture, n_layers=2, dtype=torch.float64)
    clean, corrupted = _prompts(model)
    metric = relp.LogitDiff(torch.tensor([10, 11]), torch.tensor([12, 13]))
    components = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "head", "neuron"]
    star = relp.atp_star(model, clean, corrupted, metric, [*components, "query", "key"])
    atp = relp.attribution_patching(model, clean, corrupted, metric, components)
    for component in components:
        assert torch.equal(star.scores[component], atp.scores[component]), component
    assert star.method == "atp_star" and star.rules == () and star.metadata["signed"] is True
    assert star.metadata["forward_equivalents"] == 4
    ruled = relp.atp_star(model, clean, corrupted, metric, [*components, "query"], rules="relp")
    relp_result = relp.relevance_patching(model, clean, corrupted, metric, components, rules="relp")
    for component in components:
        assert torch.equal(ruled.scores[component], relp_result.scores[component]), component
    assert ruled.rules == relp_result.rules


# ----------------------------------------------------------------------------------------------
# GradDrop


def _dropped_gradient_atp(model, clean, corrupted, metric, component, drop):
    """AtP scores of `component` with layer `drop`'s block outputs detached in the forward pass (its
    gradient is dropped); one forward and one backward pass per dropped layer (the oracle)."""
    _, source = model.run_with_cache(clean)
    captured = {}

    def keep(x, hook):
        captured[hook.name] = x
        return x

    names = [f"blocks.{l}.{relp.COMPONENTS[component].hook_template.split('{layer}.')[1]}" for l in range(model.cfg.n_layers)]
    detach = [(f"blocks.{drop}.hook_attn_out", lambda x, hook: x.detach()),
              (f"blocks.{drop}.hook_mlp_out", lambda x, hook: x.detach())] if drop is not None else []
    store = {}
    hooks = [(n, lambda x, hook, n=n: store.__setitem__(n, x) or x) for n in names]
    with model.hooks(fwd_hooks=hooks + detach):
        value = metric(model(corrupted))
        grads = torch.autograd.grad(value, [store[n] for n in names], allow_unused=True)
    out = []
    for n, g in zip(names, grads):
        delta = source[n] - store[n].detach()
        grad = torch.zeros_like(delta) if g is None else g
        out.append(relp.COMPONENTS[component].cell_scores(delta * grad))
    return torch.stack(out)


@pytest.mark.parametrize("architecture", ARCHS)
def test_grad_drop_matches_its_definition(architecture):
    model = tiny_model(architecture, n_layers=3, dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(True)
    clean, corrupted = _prompts(model)
    metric = relp.LogitDiff(torch.tensor([10, 11]), torch.tensor([12, 13]))
    components = ["resid_pre", "attn_out", "mlp_out", "head"]
    star = relp.atp_star(model, clean, corrupted, metric, components, grad_drop=True)
    n_layers = 3
    for component in components:
        per_drop = {d: _dropped_gradient_atp(model, clean, corrupted, metric, component, d) for d in (None, 0, 1, 2)}
        for layer in range(n_layers):
            expected = sum(per_drop[d][layer].abs() for d in range(n_layers) if d != layer) / (n_layers - 1)
            torch.testing.assert_close(star.scores[component][layer], expected, rtol=1e-10, atol=1e-15)
        # dropping a later layer changes the earlier cells' gradients (else the test would be vacuous)
        assert (per_drop[2][0] - per_drop[None][0]).abs().max() > 1e-6
    # the last layer's cells: every other drop is an earlier layer, so GradDrop = |AtP|
    atp = relp.attribution_patching(model, clean, corrupted, metric, components)
    for component in components:
        torch.testing.assert_close(star.scores[component][-1], atp.scores[component][-1].abs(), rtol=1e-12, atol=0)
        assert (star.scores[component] >= 0).all()
    assert star.metadata["signed"] is False and star.metadata["grad_drop"] is True
    assert star.metadata["grad_drop_layers"] == [1, 2]
    assert star.metadata["forward_equivalents"] == 2 + 2 * 3  # source + base forward, 3 backward passes
    only_last = relp.atp_star(model, clean, corrupted, metric, ["attn_out"], grad_drop=True, layers=[2])
    assert only_last.metadata["grad_drop_layers"] == [] and only_last.metadata["forward_equivalents"] == 4


def test_grad_drop_with_qk_fix_is_the_average_of_dropped_fixed_scores():
    """Query/key cells under GradDrop take the QK-fix with each dropped pass's pattern gradient. Known
    answer: on layer 0 of a 2-layer model GradDrop is |QK-fix score with layer 1 dropped| (the only
    other layer); the metric reads layer 0's attention output, so layer 1 is off its path, the drop
    changes nothing and the score is |exact activation patching| (the one-layer case above)."""
    model = _sharp_model("gpt2", n_layers=2)
    clean, corrupted = _prompts(model)
    metric = LinearInAttnOut(model, 6)  # reads layer 0's attention output: layer 1 is not on its path
    star = relp.atp_star(model, clean, corrupted, metric, ["query", "key"], grad_drop=True, layers=[0])
    ap = relp.activation_patching(model, clean, corrupted, metric, ["query", "key"], layers=[0], progress=False)
    for component in ("query", "key"):
        scale = ap.scores[component].abs().max().item()
        assert scale > 1e-3
        torch.testing.assert_close(star.scores[component], ap.scores[component].abs(), rtol=0, atol=64 * 2.2e-16 * scale)
    assert star.metadata["grad_drop_layers"] == [1] and star.metadata["grad_drop_layers_reached"] == []


# ----------------------------------------------------------------------------------------------
# Registry and bad input


def test_registered():
    method = get_method("atp_star")
    assert method.function is relp.atp_star and method.label == "AtP*" and method.options == ("logits_to_keep",)
    preset = get_method("relp_qk")  # AtP* under the RelP rules: a preset with its own key
    assert preset.function is relp.atp_star and dict(preset.defaults) == {"rules": "relp"}
    assert get_method("AtP*") is method


def test_bad_input():
    model = tiny_model("gpt2", n_layers=1)
    clean, corrupted = _prompts(model)
    metric = relp.LogitDiff(torch.tensor([10, 11]), torch.tensor([12, 13]))
    with pytest.raises(TypeError, match="qk_fix must be True or False; got 'yes'"):
        relp.atp_star(model, clean, corrupted, metric, qk_fix="yes")
    with pytest.raises(ValueError, match="GradDrop .* has 1 layer"):
        relp.atp_star(model, clean, corrupted, metric, grad_drop=True)
    with pytest.raises(ValueError, match="unknown component"):
        relp.atp_star(model, clean, corrupted, metric, ["queries"])
    with pytest.raises(ValueError, match="unknown rule preset"):
        relp.atp_star(model, clean, corrupted, metric, rules="nope")
    with pytest.raises(ValueError, match="direction"):
        relp.atp_star(model, clean, corrupted, metric, direction="sideways")


def test_refuses_an_architecture_it_cannot_recompute():
    model = tiny_model("bert", n_layers=1)
    tokens = torch.tensor([[3, 10, 11, 12, 4], [3, 13, 14, 15, 4]])
    corrupted = tokens.clone()
    corrupted[:, 2] = 20
    metric = relp.LogitDiff(torch.tensor([10, 11]), torch.tensor([12, 13]))
    with pytest.raises(ValueError, match="QK-fix cannot reproduce the attention scores .* use qk_fix=False"):
        relp.atp_star(model, tokens, corrupted, metric, ["query"])
    relp.atp_star(model, tokens, corrupted, metric, ["query"], qk_fix=False)  # plain AtP works


def test_shared_validation():
    model = tiny_model("gpt2", n_layers=2)
    clean, corrupted = _prompts(model)
    metric = relp.LogitDiff(torch.tensor([10, 11]), torch.tensor([12, 13]))
    with pytest.raises(ValueError, match=r"token lengths differ: 6 vs 5"):
        relp.atp_star(model, clean, corrupted[:, :5], metric)
    with pytest.raises(ValueError, match=r"batch sizes differ: 2 vs 1"):
        relp.atp_star(model, clean, corrupted[:1], metric)
    with pytest.raises(ValueError, match=r"returned shape \(2,\).*expected a scalar"):
        relp.atp_star(model, clean, corrupted, lambda logits: logits[:, -1, 0], ["query"])
    with pytest.raises(ValueError, match=r"returned nan.*finite"):
        relp.atp_star(model, clean, corrupted, lambda logits: logits.sum() * float("nan"), ["key"], grad_drop=True)
    model.train()
    try:
        with pytest.raises(RuntimeError, match="training mode"):
            relp.atp_star(model, clean, corrupted, metric)
    finally:
        model.eval()


def test_logits_to_keep_changes_nothing_but_rounding():
    model = tiny_model("llama", n_layers=2, dtype=torch.float64)
    clean, corrupted = _prompts(model)
    metric = relp.LogitDiff(torch.tensor([10, 11]), torch.tensor([12, 13]))
    components = ["query", "key", "resid_pre"]
    full = relp.atp_star(model, clean, corrupted, metric, components, grad_drop=True)
    kept = relp.atp_star(model, clean, corrupted, metric, components, grad_drop=True, logits_to_keep=1)
    for component in components:
        torch.testing.assert_close(kept.scores[component], full.scores[component], rtol=1e-12, atol=1e-16)


def test_tiny_model_key_value_heads():
    assert tiny_model("llama", n_layers=1, n_key_value_heads=1).cfg.n_key_value_heads == 1
    with pytest.raises(ValueError, match="n_key_value_heads applies to 'llama'.*'gpt2'"):
        tiny_model("gpt2", n_layers=1, n_key_value_heads=1)
