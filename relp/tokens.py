"""The one tokenisation convention relp uses, for models and for bare tokenizers.

BOS convention: relp always prepends the model's beginning-of-sequence token (TransformerLens's
``prepend_bos=True``), for every model and every function that turns text into tokens. Position 0 of
every prompt is therefore BOS, and named positions (IO, S2, END, ...) count it. No padding: a batch
holds texts of one token length.

:func:`to_tokens` turns text (or a token tensor) into the [batch, pos] tokens that a model is fed.

:class:`TaskTokenizer` is one view over "a model or a tokenizer" for the task generators and prompt
loaders. Task code accepts a TransformerLens bridge (anything with ``to_tokens``, ``cfg`` and a
tokenizer), a bare Hugging Face tokenizer, or any object with ``to_tokens(text, prepend_bos=True)``
and ``to_str_tokens(tokens)``, and must tokenize exactly as relp does everywhere else:

* With a model, prompts go through :func:`to_tokens`, so the tokens are exactly the ones the
  patching code will feed the model.
* With a bare tokenizer, a prompt is ``[bos] + tokenizer(text, add_special_tokens=False)``, where
  ``bos`` is the tokenizer's BOS token, else its CLS token (BERT), else its EOS token. That is what the
  bridge produces for tokenizers with a BOS token; tokenizers without one (BERT) get [CLS] in its
  place and no trailing [SEP].
* With any other object, prompts go through its ``to_tokens(text, prepend_bos=True)`` and token
  strings through its ``to_str_tokens``; what needs the tokenizer itself (single-token words, pieces
  of text without BOS) is not available.

This module is a leaf: it imports nothing from relp.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

PREPEND_BOS = True

# A word that every tokenizer splits off on its own, used as left context when a word cannot be read
# on its own (see TaskTokenizer.word_token).
_CONTEXT_WORD = "a"


def to_tokens(model, inputs: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
    """Tokens [batch, pos] for text (BOS prepended, see the module docstring) or a token tensor.

    A list of texts must tokenize to one length: relp never pads silently, because padding would move
    the positions that patching and metrics index. Nor does it truncate: a text or token tensor longer
    than the model's context (``model.cfg.n_ctx``) is an error naming both lengths, as are token ids
    outside the vocabulary (``model.cfg.d_vocab``) and an empty tensor.
    """
    if isinstance(inputs, torch.Tensor):
        tokens = inputs
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"token tensors must be integer [batch, pos]; got dtype {tokens.dtype} and shape "
                f"{tuple(inputs.shape)}"
            )
        if tokens.numel() == 0:
            raise ValueError(
                f"the token tensor is empty (shape {tuple(inputs.shape)}); expected at least one prompt of at "
                "least one token"
            )
        d_vocab = getattr(model.cfg, "d_vocab", None)
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or (isinstance(d_vocab, int) and d_vocab > 0 and high >= d_vocab):
            raise ValueError(
                f"token ids range from {low} to {high}; expected ids in 0..{d_vocab - 1} (the model's "
                f"vocabulary has d_vocab={d_vocab} tokens)"
            )
        _check_length(model, tokens.shape[1], "the token tensor")
        return tokens.long().to(model.cfg.device)
    if isinstance(inputs, str):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs or not all(isinstance(text, str) for text in inputs):
        raise ValueError(f"expected a string, a list of strings or a token tensor; got {inputs!r:.200}")
    # truncate=False: TransformerLens would otherwise cut texts at the context length without a word
    rows = [model.to_tokens(text, prepend_bos=PREPEND_BOS, truncate=False)[0] for text in inputs]
    for text, row in zip(inputs, rows):
        _check_length(model, len(row), f"the text {text[:60]!r}{'...' if len(text) > 60 else ''}")
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        by_length = {n: next(t for t, r in zip(inputs, rows) if len(r) == n) for n in lengths}
        raise ValueError(
            f"the texts tokenize to different lengths {lengths} (e.g. {by_length}); relp does not pad "
            "a batch silently. Group prompts by token length (relp.tasks does this) or pass tokens."
        )
    return torch.stack(rows).to(model.cfg.device)


def context_length(model) -> int | None:
    """The most positions `model` takes (``model.cfg.n_ctx``), or None when it declares no limit."""
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None


def _check_length(model, n_tokens: int, what: str) -> None:
    """A clear error when `n_tokens` exceeds the model's context; relp never truncates silently."""
    n_ctx = context_length(model)
    if n_ctx is not None and n_tokens > n_ctx:
        raise ValueError(
            f"{what} is {n_tokens} tokens long (BOS included); the model's context holds at most "
            f"n_ctx={n_ctx} tokens. relp does not truncate: shorten the text or split it."
        )


