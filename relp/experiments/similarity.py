"""Similarity explanations: does the strongest token pair of BiLRP find the known aligned word?

Pairs of sentences with one known aligned word X (:mod:`relp.tasks.aligned_pairs`), in two
constructions: ``paraphrase`` (a template's sentence and its paraphrase, X put into the same role of
both; the paraphrase has further synonym pairs such as child/kid) and ``unrelated`` (X in a sentence
and in the paraphrase of another template: (X, X) is the only aligned pair of content words). For each
pair and method, the strongest pair of the token x token relevance matrix is compared with (X, X):

* ``bilrp``: :func:`relp.pair_relevance` under the LRP rules (``--rules``, default ``relp``);
* ``gradient_x_input``: the same construction with plain gradients (``rules="gradient"``);
* ``random``: a uniformly random pair (its exact hit rate, 1 / number of candidate pairs, is reported).

Candidates are the word tokens: special tokens ([CLS], [SEP], BOS) and punctuation are excluded on
both sides (every pair of texts shares them); the rate over all tokens is reported as well. The paraphrase
construction also reports how often the strongest pair is one of the aligned pairs it knows (X and the
other role's words). Further: the time of one exact pair relevance for two 16-token sentences, the random
projection's error against the exact matrix, and interaction patching (exact vs pair-relevance estimate)
on pairs whose clean and corrupted versions differ in X.

    python -m relp similarity --out runs/similarity        # all-MiniLM-L6-v2, offline

Writes results.json, results.md and figures/similarity_heatmap.png, figures/similarity_alignment.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import string
import time
from pathlib import Path

import torch

import relp
from relp.embeddings import SentenceEmbedding
from relp.experiments.common import _json_default, parse_arguments, versions
from relp.similarity import interaction_patching, pair_relevance, projection_error
from relp.tasks.aligned_pairs import CONSTRUCTIONS, make_aligned_pairs

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
METHODS = ("bilrp", "gradient_x_input", "random")
#: Two 16-token sentences on all-MiniLM-L6-v2 ([CLS] and [SEP] included), for the timing target.
TIMING_PAIR = (
    "The doctor examined the sick child in the small hospital near the river.",
    "A physician checked the ill kid at the little clinic near the lake.",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relp similarity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec for relp.load_model (default: {DEFAULT_MODEL})")
    parser.add_argument("--pooling", default=None, choices=["mean", "cls", "last", "max"], help="pooling (default: the model's trained pooling)")
    parser.add_argument("--rules", default="relp", help="LRP rule preset of BiLRP (default: relp)")
    parser.add_argument("--similarity", default="cosine", choices=["cosine", "dot"])
    parser.add_argument("--n-pairs", type=int, default=None, help="aligned pairs per construction (default: all usable)")
    parser.add_argument("--constructions", nargs="+", default=list(CONSTRUCTIONS), choices=list(CONSTRUCTIONS))
    parser.add_argument("--n-interaction", type=int, default=24, help="pairs for interaction patching (default: 24)")
    parser.add_argument("--projection-ks", nargs="+", type=int, default=[16, 64, 256], help="k of the random projection error table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/similarity", help="output directory")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    return parser


def _candidate(token: str) -> bool:
    """A word token: not a special token, not punctuation."""
    stripped = token.strip()
    special = stripped.startswith(("[", "<")) and stripped.endswith(("]", ">"))
    return bool(stripped) and not special and not all(c in string.punctuation for c in stripped)


def strongest_pair(matrix: torch.Tensor, tokens_a, tokens_b, *, words_only: bool) -> tuple[int, int]:
    """(i, j) of the largest entry of `matrix`, over word tokens only or over all tokens."""
    keys = matrix.detach().double().clone()
    if words_only:
        keys[[i for i, t in enumerate(tokens_a) if not _candidate(t)], :] = -torch.inf
        keys[:, [j for j, t in enumerate(tokens_b) if not _candidate(t)]] = -torch.inf
    flat = int(torch.argmax(keys))
    return divmod(flat, keys.shape[1])


def _interaction_cases(pairs, n: int):
    """(clean pair, corrupted pair): two pairs of one template, role and construction, differing in X."""
    groups: dict = {}
    for pair in pairs:
        groups.setdefault((pair.template_id, pair.role), []).append(pair)
    cases = []
    for group in groups.values():
        for clean, corrupted in zip(group[::2], group[1::2]):
            if len(clean.tokens_a) == len(corrupted.tokens_a) and len(clean.tokens_b) == len(corrupted.tokens_b):
                cases.append((clean, corrupted))
    return cases[:n]


def run(args: argparse.Namespace, model=None) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if model is None:
        model = relp.load_model(args.model, device=args.device)
    readout = SentenceEmbedding(args.pooling) if args.pooling else SentenceEmbedding.from_model(model)
    options = {"similarity": args.similarity, "readout": readout}
    rng = torch.Generator().manual_seed(args.seed)
    summary: dict = {
        "model": str(args.model if args.model else model.cfg.model_name), "rules": args.rules,
        "similarity": args.similarity, "readout": readout.name, "seed": args.seed,
        "threads": torch.get_num_threads(), "constructions": {},
    }
    first = None
    all_pairs = {}
    for construction in args.constructions:
        pairs = make_aligned_pairs(model, args.n_pairs, seed=args.seed, construction=construction)
        all_pairs[construction] = pairs
        hits = {m: {"words": 0, "all_tokens": 0, "known_aligned": 0} for m in METHODS}
        seconds = {m: [] for m in METHODS[:2]}
        chance = []
        for pair in pairs:
            for method, rules in (("bilrp", args.rules), ("gradient_x_input", "gradient")):
                result = pair_relevance(model, pair.text_a, pair.text_b, rules=rules, **options)
                seconds[method].append(result.seconds)
                words = strongest_pair(result.matrix, result.tokens_a, result.tokens_b, words_only=True)
                hits[method]["words"] += words == pair.aligned
                hits[method]["known_aligned"] += words == pair.aligned or words in pair.also_aligned
                hits[method]["all_tokens"] += strongest_pair(result.matrix, result.tokens_a, result.tokens_b, words_only=False) == pair.aligned
                if first is None and method == "bilrp":
                    first = result
            n_a = sum(map(_candidate, pair.tokens_a))
            n_b = sum(map(_candidate, pair.tokens_b))
            chance.append(1 / (n_a * n_b))
            random_matrix = torch.rand(len(pair.tokens_a), len(pair.tokens_b), generator=rng)
            hits["random"]["words"] += strongest_pair(random_matrix, pair.tokens_a, pair.tokens_b, words_only=True) == pair.aligned
        n = len(pairs)
        summary["constructions"][construction] = {
            "n_pairs": n,
            "accuracy_words": {m: hits[m]["words"] / n for m in METHODS},
            "accuracy_all_tokens": {m: hits[m]["all_tokens"] / n for m in METHODS[:2]},
            "accuracy_known_aligned": {m: hits[m]["known_aligned"] / n for m in METHODS[:2]} if construction == "paraphrase" else None,
            "random_expected": statistics.fmean(chance),
            "seconds_per_pair": {m: statistics.fmean(s) for m, s in seconds.items()},
            "example": {"text_a": pairs[0].text_a, "text_b": pairs[0].text_b, "word": pairs[0].word},
        }
        print(f"{construction}: {n} pairs, accuracy {summary['constructions'][construction]['accuracy_words']}")

    # timing target: two 16-token sentences, exact
    timing = [pair_relevance(model, *TIMING_PAIR, rules=args.rules, **options) for _ in range(3)]
    summary["timing_16_tokens"] = {
        "tokens": [len(timing[0].tokens_a), len(timing[0].tokens_b)],
        "seconds": [t.seconds for t in timing], "median_seconds": statistics.median(t.seconds for t in timing),
        "threads": torch.get_num_threads(),
    }
    summary["projection_error"] = projection_error(model, *TIMING_PAIR, ks=args.projection_ks, rules=args.rules, **options)

    # interaction patching: clean and corrupted pairs differ in X (both texts)
    cases = _interaction_cases(all_pairs.get("paraphrase", next(iter(all_pairs.values()))), args.n_interaction)
    interactions = [
        interaction_patching(model, (c.text_a, d.text_a), (c.text_b, d.text_b), rules=args.rules, **options) for c, d in cases
    ]
    if len(interactions) >= 3:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one cell per term and pair: the top-1 overlap is reported anyway
            table = relp.agreement([r.estimate for r in interactions], [r.exact for r in interactions], top_k=1)
        summary["interaction"] = {
            "n_pairs": len(interactions),
            "agreement": {term: {k: float(v) for k, v in row.items()} for term, row in table.iterrows()},
            "exact_mean": {t: statistics.fmean(getattr(r.exact, t) for r in interactions) for t in ("total", "side_a", "side_b", "interaction")},
            "estimate_mean": {t: statistics.fmean(getattr(r.estimate, t) for r in interactions) for t in ("total", "side_a", "side_b", "interaction")},
            "max_exact_sum_error": max(abs(r.exact.side_a + r.exact.side_b + r.exact.interaction - r.exact.total) for r in interactions),
            "seconds_per_pair": {k: statistics.fmean(r.seconds[k] for r in interactions) for k in ("exact", "estimate")},
        }
    summary["versions"] = versions()
    summary["total_seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    markdown = results_markdown(summary)
    (out / "results.md").write_text(markdown)
    if not args.no_figures and first is not None:
        from relp import plotting

        example = pair_relevance(model, *TIMING_PAIR, rules=args.rules, **options)
        exclude = [t for t in set(example.tokens_a + example.tokens_b) if not _candidate(t)]
        plotting.plot_pair_relevance(example, path=out / "figures" / "similarity_heatmap.png")
        plotting.plot_alignment(example, k=6, exclude=exclude, path=out / "figures" / "similarity_alignment.png")
    print(markdown)
    print(f"wrote {out}/ in {summary['total_seconds']:.0f} s")
    return summary


def results_markdown(summary: dict) -> str:
    lines = [
        f"# Similarity explanations: strongest token pair vs the known aligned word ({summary['model']})", "",
        f"Similarity `{summary['similarity']}` of `{summary['readout']}`; BiLRP rules `{summary['rules']}`; "
        f"{summary['threads']} thread(s). Hit: the strongest pair of R over word tokens (special tokens and "
        "punctuation excluded) is the aligned pair (X, X).", "",
        "| construction | pairs | BiLRP | gradient x input | random (sampled) | random (expected) | BiLRP, all tokens | GxI, all tokens | BiLRP s/pair | GxI s/pair |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in summary["constructions"].items():
        acc, allt, sec = c["accuracy_words"], c["accuracy_all_tokens"], c["seconds_per_pair"]
        lines.append(
            f"| {name} | {c['n_pairs']} | {acc['bilrp']:.1%} | {acc['gradient_x_input']:.1%} | {acc['random']:.1%} | "
            f"{c['random_expected']:.1%} | {allt['bilrp']:.1%} | {allt['gradient_x_input']:.1%} | {sec['bilrp']:.2f} | "
            f"{sec['gradient_x_input']:.2f} |"
        )
    paraphrase = summary["constructions"].get("paraphrase")
    if paraphrase and paraphrase["accuracy_known_aligned"]:
        known = paraphrase["accuracy_known_aligned"]
        lines += ["", f"Paraphrase pairs, strongest pair in the known aligned set (X and the other role's words): "
                      f"BiLRP {known['bilrp']:.1%}, gradient x input {known['gradient_x_input']:.1%}."]
    timing = summary["timing_16_tokens"]
    lines += ["", f"Exact pair relevance of two sentences of {timing['tokens'][0]} and {timing['tokens'][1]} tokens: "
                  f"median {timing['median_seconds']:.2f} s over 3 calls ({timing['threads']} thread(s)).", "",
              "| projection k | relative Frobenius error vs exact | seconds |", "|---|---|---|"]
    for row in summary["projection_error"]:
        lines.append(f"| {row['k'] or 'exact'} | {row['relative_error']:.3f} | {row['seconds']:.2f} |")
    interaction = summary.get("interaction")
    if interaction:
        lines += ["", f"Interaction patching on {interaction['n_pairs']} paraphrase pairs (clean and corrupted differ in X on "
                      f"both sides; max |side_a + side_b + interaction - total| of the exact terms: "
                      f"{interaction['max_exact_sum_error']:.1e}).", "",
                  "| term | exact mean | estimate mean | Pearson | Spearman |", "|---|---|---|---|---|"]
        for term in ("side_a", "side_b", "interaction"):
            row = interaction["agreement"][term]
            lines.append(f"| {term} | {interaction['exact_mean'][term]:+.4f} | {interaction['estimate_mean'][term]:+.4f} | "
                         f"{row['pearson']:.3f} | {row['spearman']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    return run(parse_arguments(build_parser(), argv))


if __name__ == "__main__":
    main()
