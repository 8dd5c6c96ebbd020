"""LRP rules as forward-time hooks: forward values unchanged, gradients follow Layer-wise Relevance Propagation.

Every rule here is a TransformerLens forward hook that returns a tensor with *the same value* as the one
it receives (bit for bit: ``y.detach() + (p - p.detach())`` adds an exact zero) but a different autograd
path ``p``. Under the rules, the gradient of a metric is the LRP propagation coefficient, and
gradient x (clean - corrupted) is relevance patching.

=========  =====================================  ===========================================================
rule       acts on                                backward effect
=========  =====================================  ===========================================================
ln         every LayerNorm / RMSNorm              the normalising scale 1/std (1/rms) is a constant: no gradient
                                                  through it; mean-centring (LayerNorm) stays
identity   the MLP activation (GELU, SiLU, ...)   d act(x)/dx is replaced by act(x)/x (at x == 0 exactly, the
                                                  plain derivative act'(0) is kept, which is the limit of
                                                  act(x)/x for GELU and SiLU: never NaN)
half       the gate product act(g) * u            each factor receives half of the gradient (uniform rule, N=2);
                                                  only gated MLPs have this product
ah         the attention pattern                  the pattern is a constant: relevance flows through V only
attnlrp    queries, keys and values               AttnLRP: gradients reaching q and k are scaled by 1/4, v by 1/2
=========  =====================================  ===========================================================

Presets (``PRESETS``) name rule sets; ``"relp"`` is the paper's (ln + identity + half).
``lrp_rules(model, "relp")`` registers the hooks for the duration of a ``with`` block, after checking
on the actual model that every rule is live (changes the gradient where it should and leaves the forward
values alone); hooks are removed on exit, also when an exception is raised.

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
        Rule("identity", "mlp", "activation derivative replaced by act(x)/x"),
        Rule("half", "mlp", "each factor of the gate product act(g)*u gets half of the gradient"),
        Rule("ah", "attention", "attention pattern treated as a constant"),
        Rule("attnlrp", "attention", "gradient to q and k scaled by 1/4, to v by 1/2"),
    )
}

PRESETS: dict[str, tuple[str, ...]] = {
    "relp": ("ln", "identity", "half"),  # the paper's rule set, the default
    "relp+ah": ("ln", "identity", "half", "ah"),
    "attnlrp": ("ln", "identity", "half", "attnlrp"),
    "ln": ("ln",),
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

    The Half-rule does not apply to models without a gated MLP (GPT-2, BERT); it is then recorded in
    ``not_applicable`` instead of being an error, so the paper's preset works on every architecture.
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
    if "ah" in names and "attnlrp" in names:
        raise ValueError("rules 'ah' and 'attnlrp' both act on attention; choose one of them")
    not_applicable = {}
    if "half" in names and not model.cfg.gated_mlp:
        not_applicable["half"] = "the model has no gated MLP (no act(g) * u product)"
    active = tuple(dict.fromkeys(n for n in names if n not in not_applicable))
    return RuleSet(requested=tuple(names), active=active, not_applicable=not_applicable)


def _keep_value(value: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, `path`'s gradient in the backward pass (adds an exact zero)."""
    return value.detach() + (path - path.detach())


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by a constant."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _ConstantRatioGatePath(torch.autograd.Function):
    """Fused Identity-rule (+ gate product): the value `post`, with the gradients that autograd computes for
    ``_keep_value(post, _gate_product(ratio * pre, activated, up, share))`` (or, without `up`, for
    ``_keep_value(post, ratio * pre)``), in the same operations, so bit for bit: to `pre`
    ``((g * up) * share) * ratio`` (without `up`: ``g * ratio``), to `up` ``g * (share * activated)``.
    It saves the forward pass the path's seven intermediate tensors, and the backward pass their nodes."""

    @staticmethod
    def forward(ctx, post, pre, up, ratio, scaled_activated, share):
        ctx.share = share
        ctx.save_for_backward(ratio, None if up is None else up.detach(), scaled_activated)
        return post.view_as(post)

    @staticmethod
    def backward(ctx, grad):
        ratio, up, scaled_activated = ctx.saved_tensors
        grad_pre = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_pre = grad * ratio if up is None else grad * up * ctx.share * ratio
        if up is not None and ctx.needs_input_grad[2]:
            grad_up = grad * scaled_activated
        return None, grad_pre, grad_up, None, None, None


