"""Edge attribution against node-level RelP (outside the test run: benchmarks measure, tests assert).

    python benchmarks/edges.py                    # the embedded SmolLM2, 32 IOI prompts (abc); a few minutes
    python benchmarks/edges.py --quick            # a random-weight model; seconds
    python benchmarks/edges.py --device cuda --n-prompts 64

Issue #13's target: edge AtP/RelP for every edge of the embedded model on a batch of IOI prompts in at
most 3x the time of node-level RelP (resid_pre, attn_out, mlp_out), within 24 GB. Times are warm medians
of interleaved repeats in this process (the machine is shared and noisy: ratios, not absolute times);
memory is the process's peak resident memory during each call (CUDA: the allocator's peak above what was
allocated before). Also times the edge circuit evaluator (one circuit of 32 prompts per pass) and exact
edge patching per edge. Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import relp  # noqa: E402
from relp.edges import EdgeCircuitEvaluator, edge_attribution, edge_patching, select_edges  # noqa: E402
from relp.tasks import ioi_words, make_ioi_dataset  # noqa: E402
from relp.testing import tiny_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import _RssSampler, _sync  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a random-weight tiny model instead of the embedded SmolLM2")
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.quick:
        model = tiny_model("llama", words=ioi_words(), n_layers=4, d_model=64)
    else:
        model = relp.load_model(device=args.device)
    data = make_ioi_dataset(model, args.n_prompts, corruption="abc", templates=["baba_00"])
    clean, corrupted = data.clean_tokens, data.corrupted_tokens
    metric = relp.NormalizedLogitDiff.from_runs(model, clean, corrupted, data.answer_tokens, data.wrong_tokens)
    calls = {
        "node_relp": lambda: relp.relevance_patching(model, clean, corrupted, metric, ["resid_pre", "attn_out", "mlp_out"], logits_to_keep=1),
        "edge_atp": lambda: edge_attribution(model, clean, corrupted, metric, method="atp", logits_to_keep=1),
        "edge_relp": lambda: edge_attribution(model, clean, corrupted, metric, method="relp", logits_to_keep=1),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    memory = {}
    for name, call in calls.items():  # first calls (rule liveness checks, allocation), with memory
        if torch.device(args.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call()
            memory[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            with _RssSampler() as rss:
                call()
            memory[name] = rss.peak / 2**20
    for _ in range(args.repeats):
        for name, call in calls.items():
            _sync(args.device)
            start = time.perf_counter()
            scores = call()
            _sync(args.device)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    graph = scores.graph
    evaluator = EdgeCircuitEvaluator(model, clean, corrupted, relp.LogitDiff(data.answer_tokens, data.wrong_tokens), logits_to_keep=1)
    circuit = select_edges(scores, percent=5)
    start = time.perf_counter()
    evaluator.values([circuit])
    evaluation = time.perf_counter() - start
    edges = select_edges(scores, count=16, absolute=True).edges
    start = time.perf_counter()
    edge_patching(model, clean, corrupted, metric, edges=edges, logits_to_keep=1)
    per_edge = (time.perf_counter() - start) / 16
    summary = {
        "model": str(model.cfg.model_name), "n_prompts": args.n_prompts, "n_positions": int(clean.shape[1]), "graph": repr(graph),
        "seconds_median": median, "edge_atp_over_node_relp": median["edge_atp"] / median["node_relp"],
        "edge_relp_over_node_relp": median["edge_relp"] / median["node_relp"], "peak_memory_mb": memory,
        "circuit_evaluation_seconds": evaluation, "edge_patching_seconds_per_edge": per_edge, "torch_threads": torch.get_num_threads(),
    }
    print(f"{graph!r}, {args.n_prompts} prompts x {clean.shape[1]} tokens")
    for name in calls:
        print(f"  {name:10s} median {median[name]:6.2f} s ({median[name] / median['node_relp']:.2f}x node RelP), peak RSS {memory[name]:.0f} MB")
    print(f"  one edge circuit evaluated: {evaluation:.2f} s; exact edge patching: {per_edge:.2f} s per edge")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
