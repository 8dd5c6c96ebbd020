"""Circuit selection, ablation, MIB faithfulness (CPR/CMD) and MIB JSON, against hand-computed values
and independent hook interventions."""

from __future__ import annotations

import itertools
import json
import types

import pytest
import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

import relp
from relp.circuits import (
    Circuit,
    count_for_percent,
    node_scores,
    parse_node_name,
    select_circuit,
)
from relp.components import COMPONENTS
from relp.faithfulness import (
    ABLATIONS,
    MIB_PERCENTAGES,
    CircuitEvaluator,
    PooledEvaluator,
    area_under_curve,
    cmd,
    cpr,
    cpr_cmd,
    faithfulness_curve,
    random_baseline,
)
from relp.mib import from_mib_json, to_mib_json
from relp.testing import tiny_model

# ----------------------------------------------------------------------------------------------
# A micro-model computed by hand
#
# One scalar residual stream per position, two blocks, logits [x, 0] (so LogitDiff(0, 1) = x at the
# last position):
#   block 0: attn_out[p] = x[0]        (every position reads position 0), mlp_out = x_mid
#   block 1: attn_out[p] = x[p - 1]    (previous token; 0 at p = 0),        mlp_out = -x_mid / 2
# Prompts: clean [3, 1], corrupted [5, 1] (same last token, as in IOI).
#   clean:     A0 = [3, 3]  M0 = [6, 4]   A1 = [0, 12]  M1 = [-6, -10]  -> m(M) = 1 + 3 + 4 + 12 - 10 = 10
#   corrupted: A0 = [5, 5]  M0 = [10, 6]  A1 = [0, 20]  M1 = [-10, -16] -> 16
# Nodes: attn_out and mlp_out at (layer, position): 8 nodes.


class _Block(nn.Module):
    def __init__(self, attn, mlp):
        super().__init__()
        self.attn, self.mlp = attn, mlp
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()

    def forward(self, x):
        x = self.hook_resid_pre(x)
        x = x + self.hook_attn_out(self.attn(x))
        return x + self.hook_mlp_out(self.mlp(x))


def _read_first(x):
    return x[:, :1].expand_as(x).clone()


def _read_previous(x):
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


class MicroModel(HookedRootModule):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(_read_first, lambda x: x), _Block(_read_previous, lambda x: -x / 2)])
        self.cfg = types.SimpleNamespace(
            n_layers=2, n_heads=1, d_mlp=1, d_model=1, dtype=torch.float64, device=torch.device("cpu"),
            model_name="micro", parallel_attn_mlp=False,
        )
        self.setup()

    def forward(self, tokens):
        x = tokens.to(torch.float64)[..., None]
        for block in self.blocks:
            x = block(x)
        return torch.cat([x, torch.zeros_like(x)], dim=-1)


MICRO_CLEAN = torch.tensor([[3, 1]])
MICRO_CORRUPTED = torch.tensor([[5, 1]])
MICRO_METRIC = relp.LogitDiff(torch.tensor([0]), torch.tensor([1]))


def _micro_circuit(a0=(), m0=(), a1=(), m1=()):
    attn = torch.zeros(2, 2, dtype=torch.bool)
    mlp = torch.zeros(2, 2, dtype=torch.bool)
    for layer, positions in ((0, a0), (1, a1)):
        attn[layer, list(positions)] = True
    for layer, positions in ((0, m0), (1, m1)):
        mlp[layer, list(positions)] = True
    return Circuit({"attn_out": attn, "mlp_out": mlp})


@pytest.fixture(scope="module")
def micro():
    return MicroModel().eval()


def test_micro_model_reference_runs(micro):
    assert MICRO_METRIC(micro(MICRO_CLEAN)).item() == 10
    assert MICRO_METRIC(micro(MICRO_CORRUPTED)).item() == 16


