"""What every sampling strategy shares: the canvas, token sampling, EOS handling and trace records.

The canvas is the prompt (rendered exactly as training rendered it: `lad.data.prompt_ids`) followed by
`max_new_tokens` answer slots. Prompts are LEFT-padded, so every row's answer occupies the same last N columns
and one slice reads all answers; the bidirectional adapter keeps left padding exact (padding is masked and
position ids start at each row's first real token), so a prompt's output is the same alone or in a batch.

Each strategy is one function with the signature
    strategy(denoiser, tokenizer, prompts, *, max_new_tokens, iters, seed, ..., on_step=None, trace=False)
        -> list[Generation]
and reports every iteration as a `Step` (to `on_step` as it happens, and in `Generation.steps` when
`trace=True`): the terminal view, `--json`, the demo and the tests all read these records.

`prefix_cache=True` (refine, confidence, threshold) runs the prompt alone once (`prompt_cache`) and then every
iteration only the answer slots against its cached keys and values (`answer_logits(..., cache)`): faster, an
approximation for a bidirectional model (the prompt no longer sees the canvas; docs/sampling.md), exact for a
prompt-causal one. The default (None) is on exactly when it is exact. That prompt pass is not counted in `nfe`;
`Generation.prefix_forwards` reports it. `block_cache=True` (confidence, threshold; Fast-dLLM's dual cache,
lad/modeling/cache.py) also freezes the rest of the answer while a block is decoded, so that a forward
runs the block's columns alone; it implies the prompt's cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..data.formats import prompt_ids
from ..modeling.attention import answer_start_at
from ..modeling.cache import GrowingCache, refresh_block, window_logits


@dataclass
class Step:
    """One iteration for one prompt, over its answer slots."""

    iteration: int
    tokens: list[int]  # current answer slots (mask id where masked)
    masked: list[bool]  # slot holds the mask token after this iteration
    changed: list[bool]  # slot's value differs from before this iteration
    confidence: list[float]  # probability of the token predicted at each slot this iteration
    nfe: int  # model forwards so far

    def to_dict(self) -> dict:
        return {"iteration": self.iteration, "tokens": self.tokens, "masked": self.masked,
                "changed": self.changed, "confidence": [round(c, 4) for c in self.confidence], "nfe": self.nfe}


@dataclass
class Generation:
    prompt: str
    text: str  # the answer, cut at the first EOS
    token_ids: list[int]  # answer ids before the first EOS
    nfe: int  # model forwards spent on this prompt's batch
    seconds: float
    strategy: str
    steps: list[Step] = field(default_factory=list)
    prefix_forwards: int = 0  # prompt-only forwards building the prefix cache (not counted in nfe)
    speculation: dict | None = None  # speculative: rounds, drafted and accepted tokens of the batch
    polish_forwards: int = 0  # forwards of noiseless passes after the draft (`polish`), counted in nfe

    @property
    def mean_accepted(self) -> float | None:
        """speculative: drafted tokens the parent accepted per round of a row (the acceptance length, without the
        parent's own token)."""
        s = self.speculation
        return s["accepted"] / s["row_rounds"] if s and s["row_rounds"] else None

    def forwards_text(self) -> str:
        """What the answer cost, as lad-generate --ar and the demo say it: "12 forwards + 1 prompt pass"."""
        text = f"{self.nfe} forwards" + (f" + {self.prefix_forwards} prompt pass" if self.prefix_forwards else "")
        return text + (f", {self.polish_forwards} of them polishing" if self.polish_forwards else "")

    def to_dict(self, with_steps: bool = True) -> dict:
        out = {"prompt": self.prompt, "text": self.text, "token_ids": self.token_ids, "nfe": self.nfe,
               "seconds": round(self.seconds, 4), "strategy": self.strategy}
        if self.prefix_forwards:  # only with prefix_cache=True: the trace is otherwise unchanged
            out["prefix_forwards"] = self.prefix_forwards
        if self.speculation:
            out["speculation"] = self.speculation
        if self.polish_forwards:
            out["polish_forwards"] = self.polish_forwards
        if with_steps:
            out["steps"] = [s.to_dict() for s in self.steps]
        return out


@dataclass
class Canvas:
    ids: Tensor  # [B, P + N] left-padded prompt, then N answer slots
    attention_mask: Tensor  # [B, P + N]
    prompt_width: int  # P: answers are ids[:, P:]
    prompts: list[str]
    block_size: int | None = None  # a block-causal run's blocks while this canvas is decoded (`decode_blocks`)

    @property
    def answer(self) -> Tensor:
        return self.ids[:, self.prompt_width:]

    @property
    def answer_start(self) -> Tensor:
        """[B] the first answer column of every row (P): where prompt-causal attention stops being causal."""
        return answer_start_at(self.prompt_width, self.ids.shape[0], self.ids.device)

    @property
    def positions(self) -> Tensor:
        """Bool [B, P + N]: the answer slots (what the denoiser is asked to predict)."""
        pos = torch.zeros_like(self.ids, dtype=torch.bool)
        pos[:, self.prompt_width:] = True
        return pos


def render_prompt(tokenizer, prompt: str, chat_template: bool | str = True) -> list[int]:
    """A user prompt as training rendered it (chat template when the run used one, plain text otherwise).

    chat_template="raw" tokenizes the string as it is (lm-eval contexts are complete prompts already)."""
    if chat_template == "raw":
        return tokenizer(prompt, add_special_tokens=False).input_ids
    messages = [{"role": "user", "content": prompt}]
    return prompt_ids(messages, tokenizer, chat_template="auto" if chat_template else False)


def build_canvas(tokenizer, prompts: list[str], max_new_tokens: int, mask_id: int, *, chat_template: bool = True,
                 device: torch.device | str = "cpu") -> Canvas:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise ValueError("no prompts given")
    rendered = [render_prompt(tokenizer, p, chat_template) for p in prompts]
    width = max(len(r) for r in rendered)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(prompts), width + max_new_tokens), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, r in enumerate(rendered):
        ids[row, width - len(r):width] = torch.tensor(r, dtype=torch.long)
        attention[row, width - len(r):] = 1
    ids[:, width:] = mask_id
    return Canvas(ids.to(device), attention.to(device), width, list(prompts))


