"""The IOI experiment script on a tiny random model: every output file is written, and the numbers in
them are the ones recomputed here from the public API (the same batches, rebuilt from the same arguments
and seed; the metric built with ``NormalizedLogitDiff.from_runs``; agreement with scipy)."""

from __future__ import annotations

import json

import pytest
import torch
from _experiment_checks import check_agreement, check_positions_csv, check_saved_scores_are_direct_calls, load_scores

import relp
from relp.experiments.ioi import build_parser, run
from relp.tasks import ioi_words, make_ioi_dataset
from relp.testing import tiny_model

COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "head")


@pytest.fixture(scope="module")
def ioi_run(tmp_path_factory, single_thread):
    """One run of the experiment (4 prompts of the BABA templates, default corruption and seed)."""
    out = tmp_path_factory.mktemp("ioi")
    model = tiny_model("llama", words=ioi_words(), n_layers=2)
    args = build_parser().parse_args(
        ["--n-prompts", "4", "--templates", "baba", "--components", *COMPONENTS, "--out", str(out)]
    )
    summary = run(args, model=model)
    return model, out, summary


def test_ioi_script_writes_every_output_file(ioi_run):
    _, tmp_path, summary = ioi_run
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("model", "n_prompts", "corruption", "seed", "clean_logit_diff", "corrupted_logit_diff", "agreement", "timings_s", "versions"):
        assert key in results, key
    assert results["n_prompts"] == 4 and results["corruption"] == "s2_io_flip"
    assert set(results["agreement"]) == {"atp", "relp"}
    for method in ("atp", "relp"):
        for component in COMPONENTS:
            assert set(results["agreement"][method][component]) >= {"pearson", "spearman"}
    assert set(results["timings_s"]) == {"ap", "atp", "relp"}
    assert "| model |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "positions.csv").stat().st_size > 0
    figures = {p.name for p in (tmp_path / "figures").glob("*.png")}
    for method in ("ap", "atp", "relp"):
        for component in COMPONENTS:
            assert f"heatmap_{method}_{component}.png" in figures
    for method in ("atp", "relp"):
        for component in COMPONENTS:
            assert f"scatter_{method}_{component}.png" in figures
    assert summary["n_prompts"] == 4


def test_ioi_script_numbers_equal_a_direct_recomputation(ioi_run):
    model, out, summary = ioi_run
    results = json.loads((out / "results.json").read_text())
    # the experiment's prompts, rebuilt from the same arguments (default corruption s2_io_flip, seed 0)
    data = make_ioi_dataset(model, 4, corruption="s2_io_flip", seed=0, templates="baba")
    batches = list(data.batches())
    assert len(batches) >= 2  # several layouts, so pooling over batches is exercised
    assert results["n_layout_batches"] == len(batches)
    assert results["n_prompts"] == len(data) == sum(len(b) for b in batches) == 4
    saved = load_scores(out, len(batches))
    assert [r.metadata["n_prompts"] for r in saved["ap"]] == [len(b) for b in batches]

    # clean / corrupted logit difference: mean over all prompts of logit[IO] - logit[S] at END
    clean_lds, corrupted_lds = [], []
    for batch in batches:
        raw = relp.LogitDiff(batch.answer_tokens, batch.wrong_tokens)
        with torch.no_grad():
            clean_lds.append(raw.per_prompt(model(batch.clean_tokens)))
            corrupted_lds.append(raw.per_prompt(model(batch.corrupted_tokens)))
    clean_ld, corrupted_ld = torch.cat(clean_lds), torch.cat(corrupted_lds)
    # every batch's metric is normalised by the whole dataset's clean and corrupted LD (one scale)
    metrics = [
        relp.NormalizedLogitDiff(batch.answer_tokens, batch.wrong_tokens, clean_ld.mean().item(), corrupted_ld.mean().item())
        for batch in batches
    ]
    # float32 logits, the same batched forward passes: equal up to the float32 mean of 4 values
    assert results["clean_logit_diff"] == pytest.approx(clean_ld.mean().item(), rel=1e-6, abs=1e-9)
    assert results["corrupted_logit_diff"] == pytest.approx(corrupted_ld.mean().item(), rel=1e-6, abs=1e-9)
    assert results["clean_logit_diff_positive_fraction"] == (clean_ld > 0).float().mean().item()
    assert results["clean_logit_diff"] != results["corrupted_logit_diff"]

    # every method's saved scores are the public function on that batch with that metric (AP with the
    # experiment's documented shortcut: only the last position's logits, which is all the metric reads)
    check_saved_scores_are_direct_calls(model, batches, metrics, saved, COMPONENTS, logits_to_keep=1)
    check_agreement(results["agreement"], saved, COMPONENTS)
    assert summary["agreement"] == results["agreement"]
    check_positions_csv(out / "positions.csv", saved, batches, COMPONENTS)
