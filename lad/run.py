"""The run directory: `lad.json` (`LadInfo`), the output folder, and `load_run` (atomic writes: lad/atomic.py;
checkpoints and resume: lad/checkpoints.py).

Layout of `output_dir`:

    adapter_config.json, adapter_model.safetensors   final PEFT adapter (PeftModel.from_pretrained works)
    model.safetensors, config.json                   instead of the adapter when every weight was trained
    tokenizer files                                  the tokenizer as trained (incl. an added mask token)
    lad.json                                         everything sampling and scoring need (see LadInfo)
    recipe.yaml, metrics.jsonl
    base/                                            the base model, only for `init: scratch` runs
    best/                                            weights with the best validation loss, with its lad.json
    checkpoints/step-000100/                         resumable: weights, optimizer.pt, scheduler.pt, state.json

`lad.json` is the single source of the mask token, shift, objective and base-model reference downstream.
Checkpoints are written to a temporary folder, fsynced and renamed, with file sizes recorded in
`state.json`, so a partial or corrupt checkpoint is detected and skipped in favour of an older one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .atomic import write_json
from .integrity import (PROMPT_STYLES, files_problem, json_kind, lad_field_problem, lad_json_problem,
                        safetensors_problem, tokenizer_files_problem)

log = logging.getLogger(__name__)

LAD_FORMAT = 1
CHECKPOINTS = "checkpoints"


class RunDirError(ValueError):
    """A folder is not a (complete) LAD run, or cannot be written as one."""


@dataclass
class LadInfo:
    base_model: dict  # the recipe's `model` section; name_or_path relative to the run for scratch bases
    mask_token: str
    mask_token_id: int
    mask_token_added: bool
    vocab_size: int
    shift: bool
    objective: str
    noise: dict
    adapter: str = "lora"  # "lora" | "full": how it was trained
    merged: bool = False  # true: an exported folder, the weights (adapter merged in) are the folder's own
    prompt_style: str = "chat"  # PROMPT_STYLES: how a user's prompt is rendered, as training rendered it
    max_length: int = 512
    eos_padding: bool = False
    attention: str = "bidirectional"  # lad/modeling/attention.py: bidirectional, prompt_causal, block_causal
    block_size: int | None = None  # block_causal: the answer block length it was trained with
    lora_gate: str = "none"  # "masked": the adapter acts only at mask columns (lad/modeling/gate.py)
    step: int = 0
    lad_version: str = __version__
    format: int = LAD_FORMAT
    extra: dict = field(default_factory=dict)

    @property
    def chat_template(self) -> bool | str:
        """The samplers' `chat_template` argument for this run's prompts (True, False or "raw")."""
        return PROMPT_STYLES[self.prompt_style]

    @property
    def strategy(self) -> str:
        """The sampler this run is best read with (lad/defaults.py: from the objective it trained on)."""
        from .defaults import strategy_for

        return strategy_for(self.objective)

    @property
    def score_order(self) -> str:
        """The reveal order lad-eval scores this run with by default."""
        from .defaults import SCORE_ORDER

        return SCORE_ORDER

    def save(self, folder: str | os.PathLike) -> None:
        # chat_template: prompt_style as LAD before it reads it (lad/integrity.py checks that the two agree)
        write_json(Path(folder) / "lad.json", {**dataclasses.asdict(self), "chat_template": self.chat_template})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "LadInfo":
        path = Path(folder) / "lad.json"
        if not path.is_file():
            raise RunDirError(f"{folder} is not a LAD run: no lad.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunDirError(f"{path}: unreadable ({err})") from None
        if not isinstance(data, dict):
            raise RunDirError(f"{path}: expected a JSON object of LAD settings, got {json_kind(data)}")
        if "format" not in data:
            raise RunDirError(f"{path}: missing format (not a lad.json written by LAD?)")
        if lad_field_problem("format", data["format"]) is None and data["format"] > LAD_FORMAT:
            raise RunDirError(f"{path}: written by a newer LAD (format {data['format']}); upgrade LAD to read it")
        if "chat_template" in data and "prompt_style" not in data:  # a lad.json before prompt_style: same meaning
            problem = lad_field_problem("chat_template", data["chat_template"])
            if problem:
                raise RunDirError(f"{path}: {problem}")
            data = {**data, "prompt_style": next(k for k, v in PROMPT_STYLES.items() if v == data["chat_template"])}
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data]
        if missing:
            raise RunDirError(f"{path}: missing {', '.join(missing)}")
        problem = lad_json_problem(data)  # every field of the right type (lad/integrity.py)
        if problem:
            raise RunDirError(f"{path}: {problem}")
        return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------- atomic files and folders


# ---------------------------------------------------------------- output directory


def prepare_output_dir(output_dir: str, *, overwrite: bool, resuming: bool, create: bool = True) -> Path:
    """Refuse to write over a folder that holds files unless told to, and never over one LAD did not write
    (`safety.check_destination`: never lose a user's files or run). Returns the normalised folder.

    With create=False it only checks (call it before loading anything, then again to create). A run that is
    replaced is deleted only now, after the new run's model and data have loaded."""
    from .safety import RUN, check_destination, replace_folder, run_header

    out = check_destination(output_dir, kind=RUN, flag="output_dir", overwrite=overwrite, resuming=resuming)
    if create:
        if out.is_dir() and any(out.iterdir()) and not resuming:
            replace_folder(out, RUN)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "recipe.yaml").exists():  # marks the folder as a run from its first moment
            (out / "recipe.yaml").write_text(run_header() + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------- checkpoints


def check_safetensors(path: Path) -> None:
    problem = safetensors_problem(path)
    if problem:
        raise RunDirError(f"{path}: {problem}")


def load_tokenizer(run_dir: Path):
    """The tokenizer saved in the run; a missing or corrupt tokenizer file is a RunDirError naming it."""
    from transformers import AutoTokenizer

    problem = tokenizer_files_problem(run_dir)
    if problem:
        raise RunDirError(problem)
    try:
        return AutoTokenizer.from_pretrained(run_dir)
    except Exception as err:  # noqa: BLE001 — the tokenizers library raises plain Exceptions
        name = "tokenizer.json" if (run_dir / "tokenizer.json").is_file() else "tokenizer files"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunDirError(f"{run_dir / name}: the run's tokenizer does not load ({first})") from None


# ---------------------------------------------------------------- loading a run for sampling and scoring


def base_spec(run_dir: Path, info: LadInfo):
    from .recipe import ModelSpec

    spec = ModelSpec(**info.base_model)
    if spec.name_or_path and spec.name_or_path.startswith("./"):  # a base saved inside the run
        spec.name_or_path = str(run_dir / spec.name_or_path[2:])
        spec.init = "pretrained"
        spec.tokenizer = None
    return spec


def check_parent(info: LadInfo, where) -> None:
    """An exported folder has the adapter merged in: there is no AR parent left to switch back to."""
    if info.merged:
        raise RunDirError(f"{where} is an exported (merged) model: it holds no separate AR parent; "
                          "use its run directory, or score the base model itself")
    if info.adapter == "full":
        raise RunDirError(f"{where} trained every weight (lora.enabled: false): there is no adapter to switch off, "
                          "so no AR parent; score the base model itself")


def has_parent(info: LadInfo) -> bool:
    """Whether a run can read its AR parent (the adapter switched off): what `check_parent` asks, as a question."""
    try:
        check_parent(info, "")
    except RunDirError:
        return False
    return True


def merged_spec(folder: Path, info: LadInfo):
    """An exported folder loads from itself, in the precision the run computed in (no base, no adapter)."""
    from .recipe import ModelSpec

    base = info.base_model
    return ModelSpec(name_or_path=str(folder), dtype=base.get("dtype", "auto"),
                     attn_implementation=base.get("attn_implementation", "sdpa"))


# ---------------------------------------------------------------- does the run fit its base?


def check_tokenizer_matches(info: LadInfo, tokenizer, run_dir: Path) -> None:
    """lad.json must describe the tokenizer stored next to it (vocab size, the mask token and its id)."""
    where = Path(run_dir) / "lad.json"
    if len(tokenizer) != info.vocab_size:
        raise RunDirError(f"{where}: vocab_size {info.vocab_size} does not match the run's tokenizer "
                          f"({len(tokenizer)} tokens)")
    if tokenizer.convert_tokens_to_ids(info.mask_token) != info.mask_token_id:
        raise RunDirError(f"{where}: mask_token {info.mask_token!r} is not id {info.mask_token_id} in the run's "
                          "tokenizer")


_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\((\[[^\]]*\])\) "
                            r"from checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)")


