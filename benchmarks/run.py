"""relp's benchmark suite (outside the test run: benchmarks measure, tests assert).

    python benchmarks/run.py            # the embedded SmolLM2, IOI prompts; several minutes
    python benchmarks/run.py --quick    # a random-weight model and a smaller grid; seconds
    python benchmarks/run.py --device cuda
    python benchmarks/run.py --random-model gpt2-large --no-transformer-lens --no-scaling --memory-methods atp relp

Prints a short table per section and, as its last line, one JSON object:

* ``ap_speedup_vs_transformer_lens``: wall-time ratio of ``transformer_lens.patching`` to
  ``relp.activation_patching`` on the same full grid (resid_pre, attn_out, mlp_out over every layer and
  position), the same prompts, in this process, with the largest absolute difference of the scores;
  also relp's own speedup from prefix reuse (the same call with ``reuse_prefix=False``);
* ``relp_over_atp``, ``relp_over_forward``, ``atp_over_forward``: warm medians of interleaved repeats
  (the gradient methods on the same batch), and the first call's time;
* ``peak_memory_mb``: peak memory of each method, including ``neuron`` and ``head`` components (CUDA: the
  allocator's peak above what was allocated before; CPU: the process's peak resident memory during the
  call, sampled in a thread, and its growth over the call's start);
* ``scaling``: seconds per method against sequence length and model size (random-weight GPT-2 small,
  medium and large configurations, and the embedded model).

Times are ratios against baselines run in the same process: the machine is shared and noisy, and
absolute times drift.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import relp  # noqa: E402
from relp.tasks import ioi_words, make_ioi_dataset  # noqa: E402
from relp.testing import tiny_model  # noqa: E402

GRID = ["resid_pre", "attn_out", "mlp_out"]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _ioi_batch(model, n_prompts: int, length: int | None, seed: int = 0):
    """n_prompts IOI prompts of one layout (of `length` tokens if given), with a last-token metric."""
    data = make_ioi_dataset(model, max(4 * n_prompts, 64), corruption="s2_io_flip", seed=seed, templates="all")
    batches = sorted(data.batches(), key=len, reverse=True)
    if length is not None:
        batches = [b for b in batches if b.length == length] or batches
    batch = batches[0][:n_prompts]
    metric = relp.NormalizedLogitDiff.from_runs(
        model, batch.clean_tokens, batch.corrupted_tokens, batch.answer_tokens, batch.wrong_tokens
    )
    return batch.clean_tokens, batch.corrupted_tokens, metric


def _random_prompts(model, n_prompts: int, length: int, seed: int = 0):
    """Random prompts whose corrupted copy differs at the middle position; a last-token logit difference."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(10, model.cfg.d_vocab, (n_prompts, length), generator=g)
    clean[:, 0] = 0
    corrupted = clean.clone()
    corrupted[:, length // 2] = torch.randint(10, model.cfg.d_vocab, (n_prompts,), generator=g)
    answer = torch.randint(10, model.cfg.d_vocab, (n_prompts,), generator=g)
    wrong = torch.randint(10, model.cfg.d_vocab, (n_prompts,), generator=g)
    return clean.to(model.cfg.device), corrupted.to(model.cfg.device), relp.LogitDiff(answer, wrong)


# ----------------------------------------------------------------------------------------------
# Activation patching against transformer_lens.patching


def ap_versus_transformer_lens(model, clean, corrupted, metric, device) -> dict:
    """Full grid, same prompts: transformer_lens.patching, relp without and with prefix reuse."""
    from transformer_lens import patching as tl_patching

    tl_functions = {
        "resid_pre": tl_patching.get_act_patch_resid_pre,
        "attn_out": tl_patching.get_act_patch_attn_out,
        "mlp_out": tl_patching.get_act_patch_mlp_out,
    }
    with torch.no_grad():
        base = metric(model(corrupted))

    def transformer_lens():
        _, clean_cache = model.run_with_cache(clean)
        return {c: f(model, corrupted, clean_cache, metric) - base for c, f in tl_functions.items()}

    theirs, tl_seconds = _timed(transformer_lens, device)
    plain, plain_seconds = _timed(lambda: relp.activation_patching(
        model, clean, corrupted, metric, GRID, progress=False, reuse_prefix=False, logits_to_keep=1), device)
    ours, relp_seconds = _timed(lambda: relp.activation_patching(
        model, clean, corrupted, metric, GRID, progress=False, logits_to_keep=1), device)
    diff = max((ours[c].double().cpu() - theirs[c].double().cpu()).abs().max().item() for c in GRID)
    plain_diff = max((ours[c] - plain[c]).abs().max().item() for c in GRID)
    return {
        "n_prompts": int(clean.shape[0]), "tokens": int(clean.shape[1]),
        "transformer_lens_s": tl_seconds, "relp_s": relp_seconds, "relp_without_prefix_reuse_s": plain_seconds,
        "ratio": tl_seconds / relp_seconds, "prefix_reuse_speedup": plain_seconds / relp_seconds,
        "max_abs_diff": diff, "max_abs_diff_prefix_reuse": plain_diff,
        "rows_per_pass": ours.metadata["rows_per_pass"], "prefix_reuse": ours.metadata["prefix_reuse"],
    }


# ----------------------------------------------------------------------------------------------
# The gradient methods against a forward pass


def gradient_overhead(model, clean, corrupted, metric, device, repeats: int) -> dict:
    """Warm medians of interleaved repeats: one forward pass, AtP and RelP on the same batch."""
    first_relp = _timed(lambda: relp.relevance_patching(model, clean, corrupted, metric, GRID), device)[1]
    first_atp = _timed(lambda: relp.attribution_patching(model, clean, corrupted, metric, GRID), device)[1]

    def forward():
        with torch.no_grad():
            return model(corrupted)

    times: dict[str, list[float]] = {"forward": [], "atp": [], "relp": []}
    for _ in range(repeats):
        times["forward"].append(_timed(forward, device)[1])
        times["atp"].append(_timed(lambda: relp.attribution_patching(model, clean, corrupted, metric, GRID), device)[1])
        times["relp"].append(_timed(lambda: relp.relevance_patching(model, clean, corrupted, metric, GRID), device)[1])
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "forward_s": median["forward"], "atp_s": median["atp"], "relp_s": median["relp"],
        "relp_over_atp": median["relp"] / median["atp"], "relp_over_forward": median["relp"] / median["forward"],
        "atp_over_forward": median["atp"] / median["forward"], "first_call_relp_s": first_relp,
        "first_call_atp_s": first_atp, "repeats": repeats,
    }