def prompt_cache(denoiser, canvas: Canvas):
    """The prompt's keys and values, computed with the prompt alone (`Denoiser.prefix_cache`), for
    `answer_logits(denoiser, canvas, cache)`."""
    width = canvas.prompt_width
    return denoiser.prefix_cache(canvas.ids[:, :width], canvas.attention_mask[:, :width])


def sampler_cache(denoiser, canvas: Canvas, prefix_cache: bool | None, block_cache: bool = False):
    """The samplers' `prefix_cache` option: the prompt's cache (`prompt_cache`) or None. As given, or when None
    (the default) on exactly when the cache is exact, i.e. for a model whose prompt never sees the answer
    (attention: prompt_causal). A block cache starts from the prompt's: `block_cache` turns it on, and refuses
    `prefix_cache=False`."""
    if block_cache:
        if prefix_cache is False:
            raise ValueError("block_cache needs the prompt's cache: do not combine it with prefix_cache=False")
        prefix_cache = True
    if prefix_cache is None:
        prefix_cache = denoiser.prefix_cache_exact
    return prompt_cache(denoiser, canvas) if prefix_cache else None


def decode_blocks(denoiser, canvas: Canvas, block_length: int | None) -> int | None:
    """The block length a sampler decodes `canvas` in: as given, else a block-causal run's trained block (None for
    other runs: one block). A block-causal canvas then reads its answer in blocks of that length."""
    trained = denoiser.block_size
    if trained is not None:
        canvas.block_size = block_length or trained
    return block_length or trained


def growing_cache(denoiser, canvas: Canvas, cache, carry: bool = True) -> GrowingCache | None:
    """The exact block cache (lad/modeling/cache.py) of a block-causal run decoding with the prompt's cache, whose
    finished blocks join the cache; None otherwise (no cache, or not block-causal)."""
    if cache is None or canvas.block_size is None:
        return None
    return GrowingCache(cache, canvas.block_size, carry)


def extra_forwards(exact: GrowingCache | None) -> int:
    """Forwards an exact block cache spent only on adding finished blocks (carry=False), counted in NFE."""
    return exact.extensions if exact is not None else 0


