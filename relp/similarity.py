"""Explaining a similarity between two texts: token-pair relevance (BiLRP) and interaction patching.

For an embedding model the quantity people want explained is a similarity ``s(A, B)`` between two
texts: which tokens of A match which tokens of B. Both functions here answer it with relp's machinery
(the readout of :mod:`relp.embeddings`, the LRP rules of :mod:`relp.rules`):

* :func:`pair_relevance` (BiLRP; Eberle et al., "Building and Interpreting Deep Similarity Models",
  TPAMI 2022; Vasileiou and Eberle, NAACL 2024) returns a token x token matrix ``R`` whose entry
  ``R[i, j]`` is the relevance of the pair (token i of A, token j of B) for ``s(A, B)``.
* :func:`interaction_patching` splits the change of ``s`` between clean and corrupted versions of both
  texts into a term per side and a pairwise interaction term, exactly (double activation patching of
  the inputs) and cheaply (the pair relevance of the input differences), with their agreement.

The construction (written from the papers)
------------------------------------------
Let ``u(A)`` be the pooled embedding [D] of text A (the readout without its L2 normalisation) and
``x_A`` [T_A, d_model] its input embeddings: the residual stream entering the first block,
``blocks.0.hook_resid_pre`` (token plus position embeddings; BERT: after the embedding LayerNorm).
For the dot product ``s = <u(A), u(B)> = sum_m u_m(A) u_m(B)``, and each factor is explained on its
own: ``R_A[i, m] = x_A[i] . d u_m / d x_A[i]`` is the relevance of token i for embedding dimension m
(gradient x input, where the gradient follows the LRP rules: under ``rules="relp"`` LayerNorm scales
are constants and activations are linearised with act(x)/x, so a network without biases conserves
relevance: ``sum_i R_A[i, m] = u_m(A)``). The second-order relevance is the sum over dimensions of
the products::

    R[i, j] = sum_m R_A[i, m] R_B[j, m],   i.e.  R = R_A R_B^T   [T_A, T_B]

and ``sum_ij R[i, j] = <u(A), u(B)>`` whenever each side conserves. For a model whose embedding is
linear in the input embeddings and has no bias, ``R`` is exact: ``R = x_A W W^T x_B^T`` for
``u = W^T x`` summed (the oracle in tests/test_similarity.py).

Cosine similarity (``similarity="cosine"``, and a readout that L2-normalises): ``cos = <u(A), u(B)> /
(|u(A)| |u(B)|)``. The two norms are treated as constants, as the LN-rule treats a LayerNorm's scale
(the normalisation rescales the explanation, it is not explained): ``R_cos = R_dot / (|u(A)| |u(B)|)``.
The same holds under plain gradients (``rules="gradient"``): the matrix is then gradient x input of
each side, combined the same way.

Cost (batched vector-Jacobian products)
---------------------------------------
``R_A`` needs one cotangent per embedding dimension: a batched VJP (``torch.autograd.grad(...,
is_grads_batched=True)``) of D cotangents through one forward pass. The backward pass is linear in its
cotangent (the LRP rules only change which forward quantities it uses), so ``R = R_A R_B^T`` needs
``R_B`` only through its T_B rows used as cotangents on side A: a VJP of side A with the cotangents
``R_B[j]`` gives the column ``R[:, j]``. relp therefore computes the full per-dimension relevances of
the shorter text (D cotangents) and T_short cotangents on the other side: one forward and one batched
backward pass per side, D + T_short cotangents instead of 2 D. The result is the same matrix (a test
compares it with the explicit ``R_A R_B^T``).

``projection=k`` estimates ``R`` from k random directions: ``P`` [D, k] with independent N(0, 1/k)
entries has ``E[P P^T] = I``, so ``R_A P (R_B P)^T`` is an unbiased estimate of ``R`` (2 k cotangents,
the same ``P`` on both sides). Its error falls like 1/sqrt(k); :func:`projection_error` measures it
against the exact matrix.

Interaction patching
--------------------
With clean and corrupted versions of both texts (each of equal token length) and ``s(a, b)`` the
similarity, denoising (the corrupted pair is the base, clean is patched in, as everywhere in relp)::

    AP(none) = s(a', b'),  AP(a) = s(a, b'),  AP(b) = s(a', b),  AP(a and b) = s(a, b)
    side_a = AP(a) - AP(none),  side_b = AP(b) - AP(none)
    interaction = AP(a and b) - AP(a) - AP(b) + AP(none)

(a' and b' the corrupted texts), so ``side_a + side_b + interaction = s(a, b) - s(a', b')``, the total
change, exactly. The *cells* are the changed tokens: patching happens at the input embeddings
(``blocks.0.hook_resid_pre``), where clean and corrupted differ only at the tokens that differ, so an
unchanged token scores exactly 0 under every method and is left out. Cell terms: ``side_a[i]`` patches
changed token i of A alone, ``side_b[j]`` token j of B alone, ``interaction[i, j]`` is the double
difference of patching i and j together. With one changed token per side (the contrast pairs), the
cells are the whole-text terms. Cost: one forward pass per changed token and side, plus the clean and
corrupted runs; every pair of cells is then a similarity of embeddings already computed.

The cheap estimate replaces each patch by first order at the corrupted pair, under the rules:
``side_a[i] ~ (x_a - x_a')[i] . ds/dx_a'[i]`` (relevance patching of the similarity) and
``interaction[i, j] ~ sum_m D_a[i, m] D_b[j, m]`` with ``D_a[i, m] = (x_a - x_a')[i] . du_m/dx_a'[i]``:
the pair relevance of the input differences (for the dot product the interaction is exactly
``<u(a) - u(a'), u(b) - u(b')>``, whose first order this is). ``result.agreement()`` compares estimate and
exact with :func:`relp.agreement`'s statistics; pass lists of results to pool cells over many pairs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int

from relp.checks import check_eval_mode, check_gradients_possible
from relp.embeddings import SentenceEmbedding
from relp.patching import _live_rules
from relp.rules import DEFAULT_PRESET, RuleSet, applied_rules, check_no_rule_context
from relp.tokens import to_tokens

__all__ = [
    "SIMILARITIES",
    "INPUT_HOOK",
    "InteractionResult",
    "InteractionTerms",
    "PairRelevance",
    "interaction_patching",
    "pair_relevance",
    "projection_error",
]

SIMILARITIES = ("cosine", "dot")
#: Where gradient x input is taken: the input embeddings entering the first block.
INPUT_HOOK = "blocks.0.hook_resid_pre"
#: Rows (cotangents x positions) of one batched backward pass: bounds the memory of the vmapped backward.
MAX_COTANGENT_ROWS = 16384

Text = str | Int[torch.Tensor, " pos"] | Int[torch.Tensor, "1 pos"]


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class PairRelevance:
    """Token-pair relevance of a similarity ``s(A, B)`` (see the module docstring for the construction).

    ``matrix`` [tokens_a, tokens_b]: ``R[i, j]``, the relevance of (token i of A, token j of B); positive
    pairs raise the similarity. ``similarity``: ``s(A, B)`` as the model computes it. ``conservation_gap``:
    ``R.sum() - similarity`` (0 for a bias-free model under LRP rules; biases and the rules' approximations
    make it non-zero on real models). ``tokens_a``/``tokens_b``: the texts' tokens as strings (BOS/[CLS]
    first). ``metadata``: the readout, the scale applied for cosine, the cost (cotangents, seconds) and,
    where measured, the projection's error.
    """

    matrix: Float[torch.Tensor, "tokens_a tokens_b"]
    similarity: float
    similarity_kind: str
    tokens_a: tuple[str, ...]
    tokens_b: tuple[str, ...]
    rules: tuple[str, ...]
    seconds: float
    projection: int | None = None
    model: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def conservation_gap(self) -> float:
        """``matrix.sum() - similarity``: how far the explanation's total is from the score."""
        return float(self.matrix.double().sum()) - self.similarity

    @property
    def relative_conservation_gap(self) -> float:
        """``conservation_gap / |similarity|`` (inf for a zero similarity)."""
        return abs(self.conservation_gap) / abs(self.similarity) if self.similarity else math.inf

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)  # type: ignore[return-value]

    def transpose(self) -> "PairRelevance":
        """The same explanation with the roles of A and B exchanged (``matrix.T``)."""
        return dataclasses.replace(self, matrix=self.matrix.T, tokens_a=self.tokens_b, tokens_b=self.tokens_a)

    def top_pairs(self, k: int = 5, *, absolute: bool = False, exclude: Sequence[str] = ()) -> list[tuple[int, int, str, str, float]]:
        """The k pairs with the largest relevance (``absolute=True``: largest |relevance|), as
        ``(i, j, token_a, token_b, relevance)``, strongest first. ``exclude``: token strings to leave out
        on both sides (e.g. ``("[CLS]", "[SEP]")``)."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be a positive integer (how many pairs); got {k!r}")
        values = self.matrix.detach().double().clone()
        keys = values.abs() if absolute else values
        keys = keys.clone()
        for i, token in enumerate(self.tokens_a):
            if token in exclude:
                keys[i, :] = -math.inf
        for j, token in enumerate(self.tokens_b):
            if token in exclude:
                keys[:, j] = -math.inf
        order = torch.argsort(keys.flatten(), descending=True, stable=True)
        pairs = []
        for flat in order[: int(k)].tolist():
            i, j = divmod(flat, values.shape[1])
            if keys[i, j] == -math.inf:
                break
            pairs.append((i, j, self.tokens_a[i], self.tokens_b[j], float(values[i, j])))
        return pairs

    def to_dataframe(self):
        """Long table, one row per pair: position_a, position_b, token_a, token_b, relevance."""
        import pandas as pd

        n_a, n_b = self.shape
        values = self.matrix.detach().double().cpu().numpy()
        return pd.DataFrame(
            {
                "position_a": [i for i in range(n_a) for _ in range(n_b)],
                "position_b": [j for _ in range(n_a) for j in range(n_b)],
                "token_a": [self.tokens_a[i] for i in range(n_a) for _ in range(n_b)],
                "token_b": [self.tokens_b[j] for _ in range(n_a) for j in range(n_b)],
                "relevance": values.ravel(),
            }
        )

    def __repr__(self) -> str:
        projection = f", projection={self.projection}" if self.projection else ""
        return (
            f"PairRelevance({self.similarity_kind}={self.similarity:.4f}, matrix {self.shape[0]}x{self.shape[1]}, "
            f"sum {float(self.matrix.sum()):.4f}, conservation_gap {self.conservation_gap:+.3g}, rules "
            f"{'+'.join(self.rules) or 'gradient'}{projection}, {self.seconds:.2f} s)"
        )


@dataclass
class InteractionTerms:
    """One estimate (exact or cheap) of the split of a similarity change.

    ``total``, ``side_a``, ``side_b``, ``interaction``: whole-text terms (for ``exact``,
    ``side_a + side_b + interaction == total``). ``scores``: the cells, ``{"side_a": [changed_a],
    "side_b": [changed_b], "interaction": [changed_a, changed_b]}`` (see the module docstring), in the
    layout :func:`relp.agreement` reads.
    """

    method: str
    total: float
    side_a: float
    side_b: float
    interaction: float
    scores: dict[str, torch.Tensor]

    @property
    def label(self) -> str:
        return self.method


@dataclass
class InteractionResult:
    """Interaction patching of a similarity: ``exact`` (double activation patching) and ``estimate``
    (first order, from pair relevance), on the cells ``changed_a`` x ``changed_b`` (token positions)."""

    exact: InteractionTerms
    estimate: InteractionTerms
    changed_a: tuple[int, ...]
    changed_b: tuple[int, ...]
    tokens_a: tuple[str, ...]
    tokens_b: tuple[str, ...]
    similarity_kind: str
    clean_similarity: float
    corrupted_similarity: float
    rules: tuple[str, ...]
    seconds: dict[str, float]
    model: str = ""
    metadata: dict = field(default_factory=dict)

    def agreement(self, *, top_k: int = 1):
        """:func:`relp.agreement` of the estimate with the exact terms, per term (cells of this pair only;
        for many pairs call ``relp.agreement([r.estimate ...], [r.exact ...])``, which pools them)."""
        from relp.metrics import agreement

        return agreement(self.estimate, self.exact, top_k=top_k)

    def to_dict(self) -> dict:
        return {
            name: {"total": t.total, "side_a": t.side_a, "side_b": t.side_b, "interaction": t.interaction}
            for name, t in (("exact", self.exact), ("estimate", self.estimate))
        }


# ----------------------------------------------------------------------------------------------
# Input checks


def _check_model(model) -> None:
    from relp.patching import _check_model as check_bridge

    check_bridge(model)


def _check_similarity(similarity) -> str:
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}; got {similarity!r}")
    return similarity


def _check_projection(projection) -> int | None:
    if projection is None:
        return None
    if isinstance(projection, bool) or not isinstance(projection, numbers.Integral) or projection < 1:
        raise ValueError(
            f"projection must be None (exact) or a positive integer k (random directions); got {projection!r}"
        )
    return int(projection)


def _resolve_readout(model, readout) -> tuple[Callable, bool, str]:
    """(readout without its L2 normalisation, whether it normalised, its name). The default is the pooling
    the model was trained with (``SentenceEmbedding.from_model``), as in the embedding experiments."""
    if readout is None:
        try:
            readout = SentenceEmbedding.from_model(model)
        except ValueError as error:
            raise ValueError(
                f"pair relevance explains a similarity of sentence embeddings, but {error}. Pass readout=, e.g. "
                "relp.SentenceEmbedding('mean') for an encoder or relp.SentenceEmbedding('last') for a decoder"
            ) from None
    if not callable(readout):
        raise TypeError(
            f"readout must be a callable (model, tokens [1, pos]) -> embeddings [1, d], e.g. a relp.SentenceEmbedding; "
            f"got {type(readout).__name__}"
        )
    name = str(getattr(readout, "name", type(readout).__name__))
    if isinstance(readout, SentenceEmbedding) and readout.normalize:
        return dataclasses.replace(readout, normalize=False), True, name
    return readout, False, name


def _tokens(model, text, name: str) -> torch.Tensor:
    """One text's tokens [1, pos] (BOS first), or a clear error for an empty text or a batch."""
    if isinstance(text, str):
        if not text.strip():
            raise ValueError(f"{name} is empty ({text!r}); expected a text with at least one word")
    elif isinstance(text, torch.Tensor):
        if text.numel() == 0:
            raise ValueError(f"{name} is an empty token tensor (shape {tuple(text.shape)}); expected at least one token")
        if text.ndim == 2 and text.shape[0] != 1:
            raise ValueError(f"{name} must be one text; got a batch of {text.shape[0]} (token shape {tuple(text.shape)})")
    else:
        raise TypeError(f"{name} must be a string or a token tensor [pos] / [1, pos]; got {type(text).__name__}")
    return to_tokens(model, text)


