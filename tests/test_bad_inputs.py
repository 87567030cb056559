"""Bad input to lad-finetune, lad-generate and lad-eval: one clear error line, exit 2, nothing written.

One table, every case run in-process through the tool's `main(argv)`. For each case: the exit status is 2,
stderr holds exactly one `PROG: error: ...` line that names the problem (key, file, row or option) and no
traceback, and the workspace (every path, size and mtime under it) is unchanged: no output folder
created, no run touched. docs/reliability.md lists the same cases.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lad.demo import main as lad_demo
from lad.distill import main as lad_distill
from lad.evaluation import main as lad_eval
from lad.export import main as lad_export
from lad.finetune import main as lad_finetune
from lad.generate import main as lad_generate

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
DATA = REPO / "recipes" / "data" / "tiny_tasks.jsonl"
MASK = "<|reserved_special_token_0|>"  # the tiny recipe's mask token (a spare special of the byte tokenizer)
TOOLS = {"lad-finetune": lad_finetune, "lad-generate": lad_generate, "lad-eval": lad_eval, "lad-export": lad_export,
         "lad-distill": lad_distill, "lad-demo": lad_demo}


def rows(n: int = 40, **fields) -> str:
    lines = DATA.read_text(encoding="utf-8").splitlines()[:n]
    return "".join(json.dumps({**json.loads(line), **fields}) + "\n" for line in lines)


def tiny_base(folder: Path, *, pickle: bool = False, **config) -> None:
    """A random LLaMA shaped like the tiny recipe's (overrides in `config`), saved as a model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    options = {**dict(vocab_size=266, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False), **config}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **options))
    if pickle:
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)


