"""Generation a user would trust: speed against HF `generate` and quality judged by the parent, in one run.

For each LAD run (`--runs`) and each sampler setting (`--settings`), answers a fixed prompt set greedily at each
batch size (default 1 and 8), next to the run's AR parent (adapter off, causal, HF `generate` with its KV cache,
the `ar` strategy) on the same weights and prompts, and reports:

    speed        the parent's median seconds per prompt over the setting's (> 1: faster than the parent)
    tok/fwd      answer tokens (up to and including EOS) per model forward, per row: how many tokens one
                 forward commits (the parent's is 1)
    ppl ratio    the parent's perplexity of the answers over its perplexity of its own answers (1: as fluent
                 to the parent as the parent itself)
    distinct-2   distinct bigrams over all bigrams of all answers (low: repetitive)
    overlap      share of positions holding the parent's own greedy token (over the longer of the two answers)

`merged=true` in a setting folds the LoRA weights into the base for that setting's calls (PEFT `merge_adapter`,
undone after each call, outside the timer): the speed of a `lad export`ed model, without the adapter's two small
products per layer, next to the parent on the same weights. Ungated runs only (a gate cannot be merged).
`polish=N` (and `polish_keep=P`, `polish_with=denoiser|parent|both`, `polish_doubt=P`) follows the setting's answers with up to N
noiseless passes, as `generate` does; their time and forwards count in the setting's.

Timing passes go round robin over the methods (`--repeats`, after one warmup pass), so a slow spell on the
machine hits all alike; medians are reported. Quality comes from the first timed pass (greedy is deterministic).
The prompts are lad/data/builtin_prompts.jsonl from `--offset` on: the block-causal recipe distils the parent's
answers to the first 160, so the default offset keeps the benchmark on prompts no run trained on.
Writes the JSON record (command, versions, settings, every row) and a plot of the speed–quality front.

    python -m eval.bench_generation --runs runs/smollm2_135m_block --out eval/results/generation/block.json \
        --plot docs/img/generation_front.png
    python -m eval.bench_generation --runs RUN --prompts 2 --max-new-tokens 16 --batch-sizes 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import (cell, command_line, environment, load_denoiser, prompt_set, quiet, save_figure,  # noqa: E402
                         write_record)
from lad.defaults import POLISH_DOUBT, POLISH_KEEP, POLISH_WITH  # noqa: E402
from lad.quality import answer_quality  # noqa: E402
from lad.sampling.options import OPTIONS  # noqa: E402

SETTINGS = ("confidence:iters=N", "confidence:iters=N/2", "confidence:iters=N/4", "threshold:threshold=0.9,iters=N",
            "threshold:threshold=0.7,iters=N", "threshold:threshold=0.7,iters=N,carry=false",
            "threshold:threshold=0.5,iters=N")


FLAGS = tuple(k for k, o in OPTIONS.items() if o.kind is bool)  # the samplers' own table (lad/sampling/options.py)
INTEGERS = tuple(k for k, o in OPTIONS.items() if o.kind is int)
WORDS = tuple(k for k, o in OPTIONS.items() if o.kind is str)  # schedule, remask, polish_with, ...


def parse_setting(text: str, max_new_tokens: int) -> tuple[str, dict]:
    """"threshold:threshold=0.7,iters=N,carry=false" → ("threshold", {"threshold": 0.7, "iters": 128, "carry":
    False}); N is max_new_tokens, and N/2 its half."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=", 1)
        if key in FLAGS or key == "merged":
            options[key] = value.lower() in ("1", "true", "yes", "on")
        elif key in ("iters", "block_length"):
            top, _, bottom = value.replace("N", str(max_new_tokens)).partition("/")
            options[key] = int(top) // int(bottom or 1)
        elif key in INTEGERS:
            options[key] = int(value)
        elif key in WORDS:
            options[key] = value
        else:
            options[key] = float(value)
    return name, options


@contextmanager
def adapter_merged(denoiser, merge: bool):
    """The LoRA weights folded into the base while the block runs (`merged=true`), then the base weights put back
    bit for bit (from a copy kept on the CPU: PEFT's unmerge alone leaves fp32 rounding in the parent's weights)."""
    import torch

    if not merge:
        yield
        return
    if getattr(denoiser, "gated", False) or not callable(getattr(denoiser.model, "merge_adapter", None)):
        raise SystemExit("merged=true needs an ungated LoRA run (a gated adapter or a full fine-tune cannot merge)")
    bases = [m.get_base_layer().weight for m in denoiser.model.modules() if hasattr(m, "lora_A")]
    saved = [w.detach().to("cpu", copy=True) for w in bases]
    denoiser.model.merge_adapter()
    try:
        yield
    finally:
        denoiser.model.unmerge_adapter()
        with torch.no_grad():
            for weight, copy in zip(bases, saved):
                weight.copy_(copy)


def with_polish(fn, passes: int, **settings):
    """The strategy, then up to `passes` noiseless passes over its answers (generate()'s order), timed together;
    `settings`: polish()'s keep, with_ and doubt."""
    from lad.sampling.polish import polish

    def run(denoiser, tokenizer, batch, **options):
        gens = fn(denoiser, tokenizer, batch, **options)
        return polish(denoiser, tokenizer, gens, passes, max_new_tokens=options["max_new_tokens"],
                      chat_template=options["chat_template"], **settings)
    return run


