"""The similarity experiment script on a tiny random BERT: every output file is written, and its hit rates
are the ones recomputed here from the public API (the same aligned pairs, rebuilt from the same seed)."""

from __future__ import annotations

import json

import pytest
import torch

import relp
from relp.embeddings import SentenceEmbedding
from relp.experiments.similarity import build_parser, run
from relp.tasks.aligned_pairs import make_aligned_pairs
from relp.tasks.contrast import contrast_words
from relp.testing import tiny_model


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, single_thread):
    out = tmp_path_factory.mktemp("similarity")
    model = tiny_model("bert", words=contrast_words(), n_layers=2)
    args = build_parser().parse_args(
        ["--n-pairs", "40", "--n-interaction", "4", "--projection-ks", "4", "--pooling", "mean", "--out", str(out)]
    )
    return model, out, run(args, model=model)


def _word(token: str) -> bool:
    return token.isalpha()  # the tiny vocabulary: words, punctuation and <bos>


def test_files_and_hit_rates_match_the_public_api(experiment):
    model, out, summary = experiment
    assert json.loads((out / "results.json").read_text())["constructions"] == summary["constructions"]
    assert "| paraphrase | 40 |" in (out / "results.md").read_text()
    assert (out / "figures" / "similarity_heatmap.png").stat().st_size > 0
    assert (out / "figures" / "similarity_alignment.png").stat().st_size > 0
    for construction in ("paraphrase", "unrelated"):
        pairs = make_aligned_pairs(model, 40, seed=0, construction=construction)
        hits = {"relp": 0, "gradient": 0}
        for pair in pairs:
            for rules in hits:
                matrix = relp.pair_relevance(model, pair.text_a, pair.text_b, rules=rules, readout=SentenceEmbedding("mean")).matrix.clone()
                matrix[[i for i, t in enumerate(pair.tokens_a) if not _word(t)], :] = -torch.inf
                matrix[:, [j for j, t in enumerate(pair.tokens_b) if not _word(t)]] = -torch.inf
                hits[rules] += divmod(int(matrix.argmax()), matrix.shape[1]) == pair.aligned
        expected = sum(1 / (sum(map(_word, p.tokens_a)) * sum(map(_word, p.tokens_b))) for p in pairs) / len(pairs)
        reported = summary["constructions"][construction]
        assert reported["accuracy_words"]["bilrp"] == hits["relp"] / 40
        assert reported["accuracy_words"]["gradient_x_input"] == hits["gradient"] / 40
        assert reported["random_expected"] == pytest.approx(expected, rel=1e-12)


def test_interaction_and_projection_sections(experiment):
    _, _, summary = experiment
    interaction = summary["interaction"]
    assert interaction["n_pairs"] == 4
    assert interaction["max_exact_sum_error"] < 1e-9  # float64 arithmetic on float32 embeddings
    assert set(interaction["agreement"]) == {"side_a", "side_b", "interaction"}
    assert [row["k"] for row in summary["projection_error"]] == [None, 4]
    assert summary["projection_error"][1]["relative_error"] > 0


def test_bad_arguments_exit_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--constructions", "nonsense"])
    assert exit_info.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err