def answer_logits(denoiser, canvas: Canvas, cache=None) -> Tensor:
    """[B, N, V] float logits for the answer slots (the shift, if any, is the Denoiser's business).

    cache: a `prompt_cache(denoiser, canvas)`; then only the answer slots are run, against the prompt's cached
    keys and values (the prompt does not see the canvas: exact with prompt-causal attention, an approximation of the
    full bidirectional forward otherwise)."""
    blocks = {"block_size": canvas.block_size} if canvas.block_size else {}  # a block-causal run's decoding blocks
    flat = denoiser(canvas.ids, canvas.attention_mask, positions=canvas.positions, cache=cache,
                    answer_start=canvas.answer_start, **blocks)
    return flat.view(canvas.ids.shape[0], -1, flat.shape[-1]).float()


def block_logits(denoiser, canvas: Canvas, prefix, start: int, end: int, block=None):
    """([B, end - start, V] float logits of answer slots start..end-1, the block cache) with a block cache
    (lad/modeling/cache.py): `block=None` refreshes it (one forward over the whole answer against the prompt's
    cache `prefix`, keeping every other column's K/V), else only the block's columns run against those."""
    width, rows = canvas.prompt_width, canvas.ids.shape[0]
    positions = torch.zeros_like(canvas.ids, dtype=torch.bool)
    positions[:, width + start:width + end] = True
    if isinstance(block, GrowingCache):  # block-causal: exact, the finished blocks are cached
        flat = block.block_logits(denoiser, canvas.ids, canvas.attention_mask, canvas.answer_start, positions,
                                  width + start, width + end)
    elif block is None:
        flat, block = refresh_block(denoiser, canvas.ids, canvas.attention_mask, positions, prefix, width + start,
                                    width + end)
    else:
        flat = window_logits(denoiser, canvas.ids, canvas.attention_mask, positions, block)
    return flat.view(rows, end - start, flat.shape[-1]).float(), block


def predict_slots(denoiser, canvas: Canvas, cache, generators: list[torch.Generator], sampling: dict,
                  block: tuple[int, int] | None = None, block_state=None):
    """One forward's (tokens [B, N], confidence [B, N], block cache). Without `block` every answer slot is predicted
    (`answer_logits`). With `block=(start, end)` and the samplers' block cache, only those slots are (a refresh
    when `block_state` is None, else a forward over the block alone); the other slots keep their current token
    with confidence 0."""
    if block is None:
        tokens, conf = sample_tokens(answer_logits(denoiser, canvas, cache), generators, **sampling)
        return tokens.to(canvas.ids.device), conf.to(canvas.ids.device), None
    start, end = block
    logits, block_state = block_logits(denoiser, canvas, cache, start, end, block_state)
    part, part_conf = sample_tokens(logits, generators, **sampling)
    tokens, conf = canvas.answer.clone(), torch.zeros(canvas.answer.shape, device=canvas.ids.device)
    tokens[:, start:end], conf[:, start:end] = part.to(tokens.device), part_conf.to(conf.device)
    return tokens, conf, block_state


def repeats_masked_neighbour(predicted: Tensor, masked: Tensor) -> Tensor:
    """Bool [B, N]: masked slots predicting the same token as the masked slot just left of them (the leftmost slot
    of such a run is not one). One forward predicts each masked slot as if its neighbours were unknown, so it
    often writes one word into several adjacent slots ("Japan Japan Japan"); committed one at a time, the next
    slot is predicted knowing the word is already there (`delay_repeats`)."""
    repeats = torch.zeros_like(masked)
    repeats[:, 1:] = masked[:, 1:] & masked[:, :-1] & (predicted[:, 1:] == predicted[:, :-1])
    return repeats


def held_back(predicted: Tensor, masked: Tensor, eos: Tensor, delay_eos: bool, delay_repeats: bool):
    """(is_eos, repeats), bool [B, N] each: the slots `delay_eos` and `delay_repeats` hold back (all False for an
    option that is off). One owner for both samplers, so `confidence` and `threshold` hold back the same slots."""
    none = torch.zeros_like(masked)
    is_eos = torch.isin(predicted, eos) if delay_eos else none
    repeats = repeats_masked_neighbour(predicted, masked) if delay_repeats else none
    return is_eos, repeats


def rank_held_back_last(priority: Tensor, is_eos: Tensor, repeats: Tensor) -> Tensor:
    """`priority` (in [0, 1]) with every EOS candidate below every other slot and every repeat below both."""
    return priority - 2.0 * is_eos.float() - 4.0 * repeats.float()


