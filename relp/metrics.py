"""Metrics (callables from a model's output to a scalar) and agreement between score maps.

A metric is any callable ``metric(output) -> scalar tensor``. By default the output is the logits
[batch, pos, vocab]; a metric with a ``readout`` attribute reads something else, e.g. the embedding
metrics (:class:`CosineSimilarity`, :class:`SimilarityDifference`, :class:`EmbeddingDistance`) read
pooled sentence embeddings [batch, d] through a :class:`relp.embeddings.SentenceEmbedding`. The
classes here also carry a ``name`` that results record. Metrics average over the batch, so a patching
score is the change of the batch-mean metric when a cell is patched in every prompt.

>>> import torch
>>> logits = torch.zeros(2, 3, 5); logits[:, -1, 1] = 2.0
>>> LogitDiff(answer=torch.tensor([1, 1]), wrong=torch.tensor([0, 0]))(logits)
tensor(2.)
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Int

from relp.embeddings import SentenceEmbedding
from relp.tokens import to_tokens


def _integer_tensor(values, name: str, what: str) -> torch.Tensor:
    """`values` (an int, a sequence of ints, an integer tensor or array) as an int64 tensor, else a clear
    error: strings, floats (even whole ones: a float id is a mistake, not a rounding) and bools are refused."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be {what} (ints); got the string {values!r}")
    if isinstance(values, torch.Tensor):
        tensor = values
    else:
        array = np.asarray(values)
        if array.dtype.kind in "OUS":
            raise TypeError(f"{name} must be {what} (ints); got {values!r:.200}")
        tensor = torch.as_tensor(array)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(
            f"{name} must be {what}, integers; got dtype {tensor.dtype} ({values!r:.200}). Float ids are not "
            "truncated: convert them yourself if that is what you mean."
        )
    return tensor.long()


def _check_ids_arg(ids, name: str) -> None:
    """At construction: token ids must be integers (see :func:`_integer_tensor`) and not negative."""
    tensor = _integer_tensor(ids, name, "token ids (one per prompt, or one for all)")
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError(f"{name} must be token ids in 0..vocab-1; got {int(tensor.min())} in {ids!r:.200}")


def _check_position_arg(position) -> None:
    if isinstance(position, bool) or not (isinstance(position, (numbers.Integral, torch.Tensor, np.ndarray, list, tuple))):
        raise TypeError(f"position must be an int or one index per prompt; got {type(position).__name__} {position!r}")
    if not isinstance(position, numbers.Integral):
        _integer_tensor(position, "position", "one position index per prompt")


def _select_position(logits: Float[torch.Tensor, "batch pos vocab"], position) -> torch.Tensor:
    if logits.ndim != 3:
        raise ValueError(f"metrics expect logits [batch, pos, vocab]; got shape {tuple(logits.shape)}")
    n_positions = logits.shape[1]
    if isinstance(position, numbers.Integral) and not isinstance(position, bool):
        if not -n_positions <= position < n_positions:
            raise IndexError(
                f"position {position} is out of range for logits of {n_positions} positions; expected "
                f"-{n_positions}..{n_positions - 1}"
            )
        return logits[:, int(position)]
    position = _integer_tensor(position, "position", "an int or one position index per prompt").to(logits.device)
    if position.shape != (logits.shape[0],):
        raise ValueError(f"position must be an int or one index per prompt [{logits.shape[0]}]; got {tuple(position.shape)}")
    if position.numel() and not (-n_positions <= int(position.min()) and int(position.max()) < n_positions):
        raise IndexError(
            f"positions range from {int(position.min())} to {int(position.max())}, out of range for logits of "
            f"{n_positions} positions; expected -{n_positions}..{n_positions - 1}"
        )
    return logits[torch.arange(logits.shape[0], device=logits.device), position]


def _as_ids(ids, batch: int, name: str, device, vocab: int | None = None) -> torch.Tensor:
    ids = _integer_tensor(ids, name, "token ids (one per prompt, or one for all)").to(device)
    if ids.ndim == 0:
        ids = ids.expand(batch)
    if ids.shape != (batch,):
        raise ValueError(f"{name} must hold one token id per prompt [{batch}]; got shape {tuple(ids.shape)}")
    if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"{name} ids range from {int(ids.min())} to {int(ids.max())}; expected token ids in 0..{vocab - 1} "
            f"(the logits have {vocab} entries)"
        )
    return ids


