"""Prompt pairs from JSON or CSV files, checked against a tokenizer, as a PromptDataset.

One record per prompt pair. Required fields:

=================  ==========================================================================
clean              the clean prompt
corrupted          the corrupted prompt; must tokenize to as many tokens as the clean one
answer             the correct continuation of the clean prompt, e.g. " Mary": one token
wrong_answer       the competing wrong continuation, e.g. " John": one token
=================  ==========================================================================

Optional fields: ``corrupted_answer`` and ``corrupted_wrong_answer`` (what is correct on the
corrupted prompt; default: ``answer`` and ``wrong_answer``), ``template`` (an id kept as
``template_id``), and named positions as token indices counting BOS: ``pos_IO``, ``pos_S2``, ... (or
in JSON an object ``"positions": {"IO": 2, ...}``); negative indices count from the end. ``END``
defaults to the last token. Every record must name the same positions. Other fields are ignored.

JSON files hold a list of such objects (or ``{"prompts": [...]}``); CSV files have a header row with
the field names. Records are checked with the relp tokenization (BOS prepended); every problem is
reported with its row number (the first record is row 1) in one :class:`PromptFileError`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from relp.tasks.dataset import PromptDataset, PromptExample
from relp.tokens import TaskTokenizer

REQUIRED_FIELDS = ("clean", "corrupted", "answer", "wrong_answer")
POSITION_PREFIX = "pos_"
END = "END"
_MAX_REPORTED = 20


class PromptFileError(ValueError):
    """Malformed prompt records; ``problems`` lists one message per problem, each naming its row."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:_MAX_REPORTED])
        more = len(self.problems) - _MAX_REPORTED
        super().__init__(
            f"{source}: {len(self.problems)} problem(s) in the prompt records:\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
        )


def load_prompts(path: str | Path, model_or_tokenizer, *, format: str | None = None) -> PromptDataset:
    """Read prompt pairs from a .json or .csv file (or `format` "json"/"csv"); see the module doc."""
    path = Path(path)
    format = (format or path.suffix.lstrip(".")).lower()
    if format == "json":
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, Mapping) and "prompts" in data:
            data = data["prompts"]
        if not isinstance(data, list):
            raise PromptFileError(str(path), [f"expected a list of objects, got {type(data).__name__}"])
        return prompts_from_records(data, model_or_tokenizer, source=str(path))
    if format == "csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            records, lines = [], []
            for row in reader:
                records.append({k: v for k, v in row.items() if k is not None and v not in (None, "")})
                lines.append(reader.line_num)
        return prompts_from_records(records, model_or_tokenizer, source=str(path), lines=lines)
    raise ValueError(f"cannot tell the format of {path}; name it .json or .csv, or pass format=")


def prompts_from_records(
    records: Iterable[Mapping],
    model_or_tokenizer,
    *,
    source: str = "records",
    lines: Sequence[int] | None = None,
) -> PromptDataset:
    """A PromptDataset from in-memory records (dicts with the fields of the module doc).

    `lines` optionally gives each record's line in a file, for the error messages.
    """
    tok = TaskTokenizer.of(model_or_tokenizer)
    examples, problems, first_names = [], [], None
    for number, record in enumerate(records, start=1):
        where = f"row {number}" + (f" (line {lines[number - 1]})" if lines else "")
        try:
            example = _example_from_record(tok, record, number - 1)
        except _RowError as error:
            problems.extend(f"{where}: {message}" for message in error.args[0])
            continue
        names = tuple(example.positions)
        if first_names is None:
            first_names = (where, names)
        elif set(names) != set(first_names[1]):
            problems.append(
                f"{where}: names positions {sorted(names)} but {first_names[0]} names {sorted(first_names[1])}"
            )
            continue
        ordered = {name: example.positions[name] for name in first_names[1]}
        examples.append(dataclasses.replace(example, positions=ordered))
    if problems:
        raise PromptFileError(source, problems)
    return PromptDataset(tuple(examples), task="prompts", corruption=None, device=tok.device)


def save_prompts(dataset: PromptDataset, path: str | Path, *, format: str | None = None) -> Path:
    """Write a dataset as .json or .csv in the format :func:`load_prompts` reads."""
    path = Path(path)
    format = (format or path.suffix.lstrip(".")).lower()
    records = [_record(example) for example in dataset]
    if format == "json":
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    elif format == "csv":
        fields = [*REQUIRED_FIELDS, "corrupted_answer", "corrupted_wrong_answer", "template"]
        fields += [POSITION_PREFIX + name for name in dataset.position_names]
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for record in records:
                positions = record.pop("positions")
                writer.writerow({**record, **{POSITION_PREFIX + k: v for k, v in positions.items()}})
    else:
        raise ValueError(f"cannot tell the format of {path}; name it .json or .csv, or pass format=")
    return path


