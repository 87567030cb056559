"""Train a LAD denoiser: `accelerate launch lad/finetune.py RECIPE.yaml [key=value ...]` (or `lad-finetune`).

Read top to bottom, this is the whole recipe (torchtune style, no hidden Trainer); its parts live in
lad/training/ (data, build, step, validate, state, metrics):

    setup     recipe → [parent answers distilled sources, cached] → base model + tokenizer → mask token → data
              → bidirectional + LoRA → Denoiser → optimizer, LR schedule → [resume]
    loop      `train_step`: batch → corruption (+ annealed attention) → logits at supervised positions
              → weighted loss (+ KL toward the causal parent) → update (non-finite loss: skip or stop)
    validate  fixed noise, best/ weights;  save: checkpoints, final weights, lad.json;  report

Determinism (exact resume): the data order is a pure function of (seed, epoch) and every random draw of a step
of (seed, step, ...) (lad/training/step.py), so a resumed run replays exactly what it missed.
"""

from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script (`accelerate launch lad/finetune.py`): Python put lad/ first on sys.path, where a
    # module could shadow a library. Drop it and import the package from the folder above.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse
import dataclasses
import logging
from pathlib import Path

import torch
import yaml

from lad.console import Parser, log_to_terminal, quiet_libraries
from lad.data import DataError, Example, find_token
from lad.data.distilled import distill_sources
from lad.distill import DistillError
from lad.modeling.adapters import LoraTargetError, check_lora_targets, count_parameters
from lad.modeling.bidirectional import UnsupportedArchitectureError
from lad.modeling.denoiser import Denoiser
from lad.modeling.locate import ModelNotFoundError, absolute_if_local
from lad.modeling.mask_token import MaskTokenError, check_not_in_data
from lad.recipe import Recipe, RecipeError, dump_recipe, load_recipe
from lad.resume import NothingToDo, ResumePlan, check_data, check_progress, data_digest, history_lines, plan_resume
from lad.atomic import staged
from lad.checkpoints import latest_checkpoint, save_weights
from lad.run import LadInfo, RunDirError, prepare_output_dir
from lad.safety import PathError, run_header
from lad.stopping import Interrupted, stop_signals
from lad.training.build import add_trainable, build_optimizer, build_scheduler, load_model
from lad.training.data import Schedule, TokenIds, load_data, prompt_style, seed_for
from lad.training.metrics import Metrics, Throughput, gpu_memory
from lad.training.state import Run, TrainState, checkpoint, restore
from lad.training.step import StepOutcome, signalled, train_step
from lad.training.threads import use_training_threads
from lad.training.validate import validate

# what other code imports from here: the entry points, and the parts a notebook or benchmark reuses
__all__ = ["train", "main", "parse_args", "resume_command", "train_step", "load_model", "add_trainable",
           "build_optimizer", "build_scheduler", "Schedule", "seed_for"]

log = logging.getLogger("lad.finetune")

USER_ERRORS = (RecipeError, DataError, ModelNotFoundError, UnsupportedArchitectureError, MaskTokenError,
               RunDirError, DistillError, ImportError, PathError, LoraTargetError)


# ---------------------------------------------------------------- setup


def setup(recipe: Recipe, allow_changes: tuple[str, ...]) -> tuple[Run, TrainState]:
    """Everything before the first step, cheapest failure first: checks that read only files, then model and
    data (checked against the recipe and any run being resumed), and only then is anything written."""
    from accelerate import Accelerator

    resuming = recipe.resume_from is not None
    out = prepare_output_dir(recipe.output_dir, overwrite=recipe.overwrite, resuming=resuming, create=False)
    plan = plan_resume(recipe, out, yaml.safe_load(dump_recipe(recipe, absolute_paths=True)), allow_changes) \
        if resuming else ResumePlan(None)
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(recipe.precision, recipe.precision),
                              log_with=recipe.report_to or None, project_dir=str(out))
    model, tokenizer, mask, (train_set, val_set), schedule, digest = load_checked(recipe, accelerator, out, plan)
    base_ref = base_reference(recipe, model, out, plan, accelerator.is_main_process)
    info = LadInfo(base_model=base_ref, mask_token=mask.token, mask_token_id=mask.id, mask_token_added=mask.added,
                   vocab_size=len(tokenizer), shift=recipe.shift, objective=recipe.noise.objective,
                   noise=dataclasses.asdict(recipe.noise), adapter="lora" if recipe.lora.enabled else "full",
                   prompt_style=prompt_style(recipe, tokenizer),
                   max_length=recipe.data.max_length, eos_padding=recipe.eos_padding, attention=recipe.attention,
                   block_size=recipe.block_size, lora_gate=recipe.lora.gate)
    denoiser = Denoiser(add_trainable(model, recipe, mask), mask.id, recipe.shift, recipe.attention, info=info,
                        block_size=recipe.block_size, gate=recipe.lora.gate)
    optimizer = build_optimizer(recipe, denoiser)
    scheduler = build_scheduler(recipe, optimizer, schedule.total_steps)
    state = restore(plan, recipe, denoiser, optimizer, scheduler, digest)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(out)
        (out / "recipe.yaml").write_text(recipe_text(recipe, out, plan), encoding="utf-8")
        describe(recipe, mask, denoiser, (train_set, val_set), schedule, accelerator)
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    metrics = Metrics(accelerator, recipe, out, state.step, plan)
    run = Run(recipe, accelerator, denoiser, optimizer, scheduler, tokenizer, TokenIds.of(tokenizer, mask.id),
              train_set, val_set, schedule, info, out, metrics)
    return run, state