def variant(ws: Path, name: str, edit=None, base: Path | None = None) -> None:
    """A copy of the trained run with its lad.json edited."""
    shutil.copytree(ws / "run", ws / name)
    info = json.loads((ws / name / "lad.json").read_text(encoding="utf-8"))
    if base is not None:
        info["base_model"]["name_or_path"] = str(base)
    if edit:
        edit(info)
    (ws / name / "lad.json").write_text(json.dumps(info), encoding="utf-8")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The workspace every case reads from; it must come out of every case exactly as it went in."""
    root = tmp_path_factory.mktemp("bad_inputs")
    assert lad_finetune([str(TINY), f"output_dir={root / 'run'}", "max_steps=2", "eval_every=0",
                         "save_every=0"]) == 0
    # recipes
    (root / "malformed.yaml").write_text("model:\n  init: scratch\n  config: [unclosed\n", encoding="utf-8")
    (root / "list.yaml").write_text("- max_steps: 3\n", encoding="utf-8")
    (root / "latin1.yaml").write_bytes("# r\xe9glages\nmax_steps: 3\n".encode("latin-1"))
    text = TINY.read_text(encoding="utf-8").replace("data/tiny_tasks.jsonl", str(DATA))
    (root / "typo.yaml").write_text(text.replace("batch_size: 16", "batch_sise: 16"), encoding="utf-8")
    (root / "dup.yaml").write_text(text + "max_steps: 3\n", encoding="utf-8")  # max_steps: 60 is on line 38
    laughs = "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
    (root / "laughs.yaml").write_text("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + laughs,
                                      encoding="utf-8")  # "billion laughs": 10^9 values once expanded
    (root / "recursive.yaml").write_text("model: &m {config: *m}\n", encoding="utf-8")
    # data
    (root / "no_output.jsonl").write_text('{"instruction": "Say hi.", "response": "hi"}\n', encoding="utf-8")
    (root / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    (root / "no_answer.jsonl").write_text(rows(output=""), encoding="utf-8")
    (root / "latin1.jsonl").write_bytes(rows(3).encode() + '{"instruction": "caf\xe9"}\n'.encode("latin-1"))
    (root / "broken.jsonl").write_text(rows(2) + '{"instruction": "x", "output": \n', encoding="utf-8")
    bad_row = {"instruction": "Repeat.", "input": "cat", "output": f"cat {MASK} cat"}
    (root / "masked.jsonl").write_text(rows(1) + json.dumps(bad_row) + "\n" + rows(30), encoding="utf-8")
    (root / "prompts_latin1.txt").write_bytes("caf\xe9?\n".encode("latin-1"))
    # output folders that must not be touched
    shutil.copytree(root / "run", root / "other_run")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("keep me", encoding="utf-8")
    (root / "a_file").write_text("not a folder", encoding="utf-8")
    (root / "results.json").write_text("{}", encoding="utf-8")
    (root / "summary.md").write_text("my notes", encoding="utf-8")  # lad-eval would write summary.json + .md
    (root / "not_a_run").mkdir()
    (root / "not_a_run" / "adapter_config.json").write_text("{}", encoding="utf-8")
    (root / "eval_data" / "arc_easy").mkdir(parents=True)  # local ARC-Easy: lad-eval gets as far as the model
    (root / "eval_data" / "arc_easy" / "validation.jsonl").write_text(json.dumps(
        {"id": "q1", "question": "What melts ice?", "choices": {"text": ["heat", "cold"], "label": ["A", "B"]},
         "answerKey": "A"}) + "\n", encoding="utf-8")
    # bases a run does not fit, and pickle-only weights
    tiny_base(root / "narrow_base", hidden_size=48)
    tiny_base(root / "deep_base", num_hidden_layers=3)
    tiny_base(root / "pickle_base", pickle=True)
    # runs whose lad.json or files were damaged or point at the wrong base
    variant(root, "run_narrow", base=root / "narrow_base")
    variant(root, "run_deep", base=root / "deep_base")
    variant(root, "run_missing_base", base=root / "no_such_base")
    variant(root, "run_vocab", lambda info: info.update(vocab_size=300))
    variant(root, "run_mask_id", lambda info: info.update(mask_token_id=5))
    variant(root, "run_newer", lambda info: info.update(format=99))
    variant(root, "run_fields", lambda info: info.pop("mask_token_id"))
    variant(root, "run_corrupt")
    (root / "run_corrupt" / "lad.json").write_text('{"mask_token": "<|res', encoding="utf-8")
    for name, file in (("run_ckpt_adapter", "adapter_model.safetensors"), ("run_ckpt_optimizer", "optimizer.pt")):
        variant(root, name)  # the checkpoint's file keeps its recorded size, its bytes are damaged
        path = root / name / "checkpoints" / "step-000002" / file
        data = bytearray(path.read_bytes())
        if file.endswith(".safetensors"):
            data[:8] = b"\xff" * 8  # the header length
        else:
            data[len(data) // 2] ^= 0xFF  # one byte inside a stored tensor: the zip CRC no longer holds
        path.write_bytes(bytes(data))
    variant(root, "run_pickle_adapter")
    adapter = root / "run_pickle_adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(adapter)), adapter.with_suffix(".bin"))
    adapter.unlink()
    # issue 27: lad.json of the wrong shape or field types; truncated, overwritten or missing files
    for name, text in (("run_json_list", "[1, 2]"), ("run_json_string", '"a run"')):
        variant(root, name)
        (root / name / "lad.json").write_text(text, encoding="utf-8")
    variant(root, "run_shift_str", lambda info: info.update(shift="yes"))
    variant(root, "run_mask_id_str", lambda info: info.update(mask_token_id="5"))
    variant(root, "run_base_int", lambda info: info.update(base_model=3))
    variant(root, "run_no_format", lambda info: info.pop("format"))
    variant(root, "run_format_str", lambda info: info.update(format="1"))
    variant(root, "run_adapter_half")
    half = root / "run_adapter_half" / "adapter_model.safetensors"
    half.write_bytes(half.read_bytes()[:half.stat().st_size // 2])
    for name, damaged in (("run_adapter_garbage", "adapter_model.safetensors"),
                          ("run_base_garbage", "base/model.safetensors"), ("run_tokenizer_garbage", "tokenizer.json"),
                          ("run_tok_config_garbage", "tokenizer_config.json"),
                          ("run_adapter_config_garbage", "adapter_config.json")):
        variant(root, name)  # the same size, every byte overwritten
        (root / name / damaged).write_bytes(b"\xff" * (root / name / damaged).stat().st_size)
    for name, gone in (("run_no_tok_config", "tokenizer_config.json"), ("run_no_tokenizer", "tokenizer.json")):
        variant(root, name)
        (root / name / gone).unlink()
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAD_CACHE", str(tmp_path / "cache"))  # outside the workspace


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


F, G, E, X, D, M = "lad-finetune", "lad-generate", "lad-eval", "lad-export", "lad-distill", "lad-demo"
RUN_ARGS = ["--prompt", "hi", "--iters", "2", "--max-new-tokens", "4"]


def ft(*overrides: str, recipe: str = str(TINY), out: str = "{ws}/new_run") -> list[str]:
    return [recipe, f"output_dir={out}", "max_steps=2", "eval_every=0", "save_every=0", *overrides]


def gen(run: str, *extra: str) -> list[str]:
    return ["--model", f"{{ws}}/{run}", *RUN_ARGS, *extra]


def ev(run: str, *extra: str) -> list[str]:
    return ["--model", f"{{ws}}/{run}", "--tasks", "arc_easy", "--limit", "2", *extra]


# (case id, tool, argv with {ws} for the workspace, substrings the one error line must hold)
CASES = [
    # ---- the recipe file
    ("yaml-malformed", F, ft(recipe="{ws}/malformed.yaml"), ["malformed.yaml: line 4, column 1 malformed YAML"]),
    ("yaml-not-a-mapping", F, ft(recipe="{ws}/list.yaml"), ["list.yaml", "expected a mapping of keys"]),
    ("yaml-missing-file", F, ft(recipe="{ws}/nope.yaml"), ["recipe file not found", "nope.yaml"]),
    ("yaml-not-utf8", F, ft(recipe="{ws}/latin1.yaml"), ["latin1.yaml: not UTF-8"]),
    ("key-misspelled-in-file", F, ft(recipe="{ws}/typo.yaml"),
     ["unknown key 'batch_sise' (did you mean 'batch_size'?)"]),
    # ---- keys, types and ranges
    ("key-unknown", F, ft("max_step=5"), ["unknown key 'max_step' (did you mean 'max_steps'?)"]),
    ("key-unknown-nested", F, ft("noise.objectiv=mask"),
     ["unknown key 'noise.objectiv' (did you mean 'noise.objective'?)"]),
    ("override-no-equals", F, ft("max_steps"), ["override 'max_steps': expected key=value"]),
    ("type-int", F, ft("batch_size=abc"), ["batch_size: expected an integer, got 'abc'"]),
    ("type-bool", F, ft("lora.enabled=maybe"), ["lora.enabled: expected true or false, got 'maybe'"]),
    ("type-list", F, ft("report_to=tensorboard"), ["report_to: expected a list"]),
    ("type-mapping", F, ft("model.config=7"), ["model.config: expected a mapping"]),
    ("choice-misspelled", F, ft("noise.objective=structurl"), ["noise.objective", "did you mean 'structural'?"]),
    ("range-dropout", F, ft("lora.dropout=1.5"), ["lora.dropout: must be in [0, 1), got 1.5"]),
    ("range-lr", F, ft("optim.lr=0"), ["optim.lr: must be > 0"]),
    ("range-t-min", F, ft("noise.t_min=0"), ["noise.t_min: must be in (0, 1)"]),
    ("range-batch-size", F, ft("batch_size=0"), ["batch_size: must be >= 1, got 0"]),
    ("range-max-length", F, ft("data.max_length=4"), ["data.max_length: must be >= 8, got 4"]),
    ("range-epochs", F, ft("max_steps=null", "epochs=-1"), ["epochs: must be > 0"]),
    ("no-steps-or-epochs", F, ft("max_steps=null"), ["set max_steps or epochs"]),
    ("no-train-data", F, ft("data.train=[]"), ["data.train: at least one data source is required"]),
    # ---- models
    ("model-missing", F, ft("model.init=pretrained", "model.config={}", "model.name_or_path={ws}/no_model"),
     ["model.name_or_path: model not found", "no_model"]),
    ("tokenizer-missing", F, ft("model.tokenizer={ws}/no_tokenizer"), ["model.tokenizer", "no_tokenizer"]),
    ("model-unsupported-architecture", F, ft("model.config.model_type=gpt2"), ["model_type 'gpt2' is not supported"]),
    ("model-pickle-only", F, ft("model.init=pretrained", "model.config={}", "model.name_or_path={ws}/pickle_base"),
     ["pickle_base: weights only as pickle (pytorch_model.bin)", "model.allow_pickle: true"]),
    ("mask-token-is-eos", F, ft("mask_token=<|eos|>"), ["mask_token '<|eos|>' is the tokenizer's bos/eos/pad/unk"]),
    # ---- data
    ("data-missing-file", F, ft("data.train.0.path={ws}/nope.jsonl"), ["data.train.0.path: file not found", "nope.jsonl"]),
    ("data-missing-field", F, ft("data.train.0.path={ws}/no_output.jsonl"),
     ["no_output.jsonl:1: missing field 'output'", "'response'"]),
    ("data-unknown-field-key", F, ft("data.train.0.fields={answer: response}"), ["unknown field key(s) ['answer']"]),
    ("data-empty", F, ft("data.train.0.path={ws}/empty.jsonl"), ["empty.jsonl has no rows"]),
    ("data-every-row-too-long", F, ft("data.max_length=8", "data.truncation=drop"),
     ["tiny_tasks.jsonl: no usable rows left"]),
    ("data-every-row-without-answer", F, ft("data.train.0.path={ws}/no_answer.jsonl"),
     ["no_answer.jsonl: no usable rows left"]),
    ("data-not-utf8", F, ft("data.train.0.path={ws}/latin1.jsonl"), ["latin1.jsonl:4: not valid UTF-8"]),
    ("data-malformed-json", F, ft("data.train.0.path={ws}/broken.jsonl"), ["broken.jsonl:3: malformed JSON"]),
    ("data-holds-mask-token", F, ft("data.train.0.path={ws}/masked.jsonl", "batch_size=4"),
     [f"mask_token '{MASK}' (id 262) occurs in the data at", "masked.jsonl:2"]),
    ("data-fewer-rows-than-a-step", F, ft("batch_size=100000"), ["fewer than one optimizer step needs"]),
    # ---- the output folder
    ("output-holds-another-run", F, ft(out="{ws}/other_run"), ["other_run already holds a LAD run", "overwrite=true"]),
    ("output-holds-files", F, ft(out="{ws}/notes"), ["notes already holds files: choose another folder"]),
    ("output-is-a-file", F, ft(out="{ws}/a_file"), ["a_file exists and is not a folder"]),
    ("resume-folder-missing", F, ft("resume_from={ws}/no_checkpoint"), ["resume_from: checkpoint folder not found"]),
    # ---- lad-generate
    ("generate-not-a-run", G, gen("not_a_run"), ["not_a_run is not a LAD run: no lad.json"]),
    ("generate-missing-folder", G, gen("nowhere"), ["nowhere is not a folder"]),
    ("generate-iters-zero", G, gen("run", "--iters", "0"), ["--iters must be >= 1, got 0"]),
    ("generate-iters-not-a-number", G, gen("run", "--iters", "many"), ["--iters: invalid int value: 'many'"]),
    ("generate-max-new-tokens-zero", G, gen("run", "--max-new-tokens", "0"), ["--max-new-tokens must be >= 1"]),
    ("generate-unknown-strategy", G, gen("run", "--strategy", "beam"), ["--strategy: invalid choice: 'beam'"]),
    ("generate-prompts-not-utf8", G, gen("run", "--prompts-file", "{ws}/prompts_latin1.txt"),
     ["cannot read --prompts-file", "prompts_latin1.txt"]),
    ("generate-lad-json-corrupt", G, gen("run_corrupt"), ["run_corrupt/lad.json: unreadable"]),
    ("generate-lad-json-newer", G, gen("run_newer"), ["newer LAD (format 99); upgrade LAD"]),
    ("generate-lad-json-missing-field", G, gen("run_fields"), ["run_fields/lad.json: missing mask_token_id"]),
    ("generate-base-other-width", G, gen("run_narrow"),
     ["the weights do not fit the base model", "narrow_base", "[16, 64] in the run, [16, 48] in the base"]),
    ("generate-base-other-depth", G, gen("run_deep"),
     ["the adapter does not fit the base model", "deep_base", "model.layers.2."]),
    ("generate-base-missing", G, gen("run_missing_base"), ["model not found", "no_such_base"]),
    ("generate-vocab-size-mismatch", G, gen("run_vocab"), ["vocab_size 300 does not match the run's tokenizer (266"]),
    ("generate-mask-id-mismatch", G, gen("run_mask_id"), [f"mask_token '{MASK}' is not id 5"]),
    ("generate-weights-missing", G, gen("run", "--weights", "checkpoints/step-999"),
     ["weights 'checkpoints/step-999': no such folder"]),
    ("generate-adapter-pickle-only", G, gen("run_pickle_adapter"), ["no adapter_model.safetensors"]),
    # ---- lad-eval
    ("eval-unknown-task", E, ["--model", "{ws}/run", "--tasks", "arc_eazy"], ["unknown task 'arc_eazy'", "'arc_easy'"]),
    ("eval-not-a-run", E, ev("not_a_run"), ["not_a_run is not a LAD run"]),
    ("eval-missing-folder", E, ev("nowhere"), ["nowhere is not a folder"]),
    ("eval-iters-zero", E, ev("run", "--iters", "0"), ["--iters must be >= 1, got 0"]),
    ("eval-iters-not-a-number", E, ev("run", "--iters", "x"), ["--iters: invalid int value: 'x'"]),
    ("eval-mc-samples-zero", E, ev("run", "--mc-samples", "0"), ["--mc-samples must be >= 1"]),
    ("eval-base-other-width", E, ev("run_narrow", "--data-dir", "{ws}/eval_data"),
     ["the weights do not fit the base model", "narrow_base"]),
    ("eval-data-dir-missing", E, ev("run", "--data-dir", "{ws}/no_data"), ["no_data is not a folder"]),
]
# issue 27: output paths, resume and interruption (lad/safety.py, lad/resume.py; tests/test_safety.py has the rest)
CASES += [
    ("output-empty-path", F, ft(out=""), ["output_dir: empty path"]),
    ("output-under-a-file", F, ft(out="{ws}/a_file/run"), ["a_file is a file, not a folder"]),
    ("output-inside-a-run", F, ft(out="{ws}/run/new"), ["lies inside the LAD run"]),
    ("output-overwrite-user-files", F, ft("overwrite=true", out="{ws}/notes"),
     ["notes: it holds files LAD did not write (todo.txt)", "overwrite or not"]),
    ("resume-in-a-users-folder", F, ft("resume_from=latest", out="{ws}/notes"), ["notes: not a LAD run"]),
    ("resume-changes-lora", F, ft("resume_from=latest", "lora.r=4", out="{ws}/run"),
     ["the recipe changes what the run is (lora.r: 16 in the run, 4 now)"]),
    ("resume-changes-lr-without-flag", F, ft("resume_from=latest", "optim.lr=0.01", out="{ws}/run"),
     ["optim.lr changes from 0.003 to 0.01; pass --allow-change optim.lr"]),
    ("resume-checkpoint-overwritten", F, ft("resume_from=latest", "max_steps=4", out="{ws}/run_ckpt_adapter"),
     ["step-000002/adapter_model.safetensors: not a readable safetensors file", "resume from an older checkpoint"]),
    ("resume-checkpoint-byte-flipped", F, ft("resume_from=latest", "max_steps=4", out="{ws}/run_ckpt_optimizer"),
     ["step-000002/optimizer.pt: not a readable PyTorch file", "resume from an older checkpoint"]),
    ("model-config-unbuildable", F, ft("model.config.hidden_size=1"),
     ["model.config: no llama model can be built from it", "not a multiple of the number of attention heads"]),
    ("lora-targets-match-nothing", F, ft("lora.target_modules=[q_prj]"),
     ["lora.target_modules: 'q_prj' matches no linear layer of the base model (its layers: down_proj"]),
    ("lora-targets-a-bare-name", F, ft("lora.target_modules=q_proj"), ["write a list: [q_proj]"]),
    ("resume-allow-change-unknown", F, ft("--allow-change", "seed", "resume_from=latest", out="{ws}/run"),
     ["--allow-change seed: not a setting a resume may change"]),
    ("export-into-its-own-run", X, ["{ws}/run", "--out", "{ws}/run/base", "--overwrite"], ["lies inside the LAD run"]),
    ("export-over-user-files", X, ["{ws}/run", "--out", "{ws}/notes", "--overwrite"],
     ["holds files LAD did not write (todo.txt)"]),
    ("export-over-a-run", X, ["{ws}/run", "--out", "{ws}/other_run", "--overwrite"], ["it is a LAD run, not a LAD export"]),
    ("export-empty-out", X, ["{ws}/run", "--out", ""], ["--out: empty path"]),
    ("distill-out-under-a-file", D, ["--model", "{ws}/pickle_base", "--prompts", "builtin", "--out", "{ws}/a_file/d.jsonl"],
     ["a_file is a file, not a folder"]),
    ("eval-output-path-exists", E, ev("run", "--output_path", "{ws}/results.json"), ["results.json already exists"]),
    ("eval-output-path-md-exists", E, ev("run", "--output_path", "{ws}/summary.json"), ["summary.md already exists"]),
    ("eval-output-path-under-a-file", E, ev("run", "--output_path", "{ws}/a_file/out"), ["a_file is a file, not a folder"]),
]
# issue 27: recipe values and YAML (duplicate keys, aliases, numeric ranges)
CASES += [
    ("yaml-duplicate-key", F, ft(recipe="{ws}/dup.yaml"),
     ["dup.yaml: line 46, column 1 malformed YAML: duplicate key 'max_steps' (first on line 41)"]),
    ("yaml-duplicate-key-in-override", F, ft("noise={objective: mask, objective: structural}"),
     ["override 'noise={objective: mask, objective: structural}': duplicate key 'objective'"]),
    ("yaml-alias-bomb", F, ft(recipe="{ws}/laughs.yaml"),
     ["laughs.yaml: line 4, column", "aliases expand this document past 10000 values (an alias bomb?)"]),
    ("yaml-recursive-alias", F, ft(recipe="{ws}/recursive.yaml"),
     ["recursive.yaml: line 1, column 20 malformed YAML: alias *m refers to a value that contains it"]),
    ("range-lr-nan", F, ft("optim.lr=nan"), ["optim.lr: must be a finite number, got nan"]),
    ("range-epochs-inf", F, ft("epochs=.inf"), ["epochs: must be a finite number, got inf"]),
    ("range-distill-weight-nan", F, ft("distill_weight=nan"), ["distill_weight: must be a finite number, got nan"]),
    ("range-seed", F, ft("seed=-1"), ["seed: must be in [0, 4294967295], got -1"]),
    ("range-lora-alpha", F, ft("lora.alpha=0"), ["lora.alpha: must be >= 1, got 0"]),
    ("range-weight-decay", F, ft("optim.weight_decay=-0.1"), ["optim.weight_decay: must be >= 0, got -0.1"]),
    ("range-eps", F, ft("optim.eps=0"), ["optim.eps: must be > 0, got 0.0"]),
    ("range-warmup-steps", F, ft("optim.warmup_steps=-1"), ["optim.warmup_steps: must be >= 0, got -1"]),
    ("range-grad-clip", F, ft("optim.grad_clip=-1"), ["optim.grad_clip: must be >= 0, got -1.0"]),
    ("range-val-max-examples", F, ft("data.val_max_examples=0"), ["data.val_max_examples: must be >= 1, got 0"]),
    ("range-max-rows", F, ft("data.train.0.max_rows=0"), ["data.train.0.max_rows: must be >= 1, got 0"]),
]
# issue 27: corrupt or foreign run folders, and CLI flags checked before any model loads
SAFETENSORS = "not a readable safetensors file, truncated or corrupt"
DIS = ["--model", "{ws}/run/base", "--prompts", "builtin", "--out", "{ws}/d.jsonl"]
CASES += [
    # ---- lad.json of the wrong shape or field types (lad.run.LadInfo.load, one place for every tool)
    ("generate-lad-json-a-list", G, gen("run_json_list"),
     ["run_json_list/lad.json: expected a JSON object of LAD settings, got a list"]),
    ("generate-lad-json-a-string", G, gen("run_json_string"),
     ["run_json_string/lad.json: expected a JSON object of LAD settings, got a string"]),
    ("generate-lad-json-shift-a-string", G, gen("run_shift_str"),
     ['run_shift_str/lad.json: shift: expected true or false, got "yes"']),
    ("generate-lad-json-mask-id-a-string", G, gen("run_mask_id_str"),
     ['run_mask_id_str/lad.json: mask_token_id: expected an integer, got "5"']),
    ("generate-lad-json-base-model-a-number", G, gen("run_base_int"),
     ["run_base_int/lad.json: base_model: expected a JSON object, got 3"]),
    ("generate-lad-json-no-format", G, gen("run_no_format"), ["run_no_format/lad.json: missing format"]),
    ("generate-lad-json-format-a-string", G, gen("run_format_str"),
     ['run_format_str/lad.json: format: expected an integer, got "1"']),
    # ---- truncated, overwritten or missing files
    ("generate-adapter-truncated", G, gen("run_adapter_half"),
     ["run_adapter_half/adapter_model.safetensors: " + SAFETENSORS]),
    ("generate-adapter-overwritten", G, gen("run_adapter_garbage"),
     ["run_adapter_garbage/adapter_model.safetensors: " + SAFETENSORS]),
    ("generate-base-weights-overwritten", G, gen("run_base_garbage"),
     ["run_base_garbage/base/model.safetensors: " + SAFETENSORS]),
    ("generate-adapter-config-overwritten", G, gen("run_adapter_config_garbage"),
     ["run_adapter_config_garbage/adapter_config.json: unreadable, truncated or corrupt"]),
    ("generate-tokenizer-overwritten", G, gen("run_tokenizer_garbage"),
     ["run_tokenizer_garbage/tokenizer.json: unreadable, truncated or corrupt"]),
    ("generate-tokenizer-config-missing", G, gen("run_no_tok_config"),
     ["run_no_tok_config: no tokenizer_config.json: the run's tokenizer files are missing"]),
    ("generate-tokenizer-json-missing", G, gen("run_no_tokenizer"), ["run_no_tokenizer: no tokenizer.json"]),
    ("eval-adapter-truncated", E, ev("run_adapter_half", "--data-dir", "{ws}/eval_data"),
     ["run_adapter_half/adapter_model.safetensors: " + SAFETENSORS]),
    ("eval-lad-json-a-list", E, ev("run_json_list"), ["run_json_list/lad.json: expected a JSON object"]),
    ("eval-tokenizer-config-overwritten", E, ev("run_tok_config_garbage", "--data-dir", "{ws}/eval_data"),
     ["run_tok_config_garbage/tokenizer_config.json: unreadable, truncated or corrupt"]),
    ("export-adapter-overwritten", X, ["{ws}/run_adapter_garbage", "--out", "{ws}/exported"],
     ["run_adapter_garbage/adapter_model.safetensors: " + SAFETENSORS]),
    ("export-lad-json-shift-a-string", X, ["{ws}/run_shift_str", "--out", "{ws}/exported"],
     ['run_shift_str/lad.json: shift: expected true or false, got "yes"']),
    ("export-tokenizer-json-missing", X, ["{ws}/run_no_tokenizer", "--out", "{ws}/exported"],
     ["run_no_tokenizer: no tokenizer.json"]),
    ("demo-adapter-truncated", M, ["--model", "{ws}/run_adapter_half"],
     ["run_adapter_half/adapter_model.safetensors: " + SAFETENSORS]),
    ("demo-lad-json-base-model-a-number", M, ["--model", "{ws}/run_base_int"], ["base_model: expected a JSON object"]),
    # ---- lad-generate flags, refused before the model loads and named as typed
    ("generate-noise-start-above-1", G, gen("run", "--noise-start", "2"), ["--noise-start must be in [0, 1], got 2.0"]),
    ("generate-early-stop-negative", G, gen("run", "--early-stop", "-1"),
     ["--early-stop must be >= 0 (0 = off), got -1"]),
    ("generate-block-length-zero", G, gen("run", "--block-length", "0"), ["--block-length must be >= 1, got 0"]),
    ("generate-block-length-not-dividing", G, gen("run", "--strategy", "confidence", "--block-length", "3"),
     ["--block-length 3 must divide --max-new-tokens (4)"]),
    ("generate-iters-fewer-than-blocks", G, gen("run", "--strategy", "threshold", "--block-length", "1"),
     ["--iters 2 is fewer than the 4 blocks of --block-length 1"]),
    ("generate-block-cache-without-prefix-cache", G,
     gen("run", "--strategy", "confidence", "--block-cache", "--no-prefix-cache"),
     ["--block-cache needs the prompt's cache: do not combine it with --no-prefix-cache"]),
    ("generate-threshold-negative", G, gen("run", "--threshold", "-1"),
     ["--threshold must be >= 0 (a probability; > 1 commits one token per step), got -1.0"]),
    ("generate-temperature-nan", G, gen("run", "--temperature", "nan"), ["--temperature must be >= 0, got nan"]),
    ("generate-pause-nan", G, gen("run", "--pause", "nan"), ["--pause must be a number of seconds >= 0, got nan"]),
    ("generate-seed-too-big", G, gen("run", "--seed", str(2**64)), [f"--seed must be a 64-bit integer, got {2**64}"]),
    ("generate-device-unknown", G, gen("run", "--device", "gpu0"), ["--device gpu0: not a torch device"]),
    # ---- lad-eval flags, lm-eval's included
    ("eval-tasks-empty", E, ["--model", "{ws}/run", "--tasks", ","], ["--tasks ',': no task names"]),
    ("eval-limit-zero", E, ev("run", "--limit", "0"),
     ["--limit must be a number of examples (>= 1) or a fraction in (0, 1), got 0.0"]),
    ("eval-limit-negative", E, ev("run", "--limit", "-5"), ["--limit must be a number of examples", "got -5.0"]),
    ("eval-limit-not-whole", E, ev("run", "--limit", "2.5"), ["--limit must be a number of examples", "got 2.5"]),
    ("eval-limit-infinite", E, ev("run", "--limit", "inf"), ["--limit must be a number of examples", "got inf"]),
    ("eval-num-fewshot-negative", E, ev("run", "--num_fewshot", "-1"), ["--num_fewshot must be >= 0, got -1"]),
    ("eval-batch-size-zero", E, ev("run", "--batch_size", "0"),
     ["--batch_size must be a whole number >= 1 (or auto), got '0'"]),
    ("eval-batch-size-negative", E, ev("run", "--batch_size", "-4"), ["--batch_size must be a whole number", "'-4'"]),
    ("eval-batch-size-garbage", E, ev("run", "--batch_size", "big"), ["--batch_size must be a whole number", "'big'"]),
    ("eval-strategy-unknown", E, ev("run", "--strategy", "beam"), ["--strategy: invalid choice: 'beam'"]),
    ("eval-seed-negative", E, ev("run", "--seed", "-1"),
     ["--seed must be in [0, 2**32 - 1] (numpy's seed range), got -1"]),
    ("eval-bootstrap-iters-negative", E, ev("run", "--bootstrap_iters", "-1"), ["--bootstrap_iters must be >= 0"]),
    ("eval-compare-with-baseline-ar", E, ev("run", "--compare", "--baseline", "ar"),
     ["--compare already scores the AR parent next to the LAD model: drop --baseline ar"]),
    ("eval-include-path-missing", E, ev("run", "--include_path", "{ws}/no_tasks"),
     ["--include_path {ws}/no_tasks: no such folder"]),
    ("eval-device-unknown", E, ev("run", "--device", "gpu0"), ["--device gpu0: not a torch device"]),
    # ---- lad-distill flags (checked before the parent loads)
    ("distill-max-new-tokens-zero", D, [*DIS, "--max-new-tokens", "0"], ["--max-new-tokens must be >= 1, got 0"]),
    ("distill-batch-size-zero", D, [*DIS, "--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
    ("distill-temperature-zero", D, [*DIS, "--sample", "--temperature", "0"],
     ["--temperature must be > 0 (sampling), got 0.0"]),
    ("distill-top-p-above-1", D, [*DIS, "--sample", "--top-p", "2"], ["--top-p must be in (0, 1], got 2.0"]),
    ("distill-top-k-negative", D, [*DIS, "--sample", "--top-k", "-1"], ["--top-k must be >= 0 (0 = off), got -1"]),
    ("distill-device-unknown", D, [*DIS, "--device", "gpu0"], ["--device gpu0: not a torch device"]),
    ("distill-dtype-unknown", D, [*DIS, "--dtype", "fp8"],
     ["argument --dtype: invalid choice: 'fp8'", "(see lad-distill --help)"]),
    # ---- lad-demo flags (a valid set would start the server)
    ("demo-host-not-here", M, ["--model", "{ws}/run", "--host", "203.0.113.7"],
     ["--host 203.0.113.7: cannot listen on this address"]),
    ("demo-device-unknown", M, ["--model", "{ws}/run", "--device", "gpu0"], ["--device gpu0: not a torch device"]),
]


@pytest.mark.parametrize("tool, argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(ws, capsys, tool, argv, expected):
    argv = [a.replace("{ws}", str(ws)) for a in argv]
    capsys.readouterr()
    before = tree(ws)
    try:
        code = TOOLS[tool](argv)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1 and errors[0].startswith(f"{tool}: error: "), err
    for text in expected:
        assert text.replace("{ws}", str(ws)) in errors[0], errors[0]
    assert tree(ws) == before, "the workspace changed"


def test_the_table_is_big_and_every_case_is_distinct():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)
    assert {c[1] for c in CASES} <= set(TOOLS)


def test_allow_pickle_loads_pickle_weights_when_asked(ws, tmp_path):
    """The refusal above is a default, not a dead end: model.allow_pickle: true loads the same folder."""
    out = tmp_path / "pickled"
    assert lad_finetune(ft("model.init=pretrained", "model.config={}", f"model.name_or_path={ws / 'pickle_base'}",
                           "model.allow_pickle=true", out=str(out))) == 0
    assert json.loads((out / "lad.json").read_text())["base_model"]["allow_pickle"] is True
    assert (out / "adapter_model.safetensors").is_file()


def test_safe_defaults(tmp_path):
    """trust_remote_code off, pickle off, recipes read with yaml.safe_load (a Python tag is refused)."""
    from lad.recipe import ModelSpec, RecipeError, load_recipe

    spec = ModelSpec()
    assert spec.trust_remote_code is False and spec.allow_pickle is False
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"max_steps: !!python/object/apply:os.system ['touch {tmp_path}/owned']\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="malformed YAML"):
        load_recipe(recipe)
    assert not (tmp_path / "owned").exists()


def test_package_builds_no_shell_and_unpickles_nothing_unsafely():
    """Source scan of lad/: no shell command lines, no yaml.load / pickle, torch.load only with weights_only."""
    import re

    found = []
    for path in sorted((REPO / "lad").rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            bad = re.search(r"shell\s*=\s*True|os\.system\(|os\.popen\(|yaml\.load\(|yaml\.unsafe_load|"
                            r"pickle\.loads?\(|dill\.|(?<![\w.])eval\(|(?<![\w.])exec\(", code)
            if bad or ("torch.load(" in code and "weights_only=True" not in code):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []
