"""eval/parity.py: settings → lad-eval flags, per-document records from lm-eval samples, the paired row and the
length diagnostic, on hand-made documents whose answers are known."""

import json

import numpy as np
import pytest

from eval import parity


def test_settings_become_lad_eval_flags():
    assert parity.setting_flags("parent") == ["--baseline", "ar"]
    assert parity.setting_flags("iters16") == ["--iters", "16", "--order", "l2r"]
    assert parity.setting_flags("exact-w8") == ["--iters", "100000", "--order", "l2r", "--lookahead", "8"]
    assert parity.setting_flags("conf32") == ["--iters", "32", "--order", "confidence"]
    for bad in ("parent-w2", "conf16-w4", "iters", "exact8"):
        with pytest.raises(SystemExit, match="--settings"):
            parity.setting_flags(bad)


def test_documents_read_from_lm_eval_samples(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [{"doc_id": 1, "target": 0, "arguments": [["ctx", " ab"], ["ctx", " abcdef"]],
             "filtered_resps": [[-2.0, False], [-3.0, False]]},
            {"doc_id": 0, "target": 1, "arguments": [["c", " x"], ["c", " yy"]], "filtered_resps": [[-1.0, True],
                                                                                                  [-1.5, False]]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = parity.documents(path)
    assert docs == [[0, 1, [-1.0, -1.5], [2, 3]], [1, 0, [-2.0, -3.0], [3, 7]]]
    out = parity.outcomes(docs)
    # doc 0: acc picks choice 0 (wrong); per character -0.5 vs -0.5: a tie, argmax takes the first (wrong)
    # doc 1: acc picks choice 0 (right); per character -0.667 vs -0.429 picks choice 1 (wrong)
    assert out["acc"].tolist() == [0.0, 1.0] and out["acc_norm"].tolist() == [0.0, 0.0]


def test_a_groups_documents_come_from_every_members_file(tmp_path):
    row = {"doc_id": 0, "target": 0, "arguments": [["c", " a"], ["c", " b"]], "filtered_resps": [[-1.0, True],
                                                                                                 [-2.0, False]]}
    files = []
    for member in ("mmlu_anatomy", "mmlu_astronomy"):
        path = tmp_path / f"samples_lad_{member}_2026-12-07T08-00-00.jsonl"  # as lad-eval names them
        path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "doc_id": 1}) + "\n")
        files.append(path)
    docs = parity.documents(files)
    assert [d[0] for d in docs] == ["mmlu_anatomy/000000", "mmlu_anatomy/000001", "mmlu_astronomy/000000",
                                    "mmlu_astronomy/000001"]  # the same doc_id in two subjects: two documents


def test_paired_row_and_length_slope():
    rng = np.random.default_rng(0)
    parent_docs, lad_docs = [], []
    for doc in range(40):
        chars = rng.integers(10, 60, size=4).tolist()
        ll = (-rng.uniform(5, 30, size=4)).tolist()
        gold = int(np.argmax(ll)) if doc % 2 else 0  # the parent is right on the odd documents at least
        parent_docs.append([doc, gold, ll, chars])
        # LAD: the parent's numbers plus 0.1 nats per character, plus a per-document constant (no effect)
        lad_docs.append([doc, gold, [x + 0.1 * c + doc for x, c in zip(ll, chars)], chars])
    lad = {"task": "t", "label": "run", "setting": "exact", "wall_s": 1.0, "docs": lad_docs[::-1] + [[99, 0, [0.0],
                                                                                                     [1]]]}
    row = parity.compare(lad, {"docs": parent_docs})
    assert row["n"] == 40  # matched by document id; the document the parent lacks is left out
    assert row["slope"] == pytest.approx(1.0)  # 0.1 nats per character = 1 nat per 10 characters
    assert row["offset"] == pytest.approx(np.mean(range(40)))  # the per-document constants, averaged
    a, b = parity.outcomes(lad_docs), parity.outcomes(parent_docs)
    assert row["acc"]["lad"] == pytest.approx(a["acc"].mean()) and row["acc"]["parent"] == pytest.approx(b["acc"].mean())
    assert row["acc"]["low"] <= row["acc"]["delta"] <= row["acc"]["high"]
    same = parity.compare({**lad, "docs": parent_docs}, {"docs": parent_docs})
    assert same["slope"] == 0.0 and same["offset"] == 0.0 and same["acc"]["delta"] == 0.0 and same["acc"]["p"] == 1.0
    assert same["same_answer"] == 1.0  # the argmax choice of every document, LAD's against the parent's
    flipped = [[d[0], d[1], [-x for x in d[2]], d[3]] for d in parent_docs]  # every argmax moves (distinct values)
    assert parity.compare({**lad, "docs": flipped}, {"docs": parent_docs})["same_answer"] == 0.0
