"""RelP's and AtP's cost in forward passes, on a random-weight model shaped like SmolLM2-135M.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/overhead.py [--before REV] [--repeats 9]

One process, one model (Llama architecture as SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 9 query and
3 key/value heads, vocabulary 49152, tied embeddings; random weights, so nothing is downloaded), a batch
of 8 prompts x 16 tokens and a logit-difference metric at the last position, scoring resid_pre, attn_out
and mlp_out at every layer and position (the IOI experiment's components). Timed, warm (every function
runs once first, so the liveness probe is cached), interleaved (one round runs each once, every other round in
reverse order), median of `--repeats` rounds:

* ``forward``: one plain no-grad forward pass with all logits (the unit of the ratios);
* ``atp``, ``relp``: as the experiments run them, with ``logits_to_keep=1`` (the metric reads the last
  position only);
* ``atp_full``, ``relp_full``: without ``logits_to_keep``;
* with ``--before REV``: ``atp_before``, ``relp_before``, the implementation at git revision REV
  (relp/rules.py and relp/patching.py of REV, imported as separate modules; the rest of relp is the
  working tree's, so REV's patching.py must import only what it still provides: ``cb3a13e``, the
  revision before the overhead work, does). The scores of REV and of the working tree (full logits) are
  compared with ``torch.equal``.

It prints the times, the ratios and, as its last line, one JSON object with ``relp_over_atp``,
``relp_over_forward`` and ``atp_over_forward`` (those of ``atp`` and ``relp``) and every other figure.
Every run is timed on two clocks, wall time and this process's CPU time (``time.process_time``; on the
shared 2-core machine they agreed within 1%: the noise there is contention for caches and memory, not
descheduling); ``--clock`` picks the clock of the headline ratios (default ``wall``). A ratio is the median
over the rounds of the ratio within a round (the runs of a round are back to back, so a burst of load
slows them alike); ``*_ratio_of_medians`` has the plain alternative.
Targets (issue "Speed"): RelP <= 1.05x AtP, <= 3.0 forward passes for last-position metrics.
Not collected by pytest (the test paths are tests/).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import relp  # noqa: E402
from relp.loading import bridge_from_hf  # noqa: E402
from relp.testing import tiny_tokenizer  # noqa: E402

COMPONENTS = ["resid_pre", "attn_out", "mlp_out"]


def smollm2_shaped_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    hf = LlamaForCausalLM(config).eval()
    return bridge_from_hf(hf, tiny_tokenizer(), name="smollm2-135m-shaped-random")


def load_before(rev: str):
    """relp/rules.py and relp/patching.py at `rev`, as modules that do not touch the method registry."""
    directory = Path(tempfile.mkdtemp(prefix="relp-before-"))

    def show(path):
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout

    (directory / "relp_before_rules.py").write_text(show("relp/rules.py"))
    patching = show("relp/patching.py").replace("from relp.rules import", "from relp_before_rules import")
    patching = patching.replace(
        "from relp.methods import Cost, register_method",
        "from relp.methods import Cost\n\ndef register_method(*args, **kwargs):\n    return lambda function: function\n",
    )
    (directory / "relp_before_patching.py").write_text(patching)
    sys.path.insert(0, str(directory))
    spec = importlib.util.spec_from_file_location("relp_before_patching", directory / "relp_before_patching.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["relp_before_patching"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="REV", help="also time the implementation at this git revision")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="the clock of the headline ratios: wall time (default) or this process's CPU time (both are "
        "printed and in the JSON)",
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    model = smollm2_shaped_model()
    n_words = len(model.tokenizer)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(6, n_words, (args.prompts, args.tokens), generator=g)
    clean[:, 0] = model.tokenizer.bos_token_id
    corrupted = clean.clone()
    corrupted[:, args.tokens // 2] = torch.randint(6, n_words, (args.prompts,), generator=g)
    metric = relp.LogitDiff(torch.randint(6, n_words, (args.prompts,), generator=g), torch.randint(6, n_words, (args.prompts,), generator=g))

    def forward():
        with torch.no_grad():
            model(clean)

    runs = {
        "forward": forward,
        "atp": lambda: relp.attribution_patching(model, clean, corrupted, metric, COMPONENTS, logits_to_keep=1),
        "relp": lambda: relp.relevance_patching(model, clean, corrupted, metric, COMPONENTS, logits_to_keep=1),
        "atp_full": lambda: relp.attribution_patching(model, clean, corrupted, metric, COMPONENTS),
        "relp_full": lambda: relp.relevance_patching(model, clean, corrupted, metric, COMPONENTS),
    }
    if args.before:
        before = load_before(args.before)
        runs["atp_before"] = lambda: before.attribution_patching(model, clean, corrupted, metric, COMPONENTS)
        runs["relp_before"] = lambda: before.relevance_patching(model, clean, corrupted, metric, COMPONENTS)

    print(f"model: {model.cfg.model_name}, {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"vocab {model.cfg.d_vocab}; batch {tuple(clean.shape)}; components {COMPONENTS}; "
          f"torch threads {torch.get_num_threads()}; repeats {args.repeats}")
    outputs = {name: run() for name, run in runs.items()}  # warm: liveness probes, allocator, caches
    differences = {}
    for method in ("atp", "relp"):
        full, last = outputs[f"{method}_full"], outputs[method]
        differences[f"{method}_logits_to_keep_max_abs_diff"] = max((full[c] - last[c]).abs().max().item() for c in COMPONENTS)
        differences[f"{method}_max_abs_score"] = max(full[c].abs().max().item() for c in COMPONENTS)
        if args.before:
            old = outputs[f"{method}_before"]
            differences[f"{method}_equal_to_before"] = all(torch.equal(full[c], old[c]) for c in COMPONENTS)

    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in runs} for clock in clocks}
    for repeat in range(args.repeats):
        order = list(runs.items())
        for name, run in order if repeat % 2 == 0 else order[::-1]:  # ABBA: no run always goes first
            starts = {clock: read() for clock, read in clocks.items()}
            run()
            for clock, read in clocks.items():
                times[clock][name].append(read() - starts[clock])
    median = {clock: {name: statistics.median(v) for name, v in by_name.items()} for clock, by_name in times.items()}
    for name in runs:
        line = "   ".join(
            f"{clock} median {median[clock][name]:.3f} s (min {min(times[clock][name]):.3f}, max {max(times[clock][name]):.3f})"
            for clock in clocks
        )
        print(f"{name:12s} {line}")

    def ratio(clock, a, b):
        """Median over the rounds of a/b within a round (the runs of a round are back to back)."""
        return statistics.median(x / y for x, y in zip(times[clock][a], times[clock][b]))

    pairs = {
        "relp_over_atp": ("relp", "atp"),
        "relp_over_forward": ("relp", "forward"),
        "atp_over_forward": ("atp", "forward"),
        "relp_full_over_atp_full": ("relp_full", "atp_full"),
        "relp_full_over_forward": ("relp_full", "forward"),
        "atp_full_over_forward": ("atp_full", "forward"),
    }
    if args.before:
        pairs.update({
            "relp_before_over_atp_before": ("relp_before", "atp_before"),
            "relp_before_over_forward": ("relp_before", "forward"),
            "atp_before_over_forward": ("atp_before", "forward"),
            "relp_before_over_relp_full": ("relp_before", "relp_full"),
            "atp_before_over_atp_full": ("atp_before", "atp_full"),
        })
    result = {key: ratio(args.clock, a, b) for key, (a, b) in pairs.items()}
    result["clock"] = args.clock
    if args.before:
        result["before_rev"] = args.before
    for clock in clocks:
        result[f"{clock}_ratio"] = {key: round(ratio(clock, a, b), 4) for key, (a, b) in pairs.items()}
        result[f"{clock}_ratio_of_medians"] = {
            key: round(median[clock][a] / median[clock][b], 4) for key, (a, b) in pairs.items()
        }
        result[f"{clock}_seconds"] = {name: round(value, 4) for name, value in median[clock].items()}
    result.update(differences)
    result["repeats"] = args.repeats
    result["threads"] = torch.get_num_threads()
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key:30s} {value:.4g}")
        elif not isinstance(value, dict):
            print(f"{key:30s} {value}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
