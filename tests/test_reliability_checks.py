"""Mistaken inputs get errors that name the real cause, before any work is done (issue 15, items 5-7, 11).

* partial training mode (one block, or the wrapped Hugging Face model) is refused by every method and
  by the LRP rules, naming the modules; the oracle for "it mattered" is that dropout makes two identical
  calls differ;
* ``torch.inference_mode()`` is named as such by the gradient methods and the rules (activation
  patching works there, and gives the scores it gives outside);
* an unknown template id is reported as an unknown id, not parsed as template text;
* every experiment's command line is checked before anything is loaded (``relp.load_model`` is replaced
  by a function that fails the test), with argparse's one-line error and exit status 2;
* activation patching's cost estimate equals a count of the cells it scores (the score tensors' sizes),
  and above the threshold a CostWarning is raised before any forward pass.
"""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch

import relp
from _prompt_pairs import changed_from
from relp.checks import MAX_FORWARD_PASSES, CostWarning, activation_patching_cost
from relp.components import COMPONENTS
from relp.rules import RuleNotLiveError
from relp.testing import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _prompts(model, n_prompts=2, length=6, seed=0):
    return changed_from(model, 1, n_prompts, length, seed)


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", n_layers=1)


METHODS = {
    "ap": lambda m, c, x, metric: relp.activation_patching(m, c, x, metric, progress=False),
    "atp": relp.attribution_patching,
    "relp": relp.relevance_patching,
}


# ----------------------------------------------------------------------------------------------
# Item 5: partial training mode


def _dropout_on(model):
    """Dropout that acts: the tiny models are built with dropout probability 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5


@pytest.mark.parametrize("part", ["blocks.0", "original_model", "<root>"])
@pytest.mark.parametrize("method", list(METHODS))
def test_partial_training_mode_is_refused_naming_the_modules(part, method):
    model = tiny_model("gpt2", n_layers=1)
    clean, corrupted, metric = _prompts(model)
    _dropout_on(model)
    (model if part == "<root>" else model.get_submodule(part)).train()
    assert model.training is (part == "<root>")  # the old check looked only at this flag
    # the oracle that this matters: with dropout active two identical forward passes differ
    with torch.no_grad():
        assert not torch.equal(model(clean), model(clean))
    with pytest.raises(RuntimeError, match=r"module\(s\) of the model are in training mode") as error:
        METHODS[method](model, clean, corrupted, metric)
    expected = "<root>" if part == "<root>" else ("blocks.0" if part == "blocks.0" else "_original_component")
    assert expected in str(error.value) and "model.eval()" in str(error.value)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(clean), model(clean))
    METHODS[method](model, clean, corrupted, metric)  # runs after eval()


@pytest.mark.parametrize("part", ["blocks.0", "<root>"])
def test_lrp_rules_in_training_mode_name_training_mode_not_a_rule(part):
    """Today the liveness probe's runs differ by dropout and the error blamed the LN-rule."""
    model = tiny_model("gpt2", n_layers=1)
    _dropout_on(model)
    (model if part == "<root>" else model.get_submodule(part)).train()
    with pytest.raises(RuntimeError, match="training mode") as error:
        with relp.lrp_rules(model, "relp"):
            pass
    assert not isinstance(error.value, RuleNotLiveError) and "changed the forward pass" not in str(error.value)


# ----------------------------------------------------------------------------------------------
# Item 6: inference mode, template names


@pytest.mark.parametrize(
    "call",
    [
        lambda m, c, x, metric: relp.attribution_patching(m, c, x, metric),
        lambda m, c, x, metric: relp.relevance_patching(m, c, x, metric),
        lambda m, c, x, metric: relp.relevance_patching(m, c, x, metric, rules="gradient"),
        lambda m, c, x, metric: relp.lrp_rules(m, "relp").__enter__(),
    ],
    ids=["atp", "relp", "relp-gradient", "lrp_rules"],
)
def test_inference_mode_is_named_by_gradient_methods(model, call):
    clean, corrupted, metric = _prompts(model)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inside torch\.inference_mode\(\)") as error:
        call(model, clean, corrupted, metric)
    assert "not differentiable" not in str(error.value)
    assert not any(name.startswith("blocks.0.hook") and module._forward_hooks for name, module in model.named_modules())


def test_activation_patching_works_in_inference_mode(model):
    clean, corrupted, metric = _prompts(model)
    outside = relp.activation_patching(model, clean, corrupted, metric, progress=False)
    with torch.inference_mode():
        inside = relp.activation_patching(model, clean, corrupted, metric, progress=False)
    for component in outside.components:
        assert torch.equal(inside[component], outside[component])
        assert outside[component].abs().max() > 0


