"""Paraphrase pairs with a known aligned word, for testing explanations of a similarity.

Built from the contrast templates (:mod:`relp.tasks.contrast`): each template has a sentence ("clean")
and a paraphrase of it (its "anchor"). Here the same word X is put into the same role of both, the
subject or the object, so that the pair stays a paraphrase and X is, by construction, the token of A
that matches the token X of B::

    A: "The farmer examined the sick child."      (the clinic template, subject doctor -> farmer)
    B: "A farmer checked on the ill kid."         (its paraphrase, subject physician -> farmer)
    aligned pair: ("farmer" in A, "farmer" in B)

The words X are the template's subject and object swaps (the replacements of the contrast task), used
only where X is one token in both sentences and occurs once in each. :data:`ANCHOR_ROLES` names the
paraphrase's subject and object words (the anchors are free text; the candidates' roles are in the
templates). The pair generator is deterministic for a seed and alternates between templates and roles.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from relp.tasks.contrast import CONTRAST_TEMPLATES, ContrastTemplate, _piece, _word_end_position, _word_span
from relp.tokens import TaskTokenizer

ALIGNED_ROLES: tuple[str, ...] = ("subject", "object")
CONSTRUCTIONS: tuple[str, ...] = ("paraphrase", "unrelated")

#: template id -> {role: the word of the template's anchor (paraphrase) in that role}. A role is missing
#: where the anchor has no single word for it ("Someone tending the garden" has no one-word subject).
ANCHOR_ROLES: dict[str, dict[str, str]] = {
    "clinic": {"subject": "physician", "object": "kid"},
    "kitchen": {"subject": "cook", "object": "dinner"},
    "classroom": {"subject": "instructor", "object": "pupil"},
    "park": {"subject": "puppy", "object": "ball"},
    "firm": {"subject": "business", "object": "staff"},
    "purchase": {"subject": "gentleman", "object": "vehicle"},
    "cinema": {"subject": "kids", "object": "film"},
    "arrest": {"subject": "Officers", "object": "offender"},
    "storm": {"subject": "hurricane", "object": "bridge"},
    "match": {"subject": "squad", "object": "game"},
    "studio": {"subject": "painter", "object": "image"},
    "hunt": {"subject": "kitten", "object": "rodent"},
    "shop": {"subject": "buyer", "object": "cellphone"},
    "hotel": {"subject": "inn", "object": "room"},
    "service": {"subject": "visitors", "object": "staff"},
    "garden": {"object": "flowers"},
    "farm": {"subject": "rancher", "object": "cattle"},
    "bakery": {"subject": "owner", "object": "loaves"},
    "ward": {"subject": "caregiver", "object": "patient"},
}


@dataclass(frozen=True)
class AlignedPair:
    """Two paraphrases sharing the word ``word`` in one role; ``position_a``/``position_b`` index its token
    in each text's tokens (BOS/[CLS] first, as :func:`relp.to_tokens` gives them)."""

    text_a: str
    text_b: str
    word: str
    role: str
    template_id: str
    position_a: int
    position_b: int
    tokens_a: tuple[str, ...]
    tokens_b: tuple[str, ...]
    construction: str = "paraphrase"
    #: further aligned pairs known by construction (paraphrase: the other role's words, e.g. child/kid)
    also_aligned: tuple[tuple[int, int], ...] = ()

    @property
    def aligned(self) -> tuple[int, int]:
        """(position in A, position in B) of the aligned token pair."""
        return self.position_a, self.position_b


def _replace_word(text: str, word: str, replacement: str) -> tuple[str, str] | None:
    """(`text` with its one whole-word occurrence of `word` replaced, the replacement capitalised like
    `word`; that replacement as written), or None."""
    try:
        start, end = _word_span(text, word)
    except ValueError:
        return None
    if word[:1].isupper():
        replacement = replacement[:1].upper() + replacement[1:]
    return text[:start] + replacement + text[end:], replacement


def _occurs_once(text: str, word: str) -> bool:
    return len(re.findall(rf"(?<![\w']){re.escape(word)}(?![\w'])", text, flags=re.IGNORECASE)) == 1


def _single_token_position(tok: TaskTokenizer, text: str, word: str) -> tuple[int, tuple[str, ...]] | None:
    """(position of `word`'s token in `text`'s tokens, the tokens as strings), or None unless `word` is
    exactly one token there."""
    ids = tok.tokens(text)
    position = _word_end_position(tok, text, word, ids)
    if position is None:
        return None
    str_tokens = tok.str_tokens(ids)
    if _piece(str_tokens[position]) != word.lower():
        return None
    return position, tuple(str_tokens)