def weights_fitting(load, folder: Path, spec):
    """Run `load()`; weights shaped for another base become one RunDirError naming the first misfit."""
    try:
        return load()
    except RuntimeError as err:
        found = _SIZE_MISMATCH.search(str(err))
        if found is None:
            raise
        name = found.group(1).replace(".default", "")
        raise RunDirError(f"{folder}: the weights do not fit the base model {spec.name_or_path} ({name} is "
                          f"{found.group(2)} in the run, {found.group(3)} in the base); lad.json's base_model "
                          "must name the model the run was trained on") from None


def check_adapter_covers(model, folder: Path, spec) -> None:
    """Every LoRA weight of the adapter file is used and every LoRA layer of the model is loaded (a base
    with more or fewer layers would otherwise load silently, part trained and part at init)."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        saved = {k for k in fh.keys() if ".lora_" in k}
    wanted = {k.replace(".default", "") for k, _ in model.named_parameters() if ".lora_" in k}
    adapted = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    kinds = {re.sub(r"\.\d+\.", ".N.", name) for name in adapted}  # e.g. model.layers.N.self_attn.q_proj
    bare = sorted(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                  and name not in adapted and re.sub(r"\.\d+\.", ".N.", name) in kinds)
    stray, missing = sorted(saved - wanted), sorted(wanted - saved)
    if stray or missing or bare:
        what = (f"{stray[0]} has no place in it" if stray else f"it has {missing[0]}, which the adapter lacks"
                if missing else f"it has {bare[0].removeprefix('base_model.model.')}, which the adapter lacks")
        raise RunDirError(f"{folder}: the adapter does not fit the base model {spec.name_or_path} ({what}); "
                          "lad.json's base_model must name the model the run was trained on")


def enclosing_run(folder: Path) -> tuple[Path, str]:
    """(run, weights) for a `best/` or checkpoint folder, which hold weights and lad.json but not the tokenizer;
    (folder, "final") for anything else."""
    if (folder / "tokenizer_config.json").is_file() or not (folder / "lad.json").is_file():
        return folder, "final"
    for root in (folder.parent, folder.parent.parent):
        if (root / "tokenizer_config.json").is_file() and (root / "recipe.yaml").is_file():
            return root, str(folder.resolve())
    return folder, "final"


def load_run(run_dir: str | os.PathLike, *, device: str | torch.device | None = None, weights: str = "final",
             base: dict | None = None):
    """Load a LAD run (base + adapter + lad.json) or an exported folder (`lad export`: merged weights, no
    adapter) as a `Denoiser`; returns (denoiser, tokenizer, info).

    weights: "final" (the run's top level), "best", or a checkpoint folder name / path.
    base: ModelSpec fields to override when loading the weights (export reloads a QLoRA base unquantized).
    """
    from .modeling.denoiser import Denoiser
    from .modeling.load import load_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a folder")
    if weights == "final":  # pointed straight at runs/x/best or runs/x/checkpoints/step-N: load it from its run
        run_dir, weights = enclosing_run(run_dir)
    folder = run_dir if weights == "final" else run_dir / weights if (run_dir / weights).is_dir() else Path(weights)
    # a checkpoint's own lad.json, so that a run still training (no top-level lad.json yet) can be scored
    info = LadInfo.load(folder if folder != run_dir and (folder / "lad.json").is_file() else run_dir)
    if info.merged and weights != "final":
        raise RunDirError(f"{run_dir} is an exported model: it holds one set of weights (weights='final')")
    if weights != "final" and not folder.is_dir():
        raise RunDirError(f"weights {weights!r}: no such folder in {run_dir} or on disk")
    tokenizer = load_tokenizer(run_dir)
    check_tokenizer_matches(info, tokenizer, run_dir)
    spec = merged_spec(run_dir, info) if info.merged else base_spec(run_dir, info)
    for where in dict.fromkeys([run_dir if info.merged else folder, Path(spec.name_or_path or folder)]):
        problem = files_problem(where) if where.is_dir() else None  # the weights, and a local base: before loading
        if problem:
            raise RunDirError(problem)
    model = load_model(dataclasses.replace(spec, **(base or {})), vocab_size=info.vocab_size)
    if model.get_input_embeddings().weight.shape[0] < info.vocab_size:
        model.resize_token_embeddings(info.vocab_size, mean_resizing=False)
    trained = None if info.merged else info.adapter  # merged: the folder's own weights, already loaded
    if trained == "lora":
        from peft import PeftModel

        if not (folder / "adapter_config.json").is_file():
            raise RunDirError(f"{folder}: no adapter_config.json")
        if not (folder / "adapter_model.safetensors").is_file():  # never PEFT's pickle fallback (.bin)
            raise RunDirError(f"{folder}: no adapter_model.safetensors")
        model = weights_fitting(lambda: PeftModel.from_pretrained(model, folder), folder, spec)
        check_adapter_covers(model, folder, spec)
    elif trained is not None:
        from .checkpoints import load_trainable_weights

        weights_fitting(lambda: load_trainable_weights(model, folder), folder, spec)
    denoiser = Denoiser(model, info.mask_token_id, info.shift, info.attention, info=info,
                        block_size=info.block_size, gate=None if info.merged else info.lora_gate).eval()
    if device is not None:
        denoiser.to(device)
    return denoiser, tokenizer, info