def _checked_embedding(embedding, readout_name: str) -> torch.Tensor:
    if not isinstance(embedding, torch.Tensor) or embedding.ndim != 2 or embedding.shape[0] < 1:
        shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
        raise ValueError(
            f"the readout {readout_name} must return embeddings [batch, d]; got {shape}. Is the model an "
            "embedding model with a readout such as relp.SentenceEmbedding?"
        )
    return embedding


def _start(model, what: str) -> None:
    _check_model(model)
    check_no_rule_context(model, what)
    check_eval_mode(model)
    check_gradients_possible(what)


# ----------------------------------------------------------------------------------------------
# The engine: one forward pass per side, batched VJPs of the pooled embedding


@dataclass
class _Side:
    """One text's forward pass under the rules: the input leaf and the pooled embedding u [D]."""

    tokens: torch.Tensor
    leaf: torch.Tensor  # [1, pos, d_model], requires grad; its value is the input embeddings
    embedding: torch.Tensor  # [D], in the graph


def _forward(model, tokens, readout, readout_name: str, rule_set: RuleSet, inputs: torch.Tensor | None = None) -> _Side:
    """Run `readout` on `tokens` with the input embeddings made a leaf (replaced by `inputs` if given)."""
    store: dict[str, torch.Tensor] = {}

    def make_leaf(x, hook):
        value = x if inputs is None else inputs.to(x.dtype).reshape(x.shape)
        store["leaf"] = value.detach().requires_grad_(True)
        return store["leaf"]

    with torch.enable_grad(), applied_rules(model, rule_set), model.hooks(fwd_hooks=[(INPUT_HOOK, make_leaf)]):
        embedding = _checked_embedding(readout(model, tokens), readout_name)
    if "leaf" not in store:
        raise RuntimeError(f"the hook {INPUT_HOOK!r} did not run in the forward pass of {model.cfg.model_name}")
    if embedding.shape[0] != 1:
        raise ValueError(f"the readout {readout_name} returned {embedding.shape[0]} embeddings for one text; expected 1")
    return _Side(tokens, store["leaf"], embedding[0])


