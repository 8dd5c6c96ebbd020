"""What makes relevance and attribution patching cheap, and that it changes nothing.

* The rule hooks are built with at most one read of the bridge's ``hook_dict`` (a property that rebuilds
  the hook registry on every read), whatever the number of layers.
* The MLP rewrite (Identity- and Half-rule) and the LN-rule give gradients ``torch.equal`` to the
  formulas they replaced (written out below), also where pre-activations are exactly zero.
* Relevance patching takes its source run without the rules' hooks: its scores are ``torch.equal`` to
  those of the old protocol (both runs under the rules), and every activation of a run is bit for bit
  the same with and without the hooks (float32 and float64, GPT-2, Llama, BERT, the AH-rule's
  attention fallback included).
* ``logits_to_keep`` in the gradient methods gives the full-logits scores up to float rounding.
* The liveness probe runs once per model and rule.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import relp
import relp.rules as rules_module
from relp.methods import get_method
from relp.rules import (
    _activation_fn,
    _gate_product,
    _keep_value,
    _norm_eps,
    applied_rules,
    half_rule,
    lrp_rules,
    pattern_hook_is_live,
    resolve_rules,
    rule_forward_contexts,
    rule_hooks,
)
from relp.testing import tiny_model

ARCHS = ("gpt2", "llama", "bert")
DTYPES = (torch.float32, torch.float64)
RULE_SETS = ("relp", "ln", "identity", "half", "relp+ah", "attnlrp")


def _applicable_rule_sets(model) -> list[str]:
    """RULE_SETS without those of which no rule acts on `model` ("half" on GPT-2 and BERT: an error now)."""
    applicable = []
    for rules in RULE_SETS:
        try:
            resolve_rules(model, rules)
        except ValueError:
            continue
        applicable.append(rules)
    return applicable

_MODELS: dict = {}


def _model(arch, dtype=torch.float32, n_layers=3):
    """A tiny model whose norms have random weights and biases (Hugging Face initialises them to 1 and
    0, which would hide a change in the order of the LN-rule's multiplications)."""
    key = (arch, dtype, n_layers)
    if key not in _MODELS:
        model = tiny_model(arch, dtype=dtype, n_layers=n_layers)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name.lower() or ".ln_" in name:
                    parameter.add_(0.2 * torch.randn(parameter.shape, generator=g, dtype=parameter.dtype))
        _MODELS[key] = model
    return _MODELS[key]


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _prompts(model, n_prompts=3, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    d_vocab = model.cfg.d_vocab
    clean = torch.randint(6, d_vocab, (n_prompts, length), generator=g)
    clean[:, 0] = 0
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(6, d_vocab, (n_prompts,), generator=g)
    answer = torch.randint(6, d_vocab, (n_prompts,), generator=g)
    wrong = torch.randint(6, d_vocab, (n_prompts,), generator=g)
    return clean, corrupted, relp.LogitDiff(answer, wrong)


# resid_mid and neuron are read at hook points the rules rewrite on some architectures (BERT's ln1 output,
# every MLP's hook_post): the capture must come after the rule there.
COMPONENTS = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "head", "neuron"]


# ----------------------------------------------------------------------------------------------
# hook_dict reads


class _CountingHookDict:
    def __init__(self, monkeypatch, model):
        self.reads = 0
        original = type(model).hook_dict

        def counted(bridge):
            self.reads += 1
            return original.fget(bridge)

        monkeypatch.setattr(type(model), "hook_dict", property(counted))


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("rules", ["relp", "relp+ah", "attnlrp"])
def test_rule_hooks_read_hook_dict_at_most_once(monkeypatch, arch, rules):
    model = _model(arch, n_layers=4)
    pattern_hook_is_live(model)  # cached per model: its probe runs a forward pass
    rule_set = resolve_rules(model, rules)
    counter = _CountingHookDict(monkeypatch, model)
    hooks = rule_hooks(model, rule_set)
    assert len(hooks) > 4 * 3  # not vacuous: several hooks per layer
    assert counter.reads <= 1
    counter.reads = 0
    with model.hooks(fwd_hooks=[]):
        pass
    own, counter.reads = counter.reads, 0  # TransformerLens's own reads in model.hooks (2 in TL 4.3)
    with applied_rules(model, rule_set):
        pass
    assert counter.reads <= 1 + own


def test_relevance_patching_reads_hook_dict_a_fixed_number_of_times(monkeypatch):
    """RelP reads hook_dict a fixed number of times more than AtP (the rule hooks' read, and
    model.hooks' own for them), the same with 2 layers as with 6."""
    extra = []
    for n_layers in (2, 6):
        model = _model("llama", n_layers=n_layers)
        clean, corrupted, metric = _prompts(model)
        relp.relevance_patching(model, clean, corrupted, metric)  # liveness probe, cached per model
        counter = _CountingHookDict(monkeypatch, model)
        relp.attribution_patching(model, clean, corrupted, metric)
        atp_reads, counter.reads = counter.reads, 0
        relp.relevance_patching(model, clean, corrupted, metric)
        extra.append(counter.reads - atp_reads)
    model = _model("llama", n_layers=2)
    counter = _CountingHookDict(monkeypatch, model)
    with model.hooks(fwd_hooks=[]):
        pass
    assert extra[0] == extra[1] and extra[0] <= 1 + counter.reads, extra


# ----------------------------------------------------------------------------------------------
# The MLP and norm rewrites against the formulas they replaced


def _old_norm_hooks(model, active):
    """relp.rules._norm_hooks before the fused RMSNorm path: the LN-rule's path through autograd."""
    if "ln" not in active:
        return []
    hooks = []
    for prefix in [n[: -len(".hook_normalized")] for n in model.hook_dict if n.endswith(".hook_normalized")]:
        module = model.get_submodule(prefix)
        inputs = {}

        def capture(x, hook, inputs=inputs):
            inputs["x"] = x
            return x

        def rewrite(y, hook, module=module, inputs=inputs):
            x = inputs.pop("x")
            centred = x if module.uses_rms_norm else x - x.mean(-1, keepdim=True)
            eps = _norm_eps(module, model)
            inv_scale = torch.rsqrt(centred.detach().pow(2).mean(-1, keepdim=True) + eps)
            weight = module.weight.detach()
            if module.uses_weight_offset:
                weight = 1.0 + weight
            return _keep_value(y, centred * inv_scale * weight.to(centred.dtype))

        hooks += [(f"{prefix}.hook_in", capture), (f"{prefix}.hook_out", rewrite)]
    return hooks


def _old_identity_rule(pre, activated, plain):
    zero = pre == 0
    ratio = activated.detach() / torch.where(zero, torch.ones_like(pre), pre).detach()
    return torch.where(zero, plain, ratio * pre)


def _old_mlp_hooks(model, active):
    """relp.rules._mlp_hooks before the rewrite: act(g) computed twice with autograd paths, and the
    x == 0 branch built on every element."""
    identity, half = "identity" in active, "half" in active
    if not (identity or half):
        return []
    gated = bool(model.cfg.gated_mlp)
    hooks = []
    for layer in range(model.cfg.n_layers):
        prefix = f"blocks.{layer}.mlp"
        captured = {}
        act = _activation_fn(model, layer) if gated else None

        def capture(name, captured=captured):
            def hook(x, hook, name=name):
                captured[name] = x
                return x

            return hook

        def rewrite(post, hook, captured=captured, act=act):
            pre = captured.pop("pre")
            if gated:
                up = captured.pop("up")
                activated = act(pre)
            else:
                up, activated = None, post
            if identity:
                plain = act(pre) if gated else post
                activation_path = _old_identity_rule(pre, activated, plain)
            else:
                activation_path = activated
            if not gated:
                return _keep_value(post, activation_path)
            if half:
                path = half_rule(activation_path, activated, up)
            else:
                path = _gate_product(activation_path, activated, up, 1.0)
            return _keep_value(post, path)

        hooks.append((f"{prefix}.hook_pre", capture("pre")))
        if gated:
            hooks.append((f"{prefix}.hook_pre_linear", capture("up")))
        hooks.append((f"{prefix}.hook_post", rewrite))
    return hooks


def _gradients(model, tokens, rule_set, hooks, direction):
    """Gradients of a fixed functional of all logits w.r.t. every residual stream and MLP hook point."""
    n_layers = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)] + [
        f"blocks.{l}.mlp.{h}" for l in range(n_layers) for h in ("hook_pre", "hook_post")
    ]
    if model.cfg.gated_mlp:
        names += [f"blocks.{l}.mlp.hook_pre_linear" for l in range(n_layers)]
    store = {}

    def root(x, hook):
        return x.detach().requires_grad_(True)

    def keep(name):
        def hook(x, hook):
            store[name] = x
            return x

        return hook

    with torch.enable_grad(), applied_rules(model, rule_set, hooks=hooks):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", root)] + [(n, keep(n)) for n in names]):
            logits = model(tokens)
            grads = torch.autograd.grad((logits * direction).sum(), [store[n] for n in names])
    return dict(zip(names, grads))