# Hand computations (corrupt ablation, empty = 1 + 5 + 6 + 20 - 16 = 16):
#  {A1@1}: stream at position 0 entering block 1 = 3 + 5 + 10 = 18, so A1@1 = 18 and
#          m = 1 + 5 + 6 + 18 - 16 = 14, f = (14 - 16) / (10 - 16) = 1/3
#  {A0@0}: A0@0 only reaches the last position through A1@1, which is ablated: m = 16, f = 0
#  {A0@0, A1@1}: position 0 = 3 + 3 + 10 = 16 = A1@1, m = 1 + 5 + 6 + 16 - 16 = 12, f = 2/3
#  {A1@1, M1@1}: A1@1 = 18, mid = 1 + 5 + 6 + 18 = 30, M1@1 = -15, m = 15, f = 1/6
# Completeness (only the circuit ablated), e.g. {A1@1}: A1@1 := 20, mid = 8 + 20 = 28, M1@1 = -14,
#  m = 14, f = 1/3; {A0@0}: position 0 = 3 + 5 + 8 = 16 = A1@1, mid[1] = 8 + 16, m = 12, f = 2/3.
@pytest.mark.parametrize(
    "circuit, value, faithfulness, complement_value, completeness",
    [
        (dict(a1=[1]), 14, 1 / 3, 14, 1 / 3),
        (dict(a0=[0]), 16, 0.0, 12, 2 / 3),
        (dict(a0=[0], a1=[1]), 12, 2 / 3, 14, 1 / 3),
        (dict(a1=[1], m1=[1]), 15, 1 / 6, 12, 2 / 3),
    ],
)
def test_micro_model_corrupt_ablation_by_hand(micro, circuit, value, faithfulness, complement_value, completeness):
    evaluator = CircuitEvaluator(micro, MICRO_CLEAN, MICRO_CORRUPTED, MICRO_METRIC, ablation="corrupt")
    result = evaluator.evaluate(_micro_circuit(**circuit))
    assert (result.full, result.empty) == (10, 16)
    assert result.value == value and result.complement_value == complement_value
    assert result.faithfulness == pytest.approx(faithfulness, abs=1e-12)
    assert result.completeness == pytest.approx(completeness, abs=1e-12)


# Other ablations of the circuit {A1@1}:
#  zero: empty = 1; position 0 entering block 1 = 3, so A1@1 = 3, m = 1 + 3 = 4, f = 3/9 = 1/3
#  mean (over the corrupted prompt's positions: A0 5, M0 8, A1 10, M1 -13): empty = 1 + 5 + 8 + 10 - 13
#        = 11; position 0 = 3 + 5 + 8 = 16 = A1@1, m = 1 + 5 + 8 + 16 - 13 = 17, f = (17 - 11)/(10 - 11) = -6
#  mean_positional over {[5, 1], [3, 1]}: A0 [4, 4], M0 [8, 5], A1 [0, 16], M1 [-8, -13]: empty =
#        1 + 4 + 5 + 16 - 13 = 13; position 0 = 3 + 4 + 8 = 15 = A1@1, m = 12, f = (12 - 13)/(10 - 13) = 1/3
@pytest.mark.parametrize(
    "ablation, reference, empty, value, faithfulness",
    [
        ("zero", None, 1, 4, 1 / 3),
        ("mean", None, 11, 17, -6.0),
        ("mean_positional", torch.tensor([[5, 1], [3, 1]]), 13, 12, 1 / 3),
    ],
)
def test_micro_model_other_ablations_by_hand(micro, ablation, reference, empty, value, faithfulness):
    evaluator = CircuitEvaluator(micro, MICRO_CLEAN, MICRO_CORRUPTED, MICRO_METRIC, ablation=ablation, reference=reference)
    result = evaluator.evaluate(_micro_circuit(a1=[1]))
    assert (result.full, result.empty, result.value) == (10, empty, value)
    assert result.faithfulness == pytest.approx(faithfulness, abs=1e-12)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_micro_model_curve_is_exactly_0_when_empty_and_1_when_full(micro, ablation):
    evaluator = CircuitEvaluator(micro, MICRO_CLEAN, MICRO_CORRUPTED, MICRO_METRIC, ablation=ablation)
    scores = {"attn_out": torch.tensor([[0.1, 0.2], [0.3, 0.4]]), "mlp_out": torch.tensor([[0.5, 0.6], [0.7, 0.8]])}
    curve = faithfulness_curve(evaluator, scores)
    # 8 nodes: k = 0.1% .. 10% select int(k/100 * 8) = 0 nodes, 20% one node, 100% all of them
    assert curve.n_nodes == (0, 0, 0, 0, 0, 0, 0, 1, 4, 8)
    assert curve.faithfulness[:7] == (0.0,) * 7
    assert curve.faithfulness[-1] == 1.0
    # the top node by signed score is M1@1 (0.8)
    assert curve.values[7] == evaluator.values(_micro_circuit(m1=[1]))[0].item()