def _vjp_relevance(side: _Side, cotangents: torch.Tensor, multiplier: torch.Tensor, *, retain: bool = True) -> torch.Tensor:
    """``sum_h multiplier[i, h] * d <c, u> / d x[i, h]`` for each cotangent c (rows of `cotangents` [n, D]):
    [n, pos]. One batched backward pass per chunk of cotangents (the backward is vmapped over them)."""
    n = cotangents.shape[0]
    positions = side.leaf.shape[1]
    chunk = max(1, MAX_COTANGENT_ROWS // max(1, positions))
    out = []
    cotangents = cotangents.to(side.embedding.dtype)
    for begin in range(0, n, chunk):
        part = cotangents[begin : begin + chunk]
        last = begin + chunk >= n
        try:
            (grads,) = torch.autograd.grad(
                side.embedding, side.leaf, grad_outputs=part, is_grads_batched=True, retain_graph=retain or not last
            )
        except RuntimeError as error:
            if "vmap" not in str(error) and "batched" not in str(error):
                raise
            # A custom autograd function without a vmap rule (some attention rules): one cotangent at a time.
            grads = torch.stack(
                [torch.autograd.grad(side.embedding, side.leaf, grad_outputs=c, retain_graph=True)[0] for c in part]
            )
        out.append((grads[:, 0] * multiplier[0]).sum(-1))
    return torch.cat(out).detach()


def _jvp_relevance(model, side: _Side, readout, rule_set: RuleSet, multiplier: torch.Tensor) -> torch.Tensor:
    """``R_s`` [T, D] with ``R_s[i, m] = multiplier[i] . d u_m / d x[i]``: forward-mode derivatives of the
    readout along `multiplier` at position i, for every i in one pass (T stacked copies of the text, copy
    i's tangent at position i). Under the rules the tangents follow each rule's path (a rule keeps the
    value and swaps the derivative's path, ``y.detach() + (p - p.detach())``, whose forward derivative is
    p's), the transpose of the rule's backward. Raises where a rule has no forward derivative."""
    import torch.autograd.forward_ad as forward_ad

    x = side.leaf.detach()
    positions = x.shape[1]
    primal = x.expand(positions, *x.shape[1:]).contiguous()
    tangent = torch.zeros_like(primal)
    index = torch.arange(positions, device=primal.device)
    tangent[index, index] = multiplier[0].to(primal.dtype)
    with torch.no_grad(), forward_ad.dual_level():
        dual = forward_ad.make_dual(primal, tangent)

        def inject(value, hook):
            if value.shape != dual.shape:
                raise RuntimeError(f"{hook.name}: expected shape {tuple(dual.shape)}, got {tuple(value.shape)}")
            return dual

        with applied_rules(model, rule_set), model.hooks(fwd_hooks=[(INPUT_HOOK, inject)]):
            embedding = readout(model, side.tokens.repeat(positions, 1))
        rows = forward_ad.unpack_dual(embedding).tangent
    if rows is None:
        raise RuntimeError("no forward derivative reached the readout's embedding")
    return rows.detach().reshape(positions, -1)


def _pair_matrix(side_a: _Side, side_b: _Side, multiplier_a, multiplier_b, projection: int | None, seed: int,
                 forward: Callable | None = None):
    """``R_a R_b^T`` [T_a, T_b] with ``R_s[i, m] = multiplier_s[i] . d u_m / d x_s[i]``, and how it was
    computed. Exact with `forward` (``(side, multiplier) -> R_s``, :func:`_jvp_relevance`): forward-mode
    rows of both sides, one pass each; where that fails, or without it, reverse mode: full relevances of
    the shorter side, then its rows as cotangents on the other (see the module docstring). Projected:
    ``R_a P (R_b P)^T``."""
    if projection is None and forward is not None:
        try:
            rows_a, rows_b = forward(side_a, multiplier_a), forward(side_b, multiplier_b)
            return rows_a @ rows_b.T, "forward mode: 2 passes"
        except (RuntimeError, NotImplementedError):
            pass  # a rule or an operation without a forward derivative: reverse mode below
    dim = side_a.embedding.shape[0]
    dtype, device = side_a.embedding.dtype, side_a.embedding.device
    if projection is not None:
        generator = torch.Generator().manual_seed(int(seed))
        directions = torch.randn(projection, dim, generator=generator, dtype=torch.float64) / math.sqrt(projection)
        directions = directions.to(device=device, dtype=dtype)  # rows are the columns of P
        projected_a = _vjp_relevance(side_a, directions, multiplier_a, retain=False)  # [k, T_a] = (R_a P)^T
        projected_b = _vjp_relevance(side_b, directions, multiplier_b, retain=False)
        return projected_a.T @ projected_b, f"reverse mode: {2 * projection} cotangents"
    identity = torch.eye(dim, dtype=dtype, device=device)
    if side_a.leaf.shape[1] < side_b.leaf.shape[1]:
        full_a = _vjp_relevance(side_a, identity, multiplier_a, retain=False)  # [D, T_a] = R_a^T
        columns = _vjp_relevance(side_b, full_a.T, multiplier_b, retain=False)  # [T_a, T_b]: R_a R_b^T
        return columns, f"reverse mode: {dim + full_a.shape[1]} cotangents"
    full_b = _vjp_relevance(side_b, identity, multiplier_b, retain=False)  # [D, T_b] = R_b^T
    rows = _vjp_relevance(side_a, full_b.T, multiplier_a, retain=False)  # [T_b, T_a]: R_b R_a^T
    return rows.T, f"reverse mode: {dim + full_b.shape[1]} cotangents"


def _scale(similarity: str, normalized: bool, u_a: torch.Tensor, u_b: torch.Tensor) -> float:
    """The constant factor of the similarity over the dot product of the unnormalised embeddings."""
    if similarity == "cosine" or normalized:
        return 1.0 / float(u_a.detach().double().norm().clamp_min(1e-12) * u_b.detach().double().norm().clamp_min(1e-12))
    return 1.0


# ----------------------------------------------------------------------------------------------
# Public functions


def pair_relevance(
    model,
    text_a: Text,
    text_b: Text,
    *,
    similarity: str = "cosine",
    readout=None,
    rules: str | Sequence[str] | None = DEFAULT_PRESET,
    projection: int | None = None,
    seed: int = 0,
    mode: str = "auto",
) -> PairRelevance:
    """Token-pair relevance ``R`` [tokens_a, tokens_b] of the similarity of two texts (BiLRP).

    Args:
        model: an embedding model (TransformerBridge), e.g. ``relp.load_model("sentence-transformers/all-MiniLM-L6-v2")``.
        text_a, text_b: a text each (any lengths), or token tensors [pos] / [1, pos] (BOS first).
        similarity: ``"cosine"`` (default; the embeddings' norms are constants, see the module docstring)
            or ``"dot"`` (of the readout's embeddings: with a normalising readout that is the cosine too).
        readout: ``(model, tokens) -> [1, D]``; default ``relp.SentenceEmbedding.from_model(model)``, the
            pooling the model was trained with (a clear error for a model without one: pass a readout).
        rules: a rule preset or rule names (:mod:`relp.rules`; default ``"relp"``), checked live on the
            model; ``"gradient"`` or None gives plain gradient x input.
        projection: None (exact: D + min(T_a, T_b) cotangents) or k >= 1 random directions (2 k
            cotangents; an unbiased estimate, error ~ 1/sqrt(k), see :func:`projection_error`).
        seed: seeds the random projection.
        mode: how the exact matrix is computed: ``"auto"`` (forward-mode derivatives, one pass of T stacked
            copies per text, where every rule has one; else reverse mode), ``"forward"`` (an error where it
            cannot), ``"reverse"`` (batched VJPs, D + min(T_a, T_b) cotangents). The same matrix either way.

    Returns:
        A :class:`PairRelevance`. Example::

            R = relp.pair_relevance(encoder, "The doctor examined the sick child.", "A physician checked on the ill kid.")
            R.top_pairs(3, exclude=("[CLS]", "[SEP]"))   # e.g. [(2, 2, 'doctor', 'physician', 0.05), ...]
    """
    start = time.perf_counter()
    _start(model, "relp.pair_relevance")
    similarity = _check_similarity(similarity)
    projection = _check_projection(projection)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int; got {seed!r}")
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"mode must be 'auto', 'forward' or 'reverse'; got {mode!r}")
    if mode == "forward" and projection is not None:
        raise ValueError("a random projection is computed in reverse mode; pass mode='auto' or 'reverse' with projection=")
    readout, normalized, readout_name = _resolve_readout(model, readout)
    tokens_a = _tokens(model, text_a, "text_a")
    tokens_b = _tokens(model, text_b, "text_b")
    rule_set = _live_rules(model, rules)
    side_a = _forward(model, tokens_a, readout, readout_name, rule_set)
    side_b = _forward(model, tokens_b, readout, readout_name, rule_set)
    if side_a.embedding.shape != side_b.embedding.shape:
        raise ValueError(f"the embeddings of A and B differ in shape: {tuple(side_a.embedding.shape)} vs {tuple(side_b.embedding.shape)}")
    scale = _scale(similarity, normalized, side_a.embedding, side_b.embedding)
    value = float(side_a.embedding.detach().double() @ side_b.embedding.detach().double()) * scale
    forward = None if mode == "reverse" else (lambda side, multiplier: _jvp_relevance(model, side, readout, rule_set, multiplier))
    if mode == "forward":
        matrix = _jvp_relevance(model, side_a, readout, rule_set, side_a.leaf.detach()) @ _jvp_relevance(
            model, side_b, readout, rule_set, side_b.leaf.detach()).T
        cost = "forward mode: 2 passes"
    else:
        matrix, cost = _pair_matrix(side_a, side_b, side_a.leaf.detach(), side_b.leaf.detach(), projection, seed, forward)
    return PairRelevance(
        matrix=(matrix * scale).detach(),
        similarity=value,
        similarity_kind=similarity,
        tokens_a=tuple(model.to_str_tokens(tokens_a[0])),
        tokens_b=tuple(model.to_str_tokens(tokens_b[0])),
        rules=tuple(rule_set.active),
        seconds=time.perf_counter() - start,
        projection=projection,
        model=str(model.cfg.model_name),
        metadata={
            "readout": readout_name,
            "norms_as_constants": scale != 1.0,
            "scale": scale,
            "input_hook": INPUT_HOOK,
            "computed_by": cost,
            "rules_not_applicable": dict(rule_set.not_applicable),
            "seed": int(seed) if projection is not None else None,
        },
    )


