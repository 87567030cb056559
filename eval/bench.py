"""Run every benchmark of issue 5 and rewrite the benchmark section of docs/results.md from their records.

    python -m eval.bench                         # real measurement on SmolLM2-135M (untrained bidirectional)
    python -m eval.bench --model runs/NAME       # the same on a trained run
    python -m eval.bench --quick                 # tiny sizes, seconds to minutes: proves the pipeline works
    python -m eval.bench --only quality --model runs/NAME   # one part; the section keeps the others' records
    python -m eval.bench --report                # run nothing: rebuild the section from the saved records

Each benchmark runs in its own process (`python -m eval.NAME`, so its peak RSS is its own) and writes its JSON
record under eval/results/ (eval/results/quick/ with --quick). The section between `<!-- bench:start -->` and
`<!-- bench:end -->` of docs/results.md is then rebuilt from those records: machine, versions, date, command,
medians, the ratios against issue 5's targets and whether each is met. Everything outside the markers is left
byte for byte. --quick touches the docs only when --results-md is given. Run it on an otherwise idle machine.
Parts not run this time are reported from the records they left, so the suite can be spread over sessions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import RESULTS, ROOT, cell, splice_file  # noqa: E402

# about 2 hours on 2 idle CPU cores: train ~12 min, sampling ~35, scoring ~45 (elbo-128), quality ~20
FULL = {
    "train": ["--recipe", "recipes/smollm2_135m_corpora.yaml", "--steps", "20", "--skip", "3", "--rss"],
    "sampling": ["--prompt-set", "builtin", "--prompts", "4", "--max-new-tokens", "128", "--iters", "64",
                 "--block-length", "32", "--batch-size", "1", "--repeats", "3", "--warmup", "1",
                 "--thresholds", "0.9", "0.7", "0.5", "--block-cache"],
    "scoring": ["--tasks", "arc_easy", "--limit", "100", "--iters", "16", "--mc-samples", "128"],
    "quality": ["--prompts", "16", "--max-new-tokens", "64", "--iters", "8", "16", "32", "64"],
}
QUICK = {
    "train": ["--recipe", "recipes/tiny.yaml", "--steps", "4", "--skip", "1", "--rss", "--rss-steps", "2"],
    "sampling": ["--prompt-set", "builtin", "--prompts", "2", "--max-new-tokens", "16", "--iters", "4",
                 "--block-length", "8", "--repeats", "1", "--warmup", "0", "--thresholds", "0.9", "0.5", "--block-cache"],
    "scoring": ["--limit", "2", "--iters", "4", "--mc-samples", "8", "--bootstrap-iters", "0"],
    "quality": ["--prompts", "2", "--max-new-tokens", "16", "--iters", "2", "4"],
}
SCRIPTS = {"train": "bench_train_vs_peft", "sampling": "bench_sampling", "scoring": "bench_scoring",
           "quality": "gen_quality"}
OUTPUTS = {"train": "train_vs_peft.json", "sampling": "generation_bench.json", "scoring": "scoring_bench_128.json",
           "quality": "gen_quality.json"}


def run_all(names: list[str], settings: dict, out_dir: Path, model: str | None, plot: Path) -> dict:
    """Each benchmark in its own process; {name: its record}."""
    records = {}
    for name in names:
        args = list(settings[name]) + ["--out", rel(out_dir / OUTPUTS[name])]
        if model and name != "train":
            args += ["--model", model]
        if name == "quality":
            args += ["--plot", rel(plot)]
        cmd = [sys.executable, "-m", f"eval.{SCRIPTS[name]}", *args]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.perf_counter()
        code = subprocess.run(cmd, cwd=ROOT).returncode
        if code != 0:
            raise SystemExit(f"{name} failed with exit status {code}")
        records[name] = json.loads((out_dir / OUTPUTS[name]).read_text(encoding="utf-8"))
        records[name]["bench_wall_s"] = time.perf_counter() - started
        print(f"=== {name}: {records[name]['bench_wall_s']:.0f} s", flush=True)
    return records


def saved_records(out_dir: Path, skip: dict) -> dict:
    """Records an earlier run left (the section covers every part measured so far, so the 2-hour suite can be
    run one part at a time); each part's paragraph names its own command and the header its dates."""
    found = {}
    for name, file in OUTPUTS.items():
        if name not in skip and (out_dir / file).is_file():
            found[name] = json.loads((out_dir / file).read_text(encoding="utf-8"))
    return found


