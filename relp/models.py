"""Loading models as TransformerLens 4.x bridges, and the one tokenisation convention relp uses.

BOS convention: relp always prepends the model's beginning-of-sequence token (TransformerLens's
``prepend_bos=True``), for every model and every function that turns text into tokens. Position 0 of
every prompt is therefore BOS, and named positions (IO, S2, END, ...) count it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PREPEND_BOS = True


def bridge_from_hf(hf_model, tokenizer, *, name: str = "hf-model", device: str | None = None):
    """Wrap a Hugging Face model object and its tokenizer in a TransformerBridge (eval mode).

    The bridge modifies the HF model in place (its submodules are replaced by bridge components);
    deep-copy it first if you still need the raw model.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer is None:
        raise ValueError(
            "a Hugging Face model needs its tokenizer: pass tokenizer=... (without it the bridge "
            "would try to download one from the hub)"
        )
    device = device or str(next(hf_model.parameters()).device)
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, device=device)
    bridge.eval()
    return bridge


def to_tokens(model, inputs: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
    """Tokens [batch, pos] for text (BOS prepended, see the module docstring) or a token tensor.

    A list of texts must tokenize to one length: relp never pads silently, because padding would move
    the positions that patching and metrics index.
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
        return tokens.long().to(model.cfg.device)
    if isinstance(inputs, str):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs or not all(isinstance(text, str) for text in inputs):
        raise ValueError(f"expected a string, a list of strings or a token tensor; got {inputs!r:.200}")
    rows = [model.to_tokens(text, prepend_bos=PREPEND_BOS)[0] for text in inputs]
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        by_length = {n: next(t for t, r in zip(inputs, rows) if len(r) == n) for n in lengths}
        raise ValueError(
            f"the texts tokenize to different lengths {lengths} (e.g. {by_length}); relp does not pad "
            "a batch silently. Group prompts by token length (relp.tasks does this) or pass tokens."
        )
    return torch.stack(rows).to(model.cfg.device)