def _answer_minus_wrong(values: Float[torch.Tensor, "batch vocab"], answer, wrong) -> Float[torch.Tensor, " batch"]:
    """values[i, answer[i]] - values[i, wrong[i]] for each prompt i (ids: one per prompt, or one for all)."""
    batch, vocab = values.shape
    answer = _as_ids(answer, batch, "answer", values.device, vocab)
    wrong = _as_ids(wrong, batch, "wrong", values.device, vocab)
    return values.gather(1, answer[:, None])[:, 0] - values.gather(1, wrong[:, None])[:, 0]


def _check_answer_args(metric) -> None:
    _check_ids_arg(metric.answer, "answer")
    _check_ids_arg(metric.wrong, "wrong")
    _check_position_arg(metric.position)


@dataclass
class LogitDiff:
    """Mean over the batch of logit[answer] - logit[wrong] at `position` (default: the last token)."""

    answer: Int[torch.Tensor, " batch"]
    wrong: Int[torch.Tensor, " batch"]
    position: int | torch.Tensor = -1
    name: str = "logit_diff"

    def __post_init__(self):
        _check_answer_args(self)

    def per_prompt(self, logits: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, " batch"]:
        return _answer_minus_wrong(_select_position(logits, self.position), self.answer, self.wrong)

    def __call__(self, logits: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, ""]:
        return self.per_prompt(logits).mean()


@dataclass
class NormalizedLogitDiff:
    """(LD - LD_corrupted) / (LD_clean - LD_corrupted): 0 on the corrupted run, 1 on the clean run.

    Build it from the two runs with ``NormalizedLogitDiff.from_runs(model, clean, corrupted, ...)``.
    """

    answer: Int[torch.Tensor, " batch"]
    wrong: Int[torch.Tensor, " batch"]
    clean_value: float
    corrupted_value: float
    position: int | torch.Tensor = -1
    name: str = "normalized_logit_diff"

    def __post_init__(self):
        _check_answer_args(self)
        if not abs(self.clean_value - self.corrupted_value) > 1e-6:
            raise ValueError(
                f"clean and corrupted logit differences are equal ({self.clean_value:.6g}); the "
                "normalised metric is undefined. Is the corruption changing anything?"
            )

    @classmethod
    def from_runs(cls, model, clean_tokens, corrupted_tokens, answer, wrong, position=-1) -> "NormalizedLogitDiff":
        raw = LogitDiff(answer, wrong, position)
        with torch.no_grad():
            clean_value = raw(model(clean_tokens)).item()
            corrupted_value = raw(model(corrupted_tokens)).item()
        return cls(answer, wrong, clean_value, corrupted_value, position)

    def __call__(self, logits: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, ""]:
        value = LogitDiff(self.answer, self.wrong, self.position)(logits)
        return (value - self.corrupted_value) / (self.clean_value - self.corrupted_value)


@dataclass
class ProbDiff:
    """Mean over the batch of p[answer] - p[wrong] at `position`."""

    answer: Int[torch.Tensor, " batch"]
    wrong: Int[torch.Tensor, " batch"]
    position: int | torch.Tensor = -1
    name: str = "prob_diff"

    def __post_init__(self):
        _check_answer_args(self)

    def __call__(self, logits: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, ""]:
        probs = _select_position(logits, self.position).float().softmax(-1)
        return _answer_minus_wrong(probs, self.answer, self.wrong).mean()


@dataclass
class KLToClean:
    """Mean over the batch of KL(p_clean || p) at `position`: 0 when the run reproduces the clean one."""

    clean_logits: Float[torch.Tensor, "batch pos vocab"]
    position: int | torch.Tensor = -1
    name: str = "kl_to_clean"

    def __call__(self, logits: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, ""]:
        if logits.shape != self.clean_logits.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match the clean logits {tuple(self.clean_logits.shape)}")
        clean = _select_position(self.clean_logits.detach(), self.position).float().log_softmax(-1)
        patched = _select_position(logits, self.position).float().log_softmax(-1)
        return (clean.exp() * (clean - patched)).sum(-1).mean()


# ----------------------------------------------------------------------------------------------
# Embedding metrics: read pooled sentence embeddings [batch, d] (their ``readout``)


def _as_reference(reference, embeddings: torch.Tensor, name: str) -> torch.Tensor:
    """A reference embedding [d] or [batch, d], broadcast against `embeddings` [batch, d]."""
    if embeddings.ndim != 2:
        raise ValueError(
            f"embedding metrics expect embeddings [batch, d]; got shape {tuple(embeddings.shape)} (is the "
            "metric's readout a SentenceEmbedding?)"
        )
    reference = torch.as_tensor(reference).to(device=embeddings.device, dtype=embeddings.dtype).detach()
    if reference.shape not in ((embeddings.shape[1],), tuple(embeddings.shape)):
        raise ValueError(
            f"{name} must be one embedding [{embeddings.shape[1]}] or one per text [{embeddings.shape[0]}, "
            f"{embeddings.shape[1]}]; got shape {tuple(reference.shape)}"
        )
    return reference


