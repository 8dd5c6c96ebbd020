"""LRP rules as forward-time hooks: forward values unchanged, gradients follow Layer-wise Relevance Propagation.

Every rule here is a TransformerLens forward hook that returns a tensor with *the same value* as the one
it receives (bit for bit: ``y.detach() + (p - p.detach())`` adds an exact zero) but a different autograd
path ``p``. Under the rules, the gradient of a metric is the LRP propagation coefficient, and
gradient x (clean - corrupted) is relevance patching.

============  =====================================  ===========================================================
rule          acts on                                backward effect
============  =====================================  ===========================================================
ln            every LayerNorm / RMSNorm              the normalising scale 1/std (1/rms) is a constant: no gradient
                                                     through it; mean-centring (LayerNorm) stays
ln_attn       norms before attention (pre-LN ln1)    the LN-rule at those norms only; likewise ``ln_mlp`` (before
ln_mlp        norms before the MLP (pre-LN ln2)      the MLP), ``ln_final`` (the final norm; BERT: the MLM head's),
ln_final      the final norm                         ``ln_post`` (after a sublayer: BERT/RoBERTa's ln1 and ln2),
ln_post       norms after a sublayer (post-LN)       ``ln_qk`` (query/key norms: Qwen3, OLMo-2, Gemma-3) and
ln_qk         query/key norms                        ``ln_embed`` (BERT's embedding norm). Kinds come from each
ln_embed      the embedding norm                     norm's position in the forward pass (:func:`norm_kinds`); a
                                                     kind the model lacks is ``not_applicable``
identity      the MLP activation (GELU, SiLU, ...)   d act(x)/dx is replaced by act(x)/x (at x == 0 exactly, the
                                                     plain derivative act'(0) is kept, which is the limit of
                                                     act(x)/x for GELU and SiLU: never NaN)
identity_eps  the MLP activation                     the RelP authors' code: act(x) / (x + 1e-6 * (sign(x) +
                                                     (x == 0))), so 0 at x == 0 and x moved 1e-6 away from 0
                                                     elsewhere. Small: on SmolLM2-135M (float32; one IOI batch,
                                                     11 prompts of 19 tokens; resid_pre, attn_out, mlp_out)
                                                     max |RelP(relp) - RelP(relp_eps)| = 2.0e-5 x max |RelP|
half          the gate product act(g) * u            each factor receives half of the gradient (uniform rule, N=2);
                                                     only gated MLPs have this product
ah            the attention pattern                  the pattern is a constant: relevance flows through V only
attnlrp       queries, keys and values               AttnLRP: gradients reaching q and k are scaled by 1/4, v by 1/2
softmax_t2    the attention softmax                  GIM's temperature-adjusted softmax gradient: backward of
                                                     softmax(s/T), T = 2, times T (GIM's code drops the 1/T factor,
                                                     and so does relp): g -> q * (g - <g, q>), q = softmax(s/2)
============  =====================================  ===========================================================

Exclusive pairs (a clear error): ``ah`` with ``attnlrp`` or ``softmax_t2``, ``identity`` with
``identity_eps``. ``ln`` with an ``ln_<kind>`` rule is ``ln``. The pattern rules (``ah``, ``softmax_t2``)
act at ``hook_pattern``, or, where the bridge ignores edits there (BERT-style), through an eager attention
function. ``softmax_t2`` changes the gradient only as far as the patterns are far from uniform over their
unmasked entries (for a uniform row softmax(s/2) = softmax(s)): on a freshly initialised random BERT
(near-uniform attention) the liveness check rejects it.

Presets (``PRESETS``) name rule sets; ``"relp"`` is the paper's (ln + identity + half; RelP,
arXiv 2508.21258); ``"relp_eps"`` the same with the authors' stabilised Identity-rule; ``"gim"`` is GIM
(Edin et al. 2025, arXiv 2505.17630): ln + attnlrp (q, k x1/4, v x1/2) + softmax_t2, activation
derivatives untouched. AttnLRP: Achtibat et al. 2024, arXiv 2402.05602.
:func:`rule_sites` lists where each rule acts on a given model.
``lrp_rules(model, "relp")`` registers the hooks for the duration of a ``with`` block, after checking
on the actual model that every rule is live at each kind of site it acts on (changes the gradient there,
finitely and not to all zeros, and leaves the forward values alone); hooks are removed on exit, also when
an exception is raised. While a block is open on a model, relp's methods and a nested ``lrp_rules`` on
that model refuse with :class:`RuleContextError` (they apply rules of their own).

Precision: in float16 and bfloat16 models every rule computes its statistics in float32 (the norm scale,
the Identity-rule's ratio act(x)/x, the T=2 softmax, which there is built from the pre-softmax scores),
as the models' own norms do, and casts the result back; float32 and float64 models compute exactly as
before. (In float16 the square of a residual value above 256 overflows: 1/rms became 0 and RelP all zero.)

>>> from relp.testing import tiny_model
>>> model = tiny_model("llama")
>>> with lrp_rules(model, "relp") as rules:
...     rules.active
('ln', 'identity', 'half')
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from relp.checks import check_rules_usable

Hook = tuple[str, Callable]
# The model's hook point names (aliases included), read once per call: on the bridge ``model.hook_dict``
# is a property that rebuilds the registry with every alias on each read (~0.5 ms).
HookNames = Collection[str]


@dataclass(frozen=True)
class Rule:
    """One LRP rule: its name, the sub-computation it acts on, and what it changes in the backward pass."""

    name: str
    site: str  # "norm", "mlp" or "attention": which hook builder implements it
    backward_effect: str


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("ln", "norm", "no gradient through the normalising scale of LayerNorm/RMSNorm"),
        Rule("ln_attn", "norm", "LN-rule at the norms before attention only"),
        Rule("ln_mlp", "norm", "LN-rule at the norms before the MLP only"),
        Rule("ln_final", "norm", "LN-rule at the final norm only"),
        Rule("ln_post", "norm", "LN-rule at the norms after a sublayer only (post-LN)"),
        Rule("ln_qk", "norm", "LN-rule at the query/key norms only"),
        Rule("ln_embed", "norm", "LN-rule at the embedding norm only"),
        Rule("identity", "mlp", "activation derivative replaced by act(x)/x"),
        Rule("identity_eps", "mlp", "activation derivative replaced by act(x)/(x + 1e-6*(sign(x) + (x == 0)))"),
        Rule("half", "mlp", "each factor of the gate product act(g)*u gets half of the gradient"),
        Rule("ah", "attention", "attention pattern treated as a constant"),
        Rule("attnlrp", "attention", "gradient to q and k scaled by 1/4, to v by 1/2"),
        Rule("softmax_t2", "attention", "attention softmax backward taken at temperature 2"),
    )
}

# The norm kinds, by where a norm sits (see norm_kinds), and the LN-rule restricted to each.
NORM_KINDS = ("attn", "mlp", "final", "post", "qk", "embed")
_NORM_RULES = {f"ln_{kind}": kind for kind in NORM_KINDS}
_NORM_KIND_WORDS = {
    "attn": "norm before attention (pre-LN)",
    "mlp": "norm before the MLP (pre-LN)",
    "final": "final norm",
    "post": "norm after a sublayer (post-LN)",
    "qk": "query/key norm",
    "embed": "embedding norm",
}
# Pairs of rules that rewrite the same computation in incompatible ways.
_EXCLUSIVE = (
    ("ah", "attnlrp", "both act on attention"),
    ("ah", "softmax_t2", "both rewrite the attention softmax's backward pass"),
    ("identity", "identity_eps", "both replace the MLP activation's derivative"),
)
SOFTMAX_TEMPERATURE = 2.0  # softmax_t2 (GIM's default)
IDENTITY_EPS = 1e-6  # identity_eps: the RelP authors' stabiliser

PRESETS: dict[str, tuple[str, ...]] = {
    "relp": ("ln", "identity", "half"),  # the paper's rule set, the default
    "relp+ah": ("ln", "identity", "half", "ah"),
    "attnlrp": ("ln", "identity", "half", "attnlrp"),
    "ln": ("ln",),
    "relp_eps": ("ln", "identity_eps", "half"),  # relp with the RelP authors' stabilised Identity-rule
    "gim": ("ln", "attnlrp", "softmax_t2"),  # GIM (arXiv 2505.17630): norms frozen, q/k/v scaled, softmax at T=2
    "gradient": (),  # no rule: plain gradients, i.e. attribution patching
}
DEFAULT_PRESET = "relp"


class RuleNotLiveError(RuntimeError):
    """A requested rule does not change the gradient on this model (its hooks are ignored)."""


@dataclass(frozen=True)
class RuleSet:
    """The rules resolved for one model: those that act, and those that do not apply to it."""

    requested: tuple[str, ...]
    active: tuple[str, ...]
    not_applicable: dict[str, str] = field(default_factory=dict)  # rule -> why

    @property
    def name(self) -> str:
        return "+".join(self.active) if self.active else "gradient"


def resolve_rules(model, rules: str | Iterable[str] | None = DEFAULT_PRESET) -> RuleSet:
    """Resolve a preset name or an iterable of rule names against a model.

    The Half-rule does not apply to models without a gated MLP (GPT-2, BERT), nor an ``ln_<kind>`` rule
    to a model without norms of that kind (:func:`norm_kinds`: ``ln_post`` on GPT-2, ``ln_attn`` on BERT);
    they are then recorded in ``not_applicable`` with the reason instead of being an error, so the presets
    work on every architecture. Unknown names and exclusive pairs (``ah`` with ``attnlrp`` or
    ``softmax_t2``, ``identity`` with ``identity_eps``) raise ValueError.
    """
    if rules is None:
        names: tuple[str, ...] = ()
    elif isinstance(rules, str):
        if rules in PRESETS:
            names = PRESETS[rules]
        elif rules in RULES:
            names = (rules,)
        else:
            raise ValueError(
                f"unknown rule preset {rules!r}; expected a preset from {sorted(PRESETS)} or rule names "
                f"from {sorted(RULES)}"
            )
    else:
        names = tuple(rules)
        unknown = [n for n in names if n not in RULES]
        if unknown:
            raise ValueError(f"unknown rule(s) {unknown}; expected names from {sorted(RULES)}")
    for a, b, why in _EXCLUSIVE:
        if a in names and b in names:
            raise ValueError(f"rules {a!r} and {b!r} {why}; choose one of them (got {list(names)})")
    not_applicable = {}
    if "half" in names and not model.cfg.gated_mlp:
        not_applicable["half"] = "the model has no gated MLP (no act(g) * u product)"
    requested_kinds = {_NORM_RULES[n] for n in names if n in _NORM_RULES}
    if requested_kinds:
        present = set(norm_kinds(model).values())
        for kind in sorted(requested_kinds - present):
            not_applicable[f"ln_{kind}"] = f"the model has no {_NORM_KIND_WORDS[kind]}"
    active = tuple(dict.fromkeys(n for n in names if n not in not_applicable))
    if names and not active:
        # e.g. rules="half" on GPT-2: no rule would act, and RelP would be plain AtP under RelP's name
        reasons = "; ".join(f"{rule}: {why}" for rule, why in not_applicable.items())
        raise ValueError(
            f"none of the requested rules {list(names)} applies to {model.cfg.model_name} ({reasons}); expected at "
            f"least one rule that acts on this model, or rules='gradient' for plain gradients"
        )
    return RuleSet(requested=tuple(names), active=active, not_applicable=not_applicable)


_HALF = (torch.float16, torch.bfloat16)


def _statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a rule computes its statistics in (norm scales, activation ratios): float32 for float16
    and bfloat16 tensors, as the model's own norms do (the square of |x| > 256 overflows float16), else
    the tensor's own dtype (float32, float64)."""
    return torch.float32 if dtype in _HALF else dtype