# ----------------------------------------------------------------------------------------------
# Ablation equals independent hook interventions on real (tiny) bridges


def _prompts(model, n_prompts=3, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(6, model.cfg.d_vocab, (n_prompts, length), generator=g)
    clean[:, 0] = 0
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(6, model.cfg.d_vocab, (n_prompts,), generator=g)
    answer = torch.randint(6, model.cfg.d_vocab, (n_prompts,), generator=g)
    wrong = torch.randint(6, model.cfg.d_vocab, (n_prompts,), generator=g)
    return clean, corrupted, relp.LogitDiff(answer, wrong)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2", dtype=torch.float64, n_layers=2)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", dtype=torch.float64, n_layers=2)


def _manual_ablation_values(model, components, reference, ablation, corrupted):
    """{component: {layer: value}} from TransformerLens' own run_with_cache (no relp code)."""
    caches = [model.run_with_cache(tokens)[1] for tokens in ([corrupted] if ablation in ("corrupt", "zero") else reference)]
    values = {}
    for component in components:
        comp = COMPONENTS[component]
        values[component] = {}
        for layer in range(model.cfg.n_layers):
            acts = [
                cache[comp.hook_name(layer)] + (cache[comp.offset_name(layer)] if comp.offset_template else 0)
                for cache in caches
            ]
            if ablation == "corrupt":
                values[component][layer] = acts[0]
            elif ablation == "zero":
                values[component][layer] = torch.zeros_like(acts[0][:1, :1])
            elif ablation == "mean":
                values[component][layer] = torch.cat([a.flatten(0, 1) for a in acts]).mean(0)[None, None]
            else:
                values[component][layer] = torch.cat(acts).mean(0, keepdim=True)
    return values


def _manual_value(model, clean, metric, circuit: Circuit, ablation_values):
    """The metric with every node outside `circuit` set, one node at a time, to its ablation value."""
    hooks, current = [], {}
    for component, mask in circuit.nodes.items():
        comp = COMPONENTS[component]
        axes = [a for a in comp.axes if circuit.per_position or a != "position"]
        for layer in circuit.layers:
            if comp.offset_template:  # resid_mid is written through attn_out: attn_out := value - resid_pre
                def store(x, hook, layer=layer):
                    current[layer] = x.clone()
                    return x

                hooks.append((comp.offset_name(layer), store))

            def ablate(x, hook, layer=layer, mask=mask[layer], axes=axes, comp=comp):
                x = x.clone()
                value = ablation_values[comp.name][layer].expand(x.shape).clone()
                if comp.offset_template:
                    value = value - current[layer]
                for cell in itertools.product(*map(range, mask.shape)):
                    if mask[cell]:
                        continue
                    named = dict(zip(axes[1:], cell))
                    position = named.get("position", slice(None))
                    if comp.name == "head":
                        index = (slice(None), position, named["head"])
                    elif comp.name == "neuron":
                        index = (slice(None), position, named["neuron"])
                    else:
                        index = (slice(None), position)
                    x[index] = value[index]
                return x

            hooks.append((comp.hook_name(layer), ablate))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return metric(model(clean)).item()


def _random_circuit(model, components, per_position, length, seed):
    g = torch.Generator().manual_seed(seed)
    nodes = {}
    for component in components:
        axes = [a for a in COMPONENTS[component].axes if per_position or a != "position"]
        sizes = {"layer": model.cfg.n_layers, "position": length, "head": model.cfg.n_heads, "neuron": model.cfg.d_mlp}
        nodes[component] = torch.rand([sizes[a] for a in axes], generator=g) < 0.5
    return Circuit(nodes, per_position)