def load_checked(recipe: Recipe, accelerator, out: Path, plan: ResumePlan):
    """(model, tokenizer, mask, (train, validation), schedule, data digest), each checked; then the run
    directory is made (an old run it replaces is deleted only now)."""
    from accelerate.utils import set_seed

    main = accelerator.is_main_process
    # self-distilled sources: the parent answers their prompts once (cached) before the training model loads
    with accelerator.main_process_first():
        sources = tuple(distill_sources(recipe, part, run=main) for part in (recipe.data.train, recipe.data.validation))
    set_seed(recipe.seed)  # LoRA's random init and an added mask row draw from the global RNG
    model, tokenizer, mask = load_model(recipe)
    train_set, val_set = load_data(recipe, tokenizer, sources)
    check_not_in_data(mask, find_token(train_set + val_set, mask.id))
    schedule = Schedule(len(train_set), recipe, accelerator.num_processes,
                        [len(e.prompt_ids) + len(e.answer_ids) for e in train_set])
    if recipe.lora.enabled:
        check_lora_targets(model, recipe.lora)
    check_progress(plan, schedule.total_steps, out)
    digest = data_digest(train_set, val_set)
    check_data(plan, digest)
    if main:  # only now, with model and data checked, is anything written
        prepare_output_dir(str(out), overwrite=recipe.overwrite, resuming=recipe.resume_from is not None)
    accelerator.wait_for_everyone()
    return model, tokenizer, mask, (train_set, val_set), schedule, digest


def base_reference(recipe: Recipe, model, out: Path, plan: ResumePlan, main: bool) -> dict:
    """lad.json's `base_model`: the recipe's, local paths made absolute so the run loads from anywhere; a random
    (scratch) base trained with LoRA is saved into the run as base/, since nothing else could rebuild it."""
    base_ref = dataclasses.asdict(recipe.model)
    for key in ("name_or_path", "tokenizer"):
        base_ref[key] = absolute_if_local(base_ref[key])
    if recipe.model.init == "scratch" and recipe.lora.enabled:
        if main and not (plan.checkpoint is not None and (out / "base").is_dir()):  # a resume keeps its own
            with staged(out / "base") as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
        base_ref.update(name_or_path="./base", init="pretrained", config={}, tokenizer=None)
    return base_ref


def describe(recipe: Recipe, mask, denoiser, data, schedule: Schedule, accelerator) -> None:
    """The two log lines a user checks a run by: what trains, and on how much data for how long."""
    trainable, total = count_parameters(denoiser)
    log.info("model: %s | trainable %s of %s parameters (%.2f%%) | mask %r (id %d%s) | shift=%s",
             recipe.model.name_or_path or "scratch", f"{trainable:,}", f"{total:,}", 100 * trainable / total,
             mask.token, mask.id, ", added" if mask.added else "", recipe.shift)
    processes = accelerator.num_processes
    where = f"{processes} processes ({accelerator.distributed_type.value})" if processes > 1 else "1 process"
    log.info("data: %d train / %d validation examples; %d steps of %d examples (%d per epoch) on %s",
             len(data[0]), len(data[1]), schedule.total_steps, schedule.per_step, schedule.steps_per_epoch, where)


