"""The speculative decoding table and acceptance plot, from `eval.bench_generation` records (no model runs).

    python -m eval.speculative_report eval/results/generation/speculative_gated.json \
        eval/results/generation/speculative_ungated.json --plot docs/img/speculative_acceptance.png

Prints one markdown row per (run, setting, batch size): speed against the parent's HF `generate` measured in the
same passes, drafted tokens the parent accepted per round, answer tokens per forward, the share of the time spent
drafting and verifying, and whether every answer was the parent's own (the benchmark asserts it). The plot shows
accepted tokens per round and the speed against the parent over the draft length, one line per run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import cell, save_figure  # noqa: E402

HEADER = ("| run | gate | setting | batch | s/prompt | speed vs AR | accepted/round | tok/fwd | draft / verify time "
          "| identical |\n|---|---|---|---|---|---|---|---|---|---|")


def speculative_rows(records: list[dict]) -> list[dict]:
    """Every row of the records, the parent's (`ar`) included, in the order they were measured."""
    return [row for record in records for row in record["rows"]]


def table(rows: list[dict]) -> str:
    lines = [HEADER]
    for r in rows:
        shares = f"{r['draft_share']:.0%} / {r['verify_share']:.0%}" if "draft_share" in r else "-"
        lines.append(f"| {Path(r['run']).name} | {'masked' if r.get('gated') else 'none'} | {r['setting']} "
                     f"| {r['batch_size']} | {cell(r['s_per_prompt'], '.2f')} | {cell(r['speed_vs_ar'], '.2f')}× "
                     f"| {cell(r.get('mean_accepted'), '.2f')} | {cell(r['tokens_per_forward'], '.2f')} | {shares} "
                     f"| {'yes' if r['identical_to_ar'] == 1 else 'NO'} |")
    return "\n".join(lines)


def draft_length(setting: str) -> int | None:
    for item in setting.partition(":")[2].split(","):
        key, _, value = item.partition("=")
        if key == "draft_length":
            return int(value)
    return None


def plot(rows: list[dict], path: Path, batch_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for run in dict.fromkeys(r["run"] for r in rows):
        points = sorted((draft_length(r["setting"]), r) for r in rows
                        if r["run"] == run and r["batch_size"] == batch_size and "adaptive=true" not in r["setting"]
                        and draft_length(r["setting"]))
        if not points:
            continue
        gate = "gated" if points[0][1].get("gated") else "ungated"
        label = f"{Path(run).name} ({gate})"
        left.plot([k for k, _ in points], [r["mean_accepted"] for _, r in points], marker="o", label=label)
        right.plot([k for k, _ in points], [r["speed_vs_ar"] for _, r in points], marker="o", label=label)
    left.set_xlabel("draft length")
    left.set_ylabel("drafted tokens accepted per round")
    right.axhline(1, color="k", linewidth=1)
    right.axhline(2, color="g", linestyle=":", linewidth=1)
    right.set_xlabel("draft length")
    right.set_ylabel(f"speed vs the parent's generate (batch {batch_size})")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", help="eval.bench_generation JSON records")
    parser.add_argument("--plot", help="write the acceptance plot here")
    parser.add_argument("--batch-size", type=int, default=1, help="the batch size plotted (default: 1)")
    args = parser.parse_args(argv)
    rows = speculative_rows([json.loads(Path(p).read_text(encoding="utf-8")) for p in args.records])
    print(table(rows))
    if args.plot:
        plot(rows, Path(args.plot), args.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
