"""A short from-scratch CPU run of a recipe (issue 8), its samples, and the docs/scratch.md section built from it.

    python -m eval.scratch train --recipe recipes/scratch_tinystories.yaml --steps 150 \
        --data ../shared/data/train/tinystories_sample.txt [key=value ...]
    python -m eval.scratch report                  # the plot and docs/scratch.md section from every record

`train` runs `lad-finetune` on the recipe (runs/scratch/NAME, output in eval/results/scratch/NAME/train.log),
then samples the finished run with the confidence sampler in semi-autoregressive blocks, with low-confidence and
with random remasking, and writes eval/results/scratch/NAME/record.json: the command, versions, wall time,
the loss curves and the samples. A record that exists is kept, so `report` can be rerun in any later session.
`report` writes docs/img/scratch_loss.png and the section between `<!-- scratch:start -->` and
`<!-- scratch:end -->` of docs/scratch.md. Needs matplotlib (`pip install 'lad[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from eval.common import environment, run_logged, splice_file  # noqa: E402

RESULTS = REPO / "eval" / "results" / "scratch"
RUNS = REPO / "runs" / "scratch"
DOC = REPO / "docs" / "scratch.md"
PLOT = REPO / "docs" / "img" / "scratch_loss.png"
START, END = "<!-- scratch:start -->", "<!-- scratch:end -->"
PROMPTS = ["Once upon a time", "One day, a little girl named Lily", "Tom had a big red ball."]
# per tokenizer: answer length, and the sampler settings (one token per iteration, LLaDA's default)
SAMPLING = {"bpe": dict(max_new_tokens=96, iters=96, block_length=32),
            "bytes": dict(max_new_tokens=192, iters=192, block_length=64)}


def train(args) -> dict:
    name = args.name or Path(args.recipe).stem
    folder, out = RESULTS / name, RUNS / name
    record_path = folder / "record.json"
    if record_path.is_file():
        print(f"{record_path} exists; delete it to train again")
        return json.loads(record_path.read_text())
    cmd = ["lad-finetune", args.recipe, f"max_steps={args.steps}", f"output_dir={out.relative_to(REPO)}", "overwrite=true",
           "report.prompts=[]", *([f"data.train.0.path={args.data}"] if args.data else []), *args.overrides]
    seconds = run_logged(cmd, folder / "train.log")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    record = {"name": name, "recipe": args.recipe, "command": shlex.join(cmd), "wall_s": round(seconds, 1),
              "steps": args.steps, "tokens": max(m.get("tokens", 0) for m in metrics),
              "train": [{"step": m["step"], "loss": m["loss"], "tokens": m["tokens"]} for m in metrics if "loss" in m],
              "val": [{"step": m["step"], "val_loss": m["val_loss"], "val_acc": m["val_acc"]}
                      for m in metrics if "val_loss" in m],
              **samples(out), **environment()}
    folder.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {record_path}")
    return record


def samples(run: Path) -> dict:
    """Continuations of PROMPTS in blocks, low-confidence vs random remasking, the same seed for both."""
    from lad.generate import generate
    from lad.run import load_run

    denoiser, tokenizer, info = load_run(run)
    kind = "bytes" if info.base_model.get("tokenizer") == "bytes" else "bpe"
    settings = SAMPLING[kind]
    out = []
    for remask in ("confidence", "random"):
        for gen in generate(denoiser, PROMPTS, strategy="confidence", tokenizer=tokenizer, remask=remask, seed=0,
                            **settings):
            out.append({"prompt": gen.prompt, "remask": remask, "text": gen.text, "seconds": round(gen.seconds, 2)})
    return {"tokenizer": kind, "sampling": settings, "parameters": sum(p.numel() for p in denoiser.parameters()),
            "samples": out}


def plot(records: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(5.5 * len(records), 4), squeeze=False)
    for ax, record in zip(axes[0], records):
        steps = [t["step"] for t in record["train"]]
        losses = [t["loss"] for t in record["train"]]
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, losses, alpha=0.25, color="C0")
        ax.plot(steps, smooth, color="C0", label=f"train (mean of {window} steps)")
        ax.plot([v["step"] for v in record["val"]], [v["val_loss"] for v in record["val"]], "o-", color="C1",
                label="validation")
        ax.set_title(f"{record['name']} ({record['tokenizer']}, {record['wall_s'] / 60:.0f} CPU-min)")
        ax.set_xlabel(f"step ({record['tokens']:,} answer tokens in all)")
        ax.set_ylabel("masked-token loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    return PLOT


def section(records: list[dict]) -> str:
    lines = ["| run | parameters | tokenizer | steps | tokens | CPU wall | val loss (start → end) | val acc |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['name']} | {r['parameters'] / 1e6:.1f}M | {r['tokenizer']} | {r['steps']} | "
                     f"{r['tokens']:,} | {r['wall_s'] / 60:.1f} min | {r['val'][0]['val_loss']:.2f} → "
                     f"{r['val'][-1]['val_loss']:.2f} | {r['val'][-1]['val_acc']:.3f} |")
    lines += ["", f"![loss curves](img/{PLOT.name})", ""]
    for r in records:
        s = r["sampling"]
        lines += [f"### Samples: {r['name']}", "",
                  f"`confidence` sampler, {s['max_new_tokens']} new tokens, {s['iters']} iterations, blocks of "
                  f"{s['block_length']}, seed 0 (unedited; the prompt is in bold):", ""]
        for sample in r["samples"]:
            text = " ".join("".join(c if c.isprintable() else " " for c in sample["text"]).split())
            lines += [f"- *{sample['remask']} remasking*: **{sample['prompt']}**{'' if text[:1] in ',.!?' else ' '}"
                      + textwrap.shorten(text, 700, placeholder=" …"), ""]
        v = r["versions"]
        lines += [f"Command: `{r['command']}`  ", f"Machine: {r['machine']['cpus']} CPU cores, "
                  f"torch {v['torch']}, transformers {v['transformers']}, {r['date']}.", ""]
    return "\n".join(lines)


def report(_args) -> None:
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*/record.json"))]
    if not records:
        raise SystemExit(f"no records under {RESULTS}: run `python -m eval.scratch train ...` first")
    print(f"wrote {plot(records).relative_to(REPO)}")
    splice_file(DOC, section(records), START, END)
    print(f"updated {DOC.relative_to(REPO)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe, sample it, write its record")
    t.add_argument("--recipe", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--data", help="a local text file instead of the recipe's hub dataset")
    t.add_argument("--name", help="record name (default: the recipe's file name)")
    t.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    t.set_defaults(fn=train)
    sub.add_parser("report", help="plot and docs section from the records").set_defaults(fn=report)
    args = p.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