class _RmsNormRulePath(torch.autograd.Function):
    """Fused LN-rule on an RMSNorm: the value `y`, with the gradient autograd computes for
    ``_keep_value(y, x * inv_scale * weight)`` in the same operations, so bit for bit:
    ``(grad * weight) * inv_scale`` to `x`. Saves the forward pass four tensors the size of `x`."""

    @staticmethod
    def forward(ctx, y, x, inv_scale, weight):
        ctx.save_for_backward(inv_scale, weight)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        inv_scale, weight = ctx.saved_tensors
        return None, grad * weight * inv_scale if ctx.needs_input_grad[1] else None, None, None


# ----------------------------------------------------------------------------------------------
# Hook builders, one per site. Each returns (hook name, hook function) pairs for a model.


def _norm_hooks(model, active: frozenset[str], names: HookNames) -> list[Hook]:
    """LN-rule: rebuild each norm's output with the scale detached (value kept exactly)."""
    if "ln" not in active:
        return []
    hooks: list[Hook] = []
    prefixes = [n[: -len(".hook_normalized")] for n in names if n.endswith(".hook_normalized")]
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
            centred = x if rms else x - x.mean(-1, keepdim=True)
            inv_scale = torch.rsqrt(centred.detach().pow(2).mean(-1, keepdim=True) + eps)
            weight = weight.to(centred.dtype)
            if rms:  # the path x * inv_scale * weight, fused (same gradient bit for bit, tested)
                return _RmsNormRulePath.apply(y, x, inv_scale, weight)
            return _keep_value(y, centred * inv_scale * weight)

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
    """
    value = pre.detach()
    if value.numel() and value.abs().amin() > 0:  # no exact zero (nor NaN): one reduction, no bool tensor
        # The same gradient, bit for bit, as the branch below: there ``where`` passes the whole gradient
        # to ``ratio * pre`` and an exact zero to `plain`, which adds nothing.
        return activated.detach() / value * pre
    zero = value == 0
    ratio = activated.detach() / torch.where(zero, torch.ones_like(value), value)
    # At an exact zero, act(x)/x is undefined: keep the local derivative there.
    return torch.where(zero, plain() if callable(plain) else plain, ratio * pre)


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
    identity, half = "identity" in active, "half" in active
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
                ratio = activated / pre.detach()
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


def _attention_hooks(model, active: frozenset[str], names: HookNames) -> list[Hook]:
    """AH-rule (pattern constant) or AttnLRP (q, k gradients x1/4, v x1/2)."""
    hooks: list[Hook] = []
    pattern_hook = "ah" in active and not _ah_in_attention_function(model, names)
    for layer in range(model.cfg.n_layers):
        prefix = f"blocks.{layer}.attn"
        if pattern_hook:
            hooks.append((f"{prefix}.hook_pattern", lambda x, hook: x.detach()))
        if "attnlrp" in active:
            for name, factor in (("q", 0.25), ("k", 0.25), ("v", 0.5)):
                hooks.append((f"{prefix}.hook_{name}", lambda x, hook, f=factor: _ScaleGrad.apply(x, f)))
    return hooks


# ----------------------------------------------------------------------------------------------
# Fallback for architectures whose attention pattern cannot be edited through hook_pattern.
#
# The bridge delegates BERT-style attention to the Hugging Face module and fires hook_pattern after
# the output has been computed: an edit there is discarded (silently, for a value-preserving edit
# such as .detach()). For those models the AH-rule is applied inside the attention computation
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
        weights = transform(weights)
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
def _pattern_constant_in_attention(model) -> Iterator[None]:
    """AH-rule through the attention function: HF attention runs `_lrp_eager_attention` with a detached
    pattern. Restores each config's attention implementation on exit."""
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION_NAME, _lrp_eager_attention)
    configs = _hf_configs(model)
    previous = [(config, config._attn_implementation) for config in configs]
    token = _PATTERN_TRANSFORM.set(torch.Tensor.detach)
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


def _ah_in_attention_function(model, names: HookNames | None = None) -> bool:
    """Where the AH-rule acts: True through the attention function (the pattern hook exists but is
    ignored), False through ``hook_pattern`` (a model without that hook point at all gets the hook, and
    rule_hooks reports it as missing). `names`: the model's hook names, if already read."""
    names = model.hook_dict if names is None else names
    return "blocks.0.attn.hook_pattern" in names and not pattern_hook_is_live(model)


