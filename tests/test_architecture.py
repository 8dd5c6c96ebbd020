"""The house's central pieces, tested on their own: component geometry, the intervention engine, the
method registry (a new method is one function plus one entry) and the architecture table."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import relp
import relp.methods
from relp.architectures import ARCHITECTURES, DEFAULT, architecture_of, class_for_checkpoint
from relp.components import COMPONENTS, component_for
from relp.interventions import BlockReplay, Replacement, cache_activations, model_output, run_stacked
from relp.methods import Cost, get_method, method_color, method_label, reference_method, register_method
from relp.testing import tiny_model


def _prompts(model, n_prompts=2, length=6):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(6, model.cfg.d_vocab, (n_prompts, length), generator=g)
    clean[:, 0] = 0
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(6, model.cfg.d_vocab, (n_prompts,), generator=g)
    answer = torch.randint(6, model.cfg.d_vocab, (n_prompts,), generator=g)
    wrong = torch.randint(6, model.cfg.d_vocab, (n_prompts,), generator=g)
    return clean, corrupted, relp.LogitDiff(answer, wrong)


# ----------------------------------------------------------------------------------------------
# Component geometry


def test_component_geometry_follows_the_declared_axes():
    head, neuron, block = COMPONENTS["head"], COMPONENTS["neuron"], COMPONENTS["resid_pre"]
    z = torch.arange(2 * 5 * 3 * 4, dtype=torch.float64).reshape(2, 5, 3, 4)  # [batch, pos, head, d_head]
    assert head.cell_shape(z) == (3, 5)  # (head, position)
    assert head.cell_index((1, 4)) == (slice(None), 4, 1)
    assert torch.equal(head.cell_scores(z)[1, 4], z[:, 4, 1, :].sum())
    post = torch.arange(2 * 5 * 7, dtype=torch.float64).reshape(2, 5, 7)  # [batch, pos, neuron]
    assert neuron.cell_shape(post) == (5, 7) and neuron.cell_index((3, 6)) == (slice(None), 3, 6)
    assert torch.equal(neuron.cell_scores(post)[3, 6], post[:, 3, 6].sum())
    resid = torch.arange(2 * 5 * 8, dtype=torch.float64).reshape(2, 5, 8)
    assert block.cell_shape(resid) == (5,) and block.cell_index((2,)) == (slice(None), 2)
    assert torch.equal(block.cell_scores(resid)[2], resid[:, 2].sum())


def test_activation_masks_select_exactly_the_nodes():
    head = COMPONENTS["head"]
    nodes = torch.zeros(2, 3, 5, dtype=torch.bool)  # [copies, head, position]
    nodes[0, 1, 4] = nodes[1, 2, 0] = True
    mask = head.activation_mask(nodes).expand(2, 4, 5, 3, 6)  # [copies, batch, pos, head, d_head]
    expected = torch.zeros(2, 4, 5, 3, 6, dtype=torch.bool)
    expected[0, :, 4, 1, :] = expected[1, :, 0, 2, :] = True
    assert torch.equal(mask, expected)
    summed = torch.tensor([[True, False, False]])  # [copies, head], every position
    expected = torch.zeros(1, 4, 5, 3, 6, dtype=torch.bool)
    expected[:, :, :, 0, :] = True
    assert torch.equal(head.activation_mask(summed, per_position=False).expand(1, 4, 5, 3, 6), expected)
    with pytest.raises(ValueError, match=r"\[copies, head, position\]"):
        head.activation_mask(summed)


def test_a_component_must_name_axes_its_activation_has():
    with pytest.raises(ValueError, match="not found: \\['head'\\]"):
        dataclasses.replace(COMPONENTS["resid_pre"], axes=("layer", "head"))


# ----------------------------------------------------------------------------------------------
# The intervention engine


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", dtype=torch.float64, n_layers=3)


@pytest.mark.parametrize("name, layer", [("resid_pre", 0), ("resid_mid", 1), ("resid_post", 2)])
def test_replacing_the_whole_stream_runs_the_other_prompt(llama, name, layer):
    """The residual stream at one layer holds everything later blocks see: replacing all of it with the
    clean run's gives the clean run's metric (for resid_mid through attn_out minus this copy's resid_pre),
    and keeping all of it gives the corrupted run's, copy by copy in one stacked pass."""
    clean, corrupted, metric = _prompts(llama)
    component = component_for(llama, name)
    names = [component.hook_name(layer)] + ([component.offset_name(layer)] if component.offset_template else [])
    cache = cache_activations(llama, clean, names)
    target = cache[names[0]] + (cache[names[1]] if len(names) > 1 else 0)
    keep = torch.tensor([False, True]).reshape(2, 1, 1, 1)  # copy 0: replaced everywhere; copy 1: kept
    replay = BlockReplay(llama, clean.shape[0])
    with torch.no_grad(), replay.recording():
        model_output(llama, corrupted, metric)
    with torch.no_grad():
        clean_value, corrupted_value = metric(llama(clean)), metric(llama(corrupted))
    for used in (None, replay):
        values = run_stacked(
            llama, corrupted, 2, [Replacement(component, layer, keep, target)], metric, labels=["a", "b"], replay=used
        )
        torch.testing.assert_close(values[0], clean_value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(values[1], corrupted_value, rtol=1e-12, atol=1e-12)


def test_run_stacked_names_the_copy_whose_metric_is_not_a_scalar(llama):
    clean, corrupted, _ = _prompts(llama)
    component = COMPONENTS["resid_pre"]
    keep = torch.ones(2, 1, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="copy-one"):
        run_stacked(llama, corrupted, 2, [Replacement(component, 0, keep, torch.zeros(()))],
                    lambda logits: logits[:, -1, :2], labels=["copy-one", "copy-two"])


# ----------------------------------------------------------------------------------------------
# The method registry


def test_the_registry_holds_the_three_methods():
    assert list(relp.methods.METHODS)[:3] == ["ap", "atp", "relp"]
    assert [get_method(k).label for k in ("ap", "atp", "relp")] == ["AP", "AtP", "RelP"]
    assert get_method("relevance_patching") is get_method("RelP") is get_method("relp")
    assert get_method("ap").function is relp.activation_patching and reference_method().key == "ap"
    assert method_label("attribution_patching") == "AtP" and method_label("unregistered") == "unregistered"
    assert method_color("AtP") == "tab:blue" and method_color("unregistered") is None
    assert get_method("relp").experiment_options({"rules": "ln", "batch_size": 8}) == {"rules": "ln"}
    assert get_method("ap").cost.forward_equivalents(100) == 100
    assert get_method("atp").cost.forward_equivalents(100) == 4  # 2 forward + 1 backward (= 2 forward)
    with pytest.raises(KeyError, match="unknown method 'no_such_method'"):
        get_method("no_such_method")
    assert relp.methods.standard_methods() == ["ap", "atp", "relp"]


def test_a_preset_fixes_options_and_records_its_key(registry):
    """A preset runs its base method with its options fixed; its result is labelled as the preset and
    equals the base method called with those options."""
    from relp.methods import forward_equivalents, register_preset

    model = tiny_model("llama", n_layers=2)
    preset = register_preset("ln_only", "relp", {"rules": "ln"}, label="RelP-LN", display_name="RelP, LN-rule only", color="k")
    clean, corrupted = torch.tensor([[1, 5, 6, 7]]), torch.tensor([[1, 5, 9, 7]])

    def metric(logits):
        return logits[:, -1, 3].mean()

    result = preset(model, clean, corrupted, metric, ["resid_pre"])
    direct = relp.relevance_patching(model, clean, corrupted, metric, ["resid_pre"], rules="ln")
    assert torch.equal(result["resid_pre"], direct["resid_pre"]) and result.rules == ("ln",)
    assert result.method == "ln_only" and result.label == "RelP-LN" and get_method("ln_only") is preset
    assert "rules" not in preset.options and preset.experiment_options({"rules": "relp"}) == {}
    assert forward_equivalents(result) == 4
    with pytest.raises(TypeError, match="fixes"):
        preset(model, clean, corrupted, metric, ["resid_pre"], rules="relp")


@pytest.fixture
def registry():
    """The registry as it is, restored in place afterwards (modules hold references to the dict)."""
    saved = dict(relp.methods.METHODS)
    yield relp.methods.METHODS
    relp.methods.METHODS.clear()
    relp.methods.METHODS.update(saved)


def test_register_refuses_clashes_and_unknown_options(registry):
    with pytest.raises(ValueError, match="clashes"):
        register_method("atp2", label="AtP", display_name="x", color="k", cost=Cost(1))(lambda: None)
    with pytest.raises(ValueError, match="unknown option"):
        register_method("x", label="X", display_name="x", color="k", cost=Cost(1), options=("temperature",))


def test_a_new_method_is_one_function_plus_one_entry(registry, tmp_path):
    """Registered once, a method runs in the IOI experiment with its label in the tables: here AtP with
    the sign flipped, whose Pearson r with AP is exactly minus AtP's."""
    from relp.experiments.ioi import build_parser, run
    from relp.tasks import ioi_words

    # AtP's options too (logits_to_keep), so that it runs exactly as AtP does in the experiment
    @register_method(
        "neg", label="-AtP", display_name="negated AtP", color="tab:green", cost=Cost(2, 1),
        options=get_method("atp").options,
    )
    def negated_attribution_patching(model, clean, corrupted, metric, components, **kwargs):
        result = relp.attribution_patching(model, clean, corrupted, metric, components, **kwargs)
        return dataclasses.replace(
            result, method="negated_attribution_patching", scores={c: -s for c, s in result.scores.items()}
        )

    model = tiny_model("llama", words=ioi_words(), n_layers=2)
    args = build_parser().parse_args(
        ["--n-prompts", "2", "--methods", "ap", "atp", "neg", "--components", "resid_pre", "--no-figures",
         "--out", str(tmp_path)]
    )
    run(args, model=model)
    results = json.loads((tmp_path / "results.json").read_text())
    atp, neg = results["agreement"]["atp"]["resid_pre"], results["agreement"]["neg"]["resid_pre"]
    assert neg["pearson"] == pytest.approx(-atp["pearson"], abs=1e-12)
    assert "resid_pre -AtP" in (tmp_path / "results.md").read_text()
    assert relp.PatchingResult.load(tmp_path / "scores" / "neg_batch0.pt").label == "-AtP"


# ----------------------------------------------------------------------------------------------
# The architecture table


def test_every_architecture_fact_comes_from_the_table():
    bert = tiny_model("bert")
    assert architecture_of(bert) is ARCHITECTURES["bert"] and architecture_of(tiny_model("gpt2")) is DEFAULT
    assert component_for(bert, "attn_out").hook_name(1) == "blocks.1.attn.o.hook_out"
    assert component_for(bert, "resid_mid").offset_template is None
    assert component_for(None, "attn_out") is COMPONENTS["attn_out"]
    assert class_for_checkpoint("BertModel") == "BertForMaskedLM"
    assert class_for_checkpoint("RobertaModel") == "RobertaForMaskedLM"
    assert class_for_checkpoint("LlamaForCausalLM") == "LlamaForCausalLM"
    from relp.embeddings import final_hidden_hook

    assert final_hidden_hook(bert) == f"blocks.{bert.cfg.n_layers - 1}.hook_resid_post"