def timed_method(name: str, options: dict):
    """(the callable a setting times, its sampler options, whether its adapter is merged): `merged` and the
    `polish` keys are the benchmark's, not the strategy's. Built once per setting, before any pass."""
    from lad.sampling import PARENT_STRATEGIES, get_strategy

    options = dict(options)
    merged, passes = options.pop("merged", False), options.pop("polish", 0)
    if merged and name in PARENT_STRATEGIES:  # they switch the adapter off to read the parent
        raise SystemExit("merged=true is for the diffusion samplers: ar and speculative read the parent")
    settings = dict(keep=options.pop("polish_keep", POLISH_KEEP), with_=options.pop("polish_with", POLISH_WITH),
                    doubt=options.pop("polish_doubt", POLISH_DOUBT))
    if merged and passes and settings["with_"] != "denoiser":  # the merged weights are no longer the parent's
        raise SystemExit(f"merged=true cannot polish with the parent (polish_with={settings['with_']}): merging "
                         "changes it")
    fn = get_strategy(name)
    if passes:
        fn = with_polish(fn, passes, **settings)
    return fn, options, merged


def answer_all(fn, denoiser, tokenizer, prompts, batch_size, options, eos_ids) -> dict:
    """Every prompt answered in batches: answers, seconds per prompt, answer tokens per forward per row."""
    answers, seconds, per_forward, speculation = [], 0.0, [], {}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        began = time.perf_counter()
        gens = fn(denoiser, tokenizer, batch, **options)
        seconds += time.perf_counter() - began
        answers += [g.token_ids for g in gens]
        lengths = [len(g.token_ids) + int(len(g.token_ids) < options["max_new_tokens"]) for g in gens]  # + EOS
        per_forward.append(statistics.mean(lengths) / max(gens[0].nfe, 1))
        for key, value in (gens[0].speculation or {}).items():  # speculative: rounds, drafted, accepted, seconds
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                speculation[key] = speculation.get(key, 0) + value
    return {"answers": answers, "s_per_prompt": seconds / len(prompts), "tokens_per_forward": statistics.mean(per_forward),
            "seconds": seconds, "speculation": speculation}


def speculation_columns(result: dict) -> dict:
    """speculative: drafted tokens accepted per round, acceptance rate, and where the time went."""
    s = result["speculation"]
    if not s.get("rounds"):
        return {}
    per_row = s.get("row_rounds", s["rounds"])  # rounds of unfinished rows (older records: rounds)
    return {"mean_accepted": s["accepted"] / per_row, "acceptance_rate": s["accepted"] / max(s["drafted"], 1),
            "rounds": s["rounds"], "draft_share": s.get("draft_seconds", 0) / result["seconds"],
            "verify_share": s.get("verify_seconds", 0) / result["seconds"]}


def first_divergence(denoiser, tokenizer, prompt: str, answer: list[int], reference: list[int],
                     chat_template) -> dict:
    """Where an answer leaves the parent's greedy answer, and the parent's margin between its top two tokens
    there (a margin at float-rounding size means a near tie, not a wrong acceptance)."""
    import torch

    from lad.sampling.common import render_prompt

    at = next((i for i, (a, b) in enumerate(zip(answer, reference)) if a != b), min(len(answer), len(reference)))
    ids = torch.tensor([render_prompt(tokenizer, prompt, chat_template) + reference[:at]])
    with torch.no_grad():
        top = denoiser.parent_logits(ids, torch.ones_like(ids))[0, -1].topk(2).values
    return {"prompt": prompt, "position": at, "parent_margin": float(top[0] - top[1])}


def overlap(answer: list[int], reference: list[int]) -> float:
    longest = max(len(answer), len(reference))
    return sum(a == b for a, b in zip(answer, reference)) / longest if longest else 1.0


