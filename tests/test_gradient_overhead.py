"""What makes relevance and attribution patching cheap, and that it changes nothing.

* The rule hooks are built with at most one read of the bridge's ``hook_dict`` (a property that rebuilds
  the hook registry on every read), whatever the number of layers.
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
    applied_rules,
    half_rule,
    lrp_rules,
    pattern_hook_is_live,
    resolve_rules,
    rule_hooks,
)
from relp.testing import tiny_model

ARCHS = ("gpt2", "llama", "bert")
DTYPES = (torch.float32, torch.float64)
RULE_SETS = ("relp", "ln", "identity", "half", "relp+ah", "attnlrp")

_MODELS: dict = {}


def _model(arch, dtype=torch.float32, n_layers=3):
    key = (arch, dtype, n_layers)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(arch, dtype=dtype, n_layers=n_layers)
    return _MODELS[key]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


