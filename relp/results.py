"""One result type for every scoring method: scores with named axes plus what produced them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from relp.components import COMPONENTS

METHOD_LABELS = {
    "activation_patching": "AP",
    "attribution_patching": "AtP",
    "relevance_patching": "RelP",
}


@dataclass
class PatchingResult:
    """Scores per component type, each a tensor whose axes are named in ``axes``.

    ``scores["resid_pre"]`` is [layer, position], ``scores["head"]`` is [layer, head, position],
    ``scores["neuron"]`` is [layer, position, neuron]. A score is the change of the metric when that
    cell is patched (activation patching) or its first-order estimate (attribution and relevance
    patching), in the direction given by ``direction`` (see ``relp.patching``).
    """

    scores: dict[str, torch.Tensor]
    method: str
    metric: str
    direction: str
    rules: tuple[str, ...] = ()
    seconds: float = float("nan")
    model: str = ""
    layers: tuple[int, ...] = ()
    tokens: tuple[str, ...] = ()  # string tokens of the first clean prompt, for position labels
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = [c for c in self.scores if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"unknown component(s) {unknown} in scores; expected names from {sorted(COMPONENTS)}")

    @property
    def axes(self) -> dict[str, tuple[str, ...]]:
        return {name: COMPONENTS[name].axes for name in self.scores}

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.scores)

    @property
    def label(self) -> str:
        """Short method label: AP, AtP or RelP."""
        return METHOD_LABELS.get(self.method, self.method)

    def __getitem__(self, component: str) -> torch.Tensor:
        if component not in self.scores:
            raise KeyError(f"no scores for {component!r}; this result has {list(self.scores)}")
        return self.scores[component]

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{name}[{' x '.join(f'{a}={n}' for a, n in zip(self.axes[name], tensor.shape))}]"
            for name, tensor in self.scores.items()
        )
        rules = f", rules={'+'.join(self.rules)}" if self.rules else ""
        return (
            f"PatchingResult({self.label} on {self.model or 'model'}, metric={self.metric}, "
            f"direction={self.direction}{rules}, {self.seconds:.2f}s: {shapes})"
        )

    def to_dataframe(self):
        """Long table: one row per scored cell, columns component, layer, position, head, neuron, score."""
        import pandas as pd

        frames = []
        for name, tensor in self.scores.items():
            axes = self.axes[name]
            grids = np.meshgrid(*[np.arange(n) for n in tensor.shape], indexing="ij")
            frame = {axis: grid.ravel() for axis, grid in zip(axes, grids)}
            frame["layer"] = np.asarray(self.layers or range(tensor.shape[0]))[frame["layer"]]
            frame["score"] = tensor.detach().cpu().double().numpy().ravel()
            df = pd.DataFrame(frame)
            df.insert(0, "component", name)
            frames.append(df)
        df = pd.concat(frames, ignore_index=True)
        for column in ("head", "neuron"):
            if column in df:
                df[column] = df[column].astype("Int64")
        if self.tokens and "position" in df:
            labels = np.asarray(self.tokens, dtype=object)
            df["token"] = labels[df["position"].to_numpy()] if len(labels) > df["position"].max() else None
        df["method"] = self.label
        return df

    def save(self, path: str | Path) -> Path:
        """Save to one file (torch format, loadable with ``weights_only=True``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        payload["scores"] = {k: v.detach().cpu() for k, v in self.scores.items()}
        payload["metadata"] = json.dumps(self.metadata, default=str)
        payload["format"] = "relp.PatchingResult/1"
        torch.save(payload, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PatchingResult":
        payload = torch.load(Path(path), weights_only=True)
        if payload.pop("format", None) != "relp.PatchingResult/1":
            raise ValueError(f"{path} is not a saved relp PatchingResult")
        payload["metadata"] = json.loads(payload["metadata"])
        for key in ("rules", "layers", "tokens"):
            payload[key] = tuple(payload[key])
        return cls(**payload)


def pool_results(results: "list[PatchingResult]") -> PatchingResult:
    """One result from several of one method (e.g. one per layout batch), positions concatenated.

    Scores are joined along their position axis, so every cell of every batch appears once; useful
    for scatter plots and pooled statistics. Token labels are dropped (they differ between batches).
    """
    results = list(results)
    if not results:
        raise ValueError("no results to pool")
    first = results[0]
    for other in results[1:]:
        if (other.method, other.components, other.layers) != (first.method, first.components, first.layers):
            raise ValueError(
                f"cannot pool {other.label} {other.components} layers {other.layers} with "
                f"{first.label} {first.components} layers {first.layers}"
            )
    scores = {}
    for name in first.components:
        position_dim = COMPONENTS[name].axes.index("position")
        scores[name] = torch.cat([r.scores[name] for r in results], dim=position_dim)
    return dataclasses.replace(
        first,
        scores=scores,
        seconds=sum(r.seconds for r in results),
        tokens=(),
        metadata={"pooled": len(results)},
    )