def projection_error(
    model, text_a: Text, text_b: Text, ks: Sequence[int] = (8, 32, 128), *, seeds: Sequence[int] = (0, 1, 2), **options
) -> list[dict]:
    """The random projection's error against the exact matrix: for each k, the relative Frobenius error
    ``|R_k - R| / |R|`` averaged over `seeds`, and the seconds per call. `options` go to
    :func:`pair_relevance`. Returns ``[{"k", "relative_error", "seconds"}, ...]`` (exact first, k = None)."""
    exact = pair_relevance(model, text_a, text_b, **options)
    rows = [{"k": None, "relative_error": 0.0, "seconds": exact.seconds}]
    reference = exact.matrix.double()
    for k in ks:
        errors, seconds = [], []
        for seed in seeds:
            estimate = pair_relevance(model, text_a, text_b, projection=k, seed=seed, **options)
            errors.append(float((estimate.matrix.double() - reference).norm() / reference.norm()))
            seconds.append(estimate.seconds)
        rows.append({"k": int(k), "relative_error": sum(errors) / len(errors), "seconds": sum(seconds) / len(seconds)})
    return rows


def _pair(texts, name: str) -> tuple:
    if not isinstance(texts, (tuple, list)) or len(texts) != 2:
        raise TypeError(f"{name} must be a (clean, corrupted) pair of texts or token tensors; got {texts!r:.200}")
    return tuple(texts)


