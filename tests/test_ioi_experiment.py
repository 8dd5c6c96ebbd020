"""Smoke run of the IOI experiment script on a tiny random model: every output file is written."""

from __future__ import annotations

import json

from relp.experiments.ioi import build_parser, run
from relp.tasks import ioi_words
from relp.testing import tiny_model


def test_ioi_script_writes_every_output_file(tmp_path):
    model = tiny_model("llama", words=ioi_words(), n_layers=2)
    args = build_parser().parse_args(
        ["--n-prompts", "4", "--templates", "baba", "--components", "resid_pre", "attn_out", "mlp_out", "head",
         "--out", str(tmp_path)]
    )
    summary = run(args, model=model)
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("model", "n_prompts", "corruption", "seed", "clean_logit_diff", "corrupted_logit_diff", "agreement", "timings_s", "versions"):
        assert key in results, key
    assert results["n_prompts"] == 4 and results["corruption"] == "s2_io_flip"
    assert set(results["agreement"]) == {"atp", "relp"}
    for method in ("atp", "relp"):
        for component in ("resid_pre", "attn_out", "mlp_out", "head"):
            assert set(results["agreement"][method][component]) >= {"pearson", "spearman"}
    assert set(results["timings_s"]) == {"ap", "atp", "relp"}
    assert "| model |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "positions.csv").stat().st_size > 0
    figures = {p.name for p in (tmp_path / "figures").glob("*.png")}
    for method in ("ap", "atp", "relp"):
        for component in ("resid_pre", "attn_out", "mlp_out", "head"):
            assert f"heatmap_{method}_{component}.png" in figures
    for method in ("atp", "relp"):
        for component in ("resid_pre", "attn_out", "mlp_out", "head"):
            assert f"scatter_{method}_{component}.png" in figures
    assert summary["n_prompts"] == 4
