"""Checks every method runs before it does any work: the model's mode, autograd's mode, the cost.

* :func:`check_eval_mode` refuses a model any of whose modules is in training mode. ``model.eval()``
  switches every submodule, but ``model.blocks[0].train()`` or a ``.train()`` on the wrapped Hugging Face
  model switches only part of it, and the root's ``training`` flag does not show it: dropout is then
  active and the scores change between identical calls. The error names the modules.
* :func:`check_gradients_possible` refuses a gradient method (attribution and relevance patching, the
  LRP rules' liveness probe) inside ``torch.inference_mode()``, where no tensor can require a gradient
  and ``torch.enable_grad()`` does not help.
* :func:`activation_patching_cost` is activation patching's number of forward passes over the batch,
  known before any run: one per cell of every requested component and layer (the cells whose activation
  is the same in both runs are skipped later, so this is an upper bound), plus the source and base runs.
  :func:`warn_if_expensive` turns it into a :class:`CostWarning` above :data:`MAX_FORWARD_PASSES`
  (``activation_patching(..., max_forward_passes=...)`` raises or lowers the threshold per call;
  ``math.inf`` switches the warning off).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

#: activation patching warns (CostWarning) when it would run more forward passes over the batch than
#: this. 10,000 passes of a 135M-parameter model over 16 prompts of 16 tokens take about an hour on a
#: CPU; the IOI experiment's default (resid_pre, attn_out, mlp_out on 30 layers x 16 positions) is 1,440.
MAX_FORWARD_PASSES = 10_000
_NAMED = 5  # module names listed in an error before "and N more"


class CostWarning(UserWarning):
    """A method is about to run far more forward passes than usual (the message gives the estimate)."""


def training_modules(model) -> list[str]:
    """Names of the modules of `model` in training mode (``""`` for the root), in module order."""
    return [name or "<root>" for name, module in model.named_modules() if module.training]


def check_eval_mode(model) -> None:
    """RuntimeError naming the modules of `model` that are in training mode (dropout would make every
    score random), if any."""
    if not isinstance(model, torch.nn.Module):
        return
    names = training_modules(model)
    if names:
        shown = ", ".join(names[:_NAMED]) + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "")
        raise RuntimeError(
            f"{len(names)} module(s) of the model are in training mode ({shown}); dropout would make every "
            "score random. Call model.eval() first (it switches every submodule)"
        )


def check_gradients_possible(what: str) -> None:
    """RuntimeError if called inside ``torch.inference_mode()``: `what` needs gradients."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} needs gradients, but it was called inside torch.inference_mode(), where no tensor can "
            "require a gradient (torch.enable_grad() does not lift it); call it outside that block "
            "(torch.no_grad() is fine)"
        )


def activation_patching_cost(cfg, components: Iterable, layers: Iterable[int], n_positions: int) -> int:
    """Forward passes over the batch that activation patching runs at most: one per cell of each
    component (a ``relp.components.Component``) and layer, plus the source and base runs.

    `cfg` needs ``n_heads`` and ``d_mlp`` (a model's ``cfg``). Axis sizes: ``position`` is
    `n_positions`, ``head`` is ``cfg.n_heads`` (query heads), ``neuron`` is ``cfg.d_mlp``.
    """
    sizes = {"position": lambda: n_positions, "head": lambda: cfg.n_heads, "neuron": lambda: cfg.d_mlp}
    n_layers = len(list(layers))
    per_layer = 0
    for component in components:
        cells = 1
        for axis in component.cell_axes:
            cells *= int(sizes[axis]())
        per_layer += cells
    return n_layers * per_layer + 2


def warn_if_expensive(estimate: int, n_prompts: int, max_forward_passes: float | None, *, what: str = "activation patching",
                      per: str = "cell") -> None:
    """CostWarning if `estimate` (forward passes over a batch of `n_prompts`) is above the threshold
    (`max_forward_passes`, default :data:`MAX_FORWARD_PASSES`)."""
    threshold = MAX_FORWARD_PASSES if max_forward_passes is None else max_forward_passes
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"max_forward_passes must be a non-negative number or None (default {MAX_FORWARD_PASSES}); got {max_forward_passes!r}")
    if estimate > threshold:
        warnings.warn(
            f"{what} will run up to {estimate:,} forward passes over the batch of {n_prompts} "
            f"prompt(s) (one per {per}{', before unchanged cells are skipped' if per == 'cell' else ''}), above the threshold of "
            f"{threshold:,g}; attribution or relevance patching cost 4. Pass max_forward_passes= a larger "
            "number (math.inf: no warning) to run it without this warning",
            CostWarning,
            stacklevel=3,
        )


def check_rules_usable(model) -> None:
    """What LRP rules need before their hooks mean anything: every module in eval mode (else the liveness
    probe's two runs differ by dropout, not by a rule) and gradients (not inside inference mode)."""
    check_eval_mode(model)
    check_gradients_possible("LRP rules (relp.lrp_rules, relevance patching)")
