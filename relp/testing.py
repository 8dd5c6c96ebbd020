"""Small random-weight models for tests, notebooks in CI and quick experiments.

Every builder makes a Hugging Face model from a config (random weights, seeded), wraps it in a
TransformerLens 4.x ``TransformerBridge`` and returns it in eval mode. Nothing is downloaded: the
tokenizer is a word-level tokenizer built in memory (one token per whitespace-separated word), so any
word list can be made single-token, which is what task generators such as IOI need.

>>> from relp.testing import tiny_model
>>> model = tiny_model("llama")          # RMSNorm, SwiGLU, grouped-query attention, rotary
>>> model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads
(2, 4, 2)
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
from collections.abc import Sequence

import torch

from relp.loading import bridge_from_hf

ARCHITECTURES = ("gpt2", "llama", "bert", "roberta")

SPECIAL_TOKENS = ["<bos>", "<pad>", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEFAULT_WORDS = tuple(f"w{i}" for i in range(58)) + (".", ",")


@functools.lru_cache(maxsize=16)
def _tokenizer_dir(words: tuple[str, ...]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<pad>",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    # TransformerLens re-loads the tokenizer from `name_or_path`, so it has to live on disk.
    digest = hashlib.sha1("\n".join(words).encode()).hexdigest()[:12]
    path = tempfile.mkdtemp(prefix=f"relp-tiny-tokenizer-{digest}-")
    tokenizer.save_pretrained(path)
    return path


def tiny_tokenizer(words: Sequence[str] = DEFAULT_WORDS):
    """A word-level tokenizer whose vocabulary is the special tokens followed by `words`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tokenizer_dir(tuple(words)))


def tiny_hf_model(
    architecture: str = "llama",
    *,
    vocab_size: int,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    n_key_value_heads: int | None = None,
):
    """A random-weight Hugging Face model of the given architecture ("gpt2", "llama", "bert" or "roberta")."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    if n_key_value_heads is not None and architecture != "llama":
        raise ValueError(f"n_key_value_heads applies to 'llama' (grouped-query attention); got architecture {architecture!r}")
    torch.manual_seed(seed)
    if architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=64, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
            bos_token_id=0, eos_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    elif architecture == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_model * 3 // 2,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=n_heads // 2 if n_key_value_heads is None else n_key_value_heads,
            max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=1,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    elif architecture == "bert":
        config = BertConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_model * 3 // 2,
            num_hidden_layers=n_layers, num_attention_heads=n_heads, max_position_embeddings=64,
            pad_token_id=1,
        )
        model = BertForMaskedLM(config)
    elif architecture == "roberta":
        config = RobertaConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_model * 3 // 2,
            num_hidden_layers=n_layers, num_attention_heads=n_heads, max_position_embeddings=66,
            pad_token_id=1, architectures=["RobertaForMaskedLM"],  # the bridge reads the architecture
        )
        model = RobertaForMaskedLM(config)
    else:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
    return model.to(dtype).eval()


def tiny_model(
    architecture: str = "llama",
    *,
    words: Sequence[str] = DEFAULT_WORDS,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    n_key_value_heads: int | None = None,
):
    """A random-weight TransformerBridge of the given architecture with a word-level tokenizer.

    Shapes: "gpt2" (LayerNorm, GELU MLP), "llama" (RMSNorm, SwiGLU, grouped-query attention with
    half as many key/value heads, rotary), "bert" (post-LayerNorm encoder, GELU MLP) and "roberta"
    (BERT's blocks with RoBERTa's embeddings). `n_key_value_heads` (Llama only) overrides the default
    ``n_heads // 2`` (1: multi-query attention).
    """
    tokenizer = tiny_tokenizer(words)
    hf = tiny_hf_model(
        architecture, vocab_size=len(tokenizer), n_layers=n_layers, d_model=d_model,
        n_heads=n_heads, seed=seed, dtype=dtype, n_key_value_heads=n_key_value_heads,
    )
    return bridge_from_hf(hf, tokenizer, name=f"tiny-{architecture}")
