"""Measure what keeping the contexts' keys and values across batches saves `score_elbo` (one run, interleaved).

With the prefix cache (prompt-causal runs), `score_elbo` used to run a request's context once per batch of its
M + 1 sequences (9 batches of 16 at M = 128); `KeptContexts` now runs each distinct context once per call
(lad/modeling/cache.py). This times both on the same requests, alternating, and reports median seconds,
the speedup, the contexts run (`prefix_rows`) and the largest difference between the two scores (float rounding
only). "per_batch" is the old behaviour: the same class forgetting everything between batches.

    python -m eval.bench_kept_contexts --questions 4 --mc-samples 128 --repeats 3

The model is SmolLM2-135M-Instruct read prompt-causally with no adapter (a trained run's unmerged LoRA adds a
little to both sides alike); the requests are random tokens with ARC-like lengths (contexts of 60 to
120 tokens, four choices of 3 to 10), so that only the lengths matter. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import command_line, environment, load_denoiser, write_record  # noqa: E402

import lad.scoring.elbo as elbo  # noqa: E402
from lad.modeling.cache import KeptContexts  # noqa: E402


class PerBatch(KeptContexts):
    """Forgets every context between batches: one context pass per batch, as before."""

    def cache_for(self, *args, **kwargs):
        self.kept = {}
        return super().cache_for(*args, **kwargs)


def requests(questions: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    out, groups = [], []
    for q in range(questions):
        context = [rng.randrange(vocab) for _ in range(rng.randint(60, 120))]
        for _ in range(4):
            out.append((context, [rng.randrange(vocab) for _ in range(rng.randint(3, 10))]))
            groups.append(q)
    return out, groups


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--mc-samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="eval/results/kept_contexts_bench.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    denoiser, tokenizer, _, description = load_denoiser(None)
    denoiser.attention = "prompt_causal"  # where the cache is exact, hence on by default
    reqs, groups = requests(args.questions, len(tokenizer))
    times, runs = {"per_batch": [], "kept": []}, {}
    for _ in range(args.repeats):
        for name, keeper in (("per_batch", PerBatch), ("kept", KeptContexts)):
            elbo.KeptContexts = keeper
            stats, start = {}, time.perf_counter()
            scores = elbo.score_elbo(denoiser, reqs, mc_samples=args.mc_samples, batch_size=args.batch_size,
                                     group_ids=groups, stats=stats)
            times[name].append(time.perf_counter() - start)
            runs[name] = (scores, stats)
    elbo.KeptContexts = KeptContexts
    median = {name: statistics.median(t) for name, t in times.items()}
    record = {"command": command_line("eval/bench_kept_contexts.py", argv), "model": description,
              "settings": vars(args), "requests": len(reqs), "median_s": median, "times_s": times,
              "speedup": median["per_batch"] / median["kept"],
              "prefix_rows": {name: stats["prefix_rows"] for name, (_, stats) in runs.items()},
              "nfe": runs["kept"][1]["nfe"],
              "max_abs_score_diff": max(abs(a - b) for (a, _), (b, _) in zip(runs["kept"][0], runs["per_batch"][0])),
              **environment()}
    print(f"elbo-{args.mc_samples}, {len(reqs)} requests: per batch {median['per_batch']:.1f} s, kept "
          f"{median['kept']:.1f} s -> {record['speedup']:.2f}x; contexts run {record['prefix_rows']}")
    write_record(args.out, record)
    return record


if __name__ == "__main__":
    main()
