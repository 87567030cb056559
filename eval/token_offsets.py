"""Where a block-causal run loses log-likelihood against its parent: every continuation token of a task's
requests scored by both (the run exactly left to right, `score_blocks`; the parent, `score_ar`), then the
per-token difference grouped by the token's offset inside its block, by its block, and what each group costs
in accuracy (the run's accuracy with the parent's terms put back at that group only).

    python -m eval.token_offsets --run runs/smollm2_135m_block_pkl --label block_pkl --task hellaswag

Writes eval/results/token_offsets/<label>_<task>_<limit|all>.json (the summary; the per-token terms stay out of
git) and prints the table. Issue 33: which tokens make HellaSwag's long endings cost a block run accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import RESULTS, cell, command_line, environment, write_record  # noqa: E402

OUT = RESULTS / "token_offsets"


def requests_of(lm, task_name: str, data_dir: str, limit: int | None):
    """[(doc_id, choice, gold, context ids, continuation ids)] of a multiple-choice task, as lm-eval builds and
    `LadLM` tokenizes and fits them."""
    from lad.scoring.tasks import load_offline_tasks

    (task,) = load_offline_tasks([task_name], data_dir)
    task.build_all_requests(limit=limit)
    out = []
    for inst in task.instances:
        context, continuation = lm._fit(*lm._encode_pair(*inst.args))
        out.append((inst.doc_id, inst.idx, int(task.doc_to_target(inst.doc)), context, continuation))
    return out


def accuracy(requests, terms) -> float:
    """acc (argmax of summed log-likelihood) over the documents, from per-request token terms."""
    best: dict = {}
    for (doc, choice, gold, *_), t in zip(requests, terms):
        value = float(np.sum(t))
        if doc not in best or value > best[doc][0]:
            best[doc] = (value, choice == gold)
    return float(np.mean([hit for _, hit in best.values()]))


def tags_of(continuation_len: int, block: int) -> list[tuple[int, int, bool]]:
    """(offset inside block, block index, in the continuation's last block) of each continuation token; the last
    block's masks show where the continuation ends."""
    last = (continuation_len - 1) // block
    return [(i % block, i // block, i // block == last) for i in range(continuation_len)]


def summarize(requests, lad, parent, block: int) -> dict:
    """Per-token Δ (run − parent) by offset, by block and last block vs earlier, gold endings apart; and the
    accuracy with the parent's terms substituted at one such group at a time."""
    tags = [tags_of(len(m), block) for m in lad]  # once per request, for every grouping below

    def substituted(pick) -> float:
        return accuracy(requests, [[pi if pick(*t) else mi for t, mi, pi in zip(ts, m, p)]
                                   for ts, m, p in zip(tags, lad, parent)])

    def table(key) -> dict:
        cells: dict = {}
        for (doc, choice, gold, *_), ts, m, p in zip(requests, tags, lad, parent):
            for t, mi, pi in zip(ts, m, p):
                cells.setdefault(key(*t), {"gold": [], "other": []})["gold" if choice == gold else "other"].append(mi - pi)
        return {str(k): {"tokens": len(v["gold"]) + len(v["other"]),
                         "delta_gold": round(float(np.mean(v["gold"])), 4) if v["gold"] else None,
                         "delta_other": round(float(np.mean(v["other"])), 4) if v["other"] else None}
                for k, v in sorted(cells.items())}

    blocks = sorted({t[1] for ts in tags for t in ts})
    return {"acc_run": accuracy(requests, lad), "acc_parent": accuracy(requests, parent),
            "by_offset": table(lambda o, b, last: o), "by_block": table(lambda o, b, last: min(b, 3)),
            "by_last_block": table(lambda o, b, last: "last" if last else "earlier"),
            "acc_parent_at_offset": {str(o): substituted(lambda oo, _b, _l, o=o: oo == o) for o in range(block)},
            "acc_parent_at_block": {str(b): substituted(lambda _o, bb, _l, b=b: bb == b) for b in blocks[:4]},
            "acc_parent_at_last_block": {name: substituted(lambda _o, _b, last, want=name == "last": last == want)
                                         for name in ("earlier", "last")},
            "acc_parent_except_offset0": substituted(lambda oo, _b, _l: oo != 0)}


def signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def print_table(summary: dict, block: int) -> None:
    print(f"acc: run {summary['acc_run']:.3f}, parent {summary['acc_parent']:.3f}")
    print("| offset | tokens | Δ nats/token, gold | Δ, other endings | acc with parent's terms here |")
    print("|---|---|---|---|---|")
    for o in range(block):
        row = summary["by_offset"][str(o)]
        print(f"| {o} | {row['tokens']} | {signed(row['delta_gold'])} | {signed(row['delta_other'])} | "
              f"{summary['acc_parent_at_offset'][str(o)]:.3f} |")
    print("| block | tokens | Δ gold | Δ other | acc with parent's terms here |")
    print("|---|---|---|---|---|")
    for b, row in summary["by_block"].items():
        acc = summary["acc_parent_at_block"].get(b)
        print(f"| {b}{'+' if b == '3' else ''} | {row['tokens']} | {signed(row['delta_gold'])} | "
              f"{signed(row['delta_other'])} | {cell(acc, '.3f')} |")
    for name in ("earlier", "last"):
        row, acc = summary["by_last_block"][name], summary["acc_parent_at_last_block"][name]
        print(f"| {name} block{'s' if name == 'earlier' else ''} | {row['tokens']} | {signed(row['delta_gold'])} | "
              f"{signed(row['delta_other'])} | {acc:.3f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a block-causal LAD run directory")
    ap.add_argument("--label", required=True)
    ap.add_argument("--task", default="hellaswag")
    ap.add_argument("--limit", type=int, default=None, help="first N documents (default: all)")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "eval"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dump", help="also write every request's token terms here (JSON; large, not for git)")
    ap.add_argument("--from-dump", help="summarize the terms a --dump wrote instead of scoring again")
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from lad.scoring import score_ar
    from lad.scoring.blocks import score_blocks
    from lad.scoring.harness import LadLM

    lm = LadLM(pretrained=args.run)
    if lm.denoiser.block_size is None:
        raise SystemExit(f"--run {args.run}: not a block-causal run (token offsets need blocks)")
    started, lad, parent = time.perf_counter(), [], []
    if args.from_dump:  # the terms of an earlier pass: only the summary is recomputed
        rows = json.loads(Path(args.from_dump).read_text())
        requests, lad, parent = [tuple(r[:3]) for r in rows], [r[3] for r in rows], [r[4] for r in rows]
    else:
        requests = requests_of(lm, args.task, args.data_dir, args.limit)
        pairs = [(c, x) for *_, c, x in requests]
        with tqdm(total=2 * len(pairs), desc="score") as bar:
            score_blocks(lm.denoiser, pairs, batch_size=args.batch_size, progress=bar.update, per_token=lad)
            score_ar(lm.denoiser, pairs, batch_size=args.batch_size, progress=bar.update, per_token=parent)
    if args.dump and not args.from_dump:
        Path(args.dump).write_text(json.dumps([[r[0], r[1], r[2], m, p] for r, m, p in zip(requests, lad, parent)]))
    summary = summarize(requests, lad, parent, lm.denoiser.block_size)
    print_table(summary, lm.denoiser.block_size)
    target = OUT / f"{args.label}_{args.task}_{args.limit or 'all'}.json"
    seconds, command = round(time.perf_counter() - started, 1), command_line("-m eval.token_offsets", argv)
    if args.from_dump:  # the scoring pass's time and command, if its record is there
        earlier = json.loads(target.read_text()) if target.is_file() else {}
        seconds, command = earlier.get("wall_s"), earlier.get("command", command)
    record = {"run": args.run, "label": args.label, "task": args.task, "limit": args.limit,
              "documents": len({r[0] for r in requests}), "block_size": lm.denoiser.block_size,
              "wall_s": seconds, "command": command,
              **summary, **environment()}
    write_record(target, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