def _cosine_to(embeddings, reference, name: str) -> torch.Tensor:
    """cos(embeddings[i], reference[i]) per text [batch] (or against one reference embedding)."""
    reference = _as_reference(reference, embeddings, name)
    return torch.nn.functional.cosine_similarity(embeddings, reference.expand_as(embeddings), dim=-1)


def _default_readout():
    return SentenceEmbedding()


@dataclass
class CosineSimilarity:
    """Mean over the batch of cos(embedding of the run, reference).

    ``reference``: one embedding [d] or one per text [batch, d] (e.g. ``readout.embed(model, anchors)``),
    a constant: only the run whose activations are patched goes through the model.
    ``readout``: how the run's embedding is computed (default: mean pooling, normalised).
    """

    reference: Float[torch.Tensor, "*batch d"]
    readout: object = field(default_factory=_default_readout)
    name: str = "cosine_similarity"

    def per_text(self, embeddings: Float[torch.Tensor, "batch d"]) -> Float[torch.Tensor, " batch"]:
        return _cosine_to(embeddings, self.reference, "reference")

    def __call__(self, embeddings: Float[torch.Tensor, "batch d"]) -> Float[torch.Tensor, ""]:
        return self.per_text(embeddings).mean()


@dataclass
class SimilarityDifference:
    """Cosine similarity to the anchors, normalised between the corrupted and the clean pair.

    ``(cos(e, anchor) - sim_corrupted) / (sim_clean - sim_corrupted)``, with ``sim_clean`` and
    ``sim_corrupted`` the batch-mean similarity of the anchors to the clean and to the corrupted
    candidates: 1 on the clean run, 0 on the corrupted run (the analogue of the normalised logit
    difference). With ``normalized=False`` it is the raw difference ``cos(e, anchor) - sim_corrupted``.
    Build it with :meth:`from_runs`.
    """

    anchors: Float[torch.Tensor, "*batch d"]
    clean_value: float
    corrupted_value: float
    readout: object = field(default_factory=_default_readout)
    normalized: bool = True
    name: str = "similarity_difference"

    def __post_init__(self):
        if self.normalized and not abs(self.clean_value - self.corrupted_value) > 1e-6:
            raise ValueError(
                f"the anchors are as similar to the clean as to the corrupted texts ({self.clean_value:.6g}); "
                "the normalised similarity difference is undefined. Is the corruption changing anything?"
            )

    @classmethod
    def from_runs(cls, model, anchors, clean, corrupted, readout=None, *, normalized: bool = True) -> "SimilarityDifference":
        """Embed the anchors (texts of any lengths, or embeddings [batch, d]) and both candidate runs."""
        readout = readout if readout is not None else _default_readout()
        if isinstance(anchors, torch.Tensor) and anchors.is_floating_point():
            anchor_embeddings = anchors.detach()
        else:
            anchor_embeddings = readout.embed(model, anchors)
        with torch.no_grad():
            clean_e = readout(model, to_tokens(model, clean))
            corrupted_e = readout(model, to_tokens(model, corrupted))
        clean_value = _cosine_to(clean_e, anchor_embeddings, "anchors").mean().item()
        corrupted_value = _cosine_to(corrupted_e, anchor_embeddings, "anchors").mean().item()
        return cls(anchor_embeddings, clean_value, corrupted_value, readout, normalized)

    def __call__(self, embeddings: Float[torch.Tensor, "batch d"]) -> Float[torch.Tensor, ""]:
        value = _cosine_to(embeddings, self.anchors, "anchors").mean() - self.corrupted_value
        return value / (self.clean_value - self.corrupted_value) if self.normalized else value


@dataclass
class EmbeddingDistance:
    """Mean over the batch of the distance between the run's embedding and a fixed reference.

    ``kind="euclidean"`` (L2 distance) or ``"cosine"`` (1 - cosine similarity). A positive patching
    score means the patch moves the embedding *away* from the reference.
    """

    reference: Float[torch.Tensor, "*batch d"]
    readout: object = field(default_factory=_default_readout)
    kind: str = "euclidean"
    name: str = "embedding_distance"

    def __post_init__(self):
        if self.kind not in ("euclidean", "cosine"):
            raise ValueError(f"kind must be 'euclidean' or 'cosine'; got {self.kind!r}")

    def __call__(self, embeddings: Float[torch.Tensor, "batch d"]) -> Float[torch.Tensor, ""]:
        reference = _as_reference(self.reference, embeddings, "reference").expand_as(embeddings)
        if self.kind == "cosine":
            return (1 - torch.nn.functional.cosine_similarity(embeddings, reference, dim=-1)).mean()
        return (embeddings - reference).norm(dim=-1).mean()


