"""Generation quality against iterations: does spending more forwards buy better answers ("test-time compute")?

For a fixed prompt set (lad/data/builtin_prompts.jsonl, or eval/common.py's fallback) and each strategy ×
iters (default refine/confidence/threshold × 8/16/32/64), answers every prompt greedily and scores the answers
by the AR parent's perplexity (same weights, adapter off, causal; lower = more fluent to the model the run
started from), distinct-1/2 (low = repetitive; a degenerate answer can have a low perplexity, so read both),
mean answer length, NFE and seconds per prompt. The AR parent's own answers are the reference line. Writes
eval/results/gen_quality.json and the plot docs/img/gen_quality.png.

    python -m eval.gen_quality --model runs/NAME                          # 16 prompts, 64 new tokens
    python -m eval.gen_quality --prompts 2 --max-new-tokens 16 --iters 2 4     # smoke run, SmolLM2 no adapter
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import (ROOT, cell, command_line, environment, load_denoiser, peak_rss_mb,  # noqa: E402
                         reset_peak_rss, prompt_set, quiet, rss_mb, write_record)
from lad.quality import agreement, answer_quality  # noqa: E402
from lad.sampling.options import OPTIONS  # noqa: E402


def answer(fn, denoiser, tokenizer, prompts: list[str], batch_size: int, options: dict, polish: int = 0,
           **settings) -> dict:
    """Answers to every prompt, with seconds per prompt and NFE per batch (the cost each prompt shared);
    `polish`: then up to that many noiseless passes over each batch's drafts (their forwards counted), with
    `settings` (polish()'s keep, with_, doubt; None: LAD's default)."""
    from lad.sampling.polish import polish as polish_drafts

    answers, texts, nfe, seconds = [], [], [], 0.0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        gens = fn(denoiser, tokenizer, batch, **options)
        gens = polish_drafts(denoiser, tokenizer, gens, polish, max_new_tokens=options["max_new_tokens"],
                             chat_template=options["chat_template"],
                             **{k: v for k, v in settings.items() if v is not None})
        answers += [g.token_ids for g in gens]
        texts += [g.text for g in gens]
        nfe.append(gens[0].nfe)
        seconds += gens[0].seconds
    return {"answers": answers, "texts": texts, "mean_nfe_per_batch": sum(nfe) / len(nfe),
            "s_per_prompt": seconds / len(prompts)}


def plot(record: dict, path: Path) -> None:
    """Parent perplexity, agreement with the parent's answers and distinct-2 against the forwards spent, one line
    per strategy (and polish), AR as a horizontal line: draft + polish and a slower draft compare at equal cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("parent_ppl", "AR parent's perplexity of the answers"),
              ("parent_agreement", "token agreement with the parent's answers"),
              ("distinct_2", "distinct-2 over all answers"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    ar = record["ar"]
    for ax, (key, label) in zip(axes, panels):
        for strategy, rows in record["sweep"].items():
            points = [(r["mean_nfe_per_batch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=strategy, linestyle="--" if "polish" in strategy else "-")
        if ar.get(key) is not None:
            ax.axhline(ar[key], color="k", linestyle=":", label="AR parent (KV cache)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("forwards per batch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[-1].legend(fontsize=7)
    s = record["settings"]
    fig.suptitle(f"{record['model_short']}: {s['prompts']} prompts, {s['max_new_tokens']} new tokens, greedy "
                 f"({record['date'][:10]})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="RUN_DIR", help="a LAD run (default: SmolLM2-135M-Instruct, no adapter)")
    parser.add_argument("--prompts", type=int, default=16, help="the first N prompts of the set (default: 16)")
    parser.add_argument("--iters", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--strategies", nargs="+", default=["refine", "confidence", "threshold"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.9, help="τ of the threshold strategy")
    parser.add_argument("--polish", type=int, nargs="*", default=[],
                        help="also each strategy and iters followed by N noiseless passes (lad-generate --polish N)")
    parser.add_argument("--polish-keep", type=float, default=None, metavar="P",
                        help="with --polish: lad-generate --polish-keep P (default: LAD's)")
    parser.add_argument("--polish-with", choices=OPTIONS["polish_with"].choices, default=None,
                        help="with --polish: lad-generate --polish-with (default: LAD's)")
    parser.add_argument("--polish-doubt", type=float, default=None, metavar="P",
                        help="with --polish: lad-generate --polish-doubt P (default: LAD's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "gen_quality.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "gen_quality.png"), help="'' for none")
    args = parser.parse_args(argv)
    if min(args.iters + [args.prompts, args.max_new_tokens, args.batch_size]) < 1:
        parser.error("--iters, --prompts, --max-new-tokens and --batch-size must be >= 1")

    from lad.sampling import STRATEGIES

    quiet()
    started = time.perf_counter()
    denoiser, tokenizer, chat_template, description = load_denoiser(args.model, args.device)
    loaded, load_peak = rss_mb(), reset_peak_rss()  # peak_rss_mb from here: the work, not the loading
    print(f"model: {description} | loaded in {time.perf_counter() - started:.1f} s", flush=True)
    prompts, source = prompt_set(args.prompts)
    base = dict(max_new_tokens=args.max_new_tokens, seed=0, chat_template=chat_template)

    def measure(name: str, polish: int = 0, parent: list | None = None, **options) -> tuple[dict, list]:
        """(the row, the answers); `parent`: the parent's answers the row's agreement is measured against."""
        out = answer(STRATEGIES[name], denoiser, tokenizer, prompts, args.batch_size, {**base, **options}, polish,
                     keep=args.polish_keep, with_=args.polish_with, doubt=args.polish_doubt)
        answers = out.pop("answers")
        quality = answer_quality(denoiser, tokenizer, prompts, answers, chat_template)
        quality["parent_agreement"] = agreement(answers, parent) if parent is not None else 1.0
        return {**out, **quality}, answers

    ar, parent_answers = measure("ar")
    print(f"  ar: ppl {cell(ar['parent_ppl'], '.4g')}, {ar['s_per_prompt']:.2f} s/prompt", flush=True)
    sweep = {}
    for name in args.strategies:
        extra = {"threshold": args.threshold} if name == "threshold" else {}
        for polish in [0, *args.polish]:
            label = f"threshold τ{args.threshold:g}" if name == "threshold" else name
            label += f" + polish {polish}" if polish else ""
            sweep[label] = []
            for iters in args.iters:
                row = {"iters": iters, "polish": polish,
                       **measure(name, polish, parent_answers, iters=iters, **extra)[0]}
                sweep[label].append(row)
                print(f"  {label} iters {iters}: ppl {cell(row['parent_ppl'], '.4g')}, "
                      f"{row['mean_nfe_per_batch']:.1f} forwards, {row['s_per_prompt']:.2f} s/prompt", flush=True)

    fmt = cell
    header = f"{'strategy':<26}{'iters':>6}{'parent ppl':>12}{'agree':>7}{'distinct-1':>11}{'distinct-2':>11}" \
             f"{'tokens':>8}{'NFE':>6}{'s/prompt':>10}"
    print(f"\n{len(prompts)} prompts ({source}), {args.max_new_tokens} new tokens, greedy\n{header}\n" + "-" * len(header))
    for label, rows in [("ar (parent)", [{"iters": None, **ar}])] + list(sweep.items()):
        for r in rows:
            print(f"{label:<26}{fmt(r['iters'], '>6')}{fmt(r['parent_ppl'], '>12.4g')}"
                  f"{fmt(r['parent_agreement'], '>7.2f')}{fmt(r['distinct_1'], '>11.3f')}"
                  f"{fmt(r['distinct_2'], '>11.3f')}{r['mean_answer_tokens']:>8.1f}{r['mean_nfe_per_batch']:>6.0f}"
                  f"{r['s_per_prompt']:>10.2f}")
    record = {"command": command_line("eval/gen_quality.py", argv), "model": description,
              "model_short": f"run {args.model}" if args.model else "SmolLM2-135M-Instruct, bidirectional, no adapter",
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot")}, "prompt_source": source,
              "prompts": prompts, "ar": ar, "sweep": sweep, "rss_after_load_mb": loaded, "peak_rss_mb": peak_rss_mb(), "load_peak_rss_mb": load_peak,
              **environment(args.device)}
    write_record(args.out, record)
    if args.plot:
        plot(record, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
