"""One result type for every scoring method: scores with named axes plus what produced them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from relp.components import COMPONENTS
from relp.methods import method_label


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
        """Short method label from the method registry (AP, AtP, RelP, ...)."""
        return method_label(self.method)

    def __getitem__(self, component: str) -> torch.Tensor:
        if component not in self.scores:
            raise KeyError(f"no scores for {component!r}; this result has {list(self.scores)}")
        return self.scores[component]

    # --- display -------------------------------------------------------------------------------

    def _summary_line(self) -> str:
        parts = [f"metric {self.metric}", self.direction]
        if self.rules:
            parts.append(f"rules {'+'.join(self.rules)}")
        n_prompts, n_positions = self.metadata.get("n_prompts"), self.metadata.get("n_positions")
        if n_prompts is not None and n_positions is not None:
            parts.append(f"{n_prompts} prompt{'s' if n_prompts != 1 else ''} x {n_positions} tokens")
        if self.metadata.get("pooled"):
            parts.append(f"{self.metadata['pooled']} batches pooled")
        if not math.isnan(self.seconds):
            parts.append(f"{self.seconds:.2f} s")
        return ", ".join(parts)

    def _component_rows(self) -> list[dict]:
        """Per component: its shape, score range and strongest cell (for repr and HTML)."""
        rows = []
        for name, tensor in self.scores.items():
            shape = " x ".join(f"{axis} {n}" for axis, n in zip(self.axes[name], tensor.shape))
            row = {"component": name, "shape": shape, "min": float("nan"), "max": float("nan"), "top": None}
            if tensor.numel():
                values = tensor.detach().cpu().double()
                finite = values[torch.isfinite(values)]
                if finite.numel():
                    row["min"], row["max"] = finite.min().item(), finite.max().item()
                best = self.top(1, name)
                if len(best):
                    row["top"] = (best["name"].iloc[0], float(best["score"].iloc[0]))
            rows.append(row)
        return rows

    def __repr__(self) -> str:
        head = f"PatchingResult: {self.label} on {self.model or 'a model'} ({self._summary_line()})"
        rows = self._component_rows()
        if not rows:
            return head + "\n  (no scores)"
        width_name = max(len(r["component"]) for r in rows)
        width_shape = max(len(r["shape"]) for r in rows)
        lines = [head]
        for r in rows:
            top = f"strongest {r['top'][0]} = {r['top'][1]:+.4g}" if r["top"] else "no finite scores"
            lines.append(f"  {r['component']:<{width_name}}  [{r['shape']}]{' ' * (width_shape - len(r['shape']))}  {top}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        rows = []
        for r in self._component_rows():
            name, score = (r["top"] if r["top"] else ("", float("nan")))
            rows.append(
                "<tr>" + "".join(
                    f"<td style='text-align:left'>{html.escape(str(cell))}</td>"
                    for cell in (r["component"], r["shape"], f"{r['min']:.4g}", f"{r['max']:.4g}", name, f"{score:+.4g}")
                ) + "</tr>"
            )
        header = "".join(f"<th style='text-align:left'>{h}</th>" for h in
                         ("component", "scores", "min", "max", "strongest cell", "score"))
        title = html.escape(f"{self.label} on {self.model or 'a model'}")
        return (
            f"<div><b>PatchingResult</b>: {title} <span style='color:gray'>({html.escape(self._summary_line())})</span>"
            f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            "<span style='color:gray;font-size:smaller'><code>.top(k)</code>: strongest cells; "
            "<code>.to_dataframe()</code>: every cell; <code>result[component]</code>: score tensor</span></div>"
        )

    # --- cells and tables --------------------------------------------------------------------------

    def position_labels(self, n_positions: int | None = None) -> tuple[str, ...] | None:
        """Named positions (IOI: BOS, IO, S1, S2, END, "other"), from ``metadata["position_labels"]``.

        None when the result carries none (or, given ``n_positions``, when their number differs).
        """
        labels = self.metadata.get("position_labels")
        if not labels:
            return None
        labels = tuple(str(label) for label in labels)
        return labels if n_positions is None or len(labels) == n_positions else None

    def _layer_numbers(self, n_layers: int) -> np.ndarray:
        return np.asarray(self.layers if len(self.layers) == n_layers else range(n_layers))

    def top(
        self,
        k: int = 10,
        components: str | list[str] | tuple[str, ...] | None = None,
        *,
        sign: str = "abs",
        position_labels=None,
    ):
        """The `k` strongest cells as a DataFrame, strongest first, each with a readable name.

        ``sign="abs"`` (default) ranks by |score|, ``"positive"`` by score (the cells that raise the
        metric most), ``"negative"`` by -score. ``components`` restricts the ranking to some
        components (default: all; their scores are all in the metric's units). Names read
        ``L12 resid_pre @ 5 ' John'``, ``L12H3 @ S2 ' John'`` (head 3 of layer 12 at the position named
        S2) and ``L3N1021 @ END ' to'`` (neuron 1021 of layer 3); positions are named when labels are
        known (``position_labels=``, else ``metadata["position_labels"]`` as the IOI experiment
        records), else numbered, followed by the token when ``tokens`` are known. Columns: ``name``,
        ``score``, ``component``, ``layer``, ``position``, ``head``/``neuron`` (when such components are
        ranked), ``position_label`` and ``token`` (when known). NaN scores are never ranked.
        """
        import pandas as pd

        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer; got {k!r}")
        if sign not in ("abs", "positive", "negative"):
            raise ValueError(f"sign must be 'abs', 'positive' or 'negative'; got {sign!r}")
        if components is None:
            names = list(self.scores)
        else:
            names = [components] if isinstance(components, str) else list(components)
            for name in names:
                self[name]  # KeyError naming the available components
        candidates = []  # (key, order, component, flat index) for each component's best k cells
        for order, name in enumerate(names):
            values = self.scores[name].detach().cpu().double().numpy().ravel()
            key = {"abs": np.abs(values), "positive": values, "negative": -values}[sign]
            valid = np.flatnonzero(~np.isnan(values))
            best = valid[np.argsort(-key[valid], kind="stable")[:k]]
            candidates += [(key[i], order, name, int(i)) for i in best]
        candidates.sort(key=lambda c: (-c[0], c[1], c[3]))
        rows = []
        for _, _, name, flat in candidates[:k]:
            tensor = self.scores[name]
            index = np.unravel_index(flat, tuple(tensor.shape))
            cell = dict(zip(self.axes[name], (int(i) for i in index)))
            n_positions = tensor.shape[self.axes[name].index("position")]
            labels = self._labels_for(n_positions, position_labels)
            tokens = self.tokens if len(self.tokens) == n_positions else None
            position = cell["position"]
            row = {
                "name": "",
                "score": float(tensor.reshape(-1)[flat]),
                "component": name,
                "layer": int(self._layer_numbers(tensor.shape[0])[cell["layer"]]),
                "position": position,
            }
            if "head" in cell:
                row["head"] = cell["head"]
            if "neuron" in cell:
                row["neuron"] = cell["neuron"]
            if labels is not None:
                row["position_label"] = labels[position]
            if tokens is not None:
                row["token"] = tokens[position]
            row["name"] = cell_name(
                name, row["layer"], position, head=row.get("head"), neuron=row.get("neuron"),
                label=row.get("position_label"), token=row.get("token"),
            )
            rows.append(row)
        columns = ["name", "score", "component", "layer", "position"]
        columns += [c for c in ("head", "neuron", "position_label", "token") if any(c in r for r in rows)]
        frame = pd.DataFrame(rows, columns=columns)
        for column in ("head", "neuron"):
            if column in frame:
                frame[column] = frame[column].astype("Int64")
        frame.index = pd.RangeIndex(1, len(frame) + 1, name="rank")
        return frame

    def _labels_for(self, n_positions: int, position_labels) -> tuple[str, ...] | None:
        if position_labels is not None:
            labels = tuple(str(label) for label in position_labels)
            if len(labels) != n_positions:
                raise ValueError(f"position_labels has {len(labels)} labels; the scores have {n_positions} positions")
            return labels
        return self.position_labels(n_positions)

    def to_dataframe(self):
        """Long table: one row per scored cell, columns component, layer, position, head, neuron, score,
        plus token (when ``tokens`` are known), position_label (when position labels are) and method.
        For the strongest cells with readable names, see :meth:`top`."""
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
        named = self.position_labels()
        if named and "position" in df and len(named) > df["position"].max():
            df["position_label"] = np.asarray(named, dtype=object)[df["position"].to_numpy()]
        df["method"] = self.label
        return df

    def save(self, path: str | Path) -> Path:
        """Save to one file (torch format, loadable with ``weights_only=True``; see :data:`RESULT_FORMAT`).

        The file records a format version and a sha256 checksum of its contents, which :meth:`load`
        checks. Metadata is stored as JSON: None, bool, int, float, str, lists, tuples (they come back as
        tuples) and dicts with str keys; numpy scalars are stored as Python numbers. Anything else
        (tensors, arrays, objects, non-str dict keys) is refused here with a TypeError naming the entry,
        rather than coming back as a string.
        """
        path = Path(path)
        payload = {
            "method": str(self.method), "metric": str(self.metric), "direction": str(self.direction),
            "rules": tuple(str(r) for r in self.rules), "seconds": float(self.seconds), "model": str(self.model),
            "layers": tuple(int(layer) for layer in self.layers), "tokens": tuple(str(t) for t in self.tokens),
            "metadata": json.dumps(_encode_metadata(self.metadata, "metadata"), allow_nan=True),
            "scores": {k: v.detach().cpu().contiguous() for k, v in self.scores.items()},
            "format": RESULT_FORMAT,
        }
        payload["checksum"] = _checksum(payload)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PatchingResult":
        """A result saved by :meth:`save`; :class:`ResultFileError` for any file that is not one, is
        damaged (checksum mismatch) or was cut short. Files of the first format
        (``relp.PatchingResult/1``, saved before the checksum was added) load without a check."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved PatchingResult at {path}")
        try:
            payload = torch.load(path, weights_only=True)
        except Exception as error:
            raise ResultFileError(
                f"{path} is not a saved relp PatchingResult, or is damaged: it cannot be read as a torch file "
                f"({type(error).__name__}: {str(error)[:200]})"
            ) from error
        if not isinstance(payload, dict):
            raise ResultFileError(
                f"{path} is not a saved relp PatchingResult: it holds a {type(payload).__name__}, expected the "
                f"dict written by PatchingResult.save (format {RESULT_FORMAT!r})"
            )
        found = payload.pop("format", None)
        if found not in (RESULT_FORMAT, _FORMAT_1):
            raise ResultFileError(
                f"{path} is not a saved relp PatchingResult: format {found!r:.80}, expected {RESULT_FORMAT!r} "
                f"(or the older {_FORMAT_1!r})"
            )
        expected = set(_FIELDS) | ({"checksum"} if found == RESULT_FORMAT else set())
        if set(payload) != expected:
            raise ResultFileError(
                f"{path} is damaged: its fields are {sorted(payload)}, expected {sorted(expected)}"
            )
        try:
            if found == RESULT_FORMAT:
                recorded = payload.pop("checksum")
                if recorded != _checksum({**payload, "format": found}):
                    raise ResultFileError(
                        f"{path} is damaged: its contents do not match the sha256 checksum recorded when it was "
                        "saved"
                    )
                metadata = json.loads(payload["metadata"], object_hook=_decode_object)
            else:
                metadata = json.loads(payload["metadata"])
            if not isinstance(metadata, dict):
                raise ValueError(f"metadata is a {type(metadata).__name__}, expected a dict")
            payload["metadata"] = metadata
            for key in ("rules", "layers", "tokens"):
                payload[key] = tuple(payload[key])
            if not isinstance(payload["scores"], dict) or not all(
                isinstance(v, torch.Tensor) for v in payload["scores"].values()
            ):
                raise ValueError("scores are not a dict of tensors")
            return cls(**payload)
        except ResultFileError:
            raise
        except Exception as error:
            raise ResultFileError(
                f"{path} is damaged: {type(error).__name__}: {str(error)[:200]}"
            ) from error


