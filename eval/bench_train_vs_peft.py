"""Training tokens/s of LAD's step against a plain PEFT causal-LM LoRA step: same model, data, LoRA, optimizer.

Why: issue 5 asks whether LAD's step (logits only at the supervised tokens, length-grouped batches) beats what a
user would write with PEFT (full logits from `model(..., labels=...)`, shuffled batches padded to the longest).

Both arms start from the same base weights (loaded twice, so the bidirectional patch of one cannot reach the
other), the same LoRA config and seed, AdamW with the recipe's settings, and the examples LAD's data pipeline
encodes for the recipe. Three arms run round robin, one optimizer step each per round (the order rotates), so a
slow spell on a shared machine hits all alike; the first `--skip` rounds are warm-up:

    lad        finetune.py's own `train_step` (lad/training/step.py): corrupt (+ annealed attention) → Denoiser
               (LM head only at supervised tokens) → weighted CE (+ KL) → backward → clip → AdamW; batches in
               its length-grouped order (`Schedule`); one process, no autocast, the LR held constant
    peft       a plain PEFT step: causal model(input_ids, attention_mask, labels) on shuffled batches padded
               to the longest (labels -100 on prompt and padding) → backward → clip → AdamW
    peft_same  the PEFT step on LAD's batches, padded as LAD pads them: lad / peft_same isolates the
               LM-head-only-where-needed effect, peft_same / peft the padding effect

Reported: median real (non-padding) tokens/s per step of each arm and the ratios of the medians. With `--rss`
each of lad and peft also runs alone in a child process (`--only ARM`) that records its own peak RSS during the
training steps (the peak is reset after loading; the loading's own peak is kept apart as load_peak_rss_mb).

    python -m eval.bench_train_vs_peft                                  # recipes/smollm2_135m_corpora.yaml
    python -m eval.bench_train_vs_peft --recipe recipes/tiny.yaml --steps 6 --skip 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import (ROOT, command_line, environment, median, peak_rss_mb, quiet, reset_peak_rss,  # noqa: E402
                         rss_mb, write_record)

ARMS = ("lad", "peft", "peft_same")


def build(recipe, arm: str):
    """(model to train, optimizer, tokenizer, mask, examples): a fresh base, LoRA attached as finetune.py does."""
    from lad.modeling.denoiser import Denoiser
    from lad.training.build import add_trainable, build_optimizer, load_model
    from lad.training.data import load_data

    torch.manual_seed(recipe.seed)  # LoRA's random init: identical in both arms
    model, tokenizer, mask = load_model(recipe)
    examples, _ = load_data(recipe, tokenizer)
    torch.manual_seed(recipe.seed)
    model = add_trainable(model, recipe, mask)
    if arm == "lad":
        model = Denoiser(model, mask.id, recipe.shift, recipe.attention)
    model.train()
    return model, build_optimizer(recipe, model), tokenizer, mask, examples


def lad_stepper(denoiser, optimizer, recipe, tokenizer, mask):
    """`step(examples, index) -> real tokens`: finetune.py's `train_step` itself, so the arm cannot drift from
    training. One process (no DDP); mixed_precision "no" and a constant LR, as in the peft arm: both run in the
    loaded dtype, and the rate does not change a step's work."""
    from accelerate import Accelerator

    from lad.training.data import TokenIds
    from lad.training.step import train_step

    accelerator = Accelerator(cpu=next(denoiser.parameters()).device.type == "cpu", mixed_precision="no")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ids = TokenIds.of(tokenizer, mask.id)

    def step(examples, index: int) -> int:
        outcome = train_step(accelerator, denoiser, optimizer, scheduler, recipe, examples, index, ids)
        return outcome.stats.input_tokens

    return step


