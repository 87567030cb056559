"""Measure training throughput (tokens/s, median over steps) of recipes on this machine.

Runs `lad-finetune RECIPE max_steps=N` in-process for each recipe, skips the first steps (warm-up), and
prints a table of median tokens/s and seconds per step; writes eval/results/train_throughput.json.

    python -m eval.bench_train_throughput                       # tiny + smollm2_135m
    python -m eval.bench_train_throughput --recipes recipes/tiny.yaml --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import ROOT, command_line, environment, write_record  # noqa: E402
from lad.finetune import main as finetune  # noqa: E402


def measure(recipe: str, steps: int, skip: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        code = finetune([recipe, f"max_steps={steps}", f"output_dir={out}/run", "eval_every=0", "save_every=0",
                         "log_every=1", *extra])
        wall = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"{recipe}: lad-finetune exited {code}")
        rows = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "tokens_per_s" in r][skip:]
    tps = [r["tokens_per_s"] for r in train]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(train, train[1:])]
    return {"recipe": recipe, "overrides": extra, "steps": steps, "measured_steps": len(tps),
            "median_tokens_per_s": statistics.median(tps),
            "median_s_per_step": statistics.median(t / s for t, s in zip(tokens, tps[1:])) if tokens else None,
            "wall_s_including_load": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["recipes/tiny.yaml", "recipes/smollm2_135m_corpora.yaml"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the median")
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "train_throughput.json"))
    parser.add_argument("overrides", nargs="*", help="key=value applied to every recipe")
    args = parser.parse_args()
    results = [measure(r, args.steps, args.skip, args.overrides) for r in args.recipes]
    print(f"\n{'recipe':<32} {'tokens/s (median)':>18} {'s/step':>8}")
    for r in results:
        sps = f"{r['median_s_per_step']:.2f}" if r["median_s_per_step"] else "-"
        print(f"{r['recipe']:<32} {r['median_tokens_per_s']:>18,.0f} {sps:>8}")
    record = {"command": command_line("eval/bench_train_throughput.py", None), "results": results,
              **environment("cpu")}
    write_record(args.out, record)  # with this process's peak RSS (the last recipe's training included)


if __name__ == "__main__":
    main()
