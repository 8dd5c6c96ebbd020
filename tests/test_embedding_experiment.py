"""The embedding experiment script on tiny random models, for an encoder (BERT, mean pooling) and a
decoder used as an embedder (Llama, last-token pooling): every output file is written, and the numbers
in them are the ones recomputed here from the public API (the same contrast pairs, rebuilt from the same
arguments and seed; the metric built with ``SimilarityDifference.from_runs``; agreement with scipy)."""

from __future__ import annotations

import json

import pytest
import torch
from _experiment_checks import check_agreement, check_positions_csv, check_saved_scores_are_direct_calls, load_scores

from relp.embeddings import SentenceEmbedding
from relp.experiments.embedding import build_parser, run
from relp.metrics import SimilarityDifference
from relp.tasks import make_contrast_dataset
from relp.tasks.contrast import contrast_words
from relp.testing import tiny_model

COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "head")
CASES = [("bert", "mean"), ("llama", "last")]


_RUNS: dict = {}


@pytest.fixture
def embedding_run(request, tmp_path_factory, single_thread):
    """One run of the experiment per (architecture, pooling), shared by the tests below (4 pairs, seed 0)."""
    architecture, pooling = request.param
    if request.param not in _RUNS:
        out = tmp_path_factory.mktemp(f"embedding-{architecture}")
        model = tiny_model(architecture, words=contrast_words(), n_layers=2)
        args = build_parser().parse_args(
            ["--n-pairs", "4", "--pooling", pooling, "--components", *COMPONENTS, "--out", str(out)]
        )
        _RUNS[request.param] = (model, out, run(args, model=model))
    return (architecture, pooling, *_RUNS[request.param])


@pytest.mark.parametrize("embedding_run", CASES, ids=[f"{a}-{p}" for a, p in CASES], indirect=True)
def test_embedding_script_writes_every_output_file(embedding_run):
    _, pooling, _, tmp_path, summary = embedding_run
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


@pytest.mark.parametrize("embedding_run", CASES, ids=[f"{a}-{p}" for a, p in CASES], indirect=True)
def test_embedding_script_numbers_equal_a_direct_recomputation(embedding_run):
    _, pooling, model, out, summary = embedding_run
    results = json.loads((out / "results.json").read_text())
    embedding = SentenceEmbedding(pooling, normalize=True)  # --pooling without --no-normalize
    # the experiment's pairs, rebuilt from the same arguments (all kinds of change, seed 0)
    data = make_contrast_dataset(model, 4, changes="all", seed=0)
    batches = list(data.batches())
    assert len(batches) >= 2  # several layouts, so pooling over batches is exercised
    assert results["n_layout_batches"] == len(batches)
    assert results["n_prompts"] == len(data) == sum(len(b) for b in batches) == 4
    assert (results["pooling"], results["normalize"]) == (pooling, True)
    saved = load_scores(out, len(batches))

    # mean cosine similarity of the clean and of the corrupted candidates to their anchors, over all pairs,
    # written out: anchors embedded alone (texts of any length), candidates by layout batch
    clean_cos, corrupted_cos, metrics = [], [], []
    for batch in batches:
        anchors = embedding.embed(model, batch.anchor_texts)
        with torch.no_grad():
            for tokens, into in ((batch.clean_tokens, clean_cos), (batch.corrupted_tokens, corrupted_cos)):
                candidates = embedding(model, tokens)
                into.append((candidates * anchors).sum(-1) / (candidates.norm(dim=-1) * anchors.norm(dim=-1)))
        metrics.append(SimilarityDifference.from_runs(model, batch.anchor_texts, batch.clean_tokens, batch.corrupted_tokens, embedding))
    clean, corrupted = torch.cat(clean_cos), torch.cat(corrupted_cos)
    # float32 cosines of unit vectors (d = 32): rounding <= ~1e-6 between the two ways of writing them
    assert results["clean_similarity"] == pytest.approx(clean.mean().item(), rel=0, abs=1e-6)
    assert results["corrupted_similarity"] == pytest.approx(corrupted.mean().item(), rel=0, abs=1e-6)
    assert results["clean_above_corrupted_fraction"] == (clean > corrupted).float().mean().item()
    assert abs(results["clean_similarity"] - results["corrupted_similarity"]) > 1e-4

    check_saved_scores_are_direct_calls(model, batches, metrics, saved, COMPONENTS)
    check_agreement(results["agreement"], saved, COMPONENTS)
    assert summary["agreement"] == results["agreement"]
    check_positions_csv(out / "positions.csv", saved, batches, COMPONENTS)


def test_embedding_script_asks_for_a_pooling_when_the_model_has_none(tmp_path):
    model = tiny_model("llama", words=contrast_words(), n_layers=1)
    args = build_parser().parse_args(["--n-pairs", "2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="pass --pooling"):
        run(args, model=model)