class TaskTokenizer:
    """Tokenizes text the relp way for a TransformerBridge, a bare Hugging Face tokenizer, or any
    object with ``to_tokens(text, prepend_bos=True)`` and ``to_str_tokens(tokens)``.

    The token ids of each text are computed once per TaskTokenizer and then looked up.
    """

    def __init__(self, model_or_tokenizer):
        obj = model_or_tokenizer
        if isinstance(obj, TaskTokenizer):
            raise TypeError("use TaskTokenizer.of(...) to re-use a TaskTokenizer")
        self.model = None  # a bridge: tokens through to_tokens (relp's convention)
        self._other = None  # any other object with to_tokens and to_str_tokens
        if hasattr(obj, "to_tokens") and hasattr(obj, "cfg") and getattr(obj, "tokenizer", None) is not None:
            self.model = obj
            self.tokenizer = obj.tokenizer
            self.device = str(obj.cfg.device)
        elif callable(obj) and hasattr(obj, "convert_ids_to_tokens"):
            self.tokenizer = obj
            self.device = "cpu"
        elif hasattr(obj, "to_tokens") and hasattr(obj, "to_str_tokens"):
            self._other = obj
            self.tokenizer = None
            self.device = str(getattr(getattr(obj, "cfg", None), "device", "cpu"))
        else:
            raise TypeError(
                "expected a TransformerBridge, a Hugging Face tokenizer, or an object with "
                f"to_tokens(text, prepend_bos=True) and to_str_tokens(tokens); got {type(obj).__name__}"
            )
        self.unk_token_id = None if self.tokenizer is None else self.tokenizer.unk_token_id
        self._ids: dict[str, list[int]] = {}
        self._decoded: dict[int, str] = {}

    @classmethod
    def of(cls, model_or_tokenizer) -> "TaskTokenizer":
        """`model_or_tokenizer` itself if it is already a TaskTokenizer, else a new one over it."""
        return model_or_tokenizer if isinstance(model_or_tokenizer, cls) else cls(model_or_tokenizer)

    def _hf_tokenizer(self):
        """The Hugging Face tokenizer; an object with only to_tokens and to_str_tokens has none."""
        if self.tokenizer is None:
            raise TypeError(
                f"{type(self._other).__name__} has no Hugging Face tokenizer (only to_tokens and "
                "to_str_tokens); this needs a TransformerBridge with a tokenizer or a Hugging Face tokenizer"
            )
        return self.tokenizer

    @property
    def bos_token_id(self) -> int:
        """The id put in front of every prompt when tokenizing without a model."""
        tok = self._hf_tokenizer()
        for candidate in (tok.bos_token_id, tok.cls_token_id, tok.eos_token_id):
            if candidate is not None:
                return int(candidate)
        raise ValueError(f"tokenizer {type(tok).__name__} has no BOS, CLS or EOS token to prepend")

    def tokens(self, text: str) -> list[int]:
        """Token ids of a prompt, BOS prepended (relp's convention)."""
        if text not in self._ids:
            if self.model is not None:
                ids = to_tokens(self.model, text)[0].tolist()
            elif self._other is not None:
                ids = torch.as_tensor(self._other.to_tokens(text, prepend_bos=PREPEND_BOS))
                ids = (ids[0] if ids.ndim == 2 else ids).tolist()
            else:
                ids = [self.bos_token_id, *self.plain(text)]
            self._ids[text] = [int(i) for i in ids]
        return list(self._ids[text])

    def plain(self, text: str) -> list[int]:
        """Token ids of a piece of text, without BOS or any other special token."""
        return list(self._hf_tokenizer()(text, add_special_tokens=False)["input_ids"])

    def word_token(self, word: str) -> int | None:
        """The single token id of `word` (e.g. " Mary") as it reads in running text, else None.

        None when the word takes several tokens or is the unknown token. Some tokenizers
        (SentencePiece) give a text-initial " Mary" an extra prefix-space piece; the word is then read
        after a context word instead.
        """
        ids = self.plain(word)
        if len(ids) != 1:
            context = self.plain(_CONTEXT_WORD)
            in_context = self.plain(_CONTEXT_WORD + word)
            if in_context[: len(context)] == context:
                ids = in_context[len(context) :]
        if len(ids) != 1 or (self.unk_token_id is not None and ids[0] == self.unk_token_id):
            return None
        return int(ids[0])

    def single_token_words(self, words: Iterable[str], *, prefix: str = " ") -> dict[str, int]:
        """{word: token id of prefix + word} for the words that are one (known) token.

        Words whose token id repeats an earlier word's (e.g. case-folding tokenizers) are dropped, so
        distinct words stay distinct tokens.
        """
        kept: dict[str, int] = {}
        seen: set[int] = set()
        for word in words:
            token = self.word_token(prefix + word)
            if token is not None and token not in seen:
                kept[word] = token
                seen.add(token)
        return kept

    def str_tokens(self, ids: Sequence[int]) -> tuple[str, ...]:
        """Each token decoded on its own (like TransformerLens's ``to_str_tokens``)."""
        if self._other is not None:
            return tuple(str(s) for s in self._other.to_str_tokens(torch.tensor(list(ids), dtype=torch.long)))
        out = []
        for token in ids:
            token = int(token)
            if token not in self._decoded:
                self._decoded[token] = self.tokenizer.decode([token])
            out.append(self._decoded[token])
        return tuple(out)

    def describe(self, text: str) -> str:
        """How `text` splits into tokens, for error messages: e.g. "[' Mar', 'ianne']"."""
        return repr(list(self.str_tokens(self.plain(text))))
