"""`lad-eval`: score a LAD run with lm-evaluation-harness (model `lad`), or its AR parent, or both.

    lad-eval --model RUN_DIR --tasks arc_easy --iters 16
    lad-eval --model RUN_DIR --tasks arc_easy,mmlu --baseline ar          # the parent, same prompts
    lad-eval --model RUN_DIR --tasks arc_easy --compare --limit 200 --data-dir ../shared/data/eval

Usual lm-eval options pass through (`--num_fewshot`, `--limit`, `--batch_size`, `--output_path`,
`--log_samples`, `--include_path`, `--seed`, `--apply_chat_template`). Prints lm-eval's results table, and a
markdown table of acc / acc_norm ± stderr per task (side by side with `--compare`).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from pathlib import Path

from .console import Parser, quiet_libraries, quiet_lm_eval
from .options import add_flags, flag
from .run import RunDirError
from .sampling import PARENT_STRATEGIES
from .scoring.options import SCORE_OPTIONS, batch_size_problem, fixed_batch_size, settings_problem

USER_ERRORS = (RunDirError, ValueError, FileNotFoundError, KeyError, ConnectionError)



@functools.lru_cache(maxsize=4)
def task_manager_for(include_path: str | None):
    """lm-eval's TaskManager indexes thousands of task files (~8 s): build it once per include_path."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_model_dir(path: str) -> None:
    """Before lm-eval indexes its tasks: is --model a LAD run (or an exported model) at all?"""
    from .run import LadInfo

    if not Path(path).is_dir():
        raise RunDirError(f"{path} is not a folder")
    LadInfo.load(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="lad-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="a LAD run directory (or exported model folder)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups, e.g. arc_easy,mmlu")
    add_flags(p.add_argument_group("scoring (lad/scoring/options.py; lm-eval's --model_args take the same)"),
              SCORE_OPTIONS, SCORE_OPTIONS)
    p.add_argument("--compare", action="store_true", help="score the LAD model and the AR parent side by side")
    p.add_argument("--data-dir", metavar="DIR",
                   help="read arc_easy/arc_challenge/mmlu/hellaswag from local JSONL folders (default: the "
                        "Hugging Face hub or its cache)")
    p.add_argument("--weights", default="final", help="final | best | a checkpoint folder (default final)")
    p.add_argument("--device", default=None, help="torch device (default: the GPU when there is one, else cpu)")
    p.add_argument("--num_fewshot", type=int, default=None, metavar="N",
                   help="examples shown before each question (default: the task's own, zero-shot for the stock "
                        "ARC, MMLU and HellaSwag prompts)")
    p.add_argument("--limit", type=float, default=None, metavar="N",
                   help="score the first N documents of each task, or a fraction when < 1 (default: all)")
    p.add_argument("--batch_size", default="16", metavar="N",
                   help="requests per batch (elbo: sequences per forward); auto means 16 (default 16)")
    p.add_argument("--output_path", default=None, metavar="PATH",
                   help="folder (or .json file) for the results and the markdown table (default: print only)")
    p.add_argument("--log_samples", action="store_true", help="with --output_path: also every document's scores")
    p.add_argument("--include_path", default=None, metavar="DIR", help="a folder of extra lm-eval task YAML files")
    p.add_argument("--apply_chat_template", action="store_true",
                   help="wrap each prompt in the model's chat template (default: raw text, as lm-eval's hf model)")
    p.add_argument("--bootstrap_iters", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the stderr (0: no stderr; default 1000)")
    args = p.parse_args(argv)
    problem = flag_problem(args)
    if problem:
        p.error(problem)
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    args.batch_size = fixed_batch_size(args.batch_size, "lad-eval", "--batch_size")
    return args


def score_options(args: argparse.Namespace) -> dict:
    """The scoring options as the flags gave them (lad/scoring/options.py), for the checks and for LadLM."""
    return {name: getattr(args, name) for name in SCORE_OPTIONS}


def flag_problem(args: argparse.Namespace) -> str | None:
    """The first flag with a value lm-eval or the scorer would refuse (or misuse) after the model loads."""
    from .console import device_problem

    limit, tasks = args.limit, [t for t in args.tasks.split(",") if t.strip()]
    checks = [
        (not tasks, f"--tasks {args.tasks!r}: no task names (e.g. --tasks arc_easy,mmlu)"),
        (limit is not None and not (0 < limit < 1 or 1 <= limit < float("inf") and limit == int(limit)),
         f"--limit must be a number of examples (>= 1) or a fraction in (0, 1), got {limit}"),
        (args.num_fewshot is not None and args.num_fewshot < 0, f"--num_fewshot must be >= 0, got {args.num_fewshot}"),
        (args.bootstrap_iters < 0, f"--bootstrap_iters must be >= 0 (0 = no stderr), got {args.bootstrap_iters}"),
        (args.compare and args.baseline == "ar",
         "--compare already scores the AR parent next to the LAD model: drop --baseline ar"),
        (args.include_path is not None and not Path(args.include_path).exists(),
         f"--include_path {args.include_path}: no such folder"),
    ]
    bad = settings_problem(score_options(args), label=flag) or next((message for wrong, message in checks if wrong), None)
    return bad or device_problem(args.device) or batch_size_problem(args.batch_size)


def resolve_tasks(names: list[str], args, task_manager):
    """Stock task names (checked, with a suggestion for typos), or offline copies with --data-dir."""
    import difflib

    known = set(task_manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            raise KeyError(f"unknown task {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if args.data_dir:
        from .scoring.tasks import load_offline_tasks

        return load_offline_tasks(names, args.data_dir, task_manager)
    check_hub_data(names, task_manager)
    return names


def check_hub_data(names: list[str], task_manager) -> None:
    """Without --data-dir the data sets come from the hub. When it cannot be reached they are loaded from the
    local cache now, before the model, and the first one missing is named in one line (no minute of retries)."""
    from .hub import offline_reason

    reason = offline_reason()
    if reason is None:
        return
    for name in names:
        try:
            task_manager.load([name])
        except ConnectionError as err:  # datasets: not in the cache, and the hub not asked
            named = re.search(r"reach '([^']+)'", str(err))
            raise hub_data_missing(name, named.group(1) if named else "its data set", reason) from None


def check_stock_data_early(names: list[str]) -> None:
    """Before lm-eval indexes its thousands of task files (~10 s): a task whose hub data set LAD knows
    (`STOCK_DATASETS`) fails at once when the hub cannot be reached and no local cache holds that data set."""
    from .hub import offline_reason
    from .scoring.tasks import STOCK_DATASETS

    known = [name for name in names if name in STOCK_DATASETS]
    reason = offline_reason() if known else None
    if reason is None:
        return
    from datasets import config
    from huggingface_hub import constants

    for name in known:
        dataset = STOCK_DATASETS[name]
        places = (Path(config.HF_DATASETS_CACHE) / dataset.replace("/", "___"),
                  Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}")
        if not any(place.is_dir() for place in places):
            raise hub_data_missing(name, dataset, reason)


def hub_data_missing(name: str, dataset: str, reason: str) -> ConnectionError:
    from datasets import config

    return ConnectionError(
        f"--tasks {name}: {dataset} is not in the local data set cache ({config.HF_DATASETS_CACHE}) and "
        f"{reason}; score local JSONL copies with --data-dir DIR (docs/scoring.md), or run once where "
        "the hub can be reached")


def run_one(lm, args, tasks, task_manager) -> dict:
    from lm_eval import simple_evaluate

    quiet_lm_eval()
    started = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                              log_samples=args.log_samples or args.compare,  # --compare pairs the documents
                              task_manager=task_manager, random_seed=args.seed,
                              numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed,
                              apply_chat_template=args.apply_chat_template, bootstrap_iters=args.bootstrap_iters)
    nfe = lm.gather_object(lm.nfe)  # every process calls it; rank 0 gets each process's count
    if results is not None:  # only rank 0 gets results
        settings = dict(lm.settings, mc_samples=lm.mc_samples if lm.score == "elbo" else None,
                        prefix_cache=lm.prefix_cache_used, strategy=lm.strategy)
        results["config"].update(model="lad", model_args=args.model, **settings, nfe=sum(nfe), processes=lm.world_size,
                                 wall_s=round(time.perf_counter() - started, 2))
    return results


def metric_rows(results: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """{task: {metric: (value, stderr)}} for acc and acc_norm; a group's leaf tasks (MMLU subjects) are left
    to lm-eval's full table, the summary keeps the group and its categories."""
    grouped_leaves = {t for group, members in results.get("group_subtasks", {}).items() for t in members
                      if t not in results.get("group_subtasks", {})}
    rows = {}
    for task, values in results["results"].items():
        if task in grouped_leaves:
            continue
        row = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in values:
                err = values.get(f"{metric}_stderr,none")
                row[metric] = (values[f"{metric},none"], err if isinstance(err, (int, float)) else float("nan"))
        if row:
            rows[task] = row
    return rows


def column_label(name: str, results: dict) -> str:
    """What produced a column: the scoring method and reveal order are part of the number."""
    config = results.get("config", {})
    if config.get("baseline") == "ar":
        return f"{name} (AR parent)"
    if config.get("score") == "elbo":
        return f"{name} (elbo, {config.get('mc_samples')} samples)"
    if config.get("score") == "denoise":
        window = f", lookahead {config['lookahead']}" if config.get("lookahead") else ""
        steps = f"{config['iters']} iters" if config.get("iters") else "one token per step"
        return f"{name} (denoise, {config.get('order')} order, {steps}{window})"
    return name


def markdown_table(named: dict[str, dict]) -> str:
    """Tasks × metrics, one column per model (LAD / AR parent), values as acc ± stderr; with two models the
    difference, and where both logged their documents the paired 95% interval, McNemar's p and the number of
    documents (lad/scoring/paired.py)."""
    from .scoring.paired import interval_cell, paired_rows

    names = list(named)
    rows = {name: metric_rows(res) for name, res in named.items()}
    tasks = sorted({t for r in rows.values() for t in r})
    labels = [column_label(name, named[name]) for name in names]
    paired = paired_rows(*named.values()) if len(names) == 2 else {}
    header = "| task | metric | " + " | ".join(labels) + \
        (" | Δ (paired 95% interval, McNemar p, documents) |" if len(names) == 2 else " |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for task in tasks:
        metrics = sorted({m for r in rows.values() for m in r.get(task, {})})
        for metric in metrics:
            cells, values = [], []
            for name in names:
                value = rows[name].get(task, {}).get(metric)
                values.append(value[0] if value else None)
                cells.append(f"{value[0]:.4f} ± {value[1]:.4f}" if value else "-")
            delta = ""
            if len(names) == 2:
                pair = paired.get((task, metric))
                delta = f" {interval_cell(pair)} |" if pair else \
                    f" {values[0] - values[1]:+.4f} |" if None not in values else " - |"
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |" + delta)
    return "\n".join(lines)


def save(results_by_name: dict[str, dict], table: str, output_path: str) -> Path:
    out = Path(output_path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = out.parent if out.suffix == ".json" else out
    folder.mkdir(parents=True, exist_ok=True)
    target = out if out.suffix == ".json" else folder / f"results_{stamp}.json"
    for path in (target, target.with_suffix(".md")):
        if path.exists():  # checked before the evaluation too; a file made meanwhile is still never overwritten
            raise FileExistsError(f"{path} already exists; choose another --output_path")
    payload = {name: {k: v for k, v in res.items() if k != "samples"} for name, res in results_by_name.items()}
    if len(results_by_name) == 2:  # the paired comparison, from the per-document results it was computed on
        from .scoring.paired import paired_rows

        payload["paired"] = {f"{task}/{metric}": row
                             for (task, metric), row in paired_rows(*results_by_name.values()).items()}
    target.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    target.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    for name, res in results_by_name.items():
        for task, samples in (res.get("samples") or {}).items():
            path = folder / f"samples_{name}_{task}_{stamp}.jsonl"
            with path.open("w", encoding="utf-8") as fh:
                for sample in samples:
                    fh.write(json.dumps(sample, default=str) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        check_model_dir(args.model)
        if args.output_path is not None:  # before the evaluation, not after it
            from .safety import EVAL, check_destination

            check_destination(args.output_path, kind=EVAL, flag="--output_path")
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not args.data_dir:
            check_stock_data_early(names)
        from lm_eval.utils import make_table

        from .scoring.harness import LadLM

        task_manager = task_manager_for(args.include_path)
        tasks = resolve_tasks(names, args, task_manager)
        lm = LadLM(args.model, batch_size=args.batch_size, device=args.device, weights=args.weights,
                   **score_options(args))
        if args.baseline == "ar" or args.compare or args.strategy in PARENT_STRATEGIES:
            from .run import check_parent

            check_parent(lm.info, args.model)
        runs = {"ar" if args.baseline == "ar" else "lad": lm}
        if args.compare:
            parent = LadLM(denoiser=lm.denoiser, tokenizer=lm.tokenizer, info=lm.info, baseline="ar",
                           batch_size=args.batch_size, seed=args.seed, device=args.device)
            runs = {"lad": lm, "ar": parent}
        results = {}
        for name, model in runs.items():
            if args.compare and args.data_dir:  # tasks are objects holding state: build them afresh per model
                tasks = resolve_tasks(names, args, task_manager)
            results[name] = run_one(model, args, tasks, task_manager)
        if lm.rank != 0:
            return 0
        for name, res in results.items():
            print(f"\n## {name}: {res['config'].get('score') if name == 'lad' else 'AR parent'} "
                  f"(NFE {res['config']['nfe']}, {res['config']['wall_s']} s)")
            print(make_table(res))
        table = markdown_table(results)
        print(table)
        if args.output_path:
            if not args.log_samples:  # logged for the paired comparison only: not written out
                results = {name: {k: v for k, v in res.items() if k != "samples"} for name, res in results.items()}
            print(f"wrote {save(results, table, args.output_path)}")
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lad-eval: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
