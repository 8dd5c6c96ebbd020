"""Clean/corrupted prompt pairs, equal-length batching, and per-position tables across batches.

A :class:`PromptDataset` is what every relp task (the IOI generator, prompts loaded from a file)
returns. Each :class:`PromptExample` holds a clean prompt, its corrupted counterpart of the *same*
token length, the answer and wrong-answer tokens, and named token positions (for IOI: IO, S1, S2,
END). Positions are token indices that count the BOS token (relp always prepends BOS).

Prompts of one dataset may have different lengths (different templates). Patching runs on
rectangular [batch, pos] tensors, so:

* ``dataset.batches()`` splits a dataset into sub-datasets with one *layout* each: the same token
  length and the same named positions in every example. The [batch, pos] accessors
  (``clean_tokens``, ...) then work, and a score that is already averaged over the batch, e.g.
  [layer, pos], still means one thing per position.
* :func:`aggregate_by_position` turns such a score into a :class:`PositionScores` table over labels
  ``BOS, <named positions>, other``; tables of different batches add up (``sum(...)``), and
  ``.mean()`` gives one [layer, label] table for the whole dataset::

      table = sum(aggregate_by_position(run_patching(batch), batch) for batch in dataset.batches())
      table.mean()        # [layer, label]: mean score per token with that label
      table.to_frame()    # the same as a pandas DataFrame
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

BOS_LABEL = "BOS"
OTHER_LABEL = "other"


@dataclass(frozen=True, eq=False)
class PromptExample:
    """One clean/corrupted prompt pair with its answers and named positions.

    ``answer``/``wrong_answer`` are strings as they continue the prompt (" Mary"), each one token:
    ``answer_token``/``wrong_token``. The ``corrupted_*`` answers are what is correct on the corrupted
    prompt; they equal the clean ones unless the corruption changes which name is correct.
    ``names`` and ``corrupted_names`` map the template's name slots (IO, S1, S2) to the names filled
    in (empty for prompts loaded from a file).
    """

    clean_text: str
    corrupted_text: str
    clean_tokens: Int[Tensor, " pos"]
    corrupted_tokens: Int[Tensor, " pos"]
    answer: str
    wrong_answer: str
    answer_token: int
    wrong_token: int
    corrupted_answer: str
    corrupted_wrong_answer: str
    corrupted_answer_token: int
    corrupted_wrong_token: int
    positions: Mapping[str, int]
    clean_str_tokens: tuple[str, ...]
    corrupted_str_tokens: tuple[str, ...]
    template_id: str = ""
    index: int = 0
    names: Mapping[str, str] = field(default_factory=dict)
    corrupted_names: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.clean_tokens.shape != self.corrupted_tokens.shape or self.clean_tokens.ndim != 1:
            raise ValueError(
                f"example {self.index}: clean and corrupted tokens must be 1-D and of equal length; got "
                f"{tuple(self.clean_tokens.shape)} and {tuple(self.corrupted_tokens.shape)}"
            )
        for name, position in self.positions.items():
            if not 0 <= position < self.length:
                raise ValueError(
                    f"example {self.index}: position {name}={position} is outside the prompt's "
                    f"{self.length} tokens"
                )

    @property
    def length(self) -> int:
        """Number of tokens, BOS included."""
        return int(self.clean_tokens.shape[0])

    @property
    def layout(self) -> tuple[int, tuple[tuple[str, int], ...]]:
        """(length, named positions): examples with one layout stack and share position labels."""
        return self.length, tuple(self.positions.items())


@dataclass(eq=False)
class PromptDataset:
    """An ordered set of :class:`PromptExample`; sub-datasets come from indexing and ``batches()``.

    The [batch, ...] accessors stack the examples and need one token length (``clean_tokens``, ...);
    tensors live on ``device`` (the model's device when the dataset was made with a model).
    """

    examples: tuple[PromptExample, ...]
    task: str = ""
    corruption: str | None = None
    device: str = "cpu"

    def __post_init__(self):
        self.examples = tuple(self.examples)
        if self.examples:
            names = tuple(self.examples[0].positions)
            for example in self.examples[1:]:
                if tuple(example.positions) != names:
                    raise ValueError(
                        f"example {example.index} has named positions {tuple(example.positions)} but "
                        f"example {self.examples[0].index} has {names}; all must name the same positions"
                    )

    # --- container -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[PromptExample]:
        return iter(self.examples)

    def __getitem__(self, key):
        """An example for an int; a sub-dataset for a slice or a sequence of ints."""
        try:
            return self.examples[operator.index(key)]
        except TypeError:
            pass
        if isinstance(key, slice):
            return self._with(self.examples[key])
        return self._with(tuple(self.examples[int(i)] for i in key))

    def __repr__(self) -> str:
        lengths = sorted(set(self.lengths))
        return (
            f"PromptDataset(task={self.task!r}, corruption={self.corruption!r}, n={len(self)}, "
            f"lengths={lengths}, positions={self.position_names})"
        )

    def _with(self, examples: Sequence[PromptExample]) -> "PromptDataset":
        return dataclasses.replace(self, examples=tuple(examples))

    # --- lengths and batching --------------------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        """Token length (BOS included) of each example."""
        return [example.length for example in self.examples]

    @property
    def is_equal_length(self) -> bool:
        return len(set(self.lengths)) <= 1

    @property
    def has_one_layout(self) -> bool:
        """True when all examples have the same length and the same named positions."""
        return len({example.layout for example in self.examples}) <= 1

    @property
    def length(self) -> int:
        """The common token length; an error if the examples differ in length."""
        self._require_equal_length()
        return self.examples[0].length

    def by_length(self) -> dict[int, "PromptDataset"]:
        """{token length: sub-dataset}, shortest first, each in the original example order."""
        groups: dict[int, list[PromptExample]] = {}
        for example in self.examples:
            groups.setdefault(example.length, []).append(example)
        return {length: self._with(groups[length]) for length in sorted(groups)}

    def batches(self, max_size: int | None = None, *, by: str = "layout") -> Iterator["PromptDataset"]:
        """Sub-datasets that stack into [batch, pos]; together they hold every example exactly once.

        by="layout" (default): each batch has one token length *and* the same named positions in
        every example, so a score averaged over the batch ([layer, pos]) has one label per position.
        by="length": only the length is shared (fewer, larger batches); label per-example scores
        ([layer, batch, pos]) with ``aggregate_by_position(..., batch_dim=...)``.
        Batches come shortest first, each in the original order, split into at most `max_size`.
        """
        if by not in ("layout", "length"):
            raise ValueError(f"by must be 'layout' or 'length'; got {by!r}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be positive; got {max_size}")
        groups: dict[tuple, list[PromptExample]] = {}
        for example in self.examples:
            key = example.layout if by == "layout" else (example.length,)
            groups.setdefault(key, []).append(example)
        for key in sorted(groups):
            group = groups[key]
            step = max_size or len(group)
            for start in range(0, len(group), step):
                yield self._with(group[start : start + step])

    def _require_equal_length(self) -> None:
        if not self.examples:
            raise ValueError("the dataset is empty")
        lengths = sorted(set(self.lengths))
        if len(lengths) > 1:
            raise ValueError(
                f"the prompts have {len(lengths)} different token lengths {lengths}; iterate over "
                "dataset.batches() for equal-length batches, or generate with same_length=True"
            )

    # --- [batch, ...] accessors ------------------------------------------------------------------

    def _stack(self, attribute: str) -> Int[Tensor, "batch pos"]:
        self._require_equal_length()
        return torch.stack([getattr(example, attribute) for example in self.examples]).to(self.device)

    def _ids(self, attribute: str) -> Int[Tensor, " batch"]:
        return self._column([getattr(example, attribute) for example in self.examples])

    def _column(self, values: list[int]) -> Int[Tensor, " batch"]:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @property
    def clean_tokens(self) -> Int[Tensor, "batch pos"]:
        return self._stack("clean_tokens")

    @property
    def corrupted_tokens(self) -> Int[Tensor, "batch pos"]:
        return self._stack("corrupted_tokens")

    @property
    def answer_tokens(self) -> Int[Tensor, " batch"]:
        """The correct next token on the clean prompt (IOI: the IO name)."""
        return self._ids("answer_token")

    @property
    def wrong_tokens(self) -> Int[Tensor, " batch"]:
        """The competing wrong next token on the clean prompt (IOI: the S name)."""
        return self._ids("wrong_token")

    @property
    def corrupted_answer_tokens(self) -> Int[Tensor, " batch"]:
        """The correct next token on the corrupted prompt (swapped with wrong by s2_io_flip, io_s_swap)."""
        return self._ids("corrupted_answer_token")

    @property
    def corrupted_wrong_tokens(self) -> Int[Tensor, " batch"]:
        return self._ids("corrupted_wrong_token")

    @property
    def position_names(self) -> tuple[str, ...]:
        """Names of the named positions, e.g. ("IO", "S1", "S2", "END")."""
        return tuple(self.examples[0].positions) if self.examples else ()

    @property
    def positions(self) -> dict[str, Int[Tensor, " batch"]]:
        """{name: token index of that position in each example} (BOS counts as index 0)."""
        return {name: self._column([ex.positions[name] for ex in self.examples]) for name in self.position_names}

    @property
    def clean_texts(self) -> list[str]:
        return [example.clean_text for example in self.examples]

    @property
    def corrupted_texts(self) -> list[str]:
        return [example.corrupted_text for example in self.examples]

    @property
    def str_tokens(self) -> list[tuple[str, ...]]:
        """Each clean prompt's tokens as strings (BOS first), for labels."""
        return [example.clean_str_tokens for example in self.examples]

    @property
    def corrupted_str_tokens(self) -> list[tuple[str, ...]]:
        return [example.corrupted_str_tokens for example in self.examples]

    @property
    def template_ids(self) -> list[str]:
        return [example.template_id for example in self.examples]

    @property
    def indices(self) -> list[int]:
        """Each example's index in the dataset it was generated or loaded as."""
        return [example.index for example in self.examples]

    # --- position labels -------------------------------------------------------------------------

    @property
    def label_names(self) -> tuple[str, ...]:
        """Labels of a :class:`PositionScores` table: ("BOS", *position_names, "other")."""
        return (BOS_LABEL, *self.position_names, OTHER_LABEL)

    def position_masks(self) -> Bool[Tensor, "label batch pos"]:
        """Which (example, position) cells each label covers (labels as in ``label_names``).

        BOS is position 0; each named position covers its one token per example; "other" is every
        position that is neither BOS nor named. Overlaps (a file naming two positions at one index)
        count for each name.
        """
        self._require_equal_length()
        n, length = len(self), self.length
        masks = torch.zeros(len(self.label_names), n, length, dtype=torch.bool)
        masks[0, :, 0] = True
        rows = torch.arange(n)
        for label, name in enumerate(self.position_names, start=1):
            index = torch.tensor([ex.positions[name] for ex in self.examples])
            masks[label, rows, index] = True
        masks[-1] = ~masks[:-1].any(0)
        return masks

    def position_labels(self) -> list[str]:
        """One label per position for a one-layout batch: "BOS", a position name, or "other".

        For axis labels of batch-averaged scores; combine with ``str_tokens`` for the words.
        """
        if not self.has_one_layout:
            raise ValueError(
                "the examples differ in length or named positions, so no single label per position "
                "exists; iterate over dataset.batches() (one layout per batch)"
            )
        labels = [OTHER_LABEL] * self.length
        for name in reversed(self.position_names):
            labels[self.examples[0].positions[name]] = name
        labels[0] = BOS_LABEL
        return labels

    def aggregate(
        self, scores: Tensor, *, position_dim: int = -1, batch_dim: int | None = None
    ) -> "PositionScores":
        """Shorthand for :func:`aggregate_by_position` over this dataset (one batch)."""
        return aggregate_by_position(scores, self, position_dim=position_dim, batch_dim=batch_dim)


@dataclass
class PositionScores:
    """Scores summed per position label, over any number of batches (add tables with ``+``/``sum``).

    ``total`` is the score tensor with its position axis replaced by a label axis (at ``label_dim``),
    summed over the (example, position) cells of each label. ``n_cells`` counts those cells per label
    and ``n_examples`` the examples. A batch-averaged score of a batch of n examples counts n times.
    """

    labels: tuple[str, ...]
    total: Float[Tensor, "*rest label"]
    n_cells: Int[Tensor, " label"]
    n_examples: int
    label_dim: int = -1

    def __add__(self, other: "PositionScores") -> "PositionScores":
        if not isinstance(other, PositionScores):
            return NotImplemented
        if (other.labels, other.total.shape, other.label_dim) != (self.labels, self.total.shape, self.label_dim):
            raise ValueError(
                f"cannot add tables with labels/shapes {self.labels}/{tuple(self.total.shape)} and "
                f"{other.labels}/{tuple(other.total.shape)}"
            )
        return PositionScores(
            self.labels,
            self.total + other.total.to(self.total.device),
            self.n_cells + other.n_cells.to(self.n_cells.device),
            self.n_examples + other.n_examples,
            self.label_dim,
        )

    def __radd__(self, other):
        """Lets ``sum(tables)`` start from 0."""
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def _divide(self, denominator: Tensor) -> Tensor:
        moved = self.total.movedim(self.label_dim, -1)
        return (moved / denominator.to(moved)).movedim(-1, self.label_dim)

    def mean(self) -> Float[Tensor, "*rest label"]:
        """Mean score per token of each label (NaN for a label that covers no token)."""
        return self._divide(self.n_cells)

    def per_example(self) -> Float[Tensor, "*rest label"]:
        """Score summed over each label's positions in a prompt, averaged over prompts.

        Equal to ``mean()`` for one-token labels (BOS, IO, ...); for "other" it is the whole
        contribution of the other positions rather than the average per token.
        """
        return self._divide(torch.tensor(float(self.n_examples)))

    def to_frame(self, stat: str = "mean", dims: Sequence[str] | None = None):
        """A long pandas DataFrame: one row per cell, columns `dims` (e.g. ("layer",)), position, score.

        `stat` is "mean", "per_example" or "total".
        """
        import pandas as pd

        values = {"mean": self.mean, "per_example": self.per_example, "total": lambda: self.total}[stat]()
        values = values.movedim(self.label_dim, -1).detach().cpu()
        rest = values.shape[:-1]
        dims = list(dims) if dims is not None else [f"dim{i}" for i in range(len(rest))]
        if len(dims) != len(rest):
            raise ValueError(f"need {len(rest)} dimension names for shape {tuple(rest)}; got {dims}")
        flat = values.reshape(-1, len(self.labels)).tolist()
        rows = []
        for coords, row in zip(itertools.product(*map(range, rest)), flat):
            for label, value in zip(self.labels, row):
                rows.append({**dict(zip(dims, coords)), "position": label, "score": value})
        return pd.DataFrame(rows)


def aggregate_by_position(
    scores: Float[Tensor, "*rest pos"],
    batch: PromptDataset,
    *,
    position_dim: int = -1,
    batch_dim: int | None = None,
) -> PositionScores:
    """Sum a per-position score over the labels BOS, the named positions (IO, S1, ...) and "other".

    `scores` has a position axis at `position_dim` of the batch's length, e.g. [layer, pos] or
    [layer, head, pos] (or [layer, pos, neuron] with position_dim=1). Without `batch_dim` the scores
    are taken to be averaged over the batch, which needs one layout (as ``batch.batches()`` gives);
    with `batch_dim` they are per example ([layer, batch, pos] with batch_dim=1) and the batch only
    needs one length. The result has the position axis replaced by a label axis; add the results of
    all batches and call ``.mean()`` for one table over the whole dataset.
    """
    length = batch.length
    ndim = scores.ndim
    position_dim %= ndim
    if scores.shape[position_dim] != length:
        raise ValueError(
            f"scores of shape {tuple(scores.shape)} have {scores.shape[position_dim]} positions on axis "
            f"{position_dim}, but the batch's prompts have {length} tokens"
        )
    n = len(batch)
    if batch_dim is None:
        if not batch.has_one_layout:
            raise ValueError(
                "batch-averaged scores need a batch whose examples share their named positions; use "
                "dataset.batches() (by='layout'), or pass per-example scores with batch_dim"
            )
        per_cell = scores.movedim(position_dim, -1).unsqueeze(-2).expand(*([-1] * (ndim - 1)), n, length)
        label_dim = position_dim
    else:
        batch_dim %= ndim
        if batch_dim == position_dim or scores.shape[batch_dim] != n:
            raise ValueError(
                f"batch_dim={batch_dim} of scores {tuple(scores.shape)} must be a separate axis of size {n}"
            )
        per_cell = scores.movedim((batch_dim, position_dim), (-2, -1))
        label_dim = position_dim - (batch_dim < position_dim)
    masks = batch.position_masks()
    total = torch.einsum("...bp,lbp->...l", per_cell, masks.to(per_cell)).movedim(-1, label_dim)
    n_cells = masks.sum((1, 2))
    return PositionScores(batch.label_names, total, n_cells, n, label_dim)
