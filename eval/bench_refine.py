"""The repair benchmark (issue 31): does a LAD run repair wrong tokens without re-masking them?

Clean reference answers are corrupted with one kind of edit at a time (LAD's structural edits, lad/noise.py:
replace, swap, duplicate, span_shift, and mask) at several rates, and each corrupted answer is then given to the
run's noiseless refinement (lad/sampling/polish.py: every slot re-predicted from the draft, no masks) for 1, 2, 4
and 8 passes. Per edit, rate and passes it reports:

    repaired   share of corrupted slots (slot != reference) that hold the reference token afterwards
    damaged    share of intact slots (slot == reference) that no longer do
    edits      token edit distance to the reference, mean per answer (before, after)
    ppl        the AR parent's perplexity of the answer (before, after; the reference's own is the floor)

References: the AR parent's greedy answers to the first built-in prompts, and held-out corpus answers
(alpaca_eval.jsonl, which no recipe trains on), cut to `--max-tokens` tokens (with the end token when the answer
ends within them). Repair is positional (the denoiser keeps every slot where it is), so a duplication or a span
shift corrupts every slot it moves and is only repaired by moving them back; the edit distance credits partial
repairs. Every run is measured on the same references and the same corruptions (fixed seeds). A replacement is any
reference token by default; `--replace-from parent` plants the parent's likeliest wrong tokens for the slot instead
(plausible mistakes, the kind `noise.replace_from: parent` trains on; label such records apart).
`--polish-with parent|both` measures the polishes in which the AR parent helps fill the slots the denoiser flags
(label them apart; their parent perplexities favour them, since the judge helped pick the tokens: read repaired /
damaged first). The benchmark's defaults (keep 1, the denoiser alone) stay those of its first records.

    python -m eval.bench_refine --runs runs/ablate/prompt_causal_mask,runs/ablate/pc_structural,runs/ablate/pc_mixed
    python -m eval.bench_refine --report            # the table in docs/results.md and docs/img/refine.png

Results: eval/results/repair/<run label>.json (the command, versions and every cell), references.json (the
references, made once by the first run's parent, so later runs and sessions score the same answers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import ROOT, cell, command_line, environment, prompt_set, quiet, write_record  # noqa: E402
from lad.noise import EDITS, apply_edit  # noqa: E402
from lad.quality import answer_nll, perplexity  # noqa: E402
from lad.sampling.common import render_prompt  # noqa: E402
from lad.sampling.options import OPTIONS  # noqa: E402
from lad.sampling.polish import draft_canvas, end_token, polish_canvas  # noqa: E402

RESULTS = ROOT / "eval" / "results" / "repair"
CORPUS = ROOT.parent / "shared" / "data" / "train" / "alpaca_eval.jsonl"
RATES = (0.05, 0.1, 0.2)
PASSES = (1, 2, 4, 8)
START, END = "<!-- refine:start -->", "<!-- refine:end -->"


# ---------------------------------------------------------------- references and corruptions


def make_references(denoiser, tokenizer, chat_template, prompts: int, corpus: int, max_tokens: int) -> list[dict]:
    """[{source, prompt, ids}]: the parent's greedy answers to the first `prompts` built-in prompts, then the
    first `corpus` held-out corpus answers; ids cut to `max_tokens`, with the end token when the answer ends."""
    from lad.sampling import ar

    end = end_token(tokenizer, denoiser)
    refs = []
    texts = prompt_set(prompts)[0] if prompts else []
    for gen in (ar(denoiser, tokenizer, texts, max_new_tokens=max_tokens, chat_template=chat_template)
                if texts else []):
        ids = gen.token_ids + ([end] if len(gen.token_ids) < max_tokens else [])
        refs.append({"source": "builtin", "prompt": gen.prompt, "ids": ids[:max_tokens]})
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()[:corpus]] if corpus else []
    for row in rows:
        prompt = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
        ids = tokenizer(row["output"], add_special_tokens=False).input_ids + [end]
        refs.append({"source": "corpus", "prompt": prompt, "ids": ids[:max_tokens]})
    return [r for r in refs if len(r["ids"]) >= 4]  # an answer too short to corrupt says nothing


def corrupted(ref: list[int], rates, mask_id: int, pool: torch.Tensor, seed: int) -> tuple[torch.Tensor, list]:
    """[len(EDITS) * len(rates), n] rows: `ref` under each edit at each rate (one kind of edit per row), and
    the (edit, rate) of each row. Row (e, r) draws from its own generator, so it is the same in every run."""
    rows, labels = [], []
    for e, edit in enumerate(EDITS):
        for r, rate in enumerate(rates):
            x = torch.tensor(ref)
            gen = torch.Generator().manual_seed(seed * 1000 + e * 10 + r)
            apply_edit(x, edit, rate, mask_id, pool, gen)
            rows.append(x)
            labels.append((edit, rate))
    return torch.stack(rows), labels


@torch.no_grad()
def parent_mistakes(denoiser, tokenizer, prompt: str, ref: list[int], chat_template, k: int = 8) -> torch.Tensor:
    """[len(ref), k]: at each slot, the AR parent's k likeliest tokens other than the reference's, given the prompt
    and the reference before it: the plausible mistakes `noise.replace_from: parent` trains on (the same
    `parent_choices` as training), as `--replace-from parent`'s replacements."""
    from lad.training.step import parent_choices

    prompt_ids = render_prompt(tokenizer, prompt, chat_template)
    ids = torch.tensor([prompt_ids + list(ref)])
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[0, len(prompt_ids):] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "answer_mask": answer,
             "position_ids": torch.arange(ids.shape[1])[None]}
    device = next(denoiser.parameters()).device
    return parent_choices(denoiser, batch, k, set(tokenizer.all_special_ids), device)[0, len(prompt_ids):]


