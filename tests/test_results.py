"""PatchingResult: top(k) with readable cell names, repr / HTML repr, to_dataframe, save/load round trip."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch

from relp.results import PatchingResult, cell_name, pool_results

TOKENS = ("<bos>", "Then", " Mary", " and", " John", " went", " John", " gave", " to")
LABELS = ("BOS", "other", "IO", "other", "S1", "other", "S2", "other", "END")


def make_result(method="relevance_patching", *, seed=0, layers=(0, 1, 2), tokens=TOKENS, labels=LABELS, **extra):
    g = torch.Generator().manual_seed(seed)
    n_layers, n_positions = len(layers), len(tokens) if tokens else len(TOKENS)
    scores = {
        "resid_pre": torch.randn(n_layers, n_positions, generator=g) * 0.1,
        "head": torch.randn(n_layers, 4, n_positions, generator=g) * 0.1,
        "neuron": torch.randn(n_layers, n_positions, 6, generator=g) * 0.1,
    }
    metadata = {"n_prompts": 8, "n_positions": n_positions}
    if labels is not None:
        metadata["position_labels"] = list(labels)
    kwargs = dict(
        scores=scores, method=method, metric="normalized_logit_diff", direction="denoising",
        rules=("ln", "identity", "half") if method == "relevance_patching" else (), seconds=1.25,
        model="tiny-llama", layers=tuple(layers), tokens=tuple(tokens), metadata=metadata,
    )
    kwargs.update(extra)
    return PatchingResult(**kwargs)


# ----------------------------------------------------------------------------------------------
# cell names


def test_cell_name_formats():
    assert cell_name("resid_pre", 12, 5, token=" John") == "L12 resid_pre @ 5 ' John'"
    assert cell_name("head", 12, 6, head=3, label="S2") == "L12H3 @ S2"
    assert cell_name("head", 12, 6, head=3, label="S2", token=" John") == "L12H3 @ S2 ' John'"
    assert cell_name("neuron", 3, 7, neuron=1021) == "L3N1021 @ 7"
    assert cell_name("attn_out", 0, 4, label="other", token=" went") == "L0 attn_out @ 4 ' went'"


# ----------------------------------------------------------------------------------------------
# top(k)


def test_top_ranks_all_components_by_absolute_score():
    result = make_result()
    top = result.top(7)
    assert isinstance(top, pd.DataFrame)
    assert list(top.index) == list(range(1, 8)) and top.index.name == "rank"
    assert list(top.columns) == ["name", "score", "component", "layer", "position", "head", "neuron",
                                 "position_label", "token"]
    every = np.concatenate([v.double().numpy().ravel() for v in result.scores.values()])
    expected = np.sort(np.abs(every))[::-1][:7]
    np.testing.assert_allclose(np.abs(top["score"].to_numpy()), expected)
    # every row's score is the tensor's value at the cell it names
    for _, row in top.iterrows():
        tensor = result[row["component"]]
        if row["component"] == "head":
            value = tensor[row["layer"], row["head"], row["position"]]
        elif row["component"] == "neuron":
            value = tensor[row["layer"], row["position"], row["neuron"]]
        else:
            value = tensor[row["layer"], row["position"]]
        assert row["score"] == pytest.approx(value.item())


def test_top_names_use_position_labels_and_tokens():
    result = make_result()
    result.scores["head"].zero_()
    result.scores["neuron"].zero_()
    result.scores["resid_pre"].zero_()
    result.scores["head"][2, 3, 6] = 5.0  # L2H3 at S2 (" John")
    result.scores["neuron"][1, 8, 4] = -4.0  # L1N4 at END
    result.scores["resid_pre"][0, 5] = 3.0  # an "other" position: shown by index
    result.scores["resid_pre"][2, 0] = 2.0  # BOS
    top = result.top(4)
    assert list(top["name"]) == [
        "L2H3 @ S2 ' John'", "L1N4 @ END ' to'", "L0 resid_pre @ 5 ' went'", "L2 resid_pre @ BOS '<bos>'",
    ]
    assert list(top["score"]) == [5.0, -4.0, 3.0, 2.0]
    assert top.loc[1, "head"] == 3 and pd.isna(top.loc[1, "neuron"])
    assert top.loc[2, "neuron"] == 4 and pd.isna(top.loc[2, "head"])
    assert list(top["position_label"]) == ["S2", "END", "other", "BOS"]


def test_top_without_labels_or_tokens_numbers_positions():
    result = make_result(labels=None)
    result.tokens = ()
    top = result.top(3, "head")
    assert "position_label" not in top and "token" not in top and "neuron" not in top
    assert all(name.startswith("L") and "H" in name and "'" not in name for name in top["name"])
    assert all(name.split(" @ ")[1].isdigit() for name in top["name"])


def test_top_explicit_position_labels_override_and_are_checked():
    result = make_result()
    labels = [f"p{i}" for i in range(len(TOKENS))]
    top = result.top(3, "resid_pre", position_labels=labels)
    assert all(" @ p" in name for name in top["name"])
    with pytest.raises(ValueError, match="position_labels has 2 labels"):
        result.top(3, position_labels=["a", "b"])


def test_top_sign_components_and_layers():
    result = make_result(layers=(4, 7, 9))  # scored a subset of layers: names use the real numbers
    top = result.top(5, ["resid_pre"], sign="positive")
    values = result["resid_pre"].double().numpy().ravel()
    np.testing.assert_allclose(top["score"], np.sort(values)[::-1][:5])
    assert set(top["layer"]) <= {4, 7, 9}
    assert all(name.split()[0] in {"L4", "L7", "L9"} for name in top["name"])
    bottom = result.top(5, "resid_pre", sign="negative")
    np.testing.assert_allclose(bottom["score"], np.sort(values)[:5])
    assert (bottom["score"] < 0).all()


def test_top_k_larger_than_cells_and_nan_scores():
    result = PatchingResult(
        scores={"attn_out": torch.tensor([[1.0, float("nan")], [-3.0, 0.5]])},
        method="activation_patching", metric="m", direction="noising",
    )
    top = result.top(10)
    assert list(top["score"]) == [-3.0, 1.0, 0.5]  # the NaN cell is not ranked
    assert list(top["name"]) == ["L1 attn_out @ 0", "L0 attn_out @ 0", "L1 attn_out @ 1"]
    assert list(top.columns) == ["name", "score", "component", "layer", "position"]


def test_top_ties_are_ordered_deterministically():
    result = PatchingResult(scores={"resid_pre": torch.zeros(2, 3), "mlp_out": torch.zeros(2, 3)},
                            method="activation_patching", metric="m", direction="denoising")
    top = result.top(4)
    assert list(top["name"]) == ["L0 resid_pre @ 0", "L0 resid_pre @ 1", "L0 resid_pre @ 2", "L1 resid_pre @ 0"]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_top_rejects_bad_k(bad):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        make_result().top(bad)


def test_top_rejects_bad_sign_and_unknown_component():
    result = make_result()
    with pytest.raises(ValueError, match="sign must be"):
        result.top(3, sign="largest")
    with pytest.raises(KeyError, match="mlp_out"):
        result.top(3, "mlp_out")


def test_top_on_pooled_results_numbers_positions():
    a, b = make_result(seed=1), make_result(seed=2)
    pooled = pool_results([a, b])
    top = pooled.top(3, "resid_pre")
    assert pooled["resid_pre"].shape[1] == 2 * len(TOKENS)
    assert all(name.split(" @ ")[1].isdigit() for name in top["name"])


# ----------------------------------------------------------------------------------------------
# repr


def test_repr_names_method_model_metric_shapes_and_strongest_cells():
    result = make_result()
    text = repr(result)
    lines = text.splitlines()
    assert lines[0].startswith("PatchingResult: RelP on tiny-llama")
    for part in ("metric normalized_logit_diff", "denoising", "rules ln+identity+half", "8 prompts x 9 tokens", "1.25 s"):
        assert part in lines[0]
    assert len(lines) == 1 + 3
    assert "[layer 3 x head 4 x position 9]" in text and "[layer 3 x position 9 x neuron 6]" in text
    for component, line in zip(result.components, lines[1:]):
        strongest = result.top(1, component)
        assert line.strip().startswith(component)
        assert strongest["name"].iloc[0] in line
    assert len(text) < 800  # readable at a glance, whatever the size of the scores


def test_repr_of_activation_patching_result_has_no_rules_and_handles_nan_seconds():
    result = make_result("activation_patching", seconds=float("nan"))
    text = repr(result)
    assert text.startswith("PatchingResult: AP on tiny-llama") and "rules" not in text and "nan s" not in text


def test_html_repr_is_a_table_with_escaped_tokens():
    result = make_result()
    result.scores["resid_pre"].zero_()
    result.scores["resid_pre"][1, 0] = 9.0  # strongest cell at BOS, token "<bos>"
    html = result._repr_html_()
    assert html.startswith("<div>") and "<table>" in html and html.count("<tr>") == 1 + 3
    assert "RelP on tiny-llama" in html
    assert "&lt;bos&gt;" in html and "<bos>" not in html
    assert "L1 resid_pre @ BOS" in html


def test_repr_of_empty_scores():
    result = PatchingResult(scores={}, method="activation_patching", metric="m", direction="denoising")
    assert "no scores" in repr(result)
    assert "<table>" in result._repr_html_()


# ----------------------------------------------------------------------------------------------
# to_dataframe


def test_to_dataframe_has_one_row_per_cell_with_labels():
    result = make_result(layers=(2, 5, 8))
    df = result.to_dataframe()
    assert len(df) == sum(t.numel() for t in result.scores.values())
    assert {"component", "layer", "position", "head", "neuron", "score", "token", "position_label", "method"} <= set(df)
    assert set(df["layer"]) == {2, 5, 8}
    assert (df["method"] == "RelP").all()
    heads = df[df.component == "head"]
    row = heads[(heads["layer"] == 5) & (heads["head"] == 3) & (heads["position"] == 6)].iloc[0]
    assert row["score"] == pytest.approx(result["head"][1, 3, 6].item())
    assert row["token"] == " John" and row["position_label"] == "S2"
    assert df["head"].dtype == "Int64" and df["neuron"].dtype == "Int64"
    # the strongest cell of top() is the largest |score| row of the table
    assert df["score"].abs().max() == pytest.approx(abs(result.top(1)["score"].iloc[0]))


def test_to_dataframe_without_labels():
    result = make_result(labels=None)
    assert "position_label" not in result.to_dataframe()


# ----------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip(tmp_path):
    result = make_result(layers=(1, 3, 5))
    result.metadata.update(base_metric=0.25, rules_not_applicable={"ah": "why"})
    path = result.save(tmp_path / "sub" / "rp.pt")
    loaded = PatchingResult.load(path)
    assert loaded.components == result.components
    for component in result.components:
        assert torch.equal(loaded[component], result[component])
    for field in ("method", "metric", "direction", "rules", "model", "layers", "tokens"):
        assert getattr(loaded, field) == getattr(result, field), field
    assert loaded.seconds == result.seconds
    assert loaded.metadata == result.metadata
    assert repr(loaded) == repr(result)
    pd.testing.assert_frame_equal(loaded.top(10), result.top(10))
    pd.testing.assert_frame_equal(loaded.to_dataframe(), result.to_dataframe())


def test_load_refuses_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"scores": {}}, path)
    with pytest.raises(ValueError, match="not a saved relp PatchingResult"):
        PatchingResult.load(path)


# ----------------------------------------------------------------------------------------------
# On a real (tiny) run


def test_top_and_repr_on_a_tiny_model_run():
    import relp
    from relp.testing import tiny_model

    model = tiny_model("gpt2", n_layers=2)
    clean = torch.tensor([[0, 10, 11, 12, 13, 14]])
    corrupted = clean.clone()
    corrupted[0, 2] = 20
    metric = relp.LogitDiff(torch.tensor([30]), torch.tensor([31]))
    rp = relp.relevance_patching(model, clean, corrupted, metric, ["resid_pre", "head"])
    top = rp.top(5)
    assert len(top) == 5 and top["score"].abs().is_monotonic_decreasing
    # only positions from the corrupted token on can differ; the names carry the word-level tokens
    assert all(row["position"] >= 2 for _, row in top.iterrows() if row["score"] != 0)
    assert all(f"'{row['token']}'" in row["name"] for _, row in top.iterrows())
    assert "RelP on tiny-gpt2" in repr(rp) and "1 prompt x 6 tokens" in repr(rp)
    assert 0 < rp.seconds < 600  # the wall time of the call was measured (not NaN, not a default)