def _changed_positions(clean: torch.Tensor, corrupted: torch.Tensor, name: str) -> tuple[int, ...]:
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"the clean and corrupted versions of {name} have different token lengths ({clean.shape[1]} vs "
            f"{corrupted.shape[1]}); interaction patching patches position by position and needs equal lengths"
        )
    changed = tuple(torch.nonzero(clean[0] != corrupted[0]).flatten().tolist())
    if not changed:
        raise ValueError(f"the clean and corrupted versions of {name} are the same tokens; expected at least one changed token")
    return changed


def _embeddings_with_inputs(model, tokens, readout, inputs: torch.Tensor) -> torch.Tensor:
    """Embeddings [n, D] of `tokens` with the input embeddings replaced by `inputs` [n, pos, d_model]."""

    def replace(x, hook):
        return inputs.to(x.dtype)

    with torch.no_grad(), model.hooks(fwd_hooks=[(INPUT_HOOK, replace)]):
        return readout(model, tokens.expand(inputs.shape[0], -1))


def _similarities(e_a: torch.Tensor, e_b: torch.Tensor, similarity: str, normalized: bool) -> torch.Tensor:
    """s(a_r, b_c) for every row r of e_a [n, D] and c of e_b [m, D]: [n, m] in float64."""
    e_a, e_b = e_a.double(), e_b.double()
    if similarity == "cosine" or normalized:
        e_a = e_a / e_a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        e_b = e_b / e_b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return e_a @ e_b.T


