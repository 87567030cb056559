"""`lad export RUN_DIR --out MODEL_DIR` (or `lad-export`): one standalone folder to share a converted model.

    lad export runs/smollm2_135m --out models/smollm2-lad              # precision of the base (fp32 here)
    lad export runs/llama8b_qlora --out models/llama8b-lad --dtype bf16 --overwrite

The LoRA adapter is merged into the base weights with PEFT's own `merge_and_unload` (a full fine-tune has
nothing to merge and is only cast). A QLoRA run is merged into its base reloaded in the chosen full or half
precision, never into the 4-bit weights. The folder holds safetensors shards, the tokenizer, a `config.json`
with `is_causal: false` (plain transformers then runs attention bidirectionally), `lad.json` marked
`merged: true` (still the one source of mask token and shift), the run's `recipe.yaml` and a model card
(`README.md`) with the scores found in `RUN_DIR/eval/`. Everything is written to a hidden folder next to
`--out` and renamed into place, so a failed export leaves nothing behind. See docs/sharing.md.

Python: `export_run("runs/tiny", "models/tiny", dtype="fp32")` returns an `ExportResult`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .console import Parser, guarded, quiet_libraries
from .atomic import staged
from .run import LadInfo, RunDirError

PROG = "lad-export"
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EVAL_DIR = "eval"  # where a run keeps its scores: lad-eval --model RUN --output_path RUN/eval
MAX_SHARD_SIZE = "5GB"


class ExportError(ValueError):
    """A user error (not a run, occupied --out, a precision that cannot hold the model): one line, exit 2."""


@dataclass
class ExportResult:
    out: Path
    dtype: str
    merged: str  # what was folded into the weights: "lora" (merged) or "full" (nothing to merge)
    quantization: str | None  # the run's base quantization (QLoRA), undone for the export
    seconds: float
    bytes: int


# ---------------------------------------------------------------- checks before anything is loaded


def check_out(run_dir: Path, out: Path, overwrite: bool) -> Path:
    """The normalised --out, checked by `safety.check_destination`: an existing folder is replaced only when it
    is an export holding nothing else, never the run itself, a folder inside a run, or a folder with user files."""
    from .safety import EXPORT, PathError, check_destination, normalised

    run, target = run_dir.resolve(), normalised(out, "--out")
    if target == run or target in run.parents:
        raise ExportError(f"--out {out} would replace the run {run_dir} itself; choose another folder")
    try:
        return check_destination(out, kind=EXPORT, flag="--out", overwrite=overwrite)
    except PathError as err:
        raise ExportError(str(err)) from None


def base_precision(run_dir: Path, info: LadInfo) -> str:
    """`auto`: the precision the run's base was loaded in (its recipe dtype, else its checkpoint's), else fp32."""
    spec_dtype = info.base_model.get("dtype", "auto")
    if spec_dtype in SAVE_DTYPES:
        return spec_dtype
    from transformers import AutoConfig

    from .modeling.load import model_folder
    from .run import base_spec

    spec = base_spec(run_dir, info)
    if spec.init != "pretrained" and not info.merged:
        return "fp32"
    folder = run_dir if info.merged else model_folder(spec)  # an exported folder never needs its base
    stored = getattr(AutoConfig.from_pretrained(folder), "dtype", None)
    names = {v: k for k, v in SAVE_DTYPES.items()}
    return names.get(stored if isinstance(stored, torch.dtype) else getattr(torch, str(stored), None), "fp32")


def check_dtype(name: str) -> torch.dtype:
    """The machine must be able to build and serialise tensors of this precision."""
    if name not in SAVE_DTYPES:
        raise ExportError(f"--dtype {name!r}: choose one of auto, {', '.join(SAVE_DTYPES)}")
    from safetensors.torch import save

    try:
        save({"probe": torch.ones(2, dtype=SAVE_DTYPES[name])})
    except (RuntimeError, TypeError, ValueError) as err:
        raise ExportError(f"--dtype {name}: this machine cannot save {name} tensors ({err})") from None
    return SAVE_DTYPES[name]


def check_fits(model, name: str) -> None:
    """fp16 overflows above 65504: refuse instead of writing inf weights."""
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            if name != "fp16":
                raise ExportError(f"the run's weights hold inf or NaN ({key}): nothing worth exporting")
            limit = torch.finfo(SAVE_DTYPES[name]).max
            raise ExportError(f"the weights do not fit {name}: {key} overflows (|w| > {limit:g}); "
                              "export with --dtype bf16 or fp32")


def check_space(model, out: Path) -> None:
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    folder = next(p for p in (out, *out.parents) if p.exists())  # nothing is created before the checks pass
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ExportError(f"the model needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free at {folder}")


# ---------------------------------------------------------------- the export


def merged_model(run_dir: Path, info: LadInfo, dtype: str, weights: str):
    """(transformers model with the adapter merged in, bidirectional; tokenizer)."""
    from .run import load_run

    denoiser, tokenizer, _ = load_run(run_dir, weights=weights, base={"quantization": None, "dtype": dtype})
    model = denoiser.model
    if hasattr(model, "merge_and_unload"):  # a PeftModel
        model = model.merge_and_unload()
    if getattr(model.config, "is_causal", True):  # Denoiser made it bidirectional; the saved config says so
        raise RuntimeError("merged model is not bidirectional")
    return model, tokenizer


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def export_run(run_dir, out, *, dtype: str = "auto", overwrite: bool = False, weights: str = "final",
               say=print) -> ExportResult:
    """Write RUN_DIR's model, adapter merged, to `out` (see the module docstring); `say` gets progress lines."""
    started = time.perf_counter()
    run_dir = Path(run_dir)  # `out` stays as typed until safety.check_destination has seen it
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a folder")
    try:
        info = LadInfo.load(run_dir)
    except RunDirError as err:
        raise ExportError(str(err)) from None
    out = check_out(run_dir, out, overwrite)
    dtype = base_precision(run_dir, info) if dtype == "auto" else dtype
    check_dtype(dtype)
    if info.lora_gate != "none" and not info.merged:
        raise ExportError(f"{run_dir}: its LoRA adapter is gated (lora.gate: {info.lora_gate}: it acts only at mask "
                          "columns), which merged weights cannot do; load the run itself (lad.load_run) instead")
    quant = info.base_model.get("quantization")
    what = "nothing to merge" if info.merged or info.adapter != "lora" else "merging the LoRA adapter"
    if quant and not info.merged:
        say(f"{PROG}: the run was trained with QLoRA ({quant} base): merging into the base reloaded in {dtype}, "
            f"not into {quant} weights")
    say(f"{PROG}: {run_dir} ({info.adapter}, step {info.step}): {what}, saving {dtype}")
    model, tokenizer = merged_model(run_dir, info, dtype, weights)
    check_fits(model, dtype)
    check_space(model, out.absolute())
    source = run_dir if weights == "final" else run_dir / weights if (run_dir / weights).is_dir() else Path(weights)
    step = LadInfo.load(source).step if (source / "lad.json").is_file() else info.step
    base = dict(info.base_model)
    if str(base.get("name_or_path") or "").startswith("./"):  # a scratch base saved inside the run
        base["name_or_path"] = str((run_dir / base["name_or_path"][2:]).resolve())
    shared = dict(base)  # a merged export loads from itself: a folder of this machine is kept as a name only
    if machine_local(shared.get("name_or_path")):
        shared["name_or_path"] = public_path(shared["name_or_path"])
    export = {"source": public_path(str(run_dir.resolve())), "weights": weights, "dtype": dtype,
              "from_adapter": info.adapter, "base_quantization": quant, "lad_version": __version__}
    exported = dataclasses.replace(info, base_model=shared, merged=True, step=step, lad_version=__version__,
                                   extra={**info.extra, "export": export})
    with staged(out) as tmp:  # nothing is left behind if any of it fails
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
        exported.save(tmp)
        if (run_dir / "recipe.yaml").is_file():  # shared: with no folder of this machine in it
            recipe = (run_dir / "recipe.yaml").read_text(encoding="utf-8")
            (tmp / "recipe.yaml").write_text(public_recipe(recipe), encoding="utf-8")
        card = model_card(run_dir, dataclasses.replace(exported, base_model=base), out.name)  # names it publicly
        (tmp / "README.md").write_text(card, encoding="utf-8")
        check_out(run_dir, out, overwrite)  # once more, right before an existing export is replaced
    result = ExportResult(out, dtype, info.adapter, None if info.merged else quant,
                          round(time.perf_counter() - started, 2), folder_bytes(out))
    say(f"{PROG}: wrote {out} ({result.bytes / 1e6:.1f} MB, {dtype}) in {result.seconds:.1f} s")
    return result