@pytest.mark.parametrize(
    "architecture, components, per_position, ablation",
    [
        ("gpt2", ["attn_out", "mlp_out"], True, "corrupt"),
        ("gpt2", ["attn_out", "mlp_out"], True, "mean"),
        ("gpt2", ["attn_out", "mlp_out"], True, "mean_positional"),
        ("gpt2", ["attn_out", "mlp_out"], True, "zero"),
        ("gpt2", ["head"], True, "zero"),
        ("gpt2", ["attn_out", "neuron"], False, "mean"),
        ("gpt2", ["resid_pre"], True, "corrupt"),
        ("gpt2", ["resid_post"], False, "zero"),
        ("llama", ["head", "mlp_out"], False, "corrupt"),  # grouped-query attention: per query head
        ("llama", ["neuron"], True, "mean_positional"),  # act(gate) * up
        ("llama", ["resid_mid"], True, "mean"),
    ],
)
def test_ablation_equals_manual_hook_intervention(request, architecture, components, per_position, ablation):
    model = request.getfixturevalue(architecture)
    clean, corrupted, metric = _prompts(model)
    # two reference batches for the mean ablations (any length will do for "mean")
    reference = [corrupted, clean[:2, :4] if ablation == "mean" else clean[:2]]
    kwargs = {"reference": reference} if ablation.startswith("mean") else {}
    evaluator = CircuitEvaluator(model, clean, corrupted, metric, ablation=ablation, **kwargs)
    circuits = [_random_circuit(model, components, per_position, clean.shape[1], seed) for seed in range(2)]
    ours = evaluator.values(circuits)  # both circuits in one forward pass of stacked copies
    assert evaluator.forward_passes == 1
    manual_values = _manual_ablation_values(model, components, reference, ablation, corrupted)
    expected = [_manual_value(model, clean, metric, circuit, manual_values) for circuit in circuits]
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # the ablation did something
        assert (ours - metric(model(clean)).item()).abs().max() > 1e-6


def test_full_circuit_is_the_clean_run(gpt2):
    clean, corrupted, metric = _prompts(gpt2)
    evaluator = CircuitEvaluator(gpt2, clean, corrupted, metric)
    circuit = _random_circuit(gpt2, ["attn_out", "mlp_out"], True, clean.shape[1], 0)
    with torch.no_grad():
        assert evaluator.full_value(circuit) == metric(gpt2(clean)).item()
    assert evaluator.empty_value(circuit) != evaluator.full_value(circuit)


def test_values_are_cached_and_stacking_does_not_change_them(gpt2):
    clean, corrupted, metric = _prompts(gpt2)
    circuits = [_random_circuit(gpt2, ["head", "mlp_out"], True, clean.shape[1], seed) for seed in range(3)]
    stacked = CircuitEvaluator(gpt2, clean, corrupted, metric, batch_size=64)
    single = CircuitEvaluator(gpt2, clean, corrupted, metric, batch_size=1)
    torch.testing.assert_close(stacked.values(circuits), single.values(circuits), rtol=1e-10, atol=1e-10)
    assert stacked.forward_passes == 1 and single.forward_passes == 3
    stacked.values(circuits + [circuits[0].complement().complement()])
    assert stacked.forward_passes == 1  # every node set was seen before


def test_pooled_evaluator_is_the_prompt_weighted_mean(micro):
    metric = relp.LogitDiff(0, 1)  # one id for every prompt
    first = CircuitEvaluator(micro, torch.tensor([[3, 1], [2, 2]]), torch.tensor([[5, 1], [4, 2]]), metric)
    second = CircuitEvaluator(micro, torch.tensor([[3, 1, 1]]), torch.tensor([[5, 1, 1]]), metric)
    pooled = PooledEvaluator([first, second])
    circuit = Circuit({"attn_out": torch.tensor([False, True]), "mlp_out": torch.tensor([True, False])}, per_position=False)
    expected = (2 * first.values(circuit) + 1 * second.values(circuit)) / 3
    torch.testing.assert_close(pooled.values(circuit), expected)
    curve = faithfulness_curve(pooled, {"attn_out": torch.randn(2, 1), "mlp_out": torch.randn(2, 1)}, per_position=False)
    assert curve.faithfulness[0] == 0.0 and curve.faithfulness[-1] == 1.0


