"""Checks shared by the experiment tests: what an experiment wrote equals what is recomputed here from
the public API, scipy and the saved scores (not a test module: pytest does not collect it)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import relp

METHODS = {"ap": relp.activation_patching, "atp": relp.attribution_patching, "relp": relp.relevance_patching}


def load_scores(out: Path, n_batches: int) -> dict[str, list]:
    """{method: [PatchingResult per layout batch]} from ``out/scores/<method>_batch<i>.pt``; exactly those files."""
    files = sorted(p.name for p in (out / "scores").iterdir())
    expected = sorted(f"{m}_batch{i}.pt" for m in METHODS for i in range(n_batches))
    assert files == expected, f"scores/ holds {files}; expected one file per method and layout batch: {expected}"
    return {m: [relp.PatchingResult.load(out / "scores" / f"{m}_batch{i}.pt") for i in range(n_batches)] for m in METHODS}


def check_saved_scores_are_direct_calls(model, batches, metrics, saved, components, *, logits_to_keep=None) -> None:
    """Each saved score map is exactly (bit for bit: same inputs, same options, deterministic CPU
    arithmetic) what the public function returns for that batch and metric. A difference, even a
    rounding-sized one, means the experiment scored something else than batch i under that metric.
    `logits_to_keep` is what the experiment passes every method (IOI's metric reads the last token)."""
    for i, (batch, metric) in enumerate(zip(batches, metrics)):
        for method, function in METHODS.items():
            kwargs = {"progress": False} if method == "ap" else {}
            if logits_to_keep is not None:
                kwargs["logits_to_keep"] = logits_to_keep
            direct = function(model, batch.clean_tokens, batch.corrupted_tokens, metric, components, **kwargs)
            result = saved[method][i]
            assert result.components == tuple(components), (method, i, result.components)
            assert result.metadata["n_prompts"] == len(batch), (method, i)
            assert result.tokens == direct.tokens, (method, i)
            for component in components:
                torch.testing.assert_close(
                    result[component], direct[component], rtol=0, atol=0,
                    msg=lambda m, c=component, method=method, i=i: (
                        f"scores/{method}_batch{i}.pt [{c}] is not relp.{METHODS[method].__name__} on layout batch "
                        f"{i} with the experiment's metric: {m}"
                    ),
                )
            # not vacuous: the maps hold real effects, not only zeros
            assert all(result[c].abs().max() > 1e-3 for c in components), (method, i)


def _pooled(results, component) -> np.ndarray:
    """The cells of all batches in one array, as relp.agreement pools them (batch by batch, row-major)."""
    return np.concatenate([r[component].double().numpy().ravel() for r in results])


def check_agreement(agreement: dict, saved: dict, components, top_k: int = 10) -> None:
    """results.json's agreement statistics equal scipy on the saved scores, pooled over the batches."""
    assert set(agreement) == {"atp", "relp"}
    for method in ("atp", "relp"):
        for component in components:
            row = agreement[method][component]
            a, b = _pooled(saved[method], component), _pooled(saved["ap"], component)
            where = f"agreement[{method}][{component}]"
            assert row["n_cells"] == a.size == b.size, where
            assert np.ptp(a) > 0 and np.ptp(b) > 0, f"{where}: constant scores, the statistics are undefined"
            # Same float64 data, scipy on both sides: only summation order can differ (1e-15 relative).
            assert row["pearson"] == pytest.approx(stats.pearsonr(a, b)[0], rel=1e-12, abs=1e-12), where
            assert row["spearman"] == pytest.approx(stats.spearmanr(a, b)[0], rel=1e-12, abs=1e-12), where
            keep = np.ones(b.size, dtype=bool)
            keep[np.argmax(np.abs(b))] = False
            assert np.sort(np.abs(b))[-1] > np.sort(np.abs(b))[-2], f"{where}: the largest |AP| cell is tied"
            assert row["pearson_without_max"] == pytest.approx(stats.pearsonr(a[keep], b[keep])[0], rel=1e-12, abs=1e-12), where
            # top-k overlap, well defined only without a tie at the k-th largest |score|
            for values in (a, b):
                ranked = np.sort(np.abs(values))[::-1]
                assert ranked[top_k - 1] > ranked[top_k], f"{where}: tie at the {top_k}th largest |score|"
            top_a = set(np.argsort(-np.abs(a))[:top_k])
            top_b = set(np.argsort(-np.abs(b))[:top_k])
            assert row[f"top{top_k}_overlap"] == len(top_a & top_b) / top_k, where


def check_positions_csv(path: Path, saved: dict, batches, components) -> None:
    """positions.csv holds, per method, component, layer (and head) and position label, the mean score
    over every (prompt, position) cell of that label in every batch; recomputed here from the saved
    scores and each batch's named positions (BOS = position 0; a named position counts for each of its
    names; every other position is "other")."""
    table = pd.read_csv(path)
    for method, results in saved.items():
        for component in components:
            sums: dict[tuple, float] = {}
            counts: dict[tuple, int] = {}
            for result, batch in zip(results, batches):
                named: dict[int, list[str]] = {}  # a position may carry several names (CHANGED and OBJECT)
                for name, index in batch.examples[0].positions.items():
                    named.setdefault(index, []).append(name)
                assert all(example.positions == batch.examples[0].positions for example in batch.examples)
                scores = result[component].double()
                if component == "head":  # [layer, head, pos]
                    cells = {(layer, head): scores[layer, head] for layer in range(scores.shape[0]) for head in range(scores.shape[1])}
                else:  # [layer, pos]
                    cells = {(layer,): scores[layer] for layer in range(scores.shape[0])}
                for key, by_position in cells.items():
                    for position, value in enumerate(by_position.tolist()):
                        for label in ["BOS"] if position == 0 else named.get(position, ["other"]):
                            sums[(*key, label)] = sums.get((*key, label), 0.0) + len(batch) * value
                            counts[(*key, label)] = counts.get((*key, label), 0) + len(batch)
            rows = table[(table["method"] == method) & (table["component"] == component)]
            assert len(rows) == len(sums), f"positions.csv has {len(rows)} rows for {method} {component}; expected {len(sums)}"
            for _, row in rows.iterrows():
                key = (int(row["layer"]), int(row["head"])) if component == "head" else (int(row["layer"]),)
                expected = sums[(*key, row["position"])] / counts[(*key, row["position"])]
                # float32 scores summed over <= 40 cells: relative rounding <= 40 * 6e-8 = 2.4e-6
                assert row["score"] == pytest.approx(expected, rel=1e-5, abs=1e-6), (method, component, *key, row["position"])
            assert not math.isclose(rows["score"].abs().max(), 0.0), f"positions.csv: all-zero {method} {component}"
