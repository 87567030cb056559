"""The real conversion (issues 5 and 11): one longer SmolLM2-135M run scored against its AR parent.

    accelerate launch lad/finetune.py recipes/smollm2_135m_hour.yaml    # distil the parent once, then 160 steps
    python -m eval.conversion --run runs/smollm2_135m_hour              # score it (resumable)
    python -m eval.conversion --report                                  # table + plot → docs/results.md

The final weights are scored on every dev task in each order, next to the AR parent on the same prompts
(`--baseline ar`); then every kept checkpoint on the curve task (ARC-Easy, first order given) for dev accuracy
against training tokens and training time. Records are small JSON files in eval/results/conversion/; one
whose file exists is not rerun, so a scoring pass that stopped continues where it was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from eval.common import acc_fields, score_task, splice_file  # noqa: E402

RESULTS = REPO / "eval" / "results" / "conversion"
DOC = REPO / "docs" / "results.md"
PLOT = REPO / "docs" / "img" / "conversion_curve.png"
STEP0 = REPO / "eval" / "results" / "prompt_causal"  # the untrained prompt-causal model, scored once
START, END = "<!-- conversion:start -->", "<!-- conversion:end -->"
TASKS = "arc_easy,arc_challenge,hellaswag,mmlu"


def elapsed(metrics: list[dict]) -> dict[int, float]:
    """Wall seconds of training at each logged step, rebuilt from the logged throughput (validation and
    checkpoint time fall inside the interval they interrupted)."""
    out, seconds, tokens = {}, 0.0, 0
    for m in metrics:
        if "tokens_per_s" in m and m["tokens_per_s"] > 0:
            seconds += (m["tokens"] - tokens) / m["tokens_per_s"]
            tokens = m["tokens"]
            out[m["step"]] = seconds
    return out


def read_train(run: Path) -> dict:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    clock = elapsed(metrics)
    tokens = {m["step"]: m["tokens"] for m in metrics if "tokens" in m}
    return {"run": str(run), "recipe": (run / "recipe.yaml").read_text(encoding="utf-8"),
            "steps": max(tokens), "tokens": tokens[max(tokens)], "train_s": round(clock[max(clock)], 1),
            "val": [{k: m[k] for k in m if k.startswith("val_") or k == "step"} for m in metrics if "val_loss" in m],
            "clock": {str(s): [tokens[s], round(clock[s], 1)] for s in clock}}


def untrained_point(train: dict, task: str, order: str, limit: int) -> dict | None:
    """Step 0 of the curve: LoRA starts at zero, so the untrained model is the parent under the run's attention
    and shift, whatever its data. That model was scored once (docs/results.md, "Reading the prompt causally");
    its record is reused when the run's attention, shift, task, order and document count are the ones scored."""
    import yaml

    recipe = yaml.safe_load(train["recipe"])
    if not (recipe.get("shift") and recipe.get("attention") == "prompt_causal"):
        return None
    path = STEP0 / f"step0_shift_pc_{order}.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    metrics, config = raw["results"].get(task), raw["config"]
    if not metrics or config["limit"] != limit or config["order"] != order or config["iters"] != 16:
        return None
    return {"variant": "step 0 (untrained)", "task": task, "order": order, "limit": limit,
            "source": str(path.relative_to(REPO)), **acc_fields(metrics), "step": 0, "tokens": 0, "train_s": 0.0}


def score_run(run: Path, tasks: list[str], orders: list[str], curve: str, limit: int, results: Path = RESULTS) -> dict:
    summary_path = results / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["train"] = train = read_train(run)

    def save():
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    results.mkdir(parents=True, exist_ok=True)
    save()
    for task in tasks:  # the parent first: it is quick and every row needs it
        summary.setdefault("parent", {})[task] = score_task(results / "parent", "parent", run, task, "confidence",
                                                            limit, baseline=True)
        save()
    final = summary.setdefault("final", {})
    for task in tasks:
        for order in orders:
            final[f"{task}/{order}"] = score_task(results / "final", "final", run, task, order, limit)
            save()
            print(f"{task}/{order}: {final[f'{task}/{order}']['acc']:.3f} "
                  f"(parent {summary['parent'][task]['acc']:.3f})", flush=True)
    points = summary.setdefault("curve", {})
    start = untrained_point(train, curve, orders[0], limit)
    if start:
        points["0"] = start
    for folder in sorted((run / "checkpoints").glob("step-*")):
        step = int(folder.name[5:])
        if step == train["steps"]:
            continue  # the final weights, scored above
        record = score_task(results / "curve", f"step {step}", run, curve, orders[0], limit,
                            weights=f"checkpoints/{folder.name}", stem=f"{folder.name}_{curve}_{orders[0]}")
        tokens, seconds = train["clock"][str(step)]
        points[str(step)] = {**record, "step": step, "tokens": tokens, "train_s": seconds}
        save()
    return summary


