"""The indirect-object-identification (IOI) task of Wang et al. 2022, "Interpretability in the Wild".

A prompt such as "When Mary and John went to the store, John gave a drink to" names the indirect
object (IO, Mary) once and the subject (S, John) twice (S1, S2); a model that does the task predicts
" Mary" at the last token (END). The templates, names, places and objects below are the paper's.

Templates are written in prompt form, without the final IO mention to be predicted: [A] is the IO
name (one slot), [B] the subject (two slots: the first is S1, the second S2), [PLACE] and [OBJECT]
nouns. BABA templates mention the subject first, their ABBA mirrors the IO first.

>>> from relp.testing import tiny_model
>>> from relp.tasks import ioi_words, make_ioi_dataset
>>> model = tiny_model("gpt2", words=ioi_words())
>>> data = make_ioi_dataset(model, 8, corruption="s2_io_flip", same_length=True)
>>> data.clean_tokens.shape[0], sorted(data.positions)
(8, ['END', 'IO', 'S1', 'S2'])
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from relp.tasks.dataset import PromptDataset, PromptExample
from relp.tokens import TaskTokenizer

# --- the paper's data ----------------------------------------------------------------------------

BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
)

# The same templates with an extra clause before the names (the paper's BABA_LONG_TEMPLATES).
BABA_LONG_TEMPLATES: tuple[str, ...] = (
    "Then in the morning, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then in the morning, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then in the morning, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then in the morning, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then in the morning, [B] and [A] had a long argument, and afterwards [B] said to",
    "After taking a long break [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When soon afterwards [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When soon afterwards [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While spending time together [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While spending time together [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch in the afternoon, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, while spending time together [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then in the morning afterwards, [B] and [A] had a long argument. Afterwards [B] said to",
    "The local big [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends separated at birth [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
)


def mirror_template(template: str) -> str:
    """The ABBA form of a BABA template: the first [B] and the first [A] swapped."""
    first_b, first_a = template.index("[B]"), template.index("[A]")
    if first_b > first_a:
        raise ValueError(f"not a BABA template (IO named before S): {template!r}")
    return template[:first_b] + "[A]" + template[first_b + 3 : first_a] + "[B]" + template[first_a + 3 :]


ABBA_TEMPLATES: tuple[str, ...] = tuple(mirror_template(t) for t in BABA_TEMPLATES)
ABBA_LONG_TEMPLATES: tuple[str, ...] = tuple(mirror_template(t) for t in BABA_LONG_TEMPLATES)

# Every template by id: "baba_00" ... "abba_14", "baba_long_00" ... "abba_long_14".
TEMPLATES: dict[str, str] = {
    f"{family}_{i:02d}": template
    for family, templates in (
        ("baba", BABA_TEMPLATES),
        ("abba", ABBA_TEMPLATES),
        ("baba_long", BABA_LONG_TEMPLATES),
        ("abba_long", ABBA_LONG_TEMPLATES),
    )
    for i, template in enumerate(templates)
}

# Names for `make_ioi_dataset(templates=...)`; "mixed" is the paper's default set.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "baba": tuple(k for k in TEMPLATES if k.startswith("baba_") and "long" not in k),
    "abba": tuple(k for k in TEMPLATES if k.startswith("abba_") and "long" not in k),
    "baba_long": tuple(k for k in TEMPLATES if k.startswith("baba_long_")),
    "abba_long": tuple(k for k in TEMPLATES if k.startswith("abba_long_")),
}
TEMPLATE_SETS["mixed"] = TEMPLATE_SETS["baba"] + TEMPLATE_SETS["abba"]
TEMPLATE_SETS["long"] = TEMPLATE_SETS["baba_long"] + TEMPLATE_SETS["abba_long"]
TEMPLATE_SETS["all"] = tuple(TEMPLATES)

NAMES: tuple[str, ...] = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda",
    "Daniel", "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason",
    "Justin", "Sarah", "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony",
    "Heather", "Eric", "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven", "Thomas",
    "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren", "Amber", "Brittany", "Danielle",
    "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal", "Michelle", "Tiffany", "Jeremy", "Benjamin",
    "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen", "Patrick", "Sean", "Erin",
    "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin", "Paul", "Angela", "Tyler", "Scott",
    "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis", "Lisa", "Kenneth", "Bryan",
    "Lindsey", "Kristen", "Jose", "Alexander", "Jesse", "Katie", "Lindsay", "Shannon", "Vanessa",
    "Courtney", "Christine", "Alicia", "Cody", "Allison", "Bradley", "Samuel",
)  # fmt: skip

PLACES: tuple[str, ...] = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS: tuple[str, ...] = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")

# Named positions of every IOI example, in this order. END is the last token (the one whose
# next-token prediction is scored).
POSITION_NAMES: tuple[str, ...] = ("IO", "S1", "S2", "END")
NAME_SLOTS: tuple[str, ...] = ("IO", "S1", "S2")


# --- corruptions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corruption:
    """How a corrupted prompt's names derive from the clean IO and S names.

    `corrupt(io, s, names, rng)` returns the names for the slots IO, S1, S2 of the corrupted prompt;
    `flips_answer` says the corrupted prompt's correct answer is the clean S name (and its wrong
    answer the clean IO name) rather than the clean answers.
    """

    name: str
    description: str
    corrupt: Callable[[str, str, Sequence[str], random.Random], dict[str, str]]
    flips_answer: bool


def _corrupt_abc(io: str, s: str, names: Sequence[str], rng: random.Random) -> dict[str, str]:
    a, b, c = rng.sample([name for name in names if name not in (io, s)], 3)
    return {"IO": a, "S1": b, "S2": c}


CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        Corruption("abc", "IO, S1 and S2 replaced by three other distinct names", _corrupt_abc, False),
        Corruption(
            "s2_io_flip", "S2 replaced by the IO name (the answer flips to S)",
            lambda io, s, names, rng: {"IO": io, "S1": s, "S2": io}, True,
        ),
        Corruption(
            "io_s_swap", "IO and S names swapped everywhere (the answer flips to S)",
            lambda io, s, names, rng: {"IO": s, "S1": io, "S2": io}, True,
        ),
    )
}


# --- templates -----------------------------------------------------------------------------------

_SLOT = re.compile(r"\[(A|B|PLACE|OBJECT)\]")


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and slots (IO, S1, S2, PLACE, OBJECT) in order."""

    id: str
    text: str
    parts: tuple[tuple[str, str | None], ...]  # (literal text before the slot, slot or None at the end)

    @classmethod
    def parse(cls, template_id: str, text: str) -> "Template":
        """Parse and check a template: one [A], two [B], every name slot after a space.

        A template in the paper's full-sentence form (ending in " [A]") has that last IO mention
        removed.
        """
        if text.endswith(" [A]") and text.count("[A]") == 2:
            text = text[: -len(" [A]")]
        problems = []
        if text.count("[A]") != 1 or text.count("[B]") != 2:
            n_a, n_b = text.count("[A]"), text.count("[B]")
            problems.append(f"needs one [A] (IO) and two [B] (S1, S2); has {n_a} and {n_b}")
        if text != text.strip():
            problems.append("starts or ends with whitespace")
        for match in _SLOT.finditer(text):
            if match.group(1) in ("A", "B") and (match.start() == 0 or text[match.start() - 1] != " "):
                problems.append(f"name slot {match.group(0)} at character {match.start()} must follow a space")
        if problems:
            raise ValueError(f"template {template_id!r} ({text!r}): " + "; ".join(problems))
        parts, start, b_seen = [], 0, 0
        for match in _SLOT.finditer(text):
            slot = {"A": "IO", "PLACE": "PLACE", "OBJECT": "OBJECT"}.get(match.group(1))
            if slot is None:
                b_seen += 1
                slot = f"S{b_seen}"
            parts.append((text[start : match.start()], slot))
            start = match.end()
        parts.append((text[start:], None))
        return cls(template_id, text, tuple(parts))

    @property
    def slots(self) -> set[str]:
        return {slot for _, slot in self.parts if slot is not None}

    def fill(self, words: Mapping[str, str]) -> tuple[str, dict[str, int]]:
        """The text with `words` (slot -> word) filled in, and the character end of each name slot."""
        text, ends = "", {}
        for literal, slot in self.parts:
            text += literal
            if slot is not None:
                text += words[slot]
                if slot in NAME_SLOTS:
                    ends[slot] = len(text)
        return text, ends


