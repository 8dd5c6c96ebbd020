"""Path methods (two-point, integrated gradients over activations and over inputs) against oracles.

Oracles: exact activation patching (relp's, itself checked against transformer_lens.patching) where the
integrated-gradients path is the patching path; whole-site patches written out with plain hooks
(completeness: a site's scores sum to the metric's change when the whole site is patched); models where the
metric is exactly quadratic or cubic in an activation (trapezoid and midpoint rules are exact, or err by a
known factor); attribution and relevance patching from both ends (two-point is their mean); and a gradient at
the input path's midpoint taken by hand with torch.autograd. Every model here is float64.
"""

from __future__ import annotations

import pytest
import torch

import relp
from relp.integrated_gradients import midpoints
from relp.methods import get_method
from relp.testing import tiny_model

from test_patching import _prompts

pytestmark = pytest.mark.usefixtures("single_thread")

ARCHS = ["gpt2", "llama"]
# HF's LlamaRMSNorm normalises in float32 even in a float64 model: metrics of O(0.1) carry float32
# rounding (~1e-8 absolute). GPT-2 computes in float64 throughout (~1e-15).
FLOOR = {"gpt2": 1e-12, "llama": 1e-7}


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param, dtype=torch.float64, n_layers=2)


def _per_position_logit_diff(answer, wrong):
    """Logit difference summed over every position: a metric that adds over positions, so that a cell of the
    last layer after attention acts on the metric only through its own position."""

    def metric(logits):
        rows = torch.arange(logits.shape[0])
        return (logits[rows, :, answer] - logits[rows, :, wrong]).sum(1).mean()

    return metric


def _whole_site_patch(model, base, source, hook_name, metric) -> float:
    """m(base | do(site := source's site)) - m(base), written out with plain hooks."""
    store = {}
    with torch.no_grad():
        with model.hooks(fwd_hooks=[(hook_name, lambda x, hook: store.setdefault("source", x.clone()))]):
            model(source)
        with model.hooks(fwd_hooks=[(hook_name, lambda x, hook: store["source"])]):
            patched = metric(model(base))
        return (patched - metric(model(base))).item()


# ----------------------------------------------------------------------------------------------
# Integrated gradients over activations


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_midpoints(steps):
    alphas = midpoints(steps)
    assert alphas.dtype == torch.float64 and len(alphas) == steps
    torch.testing.assert_close(alphas, torch.tensor([(i + 0.5) / steps for i in range(steps)], dtype=torch.float64))


def test_ig_converges_to_activation_patching_after_the_last_attention(model):
    """After the last layer's attention every computation is per position, so with a metric that adds over
    positions, interpolating a whole site moves each cell's contribution independently: each cell's IG score
    converges to its activation-patching score, with the midpoint rule's error ~1/steps^2."""
    arch = model.cfg.model_name.removeprefix("tiny-")
    clean, corrupted, ld = _prompts(model)
    metric = _per_position_logit_diff(ld.answer, ld.wrong)
    components = ["attn_out", "resid_mid", "mlp_out", "resid_post"]
    last = [model.cfg.n_layers - 1]
    ap = relp.activation_patching(model, clean, corrupted, metric, components, layers=last, progress=False)
    ig16 = relp.integrated_gradients(model, clean, corrupted, metric, components, layers=last, steps=16)
    ig64 = relp.integrated_gradients(model, clean, corrupted, metric, components, layers=last, steps=64)
    for component in components:
        scale = ap[component].abs().max().item()
        assert scale > 1e-3, component  # not a comparison of zero maps
        err16 = (ig16[component] - ap[component]).abs().max().item()
        err64 = (ig64[component] - ap[component]).abs().max().item()
        # 1/steps^2: a factor 16 from 16 to 64 steps (observed 15.6-16.1); measured err64/scale <= 4e-5
        assert err64 < err16 / 10 + FLOOR[arch], (component, err16, err64)
        assert err64 < 1e-4 * scale + FLOOR[arch], (component, err64, scale)
    assert ig64.method == "integrated_gradients" and ig64.label == "IG" and ig64.metadata["steps"] == 64


