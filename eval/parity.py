"""Parity with the parent, document by document (issue 33): where a LAD run loses to its AR parent, and why.

    python -m eval.parity --run runs/smollm2_135m_hour --label hour --tasks hellaswag --limit 200 \\
        --settings parent,iters16,exact,exact-w8              # score (resumable: a record that exists is kept)
    python -m eval.parity --report                            # table → stdout and docs/results.md, plot

Each (run, task, setting) is scored with `lad-eval --log_samples`; the record keeps, per document, the gold index
and every choice's log-likelihood and length in characters, so acc, acc_norm, paired intervals against the parent
(lad/scoring/paired.py) and the length diagnostic below are recomputed from it without scoring again.

Settings: `parent` (the AR parent, `--baseline ar`), `itersN` (left to right over N reveal steps), `exact` (one
token per step: the exact chain rule), `confN` (most-confident first, N steps); a `-wK` suffix adds
`--lookahead K` (each reveal shows K masks, so the model is not told each choice's length).

Length diagnostics (`length_fit`) of d = LAD − parent log-likelihood per choice: the slope, within documents, of d
against the choice's length in nats per 10 characters (zero when LAD and parent differ by the same amount on every
choice of a document; positive when LAD favours longer choices more than its parent, as a model told each
choice's length would), which moves acc; and the offset, the mean nats per choice left once the slope is taken
out, which moves acc_norm (it divides by length, so a constant c adds c / length: a negative one favours long
choices there) but not acc.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from eval.common import run_logged, save_figure, splice_file  # noqa: E402
from lad.scoring.paired import interval_cell, mcnemar_p, paired_interval  # noqa: E402

RESULTS = REPO / "eval" / "results" / "parity"
DOC = REPO / "docs" / "results.md"
PLOT = REPO / "docs" / "img" / "parity.png"
START, END = "<!-- parity:start -->", "<!-- parity:end -->"
SETTING = re.compile(r"^(parent|exact|iters(\d+)|conf(\d+))(-w(\d+))?$")


def setting_flags(name: str) -> list[str]:
    """lad-eval flags of a setting name (see the module docstring)."""
    match = SETTING.match(name)
    if not match or (match.group(1) == "parent" and match.group(4)) or (match.group(3) and match.group(4)):
        raise SystemExit(f"--settings: {name!r} is not parent, exact, itersN or confN (with -wK on exact, itersN)")
    head, iters, conf, _, window = match.groups()
    if head == "parent":
        return ["--baseline", "ar"]
    flags = ["--iters", iters or conf or "100000", "--order", "confidence" if conf else "l2r"]
    return flags + (["--lookahead", window] if window else [])


def documents(samples: Path | list[Path]) -> list[list]:
    """[doc_id, gold, [log-likelihood per choice], [characters per choice]] from lm-eval's samples file, or from
    every member's file of a group (MMLU: one per subject), whose ids are then "subject/doc_id" so that the
    documents of different members stay apart."""
    files = [samples] if isinstance(samples, Path) else sorted(samples)
    out = []
    for path in files:
        # samples_<lad|ar>_<task>_<stamp>.jsonl, as lad-eval names them: the member is the task part
        member = path.name.split("_", 2)[-1].rsplit("_", 1)[0]
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            doc = int(row["doc_id"]) if len(files) == 1 else f"{member}/{int(row['doc_id']):06d}"
            out.append([doc, int(row["target"]), [float(r[0]) for r in row["filtered_resps"]],
                        [len(arg[1]) for arg in row["arguments"]]])
    return sorted(out)


def parent_of(run: str) -> str:
    """The name of a run's AR parent (its base model's file or repo name): runs of one base share its records."""
    name = json.loads((Path(run) / "lad.json").read_text())["base_model"]["name_or_path"]
    return "parent-" + re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name)).name or str(name))


def score(run: str, label: str, task: str, setting: str, limit: int | None, data_dir: str) -> dict:
    """Score one (run, task, setting) unless its record exists; returns the record."""
    parent = parent_of(run)
    folder = RESULTS / (parent if setting == "parent" else label)
    stem = f"{task}_{setting}_{limit or 'all'}"
    target = folder / f"{stem}.json"
    if target.is_file():
        return json.loads(target.read_text())
    raw = folder / f".{stem}"
    cmd = ["lad-eval", "--model", run, "--tasks", task, "--data-dir", data_dir, "--log_samples",
           "--output_path", str(raw), *setting_flags(setting)] + (["--limit", str(limit)] if limit else [])
    if raw.exists():
        for path in raw.iterdir():  # a pass that died: its partial output is this script's own
            path.unlink()
    seconds = run_logged(cmd, folder / f"{stem}.log")
    (result,) = json.loads(next(raw.glob("results_*.json")).read_text()).values()
    docs = documents(list(raw.glob(f"samples_*_{task}*.jsonl")))  # a group: every member's file
    record = {"label": parent if setting == "parent" else label, "parent": parent, "run": run, "task": task, "setting": setting,
              "limit": limit, "command": shlex.join(cmd), "wall_s": round(seconds, 1),
              "nfe": result["config"].get("nfe"), "versions": result.get("versions"), "docs": docs}
    target.write_text(json.dumps(record) + "\n")
    for path in raw.iterdir():
        path.unlink()
    raw.rmdir()
    return record


def outcomes(docs: list[list]) -> dict[str, np.ndarray]:
    """acc and acc_norm (log-likelihood per character, as lm-eval's) of each document, in doc order."""
    acc = [float(np.argmax(ll) == gold) for _, gold, ll, _ in docs]
    norm = [float(np.argmax(np.asarray(ll) / np.asarray(chars)) == gold) for _, gold, ll, chars in docs]
    return {"acc": np.array(acc), "acc_norm": np.array(norm)}


def length_fit(mine: list[list], theirs: list[list]) -> tuple[float, float]:
    """(slope, offset) of (LAD − parent) log-likelihood against choice length. slope: nats per 10 characters,
    within documents (what moves acc: a choice's sum); offset: the mean nats per choice left once the slope is
    taken out (what moves acc_norm, which divides by length: a constant c adds c / length)."""
    xs, ys, diffs, lengths = [], [], [], []
    for (_, _, ll, chars), (_, _, ll_parent, _) in zip(mine, theirs):
        diff, length = np.asarray(ll) - np.asarray(ll_parent), np.asarray(chars, dtype=float)
        xs += list(length - length.mean())
        ys += list(diff - diff.mean())
        diffs += list(diff)
        lengths += list(length)
    xs, ys = np.asarray(xs), np.asarray(ys)
    slope = float((xs @ ys) / (xs @ xs)) if (xs @ xs) > 0 else 0.0
    offset = float(np.mean(np.asarray(diffs) - slope * np.asarray(lengths))) if diffs else 0.0
    return 10 * slope, offset


def compare(lad: dict, parent: dict) -> dict:
    """One table row: both models' acc / acc_norm on the documents both scored, the paired intervals, the slope."""
    theirs = {d[0]: d for d in parent["docs"]}
    mine = [d for d in lad["docs"] if d[0] in theirs]
    theirs = [theirs[d[0]] for d in mine]
    a, b = outcomes(mine), outcomes(theirs)
    row = {"task": lad["task"], "label": lad["label"], "setting": lad["setting"], "n": len(mine),
           "wall_s": lad["wall_s"]}
    row["slope"], row["offset"] = length_fit(mine, theirs)
    row["same_answer"] = float(np.mean([np.argmax(m[2]) == np.argmax(t[2]) for m, t in zip(mine, theirs)]))
    for metric in ("acc", "acc_norm"):
        delta, low, high = paired_interval(a[metric], b[metric])
        row[metric] = {"lad": float(a[metric].mean()), "parent": float(b[metric].mean()), "delta": delta,
                       "low": low, "high": high, "p": mcnemar_p(a[metric], b[metric]), "n": len(mine)}
    return row


def rows() -> list[dict]:
    """Every LAD record next to its parent's record of the same task, on the documents both scored."""
    records = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("*/*.json"))]
    parents: dict[tuple, dict] = {}
    for r in records:  # per parent and task, its record with the most documents (compare matches them by id)
        key = (r["parent"], r["task"])
        if r["setting"] == "parent" and len(r["docs"]) > len(parents.get(key, {"docs": ()})["docs"]):
            parents[key] = r
    return [compare(r, parents[(r["parent"], r["task"])]) for r in records
            if r["setting"] != "parent" and (r["parent"], r["task"]) in parents]