def _template_text(item) -> str:
    """`item` of a template list that is not a template id: template text, or a clear error when it is
    an unknown id, a set name or not a string (rather than a parse error of the name as text)."""
    if not isinstance(item, str):
        raise TypeError(f"templates must be template ids or template strings; got {type(item).__name__} {item!r}")
    if _SLOT.search(item) is None:
        ids = f"ids {next(iter(TEMPLATES))} ... {next(reversed(TEMPLATES))} (relp.tasks.TEMPLATES)"
        if item in TEMPLATE_SETS:
            raise ValueError(f"{item!r} is a template set, not a template: pass templates={item!r} (a string), not in a list")
        raise ValueError(
            f"unknown template {item!r}: not a template id and not template text (no [A], [B], [PLACE] or [OBJECT] slot); expected "
            f"{ids} or text such as 'Then, [B] and [A] went to the [PLACE]. [B] gave the [OBJECT] to'"
        )
    return item


def resolve_templates(templates: str | Sequence[str] = "all") -> list[Template]:
    """Parsed templates for a set name ("all", "mixed", "baba", "abba", "long", "baba_long",
    "abba_long"), or for a list of template ids (keys of TEMPLATES) and/or template strings."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(
                f"unknown template set {templates!r}; expected one of {sorted(TEMPLATE_SETS)} or a list"
            )
        return [Template.parse(key, TEMPLATES[key]) for key in TEMPLATE_SETS[templates]]
    parsed = [
        Template.parse(item, TEMPLATES[item]) if item in TEMPLATES else Template.parse(f"custom_{i:02d}", _template_text(item))
        for i, item in enumerate(templates)
    ]
    if not parsed:
        raise ValueError("no templates given")
    return parsed


def ioi_words(templates: str | Sequence[str] = "all") -> list[str]:
    """Every word and punctuation mark the IOI templates and pools use, split as
    :func:`relp.testing.tiny_tokenizer` splits text, so ``tiny_model(words=ioi_words())`` makes all
    of them single tokens."""
    text = " ".join([*(t.text for t in resolve_templates(templates)), *NAMES, *PLACES, *OBJECTS])
    words = re.findall(r"\w+|[^\w\s]+", _SLOT.sub(" ", text))
    return list(dict.fromkeys(words))


# --- vocabulary ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IOIVocabulary:
    """The names, places and objects that are one token (with a leading space) for a tokenizer,
    each mapped to that token id."""

    names: dict[str, int]
    places: dict[str, int]
    objects: dict[str, int]


def single_token_words(model_or_tokenizer, words: Sequence[str], *, prefix: str = " ") -> dict[str, int]:
    """{word: token id} for the words for which prefix + word (" Mary") is one known token."""
    return TaskTokenizer.of(model_or_tokenizer).single_token_words(words, prefix=prefix)


def ioi_vocabulary(
    model_or_tokenizer,
    *,
    names: Sequence[str] = NAMES,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
) -> IOIVocabulary:
    """The single-token subset of each word pool (multi-token and unknown words dropped)."""
    tok = TaskTokenizer.of(model_or_tokenizer)
    return IOIVocabulary(
        tok.single_token_words(names), tok.single_token_words(places), tok.single_token_words(objects)
    )


# --- the generator -------------------------------------------------------------------------------


def make_ioi_dataset(
    model_or_tokenizer,
    n_prompts: int,
    *,
    corruption: str = "abc",
    seed: int = 0,
    templates: str | Sequence[str] = "all",
    same_length: bool | int = False,
    names: Sequence[str] = NAMES,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
) -> PromptDataset:
    """`n_prompts` random IOI prompts with their corrupted counterparts, deterministic for a seed.

    Args:
        model_or_tokenizer: a TransformerBridge or a Hugging Face tokenizer; words that are not one
            token for it (with a leading space) are left out of the pools.
        corruption: "abc", "s2_io_flip" or "io_s_swap" (see CORRUPTIONS).
        seed: the clean prompts depend only on the seed, templates and pools, not on `corruption`,
            so datasets with different corruptions share their clean prompts.
        templates: a set name (see TEMPLATE_SETS: "all", "mixed", "baba", "abba", "long", ...) or a
            list of template ids / template strings.
        same_length: True keeps only the templates of the most common token length (ties: the
            shorter), an int keeps those of that length; the dataset then stacks into one batch.
        names, places, objects: word pools (defaults: the paper's).

    Returns:
        A PromptDataset whose examples name the positions IO, S1, S2, END.
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; expected one of {sorted(CORRUPTIONS)}")
    if n_prompts < 0:
        raise ValueError(f"n_prompts must be non-negative; got {n_prompts}")
    tok = TaskTokenizer.of(model_or_tokenizer)
    vocab = ioi_vocabulary(tok, names=names, places=places, objects=objects)
    chosen = _usable_templates(resolve_templates(templates), vocab, corruption)
    if same_length is not False:
        chosen = _templates_of_one_length(tok, chosen, vocab, same_length)
    name_pool, places, objects = list(vocab.names), list(vocab.places) or [""], list(vocab.objects) or [""]
    prompt_rng = random.Random(seed)
    corruption_rng = random.Random(f"relp.tasks.ioi corruption {seed}")
    examples = []
    for index in range(n_prompts):
        template = prompt_rng.choice(chosen)
        io, s = prompt_rng.sample(name_pool, 2)
        nouns = {"PLACE": prompt_rng.choice(places), "OBJECT": prompt_rng.choice(objects)}
        corrupted = CORRUPTIONS[corruption].corrupt(io, s, name_pool, corruption_rng)
        clean = {"IO": io, "S1": s, "S2": s}
        examples.append(_make_example(tok, vocab, template, clean, corrupted, nouns, corruption, index))
    return PromptDataset(tuple(examples), task="ioi", corruption=corruption, device=tok.device)


def _usable_templates(templates: list[Template], vocab: IOIVocabulary, corruption: str) -> list[Template]:
    """The templates whose slots the vocabulary can fill; an error if none or too few names."""
    needed_names = 5 if corruption == "abc" else 2
    if len(vocab.names) < needed_names:
        raise ValueError(
            f"only {len(vocab.names)} names are single tokens for this tokenizer ({list(vocab.names)}); "
            f"corruption {corruption!r} needs at least {needed_names}"
        )
    usable = [
        t for t in templates
        if ("PLACE" not in t.slots or vocab.places) and ("OBJECT" not in t.slots or vocab.objects)
    ]
    if not usable:
        raise ValueError(
            "no template can be filled: places that are single tokens: "
            f"{list(vocab.places)}, objects: {list(vocab.objects)}"
        )
    return usable


def _templates_of_one_length(
    tok: TaskTokenizer, templates: list[Template], vocab: IOIVocabulary, length: bool | int
) -> list[Template]:
    """The templates of one token length: `length` if an int, else the most common length."""
    fill = {
        "IO": next(iter(vocab.names)), "S1": list(vocab.names)[1], "S2": list(vocab.names)[1],
        "PLACE": next(iter(vocab.places), ""), "OBJECT": next(iter(vocab.objects), ""),
    }  # fmt: skip
    lengths = {t.id: len(tok.tokens(t.fill(fill)[0])) for t in templates}
    counts = Counter(lengths.values())
    if length is True:
        length = min(counts, key=lambda n: (-counts[n], n))
    kept = [t for t in templates if lengths[t.id] == length]
    if not kept:
        raise ValueError(
            f"no template has {length} tokens; the templates have lengths {dict(sorted(counts.items()))}"
        )
    return kept


def _make_example(
    tok: TaskTokenizer,
    vocab: IOIVocabulary,
    template: Template,
    clean_names: dict[str, str],
    corrupted_names: dict[str, str],
    nouns: dict[str, str],
    corruption: str,
    index: int,
) -> PromptExample:
    """Fill, tokenize and check one clean/corrupted pair."""
    clean_text, name_ends = template.fill({**clean_names, **nouns})
    corrupted_text, _ = template.fill({**corrupted_names, **nouns})
    clean_ids, corrupted_ids = tok.tokens(clean_text), tok.tokens(corrupted_text)
    positions = {
        slot: _name_position(tok, clean_text, name_ends[slot], clean_ids, vocab.names[clean_names[slot]])
        for slot in NAME_SLOTS
    }
    positions = {name: positions.get(name, len(clean_ids) - 1) for name in POSITION_NAMES}
    assert len(clean_ids) == len(corrupted_ids), (clean_text, corrupted_text)
    for slot in NAME_SLOTS:
        assert corrupted_ids[positions[slot]] == vocab.names[corrupted_names[slot]], (corrupted_text, slot)
    io, s = clean_names["IO"], clean_names["S1"]
    answer, wrong = (s, io) if CORRUPTIONS[corruption].flips_answer else (io, s)
    return PromptExample(
        clean_text=clean_text,
        corrupted_text=corrupted_text,
        clean_tokens=torch.tensor(clean_ids, dtype=torch.long),
        corrupted_tokens=torch.tensor(corrupted_ids, dtype=torch.long),
        answer=" " + io,
        wrong_answer=" " + s,
        answer_token=vocab.names[io],
        wrong_token=vocab.names[s],
        corrupted_answer=" " + answer,
        corrupted_wrong_answer=" " + wrong,
        corrupted_answer_token=vocab.names[answer],
        corrupted_wrong_token=vocab.names[wrong],
        positions=positions,
        clean_str_tokens=tok.str_tokens(clean_ids),
        corrupted_str_tokens=tok.str_tokens(corrupted_ids),
        template_id=template.id,
        index=index,
        names=dict(clean_names),
        corrupted_names=dict(corrupted_names),
    )


def _name_position(tok: TaskTokenizer, text: str, end: int, ids: list[int], name_token: int) -> int:
    """Token index of the name that ends at character `end` of `text` (BOS counted)."""
    prefix = tok.tokens(text[:end])
    if prefix != ids[: len(prefix)] or prefix[-1] != name_token:
        raise ValueError(
            f"the tokenizer does not split {text!r} after the name ending at character {end} into the "
            f"name's own token; prefix tokens {list(tok.str_tokens(prefix))}"
        )
    return len(prefix) - 1
