"""One view over "a model or a tokenizer" for the task generators and prompt loaders.

Task code accepts either a TransformerLens bridge (anything with ``to_tokens`` and ``cfg``) or a bare
Hugging Face tokenizer, and must tokenize exactly as relp does everywhere else (see
:mod:`relp.models`): BOS prepended, no padding.

* With a model, prompts go through :func:`relp.models.to_tokens`, so the tokens are exactly the ones
  the patching code will feed the model.
* With a bare tokenizer, a prompt is ``[bos] + tokenizer(text, add_special_tokens=False)``, where
  ``bos`` is the tokenizer's BOS token, else its CLS token (BERT), else its EOS token. That is what the
  bridge produces for tokenizers with a BOS token; tokenizers without one (BERT) get [CLS] in its
  place and no trailing [SEP].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from relp.models import to_tokens

# A word that every tokenizer splits off on its own, used as left context when a word cannot be read
# on its own (see TaskTokenizer.word_token).
_CONTEXT_WORD = "a"


class TaskTokenizer:
    """Tokenizes text the relp way for a TransformerBridge or a bare Hugging Face tokenizer."""

    def __init__(self, model_or_tokenizer):
        if isinstance(model_or_tokenizer, TaskTokenizer):
            raise TypeError("use TaskTokenizer.of(...) to re-use a TaskTokenizer")
        if hasattr(model_or_tokenizer, "to_tokens") and hasattr(model_or_tokenizer, "cfg"):
            self.model = model_or_tokenizer
            self.tokenizer = model_or_tokenizer.tokenizer
            self.device = str(model_or_tokenizer.cfg.device)
        elif callable(model_or_tokenizer) and hasattr(model_or_tokenizer, "convert_ids_to_tokens"):
            self.model = None
            self.tokenizer = model_or_tokenizer
            self.device = "cpu"
        else:
            raise TypeError(
                "expected a TransformerBridge (with to_tokens) or a Hugging Face tokenizer; got "
                f"{type(model_or_tokenizer).__name__}"
            )
        if self.tokenizer is None:
            raise ValueError("the model has no tokenizer")
        self.unk_token_id = self.tokenizer.unk_token_id
        self._decoded: dict[int, str] = {}

    @classmethod
    def of(cls, model_or_tokenizer) -> "TaskTokenizer":
        """`model_or_tokenizer` itself if it is already a TaskTokenizer, else a new one over it."""
        return model_or_tokenizer if isinstance(model_or_tokenizer, cls) else cls(model_or_tokenizer)

    @property
    def bos_token_id(self) -> int:
        """The id put in front of every prompt when tokenizing without a model."""
        tok = self.tokenizer
        for candidate in (tok.bos_token_id, tok.cls_token_id, tok.eos_token_id):
            if candidate is not None:
                return int(candidate)
        raise ValueError(f"tokenizer {type(tok).__name__} has no BOS, CLS or EOS token to prepend")

    def tokens(self, text: str) -> list[int]:
        """Token ids of a prompt, BOS prepended (relp's convention)."""
        if self.model is not None:
            return to_tokens(self.model, text)[0].tolist()
        return [self.bos_token_id, *self.plain(text)]

    def plain(self, text: str) -> list[int]:
        """Token ids of a piece of text, without BOS or any other special token."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

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
