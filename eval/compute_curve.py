"""Test-time compute, one plot (issue 31): answer quality against forwards spent, for each sampler and for
draft + polish, on the best run of each objective.

    python -m eval.gen_quality --model runs/ablate/prompt_causal_mask --iters 8 16 32 64 \\
        --strategies confidence threshold refine --polish 4 --out eval/results/compute/mask.json --plot ''
    python -m eval.compute_curve            # every record in eval/results/compute/: table, verdicts, plot

For each run and sampler it says whether more iterations bought quality: the AR parent's perplexity of the
answers at the most iterations against the fewest (lower is better), and draft + polish against the plain sampler
at about the same forwards. The table goes into docs/results.md (`<!-- compute:start/end -->`) and the plot to
docs/img/compute_curve.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import ROOT, cell, save_figure, splice_file  # noqa: E402

RESULTS = ROOT / "eval" / "results" / "compute"
START, END = "<!-- compute:start -->", "<!-- compute:end -->"


def load_records(folder: Path = RESULTS) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if "sweep" in record:
            records.append({**record, "label": path.stem})
    return records


def curves(record: dict) -> dict[str, list[dict]]:
    """{sampler label: its rows sorted by forwards}: "confidence", "confidence + polish 4", ..."""
    return {name: sorted(rows, key=lambda r: r["mean_nfe_per_batch"]) for name, rows in record["sweep"].items()}


REPETITIVE = 0.5  # answers whose distinct-2 is under this share of the parent's repeat themselves


def verdict(rows: list[dict], parent_distinct_2: float | None = None) -> str:
    """Did more iterations buy quality? Perplexity at the most forwards against the fewest, and whether the
    answers repeat themselves (a low perplexity of repeated words flatters them: the parent finds loops likely)."""
    if len(rows) < 2:
        return "one point"
    first, last = rows[0]["parent_ppl"], rows[-1]["parent_ppl"]
    if first is None or last is None:
        return "-"
    change = last / first
    word = "bought quality" if change < 0.9 else "bought nothing" if change < 1.1 else "cost quality"
    distinct = rows[-1].get("distinct_2")
    if parent_distinct_2 and distinct is not None and distinct < REPETITIVE * parent_distinct_2:
        return (f"{word.replace('quality', 'perplexity')} (ppl ×{change:.2f}), but the answers repeat themselves "
                f"(distinct-2 {distinct:.2f}, parent {parent_distinct_2:.2f})")
    return f"{word} (ppl ×{change:.2f})"


def polish_gain(record: dict, name: str) -> str:
    """Draft + polish against the plain sampler with the nearest forwards at or above the polished draft's."""
    plain = curves(record).get(name)
    polished = next((rows for label, rows in curves(record).items() if label.startswith(f"{name} + polish")), None)
    if not plain or not polished:
        return "-"
    wins = 0
    for row in polished:
        rival = next((r for r in plain if r["mean_nfe_per_batch"] >= row["mean_nfe_per_batch"]), plain[-1])
        wins += row["parent_ppl"] is not None and rival["parent_ppl"] is not None and \
            row["parent_ppl"] < rival["parent_ppl"]
    return f"{wins}/{len(polished)} points better than {name} at equal or more forwards"


def table(records: list[dict]) -> str:
    lines = ["| run | sampler | forwards per batch → parent ppl (agreement with the parent, distinct-2) | "
             "more iterations | draft + polish |", "|---|---|---|---|---|"]
    for record in records:
        ar = record["ar"]
        for name, rows in curves(record).items():
            points = ", ".join(f"{r['mean_nfe_per_batch']:.0f} → {cell(r['parent_ppl'], '.1f')} "
                               f"({cell(r.get('parent_agreement'), '.2f')}, {cell(r.get('distinct_2'), '.2f')})"
                               for r in rows)
            gain = polish_gain(record, name) if "polish" not in name else ""
            lines.append(f"| {record['label']} | {name} | {points} | {verdict(rows, ar.get('distinct_2'))} | {gain} |")
        lines.append(f"| {record['label']} | AR parent | {cell(ar.get('parent_ppl'), '.2f')} "
                     f"(distinct-2 {cell(ar.get('distinct_2'), '.2f')}) | | |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(5 * len(records), 4), sharey=True, squeeze=False)
    for ax, record in zip(axes[0], records):
        for name, rows in curves(record).items():
            points = [(r["mean_nfe_per_batch"], r["parent_ppl"]) for r in rows if r["parent_ppl"] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=name, linestyle="--" if "polish" in name else "-")
        if record["ar"].get("parent_ppl") is not None:
            ax.axhline(record["ar"]["parent_ppl"], color="k", linestyle=":", label="AR parent")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("forwards per batch")
        ax.set_title(f"{record['label']} ({record['model_short']})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("AR parent's perplexity of the answers")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--no-docs", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    records = load_records(Path(args.results))
    if not records:
        p.error(f"no gen_quality records in {args.results}")
    body = table(records)
    print(body)
    if not args.no_docs:
        command = records[0]["command"]
        splice_file(ROOT / "docs" / "results.md",
                    f"{body}\n\n![test-time compute](img/compute_curve.png)\n\nReproduce: `{command}`", START, END)
        plot(records, ROOT / "docs" / "img" / "compute_curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