def metric_name(metric) -> str:
    return getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__


def check_metric_value(value, metric, where: str) -> torch.Tensor:
    """The metric's value as a 0-d tensor, or a clear error for a non-scalar or non-finite value."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"metric {metric_name(metric)} returned {type(value).__name__} on {where}; expected a scalar tensor")
    if not value.is_floating_point():
        raise TypeError(
            f"metric {metric_name(metric)} returned a {value.dtype} tensor on {where}; expected a floating-point "
            "scalar (a comparison or a count has no gradient and no meaningful difference)"
        )
    if value.numel() != 1:
        raise ValueError(
            f"metric {metric_name(metric)} returned shape {tuple(value.shape)} on {where}; expected a scalar "
            "(average over the batch, e.g. .mean())"
        )
    if not torch.isfinite(value).all():
        raise ValueError(f"metric {metric_name(metric)} returned {value.item()} on {where}; expected a finite number")
    return value.reshape(())


# ----------------------------------------------------------------------------------------------
# Agreement between score maps


def _top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Fraction of the k largest-|score| cells shared; NaN when k >= the number of cells (every cell is
    then in both top-k sets, and an overlap of 1.0 would say nothing)."""
    if k >= a.size:
        return float("nan")
    top_a = set(np.argsort(-np.abs(a), kind="stable")[:k])
    top_b = set(np.argsort(-np.abs(b), kind="stable")[:k])
    return len(top_a & top_b) / k


def agreement(result, reference, *, top_k: int = 10):
    """How well `result`'s scores track `reference`'s (usually activation patching), per component.

    `result` and `reference` are PatchingResults, or equally long lists of them (e.g. one per batch of
    prompts of one layout): the cells of all pairs are then pooled.

    Returns a pandas DataFrame indexed by component with columns: ``pearson``, ``spearman``,
    ``top_k_overlap`` (fraction of the k largest-|score| cells shared), ``pearson_without_max`` (Pearson
    with the single largest-|reference| cell left out: one outlier cell can decide Pearson on its own)
    and ``n_cells``.

    `top_k` must be a positive integer. A component with at most `top_k` cells gets a ``top_k_overlap``
    of NaN, with a warning: every cell is then in both top-k sets, and the overlap would be 1.0 whatever
    the scores.
    """
    import pandas as pd
    from scipy import stats

    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer (how many of the largest-|score| cells to compare); got {top_k!r}")

    results = list(result) if isinstance(result, (list, tuple)) else [result]
    references = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    if len(results) != len(references) or not results:
        raise ValueError(f"need equally many results and references; got {len(results)} and {len(references)}")
    shared = [c for c in results[0].scores if all(c in r.scores for r in results + references)]
    if not shared:
        raise ValueError(f"no component in common: {list(results[0].scores)} vs {list(references[0].scores)}")
    rows = {}
    for component in shared:
        pairs = []
        for mine, theirs in zip(results, references):
            if mine.scores[component].shape != theirs.scores[component].shape:
                raise ValueError(
                    f"{component}: score shapes differ, {tuple(mine.scores[component].shape)} vs "
                    f"{tuple(theirs.scores[component].shape)}"
                )
            pairs.append((mine.scores[component], theirs.scores[component]))
        a = np.concatenate([p[0].detach().cpu().double().numpy().ravel() for p in pairs])
        b = np.concatenate([p[1].detach().cpu().double().numpy().ravel() for p in pairs])
        keep = np.arange(b.size) != np.argmax(np.abs(b))
        rows[component] = {
            "pearson": _correlation(stats.pearsonr, a, b),
            "spearman": _correlation(stats.spearmanr, a, b),
            "top_k_overlap": _top_k_overlap(a, b, top_k),
            "pearson_without_max": _correlation(stats.pearsonr, a[keep], b[keep]),
            "n_cells": a.size,
        }
    trivial = [c for c, row in rows.items() if row["n_cells"] <= top_k]
    if trivial:
        warnings.warn(
            f"top_k={top_k} is at least the number of cells of {trivial} "
            f"({[rows[c]['n_cells'] for c in trivial]} cells): their top_k_overlap is reported as NaN "
            "(every cell would be in both top-k sets)",
            stacklevel=2,
        )
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "component"
    table.attrs["top_k"] = top_k
    return table


def _correlation(fn, a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(fn(a, b)[0])
