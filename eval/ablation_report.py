"""Table and plots of the lever ablation (eval/ablate.py), spliced into docs/results.md.

    python -m eval.ablation_report          # reads eval/results/ablation/summary.json

Writes docs/img/ablation_accuracy.png (dev accuracy against training tokens and wall time, the AR parent as
a line), docs/img/ablation_tasks.png (the variants scored on several tasks, one panel per task),
docs/img/ablation_val_loss.png (validation loss curves) and the markdown table between the
`<!-- ablation:start -->` and `<!-- ablation:end -->` markers of docs/results.md. Needs matplotlib
(`pip install 'lad[bench]'`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from eval.common import splice_file  # noqa: E402

SUMMARY = REPO / "eval" / "results" / "ablation" / "summary.json"
RESULTS_MD = REPO / "docs" / "results.md"
IMG = REPO / "docs" / "img"
START, END = "<!-- ablation:start -->", "<!-- ablation:end -->"


def quality_cells(q: dict | None) -> str:
    """Parent perplexity and distinct-2 of the answers to the fixed prompt set (eval/ablate.py `quality`)."""
    if not q or q.get("parent_ppl") is None:
        return "- | -"
    return f"{q['parent_ppl']:.2f} | {q['distinct_2']:.3f}"


def num(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def both_orders(scores: dict, task: str, metric: str) -> str:
    got = [scores.get(f"{task}/{order}") for order in ("confidence", "l2r")]
    return " / ".join(num(g.get(metric)) if g else "-" for g in got)


def train_minutes(train: dict) -> float:
    """Training wall time of a variant in minutes: the fastest of its runs (a rerun for new scores may have shared
    the CPU with other work, which slows it but changes nothing else: the rerun reproduces the validation losses)."""
    runs = [train["wall_s"], (train.get("first_run") or {}).get("wall_s")]
    return min(s for s in runs if s is not None) / 60


def table(summary: dict, task: str = "arc_easy") -> str:
    """Every variant on `task` (both orders, acc and acc_norm), the parent first, with the training cost and the
    generation judges."""
    head = ("| variant | overrides (on `noise.objective=mask`) | steps | tokens | wall min | val loss 0 → end | "
            f"{task} acc conf / l2r | {task} acc_norm conf / l2r | answers: parent ppl | distinct-2 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    if task in summary["parent"]:
        p = summary["parent"][task]
        lines.append(f"| AR parent | adapter off, causal | - | - | - | - | {num(p['acc'])} | {num(p.get('acc_norm'))} | "
                     f"{quality_cells(summary.get('parent_quality'))} |")
    for name, entry in summary["variants"].items():
        train = entry["train"]
        val = train["val"]
        overrides = ", ".join(summary["variant_overrides"].get(name, [])) or "-"
        lines.append(f"| {name} | {overrides.replace('{half}', str(train['steps'] // 2))} | {train['steps']} | "
                     f"{train['tokens']:,} | {train_minutes(train):.0f} | {val[0]['val_loss']:.2f} → "
                     f"{val[-1]['val_loss']:.2f} | {both_orders(entry['scores'], task, 'acc')} | "
                     f"{both_orders(entry['scores'], task, 'acc_norm')} | "
                     f"{quality_cells((entry.get('quality') or {}).get('lad'))} |")
    return "\n".join(lines)


def several_tasks(summary: dict) -> tuple[list[str], list[str]]:
    """The variants scored on more than one task, and the tasks (in the usual order) that any of them has."""
    names = [n for n, e in summary["variants"].items() if len({k.split("/")[0] for k in e["scores"]}) > 1]
    tasks = [t for t in ("arc_easy", "arc_challenge", "hellaswag", "mmlu")
             if any(k.startswith(t + "/") for n in names for k in summary["variants"][n]["scores"])]
    return names, tasks


def tasks_table(summary: dict) -> str:
    """The variants scored on more than one task, on every task they have, next to the parent: acc in both orders
    (most-confident first / left to right), acc_norm left to right (MMLU has none)."""
    names, tasks = several_tasks(summary)
    if not names:
        return ""
    head = "| | " + " | ".join(f"{t} acc conf / l2r | {t} acc_norm l2r" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    parent = summary["parent"]
    lines.append("| AR parent | " + " | ".join(
        f"{num(parent[t]['acc'])} | {num(parent[t].get('acc_norm'))}" if t in parent else "- | -" for t in tasks) + " |")
    for name in names:
        scores = summary["variants"][name]["scores"]
        cells = [f"{both_orders(scores, t, 'acc')} | {num((scores.get(t + '/l2r') or {}).get('acc_norm'))}"
                 for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


ORDERS = (("confidence", "o", False), ("l2r", "s", True))  # order, marker, filled


def order_dots(ax, summary: dict, names: list[str], task: str, colors: dict, label: bool = True) -> None:
    """One row per variant: its `task` accuracy in both orders (bars: stderr), the parent as a dashed line."""
    for row, name in enumerate(names):
        for order, marker, filled in ORDERS:
            score = summary["variants"][name]["scores"].get(f"{task}/{order}")
            if score:
                ax.errorbar(score["acc"], row, xerr=score.get("acc_stderr"), fmt=marker, color=colors[name],
                            mfc=colors[name] if filled else "white", capsize=2)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)  # the first variant on top (set, not toggled: panels may share y)
    ax.grid(alpha=0.3)
    if task in summary["parent"]:
        parent = summary["parent"][task]["acc"]
        ax.axvline(parent, color="k", linestyle="--")
        if label:
            ax.text(parent, -0.5, " AR parent", fontsize=8, va="top")


def tasks_plot(summary: dict, colors: dict) -> Path | None:
    """The variants scored on several tasks: one panel per task, both orders, next to the parent."""
    names, tasks = several_tasks(summary)
    if not names:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks) + 1.5, 0.4 * len(names) + 2.6),
                             sharey=True)
    for ax, task in zip(axes, tasks):
        order_dots(ax, summary, names, task, colors, label=False)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("dev acc")
    fig.suptitle("variants on every task (○ most-confident first, ■ left to right; bars: stderr; "
                 "dashed: AR parent)", fontsize=10)
    fig.tight_layout()
    path = IMG / "ablation_tasks.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(summary: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    made = []
    task = "arc_easy"
    names = list(summary["variants"])
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colors = {name: palette(i % palette.N) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    # left: each variant's two orders side by side (every variant trains on the same tokens)
    order_dots(axes[0], summary, names, task, colors)
    tokens = {entry["train"]["tokens"] for entry in summary["variants"].values()}
    axes[0].set_xlabel(f"{task} dev acc (○ most-confident first, ■ left to right; bars: stderr)")
    axes[0].set_title(f"every variant: {', '.join(f'{t:,}' for t in sorted(tokens))} training tokens", fontsize=9)
    # right: the same scores against training wall time
    ax = axes[1]
    for name in names:
        entry = summary["variants"][name]
        for order, marker, filled in ORDERS:
            score = entry["scores"].get(f"{task}/{order}")
            if score:
                ax.plot(train_minutes(entry["train"]), score["acc"], marker, color=colors[name], markersize=8,
                        mfc=colors[name] if filled else "white", label=name if filled else None)
    ax.set_xlabel("training wall time (minutes, 2 CPU cores)")
    ax.set_ylabel(f"{task} dev acc")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if task in summary["parent"]:
        parent = summary["parent"][task]
        axes[1].axhline(parent["acc"], color="k", linestyle="--")
        axes[1].text(axes[1].get_xlim()[0], parent["acc"], " AR parent", fontsize=8, va="bottom")
    axes[1].grid(alpha=0.3)
    limit = next(iter(summary["parent"].values()))["limit"]
    fig.suptitle(f"SmolLM2-135M → LAD: {task} dev accuracy (first {limit} docs) per lever at one training budget")
    fig.tight_layout()
    path = IMG / "ablation_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    if (path := tasks_plot(summary, colors)) is not None:
        made.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in summary["variants"].items():
        val = entry["train"]["val"]
        ax.plot([v["step"] for v in val], [v["val_loss"] for v in val], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (deterministic mask noise)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = IMG / "ablation_val_loss.png"
    fig.savefig(path, dpi=110)
    made.append(path)
    return made


def main() -> int:
    if not SUMMARY.is_file():
        raise SystemExit(f"{SUMMARY} not found: run eval/ablate.py first")
    summary = json.loads(SUMMARY.read_text())
    markdown = table(summary)
    more = tasks_table(summary)
    if more:
        markdown += "\n\nThe variants scored on more tasks (first 200 dev documents each; MMLU 200 per subject):\n\n" + more
    print(markdown)
    for path in plots(summary):
        print(f"wrote {path.relative_to(REPO)}")
    splice_file(RESULTS_MD, markdown, START, END)
    print(f"updated {RESULTS_MD.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
