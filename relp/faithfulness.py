"""Circuit faithfulness as in MIB (Mueller et al. 2025): ablate every node outside a circuit.

Evaluation
----------
A :class:`CircuitEvaluator` runs the model on the *clean* prompts; every scored node outside the
circuit has its activation (its slice of the component's hook tensor, see :mod:`relp.circuits`)
replaced with the ablation value, and the circuit's nodes compute normally from what reaches them.
This is MIB's node-level intervention: a node outside the circuit sends its ablated output to every
later node, and the input embeddings are always kept. Ablations:

* ``corrupt``: the node's activation on the corrupted prompt of the same row (resample ablation,
  MIB's "patching"); needs ``corrupted`` of the clean prompts' shape.
* ``mean``: its mean over the reference prompts and their positions (default reference: the
  corrupted prompts).
* ``mean_positional``: its mean over the reference prompts, per position (the reference prompts must
  have the clean prompts' length).
* ``zero``: zero.

Definitions, for a metric m averaged over the prompts and a circuit C of the node space:

* m(M): the full model, every node kept (equal to the clean run);
* m(empty): every scored node ablated;
* faithfulness ``f(C) = (m(C) - m(empty)) / (m(M) - m(empty))``, not clamped;
* completeness: ``f(M \\ C)``, the model with only the circuit ablated (near 0: the circuit holds all
  of the behaviour; near 1: the rest of the model can do the task without it).

f is exactly 0 for the empty circuit and exactly 1 for the full one, for every ablation: a circuit
equal to the empty or the full node set reuses the very value that defines m(empty) or m(M). An
evaluator caches each distinct node set's value, so circuits shared across k, methods and random
seeds are evaluated once, and evaluates many circuits per forward pass by stacking copies of the
batch (one copy per circuit, like :func:`relp.activation_patching`). Several batches (e.g. one per
prompt layout) pool with :class:`PooledEvaluator`: values are means over all prompts.

Residual-stream nodes (one residual component alone) are ablated in layer order: a resid_pre node
replaces the stream entering that block at that position, which later blocks then build on.
resid_mid is ablated through attn_out (attn_out := ablated resid_mid - this run's resid_pre).

Curves and areas
----------------
:func:`faithfulness_curve` selects the top k% of nodes for k in :data:`MIB_PERCENTAGES` (``int(k/100 *
n)`` nodes, as MIB counts) and evaluates them. CPR is the area under f(k) and CMD the area under
``|1 - f(k)|``, both by trapezoids on a linear axis of k as a fraction, between the first and the last
grid point (MIB's definition: a circuit that is perfect everywhere scores CPR 0.999 and CMD 0). MIB
reports CPR for circuits ranked by signed scores (higher is better) and CMD for circuits ranked by
absolute scores (lower is better): :func:`cpr_cmd` computes both curves in one batch.
:func:`random_baseline` gives the same numbers for random node orders (mean and sample standard
deviation over seeds).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tqdm.auto import tqdm

from relp.circuits import Circuit, count_for_percent, empty_circuit, node_axes, node_order
from relp.components import component_for
from relp.interventions import Replacement, activation, cache_activations, hook_names, rows_per_pass, run_stacked
from relp.metrics import metric_name
from relp.tokens import to_tokens

ABLATIONS = ("corrupt", "mean", "mean_positional", "zero")
MIB_PERCENTAGES = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)


# ----------------------------------------------------------------------------------------------
# Areas


def area_under_curve(percentages: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under `values` over `percentages` taken as fractions (k / 100), linear axis."""
    x = np.asarray(percentages, dtype=np.float64) / 100
    y = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"need at least two points and one value per percentage; got {x.shape} and {y.shape}")
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"percentages must increase; got {list(percentages)}")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def cpr(percentages: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Circuit performance ratio: area under f(k) (MIB; higher is better)."""
    return area_under_curve(percentages, faithfulness)


def cmd(percentages: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Circuit-model distance: area under |1 - f(k)| (MIB; lower is better)."""
    return area_under_curve(percentages, np.abs(1 - np.asarray(faithfulness, dtype=np.float64)))


def check_percentages(percentages: Iterable[float]) -> tuple[float, ...]:
    values = tuple(float(p) for p in percentages)
    bad = [p for p in values if not 0 <= p <= 100 or math.isnan(p)]
    if bad:
        raise ValueError(f"k must be in [0, 100] (percent of the scored nodes); got {bad}")
    if len(values) < 2 or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"need at least two increasing percentages; got {list(values)}")
    return values


