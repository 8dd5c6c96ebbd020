"""relp.plotting: panels, labels, zero-centred colours, correlations in titles, saving only on request."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats  # noqa: E402

import relp.faithfulness  # noqa: E402
from relp.faithfulness import FaithfulnessCurve, FaithfulnessSummary, RandomBaseline  # noqa: E402
from relp.plotting import (  # noqa: E402
    plot_agreement,
    plot_faithfulness,
    plot_heatmap,
    plot_scatter,
    plot_scores,
)
from relp.methods import method_color  # noqa: E402
from relp.results import PatchingResult  # noqa: E402

IOI_TOKENS = (
    "<|endoftext|>", "When", " Mary", " and", " John", " went", " to", " the", " store", ",",
    " John", " gave", " a", " drink", " to", " Mary", ".", " Then", " she", " said",
)  # fmt: skip
COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "head", "neuron")


def fake_result(method="relevance_patching", *, seed=0, like=None, noise=0.3, n_layers=4, n_positions=6,
                n_heads=3, n_neurons=5, tokens=None, model="fake-model", layers=None):
    """A PatchingResult with random scores; `like` makes a noisy, correlated copy of another result."""
    g = torch.Generator().manual_seed(seed)
    if like is None:
        scores = {c: torch.randn(n_layers, n_positions, generator=g) for c in COMPONENTS[:3]}
        scores["head"] = torch.randn(n_layers, n_heads, n_positions, generator=g)
        scores["neuron"] = torch.randn(n_layers, n_positions, n_neurons, generator=g)
        tokens = tuple(f"t{i}" for i in range(n_positions)) if tokens is None else tokens
    else:
        scores = {c: 1.2 * v + noise * torch.randn(v.shape, generator=g) for c, v in like.scores.items()}
        tokens, n_layers = like.tokens, like.scores["resid_pre"].shape[0]
    return PatchingResult(
        scores=scores, method=method, metric="logit_diff", direction="denoising", model=model,
        layers=tuple(range(n_layers)) if layers is None else layers, tokens=tokens,
    )


@pytest.fixture
def ap():
    return fake_result("activation_patching", seed=1)


@pytest.fixture
def rp(ap):
    return fake_result("relevance_patching", seed=2, like=ap)


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    """The module never goes through pyplot: no figure is left registered (nor shown)."""
    plt.close("all")
    yield
    assert plt.get_fignums() == []


def _heatmap_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def _colorbar_axes(fig):
    return [ax for ax in fig.axes if not ax.images and ax.get_visible()]


def _pearson_in_title(ax) -> float:
    match = re.search(r"\br = (-?\d+\.\d+)", ax.get_title())
    assert match, ax.get_title()
    return float(match.group(1))


# ----------------------------------------------------------------------------------------------
# Heatmaps


def test_plot_scores_one_panel_per_component(rp):
    fig = plot_scores(rp)
    assert isinstance(fig, Figure)
    panels = _heatmap_axes(fig)
    assert len(panels) == len(COMPONENTS)
    assert len(_colorbar_axes(fig)) == len(COMPONENTS)
    for ax, component in zip(panels, COMPONENTS):
        title = ax.get_title()
        assert "RelP" in title and "fake-model" in title and component in title

    fig = plot_scores(rp, ["attn_out", "head"])
    assert len(_heatmap_axes(fig)) == 2
    assert len(_heatmap_axes(plot_scores(rp, "mlp_out"))) == 1


def test_heatmap_ticks_are_tokens_and_layer_zero_is_at_the_bottom(rp):
    ax = plot_heatmap(rp, "resid_pre")
    assert isinstance(ax, matplotlib.axes.Axes)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(rp.tokens)
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(layer) for layer in rp.layers]
    bottom, top = ax.get_ylim()
    assert bottom < top and ax.get_yticks()[0] == 0  # the first row (layer 0) is the lowest
    np.testing.assert_allclose(ax.images[0].get_array(), rp["resid_pre"].numpy())
    assert ax.get_xlabel() == "position" and ax.get_ylabel() == "layer"


def test_position_labels_override_tokens(rp):
    labels = ["BOS", "IO", "S1", "x", "S2", "END"]
    fig = plot_scores(rp, ["resid_pre", "mlp_out"], position_labels=labels)
    for ax in _heatmap_axes(fig):
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
    with pytest.raises(ValueError, match="position_labels has 2 labels"):
        plot_heatmap(rp, "resid_pre", position_labels=["a", "b"])


def test_layer_ticks_use_the_scored_layers():
    result = fake_result(n_layers=3, layers=(2, 5, 7))
    ax = plot_heatmap(result, "attn_out")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["2", "5", "7"]


def test_tokens_are_shown_literally():
    tokens = ("$x$", "a\nb", "50%", "$", "_", "^")
    result = fake_result(n_positions=6, tokens=tokens)
    ax = plot_heatmap(result, "resid_pre")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["$x$", "a\\nb", "50%", "$", "_", "^"]
    ax.figure.canvas.draw()  # no mathtext parse error


def test_colour_norm_is_centred_on_zero(rp):
    for ax, component in zip(_heatmap_axes(plot_scores(rp)), COMPONENTS):
        norm = ax.images[0].norm
        assert norm.vmin == -norm.vmax
        assert norm.vmax == pytest.approx(np.abs(ax.images[0].get_array()).max())
        assert ax.images[0].get_cmap().name == "RdBu_r"
    zero = PatchingResult(scores={"resid_pre": torch.zeros(2, 3)}, method="activation_patching",
                          metric="logit_diff", direction="denoising")
    norm = plot_heatmap(zero, "resid_pre").images[0].norm
    assert norm.vmin == -norm.vmax == -1.0


def test_colour_bar_names_the_metric(rp):
    ax = plot_heatmap(rp, "attn_out")
    (bar,) = [a for a in ax.figure.axes if a is not ax]
    assert "logit_diff" in bar.get_ylabel() and "score" in bar.get_ylabel()
    assert len(plot_heatmap(rp, "attn_out", colorbar=False).figure.axes) == 1


def test_heads_sum_over_positions_or_pick_one(rp):
    ax = plot_heatmap(rp, "head")
    np.testing.assert_allclose(ax.images[0].get_array(), rp["head"].sum(-1).numpy(), rtol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    assert ax.get_xlabel() == "head" and "summed over positions" in ax.get_title()

    ax = plot_heatmap(rp, "head", head_position=-1)
    np.testing.assert_allclose(ax.images[0].get_array(), rp["head"][:, :, -1].numpy())
    assert "position 5" in ax.get_title() and "t5" in ax.get_title()
    with pytest.raises(ValueError, match="head_position=6"):
        plot_heatmap(rp, "head", head_position=6)


def test_neurons_sum_over_positions(rp):
    ax = plot_heatmap(rp, "neuron")
    np.testing.assert_allclose(ax.images[0].get_array(), rp["neuron"].sum(1).numpy(), rtol=1e-6)
    assert ax.get_xlabel() == "neuron"
    ax = plot_heatmap(rp, "neuron", neuron_position=2)
    np.testing.assert_allclose(ax.images[0].get_array(), rp["neuron"][:, 2].numpy())


def test_unknown_component_is_a_clear_error(rp):
    smaller = PatchingResult(scores={"resid_pre": rp["resid_pre"]}, method="activation_patching",
                             metric="logit_diff", direction="denoising")
    with pytest.raises(KeyError, match="no scores for 'head'"):
        plot_scores(smaller, ["resid_pre", "head"])


# ----------------------------------------------------------------------------------------------
# Scatter and agreement


def test_scatter_shows_pearson_of_the_data(rp, ap):
    for component in COMPONENTS:
        ax = plot_scatter(rp, ap, component)
        x, y = ap[component].double().numpy().ravel(), rp[component].double().numpy().ravel()
        assert _pearson_in_title(ax) == pytest.approx(stats.pearsonr(x, y)[0], abs=5e-4)
        rho = float(re.search(r"ρ = (-?\d+\.\d+)", ax.get_title()).group(1))
        assert rho == pytest.approx(stats.spearmanr(x, y)[0], abs=5e-4)
        assert component in ax.get_title()
        # every cell is a point, and the points are the data
        points = ax.collections[0].get_offsets()
        assert len(points) == x.size
        np.testing.assert_allclose(sorted(points[:, 0]), sorted(x), rtol=1e-6)
        np.testing.assert_allclose(sorted(points[:, 1]), sorted(y), rtol=1e-6)


def test_scatter_labels_line_and_layer_colours(rp, ap):
    ax = plot_scatter(rp, ap, "resid_pre")
    assert ax.get_xlabel() == "AP score" and ax.get_ylabel() == "RelP score"
    (line,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    xs, ys = line.get_data()
    np.testing.assert_allclose(xs, ys)  # y = x
    (bar,) = [a for a in ax.figure.axes if a is not ax]
    assert bar.get_ylabel() == "layer"
    points = ax.collections[0]
    assert sorted(set(points.get_array().tolist())) == [0, 1, 2, 3]


def test_scatter_shape_mismatch(ap):
    other = fake_result(n_positions=5)
    with pytest.raises(ValueError, match="shapes differ"):
        plot_scatter(other, ap, "resid_pre")


def test_plot_agreement_grid(rp, ap):
    atp = fake_result("attribution_patching", seed=3, like=ap, noise=1.0)
    fig = plot_agreement([atp, rp], ap, ["resid_pre", "head", "neuron"])
    panels = [ax for ax in fig.axes if ax.get_xlabel() == "AP score"]
    assert len(panels) == 6
    for ax, (method, component) in zip(panels, [(m, c) for m in ("AtP", "RelP") for c in ("resid_pre", "head", "neuron")]):
        assert ax.get_ylabel() == f"{method} score" and ax.get_xlabel() == "AP score"
        assert component in ax.get_title()
        x = ap[component].double().numpy().ravel()
        y = (atp if method == "AtP" else rp)[component].double().numpy().ravel()
        assert _pearson_in_title(ax) == pytest.approx(stats.pearsonr(x, y)[0], abs=5e-4)
    bars = [ax for ax in fig.axes if ax not in panels]
    assert [bar.get_ylabel() for bar in bars] == ["layer"]  # one layer colour bar for the grid

    # a single result and no components: one row, every shared component
    assert len([ax for ax in plot_agreement(rp, ap).axes if ax.get_xlabel() == "AP score"]) == len(COMPONENTS)


# ----------------------------------------------------------------------------------------------
# Drawing into given axes, saving only on request


def test_given_axes_are_drawn_into(rp, ap):
    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    assert plot_heatmap(rp, "resid_pre", ax=ax1) is ax1 and ax1.images
    assert plot_scatter(rp, ap, "head", ax=ax2) is ax2 and ax2.collections

    fig = Figure()
    grid = fig.subplots(2, 2)
    assert plot_scores(rp, ["resid_pre", "attn_out", "mlp_out", "head"], axes=grid) is fig
    assert all(ax.images for ax in grid.ravel())
    with pytest.raises(ValueError, match="need 5 axes"):
        plot_scores(rp, axes=grid)

    fig = Figure()
    grid = fig.subplots(1, 2)
    assert plot_agreement([rp], ap, ["resid_pre", "head"], axes=grid) is fig
    assert all(ax.collections for ax in grid.ravel())


def test_saves_only_when_path_is_given(rp, ap, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(a) or original(self, *a, **k))
    plot_scores(rp)
    plot_heatmap(rp, "head")
    plot_scatter(rp, ap, "resid_pre")
    plot_agreement(rp, ap)
    assert saved == [] and list(tmp_path.iterdir()) == []

    paths = [tmp_path / "new" / "dir" / name for name in ("scores.png", "heatmap.png", "scatter.png", "agreement.png")]
    plot_scores(rp, ["resid_pre", "head"], path=paths[0])
    plot_heatmap(rp, "head", path=paths[1])
    plot_scatter(rp, ap, "resid_pre", path=str(paths[2]))
    plot_agreement(rp, ap, "resid_pre", path=paths[3])
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_realistic_size_renders(tmp_path):
    """30 layers x 20 IOI positions, 9 heads: the size the visual check was made at."""
    ap = fake_result("activation_patching", n_layers=30, n_positions=20, n_heads=9, n_neurons=64,
                     tokens=IOI_TOKENS, model="SmolLM2-135M-Instruct")
    rp = fake_result("relevance_patching", seed=5, like=ap)
    fig = plot_scores(rp, ["resid_pre", "attn_out", "mlp_out", "head"], path=tmp_path / "scores.png")
    assert [t.get_text() for t in _heatmap_axes(fig)[0].get_xticklabels()] == list(IOI_TOKENS)
    assert len(_heatmap_axes(fig)[0].get_yticklabels()) == 30
    atp = fake_result("attribution_patching", seed=6, like=ap, noise=1.0)
    plot_agreement([atp, rp], ap, ["resid_pre", "head"], path=tmp_path / "agreement.png")
    assert (tmp_path / "scores.png").stat().st_size > 10_000
    assert (tmp_path / "agreement.png").stat().st_size > 10_000


def _curve(f, absolute=False, label=""):
    k = (1.0, 10.0, 100.0)
    return FaithfulnessCurve(k, tuple(f), tuple(f), (1, 10, 100), 0.0, 1.0, 100, absolute, label)


def test_plot_faithfulness_draws_both_rankings_with_method_colours(tmp_path):
    summaries = {
        "AP": FaithfulnessSummary(_curve([0.2, 0.8, 1.0]), _curve([0.3, 0.9, 1.0], True)),
        "RelP": FaithfulnessSummary(_curve([0.4, 0.9, 1.0]), _curve([0.5, 0.95, 1.0], True)),
        "mine": FaithfulnessSummary(_curve([0.1, 0.5, 1.0]), _curve([0.1, 0.6, 1.0], True)),
    }
    random = RandomBaseline([_curve([0.0, 0.1, 1.0]), _curve([0.0, 0.2, 1.0])], (0, 1))
    fig = plot_faithfulness(summaries, random, title="t")
    assert isinstance(fig, Figure) and list(tmp_path.iterdir()) == []
    signed, absolute = fig.axes
    assert signed.get_title() == "ranked by signed score (CPR)" and absolute.get_title() == "ranked by |score| (CMD)"
    lines = {line.get_label().split(" (")[0]: line for line in signed.get_lines() if line.get_marker() == "o"}
    assert list(lines) == ["AP", "RelP", "mine"]
    assert lines["AP"].get_color() == method_color("AP") == "black" and lines["RelP"].get_color() == method_color("RelP")
    assert f"CPR {summaries['AP'].cpr:.2f}" in lines["AP"].get_label()
    np.testing.assert_array_equal(lines["mine"].get_ydata(), [0.1, 0.5, 1.0])

    fig = plot_faithfulness(summaries, colors={"AP": "tab:green", "mine": "tab:purple"}, path=tmp_path / "f" / "faith.png")
    lines = {line.get_label().split(" (")[0]: line for line in fig.axes[1].get_lines() if line.get_marker() == "o"}
    assert lines["AP"].get_color() == "tab:green" and lines["mine"].get_color() == "tab:purple"
    assert lines["RelP"].get_color() == method_color("RelP")  # colors= overrides entries, the rest stay
    assert (tmp_path / "f" / "faith.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not hasattr(relp.faithfulness, "plot_faithfulness")