def bench_run(run: str, settings: list[str], prompts: list[str], args) -> list[dict]:
    """Every (batch size, setting) row of one run, each against the parent timed in the same passes."""
    from lad.sampling.common import eos_token_ids

    denoiser, tokenizer, chat_template, _ = load_denoiser(run)
    eos_ids = eos_token_ids(tokenizer, denoiser)
    base = {"max_new_tokens": args.max_new_tokens, "chat_template": chat_template, "temperature": 0.0}
    methods = {"ar": ("ar", {})} | {s: parse_setting(s, args.max_new_tokens) for s in settings}
    timed = {key: timed_method(name, options) for key, (name, options) in methods.items()}
    rows = []
    for batch_size in args.batch_sizes:
        timings = {key: [] for key in methods}
        first = {}
        for repeat in range(args.repeats + 1):  # pass 0 warms up (one batch), not timed
            for key, (fn, options, merged) in timed.items():
                use = prompts[:batch_size] if repeat == 0 else prompts
                with adapter_merged(denoiser, merged):
                    result = answer_all(fn, denoiser, tokenizer, use, batch_size, base | options, eos_ids)
                if repeat:
                    timings[key].append(result["s_per_prompt"])
                    first.setdefault(key, result)
        parent = first["ar"]
        parent_quality = answer_quality(denoiser, tokenizer, prompts, parent["answers"], chat_template)
        for key in methods:
            quality = answer_quality(denoiser, tokenizer, prompts, first[key]["answers"], chat_template)
            seconds = statistics.median(timings[key])
            rows.append({
                "run": run, "setting": key, "batch_size": batch_size, "s_per_prompt": seconds,
                "speed_vs_ar": statistics.median(timings["ar"]) / seconds,
                "tokens_per_forward": first[key]["tokens_per_forward"],
                "parent_ppl": quality["parent_ppl"], "ppl_ratio": ratio(quality["parent_ppl"], parent_quality["parent_ppl"]),
                "distinct_2": quality["distinct_2"], "mean_answer_tokens": quality["mean_answer_tokens"],
                "overlap_with_ar": statistics.mean(overlap(a, b) for a, b in zip(first[key]["answers"], parent["answers"])),
                "identical_to_ar": statistics.mean(a == b for a, b in zip(first[key]["answers"], parent["answers"])),
                "attention": getattr(denoiser, "attention", None), "block_size": getattr(denoiser, "block_size", None),
                "gated": getattr(denoiser, "gated", False), **speculation_columns(first[key]),
            })
            if methods[key][0] == "speculative":  # lossless: greedy output must be the parent's, token for token
                rows[-1]["divergences"] = [
                    first_divergence(denoiser, tokenizer, p, a, b, chat_template)
                    for p, a, b in zip(prompts, first[key]["answers"], parent["answers"]) if a != b]
            print(table_line(rows[-1]), flush=True)
    return rows


def ratio(value, reference):
    return value / reference if value is not None and reference else None


HEADER = ("| run | setting | batch | s/prompt | speed vs AR | tok/fwd | ppl ratio | distinct-2 | overlap "
          "| accepted/round |")


def table_line(row: dict) -> str:
    return (f"| {Path(row['run']).name} | {row['setting']} | {row['batch_size']} | {cell(row['s_per_prompt'], '.2f')} "
            f"| {cell(row['speed_vs_ar'], '.2f')}× | {cell(row['tokens_per_forward'], '.2f')} "
            f"| {cell(row['ppl_ratio'], '.2f')} | {cell(row['distinct_2'], '.3f')} | {cell(row['overlap_with_ar'], '.2f')} "
            f"| {cell(row.get('mean_accepted'), '.2f')} |")


def plot(rows: list[dict], path: Path, batch_size: int) -> None:
    """Speed against the AR parent (x) and the parent's perplexity ratio (y), one marker per run, the parent at
    (1, 1); the target box (≥ 2× speed, ≤ 1.2× perplexity) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.axvspan(2, max([2.5] + [r["speed_vs_ar"] * 1.1 for r in rows]), ymax=0.2, color="g", alpha=0.08)
    for run in dict.fromkeys(r["run"] for r in rows):
        points = [r for r in rows if r["run"] == run and r["batch_size"] == batch_size and r["setting"] != "ar"]
        ax.scatter([r["speed_vs_ar"] for r in points], [r["ppl_ratio"] for r in points], label=Path(run).name)
        for r in points:
            ax.annotate(r["setting"].replace("threshold:threshold=", "τ").replace(",iters=", " i"),
                        (r["speed_vs_ar"], r["ppl_ratio"]), fontsize=7)
    ax.scatter([1], [1], color="k", marker="*", s=120, label="AR parent (HF generate, KV cache)")
    ax.axhline(1.2, color="g", linestyle=":", linewidth=1)
    ax.axvline(2, color="g", linestyle=":", linewidth=1)
    ax.set_xlabel(f"speed vs the parent's generate (batch {batch_size})")
    ax.set_ylabel("parent perplexity of the answers / of its own answers")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="LAD run folders")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS),
                        help="STRATEGY:key=value,... (N: --max-new-tokens), default: %(default)s")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--offset", type=int, default=160, help="first built-in prompt used (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    quiet()
    every, source = prompt_set()
    prompts = every[args.offset:args.offset + args.prompts]
    rows = []
    print(HEADER + "\n" + "|---" * 10 + "|", flush=True)
    for run in args.runs:
        rows += bench_run(run, args.settings, prompts, args)
    record = {"what": "generation speed and parent-judged quality against HF generate (issue 29)",
              "command": command_line("-m eval.bench_generation", argv), "environment": environment(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
              "prompt_source": f"{source}[{args.offset}:{args.offset + args.prompts}]", "rows": rows}
    write_record(args.out, record)
    if args.plot:
        plot(rows, Path(args.plot), min(args.batch_sizes))
    diverged = [(r["setting"], r["batch_size"], d) for r in rows for d in r.get("divergences", [])]
    for setting, batch_size, where in diverged:
        print(f"NOT IDENTICAL: {setting} at batch {batch_size}: {where}", file=sys.stderr)
    return 1 if diverged else 0


if __name__ == "__main__":
    raise SystemExit(main())