# ----------------------------------------------------------------------------------------------
# Evaluation results


@dataclass
class CircuitEvaluation:
    """m(C), m(M \\ C), m(empty) and m(M) for one circuit, with faithfulness and completeness."""

    n_nodes: int
    n_total: int
    value: float  # m(C)
    complement_value: float  # m(M \ C): only the circuit ablated
    empty: float  # m(empty)
    full: float  # m(M)

    @property
    def faithfulness(self) -> float:
        return (self.value - self.empty) / (self.full - self.empty) + 0.0

    @property
    def completeness(self) -> float:
        """f(M \\ C): near 0 when ablating the circuit removes the behaviour."""
        return (self.complement_value - self.empty) / (self.full - self.empty) + 0.0

    def to_dict(self) -> dict:
        return {
            "n_nodes": self.n_nodes, "n_total": self.n_total, "m_circuit": self.value,
            "m_complement": self.complement_value, "m_empty": self.empty, "m_full": self.full,
            "faithfulness": self.faithfulness, "completeness": self.completeness,
        }


@dataclass
class FaithfulnessCurve:
    """f at each k (percent of the scored nodes), with the metric values it came from."""

    percentages: tuple[float, ...]
    faithfulness: tuple[float, ...]
    values: tuple[float, ...]  # m(C_k)
    n_nodes: tuple[int, ...]
    empty: float
    full: float
    n_total: int
    absolute: bool
    label: str = ""

    @property
    def cpr(self) -> float:
        return cpr(self.percentages, self.faithfulness)

    @property
    def cmd(self) -> float:
        return cmd(self.percentages, self.faithfulness)

    @property
    def points(self) -> list[list[float]]:
        """[[k, f], ...]"""
        return [[k, f] for k, f in zip(self.percentages, self.faithfulness)]

    def to_dict(self) -> dict:
        return {
            "label": self.label, "absolute": self.absolute, "cpr": self.cpr, "cmd": self.cmd,
            "curve": self.points, "n_nodes": list(self.n_nodes), "n_total": self.n_total,
            "m_circuit": list(self.values), "m_empty": self.empty, "m_full": self.full,
        }

    def __repr__(self) -> str:
        label = f"{self.label}, " if self.label else ""
        return (
            f"FaithfulnessCurve({label}{'absolute' if self.absolute else 'signed'} scores, CPR {self.cpr:.3f}, "
            f"CMD {self.cmd:.3f}, f = {', '.join(f'{f:.2f}' for f in self.faithfulness)})"
        )


@dataclass
class FaithfulnessSummary:
    """MIB's pair: CPR from signed-score circuits, CMD from absolute-score circuits."""

    signed: FaithfulnessCurve
    absolute: FaithfulnessCurve
    seconds: float = float("nan")

    @property
    def cpr(self) -> float:
        return self.signed.cpr

    @property
    def cmd(self) -> float:
        return self.absolute.cmd

    def to_dict(self) -> dict:
        return {
            "cpr": self.cpr, "cmd": self.cmd, "curve": self.signed.points, "curve_absolute": self.absolute.points,
            "n_nodes": list(self.signed.n_nodes), "n_total": self.signed.n_total,
            "m_empty": self.signed.empty, "m_full": self.signed.full, "seconds": self.seconds,
        }