@pytest.fixture(scope="module")
def gpt2_scores(gpt2):
    clean, corrupted, metric = _prompts(gpt2)
    return relp.attribution_patching(gpt2, clean, corrupted, metric, ["attn_out", "mlp_out"])


@pytest.mark.parametrize("ablation", ["corrupt", "mean_positional"])
def test_f_is_exactly_0_and_1_at_the_ends_on_a_bridge(gpt2, gpt2_scores, ablation):
    clean, corrupted, metric = _prompts(gpt2)
    evaluator = CircuitEvaluator(gpt2, clean, corrupted, metric, ablation=ablation)
    summary = cpr_cmd(evaluator, gpt2_scores)
    for curve in (summary.signed, summary.absolute):
        assert curve.n_nodes[0] == 0 and curve.faithfulness[0] == 0.0
        assert curve.n_nodes[-1] == curve.n_total == 24 and curve.faithfulness[-1] == 1.0
    baseline = random_baseline(evaluator, gpt2_scores, seeds=3)
    assert all(c.faithfulness[-1] == 1.0 and c.faithfulness[0] == 0.0 for c in baseline.curves)
    assert baseline.curves[0].n_nodes == summary.signed.n_nodes
    assert baseline.cpr[1] > 0 and len({c.cpr for c in baseline.curves}) == 3  # seeds differ
    assert evaluator.forward_passes <= 3  # everything stacked: a few passes, not one per circuit


# ----------------------------------------------------------------------------------------------
# CPR and CMD on known curves


def test_cpr_and_cmd_on_known_curves():
    k = MIB_PERCENTAGES
    # f = k as a fraction: trapezoids are exact for a line, area = (1 - 0.001^2) / 2
    linear = [p / 100 for p in k]
    assert cpr(k, linear) == pytest.approx(0.4999995, abs=1e-12)
    assert cmd(k, linear) == pytest.approx(0.999 - 0.4999995, abs=1e-12)
    # a perfect circuit everywhere: the area of the grid [0.001, 1]
    assert cpr(k, [1.0] * 10) == pytest.approx(0.999, abs=1e-12)
    assert cmd(k, [1.0] * 10) == 0.0
    # f = 0 except at 100%: one triangle from 50% to 100%
    step = [0.0] * 9 + [1.0]
    assert cpr(k, step) == pytest.approx(0.25, abs=1e-12)
    assert cmd(k, step) == pytest.approx(0.999 - 0.25, abs=1e-12)
    # overshoot counts against CMD: f = 2 everywhere
    assert cmd(k, [2.0] * 10) == pytest.approx(0.999, abs=1e-12)
    assert area_under_curve([0, 50, 100], [0, 1, 0]) == pytest.approx(0.5)


def test_curve_properties_match_the_functions(micro):
    evaluator = CircuitEvaluator(micro, MICRO_CLEAN, MICRO_CORRUPTED, MICRO_METRIC)
    curve = faithfulness_curve(evaluator, {"attn_out": torch.tensor([[0.0, 0.0], [0.0, 1.0]]), "mlp_out": torch.zeros(2, 2)},
                               percentages=[0, 12.5, 100])
    assert curve.n_nodes == (0, 1, 8)
    assert curve.faithfulness == (0.0, pytest.approx(1 / 3), 1.0)  # {A1@1} from above
    assert curve.cpr == cpr(curve.percentages, curve.faithfulness)
    assert curve.points == [[0.0, 0.0], [12.5, curve.faithfulness[1]], [100.0, 1.0]]


# ----------------------------------------------------------------------------------------------
# Selection


SCORES = {
    "attn_out": torch.tensor([[0.5, -3.0, 0.0], [1.0, 0.2, -0.1]]),
    "mlp_out": torch.tensor([[2.0, 0.0, -0.2], [0.0, 0.0, 1.0]]),
}