@pytest.mark.parametrize("component, hook", [
    ("resid_pre", "blocks.0.hook_resid_pre"),
    ("attn_out", "blocks.0.hook_attn_out"),
    ("mlp_out", "blocks.0.hook_mlp_out"),
    ("head", "blocks.0.attn.hook_z"),
    ("resid_post", "blocks.0.hook_resid_post"),
])
def test_ig_scores_of_a_site_sum_to_patching_the_whole_site(model, component, hook):
    """Completeness: the cells' scores of one site sum to the metric's change when the whole site is patched
    (a path integral of the gradient), up to the midpoint rule's error, which shrinks ~4x per doubling."""
    arch = model.cfg.model_name.removeprefix("tiny-")
    clean, corrupted, metric = _prompts(model)
    truth = _whole_site_patch(model, corrupted, clean, hook, metric)
    assert abs(truth) > 5e-4  # observed 7e-4 to 0.1
    errors = []
    for steps in (4, 8, 16):
        ig = relp.integrated_gradients(model, clean, corrupted, metric, [component], layers=[0], steps=steps)
        errors.append(abs(ig[component].sum().item() - truth))
    # observed ratios 3.9-4.4 where the error is above float32 rounding (llama)
    assert errors[1] < errors[0] / 3 + FLOOR[arch] and errors[2] < errors[1] / 3 + FLOOR[arch], errors
    assert errors[2] < 1e-2 * abs(truth) + FLOOR[arch], (errors, truth)


def _eps_huge_final_norm(model):
    """With a final-norm epsilon that dwarfs the variance, the logits are affine in the last resid_post
    (what is left of the norm's non-linearity is var/eps ~ 1e-15 relative); as in test_patching."""
    final_norm = model.ln_final.original_component
    setattr(final_norm, "eps" if hasattr(final_norm, "eps") else "variance_epsilon", 1e12)
    model.ln_final.config.eps = 1e12
    return model


@pytest.mark.parametrize("power", [2, 3])
def test_two_point_and_ig_on_a_polynomial_metric(power):
    """The logits are affine in the last layer's resid_post (huge final-norm epsilon) and per position, so
    a metric that is a polynomial of the logits at each position, summed over positions, is that polynomial
    in each cell of resid_post. Quadratic: the gradient is affine along the path, so the trapezoid rule
    (two-point) and the midpoint rule (IG at any steps) are exact. Cubic: neither is; the midpoint rule's
    error is exactly proportional to 1/steps^2 (the integrand is quadratic in alpha)."""
    model = _eps_huge_final_norm(tiny_model("gpt2", dtype=torch.float64, n_layers=2))
    clean, corrupted, ld = _prompts(model)
    rows = torch.arange(clean.shape[0])
    scale = 1e8  # logits shrink by sqrt(eps) = 1e6 and random weights are small: logit differences O(1)

    def metric(logits):
        diff = scale * (logits[rows, :, ld.answer] - logits[rows, :, ld.wrong])
        return (diff + diff**power).sum(1).mean()

    last = [model.cfg.n_layers - 1]
    args = (model, clean, corrupted, metric, ["resid_post"])
    ap = relp.activation_patching(*args, layers=last, progress=False)["resid_post"]
    two_point = relp.two_point_patching(*args, layers=last)["resid_post"]
    atp = relp.attribution_patching(*args, layers=last)["resid_post"]
    ig = {steps: relp.integrated_gradients(*args, layers=last, steps=steps)["resid_post"] for steps in (1, 2, 4)}
    size = ap.abs().max().item()
    assert size > 0.1 and (atp - ap).abs().max() > 0.1 * size  # the metric is far from linear: AtP is not exact
    # metric values O(1) in float64 round at ~1e-16 (observed errors <= 4e-16); the norm's leftover
    # non-linearity is ~1e-15 relative
    if power == 2:
        torch.testing.assert_close(two_point, ap, rtol=0, atol=1e-13)
        for steps, scores in ig.items():
            torch.testing.assert_close(scores, ap, rtol=0, atol=1e-13, msg=f"IG steps={steps}")
    else:
        errors = [ig[steps] - ap for steps in (1, 2, 4)]
        assert errors[0].abs().max() > 0.01 * size
        # integrand quadratic in alpha: midpoint error = -f''/24 per panel, trapezoid error = +f''/12
        torch.testing.assert_close(errors[1], errors[0] / 4, rtol=0, atol=1e-13)
        torch.testing.assert_close(errors[2], errors[0] / 16, rtol=0, atol=1e-13)
        torch.testing.assert_close(two_point - ap, -2 * errors[0], rtol=0, atol=1e-13)


