"""`Denoiser`: the one object that training, sampling, scoring and the demo call.

It wraps the (PEFT-adapted, bidirectional) model, knows the mask id and the `shift` flag, and returns logits
aligned so that `logits[..., i, :]` predicts token `i` whatever `shift` says. Nothing else in LAD knows
about the shift:

- `shift=False` (LAD): the output at position i predicts token i. The frozen LM head was trained for i+1,
  so LoRA learns the shift.
- `shift=True` (Dream, DiffuLLaMA, RND1): the prediction for token i is read from position i-1, keeping the
  AR head aligned. Position 0 is then never predicted (its logits are zeros).

It computes the LM head only at the positions asked for: the head is a large share of the cost of small
models, and training needs only the supervised positions. It is an `nn.Module`, so Accelerate can wrap it
in DDP and gradients flow through `forward`. `as_parent()` runs the same weights as the causal AR parent.

Prefix K/V cache (lad/modeling/cache.py; docs/sampling.md): `prefix_cache(prompt_ids, prompt_mask)` runs the
prompt alone once and keeps its keys and values; `forward(..., cache=...)` then runs only the columns after the
cached prefix against them (`decode_into` is the cached decoder call every cache of cache.py makes). The prefix
does not see the rest of the canvas, so this equals a full forward whose mask forbids the prefix's rows from
attending to later columns: it only approximates the bidirectional forward, and it is exact for prompt-causal
attention (`attention="prompt_causal"` or `"block_causal"`, whose prompt never sees the canvas). A block-causal run
also caches each finished answer block exactly (`GrowingCache`, lad/modeling/cache.py).

`gate="masked"` (lad/modeling/gate.py) applies the adapter at mask-token columns only: every other column is the
base model, so clean text read causally (`draft_mask`) computes the AR parent exactly, which one forward of
self-speculative decoding uses to check a draft while it drafts the next (lad/sampling/speculative.py).
With `shift=True` the prediction for the first answer slot is read from the last prompt token: a bidirectional
model recomputes that column with the canvas, a prompt-causal one keeps its hidden state in the cache.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from .bidirectional import causal_attention, make_bidirectional
from .gate import attach_gate
from .cache import PrefixCache, cache_keyword, hidden_after_prefix, position_ids_from_mask
from . import attention as modes
from .windows import decoder_mask


def previous_positions(positions: Tensor, who: str) -> Tensor:
    """Bool [B, L]: the positions one to the left of `positions`, whose hidden states predict them (the AR rule)."""
    if positions[:, 0].any():
        raise ValueError(f"{who} the first position cannot be predicted (nothing precedes it)")
    source = torch.zeros_like(positions)
    source[:, :-1] = positions[:, 1:]
    return source


class Denoiser(nn.Module):
    def __init__(self, model: nn.Module, mask_id: int, shift: bool = False, attention: str = "bidirectional",
                 info=None, block_size: int | None = None, gate: str | None = None):
        super().__init__()
        self.model = model  # a transformers CausalLM, or a PeftModel around one
        self.mask_id = int(mask_id)
        self.shift = bool(shift)
        self.attention = modes.check_mode(attention, block_size)  # lad/modeling/attention.py
        self.block_size = block_size if attention == modes.BLOCK_CAUSAL else None  # the trained block length
        self.info = info  # the run's settings (`run.LadInfo`, from lad.json): the one owner samplers, scorers ask
        make_bidirectional(model)
        self.gate = attach_gate(model, mask_id, gate)  # lad/modeling/gate.py: LoRA only at mask columns, or None

    # -- the parts of the wrapped model we call directly
    @property
    def causal_lm(self) -> nn.Module:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def prompt_causal(self) -> bool:
        return self.attention == modes.PROMPT_CAUSAL

    @property
    def block_causal(self) -> bool:
        return self.attention == modes.BLOCK_CAUSAL

    @property
    def gated(self) -> bool:
        """Whether the adapter acts only at mask columns (`lora.gate: masked`): every other column computes the base
        model exactly, so clean text read causally is the parent's (lad/modeling/gate.py)."""
        return self.gate is not None

    @property
    def prefix_cache_exact(self) -> bool:
        """Whether a prompt K/V cache changes nothing for this model (its prompt never sees the answer)."""
        return modes.prefix_cache_exact(self.attention)

    def attention_for(self, input_ids: Tensor, attention_mask, answer_start: Tensor | None,
                      annealed: Tensor | None = None, block_size: int | None = None):
        """The mask the decoder gets, for any mode: the 2-D padding mask (transformers' bidirectional path), or the
        4-D mask of the run's mode (prompt-causal needs `answer_start`: without it the prompt would be read
        bidirectionally, which is not what the model was trained on), combined with an annealing draw
        (`annealed`, training only), cut to the model's sliding windows (lad/modeling/windows.py). A 4-D mask (or
        per-layer-type masks) is passed on as it is. `block_size`: a block-causal run's blocks (default: the
        trained block length; a sampler may decode in smaller blocks)."""
        if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.dim() == 4):
            return attention_mask
        padding = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        mask = modes.allowed(self.attention, padding, answer_start, annealed, block_size or self.block_size)
        if mask is None:
            return attention_mask
        return decoder_mask(*mask, self.config, self.mask_dtype)

    @property
    def mask_dtype(self) -> torch.dtype:
        return self.causal_lm.get_input_embeddings().weight.dtype

    def layout_mask(self, kind: Tensor, block: Tensor, attention_mask: Tensor, position_ids: Tensor):
        """The decoder mask of a block-causal training row laid out as prompt, clean answer and noisy copies
        (`attention.layout_allowed`; lad/training/blocks.py), windows cut by position."""
        allowed = modes.layout_allowed(kind, block, attention_mask, clean_causal=self.gated)
        both_ways = kind >= modes.NOISY if self.gated else kind != modes.PROMPT  # gated: the clean answer is causal
        return decoder_mask(allowed, both_ways, self.config, self.mask_dtype, position_ids)

    def draft_mask(self, attention_mask: Tensor, first_draft: int, position_ids: Tensor):
        """The decoder mask of a speculative round (lad/sampling/speculative.py), whatever the run's mode: the text
        before column `first_draft` read causally, as the parent reads it, and the draft columns from it on
        attending to all of it and to each other (prompt-causal attention with the draft as the answer)."""
        start = modes.answer_start_at(first_draft, attention_mask.shape[0], attention_mask.device)
        allowed = modes.prompt_causal_allowed(attention_mask, start)
        both_ways = modes.answer_columns(start, attention_mask.shape[1])
        return decoder_mask(allowed, both_ways, self.config, self.mask_dtype, position_ids)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None, answer_start: Tensor | None = None,
                      block_size: int | None = None) -> Tensor:
        if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 and position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        attention_mask = self.attention_for(input_ids, attention_mask, answer_start, block_size=block_size)
        out = self.causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def decode_into(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, kv) -> Tensor:
        """Hidden states of the columns `input_ids`, attending to the keys and values already in the transformers
        cache `kv` and appending theirs to it (the caches of lad/modeling/cache.py crop it back). `attention_mask`
        covers the cached columns, then these; `position_ids` are these columns' own, from the whole canvas."""
        decoder = self.causal_lm.get_decoder()
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                      **{cache_keyword(decoder): kv})
        return out.last_hidden_state

    def prefix_cache(self, prompt_ids: Tensor, prompt_mask: Tensor | None = None) -> PrefixCache:
        """Run the (left-padded) prompts alone and keep their keys and values for `forward(..., cache=...)`.

        Attention among the prompt tokens is bidirectional (causal with prompt-causal attention), padding masked,
        position ids from the mask: what a full forward computes for them when they cannot see the columns that
        follow. With `shift=True` the first answer slot is predicted from the last prompt column: a bidirectional
        model leaves that column out (it is recomputed with the canvas, which it sees); a prompt-causal one keeps
        it and its hidden state, which the canvas cannot change. With prompt-causal attention the cache is exact.
        Every layer keeps all its columns, sliding-window layers too: transformers cuts their windows in the masks
        it builds (as LAD's own masks do, lad/modeling/windows.py), while its sliding cache layers would drop old
        columns and could not be cropped back after a cached forward.
        """
        from transformers import DynamicCache

        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        exact = self.prefix_cache_exact
        length = max(prompt_ids.shape[1] - (1 if self.shift and not exact else 0), 0)
        ids, mask = prompt_ids[:, :length], prompt_mask[:, :length]
        if not length:
            return PrefixCache(None, ids, mask)
        kv = DynamicCache()
        with causal_attention(self.model, True) if exact else nullcontext():
            hidden = self.decode_into(ids, mask, position_ids_from_mask(mask), kv)
        return PrefixCache(kv, ids, mask, hidden[:, -1] if exact and self.shift else None)

    def head(self, hidden: Tensor) -> Tensor:
        logits = self.causal_lm.get_output_embeddings()(hidden)
        # the mask token is never a prediction: keep its probability at zero everywhere
        return logits.index_fill(-1, torch.tensor([self.mask_id], device=logits.device), torch.finfo(logits.dtype).min)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, positions: Tensor | None = None,
                position_ids: Tensor | None = None, cache: PrefixCache | None = None,
                answer_start: Tensor | None = None, block_size: int | None = None,
                sources: Tensor | None = None) -> Tensor:
        """Logits for token i at index i.

        positions: optional bool [B, L]; then only those tokens are predicted and the result is [N, V] in
        row-major order of the True entries. Otherwise [B, L, V].
        cache: a `prefix_cache` of the canvas's first columns; then only the columns after it are run (the
        prefix does not see them), `positions` is required and must not ask for a token predicted from inside
        the prefix. The result has the same shape and order as without the cache.
        answer_start: LongTensor [B], each row's first answer column; required with prompt-causal attention and
        ignored otherwise (callers pass it always: they know where the prompt ends, the model decides).
        block_size: a block-causal run's blocks for this forward (default: the trained block length).
        sources: LongTensor [N], flat indices into [B·L] of the columns whose hidden states give the N predictions,
        in order, instead of `positions` and the shift rule (the block-causal training layout, where a block's
        first token is read from the clean copy: lad/training/blocks.py). The result is [N, V].
        """
        if sources is not None:
            hidden = self.hidden_states(input_ids, attention_mask, position_ids, answer_start)
            return self.head(hidden.flatten(0, 1)[sources])
        if cache is not None and cache.length:
            if positions is None:
                raise ValueError("a cached forward needs `positions` (the tokens to predict)")
            hidden = hidden_after_prefix(self, input_ids, attention_mask, position_ids, cache)
            return self.head_at(hidden, cache.length, positions, cache.last_hidden)
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, answer_start, block_size)
        if positions is None:
            logits = self.head(hidden)
            if self.shift:
                logits = torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)
            return logits
        return self.head(hidden[self._source(positions.bool())])

    def head_at(self, hidden: Tensor, first: int, positions: Tensor, last_hidden: Tensor | None = None) -> Tensor:
        """Logits [N, V] for `positions` (bool [B, L]) from `hidden`, the hidden states of canvas columns first,
        first+1, ... of a cached forward; `last_hidden` [B, H], when given, is column first-1's (a prompt-causal
        prefix's last column, which predicts the first answer slot with shift=True)."""
        if last_hidden is not None:
            hidden = torch.cat([last_hidden[:, None].to(hidden.dtype), hidden], dim=1)
            first -= 1
        source = self._source(positions.bool())
        end = first + hidden.shape[1]
        if source[:, :first].any() or source[:, end:].any():
            raise ValueError(f"positions predicted from outside the computed columns [{first}, {end}) (from the "
                             "cached prefix or beyond the window) cannot be computed by a cached forward")
        return self.head(hidden[source[:, first:end]])

    def _source(self, positions: Tensor) -> Tensor:
        """Bool [B, L]: the positions whose hidden states predict `positions` (one to the left with shift)."""
        return previous_positions(positions, "with shift=True") if self.shift else positions

    logits = forward

    @contextmanager
    def as_parent(self):
        """Run as the causal AR parent: adapter disabled, causal attention (output i predicts token i+1)."""
        disable = getattr(self.model, "disable_adapter", None)
        with (disable() if callable(disable) else nullcontext()), causal_attention(self.model, True):
            yield self.causal_lm

    @contextmanager
    def parent_reader(self, canvas):
        """The AR parent reading `canvas` (lad/sampling/common.py) left to right over one K/V cache: yields
        `read(first, end)`, the parent's float log-distributions [B, end - first, V] at answer slots [first, end),
        each given the canvas as it stands before it (mask token excluded, as in `head`). The cache keeps the
        columns before slot `first`, so a read re-reads only what a changed slot can change. The adapter is gated
        off (x + 0 is x: the base model exactly) with no per-forward mode switch (lad/modeling/gate.py)."""
        from transformers import DynamicCache

        from .cache import crop_to, query_rows
        from .gate import parent_switch

        start, kv = canvas.prompt_width, DynamicCache()
        position_ids = position_ids_from_mask(canvas.attention_mask)
        causal = self.draft_mask(canvas.attention_mask, canvas.ids.shape[1], position_ids)  # no draft: all causal

        def read(first: int, end: int) -> Tensor:
            crop_to(kv, start + first - 1)  # slot s is read from column start + s - 1
            done, last = kv.get_seq_length(), start + end - 1
            ids = canvas.ids[:, done:last]
            with gate.at(torch.zeros_like(ids, dtype=torch.bool)):
                hidden = self.decode_into(ids, query_rows(causal, done, last), position_ids[:, done:last], kv)
            return self.head(hidden[:, hidden.shape[1] - (end - first):]).float().log_softmax(-1)

        with torch.no_grad(), parent_switch(self) as gate:
            yield read

    @torch.no_grad()
    def parent_logits_at(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor,
                         position_ids: Tensor | None = None) -> Tensor:
        """The AR parent's distribution for the tokens at `positions` (bool [B, L]) given the tokens before them:
        [N, V] read from position i-1 of a causal, adapter-free forward, in the order of `forward(positions=)`.
        The mask token is excluded as in `head` (it is never a prediction). A training target: no gradient."""
        source = previous_positions(positions.bool(), "the parent:")
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        with self.as_parent() as parent:
            hidden = parent.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, use_cache=False).last_hidden_state
        return self.head(hidden[source])

    def parent_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None, keep_last: int = 0) -> Tensor:
        """Next-token logits of the AR parent ([B, L, V], index i predicts token i+1); with keep_last=K only the
        last K positions ([B, K, V]: the LM head is skipped elsewhere, as transformers' `logits_to_keep`)."""
        position_ids = position_ids_from_mask(attention_mask) if attention_mask is not None else None
        with self.as_parent() as parent:
            return parent(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, logits_to_keep=keep_last).logits
