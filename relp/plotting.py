"""Plots of patching scores (per-component heatmaps, method-vs-reference scatter grids) and of circuit
faithfulness curves.

Everything here draws with matplotlib's object API: figures are created as
:class:`matplotlib.figure.Figure` objects, never through ``pyplot``, so nothing is registered with a
GUI backend, nothing is shown and the functions work headless (Agg). A function saves its figure only
when ``path=`` is given (parent folders are created; 120 dpi, tight bounding box). In Jupyter, a
returned figure displays as the cell's value; in a script, save it with ``path=`` or
``fig.savefig(...)``. Every function also accepts existing axes (``ax=`` / ``axes=``), e.g. from
``plt.subplots``, and then draws into them.

>>> import torch, relp
>>> from relp.plotting import plot_scores, plot_agreement
>>> from relp.testing import tiny_model
>>> model = tiny_model("llama", n_layers=3)
>>> clean = torch.tensor([[0, 10, 11, 12, 13, 14, 15]]); corrupted = clean.clone(); corrupted[0, 2] = 20
>>> metric = relp.LogitDiff(torch.tensor([30]), torch.tensor([31]))
>>> ap = relp.activation_patching(model, clean, corrupted, metric, ["resid_pre", "head"], progress=False)
>>> atp = relp.attribution_patching(model, clean, corrupted, metric, ["resid_pre", "head"])
>>> fig = plot_scores(ap, path="/tmp/relp_ap.png")             # one heatmap panel per component
>>> fig = plot_agreement([atp], ap, path="/tmp/relp_agreement.png")  # rows: methods, columns: components

Edge circuits (:class:`relp.edges.EdgeCircuit`) are drawn as graphs by :func:`plot_circuit_graph`.

Heatmaps put the layer on the y axis (layer 0 at the bottom) and the position on the x axis, labelled
with the prompt's tokens (``result.tokens``, or ``position_labels=``). Heads are shown as a layer x head
map summed over positions (``head_position=`` picks one position), neurons as a layer x neuron map
summed over positions (``neuron_position=`` picks one). Colours use a diverging map centred on zero
(``vmin == -vmax``, the largest |score| of the panel), so red raises the metric and blue lowers it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch, PathPatch
from matplotlib.path import Path as MplPath
from matplotlib.ticker import MaxNLocator

from relp.methods import method_color, method_label

if TYPE_CHECKING:
    from relp.edges import EdgeCircuit
    from relp.faithfulness import FaithfulnessSummary, RandomBaseline

__all__ = [
    "plot_agreement", "plot_alignment", "plot_circuit_graph", "plot_faithfulness", "plot_heatmap", "plot_pair_relevance",
    "plot_scatter", "plot_scores",
]

DPI = 120
CMAP = "RdBu_r"
LAYER_CMAP = "viridis"
MAX_FIGURE_WIDTH = 18.0  # inches: plot_scores picks its default number of columns to stay under this


# ----------------------------------------------------------------------------------------------
# Helpers


def _save(fig: Figure, path) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


def _numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu().double().numpy()
    return np.asarray(tensor, dtype=float)


def _scores(result, component: str) -> np.ndarray:
    if component not in result.scores:
        raise KeyError(f"no scores for {component!r} in this {result.label} result; it has {list(result.scores)}")
    return _numpy(result.scores[component])


def _layer_labels(result, n_layers: int) -> list[int]:
    layers = list(result.layers)
    return layers if len(layers) == n_layers else list(range(n_layers))


def _readable(token: str) -> str:
    """Control characters would break a tick label's layout; show them escaped."""
    return token.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _position_labels(result, n_positions: int, position_labels) -> list[str]:
    if position_labels is not None:
        labels = [str(label) for label in position_labels]
        if len(labels) != n_positions:
            raise ValueError(f"position_labels has {len(labels)} labels; the scores have {n_positions} positions")
        return labels
    tokens = list(result.tokens)
    if len(tokens) == n_positions:
        return [_readable(str(t)) for t in tokens]
    return [str(i) for i in range(n_positions)]


def _check_position(position: int, n_positions: int, name: str) -> int:
    if not -n_positions <= position < n_positions:
        raise ValueError(f"{name}={position} is out of range for {n_positions} positions")
    return position % n_positions


def _new_axes(figsize) -> Axes:
    fig = Figure(figsize=figsize, layout="constrained")
    return fig.add_subplot()


def _heatmap_panel(result, component: str, position_labels, head_position, neuron_position):
    """The 2-d map [layer, x] of one component, with x tick labels (None: automatic integer ticks),
    the x axis name and a note on how positions were reduced."""
    scores = _scores(result, component)
    axes = tuple(result.axes[component])
    if axes == ("layer", "position"):
        return scores, _position_labels(result, scores.shape[1], position_labels), "position", ""
    if axes == ("layer", "head", "position"):
        n_positions = scores.shape[2]
        if head_position is None:
            return scores.sum(axis=2), [str(h) for h in range(scores.shape[1])], "head", "summed over positions"
        p = _check_position(head_position, n_positions, "head_position")
        token = _position_labels(result, n_positions, position_labels)[p]
        return scores[:, :, p], [str(h) for h in range(scores.shape[1])], "head", f"at position {p} ({token!r})"
    if axes == ("layer", "position", "neuron"):
        n_positions = scores.shape[1]
        if neuron_position is None:
            return scores.sum(axis=1), None, "neuron", "summed over positions"
        p = _check_position(neuron_position, n_positions, "neuron_position")
        token = _position_labels(result, n_positions, position_labels)[p]
        return scores[:, p, :], None, "neuron", f"at position {p} ({token!r})"
    raise ValueError(f"cannot draw a heatmap for {component!r} with axes {axes}")


