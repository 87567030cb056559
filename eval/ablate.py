"""Ablations of the levers that keep what the AR parent knows (issue 11), at one fixed training budget.

    python -m eval.ablate --steps 80 --variants mask,both,distill,suffix,anneal,shift --tasks arc_easy --limit 200
    python -m eval.ablate --variants prompt_causal,prompt_causal_mask          # the prompt read causally
    python -m eval.ablate --variants mixed,structural,rank4,attn_only,distilled,corpora_distilled   # issue 5's rows
    python -m eval.ablate --steps 40 --variants block4,block8,block16,block32,block4_nokl,block8_complementary,\
        block8_pkl
    python -m eval.ablate --variants prompt_causal_mask,pc_structural,pc_mixed,pc_repair,pc_draft,pc_draft_local,pc_draft_local_parent,pc_draft_local_w4,pc_draft_local_hour,pc_draft_local_320,block4_draft_local_hour,pc_draft_parent,pc_structural_noshift --tasks none --quality 0  # issue 31

Each variant trains recipes/smollm2_135m_corpora.yaml with the same data, seed and steps plus its overrides (runs/ablate/),
then is scored with `lad-eval --iters 16` in both reveal orders on the local dev splits; the AR parent is scored
once with the same prompts. Each variant's answers to the first 32 built-in prompts are then judged by the AR
parent's perplexity and distinct-2 (`--quality N`, eval/gen_quality.py), so that a lever cannot buy likelihood
with worse generation unnoticed. Results land in eval/results/ablation/ (small JSON files: the commands, wall times,
validation losses and scores) and `summary.json` collects them. A variant (or score) whose result file exists is
skipped, so an interrupted sweep continues where it stopped and later sessions add variants without rerunning.
`python -m eval.ablation_report` turns the summary into the table and plot of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from eval.common import run_logged, score_task  # noqa: E402

RESULTS = REPO / "eval" / "results" / "ablation"
RUNS = REPO / "runs" / "ablate"
RECIPE = "recipes/smollm2_135m_corpora.yaml"
DATA_DIR = "../shared/data/eval"

# the built-in prompts answered by the AR parent (the hour run's settings, so its cached answers are reused)
DISTILLED = "{path: builtin, distill: {max_new_tokens: 128, limit: null}}"

# the levers, each on top of the plain absorbing-mask objective
VARIANTS = {
    "mask": [],
    "suffix": ["noise.suffix_share=0.5"],
    "distill": ["distill_weight=1.0"],
    "both": ["noise.suffix_share=0.5", "distill_weight=1.0"],
    "anneal": ["noise.suffix_share=0.5", "distill_weight=1.0", "anneal_steps={half}"],
    "shift": ["noise.suffix_share=0.5", "distill_weight=1.0", "shift=true"],
    # the prompt read causally (docs/model.md): on the `shift` row, and on the plain objective with the shift
    "prompt_causal": ["noise.suffix_share=0.5", "distill_weight=1.0", "shift=true", "attention=prompt_causal"],
    "prompt_causal_mask": ["shift=true", "attention=prompt_causal"],
    "mixed": ["noise.objective=mixed"],
    "structural": ["noise.objective=structural"],
    # issue 5's rows, on `prompt_causal_mask`: LoRA rank and targets, and the data source (the parent's own
    # answers to the built-in prompts, distilled once and cached, instead of or besides the shared corpora)
    "rank4": ["shift=true", "attention=prompt_causal", "lora.r=4", "lora.alpha=8"],
    "attn_only": ["shift=true", "attention=prompt_causal", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"],
    "distilled": ["shift=true", "attention=prompt_causal", f"data.train=[{DISTILLED}]"],
    "corpora_distilled": ["shift=true", "attention=prompt_causal", f"data.train.2={DISTILLED}"],
    # issue 29: block-causal attention (every block in one pass) by block size, with and without the levers; a
    # one-pass step reads the answer twice (three times with complementary copies), so compare at equal time too
    **{f"block{b}": ["shift=true", "attention=block_causal", f"block_size={b}", "noise.suffix_share=0.5",
                     "distill_weight=1.0"] for b in (4, 8, 16, 32)},
    # block4 (the chosen size) without the KL toward the parent: what that lever buys under block-causal attention
    "block4_nokl": ["shift=true", "attention=block_causal", "block_size=4", "noise.suffix_share=0.5"],
    "block8_complementary": ["shift=true", "attention=block_causal", "block_size=8", "noise.complementary=true",
                             "distill_weight=1.0"],
    # block8 with the prompt held to the parent (prompt_distill_weight, the lever that closed MMLU's gap)
    "block8_pkl": ["shift=true", "attention=block_causal", "block_size=8", "noise.suffix_share=0.5",
                   "distill_weight=1.0", "prompt_distill_weight=10"],
    # issue 31: what the structural schedule buys, on `prompt_causal_mask` (the control): the objectives alone,
    # then a schedule that spends more of the budget on edits than on masks
    "pc_structural": ["shift=true", "attention=prompt_causal", "noise.objective=structural"],
    "pc_mixed": ["shift=true", "attention=prompt_causal", "noise.objective=mixed"],
    "pc_repair": ["shift=true", "attention=prompt_causal", "noise.objective=structural", "noise.mask_rate=0.5",
                  "noise.replace_rate=0.3", "noise.swap_rate=0.2", "noise.duplicate_rate=0.1",
                  "noise.span_shift_rate=0.1"],
    # pc_repair's edits, but half the structural rows are drafts (edits, no masks): the input a polish pass reads,
    # which the tied schedule never shows (its 10% edits come only at t = 1, where every token is masked)
    "pc_draft": ["shift=true", "attention=prompt_causal", "noise.objective=structural", "noise.draft_share=0.5",
                 "noise.replace_rate=0.3", "noise.swap_rate=0.2", "noise.duplicate_rate=0.1",
                 "noise.span_shift_rate=0.1"],
    # pc_draft without the positional edits (a duplication or span shift makes every later slot "wrong" for a
    # positional target, which teaches the model not to copy what it is shown): replacements and swaps only
    "pc_draft_local": ["shift=true", "attention=prompt_causal", "noise.objective=structural", "noise.draft_share=0.5",
                       "noise.replace_rate=0.3", "noise.swap_rate=0.2", "noise.duplicate_rate=0",
                       "noise.span_shift_rate=0"],
    # pc_draft_local with the parent's likeliest wrong tokens as its replacements
    "pc_draft_local_parent": ["shift=true", "attention=prompt_causal", "noise.objective=structural",
                              "noise.draft_share=0.5", "noise.replace_rate=0.3", "noise.swap_rate=0.2",
                              "noise.duplicate_rate=0", "noise.span_shift_rate=0", "noise.replace_from=parent"],
    # pc_draft_local with a wrong token's loss weighted 4x a right one's: the repairs of a draft row (~15% of its
    # slots) against its copies
    "pc_draft_local_w4": ["shift=true", "attention=prompt_causal", "noise.objective=structural",
                          "noise.draft_share=0.5", "noise.replace_rate=0.3", "noise.swap_rate=0.2",
                          "noise.duplicate_rate=0", "noise.span_shift_rate=0", "noise.wrong_weight=4"],
    # pc_draft_local on the one-hour budget (160 steps, as recipes/smollm2_135m_hour.yaml), where issue 31's target
    # is set: does the frontier of repairs against damage move with training?
    "pc_draft_local_hour": ["max_steps=160", "shift=true", "attention=prompt_causal", "noise.objective=structural",
                            "noise.draft_share=0.5", "noise.replace_rate=0.3", "noise.swap_rate=0.2",
                            "noise.duplicate_rate=0", "noise.span_shift_rate=0"],
    # the same at twice the one-hour budget (320 steps, about 35 CPU-minutes): 80 → 160 steps moved the frontier
    # (more repairs and half the damage); does it keep moving?
    "pc_draft_local_320": ["max_steps=320", "shift=true", "attention=prompt_causal", "noise.objective=structural",
                           "noise.draft_share=0.5", "noise.replace_rate=0.3", "noise.swap_rate=0.2",
                           "noise.duplicate_rate=0", "noise.span_shift_rate=0"],
    # pc_draft_local_hour's schedule on the block-causal layout (blocks of 4; edits stay inside their block): does
    # reading a block against clean earlier blocks change what a polish pass repairs or damages?
    "block4_draft_local_hour": ["max_steps=160", "shift=true", "attention=block_causal", "block_size=4",
                                "noise.objective=structural", "noise.draft_share=0.5", "noise.replace_rate=0.3",
                                "noise.swap_rate=0.2", "noise.duplicate_rate=0", "noise.span_shift_rate=0"],
    # pc_structural without the shift: slot j read at its own position, where copying a right token is the
    # identity (under the shift it must be read from position j-1, whose pretrained guess is the next token)
    "pc_structural_noshift": ["shift=false", "attention=prompt_causal", "noise.objective=structural"],
    # pc_draft with the parent's plausible mistakes as replacements instead of random answer tokens
    "pc_draft_parent": ["shift=true", "attention=prompt_causal", "noise.objective=structural",
                        "noise.draft_share=0.5", "noise.replace_rate=0.3", "noise.swap_rate=0.2",
                        "noise.duplicate_rate=0.1", "noise.span_shift_rate=0.1", "noise.replace_from=parent"],
}


def train(name: str, overrides: list[str], steps: int, need_weights: bool = True) -> dict:
    """Train a variant once (its record says how it went). A later sweep that asks for new scores of a variant
    whose weights are gone (runs/ does not outlive a machine) trains it again: same recipe, data and seed, so
    the rerun must land on the first run's validation losses, which the record then confirms."""
    folder = RESULTS / name
    done = folder / "train.json"
    out = RUNS / name
    first = json.loads(done.read_text()) if done.is_file() else None
    if first and (not need_weights or (out / "adapter_model.safetensors").is_file()):
        return first
    folder.mkdir(parents=True, exist_ok=True)
    steps = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("max_steps=")), steps)  # its own budget
    overrides = [o for o in overrides if not o.startswith("max_steps=")]
    cmd = ["lad-finetune", RECIPE, f"max_steps={steps}", "noise.objective=mask", f"eval_every={steps // 2}",
           "save_every=0", f"output_dir={out}", "overwrite=true",
           *[o.replace("{half}", str(steps // 2)) for o in overrides]]
    seconds = run_logged(cmd, folder / "train.log")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    record = {"variant": name, "command": shlex.join(cmd), "wall_s": round(seconds, 1), "steps": steps,
              "date": time.strftime("%Y-%m-%d"),
              "tokens": max(m.get("tokens", 0) for m in metrics),
              "val": [{k: m[k] for k in m if k.startswith("val_") or k == "step"} for m in metrics
                      if "val_loss" in m],
              "train_loss": [m["loss"] for m in metrics if "loss" in m]}
    if first:  # a rerun for new scores: keep how the first run went (not an earlier rerun), and whether this one reproduced it
        record["first_run"] = first.get("first_run") or {k: first.get(k) for k in ("wall_s", "val", "date")}
        record["reproduced_val"] = ([v.get("val_loss") for v in record["first_run"]["val"]]
                                    == [v.get("val_loss") for v in record["val"]])
    done.write_text(json.dumps(record, indent=2) + "\n")
    return record


def score(name: str, model: Path, task: str, order: str, limit: int, baseline: bool = False) -> dict:
    return score_task(RESULTS / name, name, model, task, order, limit, baseline=baseline, data_dir=DATA_DIR)


def quality(name: str, model: Path, prompts: int = 32) -> dict:
    """The levers must not buy likelihood with worse generation: answers to the first `prompts` built-in
    prompts (confidence sampler, 16 iterations, 64 new tokens, greedy) judged by the AR parent's perplexity
    and distinct-2 (eval/gen_quality.py), with the parent's own answers as the reference."""
    folder = RESULTS / name
    target = folder / "gen_quality.json"
    if not target.is_file():
        raw = folder / ".gen_quality.raw.json"
        cmd = [sys.executable, "eval/gen_quality.py", "--model", str(model), "--prompts", str(prompts),
               "--strategies", "confidence", "--iters", "16", "--max-new-tokens", "64", "--out", str(raw),
               "--plot", ""]
        seconds = run_logged(cmd, folder / "gen_quality.log")
        full = json.loads(raw.read_text())
        keep = ("parent_ppl", "distinct_1", "distinct_2", "mean_answer_tokens", "empty_answers", "s_per_prompt")
        record = {"variant": name, "command": shlex.join(cmd).replace(sys.executable, "python"),
                  "wall_s": round(seconds, 1), "prompts": prompts,
                  "lad": {k: full["sweep"]["confidence"][0][k] for k in keep}, "ar": {k: full["ar"][k] for k in keep},
                  "lad_texts": full["sweep"]["confidence"][0]["texts"][:4]}
        target.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        raw.unlink()
    return json.loads(target.read_text())


def versions() -> dict:
    import importlib.metadata as md

    return {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            **{p: md.version(p) for p in ("torch", "transformers", "peft", "lm_eval")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--variants", default="mask,both,distill,suffix,anneal,shift")
    p.add_argument("--tasks", default="arc_easy", help="comma-separated lm-eval tasks, or none (train only)")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--orders", default="confidence,l2r")
    p.add_argument("--quality", type=int, default=32, metavar="N",
                   help="judge each variant's answers to N built-in prompts by the parent's perplexity (0: off)")
    args = p.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    tasks = [] if args.tasks == "none" else args.tasks.split(",")  # none: train only (eval/bench_refine.py)
    orders = args.orders.split(",")
    summary_path = RESULTS / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"variants": {}, "parent": {}}
    summary.update(versions=versions(), recipe=RECIPE, data_dir=DATA_DIR, variant_overrides=VARIANTS)

    def save():
        RESULTS.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    def missing(name: str) -> bool:  # does this sweep still need the variant's weights?
        files = [f"{t}_{o}.json" for t in tasks for o in orders] + (["gen_quality.json"] if args.quality else [])
        return not all((RESULTS / name / f).is_file() for f in files)

    first = RUNS / names[0]
    for task in tasks:  # the parent: same prompts, adapter off, causal attention
        if task not in summary["parent"]:
            train(names[0], VARIANTS[names[0]], args.steps)
            summary["parent"][task] = score("parent", first, task, "confidence", args.limit, baseline=True)
            save()
    for name in names:
        entry = summary["variants"].setdefault(name, {"scores": {}})
        entry["train"] = train(name, VARIANTS[name], args.steps, need_weights=missing(name) or not tasks)
        for task in tasks:
            for order in orders:
                entry["scores"][f"{task}/{order}"] = score(name, RUNS / name, task, order, args.limit)
                save()
        if args.quality:
            entry["quality"] = quality(name, RUNS / name, args.quality)
            summary["parent_quality"] = entry["quality"]["ar"]  # the same prompts and settings every time
            save()
        print(f"{name}: " + ", ".join(f"{k} {v['acc']:.3f}" for k, v in entry["scores"].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