# ---------------------------------------------------------------- model card


def hub_id(base: dict) -> str | None:
    """The base's Hugging Face id for the card's metadata, when it is one (not a path, GGUF or package file)."""
    from .modeling.locate import looks_local

    name = base.get("name_or_path")
    if (base.get("init") != "pretrained" or not name or name.startswith(("pkg://", "…/"))  # …/: `public_path`
            or looks_local(name)):
        return None
    return name


def eval_rows(run_dir: Path) -> list[str]:
    """Markdown rows from every lad-eval results file in RUN_DIR/eval (lad-eval --output_path RUN/eval): each
    metric with its stderr, how it was scored, the documents scored and, for a `--compare` file, LAD − parent
    with its paired 95% interval and McNemar p on those documents (lad/scoring/paired.py)."""
    from .evaluation import column_label, metric_rows
    from .scoring.paired import interval_cell

    rows = []
    for path in sorted((run_dir / EVAL_DIR).glob("*.json")):
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        paired = payload.get("paired", {}) if isinstance(payload, dict) else {}
        for name, res in payload.items() if isinstance(payload, dict) else ():
            if not isinstance(res, dict) or "results" not in res:
                continue
            how = "AR parent" if name == "ar" else column_label("LAD", res)
            for task, metrics in sorted(metric_rows(res).items()):
                docs = documents_scored(res, task)
                for metric, (value, err) in sorted(metrics.items()):
                    pair = paired.get(f"{task}/{metric}") if name != "ar" else None
                    rows.append(f"| {task} | {metric} | {value:.4f} ± {err:.4f} | {how} | {docs} | "
                                f"{interval_cell(pair, documents=False)} | {path.name} |")
    return rows