def rel(path: Path) -> str:
    """A path as the recorded command should show it: relative to the repository (the children's cwd)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def peak_rss(record: dict) -> str:
    """The work's peak RSS; records made before the peak was reset after loading hold the whole process's."""
    load = record.get("load_peak_rss_mb")
    return (f"{record['peak_rss_mb']:,.0f} MB" + (f" (loading: {load:,.0f} MB)" if load is not None
                                                  else " (whole process: loading included)"))


def verdict(met: bool | None) -> str:
    return "**met**" if met else ("not met" if met is not None else "not measured")


def targets(records: dict) -> tuple[list[str], dict]:
    """Rows of the targets table and the verdicts, from the records."""
    rows, met = [], {}
    if "train" in records:
        r = records["train"]["results"]
        ratio = r["ratios"]["lad_vs_peft"]
        met["train"] = ratio >= 1.3
        rows.append(f"| training tokens/s, LAD vs plain PEFT LoRA | {ratio:.2f}× (same batches "
                    f"{r['ratios']['lad_vs_peft_same_batches']:.2f}×, padding alone "
                    f"{r['ratios']['padding_effect_peft_same_vs_peft']:.2f}×) | ≥ 1.3× | {verdict(met['train'])} |")
    if "sampling" in records:
        res = records["sampling"]["results"]
        rows_t = {k: v for k, v in res.items() if k.startswith("threshold") and "+pc" not in k}
        ok = {k: (v["latency_vs_ar"] or 0) >= 2 and v.get("ppl_vs_ar") is not None and v["ppl_vs_ar"] <= 1.2
              for k, v in rows_t.items()}
        best = max(rows_t, key=lambda k: (ok[k], rows_t[k]["latency_vs_ar"] or 0)) if rows_t else None
        met["sampling"] = any(ok.values()) if rows_t else None
        if best:
            b = rows_t[best]
            rows.append(f"| generation wall-clock vs HF `generate` + KV cache, "
                        f"{records['sampling']['settings']['max_new_tokens']} new tokens | {best}: "
                        f"{b['latency_vs_ar']:.2f}× AR's speed at {cell(b.get('ppl_vs_ar'), '.3g')}× AR's parent "
                        f"perplexity | ≥ 2× at ≤ 1.2× | {verdict(met['sampling'])} |")
    if "scoring" in records:
        res = records["scoring"]["results"]
        if "denoise" in res and "elbo" in res:
            d = res["denoise"]
            met["scoring"] = d["speed_vs_elbo"] >= 10 and d["acc_minus_elbo"] is not None \
                and abs(d["acc_minus_elbo"]) <= 0.01
            rows.append(f"| MC scoring docs/s, `denoise` vs `elbo`-{records['scoring']['settings']['mc_samples']} | "
                        f"{d['speed_vs_elbo']:.1f}×, acc {d['acc_minus_elbo']:+.3f} (same answer on "
                        f"{cell(d['agreement_with_elbo'], '.0%')} of docs) | ≥ 10× at ± 0.010 | "
                        f"{verdict(met['scoring'])} |")
    return rows, met


def section(records: dict, command: str, quick: bool) -> str:
    """The markdown between the bench markers."""
    any_record = next(iter(records.values()))
    v, m = any_record["versions"], any_record["machine"]
    dates = sorted({r["date"][:10] for r in records.values()})
    platforms = sorted({r["machine"]["platform"] for r in records.values()})  # parts may run on different hosts
    lmeval = records.get("scoring", {}).get("versions", {}).get("lm_eval", "-")
    lines = []
    if quick:
        lines += ["**Quick smoke run (`--quick`): tiny sizes; these numbers prove the pipeline runs and mean "
                  "nothing about speed or quality.**", ""]
    lines += [f"Measured {' and '.join(dates)} on {' and '.join(platforms)} ({m['cpus']} CPUs, {m['memory_gib']} GiB, "
              f"{m['threads']} torch threads{', GPU ' + m['gpu'] if m['gpu'] else ''}); LAD {v['lad']}, torch "
              f"{v['torch']}, transformers {v['transformers']}, peft {v['peft']}, lm-eval {lmeval}, Python "
              f"{v['python']}. Last command: `{command}`; each part names its own below (`--only NAME` reruns one "
              f"part, `--report` rebuilds this section from the records). Records: "
              f"`eval/results/{'quick/' if quick else ''}{{{', '.join(OUTPUTS[n] for n in records)}}}`.", ""]
    rows, _ = targets(records)
    lines += ["| target (issue 5) | measured (medians, one interleaved run) | target | verdict |", "|---|---|---|---|",
              *rows, ""]
    if "train" in records:
        lines += _train_lines(records["train"])
    if "sampling" in records:
        lines += _sampling_lines(records["sampling"])
    if "scoring" in records:
        lines += _scoring_lines(records["scoring"])
    if "quality" in records:
        lines += _quality_lines(records["quality"], quick)
    return "\n".join(lines)


def _train_lines(rec: dict) -> list[str]:
    """The training part: tokens/s and peak RSS per arm."""
    lines = [f"**Training** (`{rec['command']}`): {rec['recipe']}, {rec['settings']['steps']} measured steps per "
              f"arm after {rec['settings']['skip']} warm-up rounds, round robin. Real (non-padding) tokens per "
              "second; peak RSS of each arm alone in its own process, during its training steps (the loading's own peak "
              "apart).", "",
              "| arm | tokens/s (median) | s/step | real/padded tokens | peak RSS alone |", "|---|---|---|---|---|"]
    alone = rec["results"].get("rss_alone", {})
    for arm, r in rec["results"]["arms"].items():
        rss = peak_rss(alone[arm]) if arm in alone else "-"
        lines.append(f"| {arm} | {r['median_tokens_per_s']:,.1f} | {r['median_s_per_step']:.3f} | "
                     f"{r['real_per_padded_token']:.2f} | {rss} |")
    lines += ["", "`lad`: finetune.py's step on its length-grouped batches; `peft`: `model(input_ids, attention_mask, "
              "labels)` on shuffled batches padded to the longest; `peft_same`: the PEFT step on LAD's batches.", ""]
    return lines


def _sampling_lines(rec: dict) -> list[str]:
    """The generation part: speed and the parent-judged quality per method."""
    s = rec["settings"]
    lines = [f"**Generation** (`{rec['command']}`): {rec['model']}; {s['prompts']} prompts, batch "
              f"{s['batch_size']}, {s['max_new_tokens']} new tokens, iters {s['iters']}, greedy, median of "
              f"{s['repeats']} round-robin repeats; answers scored by the AR parent's perplexity. Peak RSS "
              f"{peak_rss(rec)}.", "",
              "| method | s/prompt | latency vs AR | NFE | answer tokens | parent ppl | ppl vs AR | distinct-1 | "
              "distinct-2 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rec["results"].items():
        q = r.get("quality", {})
        lines.append(f"| {name} | {r['median_s_per_prompt']:.2f} | {cell(r['latency_vs_ar'], '.2f')}× | "
                     f"{r['median_nfe_per_batch']:.0f} | {r['mean_answer_tokens']:.1f} | "
                     f"{cell(q.get('parent_ppl'), '.4g')} | {cell(r.get('ppl_vs_ar'), '.3g')}× | "
                     f"{cell(q.get('distinct_1'), '.3f')} | {cell(q.get('distinct_2'), '.3f')} |")
    cached = {name: r for name, r in rec["results"].items() if name.endswith("+bc") and r.get("agreement")}
    if cached:
        lines += ["", "`+bc`: the same sampler with the block cache (Fast-dLLM's dual cache, docs/sampling.md); "
                  "against the row without it: " + "; ".join(
                      f"{name} {r['speedup_vs_uncached']:.2f}× faster, {r['agreement']['identical_tokens']:.0%} "
                      f"of answer tokens identical" for name, r in cached.items()) + "."]
    lines.append("")
    return lines


def _scoring_lines(rec: dict) -> list[str]:
    """The scoring part: accuracy and speed per mode."""
    s = rec["settings"]
    lines = [f"**Scoring** (`{rec['command']}`): {rec['model']}; {', '.join(s['tasks'])}, first {s['limit']} "
              f"documents, stock zero-shot prompts. Peak RSS {peak_rss(rec)}.", "",
              "| mode | acc | acc_norm | docs/s | NFE/doc | vs AR | vs elbo | same answer as elbo |",
              "|---|---|---|---|---|---|---|---|"]
    task = s["tasks"][0]
    for r in rec["results"].values():
        metric = r["metrics"].get(task, {})
        acc, norm = (metric.get(k, {}).get("value") for k in ("acc", "acc_norm"))
        lines.append(f"| {r['label']} | {cell(acc, '.3f')} | {cell(norm, '.3f')} | {r['docs_per_s']:.3f} | "
                     f"{r['nfe_per_doc']:.1f} | {cell(r['speed_vs_ar'], '.3f')}× | "
                     f"{cell(r['speed_vs_elbo'], '.2f')}× | {cell(r['agreement_with_elbo'], '.0%')} |")
    lines += ["", f"At {s['limit']} documents each accuracy carries about ±{(0.25 / s['limit']) ** 0.5:.2f}: "
              "the ±1-point part of the target is judged from the per-document agreement as much as from "
              "the accuracies.", ""]
    return lines


def _quality_lines(rec: dict, quick: bool) -> list[str]:
    """The generation-quality sweep: perplexity and distinct-2 against iterations."""
    s = rec["settings"]
    lines = [f"**Generation quality vs iterations** (`{rec['command']}`): {rec['model']}; {s['prompts']} "
              f"prompts from {rec['prompt_source']}, {s['max_new_tokens']} new tokens, greedy. AR parent: "
              f"ppl {cell(rec['ar']['parent_ppl'], '.4g')}, distinct-2 {cell(rec['ar']['distinct_2'], '.3f')}, "
              f"{rec['ar']['s_per_prompt']:.2f} s/prompt.", "",
              "| strategy | " + " | ".join(f"iters {i}" for i in s["iters"]) + " |",
              "|---|" + "---|" * len(s["iters"])]
    for label, rows in rec["sweep"].items():
        lines.append(f"| {label} (ppl / distinct-2 / s per prompt) | " + " | ".join(
            f"{cell(r['parent_ppl'], '.4g')} / {cell(r['distinct_2'], '.2f')} / {r['s_per_prompt']:.2f}"
            for r in rows) + " |")
    if not quick:
        lines += ["", "![parent perplexity and distinct-2 against iterations](img/gen_quality.png)"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="RUN_DIR", help="a trained LAD run (default: untrained bidirectional "
                        "SmolLM2-135M-Instruct; training always uses recipes/smollm2_135m_corpora.yaml)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the whole pipeline")
    parser.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS), help="a subset")
    parser.add_argument("--results-md", help="the file whose bench section to rewrite (default: docs/results.md; "
                        "with --quick: none unless given)")
    parser.add_argument("--no-docs", action="store_true", help="write the records only")
    parser.add_argument("--report", action="store_true", help="run nothing: rebuild the section from the records "
                        "already in eval/results/")
    args = parser.parse_args(argv)
    out_dir = RESULTS / "quick" if args.quick else RESULTS
    plot = out_dir / "gen_quality.png" if args.quick else ROOT / "docs" / "img" / "gen_quality.png"
    command = "python -m eval.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    records = {} if args.report else run_all(args.only, QUICK if args.quick else FULL, out_dir, args.model, plot)
    records = {**saved_records(out_dir, skip=records), **records}
    if not records:
        parser.error(f"no benchmark records in {out_dir} to report; run the benchmarks first")
    records = {name: records[name] for name in SCRIPTS if name in records}  # the section's fixed order
    body = section(records, command.strip(), args.quick)
    print("\n" + body)
    target = args.results_md or (None if args.quick else str(ROOT / "docs" / "results.md"))
    if target and not args.no_docs:
        splice_file(target, body)
        print(f"\nrewrote the bench section of {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