# ----------------------------------------------------------------------------------------------
# Peak memory


class _RssSampler:
    """Peak resident memory of this process while a block runs, sampled every few milliseconds in a
    thread (``ru_maxrss`` cannot be reset: after a larger earlier run it would read nothing)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.before = self._process.memory_info().rss
        self.peak = self.before
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def peak_memory(model, clean, corrupted, metric, device, methods=("ap", "atp", "relp")) -> dict:
    """Peak memory (MB) of each method on resid_pre, attn_out, mlp_out, head and neuron (activation
    patching without neurons: one pass per few hundred of the model's layers x positions x neurons cells
    is hours on a CPU, and its memory per pass is that of any other component). CUDA: the allocator's
    peak above what was allocated before the call. CPU: the process's peak resident memory during the
    call (``<method>``, model and everything else included) and its growth over the memory before the
    call (``<method>_growth``)."""
    components = GRID + ["head", "neuron"]
    calls = {
        "ap": lambda: relp.activation_patching(model, clean, corrupted, metric, GRID + ["head"], progress=False, logits_to_keep=1),
        "atp": lambda: relp.attribution_patching(model, clean, corrupted, metric, components),
        "relp": lambda: relp.relevance_patching(model, clean, corrupted, metric, components),
    }
    out = {}
    for name in methods:
        call = calls[name]
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call()
            out[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            with _RssSampler() as rss:
                call()
            out[name] = rss.peak / 2**20
            out[f"{name}_growth"] = (rss.peak - rss.before) / 2**20
    return out


# ----------------------------------------------------------------------------------------------
# Scaling


GPT2_SIZES = {  # random-weight GPT-2 configurations (n_layer, n_embd, n_head)
    "gpt2-small": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
}


def _random_gpt2(size: str, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    from relp.loading import bridge_from_hf
    from relp.testing import tiny_tokenizer

    n_layer, n_embd, n_head = GPT2_SIZES[size]
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=0, eos_token_id=0)
    return bridge_from_hf(GPT2LMHeadModel(config).eval().to(device), tokenizer, name=size, device=str(device))


def scaling(models: dict, lengths, n_prompts: int, device, *, with_ap: bool) -> list[dict]:
    """Seconds per method for each model and sequence length (AP only where `with_ap`, up to 64 tokens)."""
    rows = []
    for name, model in models.items():
        for length in lengths:
            clean, corrupted, metric = _random_prompts(model, n_prompts, length)
            row = {"model": name, "tokens": length, "n_prompts": n_prompts}
            row["forward_s"] = _timed(lambda: model(corrupted), device)[1]
            row["atp_s"] = _timed(lambda: relp.attribution_patching(model, clean, corrupted, metric, GRID), device)[1]
            row["relp_s"] = _timed(lambda: relp.relevance_patching(model, clean, corrupted, metric, GRID), device)[1]
            if with_ap and length <= 64:  # longer: minutes per model even on a GPU
                row["ap_s"] = _timed(lambda: relp.activation_patching(
                    model, clean, corrupted, metric, GRID, progress=False, logits_to_keep=1), device)[1]
            rows.append(row)
            print(f"  {name:22s} {length:4d} tokens  " + "  ".join(f"{k[:-2]} {v:.2f} s" for k, v in row.items() if k.endswith("_s")), flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a random-weight model and a smaller grid (seconds)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="repeats for the warm medians")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling section")
    parser.add_argument("--no-transformer-lens", action="store_true", help="skip the comparison with transformer_lens.patching")
    parser.add_argument("--random-model", choices=sorted(GPT2_SIZES), default=None,
                        help="a random-weight GPT-2 of this size instead of the embedded model (random prompts)")
    parser.add_argument("--memory-methods", nargs="+", default=["ap", "atp", "relp"], choices=["ap", "atp", "relp"],
                        help="methods of the peak-memory section (default: all; AP on GPT-2 large is long on a CPU)")
    parser.add_argument("--ap-lengths", type=int, nargs="+", default=[16, 64],
                        help="prompt lengths of the comparison with transformer_lens.patching (default: 16 64; --quick: 16)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    report: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
                                "threads": torch.get_num_threads(), "platform": platform.platform()}}
    if device.type == "cuda":
        report["machine"]["gpu"] = torch.cuda.get_device_name(device)

    if args.quick:
        model = tiny_model("llama", words=ioi_words(), n_layers=4, d_model=64)
        model.to(device)
        lengths, sizes = [16, 64], []
    elif args.random_model:
        model = _random_gpt2(args.random_model, device)
        lengths, sizes = [16, 64, 256], [s for s in GPT2_SIZES if s != args.random_model]
    else:
        model = relp.load_model(device=device)
        lengths, sizes = [16, 64, 256], list(GPT2_SIZES)
    name = str(model.cfg.model_name)

    print(f"== activation patching vs transformer_lens.patching ({name}, {args.device})", flush=True)
    if args.no_transformer_lens:
        report["ap_speedup_vs_transformer_lens"] = None
    else:
        comparisons = {}
        for length in ([16] if args.quick else args.ap_lengths):
            random_prompts = args.quick or args.random_model or length != 16
            clean, corrupted, metric = (
                _random_prompts(model, args.n_prompts, length) if random_prompts else _ioi_batch(model, args.n_prompts, length)
            )
            row = ap_versus_transformer_lens(model, clean, corrupted, metric, device)
            comparisons[str(length)] = row
            print(f"  {length} tokens: transformer_lens {row['transformer_lens_s']:.1f} s, relp {row['relp_s']:.1f} s "
                  f"(x{row['ratio']:.1f}; prefix reuse x{row['prefix_reuse_speedup']:.2f}), max |diff| {row['max_abs_diff']:.2g}", flush=True)
        report["ap_speedup_vs_transformer_lens"] = comparisons

    print(f"== gradient methods vs a forward pass ({name}, {args.n_prompts} prompts)", flush=True)
    random_prompts = args.quick or args.random_model
    clean, corrupted, metric = _random_prompts(model, args.n_prompts, 16) if random_prompts else _ioi_batch(model, args.n_prompts, 16)
    overhead = gradient_overhead(model, clean, corrupted, metric, device, args.repeats)
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in overhead.items() if isinstance(v, float)), flush=True)
    report.update({k: overhead[k] for k in ("relp_over_atp", "relp_over_forward", "atp_over_forward")})
    report["gradient_methods"] = overhead

    print("== peak memory (MB; resid_pre, attn_out, mlp_out, head, neuron; AP without neuron)", flush=True)
    report["peak_memory_mb"] = peak_memory(model, clean, corrupted, metric, device, args.memory_methods)
    print("  " + ", ".join(f"{k} {v:.0f}" for k, v in report["peak_memory_mb"].items()), flush=True)

    if not args.no_scaling:
        print("== scaling (seconds per method; random prompts, one changed position)", flush=True)
        models = {name: model}
        for size in sizes:
            models[size] = _random_gpt2(size, device)
        report["scaling"] = scaling(models, lengths, args.n_prompts if args.quick else 4, device,
                                    with_ap=args.quick or device.type == "cuda")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