def test_ig_with_one_layer():
    """A one-layer model: every site is the last layer's; each cell's IG score converges to activation
    patching for the sites after attention, and resid_pre's scores sum to the whole input's effect."""
    model = tiny_model("gpt2", dtype=torch.float64, n_layers=1)
    clean, corrupted, ld = _prompts(model)
    metric = _per_position_logit_diff(ld.answer, ld.wrong)
    ap = relp.activation_patching(model, clean, corrupted, metric, ["attn_out", "mlp_out"], progress=False)
    ig = relp.integrated_gradients(model, clean, corrupted, metric, ["resid_pre", "attn_out", "mlp_out"], steps=64)
    for component in ("attn_out", "mlp_out"):
        assert ap[component].abs().max() > 1e-3
        torch.testing.assert_close(ig[component], ap[component], rtol=0, atol=1e-4 * ap[component].abs().max().item())
    with torch.no_grad():
        total = (metric(model(clean)) - metric(model(corrupted))).item()
    assert abs(ig["resid_pre"].sum().item() - total) < 1e-3 * abs(total)


def test_batch_size_replayed_layers_and_prefix_reuse_do_not_change_ig(model):
    clean, corrupted, metric = _prompts(model)
    reference = relp.integrated_gradients(
        model, clean, corrupted, metric, steps=5, skip_early_layers=False, reuse_prefix=False
    )
    assert not reference.metadata["replayed_early_layers"] and not reference.metadata["prefix_reuse"]
    for kwargs in ({}, {"batch_size": 3}, {"batch_size": 7}, {"logits_to_keep": 1}):  # chunks of 1 and 2 copies
        other = relp.integrated_gradients(model, clean, corrupted, metric, steps=5, **kwargs)
        assert other.metadata["replayed_early_layers"] and other.metadata["prefix_reuse"]
        for component in reference.components:
            # float64; different row layouts and the cache's position split round differently (~1e-16)
            torch.testing.assert_close(other[component], reference[component], rtol=1e-9, atol=1e-12)
            assert reference[component].abs().max() > 1e-4
    assert relp.integrated_gradients(model, clean, corrupted, metric, steps=5, batch_size=3).metadata["forward_passes"] == 2 + 5 * 6


def test_ig_cost_is_recorded():
    model = tiny_model("gpt2", dtype=torch.float64, n_layers=2)
    clean, corrupted, metric = _prompts(model)
    full = relp.integrated_gradients(model, clean, corrupted, metric, ["resid_pre"], steps=4, reuse_prefix=False)
    # endpoints 2; layer 0: 4 rows x (1 forward + 2 x 1 backward); layer 1: 4 x (1/2 + 2 x 1/2)
    assert full.metadata["forward_equivalents"] == 2 + 4 * 3 + 4 * 1.5
    # prefix reuse: the prompts first differ at position 2 of 7, so the passes compute 5 of 7 positions
    reused = relp.integrated_gradients(model, clean, corrupted, metric, ["resid_pre"], steps=4)
    assert reused.metadata["forward_equivalents"] == pytest.approx(2 + (4 * 3 + 4 * 1.5) * 5 / 7, rel=1e-12)
    # a site that is the same in both runs is skipped
    same = relp.integrated_gradients(model, clean, clean, metric, ["resid_pre"], steps=4)
    assert same.metadata["sites_skipped_unchanged"] == 2 and same.metadata["forward_equivalents"] == 2
    assert same["resid_pre"].abs().max() == 0


# ----------------------------------------------------------------------------------------------
# Two-point estimate


@pytest.mark.parametrize("rules, method", [(None, relp.attribution_patching), ("relp", relp.relevance_patching)])
def test_two_point_is_the_mean_of_both_directions(model, rules, method):
    """(g_base + g_source)/2 . (source - base) = (AtP_denoising - AtP_noising)/2 (AtP_noising is
    (base - source) . g_source); with rules the same holds for RelP."""
    clean, corrupted, metric = _prompts(model)
    components = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "head", "neuron"]
    extra = {} if rules is None else {"rules": rules}
    two_point = relp.two_point_patching(model, clean, corrupted, metric, components, rules=rules)
    denoising = method(model, clean, corrupted, metric, components, **extra)
    noising = method(model, clean, corrupted, metric, components, direction="noising", **extra)
    for component in components:
        assert two_point[component].abs().max() > 1e-4, component
        # float64; the two-point run stacks both runs in one batch (rounding ~1e-16)
        torch.testing.assert_close(two_point[component], (denoising[component] - noising[component]) / 2, rtol=1e-9, atol=1e-12)
    assert two_point.rules == denoising.rules and two_point.metadata["forward_equivalents"] == 6
    assert two_point.label == "2pt"
    if rules is not None:
        plain = relp.two_point_patching(model, clean, corrupted, metric, components)
        assert plain.rules == () and not torch.allclose(plain["resid_pre"], two_point["resid_pre"], rtol=1e-3)


def test_two_point_noising_is_minus_denoising(model):
    """Swapping base and source swaps the endpoints and flips delta: the two-point score changes sign."""
    clean, corrupted, metric = _prompts(model)
    denoising = relp.two_point_patching(model, clean, corrupted, metric)
    noising = relp.two_point_patching(model, clean, corrupted, metric, direction="noising")
    for component in denoising.components:
        torch.testing.assert_close(noising[component], -denoising[component], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Integrated gradients over the inputs


def test_ig_inputs_sum_to_the_total_effect(model):
    """The input stream is interpolated, so resid_pre at layer 0 is the path's own variable: its scores
    sum to m(source) - m(base) up to the midpoint rule's error (~1/steps^2), and they equal IG over
    activations at that site (the same path)."""
    arch = model.cfg.model_name.removeprefix("tiny-")
    clean, corrupted, metric = _prompts(model)
    with torch.no_grad():
        total = (metric(model(clean)) - metric(model(corrupted))).item()
    errors = []
    for steps in (4, 8, 16):
        result = relp.integrated_gradients_inputs(model, clean, corrupted, metric, steps=steps)
        errors.append(abs(result["resid_pre"][0].sum().item() - total))
        torch.testing.assert_close(result.metadata["source_metric"] - result.metadata["base_metric"], total)
    assert errors[1] < errors[0] / 3 + FLOOR[arch] and errors[2] < errors[1] / 3 + FLOOR[arch], errors
    ig = relp.integrated_gradients(model, clean, corrupted, metric, ["resid_pre"], layers=[0], steps=16)
    torch.testing.assert_close(result["resid_pre"][0], ig["resid_pre"][0], rtol=1e-9, atol=1e-12)
    assert result.metadata["forward_equivalents"] == 2 + 3 * 16 and result.label == "IG-in"


@pytest.mark.parametrize("rules", [None, "relp"])
def test_ig_inputs_with_one_step_is_the_gradient_at_the_midpoint(model, rules):
    """steps=1: every site's gradient at the run whose input is halfway between base and source, times the
    site's endpoint difference. Oracle: that gradient taken with torch.autograd and plain hooks."""
    clean, corrupted, metric = _prompts(model)
    components = ["resid_pre", "attn_out", "mlp_out", "head"]
    result = relp.integrated_gradients_inputs(model, clean, corrupted, metric, components, steps=1, rules=rules)
    hooks = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "head": "attn.hook_z"}
    names = [f"blocks.{layer}.{hook}" for hook in hooks.values() for layer in range(model.cfg.n_layers)]
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    _, corrupted_cache = model.run_with_cache(corrupted, names_filter=lambda n: n in names)
    midpoint = ((clean_cache["blocks.0.hook_resid_pre"] + corrupted_cache["blocks.0.hook_resid_pre"]) / 2).requires_grad_(True)
    captured = {}

    def capture(x, hook):
        captured[hook.name] = x
        return x

    inner = [(name, capture) for name in names if name != "blocks.0.hook_resid_pre"]
    with relp.lrp_rules(model, rules) if rules else torch.enable_grad():
        with torch.enable_grad(), model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: midpoint), *inner]):
            value = metric(model(corrupted))
            tensors = {name: midpoint if name == "blocks.0.hook_resid_pre" else captured[model.hook_dict[name].name] for name in names}
            grads = dict(zip(names, torch.autograd.grad(value, list(tensors.values()))))
    for component, hook in hooks.items():
        for layer in range(model.cfg.n_layers):
            name = f"blocks.{layer}.{hook}"
            product = (clean_cache[name] - corrupted_cache[name]) * grads[name]
            expected = product.sum((0, 3)).T if component == "head" else product.sum((0, 2))  # [head, pos] / [pos]
            torch.testing.assert_close(result[component][layer], expected, rtol=1e-9, atol=1e-12, msg=f"{component} {layer}")
    assert result.rules == relp.rules.resolve_rules(model, rules).active and (rules is None) == (result.rules == ())


