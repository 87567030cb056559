"""The parent answers: batched, left-padded `generate` with the KV cache, per-row seeded sampling; `distill`."""

from __future__ import annotations

import logging
import sys
import time

import torch
from transformers import LogitsProcessor

from ..data.formats import instruction_messages, prompt_ids
from ..recipe import ModelSpec
from ..sampling.ar import parent_generate

from .output import OutputFile, generation_settings, row_key, row_seed
from .prompts import PROG, DistillError, DistillResult, _as_prompts

log = logging.getLogger("lad.distill")


# ---------------------------------------------------------------- generation


class _RowSampler(LogitsProcessor):
    """Draws each row's next token from its own generator and makes (greedy) `generate` take it."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float, top_k: int):
        self.generators, self.options = generators, dict(temperature=temperature, top_p=top_p, top_k=top_k)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from ..sampling.common import sample_tokens

        tokens, _ = sample_tokens(scores.float()[:, None, :], self.generators, **self.options)
        return torch.full_like(scores, float("-inf")).scatter(1, tokens, 0.0)


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: set[int], pad_id: int,
                   sampler: _RowSampler | None = None) -> list[tuple[list[int], str, int]]:
    """Left-padded batch through `generate` (KV cache); per row (answer ids before EOS, finish, tokens spent)."""
    width = max(len(p) for p in prompts)
    out = parent_generate(model, prompts, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                          processors=[sampler] if sampler else [])
    results = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), None)
        results.append((row, "length", len(row)) if cut is None else (row[:cut], "eos", cut + 1))
    return results


def _model_name(model) -> str:
    """The reference stored with every row: local paths made absolute, hub ids and pkg:// as given."""
    from ..modeling.locate import absolute_if_local, locate_model

    ref = model.name_or_path if isinstance(model, ModelSpec) else str(model)
    if ref is None:
        return "scratch"
    locate_model(ref)  # a local path that is not there is an error here, not a hub id
    return absolute_if_local(ref)


def _load(model, dtype: str, device):
    from ..modeling.load import load_base
    from ..modeling.locate import ModelNotFoundError

    spec = model if isinstance(model, ModelSpec) else ModelSpec(name_or_path=str(model), dtype=dtype)
    spec.validate()
    try:
        model, tokenizer = load_base(spec)
    except ModelNotFoundError:  # says what is missing and where LAD looked
        raise
    except OSError as err:  # hub id not cached offline, unreadable folder, ...
        raise DistillError(f"cannot load model {spec.name_or_path}: {str(err).splitlines()[0]}") from None
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")), tokenizer


def distill(model, prompts, out, *, tokenizer=None, model_name: str | None = None, max_new_tokens: int = 256,
            batch_size: int = 16, sample: bool = False, temperature: float = 0.7, top_p: float = 0.95,
            top_k: int = 0, seed: int = 0, system_prompt: str | None = None, chat_template="auto",
            limit: int | None = None, dtype: str = "auto", device=None, progress: bool = True) -> DistillResult:
    """Answer `prompts` with the AR parent `model` and write an `instruction` dataset to `out` (resumable).

    model: a reference (hub id, folder, .gguf, pkg://...) or `ModelSpec`, loaded causal as the parent trained
    it; or a loaded transformers model, with `tokenizer` (and `model_name` for the rows' provenance).
    prompts: "builtin", a .txt/.jsonl path, or a list of strings / dicts / `Prompt`s. `limit`: the first N.
    system_prompt and chat_template must be the values of `data.system_prompt` / `data.chat_template` of the
    recipe that will train on the file. Greedy unless `sample`.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise DistillError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
        raise DistillError(f"sampling needs temperature > 0, top_p in (0, 1], top_k >= 0 "
                           f"(got {temperature}, {top_p}, {top_k})")
    items = _as_prompts(prompts)[:limit]
    loaded = isinstance(model, torch.nn.Module)
    if loaded and tokenizer is None:
        raise DistillError("a loaded model needs its tokenizer")
    if model_name is None:
        model_name = (getattr(model.config, "_name_or_path", "") or "model") if loaded else _model_name(model)
    name = model_name
    settings = generation_settings(name, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature,
                                   top_p=top_p, top_k=top_k, seed=seed, system_prompt=system_prompt,
                                   chat_template=chat_template)
    keys = [row_key(p, settings) for p in items]
    sink = OutputFile(out, settings)
    todo = [i for i, k in enumerate(keys) if k not in sink.done]
    started = time.perf_counter()
    if todo and not loaded:
        model, tokenizer = _load(model, dtype, device)
    load_seconds, started = time.perf_counter() - started, time.perf_counter()
    new_tokens = eos = 0
    if todo:
        new_tokens, eos = _run(model, tokenizer, items, keys, todo, sink, settings, batch_size, progress)
    rows = sink.finish(keys)
    return DistillResult(str(out), rows, len(todo), len(items) - len(todo), time.perf_counter() - started,
                         load_seconds, new_tokens, eos)


def _run(model, tokenizer, items, keys, todo, sink, settings, batch_size, progress) -> tuple[int, int]:
    """Generate the prompts `todo` in length-sorted batches, appending each batch to `sink`."""
    from tqdm.auto import tqdm

    from ..sampling.common import eos_token_ids

    model.eval()
    eos_ids = eos_token_ids(tokenizer, model)
    if not eos_ids:
        raise DistillError("the tokenizer has no EOS token: answers could not stop (LAD training needs one too)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    rendered = {i: prompt_ids(instruction_messages(items[i].instruction, items[i].input, settings["system_prompt"]),
                              tokenizer, chat_template=settings["chat_template"]) for i in todo}
    order = sorted(todo, key=lambda i: -len(rendered[i]))  # longest first: similar lengths share a batch
    sampling = settings["sampling"]
    new_tokens = eos = 0
    bar = tqdm(total=len(order), unit="prompt", desc=PROG, disable=not progress, file=sys.stderr)
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        sampler = None
        if sampling != "greedy":
            generators = [torch.Generator().manual_seed(row_seed(sampling["seed"], keys[i])) for i in batch]
            sampler = _RowSampler(generators, sampling["temperature"], sampling["top_p"], sampling["top_k"])
        answers = generate_batch(model, [rendered[i] for i in batch], max_new_tokens=settings["max_new_tokens"],
                                 eos_ids=eos_ids, pad_id=pad_id, sampler=sampler)
        rows = []
        for i, (ids, finish, spent) in zip(batch, answers):
            p = items[i]
            rows.append({"instruction": p.instruction, "input": p.input,
                         "output": tokenizer.decode(ids, skip_special_tokens=True),
                         **({"category": p.category} if p.category else {}), "source": "distill",
                         "model": settings["model"], "finish": finish, "tokens": len(ids), "key": keys[i],
                         "settings": settings})
            new_tokens, eos = new_tokens + spent, eos + (finish == "eos")
        sink.append(rows)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):.1f}")
    bar.close()
    return new_tokens, eos


