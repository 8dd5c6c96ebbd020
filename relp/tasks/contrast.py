"""Contrast pairs for sentence-embedding models: one swapped word moves a sentence away from an anchor.

An embedding model (a sentence encoder such as all-MiniLM-L6-v2, or a decoder used as an embedder)
is patched on *candidate* sentences and scored by the cosine similarity between the candidate's
embedding and that of a fixed *anchor* sentence, which is not patched:

* anchor:     "A physician checked on the ill kid."
* clean:      "The doctor examined the sick child."     (a paraphrase: high similarity)
* corrupted:  "The farmer examined the sick child."     (one word swapped: similarity drops)

Clean and corrupted candidates differ in exactly one token (the swapped word, which is a single token
on both sides), so they have the same token length under the model's tokenizer; the anchor may have
any length. Three kinds of change (:data:`CONTRAST_CHANGES`):

* "subject": the doer is replaced by an unrelated one (doctor -> farmer);
* "object":  what the action is done to is replaced (the sick child -> the sick horse);
* "antonym": an adjective or verb is replaced by one of opposite meaning or attitude
  (a delicious meal -> a terrible meal, praised -> punished).

Each example names the token positions CHANGED (the swapped token), SUBJECT, VERB and OBJECT (the last
token of each word; for a one-token word, the word) and END (the candidate's last token: "." for
GPT-2 style tokenizers, [SEP] for BERT). Positions count the BOS/[CLS] token that relp always
prepends. :class:`ContrastDataset` is a :class:`~relp.tasks.dataset.PromptDataset`, so batching
(``batches()``), the [batch, pos] accessors and :func:`~relp.tasks.dataset.aggregate_by_position`
work as for IOI::

    data = make_contrast_dataset(model, 32, changes="all", seed=0)
    for batch in data.batches():
        batch.clean_tokens, batch.corrupted_tokens    # [batch, pos] candidates to patch
        batch.anchor_texts                            # the fixed anchors the metric compares with
        batch.positions["CHANGED"]                    # [batch]

The word swaps were chosen so that on all-MiniLM-L6-v2 (mean pooling) every clean candidate is
clearly closer to its anchor than its corrupted one is: by 0.08 to 0.41 cosine (0.18 on average) on
all 197 pairs that its tokenizer allows (tests/test_contrast_task.py checks a sample).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from relp.tasks.dataset import PromptDataset
from relp.tokens import TaskTokenizer

CONTRAST_CHANGES: tuple[str, ...] = ("subject", "object", "antonym")
CONTRAST_POSITION_NAMES: tuple[str, ...] = ("CHANGED", "SUBJECT", "VERB", "OBJECT", "END")


# --- templates -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContrastTemplate:
    """A clean candidate sentence, its anchor paraphrase, and the words that may replace its words.

    ``subject``, ``verb`` and ``object`` are words of ``clean`` (each occurring once as a whole word);
    ``subject_swaps``/``object_swaps`` replace the subject/object word ("subject"/"object" changes),
    ``antonym`` is (a word of ``clean``, its replacements) for the "antonym" change. Replacements
    keep the sentence grammatical (same number, same article) but change what it means.
    """

    id: str
    anchor: str
    clean: str
    subject: str
    verb: str
    object: str
    subject_swaps: tuple[str, ...] = ()
    object_swaps: tuple[str, ...] = ()
    antonym: tuple[str, tuple[str, ...]] | None = None

    def __post_init__(self):
        for role in ("subject", "verb", "object"):
            _word_span(self.clean, getattr(self, role), f"template {self.id!r}: the {role}")
        for change, (word, replacements) in self.swaps.items():
            _word_span(self.clean, word, f"template {self.id!r}: the {change} word")
            for replacement in replacements:
                if not re.fullmatch(r"[A-Za-z]+", replacement) or replacement.lower() == word.lower():
                    raise ValueError(
                        f"template {self.id!r}: replacement {replacement!r} for {word!r} must be one "
                        "word of letters that differs from it"
                    )

    @property
    def swaps(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """{change kind: (word of ``clean``, its replacements)} for the kinds this template offers."""
        swaps = {}
        if self.subject_swaps:
            swaps["subject"] = (self.subject, tuple(self.subject_swaps))
        if self.object_swaps:
            swaps["object"] = (self.object, tuple(self.object_swaps))
        if self.antonym is not None:
            swaps["antonym"] = (self.antonym[0], tuple(self.antonym[1]))
        return swaps

    def corrupt(self, change: str, replacement: str) -> str:
        """``clean`` with the word of `change` replaced by `replacement`."""
        word = self.swaps[change][0]
        start, end = _word_span(self.clean, word, f"template {self.id!r}")
        return self.clean[:start] + replacement + self.clean[end:]


def _word_span(text: str, word: str, what: str = "the word") -> tuple[int, int]:
    """(start, end) character span of `word` in `text`, which must contain it once as a whole word."""
    matches = [m.span() for m in re.finditer(rf"(?<![\w']){re.escape(word)}(?![\w'])", text)]
    if len(matches) != 1:
        raise ValueError(f"{what} {word!r} must occur exactly once as a whole word in {text!r}")
    return matches[0]


def _template(id, anchor, clean, svo, *, subjects=(), objects=(), antonym=None) -> ContrastTemplate:
    subject, verb, obj = svo.split()
    return ContrastTemplate(id, anchor, clean, subject, verb, obj, tuple(subjects), tuple(objects), antonym)


# Replacements were kept where all-MiniLM-L6-v2 puts the corrupted candidate at least ~0.08 cosine
# below the clean one (most are 0.1-0.4 below). Antonyms that such models barely separate from their
# opposite (cheap/expensive, bought/sold, passed/failed) are left out for that reason.
_TEMPLATES: tuple[ContrastTemplate, ...] = (
    _template(
        "clinic", "A physician checked on the ill kid.", "The doctor examined the sick child.",
        "doctor examined child",
        subjects=("farmer", "painter", "singer", "tourist", "soldier", "lawyer"),
        objects=("horse", "car", "tree", "painting", "engine"),
        antonym=("examined", ("ignored", "abandoned")),
    ),
    _template(
        "kitchen", "The cook prepared a tasty dinner.", "The chef cooked a delicious meal.",
        "chef cooked meal",
        subjects=("pilot", "soldier", "farmer", "lawyer", "student", "robot"),
        antonym=("delicious", ("disgusting", "terrible", "horrible")),
    ),
    _template(
        "classroom", "The instructor complimented the smart pupil.", "The teacher praised the clever student.",
        "teacher praised student",
        subjects=("soldier", "farmer", "chef", "police"),
        objects=("dog", "horse", "painting", "car", "soldier"),
        antonym=("praised", ("scolded", "punished", "criticized", "insulted")),
    ),
    _template(
        "park", "A puppy ran after the red ball.", "The dog chased the red ball.",
        "dog chased ball",
        subjects=("boy", "girl", "man", "woman", "child", "police"),
        objects=("cat", "car", "bus", "thief", "truck"),
        antonym=("chased", ("ignored", "avoided")),
    ),
    _template(
        "firm", "The business employed lots of new staff.", "The company hired many new workers.",
        "company hired workers",
        objects=("horses", "robots", "cars", "machines"),
        antonym=("hired", ("fired", "dismissed")),
    ),
    _template(
        "purchase", "An elderly gentleman purchased a new vehicle.", "The old man bought a new car.",
        "man bought car",
        subjects=("woman", "dog", "farmer", "soldier"),
        objects=("house", "boat", "horse", "dog", "book", "phone"),
        antonym=("new", ("broken", "damaged")),
    ),
    _template(
        "cinema", "The kids liked the thrilling film.", "The children enjoyed the exciting movie.",
        "children enjoyed movie",
        subjects=("soldiers", "doctors", "teachers", "parents", "dogs"),
        objects=("soup", "lesson", "game", "trip", "meal", "book"),
        antonym=("enjoyed", ("hated", "disliked")),
    ),
    _template(
        "arrest", "Officers detained the violent offender.", "The police arrested the dangerous criminal.",
        "police arrested criminal",
        subjects=("children", "doctors", "farmers", "students"),
        objects=("child", "doctor", "teacher", "priest", "tourist"),
        antonym=("arrested", ("helped", "thanked", "rewarded", "praised")),
    ),
    _template(
        "storm", "The hurricane wrecked the ancient bridge.", "The storm destroyed the old bridge.",
        "storm destroyed bridge",
        subjects=("army", "workers", "fire", "children", "engineers"),
        objects=("school", "garden", "car", "ship", "forest"),
        antonym=("destroyed", ("built", "repaired", "spared")),
    ),
    _template(
        "match", "The squad was victorious in the big game.", "The team won the important match.",
        "team won match",
        subjects=("children", "doctors", "dogs", "students"),
        objects=("election", "lottery", "contract"),
        antonym=("important", ("meaningless", "unimportant", "minor")),
    ),
    _template(
        "studio", "The painter created a lovely image.", "The artist painted a beautiful picture.",
        "artist painted picture",
        subjects=("child", "monkey", "robot", "soldier", "dog"),
        objects=("house", "wall", "fence", "car", "boat"),
        antonym=("beautiful", ("hideous", "terrible", "horrible")),
    ),
    _template(
        "hunt", "A kitten captured a tiny rodent.", "The cat caught a small mouse.",
        "cat caught mouse",
        subjects=("boy", "farmer", "owl", "fisherman"),
        objects=("fish", "bird", "cold", "bus", "train"),
        antonym=("small", ("huge", "giant")),
    ),
    _template(
        "shop", "The buyer gave back the damaged cellphone.", "The customer returned the broken phone.",
        "customer returned phone",
        subjects=("dog", "child", "soldier"),
        objects=("car", "dog", "book", "ticket", "shirt"),
    ),
    _template(
        "hotel", "The inn provided an inexpensive room.", "The hotel offered a cheap room.",
        "hotel offered room",
        subjects=("hospital", "school", "prison", "farmer"),
        objects=("meal", "ticket", "car"),
        antonym=("cheap", ("luxurious", "lavish")),
    ),
    _template(
        "service", "The visitors complimented the excellent staff.", "The guests praised the wonderful service.",
        "guests praised service",
        objects=("weather", "food", "music"),
        antonym=("wonderful", ("terrible", "awful", "poor", "horrible")),
    ),
    _template(
        "garden", "Someone tending the garden gave water to the lovely flowers.",
        "The gardener watered the beautiful plants.",
        "gardener watered plants",
        subjects=("baby", "dog", "soldier", "pilot"),
        objects=("car", "dog", "road", "floor"),
        antonym=("watered", ("killed", "destroyed")),
    ),
    _template(
        "farm", "The rancher gave food to the starving cattle.", "The farmer fed the hungry cows.",
        "farmer fed cows",
        subjects=("pilot", "lawyer", "child", "robot", "dentist"),
        objects=("children", "students", "fish", "pigs"),
    ),
    _template(
        "bakery", "The bakery owner offered freshly baked loaves.", "The baker sold fresh bread.",
        "baker sold bread",
        subjects=("soldier", "pilot", "doctor", "farmer"),
        objects=("cars", "shoes", "books", "flowers"),
        antonym=("fresh", ("stale", "rotten", "moldy")),
    ),
    _template(
        "ward", "A caregiver calmed the scared patient.", "The nurse comforted the frightened patient.",
        "nurse comforted patient",
        subjects=("lawyer", "clown", "thief"),
        objects=("horse", "puppy", "soldier", "tourist"),
    ),
)  # fmt: skip

CONTRAST_TEMPLATES: dict[str, ContrastTemplate] = {t.id: t for t in _TEMPLATES}


def contrast_words(templates: Iterable[ContrastTemplate] | None = None) -> tuple[str, ...]:
    """Every word and punctuation mark of the templates (anchors, candidates, replacements), sorted.

    A vocabulary for :func:`relp.testing.tiny_model` (``words=contrast_words()``), whose word-level
    tokenizer splits text the same way (words and punctuation).
    """
    templates = CONTRAST_TEMPLATES.values() if templates is None else templates
    words: set[str] = set()
    for t in templates:
        words.update(re.findall(r"\w+|[^\w\s]+", f"{t.anchor} {t.clean}"))
        for _, replacements in t.swaps.values():
            words.update(replacements)
    return tuple(sorted(words))


# --- examples and datasets -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ContrastExample:
    """One anchor with its clean (paraphrase) and corrupted (one word swapped) candidate.

    ``clean_tokens``/``corrupted_tokens`` are the candidates' tokens (BOS first), of equal length and
    different only at ``positions["CHANGED"]``, where ``changed_word`` became ``replacement``.
    ``change`` is the kind of swap (one of :data:`CONTRAST_CHANGES`). ``positions`` index the
    candidates' tokens (the same in both). ``anchor_tokens`` may have any length.
    """

    anchor_text: str
    clean_text: str
    corrupted_text: str
    anchor_tokens: Int[Tensor, " anchor_pos"]
    clean_tokens: Int[Tensor, " pos"]
    corrupted_tokens: Int[Tensor, " pos"]
    changed_word: str
    replacement: str
    change: str
    positions: Mapping[str, int]
    anchor_str_tokens: tuple[str, ...] = ()
    clean_str_tokens: tuple[str, ...] = ()
    corrupted_str_tokens: tuple[str, ...] = ()
    template_id: str = ""
    index: int = 0

    def __post_init__(self):
        if self.clean_tokens.ndim != 1 or self.clean_tokens.shape != self.corrupted_tokens.shape:
            raise ValueError(
                f"example {self.index}: clean and corrupted tokens must be 1-D and of equal length; got "
                f"shapes {tuple(self.clean_tokens.shape)} and {tuple(self.corrupted_tokens.shape)}"
            )
        if self.anchor_tokens.ndim != 1:
            raise ValueError(
                f"example {self.index}: anchor tokens must be 1-D; got shape {tuple(self.anchor_tokens.shape)}"
            )
        for name, position in self.positions.items():
            if not 0 <= position < self.length:
                raise ValueError(
                    f"example {self.index}: position {name}={position} is outside the candidate's "
                    f"{self.length} tokens"
                )
        if "CHANGED" not in self.positions:
            raise ValueError(f"example {self.index}: positions {dict(self.positions)} must name CHANGED")
        differ = torch.nonzero(self.clean_tokens != self.corrupted_tokens).flatten().tolist()
        if not differ or differ[0] != self.positions["CHANGED"]:
            raise ValueError(
                f"example {self.index}: CHANGED={self.positions['CHANGED']} must be the first position "
                f"where clean and corrupted tokens differ; they differ at {differ}"
            )

    @property
    def length(self) -> int:
        """Number of candidate tokens, BOS included."""
        return int(self.clean_tokens.shape[0])

    @property
    def layout(self) -> tuple[int, tuple[tuple[str, int], ...]]:
        """(length, named positions): examples with one layout stack and share position labels."""
        return self.length, tuple(self.positions.items())

    @property
    def changed_positions(self) -> tuple[int, ...]:
        """Every position where clean and corrupted tokens differ (generated examples: CHANGED only)."""
        return tuple(torch.nonzero(self.clean_tokens != self.corrupted_tokens).flatten().tolist())


_NO_ANSWERS = (
    "a ContrastDataset has no answer tokens: its metric compares the candidate's embedding with the "
    "anchor's (anchor_texts, anchor_tokens), e.g. by cosine similarity"
)


@dataclass(eq=False)
class ContrastDataset(PromptDataset):
    """An ordered set of :class:`ContrastExample`; a :class:`PromptDataset` without answer tokens.

    Indexing, ``batches()`` (one token length and one set of named positions per batch), the
    [batch, pos] accessors (``clean_tokens``, ``corrupted_tokens``), ``positions``, ``str_tokens``,
    ``position_masks()`` and :func:`~relp.tasks.dataset.aggregate_by_position` work as for a
    PromptDataset. ``changes`` are the change kinds the dataset was generated with.
    """

    changes: tuple[str, ...] = ()

    def __post_init__(self):
        self.examples = tuple(self.examples)
        for example in self.examples:
            if not isinstance(example, ContrastExample):
                raise TypeError(
                    f"a ContrastDataset holds ContrastExample objects; got {type(example).__name__}"
                )
        super().__post_init__()

    def __repr__(self) -> str:
        return (
            f"ContrastDataset(changes={self.changes}, n={len(self)}, lengths={sorted(set(self.lengths))}, "
            f"positions={self.position_names})"
        )

    def _require_equal_length(self) -> None:
        lengths = sorted(set(self.lengths))
        if len(lengths) > 1:
            raise ValueError(
                f"the candidates have {len(lengths)} different token lengths {lengths}; iterate over "
                "dataset.batches() for equal-length batches"
            )
        super()._require_equal_length()

    # --- per-example accessors -------------------------------------------------------------------

    @property
    def anchor_texts(self) -> list[str]:
        """The anchor sentence of each example (not patched; compare embeddings with it)."""
        return [example.anchor_text for example in self.examples]

    @property
    def anchor_tokens(self) -> list[Int[Tensor, " anchor_pos"]]:
        """Each anchor's tokens (BOS first), on ``device``; a list, since anchors differ in length."""
        return [example.anchor_tokens.to(self.device) for example in self.examples]

    @property
    def anchor_str_tokens(self) -> list[tuple[str, ...]]:
        """Each anchor's tokens as strings (BOS first)."""
        return [example.anchor_str_tokens for example in self.examples]

    @property
    def changed_words(self) -> list[str]:
        """The clean word that each corrupted candidate replaces."""
        return [example.changed_word for example in self.examples]

    @property
    def replacements(self) -> list[str]:
        """The word that replaces it in each corrupted candidate."""
        return [example.replacement for example in self.examples]

    @property
    def kinds(self) -> list[str]:
        """Each example's change kind ("subject", "object" or "antonym")."""
        return [example.change for example in self.examples]

    # --- a contrast pair has no answer tokens ----------------------------------------------------

    @property
    def answer_tokens(self):
        raise AttributeError(_NO_ANSWERS)

    @property
    def wrong_tokens(self):
        raise AttributeError(_NO_ANSWERS)

    @property
    def corrupted_answer_tokens(self):
        raise AttributeError(_NO_ANSWERS)

    @property
    def corrupted_wrong_tokens(self):
        raise AttributeError(_NO_ANSWERS)