def test_selection_by_count_percent_threshold_signed_and_absolute():
    # m0@0 (2.0) first; a1@0 and m1@2 tie at 1.0 and the tie keeps node order (attn_out before mlp_out)
    top2 = select_circuit(SCORES, count=2)
    assert top2.node_names() == ["a1@0", "m0@0"]  # names are listed in node order
    assert top2.nodes["mlp_out"][0, 0] and top2.nodes["attn_out"][1, 0] and top2.n_nodes == 2
    assert select_circuit(SCORES, count=2, absolute=True).node_names() == ["a0@1", "m0@0"]  # |-3.0| and 2.0
    assert select_circuit(SCORES, threshold=1.0).n_nodes == 3
    assert select_circuit(SCORES, threshold=0.5, absolute=True).n_nodes == 5
    # 12 nodes: 50% -> 6, 10% -> int(1.2) = 1, 0% -> 0, 100% -> 12
    assert [select_circuit(SCORES, percent=p).n_nodes for p in (50, 10, 0, 100)] == [6, 1, 0, 12]
    assert select_circuit(SCORES, percent=10).node_names() == ["m0@0"]
    assert select_circuit(SCORES, count=1, components=["attn_out"]).node_names() == ["a1@0"]


def test_selection_summed_over_positions_and_from_results():
    summed = node_scores(SCORES, per_position=False)
    torch.testing.assert_close(summed["attn_out"], torch.tensor([-2.5, 1.1], dtype=torch.float64))
    circuit = select_circuit(SCORES, count=1, per_position=False, absolute=True)
    assert circuit.node_names() == ["a0"] and not circuit.per_position
    result = relp.PatchingResult(scores=dict(SCORES), method="attribution_patching", metric="m", direction="denoising",
                                 layers=(0, 1), metadata={"n_prompts": 3})
    other = relp.PatchingResult(scores={k: -v for k, v in SCORES.items()}, method="attribution_patching", metric="m",
                                direction="denoising", layers=(0, 1), metadata={"n_prompts": 1})
    pooled = node_scores([result, other])  # (3 s - 1 s) / 4 = s / 2
    torch.testing.assert_close(pooled["mlp_out"], SCORES["mlp_out"].double() / 2)
    assert select_circuit([result, other], count=1).metadata["label"] == "AtP"


def test_count_for_percent_follows_mib():
    assert [count_for_percent(k, 300) for k in MIB_PERCENTAGES] == [0, 0, 1, 3, 6, 15, 30, 60, 150, 300]
    assert count_for_percent(29, 100) == 29  # int(0.29 * 100) would give 28


@pytest.mark.parametrize("percent", [-1, 100.5, 1e9])
def test_k_outside_0_100_is_refused(percent, micro):
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        select_circuit(SCORES, percent=percent)
    evaluator = CircuitEvaluator(micro, MICRO_CLEAN, MICRO_CORRUPTED, MICRO_METRIC)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        faithfulness_curve(evaluator, {"attn_out": torch.ones(2, 2)}, percentages=[0, 50, percent])


@pytest.mark.parametrize(
    "scores, match",
    [
        ({}, "empty score map"),
        ({"attn_out": torch.zeros(0, 3)}, "empty score map"),
        ([], "empty score map"),
        ({"attn_out": torch.tensor([[float("nan"), 1.0]])}, "NaN"),
        ({"attn_out": torch.zeros(3)}, "axes"),
        ({"nope": torch.zeros(2, 3)}, "unknown component"),
        ({"head": torch.zeros(2, 4, 3), "attn_out": torch.zeros(2, 3)}, "overlap"),
        ({"resid_pre": torch.zeros(2, 3), "mlp_out": torch.zeros(2, 3)}, "residual"),
    ],
)
def test_bad_score_maps_are_refused(scores, match):
    with pytest.raises(ValueError, match=match):
        select_circuit(scores, count=1)


def test_bad_selection_arguments_are_refused():
    with pytest.raises(ValueError, match="exactly one"):
        select_circuit(SCORES, count=1, percent=5)
    with pytest.raises(ValueError, match="exactly one"):
        select_circuit(SCORES)
    with pytest.raises(ValueError, match=r"count must be in \[0, 12\]"):
        select_circuit(SCORES, count=13)
    with pytest.raises(ValueError, match="no scores for"):
        select_circuit(SCORES, count=1, components=["head"])


# ----------------------------------------------------------------------------------------------
# Evaluation errors