def table(found: list[dict]) -> str:
    head = ("| run | task (docs) | setting | parent acc / acc_norm | LAD acc / acc_norm | Δ acc [95%] p | "
            "Δ acc_norm [95%] p | same answer | slope | offset | LAD s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in found:
        a, n = r["acc"], r["acc_norm"]
        lines.append(f"| {r['label']} | {r['task']} ({r['n']}) | {r['setting']} | {a['parent']:.3f} / "
                     f"{n['parent']:.3f} | {a['lad']:.3f} / {n['lad']:.3f} | {interval_cell(a, documents=False)} | "
                     f"{interval_cell(n, documents=False)} | {r['same_answer']:.1%} | {r['slope']:+.3f} | "
                     f"{r['offset']:+.2f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(found: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(found) + 1.6), sharey=True)
    names = [f"{r['label']} {r['task']} ({r['n']}) {r['setting']}" for r in found]
    for ax, metric in zip(axes, ("acc", "acc_norm")):
        for y, r in enumerate(found):
            m = r[metric]
            ax.errorbar(m["delta"], y, xerr=[[m["delta"] - m["low"]], [m["high"] - m["delta"]]], fmt="o",
                        color="tab:red" if m["high"] < 0 else "tab:blue", capsize=3)
        ax.axvline(0, color="grey", lw=1)
        ax.set_xlabel(f"LAD − parent, {metric} (paired 95% interval)")
    axes[0].set_yticks(range(len(found)), names)
    axes[0].invert_yaxis()
    save_figure(fig, PLOT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="the LAD run folder to score")
    p.add_argument("--label", help="its name in the records and the table (default: the folder's name)")
    p.add_argument("--tasks", default="hellaswag")
    p.add_argument("--settings", default="parent,iters16,exact")
    p.add_argument("--limit", type=int, default=None, help="the first N documents of each task (default all)")
    p.add_argument("--data-dir", default="../shared/data/eval")
    p.add_argument("--report", action="store_true", help="the table and plot of every record so far")
    args = p.parse_args(argv)
    if args.run:
        for name in args.settings.split(","):
            setting_flags(name)  # every name checked before the first hour of scoring
        for task in args.tasks.split(","):
            for name in args.settings.split(","):
                record = score(args.run, args.label or Path(args.run).name, task, name, args.limit, args.data_dir)
                print(f"{task} {name}: {len(record['docs'])} documents in {record['wall_s']:.0f} s", flush=True)
    if args.report:
        found = rows()
        body = table(found)
        print(body)
        if found:
            plot(found)
            splice_file(DOC, body + f"\n\n![paired intervals](img/{PLOT.name})", START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
