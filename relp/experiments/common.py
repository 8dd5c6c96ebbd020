"""Pieces shared by the experiment scripts: method names, common options, library versions."""

from __future__ import annotations

import argparse
import platform

import torch

METHODS = {"ap": "activation_patching", "atp": "attribution_patching", "relp": "relevance_patching"}
CORRUPTIONS = ["abc", "s2_io_flip", "io_s_swap"]


def add_model_and_method_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --templates, --methods, --rules, --device, --dtype: identical in every IOI experiment."""
    parser.add_argument("--model", default=None, help="model spec for relp.load_model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--templates", default="baba", help="template set (see relp.tasks.TEMPLATE_SETS; default: baba)")
    parser.add_argument("--methods", nargs="+", default=["ap", "atp", "relp"], choices=sorted(METHODS))
    parser.add_argument("--rules", default="relp", help="LRP rule preset for relevance patching (default: relp)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])


def versions() -> dict:
    """Versions of the libraries a result depends on, for results files."""
    import transformer_lens
    import transformers

    import relp

    return {
        "relp": relp.__version__,
        "torch": torch.__version__,
        "transformer_lens": getattr(transformer_lens, "__version__", "unknown"),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