@pytest.mark.parametrize(
    "templates, error, expected",
    [
        (["baba_99"], ValueError, r"unknown template 'baba_99': not a template id.*baba_00 \.\.\. abba_long_14"),
        (["abba_7"], ValueError, r"unknown template 'abba_7'"),
        (["BABA_00"], ValueError, r"unknown template 'BABA_00'"),
        (["baba_00", "baba_15"], ValueError, r"unknown template 'baba_15'"),
        (["baba"], ValueError, r"'baba' is a template set.*templates='baba'"),
        (["mixed"], ValueError, r"'mixed' is a template set"),
        ([7], TypeError, r"template ids or template strings; got int 7"),
        ([None], TypeError, r"got NoneType None"),
        ("bab", ValueError, r"unknown template set 'bab'; expected one of"),
        ([], ValueError, r"no templates given"),
        # template text with slots but wrongly made: the parse error is the right one here
        (["Then [B] and [A] met. [A] spoke to"], ValueError, r"needs one \[A\] \(IO\) and two \[B\]"),
    ],
)
def test_unknown_template_names_are_reported_as_names(templates, error, expected):
    from relp.tasks import resolve_templates

    with pytest.raises(error, match=expected):
        resolve_templates(templates)


def test_template_ids_and_text_still_resolve():
    from relp.tasks import TEMPLATES, resolve_templates

    text = "Then, [B] and [A] went to the [PLACE]. [B] gave the [OBJECT] to"
    resolved = resolve_templates(["baba_03", text])
    assert [t.id for t in resolved] == ["baba_03", "custom_01"]
    assert resolved[0].text == TEMPLATES["baba_03"] and resolved[1].text == text


# ----------------------------------------------------------------------------------------------
# Item 11: activation patching's cost estimate and warning


def test_cost_estimate_equals_the_cells_scored(model):
    """The estimate (made before any run) against a count of the cells in the scores: every cell's
    activation changes except at BOS, which is skipped (the result records how many were skipped)."""
    clean, corrupted, metric = _prompts(model, length=5)
    components = ["resid_pre", "attn_out", "head", "neuron"]
    estimate = activation_patching_cost(model.cfg, [COMPONENTS[c] for c in components], range(1), 5)
    result = relp.activation_patching(model, clean, corrupted, metric, components, progress=False, max_forward_passes=math.inf)
    cells = sum(result[c].numel() for c in components)
    assert cells == 5 + 5 + 4 * 5 + 5 * model.cfg.d_mlp  # 1 layer, 5 positions, 4 heads
    assert estimate == cells + 2  # + the source and base runs
    assert result.metadata["forward_equivalents"] + result.metadata["cells_skipped_unchanged"] == estimate
    # causal model: at BOS (position 0) both runs are identical, so those cells are skipped
    assert result.metadata["cells_skipped_unchanged"] == 1 + 1 + 4 + model.cfg.d_mlp


