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

from lad.evaluation import main as lad_eval
from lad.finetune import main as lad_finetune
from lad.generate import main as lad_generate

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
DATA = REPO / "recipes" / "data" / "tiny_tasks.jsonl"
MASK = "<|reserved_special_token_0|>"  # the tiny recipe's mask token (a spare special of the byte tokenizer)
TOOLS = {"lad-finetune": lad_finetune, "lad-generate": lad_generate, "lad-eval": lad_eval}


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
    (root / "not_a_run").mkdir()
    (root / "not_a_run" / "adapter_config.json").write_text("{}", encoding="utf-8")
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
    variant(root, "run_pickle_adapter")
    adapter = root / "run_pickle_adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(adapter)), adapter.with_suffix(".bin"))
    adapter.unlink()
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAD_CACHE", str(tmp_path / "cache"))  # outside the workspace


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


F, G, E = "lad-finetune", "lad-generate", "lad-eval"
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
    ("output-holds-files", F, ft(out="{ws}/notes"), ["notes already holds files", "resume_from=latest"]),
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
    ("eval-base-other-width", E, ev("run_narrow"), ["the weights do not fit the base model", "narrow_base"]),
    ("eval-data-dir-missing", E, ev("run", "--data-dir", "{ws}/no_data"), ["no_data is not a folder"]),
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
    assert {c[1] for c in CASES} == set(TOOLS)


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