def test_reference_or_corrupted_of_the_wrong_shape_is_refused(gpt2):
    clean, corrupted, metric = _prompts(gpt2)
    with pytest.raises(ValueError, match=r"reference prompts of the clean prompts' length 6; got reference token shapes \[\(3, 5\)\]"):
        CircuitEvaluator(gpt2, clean, corrupted, metric, ablation="mean_positional", reference=corrupted[:, :5])
    with pytest.raises(ValueError, match=r"corrupted tokens \(2, 6\) do not match the clean tokens \(3, 6\)"):
        CircuitEvaluator(gpt2, clean, corrupted[:2], metric)
    with pytest.raises(ValueError, match="needs the corrupted prompts"):
        CircuitEvaluator(gpt2, clean, None, metric)
    with pytest.raises(ValueError, match="ablation must be one of"):
        CircuitEvaluator(gpt2, clean, corrupted, metric, ablation="resample")
    evaluator = CircuitEvaluator(gpt2, clean, corrupted, metric)
    wrong_length = _random_circuit(gpt2, ["attn_out"], True, 9, 0)
    with pytest.raises(ValueError, match=r"attn_out nodes have shape \(2, 9\); .* have shape \(2, 6\)"):
        evaluator.values(wrong_length)
    with pytest.raises(ValueError, match="outside the model's layers"):
        evaluator.values(Circuit({"mlp_out": torch.ones(1, dtype=torch.bool)}, per_position=False, layers=(5,)))


def test_hooks_are_removed_when_the_metric_fails(gpt2):
    clean, corrupted, metric = _prompts(gpt2)
    with torch.no_grad():
        before = gpt2(clean)

    def broken(logits):
        raise RuntimeError("metric failed")

    evaluator = CircuitEvaluator(gpt2, clean, corrupted, broken)
    with pytest.raises(RuntimeError, match="metric failed"):
        evaluator.values(_random_circuit(gpt2, ["head"], True, clean.shape[1], 0))
    with torch.no_grad():
        torch.testing.assert_close(gpt2(clean), before, rtol=0, atol=0)


def test_undefined_faithfulness_is_refused(micro):
    same = CircuitEvaluator(micro, MICRO_CLEAN, MICRO_CLEAN, MICRO_METRIC)  # corrupted == clean
    with pytest.raises(ValueError, match="faithfulness is undefined"):
        same.evaluate(_micro_circuit(a1=[1]))


# ----------------------------------------------------------------------------------------------
# MIB JSON


def test_mib_json_round_trip_per_position(tmp_path, gpt2):
    circuit = select_circuit(SCORES, percent=25)
    path = tmp_path / "circuit.json"
    payload = to_mib_json(circuit, path, model=gpt2)
    assert payload["nodes"]["input"] == {"in_graph": True} and payload["nodes"]["logits"] == {"in_graph": True}
    assert payload["nodes"]["a0@1"] == {"in_graph": False, "score": -3.0}
    back = from_mib_json(path)
    assert back.per_position and back.layers == circuit.layers
    for component in circuit.nodes:
        assert torch.equal(back.nodes[component], circuit.nodes[component])
        assert torch.equal(back.scores[component], circuit.scores[component])
    assert back.metadata["cfg"]["n_heads"] == gpt2.cfg.n_heads


def test_mib_json_heads_and_mlps_match_mibs_graph(gpt2):
    g = torch.Generator().manual_seed(0)
    scores = {"head": torch.randn(2, 4, 6, generator=g), "mlp_out": torch.randn(2, 6, generator=g)}
    circuit = select_circuit(scores, percent=30, per_position=False)
    payload = json.loads(json.dumps(to_mib_json(circuit, model=gpt2, edges=True)))
    n_layers, n_heads = gpt2.cfg.n_layers, gpt2.cfg.n_heads
    assert payload["cfg"]["n_layers"] == n_layers and payload["cfg"]["n_heads"] == n_heads
    names = list(payload["nodes"])
    assert names == ["input"] + [n for l in range(n_layers) for n in [f"a{l}.h{h}" for h in range(n_heads)] + [f"m{l}"]] + ["logits"]
    assert sum(v["in_graph"] for k, v in payload["nodes"].items() if k not in ("input", "logits")) == circuit.n_nodes
    # MIB's edge count for a sequential model (Graph.from_model): every head gets q, k, v edges from
    # the input and all earlier nodes, every MLP from those and its layer's heads, logits from all
    expected_edges, upstream = 0, 1
    for _ in range(n_layers):
        expected_edges += upstream * n_heads * 3 + (upstream + n_heads)
        upstream += n_heads + 1
    expected_edges += upstream
    assert len(payload["edges"]) == expected_edges
    edge = payload["edges"]["a0.h1->m1"]
    assert edge["in_graph"] == (payload["nodes"]["a0.h1"]["in_graph"] and payload["nodes"]["m1"]["in_graph"])
    assert edge["score"] == payload["nodes"]["a0.h1"]["score"]
    # a plain MIB file (no relp section) reads as heads + MLPs summed over positions
    plain = dict(payload, cfg={k: v for k, v in payload["cfg"].items() if k != "relp"})
    back = from_mib_json(plain)
    assert torch.equal(back.nodes["head"], circuit.nodes["head"]) and torch.equal(back.nodes["mlp_out"], circuit.nodes["mlp_out"])
    torch.testing.assert_close(back.scores["head"], circuit.scores["head"])