def settled(answer: Tensor, eos: Tensor, mask_id: int) -> Tensor:
    """Bool [B]: rows whose text can no longer change — an EOS with every slot before it committed. For samplers
    that never change a committed token (confidence, threshold) the rest of such a row is noise that `finish`
    cuts off, so decoding it would be wasted forwards (`stop_at_eos`; AR generation stops at EOS the same way)."""
    n = answer.shape[1]
    index = torch.arange(n, device=answer.device).expand_as(answer)
    first_eos = torch.where(torch.isin(answer, eos), index, n).amin(-1)
    first_mask = torch.where(answer == mask_id, index, n).amin(-1)
    return first_eos < first_mask


def row_generators(n: int, seed: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per row, each seeded with `seed`: a prompt samples the same alone or in a batch."""
    device = torch.device(device)
    return [torch.Generator(device=device).manual_seed(seed) for _ in range(n)]


def filter_logits(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k and top-p (nucleus) filtering, on the last dimension."""
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_tokens(logits: Tensor, generators: list[torch.Generator], *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[Tensor, Tensor]:
    """Draw a token per slot; returns (tokens [B, N], confidence [B, N] = model probability of that token).

    temperature 0 is greedy. Confidence is read from the unfiltered softmax, so it means the same for every
    strategy and setting.
    """
    probs = logits.softmax(-1)
    if temperature <= 0:
        tokens = logits.argmax(-1)
    else:
        tokens = draw_rows(filter_logits(logits, temperature, top_k, top_p).softmax(-1), generators)
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def draw_rows(probs: Tensor, generators: list[torch.Generator]) -> Tensor:
    """A token per slot drawn from `probs` [B, N, V], row b with its own generator: LongTensor [B, N]. Each row
    draws on its generator's device (a CPU generator cannot sample a CUDA tensor)."""
    return torch.stack([torch.multinomial(probs[b].to(g.device), 1, generator=g).squeeze(-1).to(probs.device)
                        for b, g in enumerate(generators)])


def record_step(steps: list[list[Step]] | None, on_step, iteration: int, before: Tensor, after: Tensor,
                confidence: Tensor, mask_id: int, nfe: int) -> None:
    """Build the per-prompt Step records of one iteration and hand them out."""
    if steps is None and on_step is None:
        return
    masked = (after == mask_id).tolist()
    changed = (after != before).tolist()
    tokens, conf = after.tolist(), confidence.tolist()
    records = [Step(iteration, tokens[b], masked[b], changed[b], conf[b], nfe) for b in range(after.shape[0])]
    if steps is not None:
        for b, record in enumerate(records):
            steps[b].append(record)
    if on_step is not None:
        on_step(records)


def finish(tokenizer, canvas: Canvas, strategy: str, nfe: int, started: float, eos_ids: set[int],
           steps: list[list[Step]] | None, mask_id: int, cache=None) -> list[Generation]:
    """Cut each answer at its first EOS (text after it is noise) and decode. `cache`: the batch's prefix cache,
    if any (its prompt pass is reported as `prefix_forwards`)."""
    prefix_forwards = cache.forwards if cache is not None else 0
    seconds = time.perf_counter() - started
    out = []
    for b, row in enumerate(canvas.answer.tolist()):
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        ids = [t for t in row[:cut] if t != mask_id]
        out.append(Generation(canvas.prompts[b], tokenizer.decode(ids, skip_special_tokens=True), ids, nfe, seconds,
                              strategy, steps[b] if steps is not None else [], prefix_forwards))
    return out


def eos_token_ids(tokenizer, model=None) -> set[int]:
    """The ids that end an answer: the tokenizer's EOS (the turn end for chat models), plus the EOS ids of
    `model`'s generation config when a model (a `Denoiser` or a transformers model) is given."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    model = getattr(model, "causal_lm", model)
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(generation_eos, int):
        generation_eos = [generation_eos]
    return ids | {int(i) for i in generation_eos or []}


@torch.no_grad()
def prepare(denoiser, tokenizer, prompts: list[str], max_new_tokens: int, *, chat_template: bool = True):
    """Canvas on the denoiser's device, in eval mode."""
    denoiser.eval()
    device = next(denoiser.parameters()).device
    return build_canvas(tokenizer, prompts, max_new_tokens, denoiser.mask_id, chat_template=chat_template,
                        device=device)
