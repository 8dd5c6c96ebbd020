"""The method registry: one entry per scoring method, and everything that derives from it.

An entry (:class:`Method`) holds a method's key (``ap``, ``atp``, ``relp``), its function, its name as
recorded in results (``PatchingResult.method``, the function's name), display name, short label, plot
colour, the keyword options the experiments pass it, and its cost in forward-pass equivalents. The
command line's ``--methods`` choices, the experiments' per-method options, result labels, tables,
legends and colours all read this registry.

Registered (``relp.methods.METHODS``; cost in forward-pass equivalents per batch, a backward pass = 2):

==============  ==========================  ===========  ====================================================  ==========================
key             function (module)           label        what it computes                                      cost
==============  ==========================  ===========  ====================================================  ==========================
ap              activation_patching         AP           exact: one patched forward pass per changed cell      1 per changed cell + 2
atp             attribution_patching        AtP          (source - base) . gradient at the base run            4
relp            relevance_patching          RelP         AtP with the gradient under LRP rules (``rules``)     4
gim             relevance_patching          GIM          preset: RelP with ``rules="gim"``                     4
relp_eps        relevance_patching          RelP-eps     preset: RelP with the authors' Identity stabiliser    4
two_point       two_point_patching          2pt          gradients at both runs averaged (IG's end points)     6
ig              integrated_gradients        IG           per site, gradients along base -> source (``steps``)  ~3 x steps per site (a
                                                                                                               share of the layers)
ig_inputs       integrated_gradients_inputs IG-in        gradients along the input embeddings' path            2 + 3 x steps
two_point_relp  two_point_patching          2pt-RelP     preset: 2pt under the RelP rules                      6
ig_relp         integrated_gradients        IG-RelP      preset: IG under the RelP rules                       as ig
ig_inputs_relp  integrated_gradients_inputs IG-in-RelP   preset: IG-in under the RelP rules                    as ig_inputs
atp_star        atp_star                    AtP*         AtP with the QK-fix (queries, keys); GradDrop opt.    4 (+2 per layer, GradDrop)
relp_qk         atp_star                    RelP+QK      preset: AtP* under the RelP rules                     4
verify          estimate_then_verify        RelP+verify  RelP, then AP on each component's top ``k`` cells     8 + 1 per verified cell
atp_verify      estimate_then_verify        AtP+verify   AtP, then AP on the token columns and the top ``k``  8 + 1 per verified cell
atp_verify_...  estimate_then_verify        AtP+verify-  ``atp_verify_blocks``: attention and MLP columns too 8 + 1 per verified cell
                                            blocks
==============  ==========================  ===========  ====================================================  ==========================

Entries are declared where their function is defined, by decorating it (as zennit registers its
composites by name)::

    @register_method("ig", label="IG", display_name="integrated gradients", color="tab:green",
                     options=("rules",), cost=Cost(forward=12, backward=10))
    def integrated_gradients(model, clean, corrupted, metric, components=BLOCK_COMPONENTS, *, rules=None, ...):
        ...

A *preset* is a registered method with some options fixed (:func:`register_preset`; e.g. ``gim`` is
relevance patching with the GIM rule set): it has its own key, label and colour, and its results record
its key as their method. Every method records what it ran in ``metadata["forward_equivalents"]``
(forward passes over the batch, a backward pass counting as two), which the method study reports as
its cost; ``standard=True`` marks the methods (AP, AtP, RelP) the other experiments run by default.

Adding a method is that function plus that entry: it then appears in ``relp ioi --methods``, in the
experiments' tables, in plot legends and in ``PatchingResult.label``. Every method takes ``(model,
clean, corrupted, metric, components, *, direction=..., layers=...)`` and returns a
:class:`relp.PatchingResult`. The experiment options a method may declare are the keys of
:data:`EXPERIMENT_OPTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Options the experiment scripts can pass a method (an entry names those its function accepts).
EXPERIMENT_OPTIONS = {
    "batch_size": "rows per forward pass (stacked copies of the batch)",
    "progress": "show a progress bar",
    "logits_to_keep": "the metric reads only the last k positions' logits (set by experiments whose metric does)",
    "rules": "LRP rule preset or rule names (relp.rules)",
    "steps": "interpolation steps along the path from the base to the source run (integrated gradients)",
    "k": "how many of the highest-|score| cells are verified by activation patching (estimate-then-verify)",
}


@dataclass(frozen=True)
class Cost:
    """A method's cost in passes over the batch. A backward pass counts as two forward passes."""

    forward: float
    backward: float = 0
    per_cell: bool = False  # forward passes per scored cell (activation patching), before stacking
    share_of_cells: float = 0  # plus one forward pass for this share of the cells (estimate-then-verify)

    def forward_equivalents(self, n_cells: int = 1) -> float:
        """Forward-pass equivalents for scoring `n_cells` cells."""
        return (self.forward + 2 * self.backward) * (n_cells if self.per_cell else 1) + self.share_of_cells * n_cells

    def __str__(self) -> str:
        if self.per_cell:
            return f"{self.forward:g} forward per cell"
        text = f"{self.forward:g} forward" + (f" + {self.backward:g} backward" if self.backward else "")
        return text + (f" + 1 forward per cell for {self.share_of_cells:g} of the cells" if self.share_of_cells else "")