def _other_role_pair(tok, template: ContrastTemplate, role: str, text_a: str, text_b: str) -> tuple[tuple[int, int], ...]:
    """The positions (in A, in B) of the other role's words of a paraphrase pair, where both are one token."""
    other = "object" if role == "subject" else "subject"
    word_b = ANCHOR_ROLES[template.id].get(other)
    word_a = getattr(template, other)
    if word_b is None or not (_occurs_once(text_a, word_a) and _occurs_once(text_b, word_b)):
        return ()
    in_a, in_b = _single_token_position(tok, text_a, word_a), _single_token_position(tok, text_b, word_b)
    return ((in_a[0], in_b[0]),) if in_a is not None and in_b is not None else ()


def _candidates(templates: Sequence[ContrastTemplate], roles: Sequence[str]) -> list[list[tuple[ContrastTemplate, str, str]]]:
    groups = []
    for template in templates:
        for role in roles:
            if role in template.swaps and role in ANCHOR_ROLES.get(template.id, {}):
                groups.append([(template, role, word) for word in template.swaps[role][1]])
    return groups


def _next_with_role(template: ContrastTemplate, role: str) -> ContrastTemplate:
    """The next template after `template` (cyclically, in :data:`ANCHOR_ROLES` order) whose paraphrase has
    a word in `role`: the unrelated sentence B of the ``"unrelated"`` construction."""
    ids = list(ANCHOR_ROLES)
    start = ids.index(template.id)
    for offset in range(1, len(ids)):
        candidate = ids[(start + offset) % len(ids)]
        if role in ANCHOR_ROLES[candidate]:
            return CONTRAST_TEMPLATES[candidate]
    raise ValueError(f"no other template has a paraphrase with a {role}")


def make_aligned_pairs(
    model_or_tokenizer,
    n: int | None = None,
    *,
    seed: int = 0,
    roles: str | Sequence[str] = ALIGNED_ROLES,
    templates: Sequence[str] | None = None,
    construction: str = "paraphrase",
) -> list[AlignedPair]:
    """Paraphrase pairs with one known aligned word each (see the module docstring).

    Args:
        model_or_tokenizer: a TransformerBridge, a Hugging Face tokenizer, or anything
            :class:`relp.tokens.TaskTokenizer` accepts.
        n: number of pairs (default: every usable pair). More than there are is an error.
        seed: order of the pairs (templates and roles alternate, shuffled by ``random.Random(seed)``).
        roles: "subject", "object" or both (default).
        templates: template ids (default: every template of :data:`ANCHOR_ROLES`).
        construction: ``"paraphrase"`` (B is A's own paraphrase: X is the known aligned pair, and the
            other role's words, e.g. child/kid, are recorded in ``also_aligned``; the paraphrase has
            further synonym pairs, e.g. sick/ill, that nothing records) or ``"unrelated"`` (B is the
            paraphrase of the *next* template in the list, a sentence about something else, with X in the
            same role: (X, X) is then the only aligned pair of content words).
    """
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction must be one of {CONSTRUCTIONS}; got {construction!r}")
    roles = (roles,) if isinstance(roles, str) else tuple(roles)
    unknown_roles = [r for r in roles if r not in ALIGNED_ROLES]
    if unknown_roles or not roles:
        raise ValueError(f"roles must be some of {ALIGNED_ROLES}; got {roles!r}")
    ids = list(ANCHOR_ROLES) if templates is None else list(templates)
    unknown = [t for t in ids if t not in ANCHOR_ROLES]
    if unknown:
        raise ValueError(f"unknown template(s) {unknown}; expected ids from {sorted(ANCHOR_ROLES)}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int or None (every pair); got {n!r}")
    tok = TaskTokenizer.of(model_or_tokenizer)
    rng = random.Random(seed)
    groups = _candidates([CONTRAST_TEMPLATES[t] for t in ids], roles)
    for group in groups:
        rng.shuffle(group)
    rng.shuffle(groups)
    ordered = []
    while groups:
        ordered.extend(g.pop(0) for g in groups)
        groups = [g for g in groups if g]

    pairs: list[AlignedPair] = []
    for template, role, word in ordered:
        if n is not None and len(pairs) == n:
            break
        text_a = template.corrupt(role, word)
        partner = template if construction == "paraphrase" else _next_with_role(template, role)
        replaced = _replace_word(partner.anchor, ANCHOR_ROLES[partner.id][role], word)
        if replaced is None:
            continue
        text_b, written = replaced
        if not (_occurs_once(text_a, word) and _occurs_once(text_b, word)):
            continue
        in_a, in_b = _single_token_position(tok, text_a, word), _single_token_position(tok, text_b, written)
        if in_a is None or in_b is None:
            continue
        also = _other_role_pair(tok, template, role, text_a, text_b) if construction == "paraphrase" else ()
        pairs.append(AlignedPair(
            text_a, text_b, word, role, template.id, in_a[0], in_b[0], in_a[1], in_b[1], construction, also
        ))
    if n is not None and len(pairs) < n:
        raise ValueError(f"asked for {n} aligned pairs; only {len(pairs)} are usable with this tokenizer (roles {roles})")
    return pairs