# --- tokenizing ----------------------------------------------------------------------------------


def _piece(str_token: str) -> str:
    """A token string as plain lower-case text: without spaces, word-piece "##" or "▁"/"Ġ" marks."""
    text = str_token.strip().lstrip("▁Ġ")
    return (text[2:] if text.startswith("##") else text).lower()


def _word_end_position(tok: TaskTokenizer, text: str, word: str, ids: list[int]) -> int | None:
    """Index in `ids` (the tokens of `text`) of the last token of `word`, or None if not readable.

    The tokens of the text up to the word's end must be a prefix of `ids`, up to special tokens that
    the tokenizer appends to every text (BERT's [SEP]), and the last of them must spell the end of
    the word.
    """
    prefix = tok.tokens(text[: _word_span(text, word)[1]])
    common = next((i for i, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
    rest = prefix[common:]
    if common < 2 or (rest and rest != ids[len(ids) - len(rest) :]):
        return None
    piece = _piece(tok.str_tokens([ids[common - 1]])[0])
    if not piece or not word.lower().endswith(piece):
        return None
    return common - 1


@dataclass
class _TemplateTokens:
    """A template's tokenized anchor and clean candidate with its named word positions."""

    anchor_ids: list[int]
    clean_ids: list[int]
    positions: dict[str, int]  # SUBJECT, VERB, OBJECT
    word_positions: dict[str, int | None] = field(default_factory=dict)  # swapped word -> position


def _tokenize_template(tok: TaskTokenizer, template: ContrastTemplate) -> _TemplateTokens | None:
    clean_ids = tok.tokens(template.clean)
    positions = {}
    for name in ("SUBJECT", "VERB", "OBJECT"):
        position = _word_end_position(tok, template.clean, getattr(template, name.lower()), clean_ids)
        if position is None:
            return None
        positions[name] = position
    word_positions = {
        word: _word_end_position(tok, template.clean, word, clean_ids) for word, _ in template.swaps.values()
    }
    return _TemplateTokens(tok.tokens(template.anchor), clean_ids, positions, word_positions)


# --- the generator -------------------------------------------------------------------------------


def _resolve_changes(changes: str | Sequence[str]) -> tuple[str, ...]:
    """The change kinds named by `changes` ("all", one kind, or a sequence of kinds), in canonical order."""
    if isinstance(changes, str):
        changes = CONTRAST_CHANGES if changes == "all" else (changes,)
    changes = tuple(changes)
    unknown = [c for c in changes if c not in CONTRAST_CHANGES]
    if unknown or not changes:
        raise ValueError(
            f"unknown change kind(s) {unknown or changes!r}; expected 'all' or some of {CONTRAST_CHANGES}"
        )
    return tuple(c for c in CONTRAST_CHANGES if c in changes)


def _resolve_templates(templates) -> list[ContrastTemplate]:
    if templates is None:
        return list(CONTRAST_TEMPLATES.values())
    if isinstance(templates, (str, ContrastTemplate)):
        templates = [templates]
    chosen = []
    for t in templates:
        if isinstance(t, ContrastTemplate):
            chosen.append(t)
        elif t in CONTRAST_TEMPLATES:
            chosen.append(CONTRAST_TEMPLATES[t])
        else:
            raise ValueError(
                f"unknown contrast template {t!r}; expected a ContrastTemplate or one of {sorted(CONTRAST_TEMPLATES)}"
            )
    if not chosen:
        raise ValueError("no templates given")
    return chosen


def _round_robin(groups: list[list], rng: random.Random) -> list:
    """The items of all groups, taking one from each group in turn (group order shuffled)."""
    groups = [list(g) for g in groups if g]
    rng.shuffle(groups)
    out = []
    while groups:
        out.extend(g.pop(0) for g in groups)
        groups = [g for g in groups if g]
    return out


def make_contrast_dataset(
    model_or_tokenizer,
    n: int,
    *,
    changes: str | Sequence[str] = "all",
    seed: int = 0,
    templates: str | ContrastTemplate | Sequence[str | ContrastTemplate] | None = None,
) -> ContrastDataset:
    """`n` distinct anchor/clean/corrupted triples from the templates, deterministic for a seed.

    Args:
        model_or_tokenizer: a TransformerBridge (tokens as :func:`relp.tokens.to_tokens` gives them:
            BOS first, and [SEP] last for BERT), a Hugging Face tokenizer, or any object with
            ``to_tokens(text, prepend_bos=True)`` and ``to_str_tokens(tokens)``.
        n: number of examples. Pairs where the swapped word or its replacement is not a single
            token (or the template's subject, verb or object cannot be located) are skipped; asking
            for more pairs than remain is an error.
        changes: "all" or some of "subject", "object", "antonym" (see :data:`CONTRAST_CHANGES`).
        seed: seeds ``random.Random``; the examples alternate between the change kinds and, within
            a kind, between templates, so small datasets are balanced.
        templates: template ids or :class:`ContrastTemplate` objects (default: all of
            :data:`CONTRAST_TEMPLATES`).

    Returns:
        A ContrastDataset whose examples name the positions CHANGED, SUBJECT, VERB, OBJECT and END.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int; got {n!r}")
    kinds = _resolve_changes(changes)
    chosen = _resolve_templates(templates)
    tok = TaskTokenizer.of(model_or_tokenizer)
    rng = random.Random(seed)
    per_kind = []
    for kind in kinds:
        per_template = []
        for template in chosen:
            if kind in template.swaps:
                options = [(template, kind, r) for r in template.swaps[kind][1]]
                rng.shuffle(options)
                per_template.append(options)
        per_kind.append(_round_robin(per_template, rng))
    candidates = _round_robin(per_kind, rng)
    if not candidates:
        raise ValueError(f"the templates {[t.id for t in chosen]} offer no swap of kind(s) {kinds}")

    examples: list[ContrastExample] = []
    tokenized: dict[str, _TemplateTokens | None] = {}
    skipped: list[str] = []
    for template, kind, replacement in candidates:
        if len(examples) == n:
            break
        if template.id not in tokenized:
            tokenized[template.id] = _tokenize_template(tok, template)
        example = _make_example(tok, template, tokenized[template.id], kind, replacement, len(examples))
        if isinstance(example, str):
            skipped.append(example)
        else:
            examples.append(example)
    if len(examples) < n:
        reasons = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        raise ValueError(
            f"asked for {n} contrast pairs with changes {kinds}, but only {len(examples)} of the "
            f"{len(candidates)} candidate pairs are usable with this tokenizer"
            + (f" ({len(skipped)} skipped: {reasons})" if skipped else "")
        )
    return ContrastDataset(tuple(examples), task="contrast", corruption=None, device=tok.device, changes=kinds)


def _make_example(
    tok: TaskTokenizer,
    template: ContrastTemplate,
    tokens: _TemplateTokens | None,
    kind: str,
    replacement: str,
    index: int,
) -> ContrastExample | str:
    """The example for one swap, or a string saying why the tokenizer rules it out."""
    word = template.swaps[kind][0]
    corrupted_text = template.corrupt(kind, replacement)
    if tokens is None:
        return f"template {template.id!r}: its subject, verb or object is not readable as tokens"
    clean_ids = tokens.clean_ids
    corrupted_ids = tok.tokens(corrupted_text)
    differ = [i for i, (a, b) in enumerate(zip(clean_ids, corrupted_ids)) if a != b]
    position = tokens.word_positions[word]
    if len(corrupted_ids) != len(clean_ids) or len(differ) != 1 or differ[0] != position:
        return f"{word!r} -> {replacement!r} in {template.id!r} is not a one-token swap"
    clean_str, corrupted_str = tok.str_tokens(clean_ids), tok.str_tokens(corrupted_ids)
    if _piece(clean_str[position]) != word.lower() or _piece(corrupted_str[position]) != replacement.lower():
        return f"{word!r} -> {replacement!r} in {template.id!r} is not a one-token swap"
    positions = {"CHANGED": position, **tokens.positions, "END": len(clean_ids) - 1}
    return ContrastExample(
        anchor_text=template.anchor,
        clean_text=template.clean,
        corrupted_text=corrupted_text,
        anchor_tokens=torch.tensor(tokens.anchor_ids, dtype=torch.long),
        clean_tokens=torch.tensor(clean_ids, dtype=torch.long),
        corrupted_tokens=torch.tensor(corrupted_ids, dtype=torch.long),
        changed_word=word,
        replacement=replacement,
        change=kind,
        positions={name: positions[name] for name in CONTRAST_POSITION_NAMES},
        anchor_str_tokens=tok.str_tokens(tokens.anchor_ids),
        clean_str_tokens=clean_str,
        corrupted_str_tokens=corrupted_str,
        template_id=template.id,
        index=index,
    )