def levenshtein(a: list[int], b: list[int]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def cut(ids: list[int], eos: set[int]) -> list[int]:
    """An answer as its text reads: the ids before the first end token."""
    return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)


# ---------------------------------------------------------------- one run


def repair_counts(ref: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> dict:
    """Slot counts for one row: corrupted slots and how many were repaired, intact ones and how many damaged."""
    wrong = before != ref
    return {"corrupted": int(wrong.sum()), "repaired": int((after[wrong] == ref[wrong]).sum()),
            "intact": int((~wrong).sum()), "damaged": int((after[~wrong] != ref[~wrong]).sum()),
            "edits_before": levenshtein(before.tolist(), ref.tolist()),
            "edits_after": levenshtein(after.tolist(), ref.tolist())}


@torch.no_grad()
def polish_rows(denoiser, tokenizer, prompt: str, rows: torch.Tensor, passes, chat_template,
                keep: float = 1.0, with_: str = "denoiser", doubt: float = 1.0) -> dict[int, torch.Tensor]:
    """{p: the rows after p noiseless passes} for every p in `passes` (0: the rows as given); `with_`: whose
    greedy token a flagged slot takes (lad/sampling/polish.py)."""
    canvas, cache = draft_canvas(denoiser, tokenizer, [prompt] * len(rows), rows, chat_template)
    out, done, fixed = {0: rows.clone()}, 0, False
    for p in sorted(passes):
        if not fixed:  # greedy passes from a fixed point would only repeat it
            before = canvas.answer.clone()
            spent = polish_canvas(denoiser, canvas, p - done, cache=cache, keep=keep, with_=with_,
                                  doubt=doubt)  # stops if fixed
            fixed = spent < p - done or bool((canvas.answer == before).all())
        done = p
        out[p] = canvas.answer.cpu().clone()
    return out


def bench_run(denoiser, tokenizer, chat_template, refs: list[dict], rates, passes, eos: set[int],
              judge: bool = True, keeps=(1.0,), replace_from: str = "pool", with_: str = "denoiser",
              doubt: float = 1.0) -> dict:
    """Every cell {edit, rate, keep, passes, counts..., parent_ppl} of one run, and the references' own parent
    perplexity (`judge=False`: no perplexities, for a denoiser without a parent). Perplexity is judged before
    and after the most passes only (the parent's forwards cost as much as the passes). `replace_from`: a
    replacement is any reference token ("pool") or one of the parent's likeliest wrong tokens for its slot
    ("parent": `parent_mistakes`)."""
    denoiser.eval()
    pool = torch.tensor([t for r in refs for t in r["ids"]])
    totals: dict[tuple, dict] = {}
    texts: dict[tuple, list] = {}
    most = max(passes)
    for index, ref in enumerate(refs):
        target = torch.tensor(ref["ids"])
        own = pool if replace_from == "pool" else parent_mistakes(denoiser, tokenizer, ref["prompt"], ref["ids"],
                                                                    chat_template)
        rows, labels = corrupted(ref["ids"], rates, denoiser.mask_id, own, seed=index)
        for keep in keeps:
            states = polish_rows(denoiser, tokenizer, ref["prompt"], rows, passes, chat_template, keep, with_, doubt)
            for p, state in states.items():
                for (edit, rate), before, after in zip(labels, rows, state):
                    key = (edit, rate, keep, p)
                    cell = totals.setdefault(key, {"edit": edit, "rate": rate, "keep": keep, "passes": p,
                                                   "answers": 0})
                    cell["answers"] += 1
                    source = cell.setdefault("by_source", {}).setdefault(ref["source"], {"answers": 0})
                    source["answers"] += 1
                    for name, value in repair_counts(target, before, after).items():
                        cell[name] = cell.get(name, 0) + value
                        source[name] = source.get(name, 0) + value
                    if p in (0, most) and (p or keep == keeps[0]):
                        texts.setdefault(key, []).append((ref["prompt"], cut(after.tolist(), eos)))
    rendered = {}

    def ppl(pairs):
        if not judge:
            return None
        prompts = [rendered.setdefault(p, render_prompt(tokenizer, p, chat_template)) for p, _ in pairs]
        answers = [a for _, a in pairs]
        return perplexity(answer_nll(denoiser, prompts, answers), [len(a) for a in answers])

    cells = []
    for key, cell in totals.items():
        edit, rate, keep, p = key
        judged = texts.get(key) or (texts.get((edit, rate, keeps[0], 0)) if p == 0 else None)
        cell["parent_ppl"] = ppl(judged) if judged else None
        cells.append(cell)
    reference_ppl = ppl([(r["prompt"], cut(r["ids"], eos)) for r in refs])
    return {"cells": cells, "reference_ppl": reference_ppl}


def shares(cell: dict) -> dict:
    """A cell's counts as the reported shares."""
    return {"repaired": cell["repaired"] / cell["corrupted"] if cell["corrupted"] else None,
            "damaged": cell["damaged"] / cell["intact"] if cell["intact"] else None,
            "edits": cell["edits_after"] / cell["answers"], "edits_before": cell["edits_before"] / cell["answers"]}


# ---------------------------------------------------------------- report


def keeps_of(record: dict) -> list[float]:
    return sorted({c.get("keep", 1.0) for c in record["cells"]}, reverse=True)


def table(records: list[dict], rate: float) -> str:
    """Markdown: per run, keep and edit at one rate, repaired and damaged after 1 and the most passes, edit
    distance and parent perplexity before and after."""
    lines = [f"Corruption rate {rate:g}; repaired / damaged: share of corrupted / intact slots; edits: token edit "
             "distance to the reference per answer; ppl: the AR parent's perplexity (references: "
             f"{cell(records[0]['reference_ppl'], '.2f')}); keep: a slot whose token the model gives at least "
             "this probability is kept (1: every slot takes the greedy token).", "",
             "| run | keep | edit | repaired (1 / max passes) | damaged (1 / max) | edits before → after | "
             "ppl before → after |", "|---|---|---|---|---|---|---|"]
    for record in records:
        for keep in keeps_of(record):
            cells = {(c["edit"], c["passes"]): c for c in record["cells"]
                     if c["rate"] == rate and c.get("keep", 1.0) == keep}
            most = max(p for _, p in cells)
            for edit in EDITS:
                if (edit, 1) not in cells:
                    continue
                one, last = shares(cells[edit, 1]), shares(cells[edit, most])
                lines.append(f"| {record['label']} | {keep:g} | {edit} | {one['repaired']:.0%} / "
                             f"{last['repaired']:.0%} | {one['damaged']:.1%} / {last['damaged']:.1%} | "
                             f"{last['edits_before']:.1f} → {last['edits']:.1f} | "
                             f"{cell(cells[edit, 0]['parent_ppl'], '.1f')} → "
                             f"{cell(cells[edit, most]['parent_ppl'], '.1f')} |")
    return "\n".join(lines)


def source_table(records: list[dict], rate: float, passes: int = 1) -> str:
    """Markdown: repaired / damaged after `passes` at keep 1, by where the reference came from (the parent's own
    greedy answers or held-out corpus answers), for the records that kept the split."""
    lines = [f"By reference source, rate {rate:g}, keep 1, after {passes} pass(es): repaired / damaged.", "",
             "| run | edit | parent's answers | corpus answers |", "|---|---|---|---|"]
    for record in records:
        for c in record["cells"]:
            if (c["rate"], c.get("keep", 1.0), c["passes"]) != (rate, 1.0, passes) or "by_source" not in c:
                continue
            split = {name: shares(counts) for name, counts in c["by_source"].items()}
            row = [f"{cell(split[k]['repaired'], '.0%')} / {cell(split[k]['damaged'], '.1%')}" if k in split
                   else "—" for k in ("builtin", "corpus")]
            lines.append(f"| {record['label']} | {c['edit']} | {row[0]} | {row[1]} |")
    return "\n".join(lines) if len(lines) > 4 else ""


def filler(record: dict) -> str:
    """Who filled the record's flagged slots, as the plot names it: denoiser, parent or both, with the parent's
    order when it helped (records before 2026-12-08 filled at once) and its doubt when one applied."""
    with_ = record.get("polish_with", "denoiser")
    if with_ == "denoiser":
        return with_
    order = "left to right" if record.get("polish_order") == "left_to_right" else "at once"
    doubt = record.get("polish_doubt", 1.0)
    return f"{with_}, {order}" + (f", doubt {doubt:g}" if doubt < 1 else "")


def frontiers(records: list[dict], rate: float, edit: str) -> dict[str, tuple[str, list]]:
    """{label: (filler, [(damaged, repaired) after one pass, one point per keep, most damage first])}: records of
    the same run, filler and replacements are one line (a later record may add keeps), named by the shortest label."""
    groups: dict[tuple, dict] = {}
    for record in records:
        key = (record["run"], filler(record), record.get("replace_from", "pool"))
        group = groups.setdefault(key, {"label": record["label"], "points": {}})
        group["label"] = min(group["label"], record["label"], key=len)
        for c in record["cells"]:
            if c["rate"] == rate and c["edit"] == edit and c["passes"] == 1:
                got = shares(c)
                group["points"][c.get("keep", 1.0)] = (got["damaged"], got["repaired"])
    return {g["label"]: (key[1], [g["points"][k] for k in sorted(g["points"], reverse=True)])
            for key, g in groups.items() if g["points"]}


def plot(records: list[dict], rate: float, path: Path, edits=("replace", "swap", "mask")) -> None:
    """The repair-damage frontier after one pass, one panel per edit: a line per run and filler through its keeps
    (up and to the left is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.common import save_figure

    fig, axes = plt.subplots(1, len(edits), figsize=(4.2 * len(edits) + 3, 4), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for ax, edit in zip(axes[0], edits):
        for i, (label, (filler, points)) in enumerate(sorted(frontiers(records, rate, edit).items())):
            damaged, repaired = zip(*points)
            ax.plot([max(d, 1e-3) for d in damaged], repaired, marker="o", label=label, color=colours[i % 20],
                    linestyle="-" if filler == "denoiser" else "--")  # dashed: the parent helps fill
        ax.axvline(0.02, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{edit} at rate {rate:g}, one pass")
        ax.set_xlabel("intact slots damaged (log)")
        ax.set_xscale("log")
    axes[0, 0].set_ylabel("corrupted slots repaired")
    lines = {line.get_label(): line for ax in axes[0] for line in ax.get_lines()
             if not line.get_label().startswith("_")}  # every run that any panel drew, once
    axes[0, -1].legend(lines.values(), lines.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    save_figure(fig, path)


def report(rate: float = 0.1) -> int:
    from eval.common import splice_file

    records = [r for r in (json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))) if "cells" in r]
    if not records:
        raise SystemExit(f"no results in {RESULTS.relative_to(ROOT)}: run the benchmark first")
    body = "\n\n".join(filter(None, [table(records, rate), source_table(records, rate)]))
    body += ("\n\n![repair against damage, one pass](img/refine.png)\n\nThe plot: each line is one run and filler "
             "through its keep thresholds (the dotted line: the target's 2% damage). Each record holds the command "
             f"that made it (eval/results/repair/<label>.json), e.g. `{records[0]['command']}`")
    splice_file(ROOT / "docs" / "results.md", body, START, END)
    plot(records, rate, ROOT / "docs" / "img" / "refine.png")
    print(body)
    return 0


# ---------------------------------------------------------------- CLI


def references(path: Path, denoiser, tokenizer, chat_template, args) -> list[dict]:
    """The references of every run: made once (by the first run's parent) and kept."""
    wanted = {"prompts": args.prompts, "corpus": args.corpus, "max_tokens": args.max_tokens}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["settings"] == wanted:
            return saved["references"]
    refs = make_references(denoiser, tokenizer, chat_template, args.prompts, args.corpus, args.max_tokens)
    write_record(path, {"settings": wanted, "references": refs})
    return refs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="", help="comma-separated run directories")
    p.add_argument("--labels", default="", help="comma-separated labels (default: each run's folder name)")
    p.add_argument("--prompts", type=int, default=24, help="built-in prompts answered by the parent")
    p.add_argument("--corpus", type=int, default=24, help="held-out corpus answers (alpaca_eval.jsonl)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rates", default=",".join(map(str, RATES)))
    p.add_argument("--passes", default=",".join(map(str, PASSES)))
    p.add_argument("--keep", default="1", help="comma-separated polish keep thresholds to measure")
    p.add_argument("--replace-from", choices=("pool", "parent"), default="pool",
                   help="replacements: any reference token (pool), or the parent's likeliest wrong tokens for the "
                        "slot (parent: plausible mistakes, as noise.replace_from: parent trains on)")
    p.add_argument("--polish-with", choices=OPTIONS["polish_with"].choices, default="denoiser",
                   help="whose greedy token a slot the denoiser flags takes (lad/sampling/polish.py; label such "
                        "records apart)")
    p.add_argument("--polish-doubt", type=float, default=1.0, metavar="P",
                   help="with a parent filler: a flagged slot changes only where the parent too gives its token "
                        "less than P (lad-generate --polish-doubt; default 1: off)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--report", action="store_true", help="write the table and plot from the saved results")
    args = p.parse_args(argv)
    if args.report:
        return report()
    runs = [r for r in args.runs.split(",") if r]
    labels = [x for x in args.labels.split(",") if x] or [Path(r).name for r in runs]
    if not runs or len(labels) != len(runs):
        p.error("give --runs (and as many --labels, if any)")
    if args.corpus and not CORPUS.is_file():
        p.error(f"{CORPUS} not found: use --corpus 0 or add the shared data")
    rates = [float(x) for x in args.rates.split(",")]
    passes = [int(x) for x in args.passes.split(",")]
    out = Path(args.out_dir)
    for name in [*labels, "references"]:  # never overwrite a file this benchmark did not write
        target = out / f"{name}.json"
        if target.is_file() and not {"cells", "settings"} & set(json.loads(target.read_text())):
            p.error(f"{target} exists and is not a repair-benchmark record: choose another --out-dir or --labels")
    quiet()
    from lad.generate import load
    from lad.sampling.common import eos_token_ids

    for run, label in zip(runs, labels):
        torch.manual_seed(0)
        denoiser, tokenizer = load(run)
        chat_template = denoiser.info.chat_template
        refs = references(out / "references.json", denoiser, tokenizer, chat_template, args)
        result = bench_run(denoiser, tokenizer, chat_template, refs, rates, passes,
                           eos_token_ids(tokenizer, denoiser), keeps=[float(k) for k in args.keep.split(",")],
                           replace_from=args.replace_from, with_=args.polish_with, doubt=args.polish_doubt)
        info = denoiser.info
        record = {"label": label, "run": run, "command": command_line("eval/bench_refine.py", argv),
                  "environment": environment(), "references": len(refs), "rates": rates, "passes": passes,
                  "objective": info.objective, "attention": info.attention, "step": info.step,
                  "replace_from": args.replace_from, "polish_with": args.polish_with, **result}
        if args.polish_with != "denoiser":  # records before 2026-12-08 filled every flagged slot at once
            record.update(polish_order="left_to_right", polish_doubt=args.polish_doubt)
        write_record(out / f"{label}.json", record)
        print(table([record], 0.1 if 0.1 in rates else rates[0]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
