"""A machine that cannot reach the Hugging Face hub: one line within seconds, naming what is missing and where
LAD looked, instead of a minute of retries and a traceback; what is in the local cache still loads.

The hub is made unreachable with a fake endpoint (a closed local port: refused at once) or HF_HUB_OFFLINE=1, and
the cache is an empty (or hand-built) HF_HOME, so the tests never touch the network.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lad.modeling.byte_tokenizer import build_byte_tokenizer
from lad.modeling.load import load_tokenizer
from lad.modeling.locate import ModelNotFoundError
from lad.recipe import ModelSpec

REPO = Path(__file__).resolve().parents[1]
FAST = 30  # seconds, Python start and imports included (the retries alone took ~27-40 s)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def unreachable(tmp_path: Path, offline: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                            "HF_DATASETS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", LAD_CACHE=str(tmp_path / "lad"),
               PYTHONUNBUFFERED="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def lad(args: list[str], env: dict, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lad.cli", *args], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=180)
    return result, time.monotonic() - started


@pytest.mark.parametrize("offline", [False, True], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_a_mistyped_local_path_fails_in_one_line_without_retries(tmp_path, offline):
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\n", encoding="utf-8")
    result, seconds = lad(["distill", "--model", "runs/tiyn", "--prompts", str(prompts), "--out", "out.jsonl"],
                          unreachable(tmp_path, offline), tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lad-distill: error: model not found: runs/tiyn (did you mean "
                                                   "runs/tiny?): no such local folder"), result.stderr
    assert str(tmp_path / "hf" / "hub") in lines[0]  # where LAD looked
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached") in lines[0]
    assert seconds < FAST and not (tmp_path / "out.jsonl").exists()


def test_a_cached_hub_model_loads_when_the_hub_cannot_be_reached(tmp_path, tiny_model):
    """The hub does not answer: LAD switches to the cache at once (no retries) and the model loads from it."""
    snapshot = tmp_path / "hf" / "hub" / "models--lad-test--tiny" / "snapshots" / ("0" * 40)
    tiny_model("llama").save_pretrained(snapshot)
    build_byte_tokenizer().save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40, encoding="utf-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\n", encoding="utf-8")
    result, seconds = lad(["distill", "--model", "lad-test/tiny", "--prompts", str(prompts), "--out", "out.jsonl",
                           "--max-new-tokens", "3", "--quiet"], unreachable(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Retrying" not in result.stderr and seconds < FAST
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert row["instruction"] == "Say hi."


def test_lad_eval_without_data_dir_names_the_data_set_and_the_flag(tmp_path):
    from lad.run import LadInfo

    run = tmp_path / "run"
    run.mkdir()
    LadInfo(base_model={"name_or_path": "lad-test/none"}, mask_token="<|mask|>", mask_token_id=1,
            mask_token_added=False, vocab_size=266, shift=False, objective="mask", noise={}).save(run)
    result, seconds = lad(["eval", "--model", str(run), "--tasks", "arc_easy", "--limit", "2"],
                          unreachable(tmp_path), tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lad-eval: error: --tasks arc_easy: allenai/ai2_arc is not in the local data set "
                               f"cache ({tmp_path / 'hf' / 'datasets'}) and the Hugging Face hub")
    assert "--data-dir DIR" in lines[0] and "Retrying" not in result.stderr
    assert seconds < FAST  # checked before lm-eval indexes its thousands of task files (~10 s on 2 cores)


def test_a_hub_data_set_in_a_recipe_fails_in_one_line(tmp_path):
    result, seconds = lad(["finetune", str(REPO / "recipes" / "scratch_bytes.yaml"), f"output_dir={tmp_path / 'out'}"],
                          unreachable(tmp_path), tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "lad-finetune: error: roneneldan/TinyStories: not a local file or folder, not in the local data set cache")
    assert "Retrying" not in result.stderr and seconds < FAST and not (tmp_path / "out").exists()


def test_a_folder_without_tokenizer_files_says_so(tmp_path, tiny_model):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    with pytest.raises(ModelNotFoundError, match=r"model: no tokenizer files in this folder \(looked for "
                                                 r"tokenizer.json, tokenizer.model"):
        load_tokenizer(ModelSpec(name_or_path=str(tmp_path / "model")))