def interaction_patching(
    model,
    a: tuple[Text, Text],
    b: tuple[Text, Text],
    *,
    similarity: str = "cosine",
    readout=None,
    rules: str | Sequence[str] | None = DEFAULT_PRESET,
) -> InteractionResult:
    """Split the change of ``s(A, B)`` between corrupted and clean versions of both texts into a term per
    side and an interaction term, exactly and by pair relevance (see the module docstring).

    Args:
        model, similarity, readout, rules: as for :func:`pair_relevance` (the rules act on the estimate).
        a, b: ``(clean, corrupted)`` of each text; clean and corrupted of one text have equal token lengths.

    Returns:
        An :class:`InteractionResult`: ``exact`` (double activation patching; its whole-text terms sum to
        ``clean_similarity - corrupted_similarity``) and ``estimate``, cells on the changed tokens, and
        ``agreement()``.
    """
    start = time.perf_counter()
    _start(model, "relp.interaction_patching")
    similarity = _check_similarity(similarity)
    readout, normalized, readout_name = _resolve_readout(model, readout)
    clean_a, corrupted_a = (_tokens(model, t, f"a[{k}]") for k, t in enumerate(_pair(a, "a")))
    clean_b, corrupted_b = (_tokens(model, t, f"b[{k}]") for k, t in enumerate(_pair(b, "b")))
    changed_a = _changed_positions(clean_a, corrupted_a, "a")
    changed_b = _changed_positions(clean_b, corrupted_b, "b")
    rule_set = _live_rules(model, rules)

    # Exact: the input embeddings of both versions, then every patched run of each side (no gradient).
    exact_start = time.perf_counter()

    def inputs(tokens):
        store = {}

        def capture(x, hook):
            store["x"] = x.detach()
            return x

        with torch.no_grad(), model.hooks(fwd_hooks=[(INPUT_HOOK, capture)]):
            readout(model, tokens)
        return store["x"]

    def patched_embeddings(clean, corrupted, changed):
        x_clean, x_corrupted = inputs(clean), inputs(corrupted)
        rows = [x_corrupted[0], x_clean[0]]
        for position in changed:
            row = x_corrupted[0].clone()
            row[position] = x_clean[0, position]
            rows.append(row)
        embeddings = _checked_embedding(_embeddings_with_inputs(model, corrupted, readout, torch.stack(rows)), readout_name)
        return embeddings, x_clean, x_corrupted

    e_a, x_clean_a, x_corrupted_a = patched_embeddings(clean_a, corrupted_a, changed_a)
    e_b, x_clean_b, x_corrupted_b = patched_embeddings(clean_b, corrupted_b, changed_b)
    s = _similarities(e_a, e_b, similarity, normalized)  # rows/columns: corrupted, clean, each changed token
    none, only_a, only_b, both = s[0, 0], s[1, 0], s[0, 1], s[1, 1]
    exact = InteractionTerms(
        method="interaction patching (exact)",
        total=float(both - none),
        side_a=float(only_a - none),
        side_b=float(only_b - none),
        interaction=float(both - only_a - only_b + none),
        scores={
            "side_a": (s[2:, 0] - none).float(),
            "side_b": (s[0, 2:] - none).float(),
            "interaction": (s[2:, 2:] - s[2:, :1] - s[:1, 2:] + none).float(),
        },
    )
    exact_seconds = time.perf_counter() - exact_start

    # Estimate: first order at the corrupted pair, under the rules.
    estimate_start = time.perf_counter()
    side_a = _forward(model, corrupted_a, readout, readout_name, rule_set)
    side_b = _forward(model, corrupted_b, readout, readout_name, rule_set)
    delta_a, delta_b = x_clean_a - x_corrupted_a, x_clean_b - x_corrupted_b
    scale = _scale(similarity, normalized, side_a.embedding, side_b.embedding)
    u_a, u_b = side_a.embedding.detach(), side_b.embedding.detach()
    first_a = _vjp_relevance(side_a, u_b[None], delta_a)[0] * scale  # [T_a]: (x - x') . ds/dx' per token
    first_b = _vjp_relevance(side_b, u_a[None], delta_b)[0] * scale
    pairs, _ = _pair_matrix(
        side_a, side_b, delta_a, delta_b, None, 0, lambda side, multiplier: _jvp_relevance(model, side, readout, rule_set, multiplier)
    )
    pairs = pairs * scale
    index_a, index_b = list(changed_a), list(changed_b)
    side_a_total, side_b_total, interaction_total = float(first_a.sum()), float(first_b.sum()), float(pairs.sum())
    estimate = InteractionTerms(
        method=f"interaction patching (pair relevance, {'+'.join(rule_set.active) or 'gradient'})",
        total=side_a_total + side_b_total + interaction_total,
        side_a=side_a_total,
        side_b=side_b_total,
        interaction=interaction_total,
        scores={
            "side_a": first_a[index_a].float(),
            "side_b": first_b[index_b].float(),
            "interaction": pairs[index_a][:, index_b].float(),
        },
    )
    estimate_seconds = time.perf_counter() - estimate_start
    return InteractionResult(
        exact=exact,
        estimate=estimate,
        changed_a=changed_a,
        changed_b=changed_b,
        tokens_a=tuple(model.to_str_tokens(clean_a[0])),
        tokens_b=tuple(model.to_str_tokens(clean_b[0])),
        similarity_kind=similarity,
        clean_similarity=float(both),
        corrupted_similarity=float(none),
        rules=tuple(rule_set.active),
        seconds={"exact": exact_seconds, "estimate": estimate_seconds, "total": time.perf_counter() - start},
        model=str(model.cfg.model_name),
        metadata={
            "readout": readout_name,
            "direction": "denoising",
            "input_hook": INPUT_HOOK,
            "forward_passes_exact": 4 + len(changed_a) + len(changed_b),
        },
    )