@dataclass(frozen=True)
class Method:
    """One scoring method (see the module docstring)."""

    key: str
    function: Callable
    label: str
    display_name: str
    color: str
    cost: Cost
    options: tuple[str, ...] = ()
    exact: bool = False  # the ground truth other methods are compared with
    standard: bool = False  # run by default in the IOI, faithfulness and embedding experiments
    defaults: Mapping[str, Any] = field(default_factory=dict)  # a preset's fixed options

    @property
    def name(self) -> str:
        """The name results record (``PatchingResult.method``): the function's name, or a preset's key."""
        return self.key if self.defaults else self.function.__name__

    def __call__(self, model, clean, corrupted, metric, components, **options):
        clash = sorted(set(options) & set(self.defaults))
        if clash:
            raise TypeError(f"method {self.key!r} fixes {clash} (a preset of {self.function.__name__}); do not pass them")
        result = self.function(model, clean, corrupted, metric, components, **self.defaults, **options)
        if self.defaults:
            result.method = self.name
            result.metadata["preset_of"] = self.function.__name__
        return result

    def experiment_options(self, settings: dict) -> dict:
        """The experiment `settings` this method takes (its declared options that are set, except those a
        preset fixes)."""
        return {key: settings[key] for key in self.options if key in settings and key not in self.defaults}


#: key -> Method, in registration order (the order of tables and legends).
METHODS: dict[str, Method] = {}


def register_method(
    key: str,
    *,
    label: str,
    display_name: str,
    color: str,
    cost: Cost,
    options: tuple[str, ...] = (),
    exact: bool = False,
    standard: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator: register the decorated scoring function under `key` (returns it unchanged)."""
    unknown = [o for o in options if o not in EXPERIMENT_OPTIONS]
    if unknown:
        raise ValueError(f"method {key!r}: unknown option(s) {unknown}; expected names from {sorted(EXPERIMENT_OPTIONS)}")

    def register(function: Callable) -> Callable:
        _add(Method(key, function, label, display_name, color, cost, tuple(options), exact, standard))
        return function

    return register


def register_preset(
    key: str, of: str, defaults: Mapping[str, Any], *, label: str, display_name: str, color: str, cost: Cost | None = None
) -> Method:
    """Register a preset: the method `of` (a key) with some options fixed (e.g. ``gim`` is relevance
    patching with ``rules="gim"``). Its results record the preset's key as their method."""
    base = get_method(of)
    unknown = sorted(set(defaults) - set(base.options))
    if unknown and not all(_accepts(base.function, o) for o in unknown):
        raise ValueError(f"preset {key!r}: {base.function.__name__} takes no option(s) {unknown}")
    options = tuple(o for o in base.options if o not in defaults)
    return _add(Method(key, base.function, label, display_name, color, cost or base.cost, options, False, False, dict(defaults)))


def _accepts(function: Callable, option: str) -> bool:
    import inspect

    return option in inspect.signature(function).parameters


def _add(method: Method) -> Method:
    taken = [m.key for m in METHODS.values() if method.key == m.key or method.label == m.label or method.name == m.name]
    if taken:
        raise ValueError(f"method {method.key!r} ({method.label}, {method.name}) clashes with the registered {taken}")
    METHODS[method.key] = method
    return method


def standard_methods() -> list[str]:
    """Keys of the methods the IOI, faithfulness and embedding experiments run by default (AP, AtP, RelP)."""
    return [m.key for m in METHODS.values() if m.standard]


def forward_equivalents(result) -> float | None:
    """The cost a result records (``metadata["forward_equivalents"]``): forward passes over its batch,
    a backward pass counting as two; None for results saved before methods recorded it."""
    value = result.metadata.get("forward_equivalents")
    return None if value is None else float(value)


def get_method(key: str) -> Method:
    """The entry whose key, result name (``PatchingResult.method``) or label is `key`."""
    for method in METHODS.values():
        if key in (method.key, method.name, method.label):
            return method
    raise KeyError(f"unknown method {key!r}; registered: {', '.join(METHODS)}")


def method_label(key: str) -> str:
    """Short label (AP, AtP, RelP) of a method key or result name; an unregistered name as it is."""
    try:
        return get_method(key).label
    except KeyError:
        return key


def method_color(key: str) -> str | None:
    """Plot colour of a method key, result name or label; None (matplotlib's cycle) if unregistered."""
    try:
        return get_method(key).color
    except KeyError:
        return None


def reference_method() -> Method:
    """The exact method every estimate is compared with (activation patching)."""
    return next(m for m in METHODS.values() if m.exact)