def documents_scored(res: dict, task: str) -> str:
    """How many documents a task's numbers rest on: lm-eval's effective count, else the limit, else "all"."""
    counted = (res.get("n-samples") or {}).get(task, {})
    if isinstance(counted, dict) and counted.get("effective") is not None:
        return str(counted["effective"])
    limit = res.get("config", {}).get("limit")
    return "all" if limit is None else str(limit)


def public_base(base: dict, run_dir: Path) -> str:
    """The base as the card names it: a hub id or package file as given; a path of this machine only by what
    it is (a card is shared, the exporting machine's folders mean nothing elsewhere; lad.json keeps them)."""
    name = base.get("name_or_path")
    if not name or base.get("init") == "scratch" or Path(name).resolve() == (run_dir / "base").resolve():
        return "a randomly initialised model (its config is in the recipe below)"
    if hub_id(base) or name.startswith("pkg://"):
        return f"`{name}`"
    return f"a local model (`{Path(name).name}`)"


def public_recipe(text: str) -> str:
    """The run's recipe.yaml with every absolute path of this machine cut to `…/NAME`."""
    import yaml

    def paths(node):
        if isinstance(node, dict):
            return [p for v in node.values() for p in paths(v)]
        if isinstance(node, list):
            return [p for v in node for p in paths(v)]
        return [node] if machine_local(node) else []

    for path in sorted(set(paths(yaml.safe_load(text) or {})), key=len, reverse=True):
        text = text.replace(path, public_path(path))
    return text


def machine_local(value) -> bool:
    """Whether a value names a folder of this machine (an absolute or home path)."""
    return isinstance(value, str) and (os.path.isabs(value) or value.startswith("~/"))


def public_path(path: str) -> str:
    """A folder of this machine as a shared file names it: `…/NAME` (where it was means nothing elsewhere)."""
    return f"…/{Path(path).name}"


def cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe ends a table cell even inside backticks (<|mask|>)


def training_summary(info: LadInfo, recipe: dict) -> str:
    lora = recipe.get("lora") or {}
    if info.adapter == "lora" and lora:
        how = f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, targets {lora.get('target_modules')}"
    else:
        how = "LoRA" if info.adapter == "lora" else "full fine-tune"
    return f"{how}; {info.step} optimizer steps; max_length {info.max_length}"


def settings_table(info: LadInfo, base_name: str, recipe: dict) -> list[str]:
    export = info.extra.get("export", {})
    precision = export.get("dtype", "?")
    if export.get("base_quantization"):
        quant = export["base_quantization"]
        precision += f" (trained as QLoRA over a {quant} base; merged into the base reloaded in {precision})"
    added = ", added to the vocabulary" if info.mask_token_added else ""
    rows = [("base model", base_name), ("mask token", f"`{info.mask_token}` (id {info.mask_token_id}{added})"),
            ("shift", f"`{str(info.shift).lower()}`: token i is predicted at position {'i-1' if info.shift else 'i'}"),
            ("objective", f"`{info.objective}`"), ("training", training_summary(info, recipe)),
            ("saved precision", precision), ("prompts", PROMPT_STYLE[info.prompt_style])]
    return ["| setting | value |", "|---|---|", *(f"| {name} | {cell(value)} |" for name, value in rows)]


PROMPT_STYLE = {"chat": "chat template", "plain": "plain text (no chat template)",
                "raw": "continued as given (trained on plain text)"}


def model_card(run_dir: Path, info: LadInfo, title: str) -> str:
    """README.md with Hugging Face metadata: what the model is, LAD's settings, the recipe, the run's scores."""
    import yaml

    base = info.base_model
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["lad", "diffusion-language-model", "masked-diffusion", "bidirectional", "safetensors"]}
    if hub_id(base):
        meta.update(base_model=hub_id(base), base_model_relation="finetune")
    recipe_path = run_dir / "recipe.yaml"
    recipe_text = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else ""
    recipe = yaml.safe_load(recipe_text) if recipe_text else {}
    base_name = public_base(base, run_dir)
    merged = "The LoRA adapter is merged into the weights: no PEFT and no base download are needed." \
        if info.adapter == "lora" else "Every weight was fine-tuned (there is no adapter)."
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             f"A diffusion language model converted from {base_name} with LAD {info.lad_version}: attention is "
             f"bidirectional and the model denoises masked (and corrupted) answer tokens. {merged}", "",
             "## LAD settings", "", *settings_table(info, base_name, recipe if isinstance(recipe, dict) else {}),
             "", "## Evaluation", ""]
    rows = eval_rows(run_dir)
    if rows:
        lines += ["Scores of the run this model was exported from (lm-evaluation-harness through `lad-eval`):", "",
                  "| task | metric | value ± stderr | model | documents | LAD − parent [paired 95%] | file |",
                  "|---|---|---|---|---|---|---|", *rows]
    else:
        lines.append(f"No evaluation results in the run directory (`lad-eval --output_path RUN/{EVAL_DIR}` "
                     "puts them there).")
    lines += ["", "## Use", "", "```python", "from lad.run import load_run",
              f'denoiser, tokenizer, info = load_run("{title}")   # a Denoiser: logits[:, i] predicts token i',
              "```", "", "```bash", f'lad-generate --model {title} --prompt "..." --iters 16', "```", "",
              "Plain transformers (`AutoModelForCausalLM.from_pretrained`) loads it with bidirectional attention "
              "(`is_causal: false` in config.json). It is not a left-to-right model: do not call `generate()`; read "
              "the mask token and `shift` from `lad.json` and denoise iteratively (see LAD's docs/sharing.md).", ""]
    if recipe_text:
        lines += ["## Recipe", "", "```yaml", public_recipe(recipe_text).rstrip(), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog=PROG, description="Merge a LAD run's adapter into a standalone diffusion model folder.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a LAD run directory (holds lad.json)")
    parser.add_argument("--out", required=True, metavar="MODEL_DIR", help="the folder to write")
    parser.add_argument("--dtype", default="auto", choices=["auto", *SAVE_DTYPES],
                        help="saved precision (default auto: the precision the run's base was loaded in)")
    parser.add_argument("--weights", default="final", metavar="{final,best,PATH}", help="which weights of the run")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out folder that already holds files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed as one line
        return int(done.code or 0)
    quiet_libraries()
    # ExportError and RunDirError are ValueErrors; an OSError is a base that cannot be fetched or a disk that
    # fails while writing (nothing is left behind)
    def work() -> int:
        export_run(args.run_dir, args.out, dtype=args.dtype, overwrite=args.overwrite, weights=args.weights)
        return 0

    return guarded(PROG, work, on_interrupt="nothing was written")

if __name__ == "__main__":
    sys.exit(main())