# ----------------------------------------------------------------------------------------------
# Rules


def test_rules_change_ig_and_are_recorded(model):
    clean, corrupted, metric = _prompts(model)
    for method in (relp.integrated_gradients, relp.integrated_gradients_inputs):
        plain = method(model, clean, corrupted, metric, steps=3)
        ruled = method(model, clean, corrupted, metric, steps=3, rules="relp")
        gradient = method(model, clean, corrupted, metric, steps=3, rules="gradient")
        assert plain.rules == () and ruled.rules and set(ruled.rules) <= {"ln", "identity", "half"}
        assert not torch.allclose(plain["resid_pre"], ruled["resid_pre"], rtol=1e-3)
        for component in plain.components:
            torch.testing.assert_close(gradient[component], plain[component], rtol=1e-9, atol=1e-12)
    # the same path at the input: IG over activations at resid_pre 0 equals IG over the inputs, under rules too
    ig = relp.integrated_gradients(model, clean, corrupted, metric, ["resid_pre"], layers=[0], steps=3, rules="relp")
    inputs = relp.integrated_gradients_inputs(model, clean, corrupted, metric, ["resid_pre"], layers=[0], steps=3, rules="relp")
    torch.testing.assert_close(ig["resid_pre"], inputs["resid_pre"], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Embedding models


def test_path_methods_with_an_embedding_metric():
    """A BERT encoder read through a pooled sentence embedding (the metric's readout): IG's scores of a site
    sum to the whole-site patch, and two-point is the mean of AtP from both ends."""
    model = tiny_model("bert", dtype=torch.float64, n_layers=2)
    clean, corrupted, _ = _prompts(model)
    metric = relp.SimilarityDifference.from_runs(model, ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"], clean, corrupted, normalized=False)
    hook = relp.components.component_for(model, "mlp_out").hook_name(0)

    def whole_site():
        store = {}
        with torch.no_grad():
            with model.hooks(fwd_hooks=[(hook, lambda x, hook: store.setdefault("source", x.clone()))]):
                metric.readout(model, clean)
            with model.hooks(fwd_hooks=[(hook, lambda x, hook: store["source"])]):
                patched = metric(metric.readout(model, corrupted))
            return (patched - metric(metric.readout(model, corrupted))).item()

    truth = whole_site()
    assert abs(truth) > 1e-4  # observed 2.6e-4; the errors at 4 and 8 steps 1.1e-10 and 2.7e-11
    errors = []
    for steps in (4, 8):
        ig = relp.integrated_gradients(model, clean, corrupted, metric, ["mlp_out"], layers=[0], steps=steps)
        errors.append(abs(ig["mlp_out"].sum().item() - truth))
    assert errors[1] < errors[0] / 3 + 1e-12 and errors[1] < 1e-2 * abs(truth), (errors, truth)
    two_point = relp.two_point_patching(model, clean, corrupted, metric)
    denoising = relp.attribution_patching(model, clean, corrupted, metric)
    noising = relp.attribution_patching(model, clean, corrupted, metric, direction="noising")
    for component in two_point.components:
        torch.testing.assert_close(two_point[component], (denoising[component] - noising[component]) / 2, rtol=1e-9, atol=1e-14)
    inputs = relp.integrated_gradients_inputs(model, clean, corrupted, metric, steps=16)
    total = inputs.metadata["source_metric"] - inputs.metadata["base_metric"]
    assert abs(inputs["resid_pre"][0].sum().item() - total) < 1e-2 * abs(total)
    assert inputs.metadata["readout"] != "logits"


# ----------------------------------------------------------------------------------------------
# Registry, validation, hooks


def test_registry_entries():
    for key, function, label, options in [
        ("two_point", relp.two_point_patching, "2pt", ("logits_to_keep",)),
        ("ig", relp.integrated_gradients, "IG", ("steps", "logits_to_keep", "batch_size")),
        ("ig_inputs", relp.integrated_gradients_inputs, "IG-in", ("steps", "logits_to_keep")),
    ]:
        method = get_method(key)
        assert method.function is function and method.label == label and method.options == options
        assert get_method(function.__name__) is method and not method.standard
        # the same method under the RelP rules is a preset with its own key (the experiments' --rules
        # reaches only methods whose default is a rule set)
        preset = get_method(f"{key}_relp")
        assert preset.function is function and dict(preset.defaults) == {"rules": "relp"}


@pytest.fixture(scope="module")
def small():
    return tiny_model("gpt2", n_layers=1, d_model=16)


@pytest.mark.parametrize("method", [relp.integrated_gradients, relp.integrated_gradients_inputs])
@pytest.mark.parametrize("steps", [0, -2, 1.5, True, "8", None])
def test_bad_steps_are_refused(small, method, steps):
    clean, corrupted, metric = _prompts(small)
    with pytest.raises(ValueError, match=f"steps must be a positive integer.*got {steps!r}"):
        method(small, clean, corrupted, metric, steps=steps)


@pytest.mark.parametrize("method", [relp.integrated_gradients, relp.integrated_gradients_inputs])
@pytest.mark.parametrize("batch_size", [0, 2.0, False])
def test_bad_batch_size_is_refused(small, method, batch_size):
    clean, corrupted, metric = _prompts(small)
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer.*got {batch_size!r}"):
        method(small, clean, corrupted, metric, batch_size=batch_size)


@pytest.mark.parametrize("method", [relp.two_point_patching, relp.integrated_gradients, relp.integrated_gradients_inputs])
def test_common_validation(small, method):
    clean, corrupted, metric = _prompts(small)
    with pytest.raises(ValueError, match="unknown rule preset"):
        method(small, clean, corrupted, metric, rules="nope")
    with pytest.raises(ValueError, match="lengths differ"):
        method(small, clean, corrupted[:, :-1], metric)
    with pytest.raises(ValueError, match="unknown component"):
        method(small, clean, corrupted, metric, ["resid"])
    with pytest.raises(ValueError, match="expected a scalar"):
        method(small, clean, corrupted, lambda logits: logits[:, -1, 0])


def _n_hooks(model) -> int:
    return sum(len(h._forward_hooks) + len(h._backward_hooks) for h in model.hook_dict.values())


@pytest.mark.parametrize("method", [relp.two_point_patching, relp.integrated_gradients, relp.integrated_gradients_inputs])
def test_hooks_are_removed_when_the_metric_fails(small, method):
    clean, corrupted, metric = _prompts(small)
    before = _n_hooks(small)
    calls = []
    # two-point's first metric call is in its gradient pass; the others' endpoint runs come first
    passing = 0 if method is relp.two_point_patching else 2

    def failing(logits):
        calls.append(1)
        if len(calls) > passing:
            raise RuntimeError("metric failed")
        return metric(logits)

    options = {} if method is relp.two_point_patching else {"steps": 2}
    with pytest.raises(RuntimeError, match="metric failed"):
        method(small, clean, corrupted, failing, rules="relp", **options)
    assert _n_hooks(small) == before
    assert all(block.forward.__func__ is type(block).forward for block in small.blocks if hasattr(block.forward, "__func__"))
