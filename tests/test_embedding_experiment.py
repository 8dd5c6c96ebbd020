"""Smoke runs of the embedding experiment script on tiny random models: every output file is written,
for an encoder (BERT, mean pooling) and a decoder used as an embedder (Llama, last-token pooling)."""

from __future__ import annotations

import json

import pytest

from relp.experiments.embedding import build_parser, run
from relp.tasks.contrast import contrast_words
from relp.testing import tiny_model

COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "head")


@pytest.mark.parametrize("architecture, pooling", [("bert", "mean"), ("llama", "last")])
def test_embedding_script_writes_every_output_file(tmp_path, architecture, pooling):
    model = tiny_model(architecture, words=contrast_words(), n_layers=2)
    args = build_parser().parse_args(
        ["--n-pairs", "4", "--pooling", pooling, "--components", *COMPONENTS, "--out", str(tmp_path)]
    )
    summary = run(args, model=model)
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("model", "n_prompts", "pooling", "seed", "clean_similarity", "corrupted_similarity", "agreement",
                "timings_s", "versions"):
        assert key in results, key
    assert results["n_prompts"] == 4 and results["pooling"] == pooling
    assert set(results["agreement"]) == {"atp", "relp"}
    for method in ("atp", "relp"):
        for component in COMPONENTS:
            assert set(results["agreement"][method][component]) >= {"pearson", "spearman"}
    assert set(results["timings_s"]) == {"ap", "atp", "relp"}
    assert "| model |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "positions.csv").stat().st_size > 0
    figures = {p.name for p in (tmp_path / "figures").glob("*.png")}
    for component in COMPONENTS:
        assert {f"heatmap_{m}_{component}.png" for m in ("ap", "atp", "relp")} <= figures
        assert {f"scatter_{m}_{component}.png" for m in ("atp", "relp")} <= figures
    assert summary["n_prompts"] == 4


def test_embedding_script_asks_for_a_pooling_when_the_model_has_none(tmp_path):
    model = tiny_model("llama", words=contrast_words(), n_layers=1)
    args = build_parser().parse_args(["--n-pairs", "2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="pass --pooling"):
        run(args, model=model)
