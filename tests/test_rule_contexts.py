"""Methods inside an open ``lrp_rules`` block, and nested blocks (issue 15, item 2).

Before: inside ``with relp.lrp_rules(model, "relp"):`` attribution patching returned RelP scores recorded
as AtP with ``rules=()``, and relevance patching recorded rules that were not the ones acting. Now the
block registers its rule set on the model (``relp.rules.open_rule_context``) on entry and unregisters it
on exit, also on an exception, and every method (all registered ones and presets, through
``relp.patching._prepare``) and a second ``lrp_rules`` on the same model refuse with
:class:`relp.RuleContextError`, naming the block's rules and what to do.

Oracle that the refusal matters: the same call with the rules' hooks applied without registering
(``relp.rules.applied_rules``, the old behaviour of the block) gives attribution patching scores equal to
relevance patching's and different from attribution patching's outside, under the label AtP.
"""

from __future__ import annotations

import pytest
import torch

import relp
from _prompt_pairs import changed_from
from relp.methods import METHODS
from relp.rules import RuleContextError, RuleNotLiveError, applied_rules, open_rule_context, resolve_rules
from relp.testing import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _prompts(model, n_prompts=2, length=5, seed=0):
    return changed_from(model, 2, n_prompts, length, seed)


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", n_layers=1)


def _n_hooks(model) -> int:
    return sum(len(h._forward_hooks) + len(h._backward_hooks) for h in model.hook_dict.values())


@pytest.mark.parametrize("key", list(METHODS))
def test_every_method_is_refused_inside_an_open_rule_block(model, key):
    clean, corrupted, metric = _prompts(model)
    with relp.lrp_rules(model, "relp") as rules:
        assert open_rule_context(model) == rules
        with pytest.raises(RuleContextError) as error:
            METHODS[key](model, clean, corrupted, metric, ["resid_pre"])
    message = str(error.value)
    assert "inside `with relp.lrp_rules(model, ...)`" in message  # what was given
    assert "active rules: ln+identity" in message  # the block's rules (GPT-2: no gated MLP, no Half-rule)
    assert "outside the block" in message and "rules=['ln', 'identity']" in message  # what to do
    assert message.startswith("relp.")  # the refusing method, named
    assert open_rule_context(model) is None and _n_hooks(model) == 0


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m, c, x, metric: relp.activation_patching(m, c, x, metric, progress=False), "relp.activation_patching"),
        (lambda m, c, x, metric: relp.attribution_patching(m, c, x, metric), "relp.attribution_patching"),
        (lambda m, c, x, metric: relp.relevance_patching(m, c, x, metric, rules="ln"), "relp.relevance_patching"),
        (lambda m, c, x, metric: relp.relevance_patching(m, c, x, metric, rules="relp"), "relp.relevance_patching"),
        (lambda m, c, x, metric: relp.patching.changed_cells(m, c, x), "relp.changed_cells"),
    ],
    ids=["ap", "atp", "relp-other-rules", "relp-same-rules", "changed_cells"],
)
def test_the_error_names_the_method_called(model, call, name):
    clean, corrupted, metric = _prompts(model)
    with relp.lrp_rules(model, "ln"), pytest.raises(RuleContextError, match=r"active rules: ln\)") as error:
        call(model, clean, corrupted, metric)
    assert str(error.value).startswith(f"{name} was called inside")


def test_the_old_behaviour_mislabelled_relp_scores_as_atp(model):
    """What the refusal prevents: AtP under the rules' hooks is RelP, recorded as AtP with no rules."""
    clean, corrupted, metric = _prompts(model)
    plain = relp.attribution_patching(model, clean, corrupted, metric, ["resid_pre", "mlp_out"])
    ruled = relp.relevance_patching(model, clean, corrupted, metric, ["resid_pre", "mlp_out"], rules="relp")
    with applied_rules(model, resolve_rules(model, "relp")):  # the hooks, without the block's registration
        inside = relp.attribution_patching(model, clean, corrupted, metric, ["resid_pre", "mlp_out"])
    assert inside.method == "attribution_patching" and inside.rules == ()
    for component in ("resid_pre", "mlp_out"):
        torch.testing.assert_close(inside[component], ruled[component], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(inside[component], plain[component], rtol=1e-3, atol=0)


def test_nested_rule_blocks_on_one_model_are_refused(model):
    with relp.lrp_rules(model, "relp") as outer:
        hooks = _n_hooks(model)
        with pytest.raises(RuleContextError) as error:
            with relp.lrp_rules(model, "relp+ah"):
                pass
        # the refused inner block added nothing and left the outer one open
        assert _n_hooks(model) == hooks and open_rule_context(model) == outer
    message = str(error.value)
    assert "relp.lrp_rules was entered on" in message and "inside another lrp_rules block" in message
    assert "active rules: ln+identity" in message and "Exit the outer block first" in message
    assert open_rule_context(model) is None and _n_hooks(model) == 0


def test_blocks_on_different_models_are_independent(model):
    other = tiny_model("llama", n_layers=1)
    clean, corrupted, metric = _prompts(other)
    expected = relp.attribution_patching(other, clean, corrupted, metric)
    with relp.lrp_rules(model, "relp"):
        with relp.lrp_rules(other, "ln") as rules:
            assert open_rule_context(other) == rules
        assert open_rule_context(other) is None
        # a method on the other model, with no block open on it, runs and is unchanged
        result = relp.attribution_patching(other, clean, corrupted, metric)
    for component in expected.scores:
        assert torch.equal(result[component], expected[component])


def test_the_registration_is_removed_after_an_exception_inside_the_block(model):
    clean, corrupted, metric = _prompts(model)
    before = relp.attribution_patching(model, clean, corrupted, metric)
    with pytest.raises(KeyError):
        with relp.lrp_rules(model, "relp"):
            raise KeyError("boom")
    assert open_rule_context(model) is None and _n_hooks(model) == 0
    # after a refused method inside the block too
    with pytest.raises(RuleContextError):
        with relp.lrp_rules(model, "relp"):
            relp.attribution_patching(model, clean, corrupted, metric)
    assert open_rule_context(model) is None and _n_hooks(model) == 0
    after = relp.attribution_patching(model, clean, corrupted, metric)
    for component in before.scores:
        assert torch.equal(after[component], before[component])


def test_a_block_refused_on_entry_is_not_registered(model, monkeypatch):
    """lrp_rules whose liveness check fails on entry leaves nothing open and no hooks."""
    import relp.rules as rules_module

    def not_live(model, rules, force=False):
        raise RuleNotLiveError("made to fail by the test")

    monkeypatch.setattr(rules_module, "check_rules_live", not_live)
    with pytest.raises(RuleNotLiveError, match="made to fail"):
        with relp.lrp_rules(model, "relp"):
            pass
    assert open_rule_context(model) is None and _n_hooks(model) == 0
