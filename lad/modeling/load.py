"""Load the base model and tokenizer a recipe names: hub id, local folder, `.gguf` file, or scratch.

A GGUF file is dequantised by transformers' GGUF loader (~15 s for SmolLM2-135M); the result is cached as
a plain safetensors folder so a second load takes a second. Such a model cannot be `save_pretrained` as
loaded, so the cache is rebuilt from its config and state dict. `trust_remote_code` stays off unless the
recipe asks; weights load from safetensors (`use_safetensors=True` for folders we write).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..hub import check_hub_model
from ..recipe import ModelSpec
from .bidirectional import UnsupportedArchitectureError, check_model_type
from .byte_tokenizer import build_byte_tokenizer
from .locate import ModelNotFoundError, locate_model

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


class UnsafeWeightsError(ModelNotFoundError):
    """A model whose weights exist only as pickle (.bin/.pt): unpickling can run code, so it is refused
    unless the recipe sets `model.allow_pickle: true`."""


def _refuse_pickle(spec: ModelSpec, folder: str, detail: str) -> UnsafeWeightsError:
    return UnsafeWeightsError(f"{spec.name_or_path}: {detail}; pickle files can run code when loaded: convert "
                              "them to safetensors, or set model.allow_pickle: true if you trust them")


def check_safetensors(spec: ModelSpec, folder: str) -> None:
    """A local folder must hold *.safetensors weights unless pickle is explicitly allowed."""
    if spec.allow_pickle or not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles and not any(n.endswith(".safetensors") for n in names):
        raise _refuse_pickle(spec, folder, f"weights only as pickle ({', '.join(pickles[:3])})")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is bf16 where the GPU supports it, else fp32 (CPU matmuls in bf16 are slow and lossy)."""
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return DTYPES[name]


def cache_root(spec: ModelSpec) -> Path:
    return Path(spec.cache_dir or os.environ.get("LAD_CACHE", Path.home() / ".cache" / "lad")).expanduser()


def _gguf_cache_dir(spec: ModelSpec, gguf_path: str) -> Path:
    stat = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}|{stat.st_size}|{int(stat.st_mtime)}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root(spec) / "gguf" / f"{Path(gguf_path).stem}-{digest}"


def dequantised_gguf_folder(spec: ModelSpec, gguf_path: str) -> Path:
    """Return a safetensors folder holding the dequantised GGUF model and its tokenizer (built once)."""
    target = _gguf_cache_dir(spec, gguf_path)
    if (target / "config.json").is_file():
        return target
    folder, name = os.path.split(os.path.abspath(gguf_path))
    log.info("dequantising %s (cached in %s)", gguf_path, target)
    # building the cache initialises a throwaway model at random: on the caller's RNG it would shift every later
    # draw (LoRA's init), so that a run's first load trained differently from the same run with the cache warm
    with torch.random.fork_rng(devices=[]):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def model_folder(spec: ModelSpec) -> str:
    """Where `from_pretrained` should read the model: a hub id or a local folder."""
    location = locate_model(spec.name_or_path)
    if location.kind == "gguf":
        return str(dequantised_gguf_folder(spec, location.path))
    if location.kind == "hub":  # one line in seconds when neither the hub nor its cache has it
        check_hub_model(location.path, "model", spec.revision)
    return location.path


def load_tokenizer(spec: ModelSpec, folder: str | None = None):
    ref = spec.tokenizer
    if ref == "bytes":
        return build_byte_tokenizer()
    if ref is None:
        ref = folder or model_folder(spec)
    else:
        location = locate_model(ref)
        ref = location.path
        if location.kind == "hub":
            check_hub_model(ref, "tokenizer", spec.revision)
        if location.kind == "gguf":  # a tokenizer alone (a scratch model's): read it from the file, no dequantising
            cached = _gguf_cache_dir(spec, location.path)
            if not (cached / "config.json").is_file():
                folder, name = os.path.split(os.path.abspath(location.path))
                return AutoTokenizer.from_pretrained(folder, gguf_file=name)
            ref = str(cached)
    try:
        return AutoTokenizer.from_pretrained(ref, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:  # a local folder without tokenizer files: transformers' message is cut off
        if not os.path.isdir(ref) or any(os.path.isfile(os.path.join(ref, n)) for n in TOKENIZER_FILES):
            raise
        raise ModelNotFoundError(f"{ref}: no tokenizer files in this folder (looked for {', '.join(TOKENIZER_FILES)}"
                                 "); copy them from the base model (a recipe can name one: model.tokenizer)") from err


def quantization_config(spec: ModelSpec, compute_dtype: torch.dtype):
    if spec.quantization is None:
        return None
    try:
        import bitsandbytes  # noqa: F401  (imported only when asked: it is noisy on CPU)
    except ImportError:
        raise ImportError("model.quantization needs bitsandbytes: pip install 'lad[quant]'") from None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def build_scratch_model(spec: ModelSpec, vocab_size: int, seed: int = 0):
    """A randomly initialised model from `spec.config` (e.g. the tiny LLaMA of the CI recipe)."""
    options = dict(spec.config)
    model_type = options.pop("model_type", "llama")
    options.setdefault("vocab_size", vocab_size)
    try:  # any value transformers cannot build from (0 heads, a string width, ...) is the recipe's error
        config = AutoConfig.for_model(model_type, **options)
        config._attn_implementation = spec.attn_implementation
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(spec.dtype))
    except (Exception, MemoryError) as err:  # transformers' config validation raises its own Exception types
        while err.__cause__ is not None:  # the innermost error says what is wrong
            err = err.__cause__
        raise UnsupportedArchitectureError(f"model.config: no {model_type} model can be built from it "
                                           f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    return model


def load_model(spec: ModelSpec, folder: str | None = None, vocab_size: int | None = None, seed: int = 0):
    """The base model alone (causal, as the parent trained it); `folder` skips re-resolving the source."""
    if spec.init == "scratch":
        check_model_type(spec.config.get("model_type", "llama"), "model.config")
        if vocab_size is None:
            vocab_size = len(load_tokenizer(spec))
        return build_scratch_model(spec, vocab_size, seed)
    folder = folder or model_folder(spec)
    config = AutoConfig.from_pretrained(folder, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    check_model_type(config.model_type, spec.name_or_path)
    dtype = resolve_dtype(spec.dtype)
    kwargs = dict(revision=spec.revision, dtype=dtype, attn_implementation=spec.attn_implementation,
                  trust_remote_code=spec.trust_remote_code, use_safetensors=None if spec.allow_pickle else True)
    quant = quantization_config(spec, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    check_safetensors(spec, folder)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as err:  # a hub repository without safetensors
        if spec.allow_pickle or "safetensors" not in str(err):
            raise
        raise _refuse_pickle(spec, folder, "no safetensors weights found") from None


def load_base(spec: ModelSpec, seed: int = 0):
    """Return `(model, tokenizer)` for a recipe's `model` section, causal as the parent trained it."""
    if spec.init == "scratch":
        tokenizer = load_tokenizer(spec)
        model = load_model(spec, vocab_size=len(tokenizer), seed=seed)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the tokenizer's, not LLaMA's defaults
            setattr(model.config, key, getattr(tokenizer, key))
            setattr(model.generation_config, key, getattr(tokenizer, key))
        return model, tokenizer
    folder = model_folder(spec)
    return load_model(spec, folder), load_tokenizer(spec, folder)
