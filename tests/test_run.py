"""The run directory: lad.json, output_dir safety, atomic checkpoints, corrupt-checkpoint detection."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lad import __version__
from lad.atomic import commit_folder, staging_dir
from lad.checkpoints import (checkpoint_problem, latest_checkpoint, list_checkpoints, load_checkpoint_state,
                             save_checkpoint)
from lad.run import CHECKPOINTS, LAD_FORMAT, LadInfo, RunDirError, load_run, prepare_output_dir
from lad.safety import PathError


def make_info(**changes) -> LadInfo:
    info = LadInfo(base_model={"name_or_path": "./base", "init": "pretrained"}, mask_token="<|mask|>",
                   mask_token_id=262, mask_token_added=True, vocab_size=266, shift=False, objective="mixed",
                   noise={"objective": "mixed", "t_min": 0.001}, prompt_style="plain", max_length=128)
    return dataclasses.replace(info, **changes)


# ---------------------------------------------------------------- lad.json


def test_lad_info_round_trip(tmp_path):
    info = make_info(step=40, adapter="full", eos_padding=True, extra={"val_loss": 1.5})
    info.save(tmp_path)
    assert (tmp_path / "lad.json").is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed
    loaded = LadInfo.load(tmp_path)
    assert loaded == info
    data = json.loads((tmp_path / "lad.json").read_text(encoding="utf-8"))
    assert data["format"] == LAD_FORMAT and data["lad_version"] == __version__
    assert data["mask_token"] == "<|mask|>" and data["mask_token_id"] == 262 and data["step"] == 40


def test_lad_info_ignores_unknown_fields_of_same_format(tmp_path):
    data = dataclasses.asdict(make_info())
    data["something_new"] = 1
    (tmp_path / "lad.json").write_text(json.dumps(data), encoding="utf-8")
    assert LadInfo.load(tmp_path) == make_info()


def test_lad_info_refuses_newer_format(tmp_path):
    data = dataclasses.asdict(make_info())
    data["format"] = LAD_FORMAT + 1
    (tmp_path / "lad.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RunDirError, match=rf"newer LAD \(format {LAD_FORMAT + 1}\)"):
        LadInfo.load(tmp_path)


def test_lad_info_refuses_missing_fields(tmp_path):
    data = dataclasses.asdict(make_info())
    del data["mask_token_id"], data["shift"]
    del data["step"]  # has a default: not required
    (tmp_path / "lad.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RunDirError) as info:
        LadInfo.load(tmp_path)
    assert str(info.value) == f"{tmp_path / 'lad.json'}: missing mask_token_id, shift"


def test_lad_info_refuses_an_objective_that_disagrees_with_its_noise(tmp_path):
    """lad.json keeps `objective` beside noise.objective for older readers; a hand edit of one is caught."""
    data = dataclasses.asdict(make_info())
    data["objective"] = "mask"
    (tmp_path / "lad.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RunDirError) as info:
        LadInfo.load(tmp_path)
    assert str(info.value) == (f"{tmp_path / 'lad.json'}: objective: 'mask' disagrees with noise.objective 'mixed' "
                               "(edited by hand?)")


def test_lad_info_refuses_corrupt_json(tmp_path):
    (tmp_path / "lad.json").write_text('{"mask_token": ', encoding="utf-8")
    with pytest.raises(RunDirError, match="unreadable"):
        LadInfo.load(tmp_path)


def test_folder_without_lad_json_is_not_a_run(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(RunDirError, match="is not a LAD run"):
        LadInfo.load(tmp_path)
    with pytest.raises(RunDirError, match="is not a LAD run"):
        load_run(tmp_path)
    with pytest.raises(RunDirError, match="is not a folder"):
        load_run(tmp_path / "missing")


# ---------------------------------------------------------------- output_dir


def test_prepare_output_dir_creates_missing_and_accepts_empty(tmp_path):
    out = prepare_output_dir(str(tmp_path / "a" / "b"), overwrite=False, resuming=False)
    assert out == tmp_path / "a" / "b" and out.is_dir()
    (tmp_path / "empty").mkdir()
    assert prepare_output_dir(str(tmp_path / "empty"), overwrite=False, resuming=False).is_dir()


def test_prepare_output_dir_refuses_non_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me", encoding="utf-8")
    for overwrite in (False, True):  # files LAD did not write: overwrite=true is no way out either
        with pytest.raises(PathError) as info:
            prepare_output_dir(str(tmp_path), overwrite=overwrite, resuming=False)
        message = str(info.value)
        assert ("already holds files: choose another folder" in message if not overwrite else
                "it holds files LAD did not write (notes.txt)" in message)
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_prepare_output_dir_names_an_existing_run(tmp_path):
    make_info().save(tmp_path)
    with pytest.raises(PathError, match="already holds a LAD run: pass overwrite=true"):
        prepare_output_dir(str(tmp_path), overwrite=False, resuming=False)


def test_prepare_output_dir_refuses_a_file(tmp_path):
    (tmp_path / "out").write_text("x", encoding="utf-8")
    with pytest.raises(PathError, match="is not a folder"):
        prepare_output_dir(str(tmp_path / "out"), overwrite=True, resuming=False)


def test_prepare_output_dir_overwrite_removes_old_files(tmp_path):
    out = tmp_path / "run"
    (out / CHECKPOINTS / "step-000010").mkdir(parents=True)
    (out / CHECKPOINTS / "step-000010" / "state.json").write_text("{}", encoding="utf-8")
    (out / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    assert prepare_output_dir(str(out), overwrite=True, resuming=False) == out
    assert [p.name for p in out.iterdir()] == ["recipe.yaml"]  # the new run's marker, written at once
    assert (out / "recipe.yaml").read_text().startswith("# lad-finetune run recipe")


def test_prepare_output_dir_resuming_keeps_files(tmp_path):
    (tmp_path / CHECKPOINTS / "step-000010").mkdir(parents=True)
    (tmp_path / CHECKPOINTS / "step-000010" / "state.json").write_text("{}", encoding="utf-8")
    (tmp_path / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    for overwrite in (False, True):
        prepare_output_dir(str(tmp_path), overwrite=overwrite, resuming=True)
        assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == "{}\n"
        assert (tmp_path / CHECKPOINTS / "step-000010").is_dir()


# ---------------------------------------------------------------- checkpoints


class TinyModel(torch.nn.Module):
    """Stands in for a PeftModel: `save_pretrained` writes adapter files."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.fail = False

    def save_pretrained(self, folder, safe_serialization=True):
        assert safe_serialization
        if self.fail:
            raise OSError("disk full")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                  str(Path(folder) / "adapter_model.safetensors"))
        (Path(folder) / "adapter_config.json").write_text('{"r": 4}', encoding="utf-8")