def _attention_contexts(
    model, active: frozenset[str], names: HookNames | None = None
) -> list[Callable[[], contextlib.AbstractContextManager]]:
    """The contexts a rule set needs besides its hooks: they change how the forward pass is computed (the
    AH-rule's attention function), which can change the last bits of its values (against SDPA, say)."""
    if "ah" in active and _ah_in_attention_function(model, names):
        return [lambda: _pattern_constant_in_attention(model)]
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
    names = model.hook_dict if hooks is None or "ah" in active else ()  # read once, for both uses below
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


def _probe(model, rules: Iterable[str], hooks: list[Hook], tokens: torch.Tensor, direction: torch.Tensor):
    store: dict[str, torch.Tensor] = {}

    def capture(x, hook):
        x = x.detach().requires_grad_(True)
        store["x"] = x
        return x

    # enable_grad: the check must work when lrp_rules is entered inside torch.no_grad()
    with torch.enable_grad(), model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", capture)]):
        with applied_rules(model, rules, hooks=hooks):
            logits = model(tokens)
        target = (logits[0, -1].float() * direction).sum()
        (grad,) = torch.autograd.grad(target, store["x"])
    return logits.detach(), grad


def check_rules_live(model, rules: RuleSet, *, force: bool = False) -> None:
    """Raise RuleNotLiveError unless each active rule changes the gradient and keeps the forward values.

    Runs one forward and backward pass per rule on a short random prompt (results cached per model).
    The gradient is compared at positions after the first, since some models carry huge residual values
    at the first token that can hide everything else.
    """
    check_rules_usable(model)  # training or inference mode: an error naming that, not a rule
    cache = _LIVENESS_CACHE.setdefault(model, set())
    todo = [r for r in rules.active if force or r not in cache]
    if not todo:
        return
    tokens, direction = _probe_tokens(model)
    logits0, grad0 = _probe(model, [], [], tokens, direction)
    grad0 = grad0[:, 1:]
    names = model.hook_dict
    for rule in todo:
        hooks = rule_hooks(model, [rule], names=names)
        # Attention rules act through several hook points (q, k, v); each must be live on its own,
        # since an architecture may honour edits of v but ignore those of q and k.
        parts: dict[str, list[Hook]] = {}
        for hook in hooks:
            part = hook[0].rsplit(".", 1)[-1] if RULES[rule].site == "attention" else "all"
            parts.setdefault(part, []).append(hook)
        if _attention_contexts(model, frozenset([rule]), names):
            parts.setdefault("attention function", [])  # the fallback acts without hooks
        for part, part_hooks in parts.items():
            logits, grad = _probe(model, [rule], part_hooks, tokens, direction)
            grad = grad[:, 1:]
            drift = (logits - logits0).abs().max().item()
            if drift > 1e-5 * max(1.0, logits0.abs().max().item()):
                raise RuleNotLiveError(
                    f"rule {rule!r} changed the forward pass of {model.cfg.model_name} (max logit change "
                    f"{drift:.3g}); rules must change only the gradient"
                )
            change = (grad - grad0).abs().max().item()
            if not change > 1e-5 * grad0.abs().max().item():
                where = "" if part == "all" else f" at {part}"
                raise RuleNotLiveError(
                    f"rule {rule!r} ({RULES[rule].backward_effect}) does not change the gradient{where} on "
                    f"{model.cfg.model_name} ({model.cfg.architecture}): its hooks are ignored by this "
                    f"architecture (max gradient change {change:.3g}). Drop it from the rule set"
                    + (" (BERT-style attention is delegated to Hugging Face)" if RULES[rule].site == "attention" else "")
                )
        cache.add(rule)


@contextlib.contextmanager
def lrp_rules(model, rules: str | Iterable[str] | None = DEFAULT_PRESET, *, check: bool = True) -> Iterator[RuleSet]:
    """Context manager: register the hooks of a rule set (a preset name or rule names) on `model`.

    Inside the block every forward pass computes the same values as without the rules, and every
    backward pass follows the rules. Yields the resolved RuleSet. Hooks are removed on exit, also when
    an exception is raised inside the block.
    """
    check_rules_usable(model)  # training or inference mode: an error naming that, not a rule
    rule_set = resolve_rules(model, rules)
    if check:
        check_rules_live(model, rule_set)
    with applied_rules(model, rule_set):
        yield rule_set
