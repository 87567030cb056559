"""`--data-dir`: stock lm-eval tasks read local JSONL files with the stock prompts, targets and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from lm_eval.tasks import TaskManager
from lm_eval.utils import apply_template

from lad.scoring.tasks import TaskDataError, load_offline_tasks

ARC = [{"id": "q1", "question": "Which gas do plants take in?", "choices": {"text": ["oxygen", "carbon dioxide"],
        "label": ["A", "B"]}, "answerKey": "B"},
       {"id": "q2", "question": "What melts ice?", "choices": {"text": ["heat", "cold", "dark"],
        "label": ["1", "2", "3"]}, "answerKey": "1"}]
MMLU = [{"question": "2 + 2 = ?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
        {"question": "The heart pumps", "subject": "anatomy", "choices": ["air", "blood", "bile", "food"], "answer": 1}]
HELLASWAG = [{"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
              "ctx_b": "then", "ctx": "Then, the man writes over the snow. then",
              "endings": [", the man adds wax.", ", the man stops.", " the man leaves.", ", he cleans."],
              "label": "3", "source_id": "x", "split": "val", "split_type": "indomain"}]


def write(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_data")
    write(root / "arc_easy", "validation.jsonl", ARC)
    write(root / "arc_easy", "train.jsonl", ARC[:1])
    write(root / "arc_challenge", "validation.jsonl", ARC[1:])
    write(root / "mmlu", "validation.jsonl", MMLU)
    write(root / "mmlu", "dev.jsonl", MMLU)
    write(root / "hellaswag", "validation.jsonl", HELLASWAG)
    return root


@pytest.fixture(scope="module")
def manager() -> TaskManager:
    return TaskManager()


def stock_config(manager: TaskManager, name: str) -> dict:
    return manager._factory._load_full_config(manager._entry(name), None)


@pytest.mark.parametrize("name,rows", [("arc_easy", ARC), ("arc_challenge", ARC[1:])])
def test_arc_prompts_targets_and_metrics_are_stock(data_dir, manager, tmp_path, name, rows):
    [task] = load_offline_tasks([name], data_dir, manager, cache=tmp_path)
    stock = stock_config(manager, name)
    docs = list(task.validation_docs())
    assert len(docs) == len(rows) and task.config.test_split is None
    for doc, raw in zip(docs, rows):
        assert task.doc_to_text(doc) == apply_template(stock["doc_to_text"], raw)
        assert task.doc_to_choice(doc) == raw["choices"]["text"]
        assert task.doc_to_target(doc) == raw["choices"]["label"].index(raw["answerKey"])
    assert [m["metric"] for m in task.config.metric_list] == [m["metric"] for m in stock["metric_list"]]


def test_mmlu_group_splits_subjects_with_stock_prompts(data_dir, manager, tmp_path):
    [group] = load_offline_tasks(["mmlu"], data_dir, manager, cache=tmp_path)
    tasks = {t.task_name: t for t in group.get_all_tasks()}
    assert set(tasks) == {"mmlu_anatomy", "mmlu_elementary_mathematics"}  # partial data: just those subjects
    anatomy = tasks["mmlu_anatomy"]
    [doc] = list(anatomy.validation_docs())
    stock = stock_config(manager, "mmlu_anatomy")
    assert anatomy.doc_to_text(doc) == apply_template(stock["doc_to_text"], MMLU[1])
    assert anatomy.doc_to_text(doc).endswith("D. food\nAnswer:")
    assert anatomy.doc_to_target(doc) == 1 and anatomy.doc_to_choice(doc) == ["A", "B", "C", "D"]
    assert anatomy.config.fewshot_split == "dev"  # few-shot examples still come from the dev split


def test_hellaswag_keeps_its_preprocessing(data_dir, manager, tmp_path):
    [task] = load_offline_tasks(["hellaswag"], data_dir, manager, cache=tmp_path)
    stock = stock_config(manager, "hellaswag")
    [expected] = list(stock["process_docs"](datasets.Dataset.from_list(HELLASWAG)))
    [doc] = list(task.validation_docs())
    assert task.doc_to_text(doc) == expected["query"] == "Removing ice from car: Then, the man writes over the snow. Then"
    assert task.doc_to_choice(doc) == expected["choices"] and task.doc_to_target(doc) == 3


def test_errors_name_the_problem(tmp_path, manager):
    with pytest.raises(TaskDataError, match="not a folder"):
        load_offline_tasks(["arc_easy"], tmp_path / "missing", manager, cache=tmp_path)
    with pytest.raises(TaskDataError, match="no JSONL files"):
        load_offline_tasks(["hellaswag"], tmp_path, manager, cache=tmp_path)
    with pytest.raises(TaskDataError, match="supports"):
        load_offline_tasks(["gsm8k"], tmp_path, manager, cache=tmp_path)
    bad = tmp_path / "bad"
    (bad / "hellaswag").mkdir(parents=True)
    (bad / "hellaswag" / "validation.jsonl").write_text('{"ind": 1}\n{broken\n', encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"validation.jsonl:2: malformed JSON"):
        load_offline_tasks(["hellaswag"], bad, manager, cache=tmp_path)