def make_training(lr: float = 0.1):
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        model.linear(torch.ones(2, 4)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def save(out: Path, step: int, training, keep: int = 2, info: LadInfo | None = None) -> Path:
    model, optimizer, scheduler = training
    return save_checkpoint(out, step, model=model, optimizer=optimizer, scheduler=scheduler,
                           state={"best_val": 2.5, "tokens": 10 * step}, info=info or make_info(), keep=keep)


def hidden_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.startswith("."))


def test_save_checkpoint_layout_and_state(tmp_path):
    training = make_training()
    train_steps(*training, 3)
    folder = save(tmp_path, 3, training)
    assert folder == tmp_path / CHECKPOINTS / "step-000003"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "lad.json", "optimizer.pt",
                     "scheduler.pt", "state.json"]
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    assert state["step"] == 3 and state["best_val"] == 2.5 and state["tokens"] == 30
    assert state["files"] == {name: (folder / name).stat().st_size for name in names if name != "state.json"}
    assert LadInfo.load(folder).step == 3  # the checkpoint's lad.json records its step
    assert checkpoint_problem(folder) is None
    assert hidden_entries(tmp_path) == []  # no .tmp- staging folder, no .old- folder, no .json.tmp file


def test_save_checkpoint_keeps_newest(tmp_path):
    training = make_training()
    for step in (10, 20, 30, 40):
        train_steps(*training, 1)
        save(tmp_path, step, training, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000030", "step-000040"]
    save(tmp_path, 50, training, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000050"]
    assert hidden_entries(tmp_path) == []
    assert latest_checkpoint(tmp_path) == tmp_path / CHECKPOINTS / "step-000050"


def test_checkpoint_order_is_numeric_past_six_digits(tmp_path):
    training = make_training()
    for step in (999_999, 1_000_000, 20):
        save(tmp_path, step, training, keep=5)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000020", "step-999999", "step-1000000"]
    assert latest_checkpoint(tmp_path).name == "step-1000000"
    save(tmp_path, 1_000_001, training, keep=2)  # pruning drops the oldest, not the newest
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1000000", "step-1000001"]


def test_failed_save_leaves_previous_checkpoint_usable(tmp_path):
    training = make_training()
    first = save(tmp_path, 10, training)
    training[0].fail = True
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 20, training)
    assert list_checkpoints(tmp_path) == [first]  # the staging folder is not a checkpoint
    assert latest_checkpoint(tmp_path) == first
    training[0].fail = False
    save(tmp_path, 20, training)  # the leftover staging folder is cleaned up by the next save
    assert hidden_entries(tmp_path) == []
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000010", "step-000020"]


def test_resaving_the_same_step_replaces_it(tmp_path):
    training = make_training()
    save(tmp_path, 10, training)
    train_steps(*training, 2)
    folder = save(tmp_path, 10, training)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert torch.equal(saved["linear.weight"], training[0].linear.weight.detach())
    assert hidden_entries(tmp_path) == []


def test_commit_folder_replaces_existing_folder(tmp_path):
    final = tmp_path / "best"
    final.mkdir()
    (final / "old.txt").write_text("old", encoding="utf-8")
    tmp = staging_dir(final)
    assert tmp.name == ".tmp-best" and tmp.is_dir()
    (tmp / "new.txt").write_text("new", encoding="utf-8")
    commit_folder(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_checkpoint_problem_missing_file(tmp_path):
    folder = save(tmp_path, 5, make_training())
    (folder / "optimizer.pt").unlink()
    assert checkpoint_problem(folder) == "optimizer.pt is missing"


def test_checkpoint_problem_truncated_file(tmp_path):
    folder = save(tmp_path, 5, make_training())
    path = folder / "adapter_model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 7)
    assert checkpoint_problem(folder) == f"adapter_model.safetensors has {size - 7} bytes, expected {size}"


def test_checkpoint_problem_missing_state(tmp_path):
    folder = save(tmp_path, 5, make_training())
    (folder / "state.json").unlink()
    assert checkpoint_problem(folder) == "no state.json (interrupted while saving?)"


def test_checkpoint_problem_corrupt_state(tmp_path):
    folder = save(tmp_path, 5, make_training())
    text = (folder / "state.json").read_text(encoding="utf-8")
    (folder / "state.json").write_text(text[: len(text) // 2], encoding="utf-8")
    assert checkpoint_problem(folder) == "state.json is corrupt"


def test_latest_checkpoint_skips_corrupt_newest(tmp_path, caplog):
    training = make_training()
    save(tmp_path, 10, training, keep=3)
    good = save(tmp_path, 20, training, keep=3)
    bad = save(tmp_path, 30, training, keep=3)
    with open(bad / "optimizer.pt", "r+b") as fh:
        fh.truncate(3)
    with caplog.at_level(logging.WARNING, logger="lad.run"):
        assert latest_checkpoint(tmp_path) == good
    assert "skipping checkpoint" in caplog.text and "step-000030" in caplog.text
    (good / "state.json").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / CHECKPOINTS / "step-000010"


def test_latest_checkpoint_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / CHECKPOINTS / "step-000010").mkdir(parents=True)  # never completed: no state.json
    (tmp_path / CHECKPOINTS / "notes").mkdir()
    assert latest_checkpoint(tmp_path) is None


def test_load_checkpoint_state_restores_weights_optimizer_scheduler(tmp_path, monkeypatch):
    import lad.checkpoints

    training = make_training()
    train_steps(*training, 3)
    folder = save(tmp_path, 3, training)
    expected_weight = training[0].linear.weight.detach().clone()
    train_steps(*training, 2)  # the reference continues two more steps
    reference = training[0].linear.weight.detach().clone()

    fresh = make_training()
    # TinyModel is not a PeftModel: read its adapter file as a plain state dict
    monkeypatch.setattr(lad.checkpoints, "load_trainable_weights",
                        lambda model, f: model.load_state_dict(load_file(str(f / "adapter_model.safetensors"))))
    read = []  # the files' bytes are read once per resume: plan_resume reads them, then says verified=True
    monkeypatch.setattr(lad.checkpoints, "checkpoint_files_problem", lambda f: read.append(f))
    other = make_training()
    load_checkpoint_state(folder, model=other[0], optimizer=other[1], scheduler=other[2], verified=True)
    assert read == []
    state = load_checkpoint_state(folder, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2])
    assert state["step"] == 3 and state["tokens"] == 30 and read == [folder]
    assert torch.equal(fresh[0].linear.weight, expected_weight)
    assert fresh[2].last_epoch == 3
    train_steps(*fresh, 2)
    assert torch.equal(fresh[0].linear.weight, reference)  # optimizer moments and lr restored exactly


def test_load_checkpoint_state_refuses_broken_checkpoint(tmp_path):
    training = make_training()
    folder = save(tmp_path, 3, training)
    (folder / "scheduler.pt").unlink()
    with pytest.raises(RunDirError, match="unusable: scheduler.pt is missing"):
        load_checkpoint_state(folder, model=training[0], optimizer=training[1], scheduler=training[2])


@pytest.mark.parametrize("name, damage, message", [
    ("adapter_model.safetensors", "garbage", "not a readable safetensors file, truncated or corrupt"),
    ("optimizer.pt", "garbage", "not a readable PyTorch file, truncated or corrupt"),
    ("optimizer.pt", "flip", "not a readable PyTorch file, truncated or corrupt"),  # CRC of one stored tensor
    ("scheduler.pt", "garbage", "not a readable PyTorch file, truncated or corrupt"),
])
def test_load_checkpoint_state_names_an_overwritten_file(tmp_path, name, damage, message):
    """Same size as state.json records (checkpoint_problem passes), contents damaged: one RunDirError naming the
    file, raised before any weight, moment or learning rate of the model is touched."""
    training = make_training()
    train_steps(*training, 3)  # the optimizer holds moments
    folder = save(tmp_path, 3, training)
    path = folder / name
    data = bytearray(path.read_bytes())
    if damage == "garbage":
        data = bytearray(b"\xff" * len(data))
    else:
        import zipfile

        with zipfile.ZipFile(path) as archive:  # flip one byte inside the first tensor's stored data
            entry = next(i for i in archive.infolist() if "/data/" in i.filename)
            with archive.open(entry) as fh:
                start = data.index(fh.read(), entry.header_offset)
        data[start] ^= 0xFF
    path.write_bytes(bytes(data))
    assert checkpoint_problem(folder) is None
    fresh = make_training()
    before = fresh[0].linear.weight.detach().clone()
    with pytest.raises(RunDirError) as info:
        load_checkpoint_state(folder, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2])
    assert str(info.value).startswith(f"{path}: {message}")
    assert torch.equal(fresh[0].linear.weight, before) and fresh[2].last_epoch == 0


def test_load_checkpoint_state_names_an_optimizer_of_another_model(tmp_path, monkeypatch):
    import lad.checkpoints

    monkeypatch.setattr(lad.checkpoints, "load_trainable_weights",  # TinyModel is not a PeftModel
                        lambda model, f: model.load_state_dict(load_file(str(f / "adapter_model.safetensors"))))
    training = make_training()
    folder = save(tmp_path, 3, training)
    other = torch.nn.Linear(2, 2)
    torch.save(torch.optim.SGD([other.weight, other.bias, torch.nn.Parameter(torch.ones(1))], lr=0.1).state_dict(),
               folder / "optimizer.pt")
    state = json.loads((folder / "state.json").read_text())
    state["files"]["optimizer.pt"] = (folder / "optimizer.pt").stat().st_size
    (folder / "state.json").write_text(json.dumps(state))
    fresh = make_training()
    with pytest.raises(RunDirError, match=r"optimizer.pt: does not fit this run's optimizer \(.*\); was the "):
        load_checkpoint_state(folder, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2])


def test_lad_json_also_says_chat_template_for_older_readers_and_the_two_must_agree(tmp_path):
    make_info(prompt_style="raw").save(tmp_path)
    data = json.loads((tmp_path / "lad.json").read_text())
    assert data["prompt_style"] == "raw" and data["chat_template"] == "raw"  # LAD before prompt_style reads this
    (tmp_path / "lad.json").write_text(json.dumps({**data, "chat_template": True}), encoding="utf-8")
    with pytest.raises(RunDirError, match=r"prompt_style: 'raw' disagrees with chat_template true \(edited by hand\?\)"):
        LadInfo.load(tmp_path)


@pytest.mark.parametrize("old, style", [(True, "chat"), (False, "plain"), ("raw", "raw")])
def test_a_lad_json_from_before_prompt_style_reads_the_same(tmp_path, old, style):
    data = dataclasses.asdict(make_info())
    del data["prompt_style"]
    (tmp_path / "lad.json").write_text(json.dumps({**data, "chat_template": old}), encoding="utf-8")
    info = LadInfo.load(tmp_path)
    assert info.prompt_style == style and info.chat_template == old


@pytest.mark.parametrize("field, value, message", [
    ("shift", "yes", 'shift: expected true or false, got "yes"'),
    ("mask_token_id", "5", 'mask_token_id: expected an integer, got "5"'),
    ("vocab_size", True, "vocab_size: expected an integer, got true"),
    ("base_model", 3, "base_model: expected a JSON object, got 3"),
    ("base_model", {"name_or_path": 7}, "base_model.name_or_path: expected a string or null, got 7"),
    ("noise", [], "noise: expected a JSON object, got []"),
    ("chat_template", "yes", 'chat_template: expected true, false or "raw", got "yes"'),
    ("prompt_style", True, 'prompt_style: expected "chat", "plain" or "raw", got true'),
    ("attention", "sideways", 'attention: expected "bidirectional", "prompt_causal" or "block_causal", got "sideways"'),
    ("block_size", 0, "block_size: expected an integer >= 1 or null, got 0"),
    ("adapter", "qlora", 'adapter: expected "lora" or "full", got "qlora"'),
    ("format", "1", 'format: expected an integer, got "1"'),
    ("format", 0, "format: must be >= 1, got 0"),
    ("step", -1, "step: must be >= 0, got -1"),
    ("mask_token_id", 266, "mask_token_id: must be in [0, vocab_size 266), got 266"),
])
def test_lad_info_refuses_fields_of_the_wrong_type(tmp_path, field, value, message):
    data = {**dataclasses.asdict(make_info()), field: value}
    (tmp_path / "lad.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RunDirError) as info:
        LadInfo.load(tmp_path)
    assert str(info.value) == f"{tmp_path / 'lad.json'}: {message}"


@pytest.mark.parametrize("text, message", [("[1, 2]", "got a list"), ('"a run"', "got a string"),
                                           ("null", "got null")])
def test_lad_info_refuses_json_that_is_not_an_object(tmp_path, text, message):
    (tmp_path / "lad.json").write_text(text, encoding="utf-8")
    with pytest.raises(RunDirError, match=f"expected a JSON object of LAD settings, {message}"):
        LadInfo.load(tmp_path)