def _panel_size(result, component: str) -> tuple[float, float]:
    """A readable panel size in inches: ~0.24 in per position column, ~0.14 in per layer row."""
    shape = tuple(result.scores[component].shape)
    axes = tuple(result.axes[component])
    if "neuron" in axes:
        width = 6.0
    elif "head" in axes:
        width = min(max(0.3 * shape[axes.index("head")] + 2.0, 3.5), 9.0)
    else:
        width = min(max(0.24 * shape[1] + 2.0, 4.0), 9.0)
    height = min(max(0.14 * shape[0] + 1.6, 2.8), 8.0)
    return width, height


def _title(result, component: str, note: str = "") -> str:
    model = f" · {result.model}" if result.model else ""
    title = f"{result.label}{model} · {component}"
    return f"{title}\n({note})" if note else title


def _metric_label(result) -> str:
    return f"{result.label} score (Δ {result.metric})" if result.metric else f"{result.label} score"


# ----------------------------------------------------------------------------------------------
# Heatmaps


def plot_heatmap(
    result,
    component: str,
    *,
    ax: Axes | None = None,
    position_labels: Sequence[str] | None = None,
    head_position: int | None = None,
    neuron_position: int | None = None,
    title: str | None = None,
    cmap: str = CMAP,
    colorbar: bool = True,
    path=None,
) -> Axes:
    """Draw one component's scores as a layer x position heatmap and return the Axes.

    Layer is on the y axis (the first scored layer at the bottom, labelled with ``result.layers``);
    the x axis is the position, labelled with ``result.tokens`` or ``position_labels`` (which
    overrides them, e.g. ``["BOS", "IO", "S1", ...]``). ``"head"`` is drawn as layer x head, summed over
    positions unless ``head_position`` (an index, negative counts from the end) picks one;
    ``"neuron"`` as layer x neuron, summed over positions unless ``neuron_position`` picks one.

    The colour map is diverging (``RdBu_r``) and centred on zero: ``vmin = -vmax = -max|score|``.
    ``colorbar`` adds a colour bar labelled with the method and metric. ``ax`` draws into existing
    axes (a new figure otherwise); ``path`` saves the figure holding the axes.
    """
    data, xlabels, xname, note = _heatmap_panel(result, component, position_labels, head_position, neuron_position)
    if ax is None:
        ax = _new_axes(_panel_size(result, component))
    limit = float(np.nanmax(np.abs(data))) if data.size and np.isfinite(data).any() else 0.0
    limit = limit if limit > 0 else 1.0  # an all-zero map still gets a valid, centred norm
    image = ax.imshow(
        data,
        cmap=cmap,
        norm=Normalize(vmin=-limit, vmax=limit),
        origin="lower",
        aspect="auto",
        interpolation="nearest",
    )

    n_layers, n_columns = data.shape
    layer_labels = _layer_labels(result, n_layers)
    step = max(1, math.ceil(n_layers / 32))
    ax.set_yticks(range(0, n_layers, step), [str(layer) for layer in layer_labels[::step]])
    ax.tick_params(axis="y", labelsize=8 if n_layers <= 24 else 7)
    ax.set_ylabel("layer")

    if xlabels is None:  # neurons: too many to label one by one
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.tick_params(axis="x", labelsize=8)
    elif xname == "position":
        step = max(1, math.ceil(n_columns / 40))
        ax.set_xticks(range(0, n_columns, step), xlabels[::step], parse_math=False)
        ax.tick_params(axis="x", labelsize=8 if n_columns <= 30 else 6)
        multiline = any("\n" in label for label in xlabels)
        for label in ax.get_xticklabels():
            label.set_rotation(55)
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
            if multiline:  # centre each block of lines on its tick, or the second lines drift into the next
                label.set_verticalalignment("center")
    else:
        step = max(1, math.ceil(n_columns / 32))
        ax.set_xticks(range(0, n_columns, step), xlabels[::step])
        ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel(xname)
    ax.set_title(title if title is not None else _title(result, component, note), fontsize=10, parse_math=False)

    if colorbar:
        bar = ax.figure.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
        bar.set_label(_metric_label(result), fontsize=9)
        bar.ax.tick_params(labelsize=8)
    _save(ax.figure, path)
    return ax


