"""Embedding models: the sentence-embedding readout, embedding metrics, and patching through them.

Oracles: the plain Hugging Face model (``last_hidden_state`` + pooling written out here) for the
readout, and patching done by hand with PyTorch hooks on an untouched float64 copy of the Hugging Face
BERT (its own module names: ``attention.output.dense``, ``output.dense``, ...) for activation and
attribution patching through an embedding metric.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import relp
from relp.embeddings import SentenceEmbedding, final_hidden_hook, read_sentence_transformers_pooling
from relp.loading import bridge_from_hf
from relp.metrics import CosineSimilarity, EmbeddingDistance, SimilarityDifference
from relp.testing import tiny_hf_model, tiny_tokenizer


def _n_hooks(model) -> int:
    return sum(len(h._forward_hooks) + len(h._backward_hooks) for h in model.hook_dict.values())


def _tiny_pair(architecture: str, dtype=torch.float32, seed: int = 0, weight_scale: float = 1.0):
    """(bridge, untouched HF copy) of one random-weight model.

    `weight_scale` multiplies every linear layer's weight: with the default initialisation (std 0.02)
    the blocks barely change the residual stream and GELU is nearly linear, so rules and patches would
    have tiny effects.
    """
    tokenizer = tiny_tokenizer()
    hf = tiny_hf_model(architecture, vocab_size=len(tokenizer), dtype=dtype, seed=seed)
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(weight_scale)
    reference = copy.deepcopy(hf)
    return bridge_from_hf(hf, tokenizer, name=f"tiny-{architecture}"), reference


def _base_model(hf):
    return getattr(hf, hf.base_model_prefix)  # bert, roberta, model (Llama), transformer (GPT-2)


def _pool(hidden, pooling):
    """Pooling written out (the attention mask is all ones: relp never pads)."""
    return {"mean": hidden.mean(1), "cls": hidden[:, 0], "last": hidden[:, -1], "max": hidden.max(1).values}[pooling]


def _tokens(model, n=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(6, model.cfg.d_vocab, (n, length), generator=g)
    tokens[:, 0] = 0
    corrupted = tokens.clone()
    corrupted[:, 3] = torch.randint(6, model.cfg.d_vocab, (n,), generator=g)
    return tokens, corrupted


# ----------------------------------------------------------------------------------------------
# The readout equals the Hugging Face model's last_hidden_state, pooled


@pytest.mark.parametrize("architecture", ["bert", "roberta", "llama", "gpt2"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "last", "max"])
def test_readout_matches_hugging_face_last_hidden_state(architecture, pooling):
    model, reference = _tiny_pair(architecture)
    tokens, _ = _tokens(model)
    with torch.no_grad():
        hidden = _base_model(reference)(tokens).last_hidden_state
        expected = _pool(hidden, pooling)
        got = SentenceEmbedding(pooling, normalize=False)(model, tokens)
        normalized = SentenceEmbedding(pooling)(model, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normalized, F.normalize(expected, dim=-1), rtol=1e-5, atol=1e-6)


def test_final_hidden_state_hook_per_architecture():
    bert, _ = _tiny_pair("bert")
    llama, _ = _tiny_pair("llama")
    # BERT's ln_final is the masked-LM head's norm, not part of the encoder
    assert final_hidden_hook(bert) == "blocks.1.hook_resid_post"
    assert final_hidden_hook(llama) == "ln_final.hook_out"


def test_readout_stops_before_the_head_and_leaves_no_hooks():
    model, _ = _tiny_pair("bert")
    tokens, _ = _tokens(model)
    before = _n_hooks(model)  # the BERT bridge keeps a few permanent hooks of its own
    head_calls = []
    handle = model.unembed.register_forward_hook(lambda *args: head_calls.append(1))
    try:
        SentenceEmbedding()(model, tokens)
    finally:
        handle.remove()
    assert head_calls == []
    assert _n_hooks(model) == before
    model(tokens)  # the model still runs normally afterwards


def test_embed_handles_texts_of_different_lengths_in_order():
    model, _ = _tiny_pair("llama")
    embedding = SentenceEmbedding("last")
    texts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9", "w10 w11"]
    together = embedding.embed(model, texts)
    one_by_one = torch.cat([embedding.embed(model, text) for text in texts])
    assert together.shape == (4, model.cfg.d_model)
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-6)


def test_readout_errors():
    model, _ = _tiny_pair("llama")
    with pytest.raises(ValueError, match="pooling must be one of"):
        SentenceEmbedding("sum")
    with pytest.raises(ValueError, match="no hook point 'blocks.9.hook_resid_post'"):
        SentenceEmbedding(hook="blocks.9.hook_resid_post")(model, _tokens(model)[0])
    with pytest.raises(ValueError, match="not loaded from a sentence-transformers checkpoint"):
        SentenceEmbedding.from_model(model)
    with pytest.raises(ValueError, match=r"\[batch, pos, d\]"):
        SentenceEmbedding().pool(torch.zeros(3, 4))


# ----------------------------------------------------------------------------------------------
# Metrics


def test_embedding_metrics_values():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(3, 5, generator=g, dtype=torch.float64)
    anchors = torch.randn(3, 5, generator=g, dtype=torch.float64)
    cos = torch.stack([torch.dot(a, b) / (a.norm() * b.norm()) for a, b in zip(e, anchors)])
    assert torch.allclose(CosineSimilarity(anchors)(e), cos.mean())
    assert torch.allclose(CosineSimilarity(anchors[0])(e), torch.stack([torch.dot(x, anchors[0]) / (x.norm() * anchors[0].norm()) for x in e]).mean())
    metric = SimilarityDifference(anchors, clean_value=0.5, corrupted_value=0.1)
    assert torch.allclose(metric(e), (cos.mean() - 0.1) / 0.4)
    raw = SimilarityDifference(anchors, clean_value=0.5, corrupted_value=0.1, normalized=False)
    assert torch.allclose(raw(e), cos.mean() - 0.1)
    distance = torch.stack([(x - a).pow(2).sum().sqrt() for x, a in zip(e, anchors)]).mean()
    assert torch.allclose(EmbeddingDistance(anchors)(e), distance)
    assert torch.allclose(EmbeddingDistance(anchors, kind="cosine")(e), 1 - cos.mean())


def test_embedding_metric_errors():
    e = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"one embedding \[5\] or one per text \[3, 5\]; got shape \(2, 5\)"):
        CosineSimilarity(torch.ones(2, 5))(e)
    with pytest.raises(ValueError, match=r"embeddings \[batch, d\]; got shape \(3, 4, 5\)"):
        CosineSimilarity(torch.ones(5))(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="undefined"):
        SimilarityDifference(torch.ones(5), clean_value=0.3, corrupted_value=0.3)
    with pytest.raises(ValueError, match="kind must be"):
        EmbeddingDistance(torch.ones(5), kind="manhattan")


def test_similarity_difference_is_one_on_clean_and_zero_on_corrupted():
    model, _ = _tiny_pair("bert")
    clean, corrupted = _tokens(model)
    anchors = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]
    metric = SimilarityDifference.from_runs(model, anchors, clean, corrupted)
    with torch.no_grad():
        assert metric(metric.readout(model, clean)).item() == pytest.approx(1.0, abs=1e-5)
        assert metric(metric.readout(model, corrupted)).item() == pytest.approx(0.0, abs=1e-5)
    # anchors given as embeddings instead of texts: the same metric
    given = SimilarityDifference.from_runs(model, metric.anchors, clean, corrupted)
    assert (given.clean_value, given.corrupted_value) == (metric.clean_value, metric.corrupted_value)
    # every score method sees the same base value: 0 on the corrupted run (denoising)
    result = relp.attribution_patching(model, clean, corrupted, metric, ["resid_pre"])
    assert result.metadata["base_metric"] == pytest.approx(0.0, abs=1e-5)
    assert result.metadata["readout"] == "embedding(mean, normalized)"


def test_logits_to_keep_is_refused_with_an_embedding_readout():
    model, _ = _tiny_pair("bert")
    clean, corrupted = _tokens(model)
    metric = CosineSimilarity(torch.ones(model.cfg.d_model))
    with pytest.raises(ValueError, match="logits_to_keep=1 applies to logits"):
        relp.activation_patching(model, clean, corrupted, metric, ["mlp_out"], logits_to_keep=1, progress=False)


# ----------------------------------------------------------------------------------------------
# Patching through an embedding metric, against patching done by hand on the Hugging Face BERT

# relp component -> (HF module under encoder.layer[l], which tensor: "out" = module output,
# "in" = module input). head: the input of the attention output projection, split into heads.
HF_SITES = {
    "resid_pre": ("", "in"),
    "resid_mid": ("attention.output", "out"),  # post-LN: LayerNorm(resid_pre + attention)
    "attn_out": ("attention.output.dense", "out"),
    "mlp_out": ("output.dense", "out"),
    "head": ("attention.output.dense", "in"),
}


class _HFSite:
    """Capture (and optionally replace) one tensor of the HF model with plain PyTorch hooks."""

    def __init__(self, layer_module, path, which):
        self.module = layer_module.get_submodule(path) if path else layer_module
        self.which = which
        self.value = None
        self.replace = None  # callable(tensor) -> tensor

    def __enter__(self):
        if self.which == "in":
            def pre(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                if self.replace is not None:
                    x = self.replace(x)
                self.value = x
                if args:
                    return (x, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": x}

            self.handle = self.module.register_forward_pre_hook(pre, with_kwargs=True)
        else:
            def post(module, args, output):
                if self.replace is not None:
                    output = self.replace(output)
                self.value = output
                return output

            self.handle = self.module.register_forward_hook(post)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _hf_embedding(reference, tokens):
    return F.normalize(_base_model(reference)(tokens).last_hidden_state.mean(1), dim=-1)


_ENCODERS: dict = {}


def _encoder64(architecture):
    """A float64 post-LN encoder bridge, its untouched HF copy, and a random anchor embedding."""
    if architecture not in _ENCODERS:
        model, reference = _tiny_pair(architecture, dtype=torch.float64, seed=3, weight_scale=8.0)
        g = torch.Generator().manual_seed(1)
        anchor = torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)
        _ENCODERS[architecture] = (model, reference, anchor)
    return _ENCODERS[architecture]


@pytest.fixture(scope="module")
def bert64():
    return _encoder64("bert")


@pytest.mark.parametrize("architecture", ["bert", "roberta"])
@pytest.mark.parametrize("component", list(HF_SITES))
def test_activation_patching_of_an_embedding_metric_matches_hand_patching(architecture, component):
    model, reference, anchor = _encoder64(architecture)
    clean, corrupted = _tokens(model, n=2, length=6)
    metric = CosineSimilarity(anchor)
    result = relp.activation_patching(model, clean, corrupted, metric, [component], progress=False)
    path, which = HF_SITES[component]
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    expected = torch.zeros_like(result[component])
    with torch.no_grad():
        base = metric(_hf_embedding(reference, corrupted))
        for layer, layer_module in enumerate(_base_model(reference).encoder.layer):
            with _HFSite(layer_module, path, which) as site:
                _hf_embedding(reference, clean)
                source = site.value.clone()
                cells = [(h, p) for h in range(n_heads) for p in range(clean.shape[1])] if component == "head" else [(p,) for p in range(clean.shape[1])]
                for cell in cells:
                    def patch(x, cell=cell):
                        x = x.clone()
                        if component == "head":
                            h, p = cell
                            x[:, p, h * d_head : (h + 1) * d_head] = source[:, p, h * d_head : (h + 1) * d_head]
                        else:
                            x[:, cell[0]] = source[:, cell[0]]
                        return x

                    site.replace = patch
                    expected[(layer, *cell)] = metric(_hf_embedding(reference, corrupted)) - base
                    site.replace = None
    assert expected.abs().max() > 1e-3  # the comparison is not between zeros
    torch.testing.assert_close(result[component], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("architecture", ["bert", "roberta"])
@pytest.mark.parametrize("component", list(HF_SITES))
def test_attribution_patching_of_an_embedding_metric_matches_hand_gradients(architecture, component):
    model, reference, anchor = _encoder64(architecture)
    clean, corrupted = _tokens(model, n=2, length=6)
    metric = CosineSimilarity(anchor)
    result = relp.attribution_patching(model, clean, corrupted, metric, [component])
    path, which = HF_SITES[component]
    expected = []
    for layer_module in _base_model(reference).encoder.layer:
        with _HFSite(layer_module, path, which) as site:
            with torch.no_grad():
                _hf_embedding(reference, clean)
            source = site.value.clone()
            with torch.enable_grad():
                value = metric(_hf_embedding(reference, corrupted))
                (grad,) = torch.autograd.grad(value, site.value)
        product = ((source - site.value.detach()) * grad).sum(0)  # [pos, d]
        if component == "head":
            product = product.view(product.shape[0], model.cfg.n_heads, model.cfg.d_head).sum(-1).T
        else:
            product = product.sum(-1)
        expected.append(product)
    expected = torch.stack(expected)
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(result[component], expected, rtol=1e-9, atol=1e-12)


def test_relevance_patching_of_an_embedding_metric_on_bert_with_every_rule(bert64):
    """All rules, the AH-rule through the attention fallback included, act on BERT through the readout:
    each changes the scores relative to plain gradients (their correctness is checked against float64
    references in test_rules_reference.py)."""
    model, _, anchor = bert64
    clean, corrupted = _tokens(model, n=2, length=6)
    metric = CosineSimilarity(anchor)
    before = _n_hooks(model)
    plain = relp.attribution_patching(model, clean, corrupted, metric, ["resid_pre"])
    for rules in ("ln", "identity", "ah", "attnlrp"):
        result = relp.relevance_patching(model, clean, corrupted, metric, ["resid_pre"], rules=[rules])
        assert result.rules == (rules,)
        change = (result["resid_pre"] - plain["resid_pre"]).abs().max() / plain["resid_pre"].abs().max()
        assert change > 1e-3, f"{rules} does not change the scores"
    assert _n_hooks(model) == before


def test_circuit_evaluator_with_an_embedding_metric(bert64):
    """Faithfulness runs on embedding metrics: the full model gives the clean value (1), and ablating
    the whole residual stream entering block 0 to its corrupted value gives the corrupted run (0)."""
    from relp.circuits import Circuit
    from relp.faithfulness import CircuitEvaluator

    model, _, _ = bert64
    clean, corrupted = _tokens(model, n=2, length=6)
    metric = SimilarityDifference.from_runs(model, ["w1 w2 w3", "w4 w5"], clean, corrupted)
    evaluator = CircuitEvaluator(model, clean, corrupted, metric)
    circuit = Circuit({"resid_pre": torch.zeros(1, 6, dtype=torch.bool)}, layers=(0,))
    evaluation = evaluator.evaluate(circuit)
    assert evaluation.full == pytest.approx(1.0, abs=1e-9)
    assert evaluation.empty == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# sentence-transformers configuration


def _write_st_dir(path, pooling: dict, modules=("Transformer", "Pooling", "Normalize")):
    entries = []
    for i, kind in enumerate(modules):
        sub = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize", "Dense": "2_Dense"}[kind]
        entries.append({"idx": i, "name": str(i), "path": sub, "type": f"sentence_transformers.models.{kind}"})
    (path / "modules.json").write_text(json.dumps(entries))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8, **pooling}))
    return path


@pytest.mark.parametrize(
    "flags, modules, expected",
    [
        ({"pooling_mode_mean_tokens": True}, ("Transformer", "Pooling", "Normalize"), SentenceEmbedding("mean", True)),
        ({"pooling_mode_cls_token": True}, ("Transformer", "Pooling"), SentenceEmbedding("cls", False)),
        ({"pooling_mode_lasttoken": True}, ("Transformer", "Pooling", "Normalize"), SentenceEmbedding("last", True)),
        ({"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}, ("Transformer", "Pooling"), SentenceEmbedding("max", False)),
    ],
)
def test_read_sentence_transformers_pooling(tmp_path, flags, modules, expected):
    assert read_sentence_transformers_pooling(_write_st_dir(tmp_path, flags, modules)) == expected


def test_read_sentence_transformers_pooling_refuses_what_it_cannot_reproduce(tmp_path):
    assert read_sentence_transformers_pooling(tmp_path) is None  # not a sentence-transformers directory
    _write_st_dir(tmp_path, {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True})
    with pytest.raises(ValueError, match="supports exactly one"):
        read_sentence_transformers_pooling(tmp_path)
    _write_st_dir(tmp_path, {"pooling_mode_mean_sqrt_len_tokens": True})
    with pytest.raises(ValueError, match="mean_sqrt_len_tokens"):
        read_sentence_transformers_pooling(tmp_path)
    _write_st_dir(tmp_path, {"pooling_mode_mean_tokens": True}, ("Transformer", "Pooling", "Dense"))
    with pytest.raises(ValueError, match=r"modules \['Dense'\]"):
        read_sentence_transformers_pooling(tmp_path)


def _save_bare_bert(path):
    """A tiny BertModel checkpoint (no masked-LM head) with a tokenizer and a sentence-transformers config."""
    from transformers import BertModel

    tokenizer = tiny_tokenizer()
    hf = tiny_hf_model("bert", vocab_size=len(tokenizer), seed=5)
    bare = BertModel(hf.config, add_pooling_layer=False)
    bare.load_state_dict(hf.bert.state_dict(), strict=False)
    bare.config.architectures = ["BertModel"]
    bare.save_pretrained(path)
    tokenizer.save_pretrained(path)
    _write_st_dir(path, {"pooling_mode_cls_token": True}, ("Transformer", "Pooling"))
    return bare.eval(), tokenizer


def test_bare_encoder_checkpoint_loads_deterministically_with_its_pooling(tmp_path):
    bare, _ = _save_bare_bert(tmp_path)
    first = relp.load_model(tmp_path)
    second = relp.load_model(tmp_path)
    assert SentenceEmbedding.from_model(first) == SentenceEmbedding("cls", normalize=False)
    tokens, _ = _tokens(first)
    with torch.no_grad():
        torch.testing.assert_close(first(tokens), second(tokens))  # the missing head is seeded
        expected = bare(tokens).last_hidden_state[:, 0]
    torch.testing.assert_close(SentenceEmbedding.from_model(first)(first, tokens), expected, rtol=1e-5, atol=1e-5)


def test_hub_sentence_transformers_repo_is_loaded_as_a_snapshot(tmp_path, monkeypatch):
    """With network, a sentence-transformers repo is downloaded (model, tokenizer, pooling config only)
    and loaded like a local directory; here the hub is replaced by a local directory."""
    import huggingface_hub

    import relp.loading.hub as hub

    _save_bare_bert(tmp_path)
    calls = []
    monkeypatch.setattr(hub, "_hub_unreachable_reason", lambda name: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda name, file: calls.append((name, file)) or str(tmp_path / file))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, allow_patterns: calls.append((name, tuple(allow_patterns))) or str(tmp_path))
    model = relp.load_model("some-org/some-encoder")
    assert model.cfg.model_name == "some-org/some-encoder"
    assert SentenceEmbedding.from_model(model) == SentenceEmbedding("cls", normalize=False)
    assert calls[0] == ("some-org/some-encoder", "modules.json")
    assert "1_Pooling/*" in calls[1][1] and not any("onnx" in p for p in calls[1][1])


# ----------------------------------------------------------------------------------------------
# The embedded sentence encoder: all-MiniLM-L6-v2 (real weights, offline from its package)


@pytest.fixture(scope="module")
def minilm():
    return relp.load_model("sentence-transformers/all-MiniLM-L6-v2")


def test_minilm_embedding_equals_the_plain_hugging_face_model(minilm):
    from transformers import AutoTokenizer, BertModel

    from relp.loading import embedded_encoder_path

    embedding = SentenceEmbedding.from_model(minilm)
    assert embedding == SentenceEmbedding("mean", normalize=True)  # its 1_Pooling config + Normalize
    texts = ["A man is playing a guitar.", "Someone plays an instrument on stage tonight.", "Cats sleep."]
    directory = embedded_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    plain = BertModel.from_pretrained(directory).eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = plain(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    got = embedding.embed(minilm, texts)
    # float32; the two runs differ only in the attention kernel (eager vs sdpa) and padding
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert relp.load_model("all-MiniLM-L6-v2").cfg.model_name == "sentence-transformers/all-MiniLM-L6-v2"


def test_minilm_rules_are_live_including_the_attention_fallback(minilm):
    from relp.rules import pattern_hook_is_live

    assert not pattern_hook_is_live(minilm)  # the bridge discards edits of BERT's pattern
    before = _n_hooks(minilm)
    for preset in ("relp", "relp+ah", "attnlrp"):
        with relp.lrp_rules(minilm, preset) as rules:  # raises RuleNotLiveError otherwise
            assert "half" not in rules.active
    assert _n_hooks(minilm) == before


def test_minilm_agreement_with_activation_patching_on_contrast_pairs(minilm):
    """On MiniLM contrast pairs (one layout batch of the experiment's default protocol), AtP is already
    close to activation patching on attn_out (small perturbations of a post-LN encoder), and RelP's
    LN-rule lifts the Pearson correlation on the residual stream, where the swapped word's whole-stream
    patch is large and AtP underestimates it (README, embedding section)."""
    from relp.tasks import make_contrast_dataset

    embedding = SentenceEmbedding.from_model(minilm)
    data = make_contrast_dataset(minilm, 32, seed=0)
    batch = max(data.batches(), key=len)
    clean, corrupted = batch.clean_tokens, batch.corrupted_tokens
    metric = SimilarityDifference.from_runs(minilm, batch.anchor_texts, clean, corrupted, embedding)
    components = ["resid_pre", "attn_out"]
    ap = relp.activation_patching(minilm, clean, corrupted, metric, components, progress=False)
    atp = relp.agreement(relp.attribution_patching(minilm, clean, corrupted, metric, components), ap)
    rp = relp.agreement(relp.relevance_patching(minilm, clean, corrupted, metric, components), ap)
    assert atp.loc["attn_out", "pearson"] > 0.95
    assert rp.loc["resid_pre", "pearson"] > atp.loc["resid_pre", "pearson"]