def recipe_text(recipe: Recipe, out: Path, plan: ResumePlan | None) -> str:
    """The run's recipe.yaml: a header that marks the folder as a run, the recipe, and each resume's changes."""
    return "\n".join([run_header(), dump_recipe(recipe, absolute_paths=True).rstrip("\n"),
                      *history_lines(out, plan)]) + "\n"


# ---------------------------------------------------------------- the loop


def _train(recipe: Recipe, allow_changes: tuple[str, ...] = (), stop=None) -> Path:
    """setup → `train_step` per step (validation, checkpoints and a stop signal between steps) → save."""
    from tqdm.auto import tqdm

    run, state = setup(recipe, allow_changes)
    start, total = state.step, run.schedule.total_steps
    if recipe.eval_every and start == 0:
        validate(run, state, 0)  # the starting point, so a run's curve shows what training bought
    run.denoiser.train()
    bar = tqdm(total=total, initial=start, disable=not run.main, desc="lad", dynamic_ncols=True)
    rate = Throughput()
    if stop is not None:
        stop.deferred = True  # a signal now ends the loop after this step's checkpoint
    for step in range(start, total):
        examples = [run.train_set[i] for i in run.schedule.step_indices(step)]
        outcome = train_step(run.accelerator, run.denoiser, run.optimizer, run.scheduler, recipe, examples, step,
                             run.ids)
        state.step, state.tokens_seen = step + 1, state.tokens_seen + outcome.stats.input_tokens
        if outcome.skipped:
            count_skipped(run, state, outcome.skipped, bar)
        bar.update(1)
        if state.step % recipe.log_every == 0 or state.step == total:
            log_step(run, state, outcome, rate(state.tokens_seen), bar)
        if recipe.eval_every and state.step % recipe.eval_every == 0 and state.step < total:
            validate(run, state, state.step)
        if recipe.save_every and state.step % recipe.save_every == 0 and state.step < total:
            run.accelerator.wait_for_everyone()
            if run.main:
                checkpoint(run, state)
        if stop is not None and signalled(stop, run.accelerator):
            bar.close()
            raise interrupted(run, state, stop)
    if stop is not None:
        stop.deferred = False
    bar.close()
    if start < total:  # (resumed from the final checkpoint: its validation is logged)
        validate(run, state, total)
    save(run, state)
    run.accelerator.end_training()
    return run.out


def count_skipped(run: Run, state: TrainState, what: str, bar) -> None:
    """A non-finite step left the weights alone: allowed up to skip_bad_steps times, then training stops and
    names the last good checkpoint to resume from."""
    state.skipped += 1
    if state.skipped > run.recipe.skip_bad_steps:
        bar.close()  # the message goes on a line of its own
        last = latest_checkpoint(run.out)
        raise FloatingPointError(
            f"non-finite {what} at step {state.step}; stopped before updating the weights. The last good "
            f"checkpoint is {last or 'none yet (save_every=0)'}: lower optim.lr, or set skip_bad_steps=N "
            "to skip up to N such steps, then resume with resume_from=latest")
    log.warning("step %d: non-finite %s, step skipped (%d of skip_bad_steps=%d)", state.step, what, state.skipped,
                run.recipe.skip_bad_steps)
    run.metrics.record({"step": state.step, "skipped": what, "skipped_steps": state.skipped})


