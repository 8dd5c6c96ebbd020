"""The IOI and faithfulness experiments at ``--level edges`` on a tiny random model: the files are written,
and their numbers equal a recomputation from the public API (the same batches rebuilt from the same
arguments and seed; pooled edge scores, exact edge patching of the verified edges, agreement with scipy,
CPR/CMD with a fresh evaluator)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

import relp
from relp.edges import EdgeCircuitEvaluator, edge_cpr_cmd, edge_patching, pool_edge_scores, score_edges
from relp.faithfulness import PooledEvaluator
from relp.metrics import LogitDiff
from relp.tasks import ioi_words, make_ioi_dataset
from relp.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", words=ioi_words(), n_layers=2)


def test_ioi_edges_writes_agreement_on_exact_edge_patching(model, tmp_path, single_thread):
    from relp.experiments.ioi import build_parser, run

    args = build_parser().parse_args([
        "--level", "edges", "--n-prompts", "4", "--methods", "ap", "atp", "relp", "atp_verify", "--k", "0.1",
        "--verify-edges", "24", "--edge-count", "12", "--out", str(tmp_path),
    ])
    summary = run(args, model=model)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["level"] == "edges" and set(results["methods"]) == {"atp", "relp", "atp_verify"}
    for method in ("atp", "relp", "atp_verify"):
        assert (tmp_path / f"circuit_{method}.png").stat().st_size > 0
        circuit = relp.from_mib_json(tmp_path / "circuits" / f"{method}.json", level="edges")
        assert 0 < circuit.n_edges <= 12
    assert "| AtP |" in (tmp_path / "results.md").read_text()

    # recompute: the experiment's batches and metrics, the pooled scores, the exact values, the statistics
    from relp.experiments.ioi import ioi_metrics

    batches = list(make_ioi_dataset(model, 4, corruption="s2_io_flip", seed=0, templates="baba").batches())
    metrics, _, _ = ioi_metrics(model, batches)
    pooled = {
        method: pool_edge_scores([
            score_edges(model, b.clean_tokens, b.corrupted_tokens, m, method, k=0.1, logits_to_keep=1) for b, m in zip(batches, metrics)
        ])
        for method in ("atp", "relp", "atp_verify")
    }
    graph = pooled["atp"].graph
    names = results["verification"]["edges"]
    assert len(names) == 24
    mask = torch.zeros(graph.allowed.shape, dtype=torch.bool)
    for name in names:
        mask[graph.edge_index(name)] = True
    exact = [edge_patching(model, b.clean_tokens, b.corrupted_tokens, m, edges=mask, logits_to_keep=1) for b, m in zip(batches, metrics)]
    weights = [len(b) for b in batches]
    exact_values = np.array([
        sum(w * e.scores[graph.edge_index(n)].item() for w, e in zip(weights, exact)) / sum(weights) for n in names
    ])
    np.testing.assert_allclose(results["verification"]["exact"], exact_values, rtol=1e-6, atol=1e-9)
    for method, scores in pooled.items():
        estimate = np.array([scores.summed()[graph.edge_index(n)].item() for n in names])
        entry = results["methods"][method]
        assert entry["pearson"] == pytest.approx(stats.pearsonr(estimate, exact_values)[0], abs=1e-6)
        assert entry["spearman"] == pytest.approx(stats.spearmanr(estimate, exact_values)[0], abs=1e-6)
        assert entry["x_node_relp"] > 0
    assert summary["n_edges"] == graph.n_edges


def test_faithfulness_edges_writes_cpr_cmd_equal_to_a_recomputation(model, tmp_path, single_thread):
    from relp.experiments.faithfulness import _split_prompts, build_parser, main

    argv = ["--level", "edges", "--n-prompts", "2", "--n-eval", "3", "--methods", "atp", "relp", "--seeds", "2",
            "--ablation", "mean", "--out", str(tmp_path)]
    args = build_parser().parse_args(argv)
    from relp.experiments.faithfulness import run

    run(args, model=model)
    table = json.loads((tmp_path / "faithfulness.json").read_text())
    assert set(table) == {"atp", "relp", "random"}
    run_info = json.loads((tmp_path / "run.json").read_text())
    assert run_info["level"] == "edges" and run_info["n_nodes"] == relp.EdgeGraph.from_model(model).n_edges
    args.summed = True
    scoring, evaluation, _ = _split_prompts(model, args)
    evaluators = [
        EdgeCircuitEvaluator(model, b.clean_tokens, b.corrupted_tokens, LogitDiff(b.answer_tokens, b.wrong_tokens), ablation="mean", logits_to_keep=1)
        for b in evaluation
    ]
    evaluator = evaluators[0] if len(evaluators) == 1 else PooledEvaluator(evaluators)
    for method in ("atp", "relp"):
        pooled = pool_edge_scores([
            score_edges(model, b.clean_tokens, b.corrupted_tokens, LogitDiff(b.answer_tokens, b.wrong_tokens), method, logits_to_keep=1)
            for b in scoring
        ])
        summary = edge_cpr_cmd(evaluator, pooled)
        # float32 model: the experiment stacks other circuits into each pass (rounding ~1e-7 of the metric)
        assert table[method]["cpr"] == pytest.approx(summary.cpr, abs=2e-6)
        assert table[method]["cmd"] == pytest.approx(summary.cmd, abs=2e-6)
        circuit = relp.from_mib_json(tmp_path / "circuits" / f"{method}.json", level="edges")
        assert circuit.n_edges == int(0.05 * circuit.n_total)
    assert (tmp_path / "faithfulness.png").stat().st_size > 0


def test_edge_level_arguments_are_checked_before_loading(capsys):
    from relp.experiments.faithfulness import main as faithfulness_main
    from relp.experiments.ioi import main as ioi_main

    with pytest.raises(SystemExit) as exit_info:
        ioi_main(["--level", "edges", "--methods", "ap", "ig", "--out", "/tmp/unused-relp"])
    assert exit_info.value.code == 2 and "no edge version of ['ig']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        faithfulness_main(["--level", "edges", "--k", "0", "--out", "/tmp/unused-relp"])
    assert "--k must be" in capsys.readouterr().err
