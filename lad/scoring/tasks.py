"""Offline benchmark data: run lm-eval's STOCK task configs on local JSONL files.

`--data-dir DIR` holds one folder per task (`arc_easy/`, `arc_challenge/`, `mmlu/`, `hellaswag/`) with files
named by split (`train.jsonl`, `validation.jsonl`, `dev.jsonl`, ...) in the Hugging Face schema, as in
`shared/data/eval/`. We build a local mirror of each hub dataset (a folder whose README declares the same
config names, e.g. `ARC-Easy` or one config per MMLU subject) and load the stock task with only its dataset
fields overridden: `dataset_path` → the mirror, `test_split` → none (so lm-eval scores the validation split).
Prompts, targets, few-shot splits and metrics stay exactly the stock ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# task or group name → (mirror name, {config name: local folder}); MMLU's configs are its subjects
OFFLINE_TASKS = {
    "arc_easy": ("ai2_arc", {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}),
    "arc_challenge": ("ai2_arc", {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}),
    "hellaswag": ("hellaswag", {"default": "hellaswag"}),
    "mmlu": ("mmlu", None),
}

# lm-eval's `dataset_path` of those tasks: what they read from the hub without --data-dir
STOCK_DATASETS = {"arc_easy": "allenai/ai2_arc", "arc_challenge": "allenai/ai2_arc", "hellaswag": "Rowan/hellaswag",
                  "mmlu": "cais/mmlu"}


class TaskDataError(ValueError):
    """Local benchmark data is missing or malformed."""


def _rows(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TaskDataError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    lines = [line for line in text.split("\n") if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskDataError(f"{path}:{number}: malformed JSON ({err.msg})") from None
    return lines


def _write_config(mirror: Path, config: str, splits: dict[str, list[str]], lines: list[str]) -> None:
    lines.append(f"- config_name: {config}")
    lines.append("  data_files:")
    for split, rows in splits.items():
        rel = f"{config}/{split}.jsonl"
        (mirror / config).mkdir(parents=True, exist_ok=True)
        (mirror / rel).write_text("\n".join(rows) + "\n", encoding="utf-8")
        lines += [f"  - split: {split}", f"    path: {rel}"]


def build_mirror(data_dir: Path, name: str, configs: dict[str, str] | None, cache: Path) -> Path:
    """Write (once per content) a local dataset folder that `datasets.load_dataset(folder, config)` reads."""
    sources = sorted(p for folder in ({"mmlu"} if configs is None else set(configs.values()))
                     for p in (data_dir / folder).glob("*.jsonl"))
    if not sources:
        wanted = "mmlu" if configs is None else ", ".join(sorted(set(configs.values())))
        raise TaskDataError(f"{data_dir}: no JSONL files for {wanted} (expected e.g. {data_dir}/{wanted.split(',')[0]}"
                            "/validation.jsonl)")
    digest = hashlib.sha256("|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources).encode())
    mirror = cache / f"{name}-{digest.hexdigest()[:12]}"
    if (mirror / "README.md").is_file():
        return mirror
    lines = ["---", "configs:"]
    if configs is None:  # MMLU: one config per subject, split by the `subject` field
        by_subject: dict[str, dict[str, list[str]]] = {}
        for path in sorted((data_dir / "mmlu").glob("*.jsonl")):
            for row in _rows(path):
                subject = json.loads(row).get("subject")
                if not subject:
                    raise TaskDataError(f"{path}: MMLU rows need a 'subject' field")
                by_subject.setdefault(subject, {}).setdefault(path.stem, []).append(row)
        for subject, splits in sorted(by_subject.items()):
            _write_config(mirror, subject, splits, lines)
    else:
        for config, folder in configs.items():
            splits = {p.stem: _rows(p) for p in sorted((data_dir / folder).glob("*.jsonl"))}
            if splits:
                _write_config(mirror, config, splits, lines)
    lines.append("---")
    (mirror / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return mirror


def _stock_names(tm, name: str) -> set[str]:
    """The hub config (dataset_name) a stock task reads, e.g. {"ARC-Easy"}."""
    if name == "mmlu":
        return set()
    return {tm._factory._load_full_config(tm._entry(name), None).get("dataset_name") or "default"}


def load_offline_tasks(task_names: list[str], data_dir: str | os.PathLike, task_manager=None, cache: Path | None = None):
    """Build the stock lm-eval tasks/groups named in `task_names`, reading their data from `data_dir`."""
    from lm_eval.tasks import TaskManager

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TaskDataError(f"--data-dir {data_dir} is not a folder")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    cache = cache or Path(os.environ.get("LAD_CACHE", Path.home() / ".cache" / "lad")) / "eval-data"
    tm = task_manager or TaskManager()
    built = []
    for name in task_names:
        if name not in OFFLINE_TASKS:
            raise TaskDataError(f"--data-dir supports {', '.join(OFFLINE_TASKS)}; not {name!r}")
        mirror_name, configs = OFFLINE_TASKS[name]
        mirror = build_mirror(data_dir, mirror_name, configs, cache)
        overrides = {"dataset_path": str(mirror), "test_split": None}
        folders = ["mmlu"] if configs is None else [configs[c] for c in configs if c in _stock_names(tm, name)]
        present = {p.stem for folder in folders for p in (data_dir / folder).glob("*.jsonl")}
        if name == "mmlu":
            overrides["validation_split"] = "validation"
            if "dev" not in present:
                overrides["fewshot_split"] = None
        else:  # a split the stock task names but the local folder lacks is dropped, not an error
            stock = tm._factory._load_full_config(tm._entry(name), None)
            for key in ("training_split", "validation_split", "fewshot_split"):
                if stock.get(key) and stock[key] not in present:
                    overrides[key] = None
        if "validation" not in present and overrides.get("validation_split", "validation") is not None:
            raise TaskDataError(f"{data_dir}: {name} needs a validation.jsonl (the split LAD scores)")
        if name == "mmlu" and not _all_subjects_present(tm, mirror):
            built.append(_partial_mmlu(tm, mirror, overrides))
            continue
        built.append(tm._factory.build(tm._entry(name), overrides=overrides, registry=tm.task_index))
    return built


def _subjects(mirror: Path) -> list[str]:
    return sorted(p.name for p in mirror.iterdir() if p.is_dir())


def _all_subjects_present(tm, mirror: Path) -> bool:
    stock = {n[len("mmlu_"):] for n in tm.all_subtasks if n.startswith("mmlu_") and
             (tm._entry(n).yaml_path and "/mmlu/default/" in str(tm._entry(n).yaml_path))}
    return stock <= set(_subjects(mirror))


def _partial_mmlu(tm, mirror: Path, overrides: dict):
    """Local MMLU data that covers only some subjects: an `mmlu` group of exactly those stock subtasks."""
    from lm_eval.tasks._index import TaskIndex

    config = {"group": "mmlu", "task": [{"task": f"mmlu_{s}", **overrides} for s in _subjects(mirror)],
              "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
    return tm._factory.build(TaskIndex.entry_from_config(config), overrides=None, registry=tm.task_index)