def log_step(run: Run, state: TrainState, outcome: StepOutcome, tokens_per_s: float, bar) -> None:
    """Every log_every steps: the training line of metrics.jsonl, and the progress bar's numbers."""
    lr = run.scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{outcome.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
    run.metrics.record({"step": state.step, **outcome.stats.summary(), "lr": lr, "tokens": state.tokens_seen,
                        "tokens_per_s": tokens_per_s, **gpu_memory(run.accelerator.device)})


def interrupted(run: Run, state: TrainState, stop) -> Interrupted:
    """A signal arrived: checkpoint the step just finished (unless save_every did) so the resume loses nothing."""
    run.accelerator.wait_for_everyone()
    path = run.out / "checkpoints" / f"step-{state.step:06d}"
    if run.main and not path.is_dir():
        checkpoint(run, state)
    return Interrupted(stop.signum or signal.SIGINT, state.step, path)


# ---------------------------------------------------------------- save


def save(run: Run, state: TrainState) -> None:
    """The final checkpoint, weights and lad.json (main process), then the report the recipe asks for."""
    run.accelerator.wait_for_everyone()
    if not run.main:
        return
    checkpoint(run, state)
    save_weights(run.unwrapped.model, run.out)
    dataclasses.replace(run.info, step=state.step).save(run.out)
    run.metrics.close()
    log.info("saved %s (step %d)", run.out, state.step)
    spec = run.recipe.report
    if spec.prompts or (spec.score_examples and run.val_set):
        report(run.unwrapped, run.tokenizer, run.val_set, run.recipe, run.info, run.out)


def report(denoiser, tokenizer, val_set: list[Example], recipe: Recipe, info: LadInfo, out: Path) -> None:
    """A few answers next to the AR parent's and a small score for both (recipe `report:`), printed and kept
    in the run directory as report.json. A full fine-tune (the from-scratch recipes) has no adapter to switch
    off, so no parent: its answers come alone."""
    from lad.report import make_report

    spec = recipe.report
    denoiser.eval()
    with torch.no_grad():
        result = make_report(denoiser, tokenizer, spec.prompts, val_set[:spec.score_examples], strategy=spec.strategy,
                             iters=spec.iters, max_new_tokens=spec.max_new_tokens, chat_template=info.chat_template,
                             parent=info.adapter == "lora" and not info.merged,
                             block_length=spec.block_length,
                             seed=recipe.seed)
    result.save(out)
    print(result.text(), flush=True)


def train(recipe: Recipe, *, allow_changes: tuple[str, ...] = (), stop=None) -> Path:
    """Run one training job; Accelerate's process-wide state is reset afterwards so a Python session (a
    notebook, the tests) can train again with other settings. allow_changes: TUNABLE keys (lad/resume.py)
    a resume may change; stop: a `stopping.StopRequest` that ends the loop cleanly on SIGINT/SIGTERM."""
    from accelerate.state import AcceleratorState

    try:
        return _train(recipe, tuple(allow_changes), stop)
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        prog="lad-finetune", description="Train a LAD diffusion denoiser with LoRA from a YAML recipe.",
        epilog="Any recipe key can be overridden as key=value (dotted for nested keys), e.g. "
               "max_steps=20 output_dir=runs/t noise.objective=structural lora.r=8")
    parser.add_argument("recipe", help="recipe YAML file (see recipes/ and docs/recipe.md)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--overwrite", action="store_true", help="replace an output_dir that already holds files")
    parser.add_argument("--resume", action="store_true", help="same as resume_from=latest")
    parser.add_argument("--print-recipe", action="store_true", help="print the validated recipe and exit")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="on resume, apply a changed optimisation setting (optim.lr, optim.warmup_steps, "
                             "optim.scheduler, optim.weight_decay, optim.grad_clip, batch_size, grad_accum); "
                             "repeatable")
    return parser.parse_intermixed_args(argv)


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted run: the same arguments, resume_from=latest, no overwrite."""
    import shlex

    kept = [a for a in argv if a not in ("--overwrite", "--resume")
            and not a.startswith(("overwrite=", "resume_from="))]
    program = "lad-finetune" if not sys.argv[0].endswith("finetune.py") else f"accelerate launch {sys.argv[0]}"
    return f"{program} {shlex.join(kept)} resume_from=latest"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_to_terminal("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")  # lines above the bar, not on it
    quiet_libraries()
    try:
        overrides = list(args.overrides) + (["overwrite=true"] if args.overwrite else []) + \
            (["resume_from=latest"] if args.resume else [])
        recipe = load_recipe(args.recipe, overrides)
        if args.print_recipe:
            print(dump_recipe(recipe), end="")
            return 0
        from lad.resume import TUNABLE

        for key in args.allow_change:
            if key not in TUNABLE:
                raise RecipeError(f"--allow-change {key}: not a setting a resume may change (one of "
                                  f"{', '.join(TUNABLE)})")
        use_training_threads(log)
        with stop_signals() as stop:
            train(recipe, allow_changes=args.allow_change, stop=stop)
    except USER_ERRORS as err:
        print(f"lad-finetune: error: {err}", file=sys.stderr)
        return 2
    except NothingToDo as done:
        print(f"lad-finetune: {done}", file=sys.stderr)
        return 0
    except Interrupted as stop:
        if stop.step is None:
            print(f"\nlad-finetune: interrupted ({stop}) before training started; nothing to resume", file=sys.stderr)
        else:
            print(f"\nlad-finetune: interrupted ({stop}) after step {stop.step}, saved as {stop.checkpoint}; "
                  f"continue with: {resume_command(sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return 128 + stop.signum
    except OSError as err:  # disk full, read-only, permission denied while writing
        where = f"{err.filename}: " if err.filename else ""
        print(f"lad-finetune: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"lad-finetune: error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
