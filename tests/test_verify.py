"""Activation patching of selected cells, estimate-then-verify, and the AP cache on disk.

Oracles: full activation patching (every cell), which is itself checked against transformer_lens's
patching in test_patching.py; the estimate's own scores; rankings and counts recomputed here with
plain torch (and the estimate's ranking via ``PatchingResult.top``, a separate code path). Float64
models throughout: where two runs group the same cells into different stacked passes, their values
differ only by float64 rounding (measured <= 1.4e-17 on scores of order 1e-2), so 1e-12 is a bound
far above rounding and far below the real effects compared (>= 1e-4 is asserted to be present).
"""

from __future__ import annotations

import pytest
import torch

import relp
from _prompt_pairs import changed_at_2_and_4
from relp import ap_cache
from relp.methods import forward_equivalents, get_method
from relp.testing import tiny_model
from relp.verification import cell_masks

COMPONENTS = ["resid_pre", "attn_out", "mlp_out", "head", "neuron"]
CLOSE = {"rtol": 0.0, "atol": 1e-12}  # float64 rounding across different pass groupings (module docstring)

pytestmark = pytest.mark.usefixtures("single_thread")


_prompts = changed_at_2_and_4


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, single_thread):
    """A float64 model, prompts, metric, full AP on every cell, and RelP and AtP estimates."""
    model = tiny_model(request.param, dtype=torch.float64, n_layers=2)
    clean, corrupted, metric = _prompts(model)
    full = relp.activation_patching(model, clean, corrupted, metric, COMPONENTS, progress=False)
    relp_result = relp.relevance_patching(model, clean, corrupted, metric, COMPONENTS)
    atp_result = relp.attribution_patching(model, clean, corrupted, metric, COMPONENTS)
    return model, clean, corrupted, metric, full, relp_result, atp_result


def _changed(full) -> dict[str, torch.Tensor]:
    """Cells whose activation differs between the runs, from the prompts alone: the tokens differ at
    positions 2 and 4, so on these causal models every activation differs from position 2 on, except
    the embeddings (resid_pre of layer 0), which differ only at 2 and 4."""
    changed = {}
    for name in COMPONENTS:
        axis = relp.COMPONENTS[name].axes.index("position")
        positions = torch.arange(full[name].shape[axis])
        shape = [1] * full[name].ndim
        shape[axis] = -1
        mask = (positions >= 2).reshape(shape).expand(full[name].shape).clone()
        if name == "resid_pre":
            mask[0] = False
            mask[0, 2] = mask[0, 4] = True
        changed[name] = mask
    return changed


def _flat(result) -> torch.Tensor:
    return torch.cat([result[name].reshape(-1) for name in COMPONENTS])


# ----------------------------------------------------------------------------------------------
# activation_patching(cells=...)


def test_selected_cells_are_patched_exactly_and_the_others_are_nan(setup):
    model, clean, corrupted, metric, full, *_ = setup
    g = torch.Generator().manual_seed(1)
    masks = {name: torch.rand(full[name].shape, generator=g) < 0.3 for name in COMPONENTS}
    for name in COMPONENTS:  # and each component's strongest cell, so that real effects are compared
        masks[name].view(-1)[full[name].abs().argmax()] = True
    part = relp.activation_patching(model, clean, corrupted, metric, COMPONENTS, progress=False, cells=masks)
    changed = _changed(full)
    for name in COMPONENTS:
        chosen = masks[name]
        torch.testing.assert_close(part[name][chosen], full[name][chosen], **CLOSE)
        assert torch.isnan(part[name][~chosen]).all() and not torch.isnan(part[name][chosen]).any(), name
        assert torch.equal(part[name][chosen & ~changed[name]], torch.zeros(int((chosen & ~changed[name]).sum()), dtype=torch.float64))
        assert full[name][chosen].abs().max() > 1e-4, name  # real effects among the selected cells
    selected = sum(int(m.sum()) for m in masks.values())
    patched = sum(int((masks[n] & changed[n]).sum()) for n in COMPONENTS)
    assert 0 < patched < selected
    assert part.metadata["cells_patched"] == patched and part.metadata["cells_selected"] == selected
    assert part.metadata["cells_skipped_unchanged"] == selected - patched
    assert forward_equivalents(part) == patched + 2
    every = sum(int(m.sum()) for m in changed.values())
    assert full.metadata["cells_patched"] == every and forward_equivalents(full) == every + 2


