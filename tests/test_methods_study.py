"""The method study (`relp methods`) on tiny random models: the files it writes, the numbers in them
recomputed from the saved scores with scipy, the costs recomputed from the methods' own counts, and the
activation-patching cache (a second run loads AP instead of recomputing it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

import relp
from relp.experiments.methods import build_parser, run
from relp.tasks import ioi_words
from relp.tasks.contrast import contrast_words
from relp.testing import tiny_model

METHODS = ["ap", "atp", "relp"]
STUDIES = ["ioi-s2_io_flip", "contrast"]
_RUN: dict = {}


@pytest.fixture
def study(tmp_path_factory, single_thread):
    """Two runs of the study into two directories with one AP cache (the second loads AP from it)."""
    if not _RUN:
        root = tmp_path_factory.mktemp("methods")
        model = tiny_model("llama", words=ioi_words(), n_layers=2)
        encoder = tiny_model("bert", words=contrast_words(), n_layers=2)
        summaries = []
        for name in ("first", "second"):
            args = build_parser().parse_args(
                ["--studies", *STUDIES, "--methods", *METHODS, "--n-prompts", "4", "--n-pairs", "4",
                 "--ap-cache", str(root / "cache"), "--out", str(root / name), *(["--no-figures"] if name == "second" else [])]
            )
            summaries.append(run(args, model=model, encoder=encoder))
        _RUN.update(root=root, model=model, encoder=encoder, summaries=summaries)
    return _RUN


def _saved(out, method, n_batches):
    return [relp.PatchingResult.load(out / "scores" / f"{method}_batch{i}.pt") for i in range(n_batches)]


@pytest.mark.parametrize("name", STUDIES)
def test_study_writes_the_ioi_layout_with_cost(study, name):
    out = study["root"] / "first" / name
    results = json.loads((out / "results.json").read_text())
    assert set(results["agreement"]) == {"atp", "relp"}
    assert set(results["cost"]) == set(METHODS)
    components = results["components"]
    for method in ("atp", "relp"):
        for component in components:
            assert set(results["agreement"][method][component]) >= {"pearson", "spearman", "top_k"}
    for method in METHODS:
        assert set(results["cost"][method]) >= {"forward_equivalents", "seconds", "fraction_of_ap"}
    assert (out / "pareto.png").stat().st_size > 0 and "| RelP (`relp`) |" in (out / "results.md").read_text()
    top = json.loads((study["root"] / "first" / "results.json").read_text())
    assert set(top["studies"]) == set(STUDIES)


@pytest.mark.parametrize("name", STUDIES)
def test_study_numbers_are_scipy_on_the_saved_scores(study, name):
    out = study["root"] / "first" / name
    results = json.loads((out / "results.json").read_text())
    n_batches = len(list((out / "scores").glob("ap_batch*.pt")))
    ap = _saved(out, "ap", n_batches)
    for method in ("atp", "relp"):
        mine = _saved(out, method, n_batches)
        for component in results["components"]:
            a = np.concatenate([r[component].double().numpy().ravel() for r in mine])
            b = np.concatenate([r[component].double().numpy().ravel() for r in ap])
            assert np.ptp(a) > 0 and np.ptp(b) > 0
            row = results["agreement"][method][component]
            assert row["pearson"] == pytest.approx(stats.pearsonr(a, b)[0], rel=1e-12, abs=1e-12)
            assert row["spearman"] == pytest.approx(stats.spearmanr(a, b)[0], rel=1e-12, abs=1e-12)
        # AtP and RelP: 2 forward + 1 backward per batch
        assert results["cost"][method]["forward_equivalents"] == 4 * n_batches
    # AP: one forward pass over the batch per patched cell, plus the base and source runs
    patched = sum(
        sum(int((r[c] != 0).sum()) for c in results["components"]) for r in ap
    )
    fe = results["cost"]["ap"]["forward_equivalents"]
    assert patched + 2 * n_batches <= fe and fe > 2 * n_batches  # cells with an exact-zero effect still cost a pass
    assert results["cost"]["atp"]["fraction_of_ap"] == pytest.approx(4 * n_batches / fe)


@pytest.mark.parametrize("name", STUDIES)
def test_second_run_loads_activation_patching_from_the_cache(study, name):
    first, second = (study["root"] / run_name / name for run_name in ("first", "second"))
    n_batches = len(list((first / "scores").glob("ap_batch*.pt")))
    for a, b in zip(_saved(first, "ap", n_batches), _saved(second, "ap", n_batches)):
        assert not a.metadata["ap_cache"]["loaded"] and b.metadata["ap_cache"]["loaded"]
        for component in a.scores:
            assert torch.equal(a[component], b[component])
    assert not (second / "pareto.png").exists()


def test_rule_sites_split_the_preset_into_sites_that_add_up_to_it(study):
    """With --rule-sites, "all" (the preset split into its sites: each kind of norm, the Identity- and
    Half-rule) must give exactly the agreement of RelP with the preset itself, and leaving a site out must
    change the scores of at least one component."""
    out = study["root"] / "sites"
    args = build_parser().parse_args(
        ["--studies", "ioi-s2_io_flip", "--methods", "ap", "relp", "--n-prompts", "4", "--rule-sites",
         "--ap-cache", str(study["root"] / "cache"), "--out", str(out), "--no-figures"]
    )
    summary = run(args, model=study["model"])
    study_summary = summary["studies"]["ioi-s2_io_flip"]
    sites = study_summary["rule_sites"]
    assert set(sites["sites"]) == {"ln_attn", "ln_mlp", "ln_final", "identity", "half"}  # a tiny Llama
    for component, row in sites["all"].items():
        assert row["pearson"] == study_summary["agreement"]["relp"][component]["pearson"]
        assert row["spearman"] == study_summary["agreement"]["relp"][component]["spearman"]
    for site in sites["sites"]:
        without = sites[f"without {site}"]
        assert any(abs(v["delta_pearson"]) > 1e-9 for v in without.values()), site
    assert "without ln_final" in (out / "ioi-s2_io_flip" / "results.md").read_text()