def plot_scores(
    result,
    components: Sequence[str] | str | None = None,
    *,
    position_labels: Sequence[str] | None = None,
    head_position: int | None = None,
    neuron_position: int | None = None,
    axes=None,
    ncols: int | None = None,
    title: str | None = None,
    path=None,
) -> Figure:
    """Heatmaps of a result, one panel per component (each drawn by :func:`plot_heatmap`).

    ``components`` defaults to every component in the result, in its order. Each panel has its own
    zero-centred colour scale and a labelled colour bar, and its title names the method, model and
    component. ``position_labels``, ``head_position`` and ``neuron_position`` are passed on to
    :func:`plot_heatmap`. ``axes`` (an array or list of at least as many Axes) draws into existing
    axes; otherwise a new figure with ``ncols`` columns is made (default: up to 3, fewer where wide
    panels would make the figure wider than 18 inches). ``title`` is the figure's title (default:
    method, model, metric and direction). Returns the Figure; saves it only if ``path`` is given.
    """
    if components is None:
        components = list(result.scores)
    elif isinstance(components, str):
        components = [components]
    else:
        components = list(components)
    if not components:
        raise ValueError(f"no components to plot; this result has {list(result.scores)}")
    for component in components:
        _scores(result, component)  # a clear error before anything is drawn

    if axes is None:
        sizes = [_panel_size(result, c) for c in components]
        width = max(w for w, _ in sizes)
        height = max(h for _, h in sizes)
        ncols = min(len(components), ncols or max(1, min(3, int(MAX_FIGURE_WIDTH // width))))
        nrows = math.ceil(len(components) / ncols)
        fig = Figure(figsize=(width * ncols, height * nrows + 0.4), layout="constrained")
        grid = fig.subplots(nrows, ncols, squeeze=False)
        flat = list(grid.ravel())
        for extra in flat[len(components):]:
            extra.set_visible(False)
    else:
        flat = list(np.ravel(np.asarray(axes, dtype=object)))
        if len(flat) < len(components):
            raise ValueError(f"{len(components)} components need {len(components)} axes; got {len(flat)}")
        fig = flat[0].figure
    for ax, component in zip(flat, components):
        plot_heatmap(
            result,
            component,
            ax=ax,
            position_labels=position_labels,
            head_position=head_position,
            neuron_position=neuron_position,
        )
    if title is None and axes is None:
        model = f" on {result.model}" if result.model else ""
        title = f"{result.label} scores{model} — metric {result.metric}, {result.direction}"
    if title:
        fig.suptitle(title, fontsize=12)
    _save(fig, path)
    return fig


# ----------------------------------------------------------------------------------------------
# Agreement scatter plots


def _correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    return float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0])


def _layer_per_cell(result, component: str, shape: tuple[int, ...]) -> np.ndarray:
    layers = np.asarray(_layer_labels(result, shape[0]), dtype=float)
    return np.broadcast_to(layers.reshape((-1,) + (1,) * (len(shape) - 1)), shape).ravel()


def _layer_norm(results) -> Normalize:
    layers = [layer for r in results for c in r.scores for layer in _layer_labels(r, r.scores[c].shape[0])]
    low, high = (min(layers), max(layers)) if layers else (0, 1)
    return Normalize(vmin=low, vmax=high if high > low else low + 1)


def _method_names(result, reference) -> tuple[str, str]:
    y, x = result.label, reference.label
    if x == y:  # e.g. two RelP variants: tell them apart by their rules
        y = f"{y} ({'+'.join(result.rules)})" if result.rules else y
        x = f"{x} ({'+'.join(reference.rules)})" if reference.rules else f"{x} (reference)"
        if x == y:
            x = f"{reference.label} (reference)"
    return y, x


def plot_scatter(
    result,
    reference,
    component: str,
    *,
    ax: Axes | None = None,
    colorbar: bool = True,
    layer_norm: Normalize | None = None,
    title: str | None = None,
    path=None,
) -> Axes:
    """Scatter ``result``'s score (y) against ``reference``'s (x, usually AP) for every cell of a component.

    Points are coloured by layer (colour bar labelled "layer" when ``colorbar``); a dashed line marks
    y = x, and the title gives Pearson r and Spearman rho over all cells (as in
    :func:`relp.agreement`). Axis labels name the methods ("AP score", "RelP score"). ``layer_norm``
    fixes the layer colour scale (so that panels share it). ``ax`` draws into existing axes; ``path``
    saves the figure holding them. Returns the Axes.
    """
    y_scores, x_scores = _scores(result, component), _scores(reference, component)
    if y_scores.shape != x_scores.shape:
        raise ValueError(f"{component}: score shapes differ, {y_scores.shape} ({result.label}) vs "
                         f"{x_scores.shape} ({reference.label})")
    x, y = x_scores.ravel(), y_scores.ravel()
    layer = _layer_per_cell(result, component, y_scores.shape)
    if ax is None:
        ax = _new_axes((4.6, 3.8))
    # largest cells last, so that the cells that matter are drawn on top (and layers interleave)
    order = np.argsort(np.nan_to_num(np.abs(x) + np.abs(y)), kind="stable")
    x, y, layer = x[order], y[order], layer[order]

    size = 16 if x.size <= 2_000 else 6 if x.size <= 50_000 else 2
    points = ax.scatter(
        x, y, c=layer, cmap=LAYER_CMAP, norm=layer_norm or _layer_norm([result]),
        s=size, alpha=0.8, linewidths=0, rasterized=x.size > 5_000,
    )
    finite = np.isfinite(x) & np.isfinite(y)
    if finite.any():
        low = float(min(x[finite].min(), y[finite].min()))
        high = float(max(x[finite].max(), y[finite].max()))
        pad = 0.05 * (high - low) if high > low else 1.0
        ax.plot([low - pad, high + pad], [low - pad, high + pad], ls="--", lw=1, color="0.4", zorder=0, label="y = x")
    ax.axhline(0, color="0.85", lw=0.8, zorder=-1)
    ax.axvline(0, color="0.85", lw=0.8, zorder=-1)

    y_name, x_name = _method_names(result, reference)
    ax.set_xlabel(f"{x_name} score")
    ax.set_ylabel(f"{y_name} score")
    for axis in (ax.xaxis, ax.yaxis):  # few ticks, and an offset factor (x1e-4) rather than long decimals
        axis.set_major_locator(MaxNLocator(nbins=5))
    ax.ticklabel_format(axis="both", style="sci", scilimits=(-2, 3), useMathText=True)
    ax.tick_params(labelsize=8)
    pearson, spearman = _correlations(x[finite], y[finite])
    ax.set_title(
        title if title is not None else f"{y_name} vs {x_name} · {component}\nr = {pearson:.3f}, ρ = {spearman:.3f}",
        fontsize=10,
    )
    if colorbar:
        bar = ax.figure.colorbar(points, ax=ax, fraction=0.05, pad=0.02)
        bar.set_label("layer", fontsize=9)
        bar.ax.tick_params(labelsize=8)
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    _save(ax.figure, path)
    return ax


def plot_agreement(
    results,
    reference,
    components: Sequence[str] | str | None = None,
    *,
    axes=None,
    title: str | None = None,
    path=None,
) -> Figure:
    """A grid of :func:`plot_scatter` panels: one row per result in ``results``, one column per component.

    ``results`` is a list of results (e.g. ``[atp, relp]``; a single result is accepted) and
    ``reference`` the result on the x axis (usually activation patching). ``components`` defaults to
    the components that every result and the reference share. One colour bar for the layer serves the
    whole grid. ``axes`` (a [rows, columns] array of Axes) draws into existing axes. Returns the
    Figure; saves it only if ``path`` is given.
    """
    if not isinstance(results, (list, tuple)):
        results = [results]
    if not results:
        raise ValueError("no results to compare")
    if components is None:
        components = [c for c in results[0].scores if c in reference.scores and all(c in r.scores for r in results)]
        if not components:
            raise ValueError(f"no component shared by all results and the reference {list(reference.scores)}")
    elif isinstance(components, str):
        components = [components]
    components = list(components)
    for r in [*results, reference]:
        for component in components:
            _scores(r, component)

    nrows, ncols = len(results), len(components)
    if axes is None:
        fig = Figure(figsize=(3.9 * ncols + 0.8, 3.5 * nrows + 0.5), layout="constrained")
        grid = fig.subplots(nrows, ncols, squeeze=False)
    else:
        grid = np.asarray(axes, dtype=object).reshape(nrows, ncols) if np.size(axes) == nrows * ncols else None
        if grid is None:
            raise ValueError(f"{nrows} results x {ncols} components need {nrows * ncols} axes; got {np.size(axes)}")
        fig = grid[0, 0].figure
    norm = _layer_norm([*results, reference])
    for row, result in zip(grid, results):
        for ax, component in zip(row, components):
            plot_scatter(result, reference, component, ax=ax, colorbar=False, layer_norm=norm)
    mappable = grid[0, 0].collections[0]
    bar = fig.colorbar(mappable, ax=list(grid.ravel()), fraction=0.03, pad=0.01, aspect=40)
    bar.set_label("layer")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    if title is None and axes is None:
        model = f" on {reference.model}" if reference.model else ""
        title = f"Agreement with {reference.label}{model} — metric {reference.metric}, one point per cell"
    if title:
        fig.suptitle(title, fontsize=12)
    _save(fig, path)
    return fig


# ----------------------------------------------------------------------------------------------
# Faithfulness curves


def plot_faithfulness(
    summaries: Mapping[str, FaithfulnessSummary],
    random: RandomBaseline | None = None,
    *,
    title: str = "",
    axes=None,
    path=None,
    colors: Mapping[str, str] | None = None,
    unit: str = "nodes",
) -> Figure:
    """f(k) per method: signed-score circuits (CPR) on the left, absolute-score circuits (CMD) on the
    right, the random baseline's mean +- standard deviation as a grey band. `unit` names what k counts
    (``"nodes"``, ``"edges"``). Log k axis (the MIB grid
    is roughly log-spaced); CPR and CMD are areas on the linear axis.

    ``summaries`` maps a method label to its :class:`~relp.faithfulness.FaithfulnessSummary` (from
    :func:`~relp.faithfulness.cpr_cmd`), ``random`` is a :func:`~relp.faithfulness.random_baseline`.
    Lines are coloured by the method registry's colour of each label (:mod:`relp.methods`); ``colors``
    (label -> colour) overrides it, and a label in neither gets matplotlib's next colour. ``axes`` (two Axes) draws into
    existing axes. Returns the Figure; saves it only if ``path`` is given.
    """
    if axes is None:
        fig = Figure(figsize=(11, 4.2))
        axes = fig.subplots(1, 2, sharey=True)
    else:
        fig = axes[0].figure
    colors = dict(colors or {})
    for ax, which in zip(axes, ("signed", "absolute")):
        if random is not None:
            mean, std = random.mean_curve()
            k = random.curves[0].percentages
            ax.fill_between(k, mean - std, mean + std, color="0.8", label="random (mean ± std)")
            ax.plot(k, mean, color="0.5", lw=1)
        for label, summary in summaries.items():
            curve = getattr(summary, which)
            area = f"CPR {summary.cpr:.2f}" if which == "signed" else f"CMD {summary.cmd:.2f}"
            ax.plot(curve.percentages, curve.faithfulness, marker="o", ms=3, color=colors.get(label, method_color(label)), label=f"{label} ({area})")
        ax.axhline(1, color="0.3", lw=0.8, ls="--")
        ax.axhline(0, color="0.3", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel(f"circuit size k (% of scored {unit})")
        ax.set_title("ranked by signed score (CPR)" if which == "signed" else "ranked by |score| (CMD)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("faithfulness f(k)")
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return fig


# ----------------------------------------------------------------------------------------------
# Method study: agreement against cost


def plot_pareto(study: Mapping, *, statistics: Sequence[str] = ("pearson", "spearman"), title: str = "", path=None) -> Figure:
    """Agreement with activation patching (mean over components) against cost, one point per method.

    ``study`` is one study of ``relp methods`` (``agreement[method][component][statistic]`` and
    ``cost[method]["forward_equivalents"]``). One panel per statistic, cost on a log axis; the methods
    on the Pareto front (no other method both cheaper and better) are joined by a line. Activation
    patching is drawn at agreement 1 as the reference. Returns the Figure; saves it only if ``path`` is given.
    """
    fig = Figure(figsize=(5.2 * len(statistics), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(statistics)))
    costs = {k: v["forward_equivalents"] for k, v in study["cost"].items() if v.get("forward_equivalents")}
    for ax, statistic in zip(axes, statistics):
        points = {}
        for key, by_component in study["agreement"].items():
            values = [v[statistic] for v in by_component.values() if np.isfinite(v[statistic])]
            if key in costs and values:
                points[key] = (costs[key], float(np.mean(values)))
        reference = [k for k in costs if k not in study["agreement"]]
        for key in reference:
            points[key] = (costs[key], 1.0)
        shared: dict[tuple[float, float], list[str]] = {}  # methods with the same cost and agreement share a label
        for key, (x, y) in points.items():
            ax.scatter([x], [y], color=method_color(key) or "0.3", s=36, zorder=3)
            shared.setdefault((round(x, 6), round(y, 4)), []).append(method_label(key))
        for (x, y), labels in shared.items():
            ax.annotate(" = ".join(labels), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front, best = [], -np.inf
        for key, (x, y) in sorted(points.items(), key=lambda item: (item[1][0], -item[1][1])):
            if y > best:
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.plot(*zip(*front), color="0.5", lw=1, ls="--", zorder=2, label="Pareto front")
            ax.legend(fontsize=8, loc="best")
        ax.set_xscale("log")
        ax.set_xlabel("cost (forward-pass equivalents)")
        ax.set_ylabel(f"mean {statistic} with activation patching")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return fig


# ----------------------------------------------------------------------------------------------
# Edge circuits as graphs

# RdBu_r without its white middle: an edge near zero must still show on a white background.
EDGE_CMAP = ListedColormap(
    np.concatenate([matplotlib.colormaps[CMAP](np.linspace(0.0, 0.36, 128)),
                    matplotlib.colormaps[CMAP](np.linspace(0.64, 1.0, 128))]),
    name="RdBu_r_edges",
)
EDGE_STYLE = {"q": "-", "k": "--", "v": ":", "mlp": "-", "logits": "-"}
_BOX_W, _BOX_H = 0.78, 0.3  # data units: a head column is 1 wide, a layer row 1 high
_QKV_X = {"q": -0.26, "k": 0.0, "v": 0.26}  # where q, k and v enter a head's box
_MLP_DY = 0.5  # a layer's MLP sits half a row below its heads (it reads them)
_GAP = 0.45  # extra height where layers without drawn nodes are collapsed
_NODE_COLOR = {"head": "#e6eef8", "mlp": "#f7ead8", "io": "#e4e4e4"}


def _circuit_edges(circuit, max_edges):
    """(sender, receiver) index pairs to draw, their scores (None without scores) and the number in the circuit."""
    mask = circuit.summed_edges().numpy()
    scores = None
    if circuit.scores is not None:
        values = _numpy(circuit.scores)
        # per position: an edge's score summed over the positions where it is in the circuit
        scores = (values * circuit.edges.numpy()).sum(0) if circuit.per_position else values
    pairs = np.argwhere(mask)  # C order: the graph's edge order
    n_circuit = len(pairs)
    if max_edges is not None:
        if isinstance(max_edges, bool) or not isinstance(max_edges, (int, np.integer)) or max_edges < 0:
            raise ValueError(f"max_edges must be a non-negative integer or None; got {max_edges!r}")
        if n_circuit > max_edges:
            if scores is None:  # nothing ranks them: the first edges in graph order
                keep = np.arange(max_edges)
            else:
                strength = np.abs(scores[pairs[:, 0], pairs[:, 1]])
                keep = np.sort(np.argsort(-strength, kind="stable")[:max_edges])
            pairs = pairs[keep]
    edge_scores = None if scores is None else scores[pairs[:, 0], pairs[:, 1]]
    return pairs, edge_scores, n_circuit


def plot_circuit_graph(
    circuit: EdgeCircuit,
    *,
    ax: Axes | None = None,
    max_edges: int | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    show_all_nodes: bool = False,
    path=None,
) -> Figure:
    """Draw an edge circuit (:class:`relp.edges.EdgeCircuit`) as a graph and return the Figure.

    Layers run top to bottom: ``input`` at the top, then per layer a row of head boxes (``a{l}.h{h}``,
    one column per head index, so heads line up across layers) with the layer's MLP (``m{l}``) to the
    right of them and half a row lower (it reads the heads), ``logits`` at the bottom. Every edge is one
    line (a :class:`matplotlib.patches.PathPatch` whose ``gid`` is the edge's name) leaving its sender's
    box at the bottom and entering its receiver's box at the top; a head's query, key and value inputs
    are entered on the left, in the middle and on the right of its box and drawn solid, dashed and
    dotted (legend below the graph). On grouped-query attention a key/value edge enters the first query
    head of its group (the group shares that input). Edges that pass other rows are drawn as curves
    bending away from the middle, under the boxes, so that they do not run through boxes.

    Line width grows with |score| and the colour is the score on a diverging map centred on zero
    (``RdBu_r`` without its white middle, ``vmin = -vmax = -max|score|`` of the drawn edges; colour bar on
    the right); the strongest edges are drawn last, on top. A circuit without scores is drawn with
    uniform width and colour and no colour bar. Per-position circuits are drawn summed over positions
    (an edge's score is summed over the positions where it is in the circuit).

    ``max_edges`` keeps the ``max_edges`` in-circuit edges of largest |score| (without scores: the first
    in graph order). Only nodes on drawn edges are drawn, and layers without any are collapsed into a
    gap marked "L3–L7" at the left, unless ``show_all_nodes`` (every node of every layer). An empty
    circuit (or ``max_edges=0``) is not an error: the figure shows ``input`` and ``logits`` (every node
    with ``show_all_nodes``) and says "empty circuit: no edges to draw". ``ax`` draws into existing axes
    (no new figure; ``figsize`` is then ignored); ``path`` saves the figure.

    >>> from relp.edges import edge_attribution, select_edges
    >>> scores = edge_attribution(model, clean, corrupted, metric, method="relp")
    >>> fig = plot_circuit_graph(select_edges(scores, count=60, absolute=True), max_edges=40, path="/tmp/circuit.png")
    """
    from relp.edges.circuits import EdgeCircuit  # relp.edges pulls in the model code; plotting stays light

    if not isinstance(circuit, EdgeCircuit):
        raise TypeError(f"plot_circuit_graph draws a relp.edges.EdgeCircuit; got {type(circuit).__name__}")
    graph = circuit.graph
    pairs, edge_scores, n_circuit = _circuit_edges(circuit, max_edges)
    n_heads, group = graph.n_heads, graph.n_heads // graph.n_kv_heads
    receivers = graph.receivers

    def receiver_node(j: int) -> str:
        r = receivers[j]
        if r.kind == "q":
            return f"a{r.layer}.h{r.head}"
        if r.kind in "kv":
            return f"a{r.layer}.h{r.head * group}"
        return r.name

    def layer_of(node: str) -> int | None:
        if node in ("input", "logits"):
            return None
        return int(node[1:].split(".")[0])

    if show_all_nodes:
        nodes = [*graph.senders, "logits"]
    else:
        used = {"input", "logits"}
        used |= {graph.senders[s] for s in pairs[:, 0]} | {receiver_node(j) for j in pairs[:, 1]}
        nodes = [n for n in (*graph.senders, "logits") if n in used]
    layers = sorted({layer_of(n) for n in nodes} - {None})

    # --- positions (data units): heads at x = head index, the MLP right of them, rows downwards ---
    mlp_x = n_heads - 1 + 1.25
    centre_x = mlp_x / 2
    row_y: dict[int, float] = {}
    gaps: list[tuple[float, int, int]] = []  # (y, first, last) of collapsed layers
    y, previous = 0.0, -1
    for layer in layers:
        y -= 1.0
        if layer > previous + 1:
            gaps.append((y - _GAP / 2 + 0.5, previous + 1, layer - 1))
            y -= _GAP
        row_y[layer] = y
        previous = layer
    if previous < graph.n_layers - 1 and layers:
        gaps.append((y - _MLP_DY - 0.45, previous + 1, graph.n_layers - 1))
        y -= _GAP
    logits_y = y - 1.0 - (_MLP_DY if layers else 0.0)

    def centre(node: str) -> tuple[float, float]:
        if node == "input":
            return centre_x, 0.0
        if node == "logits":
            return centre_x, logits_y
        if node.startswith("m"):
            return mlp_x, row_y[int(node[1:])] - _MLP_DY
        layer, head = node[1:].split(".h")
        return float(head), row_y[int(layer)]

    # --- figure ---
    height_units = -logits_y + 1.0
    if ax is None:
        if figsize is None:
            figsize = (min(max(5.5, 0.82 * (mlp_x + 2.0) + 2.4), MAX_FIGURE_WIDTH),
                       min(max(3.2, 0.62 * height_units + 1.6), 40.0))
        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    fontsize = 7 if n_heads <= 8 else 6
    max_width = 3.6 if len(pairs) <= 60 else 2.6

    # --- edges: weakest first, so the strongest lie on top ---
    if edge_scores is not None and len(pairs):
        limit = float(np.max(np.abs(edge_scores)))
        limit = limit if limit > 0 else 1.0
        norm = Normalize(vmin=-limit, vmax=limit)
        order = np.argsort(np.abs(edge_scores), kind="stable")
    else:
        norm, limit, order = None, 1.0, np.arange(len(pairs))
    for rank, i in enumerate(order):
        s, j = int(pairs[i, 0]), int(pairs[i, 1])
        sender, receiver = graph.senders[s], receivers[j]
        x0, y0 = centre(sender)
        start = (x0, y0 - _BOX_H / 2)
        x1, y1 = centre(receiver_node(j))
        if receiver.kind in "qkv":
            x1 += _QKV_X[receiver.kind]
        else:  # MLPs and logits are entered near the side the edge comes from, so edges fan in
            x1 += float(np.clip(0.08 * (x0 - x1), -0.3, 0.3))
        end = (x1, y1 + _BOX_H / 2)
        if start[1] - end[1] > 1.0 - _BOX_H + 1e-6:  # passes other rows: a curve bending away from the middle
            rows = (start[1] - end[1]) / 1.0
            mid_x = (start[0] + end[0]) / 2
            side = -1.0 if mid_x < centre_x or (mid_x == centre_x and s % 2) else 1.0
            bulge = side * min(0.35 + 0.1 * rows, 0.95)
            control = (mid_x + bulge, (start[1] + end[1]) / 2)
            edge_path = MplPath([start, control, end], [MplPath.MOVETO, MplPath.CURVE3, MplPath.CURVE3])
        else:
            edge_path = MplPath([start, end], [MplPath.MOVETO, MplPath.LINETO])
        if norm is None:
            color, width, alpha = "0.35", 1.2, 0.85
        else:  # weak edges thin and faint, so that the strong ones stand out in large circuits
            strength = abs(float(edge_scores[i])) / limit
            color, width, alpha = EDGE_CMAP(norm(edge_scores[i])), 0.4 + max_width * strength, 0.35 + 0.6 * strength
        patch = PathPatch(edge_path, facecolor="none", edgecolor=color, linewidth=width,
                          linestyle=EDGE_STYLE[receiver.kind], alpha=alpha, zorder=1 + rank / max(1, len(pairs)),
                          capstyle="round")
        patch.set_gid(f"{sender}->{receiver.name}")
        ax.add_patch(patch)

    # --- nodes: boxes above the edges, labelled with their MIB names ---
    for node in nodes:
        x, y = centre(node)
        kind = "io" if node in ("input", "logits") else "mlp" if node.startswith("m") else "head"
        width = _BOX_W if kind != "io" else 1.4
        ax.add_patch(FancyBboxPatch((x - width / 2, y - _BOX_H / 2), width, _BOX_H, boxstyle="round,pad=0,rounding_size=0.06",
                                    facecolor=_NODE_COLOR[kind], edgecolor="0.3", linewidth=0.8, zorder=3))
        ax.text(x, y, node, ha="center", va="center", fontsize=fontsize, zorder=4, gid=f"node:{node}")
    for layer, y in row_y.items():
        ax.text(-1.25, y - _MLP_DY / 2, f"L{layer}", ha="right", va="center", fontsize=fontsize + 1, color="0.4")
    for y, first, last in gaps:
        span = f"L{first}" if first == last else f"L{first}–L{last}"
        ax.text(-1.25, y, f"⋮ {span}", ha="right", va="center", fontsize=fontsize, color="0.55", style="italic")
    if not len(pairs):
        ax.text(centre_x, (logits_y) / 2, "empty circuit: no edges to draw", ha="center", va="center",
                fontsize=10, color="0.35", zorder=5)

    ax.set_xlim(-2.1, mlp_x + 0.8)
    ax.set_ylim(logits_y - 0.5, 0.5)
    ax.set_axis_off()

    # --- legend (receiver kinds), colour bar, title ---
    kinds = sorted({receivers[int(j)].kind for j in pairs[:, 1]}, key=list(EDGE_STYLE).index)
    if kinds:
        names = {"q": "query (box left)", "k": "key (box middle)", "v": "value (box right)", "mlp": "MLP input",
                 "logits": "logits"}
        handles = [Line2D([], [], color="0.3", linestyle=EDGE_STYLE[k], linewidth=1.4, label=names[k]) for k in kinds]
        note = (f"\n(grouped heads: key/value head g is drawn into query head {group}·g)"
                if group > 1 and {"k", "v"} & set(kinds) else "")
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), fontsize=7,
                  frameon=False, title=f"edges into{note}", title_fontsize=7, handlelength=2.6)
    label = circuit.metadata.get("label") or circuit.metadata.get("method") or ""
    metric = circuit.metadata.get("metric") or ""
    if norm is not None:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=EDGE_CMAP), ax=ax, fraction=0.04, pad=0.01, shrink=0.6)
        bar.set_label(f"{label} edge score".strip() + (f" (Δ {metric})" if metric else ""), fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title is None:
        model = graph.model_name or circuit.metadata.get("model") or ""
        head = " ".join(part for part in (label, "edge circuit", f"· {model}" if model else "") if part)
        shown = f"{len(pairs)} of {n_circuit} edges (the strongest |score|)" if len(pairs) < n_circuit else f"{n_circuit} edges"
        notes = [shown, f"{len(nodes) - 2} nodes"]
        if circuit.per_position:
            notes.append("summed over positions")
        if norm is None and len(pairs):
            notes.append("no scores")
        title = f"{head}\n{', '.join(notes)}"
    if title:
        ax.set_title(title, fontsize=10, parse_math=False)
    _save(fig, path)
    return fig


# Similarity explanations (relp.similarity): token x token relevance


def _pair_data(result) -> tuple[np.ndarray, list[str], list[str]]:
    matrix = getattr(result, "matrix", None)
    if matrix is None or np.ndim(_numpy(matrix)) != 2:
        raise TypeError(f"expected a relp.PairRelevance (a result with a 2-D .matrix); got {type(result).__name__}")
    data = _numpy(matrix)
    tokens_a = [_readable(str(t)) for t in result.tokens_a]
    tokens_b = [_readable(str(t)) for t in result.tokens_b]
    if data.shape != (len(tokens_a), len(tokens_b)):
        raise ValueError(f"the matrix has shape {data.shape}; the tokens are {len(tokens_a)} x {len(tokens_b)}")
    return data, tokens_a, tokens_b


def plot_pair_relevance(
    result, *, ax: Axes | None = None, title: str | None = None, cmap: str = CMAP, colorbar: bool = True, path=None
) -> Axes:
    """Token x token heat map of a :class:`relp.PairRelevance`: text A's tokens on the y axis (top to
    bottom), text B's on the x axis, colours diverging and centred on zero (red pairs raise the
    similarity). Returns the Axes; ``path`` saves the figure."""
    data, tokens_a, tokens_b = _pair_data(result)
    if ax is None:
        ax = _new_axes((max(4.0, 0.38 * len(tokens_b) + 2.0), max(3.0, 0.32 * len(tokens_a) + 1.5)))
    limit = float(np.nanmax(np.abs(data))) if data.size and np.isfinite(data).any() else 0.0
    limit = limit if limit > 0 else 1.0
    image = ax.imshow(data, cmap=cmap, norm=Normalize(vmin=-limit, vmax=limit), aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(tokens_a)), tokens_a, fontsize=8)
    ax.set_xticks(range(len(tokens_b)), tokens_b, fontsize=8, rotation=55, ha="right", rotation_mode="anchor")
    ax.set_ylabel("text A")
    ax.set_xlabel("text B")
    if title is None:
        rules = "+".join(result.rules) or "gradient"
        title = f"pair relevance ({rules}): {result.similarity_kind} {result.similarity:.3f}, sum {data.sum():.3f}"
    ax.set_title(title, fontsize=10, parse_math=False)
    if colorbar:
        bar = ax.figure.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
        bar.set_label("relevance of the pair", fontsize=9)
        bar.ax.tick_params(labelsize=8)
    _save(ax.figure, path)
    return ax


def plot_alignment(
    result,
    *,
    k: int = 8,
    exclude: Sequence[str] = (),
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = CMAP,
    path=None,
) -> Axes:
    """Two rows of tokens (A on top, B below) joined by arcs for the `k` pairs of largest |relevance|
    (tokens in `exclude`, e.g. ``("[CLS]", "[SEP]")``, left out); an arc's width and colour show its
    relevance (red raises the similarity, blue lowers it; widths relative to the strongest pair).
    Returns the Axes; ``path`` saves the figure."""
    from matplotlib import colormaps
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath

    data, tokens_a, tokens_b = _pair_data(result)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer (how many pairs to draw); got {k!r}")
    pairs = result.top_pairs(k, absolute=True, exclude=tuple(exclude))
    n = max(len(tokens_a), len(tokens_b))
    if ax is None:
        ax = _new_axes((max(5.0, 0.75 * n), 3.0))
    xs_a = np.linspace(0, n - 1, len(tokens_a)) if len(tokens_a) > 1 else np.array([(n - 1) / 2])
    xs_b = np.linspace(0, n - 1, len(tokens_b)) if len(tokens_b) > 1 else np.array([(n - 1) / 2])
    for x, token in zip(xs_a, tokens_a):
        ax.text(x, 1.0, token, ha="center", va="bottom", fontsize=9, rotation=30, rotation_mode="anchor")
    for x, token in zip(xs_b, tokens_b):
        ax.text(x, 0.0, token, ha="center", va="top", fontsize=9, rotation=30, rotation_mode="anchor")
    strongest = max((abs(p[4]) for p in pairs), default=1.0) or 1.0
    colours = colormaps[cmap]
    for i, j, _, _, value in pairs:
        start, end = (xs_a[i], 0.95), (xs_b[j], 0.05)
        arc = MplPath([start, (start[0], 0.5), (end[0], 0.5), end], [MplPath.MOVETO, MplPath.CURVE4, MplPath.CURVE4, MplPath.CURVE4])
        colour = colours(0.5 + 0.5 * value / strongest)
        ax.add_patch(PathPatch(arc, facecolor="none", edgecolor=colour, linewidth=0.5 + 5.5 * abs(value) / strongest, alpha=0.85))
    ax.set_xlim(-0.8, n - 0.2)
    ax.set_ylim(-0.45, 1.45)
    ax.axis("off")
    if title is None:
        title = f"strongest {len(pairs)} token pairs (A top, B bottom); {result.similarity_kind} {result.similarity:.3f}"
    ax.set_title(title, fontsize=10, parse_math=False)
    _save(ax.figure, path)
    return ax