def peft_step(model, optimizer, recipe, examples, ids: dict, pad_to_multiple_of: int = 1) -> int:
    """A plain PEFT causal-LM LoRA step as a user writes it: the model computes full logits and the loss."""
    from lad.data import collate

    tokens = 0
    for first in range(0, len(examples), recipe.batch_size):
        batch = collate(examples[first:first + recipe.batch_size], ids["pad"], pad_to_multiple_of=pad_to_multiple_of)
        labels = batch["input_ids"].masked_fill(~batch["answer_mask"], -100)  # loss on the answer only
        share = len(batch["input_ids"]) / len(examples)
        device = ids["device"]
        loss = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                     labels=labels.to(device)).loss
        (loss * share).backward()
        tokens += int(batch["attention_mask"].sum())
    finish(model, optimizer, recipe)
    return tokens


def finish(model, optimizer, recipe) -> None:
    """The peft arm's update: clip to the recipe's norm, step, clear the gradients."""
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                   recipe.optim.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def orders(recipe, examples) -> dict:
    """Batches per step: LAD's length-grouped `Schedule`, and plain shuffled batches (no grouping)."""
    from lad.data import batch_indices
    from lad.training.data import Schedule

    schedule = Schedule(len(examples), recipe, 1, [len(e.prompt_ids) + len(e.answer_ids) for e in examples])
    plain = batch_indices(len(examples), schedule.per_step, seed=recipe.seed, epoch=0, drop_last=True)
    return {"lad": schedule.step_indices, "plain": lambda step: plain[step % len(plain)]}