@dataclass
class RandomBaseline:
    """Circuits of the same sizes in random node orders: CPR and CMD mean and spread over seeds."""

    curves: list[FaithfulnessCurve]
    seeds: tuple[int, ...]
    seconds: float = float("nan")

    def _stats(self, values) -> tuple[float, float]:
        values = np.asarray(values, dtype=np.float64)
        return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0

    @property
    def cpr(self) -> tuple[float, float]:
        """(mean, sample standard deviation) over seeds."""
        return self._stats([c.cpr for c in self.curves])

    @property
    def cmd(self) -> tuple[float, float]:
        return self._stats([c.cmd for c in self.curves])

    def mean_curve(self) -> tuple[np.ndarray, np.ndarray]:
        f = np.array([c.faithfulness for c in self.curves], dtype=np.float64)
        return f.mean(0), f.std(0, ddof=1) if len(f) > 1 else np.zeros(f.shape[1])

    def to_dict(self) -> dict:
        mean, std = self.mean_curve()
        return {
            "cpr_mean": self.cpr[0], "cpr_std": self.cpr[1], "cmd_mean": self.cmd[0], "cmd_std": self.cmd[1],
            "curve": [[k, float(m)] for k, m in zip(self.curves[0].percentages, mean)],
            "curve_std": [[k, float(s)] for k, s in zip(self.curves[0].percentages, std)],
            "seeds": list(self.seeds), "per_seed": [{"cpr": c.cpr, "cmd": c.cmd} for c in self.curves],
            "seconds": self.seconds,
        }


# ----------------------------------------------------------------------------------------------
# Evaluators