def test_mib_json_of_heads_only_keeps_mlps_in_graph_and_edges_need_a_mib_graph(gpt2):
    scores = {"head": torch.randn(2, 4, 6)}
    circuit = select_circuit(scores, count=2, per_position=False)
    payload = to_mib_json(circuit, model=gpt2)
    assert payload["nodes"]["m0"] == {"in_graph": True}  # unscored: never ablated
    back = from_mib_json(payload)
    assert back.components == ("head",) and torch.equal(back.nodes["head"], circuit.nodes["head"])
    with pytest.raises(ValueError, match="MIB edges exist only"):
        to_mib_json(select_circuit(SCORES, count=1), edges=True)


def test_node_names_parse_back():
    for name, expected in [
        ("a3.h7", ("head", {"layer": 3, "head": 7})),
        ("m12", ("mlp_out", {"layer": 12})),
        ("a2@5", ("attn_out", {"layer": 2, "position": 5})),
        ("m1.n40@3", ("neuron", {"layer": 1, "neuron": 40, "position": 3})),
        ("resid_mid.4@0", ("resid_mid", {"layer": 4, "position": 0})),
    ]:
        assert parse_node_name(name) == expected
    with pytest.raises(ValueError, match="unrecognised node name"):
        parse_node_name("x1")
    with pytest.raises(ValueError, match="expected keys 'cfg' and 'nodes'"):
        from_mib_json({"nodes": {}})


# ----------------------------------------------------------------------------------------------
# The experiment, end to end on a tiny model


def test_faithfulness_experiment_writes_the_table(tmp_path):
    from relp.cli import EXPERIMENTS
    from relp.experiments.faithfulness import build_parser, run
    from relp.tasks import ioi_words

    assert EXPERIMENTS["faithfulness"] == "relp.experiments.faithfulness"
    model = tiny_model("gpt2", words=list(ioi_words()), n_layers=2)
    args = build_parser().parse_args(
        ["--out", str(tmp_path), "--n-prompts", "2", "--n-eval", "3", "--methods", "ap", "atp", "--seeds", "2"]
    )
    run(args, model=model)
    table = json.loads((tmp_path / "faithfulness.json").read_text())
    assert set(table) == {"ap", "atp", "random"}
    for method in ("ap", "atp"):
        entry = table[method]
        assert {"cpr", "cmd", "curve", "seconds"} <= set(entry)
        assert [k for k, _ in entry["curve"]] == list(MIB_PERCENTAGES)
        assert entry["curve"][0][1] == 0.0 and entry["curve"][-1][1] == 1.0
        assert entry["cpr"] == pytest.approx(cpr(MIB_PERCENTAGES, [f for _, f in entry["curve"]]))
        assert entry["seconds"] > 0
        circuit = from_mib_json(tmp_path / "circuits" / f"{method}.json")
        assert circuit.n_total == 2 * 2 * 16 and circuit.n_nodes == int(0.05 * circuit.n_total)
    assert {"cpr_mean", "cpr_std", "cmd_mean", "cmd_std"} <= set(table["random"])
    assert (tmp_path / "faithfulness.png").stat().st_size > 0
    assert "| AtP |" in (tmp_path / "faithfulness.md").read_text()
