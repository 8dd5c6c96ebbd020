"""Random prompt pairs shared by several test modules (not a test module: pytest does not collect it)."""

from __future__ import annotations

import torch

import relp


def changed_at_2_and_4(model, n_prompts=3, length=7, seed=0):
    """Random clean prompts (BOS first) and corrupted copies that differ at positions 2 and 4, with a
    logit-difference metric on random answer ids."""
    g = torch.Generator().manual_seed(seed)
    d_vocab = model.cfg.d_vocab
    clean = torch.randint(6, d_vocab, (n_prompts, length), generator=g)
    clean[:, 0] = 0  # BOS
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(6, d_vocab, (n_prompts,), generator=g)
    corrupted[:, 4] = torch.randint(6, d_vocab, (n_prompts,), generator=g)
    answer = torch.randint(6, d_vocab, (n_prompts,), generator=g)
    wrong = torch.randint(6, d_vocab, (n_prompts,), generator=g)
    return clean, corrupted, relp.LogitDiff(answer, wrong)


def changed_from(model, start, n_prompts, length, seed=0):
    """Random clean prompts (BOS first) and corrupted copies redrawn from position `start` on, with a
    logit-difference metric on random answer ids."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(6, model.cfg.d_vocab, (n_prompts, length), generator=g)
    clean[:, 0] = 0
    corrupted = clean.clone()
    corrupted[:, start:] = torch.randint(6, model.cfg.d_vocab, (n_prompts, length - start), generator=g)
    answer, wrong = torch.randint(6, model.cfg.d_vocab, (2, n_prompts), generator=g)
    return clean, corrupted, relp.LogitDiff(answer, wrong)