def test_expensive_activation_patching_warns_before_any_forward_pass(model):
    clean, corrupted, metric = _prompts(model, length=5)
    passes = []
    handle = model.register_forward_pre_hook(lambda module, args: passes.append(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CostWarning)
            with pytest.raises(CostWarning, match=r"up to 642 forward passes over the batch of 2 prompt\(s\).*threshold of 100"):
                relp.activation_patching(model, clean, corrupted, metric, ["neuron"], max_forward_passes=100)
        assert passes == []  # 1 layer x 5 positions x 128 neurons + 2 = 642: refused before running anything
        with warnings.catch_warnings():  # under the threshold: no warning, and it runs
            warnings.simplefilter("error", CostWarning)
            relp.activation_patching(model, clean, corrupted, metric, ["resid_pre"], progress=False, max_forward_passes=7)
        assert passes
    finally:
        handle.remove()
    with pytest.raises(ValueError, match=r"max_forward_passes must be a non-negative number or None.*got -1"):
        relp.activation_patching(model, clean, corrupted, metric, max_forward_passes=-1)


def test_embedded_model_neuron_patching_would_warn_and_the_ioi_default_would_not():
    """The embedded SmolLM2-135M (30 layers, 9 query heads, d_mlp 1536) on 16-token IOI prompts:
    neurons are 30 x 16 x 1536 cells, far above the threshold; the IOI experiment's default components
    (resid_pre, attn_out, mlp_out) are 30 x 16 x 3 = 1,440."""
    cfg = types.SimpleNamespace(n_heads=9, d_mlp=1536)
    neurons = activation_patching_cost(cfg, [COMPONENTS["neuron"]], range(30), 16)
    assert neurons == 30 * 16 * 1536 + 2 and neurons > 50 * MAX_FORWARD_PASSES
    default = activation_patching_cost(cfg, [COMPONENTS[c] for c in ("resid_pre", "attn_out", "mlp_out")], range(30), 16)
    heads = activation_patching_cost(cfg, [COMPONENTS["head"]], range(30), 16)
    assert default == 1442 and heads == 30 * 9 * 16 + 2 and max(default, heads) < MAX_FORWARD_PASSES


# ----------------------------------------------------------------------------------------------
# Item 7: the command line checks every argument before loading anything

CLI_CASES = [
    # (experiment, arguments, what the one-line error must say)
    ("ioi", ["--n-prompts", "0"], "--n-prompts must be a positive number of prompts; got 0"),
    ("ioi", ["--n-prompts", "-5"], "--n-prompts must be a positive number of prompts; got -5"),
    ("ioi", ["--rules", "rlep"], "--rules 'rlep' is neither a rule preset nor a rule; expected a preset from"),
    ("ioi", ["--rules", "ln,identity"], "--rules 'ln,identity' is neither"),
    ("ioi", ["--components", "resid_pre", "atn_out"], "--components: unknown component(s) ['atn_out']; expected names from"),
    ("ioi", ["--components", "mlp_out", "mlp_out"], "--components: components given twice"),
    ("ioi", ["--templates", "bab"], "--templates 'bab' is not a template set; expected one of"),
    ("ioi", ["--top-k", "0"], "--top-k must be a positive number of cells in the top-k overlap; got 0"),
    ("ioi", ["--batch-size", "0"], "--batch-size must be a positive number of rows per forward pass; got 0"),
    ("ioi", ["--device", "gpu"], "--device 'gpu' is not a torch device"),
    ("ioi", ["--device", "cuda:7"], "--device cuda:7: this machine has"),
    ("ioi", ["--out", "__FILE__"], "is a file; expected a directory"),
    ("ioi", ["--methods", "atp", "relp"], "compares methods with activation patching: keep 'ap' in --methods"),
    ("embedding", ["--methods", "relp"], "compares methods with activation patching: keep 'ap' in --methods"),
    ("faithfulness", ["--n-prompts", "0"], "--n-prompts must be a positive number of prompts; got 0"),
    ("faithfulness", ["--n-eval", "0"], "--n-eval must be a positive number of held-out prompts; got 0"),
    ("faithfulness", ["--seeds", "0"], "--seeds must be a positive number of random circuits; got 0"),
    ("faithfulness", ["--export-percent", "0"], "--export-percent must be in (0, 100]; got 0"),
    ("faithfulness", ["--export-percent", "150"], "--export-percent must be in (0, 100]; got 150"),
    ("faithfulness", ["--rules", "halfrule"], "--rules 'halfrule' is neither"),
    ("faithfulness", ["--components", "heads"], "--components: unknown component(s) ['heads']"),
    ("embedding", ["--n-pairs", "0"], "--n-pairs must be a positive number of contrast pairs; got 0"),
    ("embedding", ["--changes", "subjct"], "--changes subjct: expected 'all' or distinct kinds from"),
    ("embedding", ["--changes", "object", "object"], "--changes object object: expected 'all' or distinct kinds"),
    ("embedding", ["--rules", "AH"], "--rules 'AH' is neither"),
    ("embedding", ["--components", "neurons"], "--components: unknown component(s) ['neurons']"),
    ("embedding", ["--no-normalize"], "--no-normalize needs --pooling"),
    ("methods", ["--n-prompts", "0"], "--n-prompts must be a positive number of prompts; got 0"),
    ("methods", ["--n-pairs", "0"], "--n-pairs must be a positive number of contrast pairs; got 0"),
    ("methods", ["--rules", "relp_epsilon"], "--rules 'relp_epsilon' is neither"),
    ("methods", ["--components", "mlp"], "--components: unknown component(s) ['mlp']"),
    ("methods", ["--encoder-components", "heads"], "--encoder-components: unknown component(s) ['heads']"),
    ("methods", ["--steps", "0"], "--steps must be a positive number of integration steps; got 0"),
    ("methods", ["--k", "1.5"], "--k must be a fraction in (0, 1) or a whole number of cells; got 1.5"),
    ("methods", ["--studies", "ioi"], "invalid choice: 'ioi'"),
    ("embedding-rule-ablation", ["__MISSING__"], "is not a finished `relp embedding` run: expected"),
    ("embedding-rule-ablation", ["__NOT_JSON__"], "is not valid JSON"),
    ("embedding-rule-ablation", ["__NO_SCORES__"], "has no activation patching scores"),
]


@pytest.mark.parametrize("experiment, arguments, message", CLI_CASES, ids=[f"{e}{' '.join(a)}" for e, a, _ in CLI_CASES])
def test_command_line_mistakes_fail_in_one_line_before_loading(experiment, arguments, message, monkeypatch, tmp_path, capsys):
    import json

    import relp.cli

    def no_loading(*args, **kwargs):
        raise AssertionError("relp.load_model called before the arguments were checked")

    monkeypatch.setattr(relp, "load_model", no_loading)
    file = tmp_path / "a_file"
    file.write_text("")
    (tmp_path / "not_json").mkdir()
    (tmp_path / "not_json" / "results.json").write_text("{")
    (tmp_path / "no_scores").mkdir()
    info = {"model": "m", "pooling": "mean", "normalize": True, "changes": ["subject"], "n_prompts": 2, "seed": 0, "components": ["mlp_out"]}
    (tmp_path / "no_scores" / "results.json").write_text(json.dumps(info))
    paths = {"__FILE__": file, "__MISSING__": tmp_path / "missing", "__NOT_JSON__": tmp_path / "not_json", "__NO_SCORES__": tmp_path / "no_scores"}
    arguments = [str(paths.get(a, a)) for a in arguments]
    if experiment != "embedding-rule-ablation" and "--out" not in arguments:
        arguments += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        relp.cli.main([experiment, *arguments])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written either
