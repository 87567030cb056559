"""`ar`: the AR parent (adapter disabled, causal attention), for side-by-side output with the denoiser.

The same prompts, rendered exactly as the diffusion samplers render them (`common.render_prompt`), left-padded
with an attention mask, go through transformers' `generate` with the KV cache: one forward per generated token
(NFE = number of generated positions), stopping at EOS (the tokenizer's plus the generation config's).
`temperature=0` is greedy; otherwise tokens are drawn with the same temperature / top-k / top-p filtering and
the same per-row generators (seeded with `seed`) as every other strategy, through a logits processor, so a
prompt's output is the same alone or in a batch. Sampling settings in the model's own generation config
(do_sample, temperature, repetition penalty, ...) are overridden, so the comparison is like for like.
`iters` does not apply. With `trace`/`on_step`, one Step per generated token: the answer so far (no masks).
`as_parent()` restores the bidirectional denoiser afterwards, even on error.
"""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..defaults import ITERS, MAX_NEW_TOKENS
from .common import Canvas, Step, eos_token_ids, finish, render_prompt, row_generators, sample_tokens


class _Sampler(LogitsProcessor):
    """Draws each row's next token with its own generator and forces `generate` (greedy) to take it; records
    the parent's unfiltered probability of that token and reports the Step."""

    def __init__(self, prompt_width, generators, eos_ids, pad_id, sampling, steps, on_step):
        self.prompt_width, self.generators, self.sampling = prompt_width, generators, sampling
        self.eos_ids, self.pad_id, self.steps, self.on_step = eos_ids, pad_id, steps, on_step
        self.confidence: list[list[float]] = []  # per generated position, per row

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens, confidence = sample_tokens(scores.float()[:, None, :], self.generators, **self.sampling)
        tokens = tokens[:, 0]
        forced = torch.full_like(scores, float("-inf")).scatter(1, tokens[:, None], 0.0)
        if self.steps is not None or self.on_step is not None:
            self.report(input_ids[:, self.prompt_width:], tokens, confidence[:, 0])
        return forced

    def report(self, answer: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor) -> None:
        finished = torch.isin(answer, self.eos_ids).any(-1)  # generate pads rows that already ended
        tokens = torch.where(finished, torch.full_like(tokens, self.pad_id), tokens)
        self.confidence.append(confidence.masked_fill(finished, 0.0).tolist())
        answer = torch.cat([answer, tokens[:, None]], dim=1).tolist()
        nfe = len(self.confidence)
        records = [Step(nfe - 1, answer[b], [False] * nfe, [False] * (nfe - 1) + [True],
                        [c[b] for c in self.confidence], nfe) for b in range(len(answer))]
        if self.steps is not None:
            for b, record in enumerate(records):
                self.steps[b].append(record)
        if self.on_step is not None:
            self.on_step(records)


@torch.no_grad()
def ar(denoiser, tokenizer, prompts: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS, iters: int = ITERS,
       seed: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, chat_template: bool = True,
       on_step=None, trace: bool = False):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise ValueError("no prompts given")
    started = time.perf_counter()
    denoiser.eval()
    device = next(denoiser.parameters()).device
    rendered = [render_prompt(tokenizer, p, chat_template) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) for r in rendered)  # left padding: every row's answer starts at column `width`
    with denoiser.as_parent() as parent:
        eos_ids = eos_token_ids(tokenizer, parent)
        steps = [[] for _ in prompts] if trace else None
        sampler = _Sampler(width, row_generators(len(prompts), seed, device),
                           torch.tensor(sorted(eos_ids), dtype=torch.long, device=device), pad,
                           dict(temperature=temperature, top_k=top_k, top_p=top_p), steps, on_step)
        out = parent_generate(parent, rendered, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad,
                              processors=[sampler])
    canvas = Canvas(out, torch.ones_like(out), width, list(prompts))
    nfe = out.shape[1] - width
    return finish(tokenizer, canvas, "ar", nfe, started, eos_ids, steps, mask_id=-1)


def parent_generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: set[int], pad_id: int,
                    processors=()) -> torch.Tensor:
    """ids [B, width + new]: the token-id prompts left-padded (every answer starts at the longest prompt's width)
    through `model.generate` with its KV cache, greedy, the model's own generation config (sampling, repetition
    penalty, ...) overridden; `processors` (logits processors) draw sampled tokens. `ar` and `lad distill` both
    generate with it."""
    from ..scoring.batching import pad_batch

    ids, attention = pad_batch(prompts, pad_id, side="left", device=next(model.parameters()).device)
    return model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                          num_beams=1, repetition_penalty=1.0, eos_token_id=sorted(eos_ids), pad_token_id=pad_id,
                          use_cache=True, logits_processor=LogitsProcessorList(list(processors)))