def table(summary: dict) -> str:
    train, parent, final = summary["train"], summary["parent"], summary["final"]
    orders = sorted({k.split("/")[1] for k in final}, key=["l2r", "confidence"].index)
    head = "| task | docs | AR parent acc | " + " | ".join(f"LAD acc ({o})" for o in orders)
    head += " | AR parent acc_norm | " + " | ".join(f"LAD acc_norm ({o})" for o in orders) + " |"
    rows = [head, "|" + "---|" * (4 + 2 * len(orders))]
    for task, ar in parent.items():
        lad = [final.get(f"{task}/{o}") for o in orders]
        cells = [f"{r['acc']:.3f} ({r['acc'] - ar['acc']:+.3f})" if r else "-" for r in lad]
        norms = [f"{r['acc_norm']:.3f}" if r and r.get("acc_norm") is not None else "-" for r in lad]
        norm_ar = f"{ar['acc_norm']:.3f}" if ar.get("acc_norm") is not None else "-"
        rows.append(f"| {task} | {ar['limit']} | {ar['acc']:.3f} ± {ar['acc_stderr']:.3f} | " + " | ".join(cells)
                    + f" | {norm_ar} | " + " | ".join(norms) + " |")
    curve = sorted(summary.get("curve", {}).values(), key=lambda p: p["step"])
    budget = (f"{train['steps']} steps, {train['tokens']:,} training tokens, {train['train_s'] / 60:.0f} training "
              "minutes on 2 cores (validation and checkpoints included; the parent's distillation before it not).")
    lines = [budget, "", *rows]
    if curve:
        task = curve[0]["task"]
        lines += ["", f"{task} ({curve[0]['order']}) during training:", "",
                  "| step | tokens | training min | acc | acc_norm |", "|---|---|---|---|---|"]
        last = final.get(f"{task}/{curve[0]['order']}")
        points = curve + ([{**last, "step": train["steps"], "tokens": train["tokens"], "train_s": train["train_s"]}]
                          if last else [])
        lines += [f"| {p['step']} | {p['tokens']:,} | {p['train_s'] / 60:.0f} | {p['acc']:.3f} | {p['acc_norm']:.3f} |"
                  for p in points]
    return "\n".join(lines)


def plot(summary: dict, ablation: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = summary["train"]
    curve = sorted(summary.get("curve", {}).values(), key=lambda p: p["step"])
    if not curve:
        return
    task, order = curve[0]["task"], curve[0]["order"]
    last = summary["final"].get(f"{task}/{order}")
    if last:
        curve.append({**last, "tokens": train["tokens"], "train_s": train["train_s"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, scale, label in ((axes[0], "tokens", 1e3, "training tokens (thousands)"),
                                  (axes[1], "train_s", 60, "training time (minutes, 2 CPU cores)")):
        ax.plot([p[key] / scale for p in curve], [p["acc"] for p in curve], "o-",
                label="hour run (prompt-causal, shift, levers)")
        if ablation:  # the 80-step variants: one point each at the same budget
            for name, entry in ablation.get("variants", {}).items():
                score = entry.get("scores", {}).get(f"{task}/{order}")
                if score:
                    x = entry["train"]["tokens"] / scale if key == "tokens" else entry["train"]["wall_s"] / scale
                    ax.plot([x], [score["acc"]], "x", label=f"80 steps: {name}")
        parent = summary["parent"][task]
        ax.axhline(parent["acc"], color="k", ls="--", label="AR parent (band: ± its stderr)")
        ax.axhspan(parent["acc"] - parent["acc_stderr"], parent["acc"] + parent["acc_stderr"], color="k", alpha=0.08)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{task} acc ({order}, {curve[0]['limit']} docs)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("SmolLM2-135M → LAD: dev accuracy against training budget")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    print(f"wrote {PLOT.relative_to(REPO)}")


def report() -> None:
    summary = json.loads((RESULTS / "summary.json").read_text())
    ablation_path = REPO / "eval" / "results" / "ablation" / "summary.json"
    plot(summary, json.loads(ablation_path.read_text()) if ablation_path.is_file() else None)
    body = table(summary)
    splice_file(DOC, body, START, END)
    print(body)
    print(f"updated {DOC.relative_to(REPO)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="the finished run directory to score")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--orders", default="l2r", help="reveal orders for the final weights; the first for the curve")
    p.add_argument("--curve", default="arc_easy", help="the task each checkpoint is scored on")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--report", action="store_true", help="write the table and plot into docs/results.md")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="where the records go (default: eval/results/conversion, the one-hour run's; --report reads "
                        "that one)")
    args = p.parse_args()
    if not args.run and not args.report:
        p.error("give --run RUN (score) and/or --report")
    if args.run:
        if not (args.run / "lad.json").is_file():
            p.error(f"{args.run} is not a finished LAD run (no lad.json)")
        score_run(args.run, args.tasks.split(","), args.orders.split(","), args.curve, args.limit, args.results)
    if args.report:
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