class _Evaluator:
    """Shared logic: the value of a node set is computed once (see ``values``)."""

    n_prompts: int
    #: what this evaluator evaluates (relp.edges' evaluator: EdgeCircuit)
    circuit_type: type = Circuit

    def values(self, circuits: Circuit | Sequence[Circuit]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def full_value(self, circuit: Circuit) -> float:
        """m(M) for the circuit's node space."""
        return self.values([circuit.full()])[0].item()

    def empty_value(self, circuit: Circuit) -> float:
        """m(empty) for the circuit's node space."""
        return self.values([circuit.empty()])[0].item()

    def evaluate(self, circuit: Circuit) -> CircuitEvaluation:
        """m(C), m(M \\ C), m(empty), m(M) in one batch, with faithfulness and completeness."""
        if not isinstance(circuit, self.circuit_type):
            raise TypeError(
                f"expected a {self.circuit_type.__name__}; got {type(circuit).__name__} (see relp.select_circuit, "
                "relp.edges.select_edges)"
            )
        value, complement, empty, full = self.values([circuit, circuit.complement(), circuit.empty(), circuit.full()]).tolist()
        _check_span(full, empty)
        return CircuitEvaluation(circuit.n_nodes, circuit.n_total, value, complement, empty, full)


def _check_span(full: float, empty: float) -> None:
    if full == empty:
        raise ValueError(
            f"m(M) equals m(empty) ({full:.6g}): faithfulness is undefined. Does ablating the scored nodes "
            "change the metric (is the corrupted input different, the ablation effective)?"
        )


class CircuitEvaluator(_Evaluator):
    """Evaluates circuits on one batch of clean prompts (see the module docstring).

    Args:
        model: a TransformerBridge (eval mode).
        clean: the prompts the circuits run on (tokens [batch, pos] or texts).
        corrupted: the corrupted prompts, one per clean prompt (needed for ``ablation="corrupt"`` and
            the default reference of the mean ablations).
        metric: callable logits -> scalar (mean over the batch), e.g. ``relp.LogitDiff``; a metric with
            a ``readout`` (e.g. ``relp.SimilarityDifference``) reads that instead of the logits.
        ablation: "corrupt", "mean", "mean_positional" or "zero".
        reference: prompts for the mean ablations (tokens [n, pos], texts, or a list of token tensors
            of any lengths for "mean"); default: `corrupted`.
        batch_size: rows per forward pass; circuits share a pass as stacked copies of the batch (default:
            chosen from the free memory, ``relp.interventions.rows_per_pass``).
        logits_to_keep: pass only the last k positions' logits to the metric (saves the unembedding
            elsewhere; for last-token metrics such as IOI's logit difference).
    """

    def __init__(
        self,
        model,
        clean,
        corrupted=None,
        metric: Callable | None = None,
        *,
        ablation: str = "corrupt",
        reference=None,
        batch_size: int | None = None,
        logits_to_keep: int | None = None,
        progress: bool = False,
    ):
        if model.training:
            raise RuntimeError("the model is in training mode (dropout would make every value random); call model.eval() first")
        if not callable(metric):
            raise TypeError(
                f"metric must be a callable from the model's output (logits, or its readout's output) to a "
                f"scalar; got {type(metric).__name__}"
            )
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}; got {ablation!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        self.model = model
        self.metric = metric
        self.ablation = ablation
        self.batch_size = None if batch_size is None else int(batch_size)
        self.logits_to_keep = logits_to_keep
        self.progress = progress
        self.clean = to_tokens(model, clean)
        self.n_prompts, self.n_positions = self.clean.shape
        self.corrupted = None if corrupted is None else to_tokens(model, corrupted)
        if self.corrupted is not None and self.corrupted.shape != self.clean.shape:
            raise ValueError(
                f"corrupted tokens {tuple(self.corrupted.shape)} do not match the clean tokens {tuple(self.clean.shape)}; "
                "expected one position-aligned corrupted prompt per clean prompt"
            )
        if ablation == "corrupt" and self.corrupted is None:
            raise ValueError("ablation='corrupt' needs the corrupted prompts (corrupted=...)")
        self.reference = self._reference(reference)
        self._ablation_cache: dict[tuple[str, int], torch.Tensor] = {}
        self._value_cache: dict[tuple, float] = {}
        self._checked_spaces: set = set()
        self.forward_passes = 0
        self.rows = 0

    def __repr__(self) -> str:
        return (
            f"CircuitEvaluator({self.n_prompts} prompts x {self.n_positions} tokens, ablation={self.ablation}, "
            f"metric={metric_name(self.metric)}, {len(self._value_cache)} node sets evaluated)"
        )

    # --- ablation values ---
    def _reference(self, reference) -> list[torch.Tensor] | None:
        if self.ablation not in ("mean", "mean_positional"):
            return None
        if reference is None:
            if self.corrupted is None:
                raise ValueError(f"ablation={self.ablation!r} needs reference prompts (reference=...) or corrupted=...")
            return [self.corrupted]
        if isinstance(reference, (list, tuple)) and reference and isinstance(reference[0], torch.Tensor):
            parts = [to_tokens(self.model, r) for r in reference]
        else:
            parts = [to_tokens(self.model, reference)]
        if self.ablation == "mean_positional":
            bad = [tuple(p.shape) for p in parts if p.shape[1] != self.n_positions]
            if bad:
                raise ValueError(
                    f"mean_positional ablation needs reference prompts of the clean prompts' length {self.n_positions}; "
                    f"got reference token shapes {bad}"
                )
        return parts

    def _ablation_values(self, circuit: Circuit) -> None:
        """Fill the cache with the ablation value of each (component, layer) of the circuit not there yet
        (one forward pass per reference batch for all of them)."""

        todo = [
            (component_for(self.model, name), layer) for name in circuit.components for layer in circuit.layers
            if (name, layer) not in self._ablation_cache
        ]
        if not todo:
            return
        if self.ablation == "zero":
            for component, layer in todo:
                self._ablation_cache[component.name, layer] = torch.zeros((), dtype=self.model.cfg.dtype, device=self.clean.device)
            return
        names = [component.hook_name(layer) for component, layer in todo]
        names += [name for component, layer in todo for name in hook_names(component, layer)[1:]]
        if self.ablation == "corrupt":
            cache = cache_activations(self.model, self.corrupted, names)
            for component, layer in todo:
                self._ablation_cache[component.name, layer] = activation(component, layer, cache)
            return
        sums: dict[tuple[str, int], torch.Tensor] = {}
        count = 0
        for tokens in self.reference:
            cache = cache_activations(self.model, tokens, names)
            for component, layer in todo:
                value = activation(component, layer, cache).to(torch.float64)
                dims = (0, 1) if self.ablation == "mean" else (0,)
                sums[component.name, layer] = sums.get((component.name, layer), 0) + value.sum(dim=dims, keepdim=True)
            count += tokens.shape[0] * (tokens.shape[1] if self.ablation == "mean" else 1)
        for key, total in sums.items():
            self._ablation_cache[key] = (total / count).to(self.model.cfg.dtype)

    # --- checks ---
    def _check_space(self, circuit: Circuit) -> None:
        key = circuit.space_key()
        if key in self._checked_spaces:
            return
        cfg = self.model.cfg
        bad_layers = [layer for layer in circuit.layers if not 0 <= layer < cfg.n_layers]
        if bad_layers:
            raise ValueError(f"circuit layers {bad_layers} are outside the model's layers 0..{cfg.n_layers - 1}")
        if "resid_mid" in circuit.nodes and getattr(cfg, "parallel_attn_mlp", False):
            raise ValueError(f"{cfg.model_name} runs attention and MLP in parallel: there is no resid_mid")
        for component, mask in circuit.nodes.items():
            sizes = {"layer": len(circuit.layers), "position": self.n_positions, "head": cfg.n_heads, "neuron": cfg.d_mlp}
            expected = tuple(sizes[a] for a in node_axes(component, circuit.per_position))
            if tuple(mask.shape) != expected:
                raise ValueError(
                    f"{component} nodes have shape {tuple(mask.shape)}; on {self.n_prompts} prompts of "
                    f"{self.n_positions} tokens this model's {component} nodes "
                    f"({'per position' if circuit.per_position else 'summed over positions'}) have shape {expected}"
                )
        self._checked_spaces.add(key)

    # --- evaluation ---
    def values(self, circuits: Circuit | Sequence[Circuit]) -> torch.Tensor:
        """m(C) for each circuit (float64 [len(circuits)]); each distinct node set is run once, ever."""
        circuits = [circuits] if isinstance(circuits, self.circuit_type) else list(circuits)
        keys = []
        pending: dict[tuple, Circuit] = {}
        for circuit in circuits:
            if not isinstance(circuit, self.circuit_type):
                raise TypeError(f"expected {self.circuit_type.__name__}s; got {type(circuit).__name__}")
            self._check_space(circuit)
            key = (circuit.space_key(), circuit.mask_key())
            keys.append(key)
            if key not in self._value_cache and key not in pending:
                pending[key] = circuit
        if pending:
            self._run(list(pending.items()))
        return torch.tensor([self._value_cache[key] for key in keys], dtype=torch.float64)

    def _run(self, items: list[tuple[tuple, Circuit]]) -> None:
        rows = self.batch_size or rows_per_pass(self.model, self.n_positions, self.logits_to_keep)
        copies_per_pass = max(1, rows // self.n_prompts)
        groups: dict[tuple, list] = {}
        for key, circuit in items:
            groups.setdefault(key[0], []).append((key, circuit))
        chunks = [g[i : i + copies_per_pass] for g in groups.values() for i in range(0, len(g), copies_per_pass)]
        for chunk in tqdm(chunks, desc="circuit evaluation", disable=not self.progress, unit="pass"):
            circuits = [c for _, c in chunk]
            values = run_stacked(
                self.model, self.clean, len(circuits), self._replacements(circuits), self.metric,
                labels=[f"a circuit of {c.n_nodes} nodes" for c in circuits], logits_to_keep=self.logits_to_keep,
            )
            self.forward_passes += 1
            self.rows += len(circuits) * self.n_prompts
            for (key, _), value in zip(chunk, values):
                self._value_cache[key] = value.item()

    def _replacements(self, circuits: list[Circuit]) -> list[Replacement]:
        """Each circuit's ablation of the nodes outside it, one circuit per stacked copy."""
        first = circuits[0]
        self._ablation_values(first)
        replacements = []
        for name in first.components:
            component = component_for(self.model, name)
            stacked = torch.stack([c.nodes[name] for c in circuits])  # [copies, layer, ...]
            for i, layer in enumerate(first.layers):
                mask = stacked[:, i]
                if bool(mask.all()):
                    continue  # every node kept: the activation is left as it is
                keep = component.activation_mask(mask, first.per_position)
                replacements.append(Replacement(component, layer, keep, self._ablation_cache[name, layer]))
        return replacements


class PooledEvaluator(_Evaluator):
    """Several evaluators (e.g. one per prompt layout) as one: values are means over all prompts."""

    def __init__(self, evaluators: Sequence[_Evaluator]):
        self.evaluators = list(evaluators)
        if not self.evaluators:
            raise ValueError("no evaluators to pool")
        self.n_prompts = sum(e.n_prompts for e in self.evaluators)
        kinds = {e.circuit_type for e in self.evaluators}
        if len(kinds) != 1:
            raise ValueError(f"cannot pool evaluators of different circuit kinds: {sorted(k.__name__ for k in kinds)}")
        self.circuit_type = kinds.pop()

    def values(self, circuits: Circuit | Sequence[Circuit]) -> torch.Tensor:
        circuits = [circuits] if isinstance(circuits, self.circuit_type) else list(circuits)
        total = torch.zeros(len(circuits), dtype=torch.float64)
        for evaluator in self.evaluators:
            total += evaluator.n_prompts * evaluator.values(circuits)
        return total / self.n_prompts

    def __repr__(self) -> str:
        return f"PooledEvaluator({len(self.evaluators)} batches, {self.n_prompts} prompts)"


# ----------------------------------------------------------------------------------------------
# Curves


def _template(scores, components, per_position) -> Circuit:
    if isinstance(scores, Circuit) and scores.scores is None:
        raise ValueError(f"{scores!r} carries no scores to rank nodes by")
    return empty_circuit(scores, components, per_position=per_position)


def _curve_circuits(template: Circuit, order: torch.Tensor, percentages) -> tuple[list[Circuit], list[int]]:
    counts = [count_for_percent(k, template.n_total) for k in percentages]
    circuits = []
    for n in counts:
        flat = torch.zeros(template.n_total, dtype=torch.bool)
        flat[order[:n]] = True
        circuits.append(template.from_flat(flat))
    return circuits, counts


def _evaluate_curves(evaluator: _Evaluator, template: Circuit, orders: list[tuple[torch.Tensor, bool, str]], percentages) -> list[FaithfulnessCurve]:
    percentages = check_percentages(percentages)
    plans = [(_curve_circuits(template, order, percentages), absolute, label) for order, absolute, label in orders]
    everything = [template.empty(), template.full()] + [c for (circuits, _), _, _ in plans for c in circuits]
    values = evaluator.values(everything).tolist()
    empty, full = values[0], values[1]
    _check_span(full, empty)
    curves, start = [], 2
    for (circuits, counts), absolute, label in plans:
        these = values[start : start + len(circuits)]
        start += len(circuits)
        f = tuple((v - empty) / (full - empty) + 0.0 for v in these)  # + 0.0: no -0.0
        curves.append(FaithfulnessCurve(percentages, f, tuple(these), tuple(counts), empty, full, template.n_total, absolute, label))
    return curves


def faithfulness_curve(
    evaluator: _Evaluator,
    scores,
    *,
    absolute: bool = False,
    percentages: Sequence[float] = MIB_PERCENTAGES,
    components: str | Iterable[str] | None = None,
    per_position: bool = True,
    label: str = "",
) -> FaithfulnessCurve:
    """f of the top-k% circuits of `scores` (a PatchingResult, list of them, mapping or Circuit with
    scores) for each k in `percentages`, ranked by signed score or by |score|."""
    template = _template(scores, components, per_position)
    label = label or template.metadata.get("label", "")
    return _evaluate_curves(evaluator, template, [(node_order(template.scores, absolute), absolute, label)], percentages)[0]


def cpr_cmd(
    evaluator: _Evaluator,
    scores,
    *,
    percentages: Sequence[float] = MIB_PERCENTAGES,
    components: str | Iterable[str] | None = None,
    per_position: bool = True,
    label: str = "",
) -> FaithfulnessSummary:
    """MIB's CPR (signed-score circuits) and CMD (absolute-score circuits) of `scores`, in one batch."""
    start = time.perf_counter()
    template = _template(scores, components, per_position)
    label = label or template.metadata.get("label", "")
    signed, absolute = _evaluate_curves(
        evaluator, template,
        [(node_order(template.scores, False), False, label), (node_order(template.scores, True), True, label)],
        percentages,
    )
    return FaithfulnessSummary(signed, absolute, time.perf_counter() - start)


def random_baseline(
    evaluator: _Evaluator,
    like,
    *,
    seeds: int | Iterable[int] = 5,
    percentages: Sequence[float] = MIB_PERCENTAGES,
    components: str | Iterable[str] | None = None,
    per_position: bool = True,
) -> RandomBaseline:
    """Curves of random node orders (one per seed) over the node space of `like` (scores or a Circuit)."""
    start = time.perf_counter()
    seeds = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    template = empty_circuit(like, components, per_position=per_position)
    orders = [
        (torch.randperm(template.n_total, generator=torch.Generator().manual_seed(seed)), False, f"random seed {seed}")
        for seed in seeds
    ]
    curves = _evaluate_curves(evaluator, template, orders, percentages)
    return RandomBaseline(curves, seeds, time.perf_counter() - start)