def padded_tokens(examples, multiple: int) -> int:
    width = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    return len(examples) * (-(-width // multiple) * multiple)


def run(recipe, arms: list[str], rounds: int, skip: int) -> dict:
    """Train the arms round robin; per arm and measured step: seconds, real tokens, padded tokens."""
    models = {}
    for arm in sorted({"lad" if a == "lad" else "peft" for a in arms}):
        models[arm] = build(recipe, arm)
    if "lad" in models and "peft" in models:  # the patch must not have reached the AR arm (NOTES.md)
        assert getattr(models["peft"][0].config, "is_causal", True) is not False, "the PEFT arm became bidirectional"
    _, _, tokenizer, mask, examples = next(iter(models.values()))
    ids = {"pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
           "device": next(next(iter(models.values()))[0].parameters()).device}
    lad_step = lad_stepper(*models["lad"][:2], recipe, tokenizer, mask) if "lad" in models else None
    order = orders(recipe, examples)
    loaded, load_peak = rss_mb(), reset_peak_rss()  # from here the peak is the training steps
    steps = {arm: [] for arm in arms}
    for step in range(rounds):
        for k in range(len(arms)):
            arm = arms[(step + k) % len(arms)]
            batch = [examples[i] for i in order["plain" if arm == "peft" else "lad"](step)]
            model, optimizer = models["lad" if arm == "lad" else "peft"][:2]
            started = time.perf_counter()
            if arm == "lad":
                tokens = lad_step(batch, step)
            else:
                tokens = peft_step(model, optimizer, recipe, batch, ids, 8 if arm == "peft_same" else 1)
            seconds = time.perf_counter() - started
            if step >= skip:
                steps[arm].append({"step": step, "seconds": seconds, "tokens": tokens,
                                   "padded": padded_tokens(batch, 8 if arm != "peft" else 1)})
        print(f"  round {step + 1}/{rounds}: " + ", ".join(
            f"{a} {steps[a][-1]['tokens'] / steps[a][-1]['seconds']:,.0f} tok/s" for a in arms if step >= skip)
            + (" (warm-up)" if step < skip else ""), flush=True)
    return {"arms": {arm: summarise(s) for arm, s in steps.items()}, "steps": steps, "examples": len(examples),
            "rss_after_load_mb": loaded, "load_peak_rss_mb": load_peak}


def summarise(steps: list[dict]) -> dict:
    tokens, seconds = sum(s["tokens"] for s in steps), sum(s["seconds"] for s in steps)
    return {"measured_steps": len(steps), "median_tokens_per_s": median(s["tokens"] / s["seconds"] for s in steps),
            "median_s_per_step": median(s["seconds"] for s in steps), "total_tokens_per_s": tokens / seconds,
            "real_per_padded_token": tokens / sum(s["padded"] for s in steps)}


def child_rss(args, arm: str) -> dict:
    """Peak RSS of one arm alone, measured by its own process (what a user running only that arm would see)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "arm.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--recipe", args.recipe, "--only", arm,
               "--steps", str(args.rss_steps), "--skip", "1", "--out", str(out), *args.overrides]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{arm} alone failed ({done.returncode}):\n{done.stderr[-2000:]}")
        record = json.loads(out.read_text())
    return {"peak_rss_mb": record["peak_rss_mb"], "load_peak_rss_mb": record["results"]["load_peak_rss_mb"],
            "rss_after_load_mb": record["rss_after_load_mb"],
            "steps": args.rss_steps, "median_tokens_per_s": record["results"]["arms"][arm]["median_tokens_per_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/smollm2_135m_corpora.yaml")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per arm (default: 20)")
    parser.add_argument("--skip", type=int, default=3, help="warm-up rounds left out (default: 3)")
    parser.add_argument("--only", choices=["lad", "peft"], help="run one arm alone (used for --rss)")
    parser.add_argument("--rss", action="store_true", help="also measure each arm's peak RSS in its own process")
    parser.add_argument("--rss-steps", type=int, default=3, help="steps of each --rss child (default: 3)")
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "train_vs_peft.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for both arms")
    args = parser.parse_args(argv)

    import logging

    from lad.recipe import load_recipe

    quiet()
    logging.getLogger("lad").setLevel(logging.WARNING)
    recipe = load_recipe(args.recipe, list(args.overrides))
    arms = [args.only] if args.only else list(ARMS)
    started = time.perf_counter()
    results = run(recipe, arms, args.skip + args.steps, args.skip)
    results["wall_s"] = time.perf_counter() - started
    a = results["arms"]
    if not args.only:
        ratio = (lambda x, y: a[x]["median_tokens_per_s"] / a[y]["median_tokens_per_s"])
        results["ratios"] = {"lad_vs_peft": ratio("lad", "peft"), "lad_vs_peft_same_batches": ratio("lad", "peft_same"),
                             "padding_effect_peft_same_vs_peft": ratio("peft_same", "peft")}
        results["target"] = {"lad_vs_peft_at_least": 1.3, "met": results["ratios"]["lad_vs_peft"] >= 1.3}
    if args.rss and not args.only:
        results["rss_alone"] = {arm: child_rss(args, arm) for arm in ("lad", "peft")}

    print(f"\n{args.recipe}: batch {recipe.batch_size} × grad_accum {recipe.grad_accum}, max_length "
          f"{recipe.data.max_length}, LoRA r{recipe.lora.r} {recipe.lora.target_modules}, {args.steps} measured steps "
          f"per arm after {args.skip} warm-up rounds, round robin, {torch.get_num_threads()} threads")
    header = f"{'arm':<11}{'tok/s (median)':>15}{'tok/s (total)':>15}{'s/step':>8}{'real/padded':>13}{'peak RSS alone':>16}"
    print(header + "\n" + "-" * len(header))
    for arm, r in a.items():
        alone = results.get("rss_alone", {}).get(arm)
        rss = f"{alone['peak_rss_mb']:,.0f} MB" if alone else "-"
        print(f"{arm:<11}{r['median_tokens_per_s']:>15,.1f}{r['total_tokens_per_s']:>15,.1f}{r['median_s_per_step']:>8.3f}"
              f"{r['real_per_padded_token']:>13.2f}{rss:>16}")
    if "ratios" in results:
        r = results["ratios"]
        print(f"lad / peft {r['lad_vs_peft']:.2f}× (target ≥ 1.3×: {'met' if results['target']['met'] else 'NOT met'}); "
              f"same batches {r['lad_vs_peft_same_batches']:.2f}× (LM head only where needed, corruption included); "
              f"padding alone {r['padding_effect_peft_same_vs_peft']:.2f}×")
    print(f"peak RSS of the training steps {peak_rss_mb():,.0f} MB (loading: {results['load_peak_rss_mb']:,.0f} MB)"
          + ("" if args.only else " (both models)"))
    record = {"command": command_line("eval/bench_train_vs_peft.py", argv), "recipe": args.recipe,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results,
              "rss_after_load_mb": results["rss_after_load_mb"], **environment("cpu")}
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