def test_selecting_every_cell_is_the_full_run(setup):
    model, clean, corrupted, metric, full, *_ = setup
    everything = {name: torch.ones(full[name].shape, dtype=torch.bool) for name in COMPONENTS}
    again = relp.activation_patching(model, clean, corrupted, metric, COMPONENTS, progress=False, cells=everything)
    for name in COMPONENTS:  # the same cells in the same passes: bit for bit
        assert torch.equal(again[name], full[name]), name
    assert again.metadata["forward_equivalents"] == full.metadata["forward_equivalents"]


def test_cells_over_a_subset_of_layers(setup):
    model, clean, corrupted, metric, full, *_ = setup
    mask = torch.zeros(1, *full["head"].shape[1:], dtype=torch.bool)
    mask[0, :, 3:] = True
    part = relp.activation_patching(model, clean, corrupted, metric, ["head"], layers=[1], progress=False, cells={"head": mask})
    torch.testing.assert_close(part["head"][mask], full["head"][1:][mask], **CLOSE)
    assert torch.isnan(part["head"][~mask]).all() and full["head"][1:][mask].abs().max() > 1e-3


def test_bad_cell_masks_are_refused(setup):
    model, clean, corrupted, metric, full, *_ = setup

    def run(cells, components=("resid_pre", "head"), **kwargs):
        relp.activation_patching(model, clean, corrupted, metric, list(components), progress=False, cells=cells, **kwargs)

    good = {name: torch.ones(full[name].shape, dtype=torch.bool) for name in ("resid_pre", "head")}
    with pytest.raises(TypeError, match="cells must be a dict"):
        run([good["resid_pre"]])
    with pytest.raises(ValueError, match=r"missing \['head'\]"):
        run({"resid_pre": good["resid_pre"]})
    with pytest.raises(ValueError, match=r"not requested \['mlp_out'\]"):
        run({**good, "mlp_out": good["resid_pre"]})
    with pytest.raises(TypeError, match=r"cells\['head'\] must be a bool tensor; got a tensor of dtype torch.float32"):
        run({**good, "head": good["head"].float()})
    with pytest.raises(TypeError, match="must be a bool tensor; got list"):
        run({**good, "head": [[True]]})
    with pytest.raises(ValueError, match=r"cells\['head'\] has shape \(2, 4\); expected 3 axes"):
        run({**good, "head": torch.ones(2, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"with 1 layer\(s\) first \(layers \[0\]\)"):
        run(good, layers=[0])
    with pytest.raises(ValueError, match=r"cells\['head'\] has shape \(2, 4, 6\); expected \(2, 4, 7\)"):
        run({**good, "head": torch.ones(2, 4, 6, dtype=torch.bool)})


# ----------------------------------------------------------------------------------------------
# verify


def _top_cells(result, k) -> dict[str, torch.Tensor]:
    """Masks of the k highest-|score| cells, from PatchingResult.top (not verify's own ranking)."""
    masks = {name: torch.zeros(result[name].shape, dtype=torch.bool) for name in COMPONENTS}
    for _, row in result.top(k).iterrows():
        axes = relp.COMPONENTS[row["component"]].axes
        layer_index = list(result.layers).index(row["layer"])
        masks[row["component"]][(layer_index, *(int(row[a]) for a in axes[1:]))] = True
    return masks


def test_verified_cells_hold_activation_patching_and_the_others_the_estimate(setup):
    model, clean, corrupted, metric, full, estimate, _ = setup
    verified = relp.verify(estimate, model, clean, corrupted, metric, k=25, per_component=False)
    expected = _top_cells(estimate, 25)
    masks = cell_masks(verified)
    assert sum(int(m.sum()) for m in masks.values()) == 25
    for name in COMPONENTS:
        assert torch.equal(masks[name], expected[name]), name
        torch.testing.assert_close(verified[name][masks[name]], full[name][masks[name]], **CLOSE)
        assert torch.equal(verified[name][~masks[name]], estimate[name][~masks[name]]), name
    on = torch.cat([m.reshape(-1) for m in (masks[n] for n in COMPONENTS)])
    assert (_flat(full)[on] - _flat(estimate)[on]).abs().max() > 1e-6  # AP and the estimate differ there
    assert verified.label == "RelP+verify" and verified.method == "estimate_then_verify"
    assert verified.metadata["estimate"]["method"] == "relevance_patching"
    threshold = _flat(full)[on].abs().min().item()
    assert verified.metadata["verified_min_abs_ap"] == pytest.approx(threshold, abs=1e-12)
    mean_error = (_flat(full)[on] - _flat(estimate)[on]).abs().mean().item()
    assert verified.metadata["verified_mean_abs_error"] == pytest.approx(mean_error, abs=1e-12)
    assert forward_equivalents(verified) == 4 + verified.metadata["cells_patched"] + 2 + 2
    assert verified.metadata["cells_patched"] == sum(int((masks[n] & _changed(full)[n]).sum()) for n in COMPONENTS)


@pytest.mark.parametrize("k", ["all", 1.0])
def test_verifying_every_cell_is_activation_patching(setup, k):
    model, clean, corrupted, metric, full, estimate, _ = setup
    n_cells = sum(full[name].numel() for name in COMPONENTS)
    verified = relp.verify(estimate, model, clean, corrupted, metric, k=n_cells if k == "all" else k)
    for name in COMPONENTS:
        torch.testing.assert_close(verified[name], full[name], **CLOSE)
    # unverified: only the cells whose activation is the same in both runs (from the prompts alone)
    unchanged = ~torch.cat([_changed(full)[n].reshape(-1) for n in COMPONENTS])
    assert verified.metadata["n_unverified"] == int(unchanged.sum()) > 0 and (_flat(full)[unchanged] == 0).all()
    assert forward_equivalents(verified) == 4 + forward_equivalents(full) + 2  # + the runs that find changed cells


@pytest.mark.parametrize("which", ["relp", "atp"])
def test_a_sample_of_every_other_cell_counts_what_the_estimate_missed(setup, which):
    """With sample = all unverified cells, the extrapolated count is the true count, computed here
    from full AP and the estimate's own top-k."""
    model, clean, corrupted, metric, full, relp_result, atp_result = setup
    estimate = relp_result if which == "relp" else atp_result
    ap, guess = _flat(full), _flat(estimate)
    for k in (10, 15, 20, 5):  # the first k at which the estimate misses cells (a count of 0 proves little)
        top = torch.cat([m.reshape(-1) for m in (_top_cells(estimate, k)[n] for n in COMPONENTS)])
        threshold = ap[top].abs().min()
        true_missed = int((ap[~top].abs() > threshold).sum())
        if true_missed:
            break
    assert true_missed > 0
    verified = relp.verify(estimate, model, clean, corrupted, metric, k=k, sample=1.0, per_component=False)
    meta = verified.metadata
    assert meta["n_sampled"] == meta["n_unverified"] == ap.numel() - k
    assert meta["missed_estimate"] == true_missed and meta["sample_above_verified"] == true_missed
    assert meta["sample_max_abs_ap"] == pytest.approx(ap[~top].abs().max().item(), abs=1e-12)
    assert meta["sample_mean_abs_error"] == pytest.approx((ap[~top] - guess[~top]).abs().mean().item(), abs=1e-12)
    sampled = cell_masks(verified, "sampled")
    for name in COMPONENTS:
        indices = torch.tensor(meta["sampled"][name], dtype=torch.long)
        torch.testing.assert_close(torch.tensor(meta["sampled_ap"][name], dtype=torch.float64), full[name].reshape(-1)[indices], **CLOSE)
        assert torch.equal(verified[name][sampled[name]], estimate[name][sampled[name]])  # scores keep the estimate
    assert verified.label == ("RelP+verify" if which == "relp" else "AtP+verify")


def test_a_random_sample_is_disjoint_from_the_verified_cells_and_seeded(setup):
    model, clean, corrupted, metric, full, estimate, _ = setup
    one = relp.verify(estimate, model, clean, corrupted, metric, k=0.01, sample=40, seed=3, per_component=False)
    same = relp.verify(estimate, model, clean, corrupted, metric, k=0.01, sample=40, seed=3, per_component=False)
    other = relp.verify(estimate, model, clean, corrupted, metric, k=0.01, sample=40, seed=4, per_component=False)
    n_cells = _flat(full).numel()
    n_candidates = int(sum(m.sum() for m in _changed(full).values()))
    assert one.metadata["n_verified"] == -(-n_candidates // 100)  # 1% of the changed cells, rounded up
    verified, sampled = cell_masks(one), cell_masks(one, "sampled")
    assert sum(int(m.sum()) for m in sampled.values()) == 40
    assert not any((verified[n] & sampled[n]).any() for n in COMPONENTS)
    assert one.metadata["sampled"] == same.metadata["sampled"] != other.metadata["sampled"]
    above = sum(abs(v) > one.metadata["verified_min_abs_ap"] for values in one.metadata["sampled_ap"].values() for v in values)
    assert one.metadata["missed_estimate"] == pytest.approx(above * (n_cells - one.metadata["n_verified"]) / 40)


def test_verify_refuses_a_result_of_other_inputs_and_bad_counts(setup):
    model, clean, corrupted, metric, full, estimate, _ = setup

    def run(result=estimate, model=model, clean=clean, corrupted=corrupted, metric=metric, **kwargs):
        relp.verify(result, model, clean, corrupted, metric, **kwargs)

    other_model = tiny_model("bert", dtype=torch.float64, n_layers=2)
    with pytest.raises(ValueError, match=r"computed with model 'tiny-(gpt2|llama)' \(given 'tiny-bert'\)"):
        run(model=other_model)
    with pytest.raises(ValueError, match=r"prompts of shape \(3, 7\) \(given clean \(2, 7\)"):
        run(clean=clean[:2], corrupted=corrupted[:2])
    with pytest.raises(ValueError, match="other clean prompts"):
        run(clean=corrupted)
    with pytest.raises(ValueError, match=r"direction 'denoising' \(given 'noising'\)"):
        run(direction="noising")
    with pytest.raises(ValueError, match=r"layers \[0, 1\] \(given \[1\]\)"):
        run(layers=[1])
    with pytest.raises(ValueError, match=r"metric 'logit_diff' \(given 'last_logit'\)"):
        def last_logit(logits):
            return logits[:, -1, 0].mean()
        run(metric=last_logit)
    with pytest.raises(TypeError, match="must be a relp.PatchingResult"):
        run(result=estimate.scores)
    n_candidates = int(sum(m.sum() for m in _changed(full).values()))
    for k, error, message in [
        (-1, ValueError, "expected 0.."), (n_candidates + 1, ValueError, f"there are {n_candidates} changed cells"),
        (1.5, ValueError, r"must be in \(0, 1\]"), (True, TypeError, "must be an int"), ("5", TypeError, "must be an int"),
    ]:
        with pytest.raises(error, match=message):
            run(k=k, per_component=False)
    holes = relp.activation_patching(model, clean, corrupted, metric, ["head"], progress=False,
                                     cells={"head": torch.zeros(full["head"].shape, dtype=torch.bool)})
    with pytest.raises(ValueError, match="hold NaN"):
        run(result=holes)


def test_per_component_verification_gives_each_component_its_share(setup):
    """Default: the top ceil(k * changed cells) cells of each component, ranked within it (here from a
    sort of that component's |estimate| alone), so a component with small effects is verified too."""
    model, clean, corrupted, metric, full, estimate, _ = setup
    verified = relp.verify(estimate, model, clean, corrupted, metric, k=0.1)
    masks = cell_masks(verified)
    for name in COMPONENTS:
        values = estimate[name].reshape(-1).double()
        nonzero = torch.nonzero(_changed(full)[name].reshape(-1)).reshape(-1)
        count = -(-len(nonzero) // 10)
        top = nonzero[torch.argsort(-values[nonzero].abs(), stable=True)[:count]]
        expected = torch.zeros(values.numel(), dtype=torch.bool)
        expected[top] = True
        assert count > 0 and torch.equal(masks[name].reshape(-1), expected), name
        torch.testing.assert_close(verified[name][masks[name]], full[name][masks[name]], **CLOSE)
    capped = relp.verify(estimate, model, clean, corrupted, metric, k=10**6)  # an int k: at most k per component
    assert capped.metadata["n_verified"] == int(sum(m.sum() for m in _changed(full).values()))


# ----------------------------------------------------------------------------------------------
# estimate_then_verify (registry key "verify")


def test_estimate_then_verify_is_the_estimate_followed_by_verify(setup):
    model, clean, corrupted, metric, full, estimate, atp = setup
    method = get_method("verify")
    assert method.label == "RelP+verify" and method.function is relp.estimate_then_verify
    assert method.experiment_options({"k": 7, "rules": "relp", "steps": 3}) == {"k": 7, "rules": "relp"}
    n_cells = _flat(full).numel()
    assert method.cost.forward_equivalents(n_cells) == pytest.approx(6 + 0.05 * n_cells)
    combined = method(model, clean, corrupted, metric, COMPONENTS, k=15, rules="relp", logits_to_keep=1)
    direct = relp.verify(estimate, model, clean, corrupted, metric, k=15)
    for name in COMPONENTS:
        torch.testing.assert_close(combined[name], direct[name], **CLOSE)
    assert combined.metadata["verified"] == direct.metadata["verified"]
    assert combined.label == "RelP+verify" and combined.rules == estimate.rules
    via_atp = relp.estimate_then_verify(model, clean, corrupted, metric, COMPONENTS, estimate="atp", k=15)
    assert via_atp.label == "AtP+verify" and via_atp.metadata["estimate"]["method"] == "attribution_patching"
    with pytest.raises(ValueError, match="the estimate 'atp' takes no rules"):
        relp.estimate_then_verify(model, clean, corrupted, metric, COMPONENTS, estimate="atp", rules="relp")
    with pytest.raises(ValueError, match="other than 'verify' itself"):
        relp.estimate_then_verify(model, clean, corrupted, metric, COMPONENTS, estimate="verify")


# ----------------------------------------------------------------------------------------------
# The AP cache


def test_the_cache_returns_the_saved_result_without_patching_again(setup, tmp_path, monkeypatch):
    model, clean, corrupted, metric, full, *_ = setup
    kwargs = {"cache_dir": tmp_path, "metric_key": "LogitDiff answer/wrong ids of _prompts(seed=0)", "progress": False}
    first = relp.cached_activation_patching(model, clean, corrupted, metric, ["resid_pre", "head"], **kwargs)
    assert first.metadata["ap_cache"]["loaded"] is False
    for name in ("resid_pre", "head"):
        torch.testing.assert_close(first[name], full[name], **CLOSE)

    def refuse(*args, **kwargs):
        raise AssertionError("activation patching ran although its result is cached")

    monkeypatch.setattr(relp.patching, "activation_patching", refuse)
    second = relp.cached_activation_patching(model, clean, corrupted, metric, ["resid_pre", "head"], **kwargs)
    assert second.metadata["ap_cache"]["loaded"] is True
    for name in ("resid_pre", "head"):
        assert torch.equal(second[name], first[name]) and second[name].dtype == first[name].dtype
    for field in ("method", "metric", "direction", "rules", "seconds", "model", "layers", "tokens"):
        assert getattr(second, field) == getattr(first, field), field
    drop = lambda meta: {k: v for k, v in meta.items() if k != "ap_cache"}  # noqa: E731
    assert drop(second.metadata) == drop(first.metadata)
    assert [p.name for p in tmp_path.iterdir()] == [first.metadata["ap_cache"]["path"].rsplit("/", 1)[-1]]  # no temp file left
    with pytest.raises(AssertionError, match="ran although"):  # anything else is computed
        relp.cached_activation_patching(model, clean, corrupted, metric, ["resid_pre"], **kwargs)


def test_the_cache_key_changes_with_what_decides_the_result(setup):
    model, clean, corrupted, metric, *_ = setup

    def key(model=model, clean=clean, corrupted=corrupted, components=("resid_pre",), metric_key="m", **options):
        return ap_cache.cache_key(model, clean, corrupted, metric, list(components), metric_key=metric_key, **options)[0]

    base = key()
    assert key() == base and key(batch_size=4, progress=False) == base  # rounding-only options stay out
    other_prompt = clean.clone()
    other_prompt[0, 5] += 1
    different = [
        key(clean=other_prompt), key(corrupted=other_prompt), key(metric_key="m2"), key(components=("head",)),
        key(components=("resid_pre", "head")), key(direction="noising"), key(layers=[1]), key(logits_to_keep=1),
        key(key_extra="v2"), key(cells={"resid_pre": torch.ones(2, 7, dtype=torch.bool)}),
    ]
    assert len(set(different) | {base}) == len(different) + 1
    edited = tiny_model(model.cfg.model_name.removeprefix("tiny-"), dtype=torch.float64, n_layers=2)
    assert key(model=edited) == base  # the same weights rebuilt: the same key
    with torch.no_grad():
        next(edited.parameters()).reshape(-1)[0] += 1e-3  # the first element is always sampled
    assert key(model=edited) != base
    with pytest.raises(ValueError, match="metric_key must be a non-empty string"):
        key(metric_key="")
    with pytest.raises(TypeError, match="key_extra of type object cannot enter the AP cache key"):
        key(key_extra=object())


def test_fingerprint_samples_the_last_element_of_a_huge_parameter():
    """2**24 + 2 elements: a float32 linspace of indices rounds the last one past the end (IndexError on
    SmolLM2's 28,311,552-element embedding); the sample must include the last element exactly."""
    from relp.ap_cache import model_fingerprint

    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(2**24 + 2, dtype=torch.float16), requires_grad=False)
    before = model_fingerprint(module)
    module.weight.data[-1] = 1.0
    assert model_fingerprint(module) != before


def test_token_columns_verify_the_residual_stream_at_every_changed_token(setup):
    """With token_columns the resid_pre cells at the positions where the prompts differ (2 and 4 here,
    from the prompts alone) are verified at every layer, and every other component's layer-0 cells there,
    on top of each component's own top k."""
    model, clean, corrupted, metric, full, estimate, _ = setup
    differs = (clean != corrupted).any(dim=0)
    assert differs.nonzero().reshape(-1).tolist() == [2, 4]
    verified = relp.verify(estimate, model, clean, corrupted, metric, k=1, token_columns=True)
    masks = cell_masks(verified)
    assert masks["resid_pre"][:, differs].all()
    torch.testing.assert_close(verified["resid_pre"][:, differs], full["resid_pre"][:, differs], **CLOSE)
    # one more resid_pre cell (k=1 of the rest); the layer-0 column and one more cell of every other component
    assert int(masks["resid_pre"].sum()) == int(differs.sum()) * full["resid_pre"].shape[0] + 1
    for name in COMPONENTS:
        if name == "resid_pre":
            continue
        axis = relp.COMPONENTS[name].axes.index("position")
        column = masks[name][0].movedim(axis - 1, 0)[differs]  # layer 0, positions 2 and 4
        assert column.all(), name
        assert int(masks[name].sum()) == column.numel() + 1, name
        torch.testing.assert_close(verified[name][masks[name]], full[name][masks[name]], **CLOSE)
    preset = get_method("atp_verify")
    via_preset = preset(model, clean, corrupted, metric, COMPONENTS, k=1)
    assert via_preset.method == "atp_verify" and via_preset.metadata["estimate"]["method"] == "attribution_patching"
    assert via_preset.metadata["token_columns"] is True and cell_masks(via_preset)["resid_pre"][:, differs].all()


def test_token_columns_all_verify_every_component_at_every_layer(setup):
    model, clean, corrupted, metric, full, estimate, _ = setup
    differs = (clean != corrupted).any(dim=0)
    verified = relp.verify(estimate, model, clean, corrupted, metric, k=1, token_columns="all")
    masks = cell_masks(verified)
    for name in COMPONENTS:
        axis = relp.COMPONENTS[name].axes.index("position")
        column = masks[name].movedim(axis, 0)[differs]  # every layer, positions 2 and 4
        assert column.all(), name
        torch.testing.assert_close(verified[name][masks[name]], full[name][masks[name]], **CLOSE)
    blocks = get_method("atp_verify_blocks")(model, clean, corrupted, metric, COMPONENTS, k=1)
    assert blocks.metadata["token_columns"] == "blocks"
    for name in COMPONENTS:
        axis = relp.COMPONENTS[name].axes.index("position")
        every_layer = name in ("resid_pre", "attn_out", "mlp_out")
        column = cell_masks(blocks)[name].movedim(axis, 0)[differs]
        assert column.all() if every_layer else (column[:, 0].all() and not column[:, 1:].all()), name
    with pytest.raises(ValueError, match="token_columns must be False, True"):
        relp.verify(estimate, model, clean, corrupted, metric, token_columns="residual")