def _widen(x: torch.Tensor) -> torch.Tensor:
    """`x` in :func:`_statistics_dtype` (a no-op for float32 and float64)."""
    return x.to(_statistics_dtype(x.dtype))


def _keep_value(value: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, `path`'s gradient in the backward pass (adds an exact zero)."""
    return value.detach() + (path - path.detach())


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by a constant."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()  # not a view: forward-mode AD (jvp) needs a new tensor

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None

    @staticmethod
    def jvp(ctx, x_tangent, factor_tangent):
        # forward-mode derivative: the transpose of the (diagonal) backward map, the same factor
        return None if x_tangent is None else x_tangent * ctx.factor


class _ConstantRatioGatePath(torch.autograd.Function):
    """Fused Identity-rule (+ gate product): the value `post`, with the gradients that autograd computes for
    ``_keep_value(post, _gate_product(ratio * pre, activated, up, share))`` (or, without `up`, for
    ``_keep_value(post, ratio * pre)``), in the same operations, so bit for bit: to `pre`
    ``((g * up) * share) * ratio`` (without `up`: ``g * ratio``), to `up` ``g * (share * activated)``.
    For float16/bfloat16 models `ratio` is float32 and the gradient to `pre` is taken in float32 and cast
    back to `pre`'s dtype.
    It saves the forward pass the path's seven intermediate tensors, and the backward pass their nodes."""

    @staticmethod
    def forward(ctx, post, pre, up, ratio, scaled_activated, share):
        ctx.share = share
        ctx.pre_dtype = pre.dtype
        ctx.save_for_backward(ratio, None if up is None else up.detach(), scaled_activated)
        ctx.save_for_forward(ratio, None if up is None else up.detach(), scaled_activated)
        return post.clone()  # not a view: forward-mode AD (jvp) needs a new tensor

    @staticmethod
    def jvp(ctx, post_tangent, pre_tangent, up_tangent, ratio_tangent, scaled_tangent, share_tangent):
        """Forward-mode derivative along the rule's path (the transpose of :meth:`backward`'s diagonal maps):
        ``d pre * ratio`` (with `up`: ``d pre * up * share * ratio + d up * scaled_activated``)."""
        ratio, up, scaled_activated = ctx.saved_tensors
        out = None
        if pre_tangent is not None:
            wide = pre_tangent.to(ratio.dtype)
            out = (wide * ratio if up is None else wide * up * ctx.share * ratio).to(ctx.pre_dtype)
        if up is not None and up_tangent is not None:
            term = up_tangent * scaled_activated
            out = term if out is None else out + term.to(out.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        ratio, up, scaled_activated = ctx.saved_tensors
        grad_pre = grad_up = None
        if ctx.needs_input_grad[1]:
            wide = grad.to(ratio.dtype)  # float32 for float16/bfloat16 models, as the ratio; else a no-op
            grad_pre = (wide * ratio if up is None else wide * up * ctx.share * ratio).to(ctx.pre_dtype)
        if up is not None and ctx.needs_input_grad[2]:
            grad_up = grad * scaled_activated
        return None, grad_pre, grad_up, None, None, None


class _RmsNormRulePath(torch.autograd.Function):
    """Fused LN-rule on an RMSNorm: the value `y`, with the gradient autograd computes for
    ``_keep_value(y, (_widen(x) * inv_scale * weight).to(y.dtype))`` in the same operations, so bit for
    bit: ``((grad in inv_scale's dtype) * weight) * inv_scale`` to `x`, in `x`'s dtype (for float16 and
    bfloat16 models the product is taken in float32, as the statistics). Saves the forward pass four
    tensors the size of `x`."""

    @staticmethod
    def forward(ctx, y, x, inv_scale, weight):
        ctx.save_for_backward(inv_scale, weight)
        ctx.save_for_forward(inv_scale, weight)
        ctx.x_dtype = x.dtype
        return y.clone()  # not a view: forward-mode AD (jvp) needs a new tensor

    @staticmethod
    def jvp(ctx, y_tangent, x_tangent, inv_scale_tangent, weight_tangent):
        """Forward-mode derivative along the rule's path: ``d x * weight * inv_scale``."""
        inv_scale, weight = ctx.saved_tensors
        return None if x_tangent is None else (x_tangent.to(inv_scale.dtype) * weight * inv_scale).to(ctx.x_dtype)

    @staticmethod
    def backward(ctx, grad):
        inv_scale, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        return None, (grad.to(inv_scale.dtype) * weight * inv_scale).to(ctx.x_dtype), None, None


# ----------------------------------------------------------------------------------------------
# Hook builders, one per site. Each returns (hook name, hook function) pairs for a model.


def _norm_prefixes(names: HookNames) -> list[str]:
    """The hook prefixes of the model's norms (every norm bridge has a ``hook_normalized``)."""
    return [n[: -len(".hook_normalized")] for n in names if n.endswith(".hook_normalized")]


_NORM_KIND_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def norm_kinds(model) -> dict[str, str]:
    """Each norm's hook prefix -> its kind, from where it sits in the forward pass (cached per model).

    Kinds (``NORM_KINDS``): ``"attn"``/``"mlp"``, a norm whose output is the input of the block's attention /
    MLP and that runs after the previous sublayer has finished (pre-LN: GPT-2's and Llama's ``ln1``/``ln2``);
    ``"qk"``, a norm run inside attention whose output is not attention's output (Qwen3's, OLMo-2's,
    Gemma-3's ``attn.q_norm``/``attn.k_norm``); ``"post"``, any other norm inside a block: one run after
    a sublayer started (BERT/RoBERTa's ``ln1`` and ``ln2``, which the bridge runs after attention and
    after the MLP; Gemma-2's post-sublayer norms); outside the blocks, ``"embed"`` before the first block
    (BERT's ``embed_ln``) and ``"final"`` after the last (``ln_final``). The order and the values come
    from one probe forward pass (hook firing order, and ``torch.equal`` of a norm's output with a
    sublayer's input); a model without the sublayers' ``hook_in`` points falls back to the names
    (``ln1`` attn, ``ln2`` mlp, ``q_norm``/``k_norm`` qk, other block norms post).
    """
    if model in _NORM_KIND_CACHE:
        return _NORM_KIND_CACHE[model]
    names = model.hook_dict
    prefixes = _norm_prefixes(names)
    sublayers = [f"blocks.{layer}.{part}" for layer in range(model.cfg.n_layers) for part in ("attn", "mlp")]
    points = [f"{p}.{h}" for p in (*prefixes, *sublayers) for h in ("hook_in", "hook_out")]
    points += [f"blocks.{layer}.hook_in" for layer in range(model.cfg.n_layers)]
    points = [p for p in points if p in names]
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    values: dict[str, torch.Tensor] = {}
    counter = iter(range(1 << 30))

    def record(name):
        def hook(x, hook):
            step = next(counter)
            first.setdefault(name, step)
            last[name] = step
            if isinstance(x, torch.Tensor):
                values[name] = x.detach()
            return x

        return hook

    with torch.no_grad(), model.hooks(fwd_hooks=[(p, record(p)) for p in points]):
        model(_probe_tokens(model)[0])

    def same(a: str, b: str) -> bool:
        x, y = values.get(a), values.get(b)
        return x is not None and y is not None and x.shape == y.shape and torch.equal(x, y)

    block_starts = [first[f"blocks.{layer}.hook_in"] for layer in range(model.cfg.n_layers) if f"blocks.{layer}.hook_in" in first]
    kinds: dict[str, str] = {}
    for prefix in prefixes:
        start, end = first.get(f"{prefix}.hook_in"), last.get(f"{prefix}.hook_out")
        if not prefix.startswith("blocks."):
            before = start is not None and block_starts and start < min(block_starts)
            kinds[prefix] = "embed" if before or (start is None and "embed" in prefix) else "final"
            continue
        layer = prefix.split(".")[1]
        subs = {part: f"blocks.{layer}.{part}" for part in ("attn", "mlp")}
        if start is None or end is None or any(f"{s}.hook_in" not in first for s in subs.values()):
            leaf = prefix.rsplit(".", 1)[-1]
            kinds[prefix] = {"ln1": "attn", "ln2": "mlp", "q_norm": "qk", "k_norm": "qk"}.get(leaf, "post")
            continue
        kind = "post"
        for part, sub in subs.items():
            sub_in, sub_out = first[f"{sub}.hook_in"], last.get(f"{sub}.hook_out", -1)
            if sub_in < start and end < sub_out:  # run inside this sublayer
                kind = "post" if same(f"{prefix}.hook_out", f"{sub}.hook_out") or part != "attn" else "qk"
                break
            # Pre-LN: run after every earlier sublayer of the block finished, its output the sublayer's input.
            earlier_done = all(last.get(f"{s}.hook_out", -1) < start for s in subs.values() if first[f"{s}.hook_in"] < sub_in)
            if end < sub_in and earlier_done and same(f"{prefix}.hook_out", f"{sub}.hook_in"):
                kind = part
                break
        kinds[prefix] = kind
    _NORM_KIND_CACHE[model] = kinds
    return kinds


def _norm_hooks(model, active: frozenset[str], names: HookNames) -> list[Hook]:
    """LN-rule: rebuild each norm's output with the scale detached (value kept exactly); ``ln`` at every
    norm, ``ln_<kind>`` at the norms of that kind (:func:`norm_kinds`)."""
    kinds = {_NORM_RULES[r] for r in active if r in _NORM_RULES}
    if "ln" not in active and not kinds:
        return []
    hooks: list[Hook] = []
    prefixes = _norm_prefixes(names)
    if "ln" not in active:
        of_kind = norm_kinds(model)
        prefixes = [p for p in prefixes if of_kind.get(p) in kinds]
    for prefix in prefixes:
        module = model.get_submodule(prefix)
        inputs: dict[str, torch.Tensor] = {}

        def capture(x, hook, inputs=inputs):
            inputs["x"] = x
            return x

        # Constant for the duration of the rules (the hooks are built anew on every application).
        weight = module.weight.detach()
        if module.uses_weight_offset:
            weight = 1.0 + weight

        def rewrite(y, hook, inputs=inputs, rms=bool(module.uses_rms_norm), eps=_norm_eps(module, model), weight=weight):
            x = inputs.pop("x")
            # Statistics in at least float32, as the model's own norm: in float16 the square of a
            # residual value above 256 overflows, 1/rms becomes 0 and the rule's gradient all zero.
            wide = _widen(x)
            centred = wide if rms else wide - wide.mean(-1, keepdim=True)
            inv_scale = torch.rsqrt(centred.detach().pow(2).mean(-1, keepdim=True) + eps)
            weight = weight.to(centred.dtype)
            if rms:  # the path x * inv_scale * weight, fused (same gradient bit for bit, tested)
                return _RmsNormRulePath.apply(y, x, inv_scale, weight)
            return _keep_value(y, (centred * inv_scale * weight).to(y.dtype))

        hooks += [(f"{prefix}.hook_in", capture), (f"{prefix}.hook_out", rewrite)]
    return hooks


def _norm_eps(module, model) -> float:
    """The epsilon of the forward path the bridge takes: HF's module, or its own python path."""
    native = module.use_native_layernorm_autograd or getattr(module.config, "layer_norm_folding", False)
    if native:
        for attribute in ("eps", "variance_epsilon"):
            value = getattr(module.original_component, attribute, None)
            if value is not None:
                return float(value)
    return float(getattr(module.config, "eps", model.cfg.eps))


def _activation_fn(model, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    mlp = model.blocks[layer].mlp
    act = getattr(mlp.original_component, "act_fn", None)
    if act is not None:
        return act
    from transformer_lens.model_bridge.generalized_components.gated_mlp import resolve_activation_fn

    return resolve_activation_fn(mlp.config)


def identity_rule(
    pre: torch.Tensor, activated: torch.Tensor, plain: torch.Tensor | Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Identity-rule: the gradient path of the MLP activation act(x), with d act(x)/dx replaced by act(x)/x.

    `pre` is the activation's input x, `activated` its value act(x) (only its value is used) and
    `plain` act(x) with its ordinary autograd path (or a function that computes it). The path is
    ``act(x)/x * x`` with the ratio a constant; where x is exactly 0 the ratio is undefined and `plain`
    is kept (its derivative act'(0) is the limit of act(x)/x for GELU and SiLU), so the gradient is never
    NaN. Without an exact zero (the usual case) `plain` is not used, and not computed if it is a function.
    For float16/bfloat16 tensors the ratio and the path are computed in float32 and cast back.
    """
    out_dtype = activated.dtype
    value, wide_pre, wide_activated = _widen(pre.detach()), _widen(pre), _widen(activated.detach())
    if value.numel() and value.abs().amin() > 0:  # no exact zero (nor NaN): one reduction, no bool tensor
        # The same gradient, bit for bit, as the branch below: there ``where`` passes the whole gradient
        # to ``ratio * pre`` and an exact zero to `plain`, which adds nothing.
        return (wide_activated / value * wide_pre).to(out_dtype)
    zero = value == 0
    ratio = wide_activated / torch.where(zero, torch.ones_like(value), value)
    # At an exact zero, act(x)/x is undefined: keep the local derivative there.
    kept = plain() if callable(plain) else plain
    return torch.where(zero, _widen(kept), ratio * wide_pre).to(out_dtype)


def _eps_denominator(x: torch.Tensor) -> torch.Tensor:
    """The RelP authors' stabilised denominator of the Identity-rule: ``x + 1e-6 * (sign(x) + (x == 0))``.

    Never zero (at x == 0 it is 1e-6, so act(0)/1e-6 = 0 for GELU and SiLU: the gradient there is 0,
    where ``identity`` keeps act'(0) = 1/2); elsewhere it moves x away from 0 by 1e-6 (in x's dtype)."""
    return x + IDENTITY_EPS * (torch.sign(x) + (x == 0).to(x.dtype))


def _gate_product(activation_path: torch.Tensor, activated: torch.Tensor, up: torch.Tensor, share: float) -> torch.Tensor:
    """The gate product act(g) * u as a gradient path in which each factor receives `share` of the gradient
    (1.0: the ordinary product rule). `activation_path` carries act(g)'s gradient path, `activated` its value."""
    return share * activation_path * up.detach() + share * activated.detach() * up


def half_rule(activation_path: torch.Tensor, activated: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Half-rule: the gradient path of a gated MLP's product act(g) * u, each factor getting half the gradient.

    The uniform rule for a product of N = 2 factors: the gate act(g) (through `activation_path`, e.g.
    the :func:`identity_rule` path; `activated` is its value) and the up projection `up` each get half.
    With the Identity-rule on the gate, the two halves of gradient x input sum to act(g) * u exactly.
    """
    return _gate_product(activation_path, activated, up, 0.5)


def _mlp_hooks(model, active: frozenset[str], names: HookNames) -> list[Hook]:
    """Identity- and Half-rule: rebuild the MLP hidden units (hook_post) from the captured inputs,
    composing :func:`identity_rule` (the activation) and :func:`half_rule` (the gate product)."""
    identity_eps = "identity_eps" in active
    identity, half = "identity" in active or identity_eps, "half" in active
    if not (identity or half):
        return []
    gated = bool(model.cfg.gated_mlp)
    hooks: list[Hook] = []
    for layer in range(model.cfg.n_layers):
        prefix = f"blocks.{layer}.mlp"
        captured: dict[str, torch.Tensor] = {}
        act = _activation_fn(model, layer) if gated else None

        def capture(name, captured=captured):
            def hook(x, hook, name=name):
                captured[name] = x
                return x

            return hook

        def rewrite(post, hook, captured=captured, act=act):
            pre = captured.pop("pre")
            up = captured.pop("up") if gated else None
            share = 0.5 if half else 1.0
            if identity:
                # act(g) is recomputed once, for its value (HF's is inside the product post = act(g) * u;
                # without a gate, post is act(pre)); no autograd path is built for it.
                activated = act(pre.detach()) if gated else post.detach()
                # The ratio in at least float32 (a float16/bfloat16 model's values, divided in float32).
                wide_pre = _widen(pre.detach())
                ratio = _widen(activated) / (_eps_denominator(wide_pre) if identity_eps else wide_pre)
                # An exact zero makes act(0)/0 NaN (or inf), and so the sum; a sum of bounded ratios
                # (act(x)/x lies in [-0.2, 1.2] for GELU and SiLU) is finite otherwise. One reduction.
                if bool(torch.isfinite(ratio.sum())):
                    # identity_rule (+ half_rule), fused: the same gradients bit for bit (tested).
                    scaled = share * activated if gated else None
                    return _ConstantRatioGatePath.apply(post, pre, up, ratio, scaled, share)
                # Exact zeros: the Identity-rule keeps act's own derivative there (through its autograd path).
                activation_path = identity_rule(pre, activated, (lambda: act(pre)) if gated else post)
            else:
                activation_path = activated = act(pre) if gated else post
            if not gated:
                return _keep_value(post, activation_path)
            return _keep_value(post, _gate_product(activation_path, activated, up, share))

        hooks.append((f"{prefix}.hook_pre", capture("pre")))
        if gated:
            hooks.append((f"{prefix}.hook_pre_linear", capture("up")))
        hooks.append((f"{prefix}.hook_post", rewrite))
    return hooks


def softmax_temperature_path(
    pattern: torch.Tensor, temperature: float = SOFTMAX_TEMPERATURE, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """The attention pattern p = softmax(s) with the backward pass of softmax at `temperature` (GIM).

    Forward: `pattern`, bit for bit. Backward: the gradient g reaching the pattern goes on to the scores
    s as ``q * (g - <g, q>)`` with q = softmax(s / T), which is T times the Jacobian of softmax(s / T)
    (GIM's released code drops the 1/T factor, and so does this; arXiv 2505.17630). Built from the
    pattern alone: log p = s - logsumexp(s), so T * softmax(log(p) / T) is a path with that Jacobian
    with respect to s (the Jacobian of softmax(s/T) annihilates the constant shift). Masked entries
    (p == 0, also p underflowed to 0, whose weight at T would be below exp(-40)) get q = 0 and no NaN; a row
    without a positive entry gets no gradient. Computed in float32 for float16/bfloat16 patterns.

    With `scores` (the pre-softmax scores whose softmax `pattern` is, any shift per row allowed), the path
    is built from them instead, at the entries where p > 0: the same q, but the gradient goes straight to
    the scores instead of through the pattern and the model's own softmax backward, which needs g / p at
    the pattern. In float16, g / p overflows for tiny p (measured on SmolLM2-135M: a non-finite gradient),
    so the rules pass the scores for float16 and bfloat16 models.
    """
    work = _widen(pattern)
    positive = work > 0
    if scores is not None:
        logits = torch.where(positive, _widen(scores), float("-inf"))  # no gradient to masked entries
    else:
        logits = torch.log(torch.where(positive, work, torch.ones_like(work)))
    fill = torch.where(positive.any(-1, keepdim=True), float("-inf"), 0.0).to(work.dtype)
    logits = torch.where(positive, logits, fill)
    path = temperature * torch.softmax(logits / temperature, dim=-1)
    return _keep_value(pattern, path.to(pattern.dtype))


def _detach_pattern(pattern: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """The AH-rule's transform: the pattern as a constant."""
    return pattern.detach()


# The transform each pattern rule applies to the attention pattern (at hook_pattern or in the fallback),
# called as transform(pattern, scores=...) with the pre-softmax scores where the rule needs them.
_PATTERN_RULES: dict[str, Callable[..., torch.Tensor]] = {
    "ah": _detach_pattern,
    "softmax_t2": softmax_temperature_path,
}
# The pattern rules that read the scores in float16/bfloat16 models (see softmax_temperature_path).
_NEEDS_SCORES_IN_HALF = frozenset({"softmax_t2"})


def _pattern_rule(active: Collection[str]) -> str | None:
    """The one pattern rule in `active` (resolve_rules makes them exclusive), or None."""
    found = [r for r in _PATTERN_RULES if r in active]
    return found[0] if found else None


def _attention_hooks(model, active: frozenset[str], names: HookNames) -> list[Hook]:
    """AH-rule (pattern constant) or softmax_t2 (softmax backward at T=2) at hook_pattern, where that hook
    is live; AttnLRP (q, k gradients x1/4, v x1/2)."""
    hooks: list[Hook] = []
    pattern_rule = _pattern_rule(active)
    pattern_hook = pattern_rule is not None and not _pattern_in_attention_function(model, names)
    for layer in range(model.cfg.n_layers):
        prefix = f"blocks.{layer}.attn"
        if pattern_hook:
            transform = _PATTERN_RULES[pattern_rule]
            scores_name = f"{prefix}.hook_attn_scores"
            if pattern_rule in _NEEDS_SCORES_IN_HALF and model.cfg.dtype in _HALF and scores_name in names:
                captured: dict[str, torch.Tensor] = {}

                def capture_scores(x, hook, captured=captured):
                    captured["scores"] = x
                    return x

                def from_scores(x, hook, t=transform, captured=captured):
                    scores = captured.pop("scores", None)
                    return t(x, scores=scores if scores is not None and scores.shape == x.shape else None)

                hooks += [(scores_name, capture_scores), (f"{prefix}.hook_pattern", from_scores)]
            else:
                hooks.append((f"{prefix}.hook_pattern", lambda x, hook, t=transform: t(x)))
        if "attnlrp" in active:
            for name, factor in (("q", 0.25), ("k", 0.25), ("v", 0.5)):
                hooks.append((f"{prefix}.hook_{name}", lambda x, hook, f=factor: _ScaleGrad.apply(x, f)))
    return hooks


# ----------------------------------------------------------------------------------------------
# Fallback for architectures whose attention pattern cannot be edited through hook_pattern.
#
# The bridge delegates BERT-style attention to the Hugging Face module and fires hook_pattern after
# the output has been computed: an edit there is discarded (silently, for a value-preserving edit
# such as .detach()). For those models the pattern rules (AH, softmax_t2) act inside the attention computation
# instead: a custom attention function, registered with transformers' AttentionInterface, computes
# eager attention with the pattern passed through `_PATTERN_TRANSFORM`, and the HF configs are
# switched to it for the duration of the rule context.

_ATTENTION_NAME = "relp_lrp_eager"
_PATTERN_TRANSFORM: contextvars.ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = contextvars.ContextVar(
    "relp_pattern_transform", default=None
)
_PATTERN_LIVE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lrp_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (as transformers' ``eager_attention_forward``) whose pattern goes through
    `_PATTERN_TRANSFORM`; the forward values are those of eager attention."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: repeat key/value heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.nn.functional.softmax(scores, dim=-1)  # in the input dtype, as BERT's eager attention
    transform = _PATTERN_TRANSFORM.get()
    if transform is not None:
        weights = transform(weights, scores=scores if weights.dtype in _HALF else None)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def _hf_configs(model) -> list:
    """The Hugging Face configs that the model's modules read their attention implementation from."""
    from transformers import PretrainedConfig

    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            configs[id(config)] = config
    return list(configs.values())


@contextlib.contextmanager
def _pattern_transform_in_attention(model, transform: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """A pattern rule through the attention function: HF attention runs `_lrp_eager_attention` with the
    pattern passed through `transform` (the AH-rule: ``detach``). Restores each config's attention
    implementation on exit."""
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION_NAME, _lrp_eager_attention)
    configs = _hf_configs(model)
    previous = [(config, config._attn_implementation) for config in configs]
    token = _PATTERN_TRANSFORM.set(transform)
    try:
        for config in configs:
            config._attn_implementation = _ATTENTION_NAME
        yield
    finally:
        for config, implementation in previous:
            config._attn_implementation = implementation
        _PATTERN_TRANSFORM.reset(token)


def pattern_hook_is_live(model) -> bool:
    """Whether an edit at ``blocks.0.attn.hook_pattern`` changes the model's output (cached per model).

    False for architectures whose attention the bridge delegates to Hugging Face (BERT): their
    attention rules then act through the AttentionInterface fallback.
    """
    if model not in _PATTERN_LIVE_CACHE:
        tokens = _probe_tokens(model)[0]

        def uniform(x, hook):
            return torch.full_like(x, 1.0 / x.shape[-1])

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the bridge warns that the edit is discarded: that is the test
            plain = model(tokens)
            with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)]):
                edited = model(tokens)
        _PATTERN_LIVE_CACHE[model] = not torch.equal(plain, edited)
    return _PATTERN_LIVE_CACHE[model]


def _pattern_in_attention_function(model, names: HookNames | None = None) -> bool:
    """Where the pattern rules (AH, softmax_t2) act: True through the attention function (the pattern hook exists but is
    ignored), False through ``hook_pattern`` (a model without that hook point at all gets the hook, and
    rule_hooks reports it as missing). `names`: the model's hook names, if already read."""
    names = model.hook_dict if names is None else names
    return "blocks.0.attn.hook_pattern" in names and not pattern_hook_is_live(model)


def _attention_contexts(
    model, active: frozenset[str], names: HookNames | None = None
) -> list[Callable[[], contextlib.AbstractContextManager]]:
    """The contexts a rule set needs besides its hooks: they change how the forward pass is computed (the
    pattern rules' attention function), which can change the last bits of its values (against SDPA, say)."""
    rule = _pattern_rule(active)
    if rule is not None and _pattern_in_attention_function(model, names):
        return [lambda: _pattern_transform_in_attention(model, _PATTERN_RULES[rule])]
    return []


SITE_BUILDERS = {"norm": _norm_hooks, "mlp": _mlp_hooks, "attention": _attention_hooks}


def rule_hooks(model, rules: RuleSet | Iterable[str], *, names: HookNames | None = None) -> list[Hook]:
    """All (hook name, function) pairs that implement the given rules on this model.

    Some rules also need a context (see :func:`applied_rules`); this lists only the hooks. `names`: the
    model's hook names if the caller has read them (``model.hook_dict`` is read at most once here).
    """
    active = frozenset(rules.active if isinstance(rules, RuleSet) else rules)
    names = model.hook_dict if names is None else names
    hooks = [hook for builder in SITE_BUILDERS.values() for hook in builder(model, active, names)]
    missing = sorted({name for name, _ in hooks if name not in names})
    if missing:
        raise RuleNotLiveError(f"rules {sorted(active)} need hook points this model lacks: {missing[:5]}")
    return hooks


@contextlib.contextmanager
def applied_rules(model, rules: RuleSet | Iterable[str], *, hooks: list[Hook] | None = None) -> Iterator[None]:
    """Apply rules for the duration of a ``with`` block, without the liveness check: their hooks
    (or the given subset of them) and, where the architecture needs it, the attention fallback."""
    active = frozenset(rules.active if isinstance(rules, RuleSet) else rules)
    names = model.hook_dict if hooks is None or _pattern_rule(active) else ()  # read once, for both uses below
    with contextlib.ExitStack() as stack:
        for context in _attention_contexts(model, active, names):
            stack.enter_context(context())
        stack.enter_context(model.hooks(fwd_hooks=rule_hooks(model, active, names=names) if hooks is None else hooks))
        yield


@contextlib.contextmanager
def rule_forward_contexts(model, rules: RuleSet | Iterable[str]) -> Iterator[None]:
    """Only the parts of a rule set that change how the forward pass is computed, without its hooks.

    The hooks return their input's value bit for bit, so a run whose gradient is not needed (the source
    run of relevance patching) can leave them out. What stays is the AH-rule's attention function on
    architectures that need it (BERT-style): it replaces the attention kernel, which need not give the
    same bits as the model's own implementation (e.g. SDPA), so both runs must use it.
    """
    active = frozenset(rules.active if isinstance(rules, RuleSet) else rules)
    with contextlib.ExitStack() as stack:
        for context in _attention_contexts(model, active):
            stack.enter_context(context())
        yield


# ----------------------------------------------------------------------------------------------
# Liveness: each rule must change the gradient and leave the forward values alone.

_LIVENESS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBE_LENGTH = 8


def _probe_tokens(model) -> tuple[torch.Tensor, torch.Tensor]:
    """A short random prompt (BOS first) and a random direction over the output logits."""
    generator = torch.Generator().manual_seed(0)
    d_vocab = model.cfg.d_vocab
    tokens = torch.randint(min(10, d_vocab - 1), d_vocab, (1, _PROBE_LENGTH), generator=generator)
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    if bos is not None:
        tokens[0, 0] = bos
    direction = torch.randn(model.cfg.d_vocab_out, generator=generator)
    return tokens.to(model.cfg.device), direction.to(model.cfg.device)


def _probe(model, rules: Iterable[str], hooks: list[Hook], tokens: torch.Tensor, direction: torch.Tensor,
           at: str = "blocks.0.hook_resid_pre"):
    """Logits and the gradient of a random functional of the last position's logits with respect to the
    activation at hook point `at`, under `rules` applied through `hooks` (and their contexts)."""
    store: dict[str, torch.Tensor] = {}

    def capture(x, hook):
        x = x.detach().requires_grad_(True)
        store["x"] = x
        return x

    # enable_grad: the check must work when lrp_rules is entered inside torch.no_grad(). The capture is
    # registered first, so a rule's hook at the same point sees (and builds on) the captured leaf.
    with torch.enable_grad(), model.hooks(fwd_hooks=[(at, capture)]):
        with applied_rules(model, rules, hooks=hooks):
            logits = model(tokens)
        target = (logits[0, -1].float() * direction).sum()
        (grad,) = torch.autograd.grad(target, store["x"])
    return logits.detach(), grad


def _site_parts(model, rule: str, hooks: list[Hook], names: HookNames) -> dict[str, list[Hook]]:
    """A rule's hooks split by the kind of site they act on, each to be checked live on its own: attention
    rules by hook point (q, k, v, pattern), norm rules by norm kind (attn, mlp, final, post, qk, embed)."""
    site = RULES[rule].site
    parts: dict[str, list[Hook]] = {}
    kinds = norm_kinds(model) if site == "norm" else {}
    for hook in hooks:
        if site == "attention":
            part = hook[0].rsplit(".", 1)[-1]
            if part == "hook_attn_scores":  # softmax_t2's capture of the scores (half precision) acts at the pattern
                part = "hook_pattern"
        elif site == "norm":
            part = f"{kinds.get(hook[0].rsplit('.', 1)[0], 'other')} norms"
        else:
            part = "all"
        parts.setdefault(part, []).append(hook)
    if _attention_contexts(model, frozenset([rule]), names):
        parts.setdefault("attention function", [])  # the fallback acts without hooks
    return parts


def check_rules_live(model, rules: RuleSet, *, force: bool = False) -> None:
    """Raise RuleNotLiveError unless each active rule changes the gradient and keeps the forward values.

    Each kind of site a rule acts on is checked on its own (:func:`_site_parts`: the LN-rule at each kind
    of norm, attention rules at q, k, v and the pattern), since an architecture may honour edits at some
    hook points and ignore them at others: one forward and backward pass per site kind on a short random
    prompt (results cached per model). The gradient, with respect to the residual stream entering block 0
    (for embedding norms: the norm's input), must be finite, not all zero (unless the plain one is: an
    overflow in a rule's statistics once made every score 0 in float16), and differ from the plain one.
    It is compared at positions after the first, since some models carry huge residual values at the
    first token that can hide everything else.
    """
    check_rules_usable(model)  # training or inference mode: an error naming that, not a rule
    cache = _LIVENESS_CACHE.setdefault(model, set())
    todo = [r for r in rules.active if force or r not in cache]
    if not todo:
        return
    tokens, direction = _probe_tokens(model)
    plain: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    names = model.hook_dict
    for rule in todo:
        hooks = rule_hooks(model, [rule], names=names)
        for part, part_hooks in _site_parts(model, rule, hooks, names).items():
            at = part_hooks[0][0] if part == "embed norms" else "blocks.0.hook_resid_pre"
            if at not in plain:
                logits0, grad0 = _probe(model, [], [], tokens, direction, at)
                plain[at] = logits0, grad0[:, 1:]
            logits0, grad0 = plain[at]
            logits, grad = _probe(model, [rule], part_hooks, tokens, direction, at)
            grad = grad[:, 1:]
            where = "" if part == "all" else f" at {part}"
            drift = (logits - logits0).abs().max().item()
            if not drift <= 1e-5 * max(1.0, logits0.abs().max().item()):  # NaN fails too
                raise RuleNotLiveError(
                    f"rule {rule!r}{where} changed the forward pass of {model.cfg.model_name} (max logit change "
                    f"{drift:.3g}); rules must change only the gradient"
                )
            if not bool(torch.isfinite(grad).all()):
                raise RuleNotLiveError(
                    f"rule {rule!r} ({RULES[rule].backward_effect}) gives a non-finite gradient{where} on "
                    f"{model.cfg.model_name} ({model.cfg.architecture}); expected a finite gradient"
                )
            if not grad.abs().max().item() > 0 and grad0.abs().max().item() > 0:
                raise RuleNotLiveError(
                    f"rule {rule!r} ({RULES[rule].backward_effect}) gives an all-zero gradient{where} on "
                    f"{model.cfg.model_name} ({model.cfg.architecture}, {model.cfg.dtype}), where the plain "
                    f"gradient is not (max |plain gradient| {grad0.abs().max().item():.3g}): every score would "
                    "be 0. Expected a non-zero gradient (a statistic of the rule overflowed or underflowed in "
                    "the model's precision?)"
                )
            change = (grad - grad0).abs().max().item()
            if not change > 1e-5 * grad0.abs().max().item():
                raise RuleNotLiveError(
                    f"rule {rule!r} ({RULES[rule].backward_effect}) does not change the gradient{where} on "
                    f"{model.cfg.model_name} ({model.cfg.architecture}): its hooks are ignored by this "
                    f"architecture (max gradient change {change:.3g}). Drop it from the rule set"
                    + (" (BERT-style attention is delegated to Hugging Face)" if RULES[rule].site == "attention" else "")
                )
        cache.add(rule)


def rule_sites(model) -> dict[str, list[str]]:
    """Where each rule of ``RULES`` acts on `model`: rule name -> the hook prefixes (module paths) of its hooks.

    Norm rules list norms (``blocks.0.ln1``, ``ln_final``, ...), MLP rules the MLPs (``blocks.0.mlp``),
    attention rules the attention modules (``blocks.0.attn``; ``blocks.0.attn (attention function)`` where
    a pattern rule acts through the attention-function fallback, BERT-style). A rule that does not apply
    to the model (``RuleSet.not_applicable``) has an empty list.
    """
    names = model.hook_dict
    sites: dict[str, list[str]] = {}
    for rule in RULES:
        try:
            resolve_rules(model, [rule])
        except ValueError:  # the rule does not apply to this model (e.g. half without a gated MLP)
            sites[rule] = []
            continue
        prefixes = dict.fromkeys(name.rsplit(".", 1)[0] for name, _ in rule_hooks(model, [rule], names=names))
        if _attention_contexts(model, frozenset([rule]), names):
            prefixes.update(dict.fromkeys(f"blocks.{layer}.attn (attention function)" for layer in range(model.cfg.n_layers)))
        sites[rule] = list(prefixes)
    return sites


# ----------------------------------------------------------------------------------------------
# Rule contexts: which models have an lrp_rules block open, so that nothing runs under rules it does not record.

_OPEN_CONTEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the RuleSet of its open block


class RuleContextError(RuntimeError):
    """A relp method, or a second ``lrp_rules``, was called on a model inside an ``lrp_rules`` block on it."""


def open_rule_context(model) -> RuleSet | None:
    """The rule set of the ``lrp_rules`` block open on `model`, or None (the block registers on entry and
    unregisters on exit, also when an exception leaves it)."""
    try:
        return _OPEN_CONTEXTS.get(model)
    except TypeError:  # not weak-referenceable (not a model): nothing can be open on it
        return None


def check_no_rule_context(model, what: str) -> None:
    """RuleContextError if an ``lrp_rules`` block is open on `model`: `what` (a relp method, or another
    ``lrp_rules``) applies its own rules, and under the block's hooks its gradients would follow the
    block's rules while its result recorded others."""
    outer = open_rule_context(model)
    if outer is None:
        return
    if what == "relp.lrp_rules":
        raise RuleContextError(
            f"relp.lrp_rules was entered on {model.cfg.model_name} inside another lrp_rules block on the same "
            f"model (active rules: {outer.name}); nested rule contexts are refused, since both rule sets' hooks "
            "would act at once. Exit the outer block first, or enter one lrp_rules with every rule you want "
            f"(e.g. lrp_rules(model, {list(outer.active)} + [...]))"
        )
    raise RuleContextError(
        f"{what} was called inside `with relp.lrp_rules(model, ...)` on the same model (active rules: "
        f"{outer.name}). relp's methods apply their own rules (attribution patching none, relevance patching its "
        "rules=), so inside the block the gradients would follow the block's rules while the result recorded "
        f"others. Call {what} outside the block; for relevance patching with these rules pass "
        f"rules={list(outer.active)!r}"
    )


@contextlib.contextmanager
def lrp_rules(model, rules: str | Iterable[str] | None = DEFAULT_PRESET, *, check: bool = True) -> Iterator[RuleSet]:
    """Context manager: register the hooks of a rule set (a preset name or rule names) on `model`.

    Inside the block every forward pass computes the same values as without the rules, and every
    backward pass follows the rules. Yields the resolved RuleSet. Hooks are removed on exit, also when
    an exception is raised inside the block.

    The block is for your own code. relp's methods (activation, attribution and relevance patching,
    AtP*, the path methods, ``changed_cells``) apply their own rules and refuse to run on a model with an
    open block (:class:`RuleContextError`, naming the block's rules): inside it, attribution patching
    would return RelP scores recorded as AtP, and relevance patching would record rules that are not
    the ones acting. Activation patching is refused too, for one rule for all: its values would not
    change, except that on BERT-style models a pattern rule swaps the attention kernel. Nesting a second
    ``lrp_rules`` on the same model is refused as well; blocks on different models are independent.
    """
    check_rules_usable(model)  # training or inference mode: an error naming that, not a rule
    check_no_rule_context(model, "relp.lrp_rules")
    rule_set = resolve_rules(model, rules)
    if check:
        check_rules_live(model, rule_set)
    with applied_rules(model, rule_set):
        _OPEN_CONTEXTS[model] = rule_set
        try:
            yield rule_set
        finally:
            _OPEN_CONTEXTS.pop(model, None)