def _record(example: PromptExample) -> dict:
    return {
        "clean": example.clean_text,
        "corrupted": example.corrupted_text,
        "answer": example.answer,
        "wrong_answer": example.wrong_answer,
        "corrupted_answer": example.corrupted_answer,
        "corrupted_wrong_answer": example.corrupted_wrong_answer,
        "template": example.template_id,
        "positions": dict(example.positions),
    }


class _RowError(Exception):
    """Problems of one record (a list of messages)."""


def _example_from_record(tok: TaskTokenizer, record, index: int) -> PromptExample:
    if not isinstance(record, Mapping):
        raise _RowError([f"expected an object with fields {list(REQUIRED_FIELDS)}, got {type(record).__name__}"])
    problems = []
    for name in REQUIRED_FIELDS:
        if name not in record or record[name] in (None, ""):
            problems.append(f"missing field {name!r}")
        elif not isinstance(record[name], str):
            problems.append(f"field {name!r} must be a string, got {type(record[name]).__name__}")
    if problems:
        raise _RowError(problems)

    answers = {}  # field -> (text, token id); the corrupted ones default to the clean ones
    for name, default in [
        ("answer", None), ("wrong_answer", None),
        ("corrupted_answer", "answer"), ("corrupted_wrong_answer", "wrong_answer"),
    ]:  # fmt: skip
        if default is not None and record.get(name) in (None, ""):
            answers[name] = answers[default]
            continue
        text = record[name]
        token = tok.word_token(text) if isinstance(text, str) else None
        if token is None:
            problems.append(f"{name} {text!r} is not a single token (it tokenizes to {tok.describe(str(text))})")
        answers[name] = (text, token)

    clean_ids, corrupted_ids = tok.tokens(record["clean"]), tok.tokens(record["corrupted"])
    if len(clean_ids) != len(corrupted_ids):
        problems.append(
            f"clean and corrupted prompts tokenize to different lengths ({len(clean_ids)} vs "
            f"{len(corrupted_ids)} tokens, BOS included)"
        )
    positions = _positions(record, len(clean_ids), problems)
    if problems:
        raise _RowError(problems)
    return PromptExample(
        clean_text=record["clean"],
        corrupted_text=record["corrupted"],
        clean_tokens=torch.tensor(clean_ids, dtype=torch.long),
        corrupted_tokens=torch.tensor(corrupted_ids, dtype=torch.long),
        answer=answers["answer"][0],
        wrong_answer=answers["wrong_answer"][0],
        answer_token=answers["answer"][1],
        wrong_token=answers["wrong_answer"][1],
        corrupted_answer=answers["corrupted_answer"][0],
        corrupted_wrong_answer=answers["corrupted_wrong_answer"][0],
        corrupted_answer_token=answers["corrupted_answer"][1],
        corrupted_wrong_token=answers["corrupted_wrong_answer"][1],
        positions=positions,
        clean_str_tokens=tok.str_tokens(clean_ids),
        corrupted_str_tokens=tok.str_tokens(corrupted_ids),
        template_id=str(record.get("template") or "file"),
        index=index,
    )


def _positions(record: Mapping, length: int, problems: list[str]) -> dict[str, int]:
    """Named positions of a record (pos_X fields or a "positions" object), END added if absent."""
    given = {k[len(POSITION_PREFIX) :]: v for k, v in record.items() if k.startswith(POSITION_PREFIX)}
    nested = record.get("positions")
    if nested is not None:
        if not isinstance(nested, Mapping):
            problems.append(f"'positions' must be an object of name: index, got {type(nested).__name__}")
        else:
            given.update(nested)
    positions = {}
    for name, value in given.items():
        try:
            if isinstance(value, float) or isinstance(value, bool):
                raise ValueError
            index = int(value)
        except (TypeError, ValueError):
            problems.append(f"position {name}={value!r} is not an integer token index")
            continue
        if not -length <= index < length:
            problems.append(f"position {name}={index} is outside the clean prompt's {length} tokens (BOS included)")
            continue
        positions[name] = index % length
    positions.setdefault(END, length - 1)
    return positions