#: The format :meth:`PatchingResult.save` writes (a checksum was added in version 2).
RESULT_FORMAT = "relp.PatchingResult/2"
_FORMAT_1 = "relp.PatchingResult/1"  # no checksum; metadata as JSON with default=str
_FIELDS = ("scores", "method", "metric", "direction", "rules", "seconds", "model", "layers", "tokens", "metadata")
_TUPLE_TAG = "__tuple__"


class ResultFileError(ValueError):
    """A file that is not a saved PatchingResult, or one that was damaged after it was saved."""


def _checksum(payload: dict) -> str:
    """sha256 over every field of a save payload: the scalar fields as JSON, then each score tensor's
    name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    header = {k: payload[k] for k in (*_FIELDS, "format") if k != "scores"}
    header["seconds"] = repr(header["seconds"])  # NaN-safe and exact
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name in sorted(payload["scores"]):
        tensor = payload["scores"][name]
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _encode_metadata(value, where: str):
    """`value` as JSON data that :func:`_decode_object` turns back into it, or a TypeError naming `where`."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, list):
        return [_encode_metadata(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [_encode_metadata(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str) or k == _TUPLE_TAG]
        if bad:
            raise TypeError(
                f"{where} has the key {bad[0]!r} ({type(bad[0]).__name__}); PatchingResult.save stores metadata "
                f"as JSON, whose keys are strings (and not {_TUPLE_TAG!r})"
            )
        return {k: _encode_metadata(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}; PatchingResult.save stores metadata as "
        "JSON: None, bool, int, float, str, list, tuple or dict with str keys (numpy scalars become Python "
        "numbers). Convert it (e.g. tensor.tolist()) or leave it out"
    )


def _decode_object(obj: dict):
    return tuple(obj[_TUPLE_TAG]) if set(obj) == {_TUPLE_TAG} else obj


def cell_name(component: str, layer: int, position: int, *, head: int | None = None, neuron: int | None = None,
              label: str | None = None, token: str | None = None) -> str:
    """A readable name of one cell: ``L12 resid_pre @ 5 ' John'``, ``L12H3 @ S2 ' John'``, ``L3N1021 @ 7``.

    The position is shown by its label (IO, S1, S2, END, BOS) when one is given and is not "other",
    else by its index; the token follows when given.
    """
    if head is not None:
        where = f"L{layer}H{head}"
    elif neuron is not None:
        where = f"L{layer}N{neuron}"
    else:
        where = f"L{layer} {component}"
    at = label if label and label != "other" else str(position)
    return f"{where} @ {at}" + (f" {token!r}" if token is not None else "")



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