def _zero_first_units(model):
    """Make hidden unit 0's pre-activation exactly 0 in every layer (the Identity-rule's x == 0 branch)."""
    edits = []
    with torch.no_grad():
        for block in model.blocks:
            mlp = block.mlp
            linear = getattr(mlp, "gate" if model.cfg.gated_mlp else "in")
            weight = linear.original_component.weight
            bias = linear.original_component.bias
            # nn.Linear: weight [out, in]; GPT-2's Conv1D: weight [in, out]
            conv = type(linear.original_component).__name__ == "Conv1D"
            row = weight[:, 0] if conv else weight[0]
            edits.append((row, row.clone(), bias, None if bias is None else bias[0].clone()))
            row.zero_()
            if bias is not None:
                bias[0] = 0.0
    return edits


def _restore(edits):
    with torch.no_grad():
        for row, saved, bias, saved_bias in edits:
            row.copy_(saved)
            if bias is not None:
                bias[0] = saved_bias


@pytest.mark.parametrize("zero_units", [False, True], ids=["no-zeros", "exact-zeros"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_rule_rewrites_give_the_old_gradients_bitwise(arch, dtype, zero_units):
    """The MLP rewrite (act(g) once, fused Identity/Half path) and the LN-rule (fused on RMSNorm) give the
    gradients of the formulas they replaced, torch.equal, at every residual stream and MLP hook point."""
    model = _model(arch, dtype)
    tokens, _, _ = _prompts(model)
    direction = torch.randn(*tokens.shape, model.cfg.d_vocab_out, generator=torch.Generator().manual_seed(3), dtype=dtype)
    edits = _zero_first_units(model) if zero_units else []
    try:
        compared = 0
        for rules in _applicable_rule_sets(model):
            rule_set = resolve_rules(model, rules)
            active = frozenset(rule_set.active)
            if not active & {"identity", "half", "ln"}:
                continue
            names = model.hook_dict
            new_hooks = rule_hooks(model, rule_set)
            old_hooks = (
                _old_norm_hooks(model, active) + _old_mlp_hooks(model, active)
                + rules_module._attention_hooks(model, active, names)
            )
            assert [h[0] for h in old_hooks] == [h[0] for h in new_hooks]
            new = _gradients(model, tokens, rule_set, new_hooks, direction)
            old = _gradients(model, tokens, rule_set, old_hooks, direction)
            assert torch.isfinite(new["blocks.0.hook_resid_pre"]).all()
            for name in new:
                assert torch.equal(new[name], old[name]), (
                    f"{arch} {dtype} {rules} {name}: max |diff| {(new[name] - old[name]).abs().max().item():.3g}"
                )
            compared += 1
        assert compared >= 4
    finally:
        _restore(edits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identity_rule_function_gives_the_old_gradient_bitwise(dtype):
    """relp.rules.identity_rule (the rule as a function, which the hooks' fused path matches) against the
    old formula, with and without exact zeros, composed with half_rule as in a gated MLP."""
    from relp.rules import identity_rule

    g = torch.Generator().manual_seed(5)
    for zeros in (False, True):
        pre = torch.randn(3, 5, 16, generator=g, dtype=dtype)
        if zeros:
            pre[..., 0] = 0.0
        up = torch.randn(3, 5, 16, generator=g, dtype=dtype)
        upstream = torch.randn(3, 5, 16, generator=g, dtype=dtype)
        grads = []
        for rule in (identity_rule, _old_identity_rule):
            x, u = pre.clone().requires_grad_(True), up.clone().requires_grad_(True)
            activated = torch.nn.functional.silu(x)
            path = half_rule(rule(x, activated, torch.nn.functional.silu(x)), activated, u)
            grads.append(torch.autograd.grad((path * upstream).sum(), [x, u]))
        for new, old in zip(*grads):
            assert torch.isfinite(new).all() and torch.equal(new, old)


def test_zero_unit_edit_makes_exact_zeros():
    """The exact-zeros case above is not vacuous: the edited unit's pre-activation is exactly 0."""
    for arch in ARCHS:
        model = tiny_model(arch, n_layers=2)
        tokens, _, _ = _prompts(model)
        _zero_first_units(model)
        store = {}
        with torch.no_grad(), model.hooks(
            fwd_hooks=[(f"blocks.{l}.mlp.hook_pre", lambda x, hook, l=l: store.setdefault(l, x)) for l in range(2)]
        ):
            model(tokens)
        for pre in store.values():
            assert (pre[..., 0] == 0).all() and (pre[..., 1:] != 0).any()


# ----------------------------------------------------------------------------------------------
# The source run without the rules' hooks


def _all_activations(model, tokens, context):
    store = {}

    def capture(x, hook):
        if isinstance(x, torch.Tensor):
            store.setdefault(hook.name, []).append(x.detach().clone())
        return x

    with torch.no_grad(), context, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bridge warns about hook points that never fire
        with model.hooks(fwd_hooks=[(lambda name: True, capture)]):
            logits = model(tokens)
    return store, logits


def _bits(x):
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int64) if x.is_floating_point() else x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_rule_hooks_do_not_change_any_activation_bitwise(arch, dtype):
    """Every hook point's value in a no-grad run is the same bits with the rules' hooks as without them."""
    model = _model(arch, dtype)
    tokens, _, _ = _prompts(model)
    for rules in _applicable_rule_sets(model):
        rule_set = resolve_rules(model, rules)
        if not rule_set.active:
            continue
        ruled, ruled_logits = _all_activations(model, tokens, lrp_rules(model, rules))
        plain, plain_logits = _all_activations(model, tokens, rule_forward_contexts(model, rule_set))
        assert ruled.keys() == plain.keys() and len(ruled) > 20
        for name in ruled:
            for a, b in zip(ruled[name], plain[name], strict=True):
                assert torch.equal(_bits(a), _bits(b)), f"{arch} {dtype} {rules}: {name} differs"
        assert torch.equal(_bits(ruled_logits), _bits(plain_logits))


def _atp_under(model, rules, clean, corrupted, metric, components):
    """The old protocol: attribution patching with both runs under the rules' hooks (and contexts). Through
    ``applied_rules``: a method inside ``lrp_rules`` is refused (relp.RuleContextError)."""
    with applied_rules(model, resolve_rules(model, rules)):
        return relp.attribution_patching(model, clean, corrupted, metric, components)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_relevance_patching_scores_equal_those_with_the_source_run_under_the_rules(arch, dtype):
    """relevance_patching equals, bit for bit, AtP run entirely inside lrp_rules (the old protocol:
    source and gradient runs both under the rules' hooks)."""
    model = _model(arch, dtype)
    clean, corrupted, metric = _prompts(model)
    components = COMPONENTS
    for rules in ("relp", "relp+ah", "attnlrp", "ln"):
        new = relp.relevance_patching(model, clean, corrupted, metric, components, rules=rules)
        old = _atp_under(model, rules, clean, corrupted, metric, components)
        for component in components:
            assert new[component].abs().max() > 0
            assert torch.equal(new[component], old[component]), f"{arch} {dtype} {rules} {component}"


def test_ah_fallback_stays_in_the_source_run_where_it_changes_the_kernel():
    """A BERT on SDPA attention: the AH-rule's eager attention function changes the forward bits there
    (measured: max |logit diff| 7e-8 in float32, 2e-16 in float64), so the source run must keep it. With it,
    the scores still equal the old protocol's bit for bit."""
    model = tiny_model("bert", n_layers=2)
    for config in rules_module._hf_configs(model):
        config._attn_implementation = "sdpa"
    clean, corrupted, metric = _prompts(model)
    components = ["resid_pre", "attn_out", "mlp_out"]
    new = relp.relevance_patching(model, clean, corrupted, metric, components, rules="relp+ah")
    old = _atp_under(model, "relp+ah", clean, corrupted, metric, components)
    assert {c._attn_implementation for c in rules_module._hf_configs(model)} == {"sdpa"}
    for component in components:
        assert torch.equal(new[component], old[component]), component


def test_ah_fallback_context_without_the_hooks():
    """On BERT the AH-rule swaps the attention implementation: the source run keeps that swap (it is not
    a hook), so both runs compute attention with the same kernel."""
    model = _model("bert")
    rule_set = resolve_rules(model, "relp+ah")
    configs = rules_module._hf_configs(model)
    with rule_forward_contexts(model, rule_set):
        assert {c._attn_implementation for c in configs} == {rules_module._ATTENTION_NAME}
    with rule_forward_contexts(model, resolve_rules(model, "relp")):
        assert {c._attn_implementation for c in configs} == {"eager"}
    assert {c._attn_implementation for c in configs} == {"eager"}


# ----------------------------------------------------------------------------------------------
# logits_to_keep in the gradient methods

# Keeping only the last positions' logits changes the shape of the unembedding's matrix products (forward
# and backward), so BLAS may sum in another order: the scores agree to float rounding, not bit for bit.
# Measured max |diff| / max |score| on these tiny models (3 layers x 32 and 2 layers x 64 wide, AtP and
# RelP): float32 <= 3.5e-7 (a few float32 ulps); float64 GPT-2 <= 1.5e-15 (a few float64 ulps); float64
# Llama <= 3.9e-8 for AtP, because Hugging Face's RMSNorm computes in float32 even in a float64 model
# (see test_rules_reference.py), so a last-bit change in the logits' gradient can round to another
# float32 there. Tolerances: 30x the float32 figure where float32 arithmetic is involved, 1e-12 otherwise.
def _rtol(arch, dtype):
    return 1e-12 if dtype == torch.float64 and arch != "llama" else 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["atp", "relp"])
def test_logits_to_keep_gives_the_full_logits_scores(arch, dtype, method):
    model = _model(arch, dtype)
    clean, corrupted, metric = _prompts(model)
    function = get_method(method).function
    components = ["resid_pre", "attn_out", "mlp_out", "head"]
    full = function(model, clean, corrupted, metric, components)
    last = function(model, clean, corrupted, metric, components, logits_to_keep=1)
    two = function(model, clean, corrupted, metric, components, logits_to_keep=2)
    for component in components:
        scale = full[component].abs().max()
        assert scale > 0
        for kept in (last, two):
            torch.testing.assert_close(kept[component], full[component], rtol=0, atol=_rtol(arch, dtype) * scale.item())
    assert last.metadata["base_metric"] == pytest.approx(full.metadata["base_metric"], rel=_rtol(arch, dtype))


@pytest.mark.parametrize("method", ["atp", "relp"])
def test_logits_to_keep_reaches_the_metric(method):
    """The gradient run computes only the kept positions' logits (what saves the time)."""
    model = _model("llama")
    clean, corrupted, metric = _prompts(model)
    shapes = []

    def recording(logits):
        shapes.append(tuple(logits.shape))
        return metric(logits)

    get_method(method).function(model, clean, corrupted, recording, ["resid_pre"], logits_to_keep=1)
    assert shapes == [(clean.shape[0], 1, model.cfg.d_vocab_out)]


def test_logits_to_keep_gives_the_same_errors_as_activation_patching():
    model = _model("gpt2")
    clean, corrupted, metric = _prompts(model)
    for method in ("ap", "atp", "relp"):
        function = get_method(method).function
        kwargs = {"progress": False} if method == "ap" else {}
        with pytest.raises(ValueError, match="logits_to_keep must be in 1..8"):
            function(model, clean, corrupted, metric, ["resid_pre"], logits_to_keep=9, **kwargs)
        embedding = relp.SentenceEmbedding("mean")
        readout_metric = relp.CosineSimilarity(torch.randn(model.cfg.d_model), embedding)
        with pytest.raises(ValueError, match="applies to logits"):
            function(model, clean, corrupted, readout_metric, ["resid_pre"], logits_to_keep=1, **kwargs)


def test_experiments_pass_logits_to_keep_to_the_gradient_methods():
    settings = {"batch_size": 8, "progress": True, "logits_to_keep": 1, "rules": "relp"}
    assert get_method("atp").experiment_options(settings) == {"logits_to_keep": 1}
    assert get_method("relp").experiment_options(settings) == {"logits_to_keep": 1, "rules": "relp"}


# ----------------------------------------------------------------------------------------------
# The liveness probe runs once per model and rule


def test_liveness_probe_runs_once_per_model(monkeypatch):
    model = tiny_model("llama", n_layers=2)
    clean, corrupted, metric = _prompts(model)
    calls = []
    probe = rules_module._probe
    monkeypatch.setattr(rules_module, "_probe", lambda *args, **kwargs: calls.append(1) or probe(*args, **kwargs))
    relp.relevance_patching(model, clean, corrupted, metric)
    first = len(calls)
    assert first >= 4  # the plain probe and one per rule (ln, identity, half)
    relp.relevance_patching(model, clean, corrupted, metric)
    relp.relevance_patching(model, clean, corrupted, metric, rules="ln")
    with lrp_rules(model, "relp"):
        pass
    assert len(calls) == first
    relp.relevance_patching(model, clean, corrupted, metric, rules="relp+ah")
    assert len(calls) == first + 2  # the plain probe and the new rule only
