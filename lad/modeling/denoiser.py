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

Prefix K/V cache (sampling only; docs/sampling.md): `prefix_cache(prompt_ids, prompt_mask)` runs the prompt
alone once and keeps its keys and values; `forward(..., cache=...)` then runs only the columns after the cached
prefix against them. The prefix does not see the rest of the canvas, so this equals a full forward whose mask
forbids the prefix's rows from attending to later columns: it only approximates the bidirectional forward, and
it is exact for prompt-causal attention (`attention="prompt_causal"`, whose prompt never sees the canvas).
With `shift=True` the prediction for the first answer slot is read from the last prompt token: a bidirectional
model recomputes that column with the canvas, a prompt-causal one keeps its hidden state in the cache.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bidirectional import causal_attention, make_bidirectional
from .prompt_causal import ATTENTION_MODES, answer_columns, prompt_causal_allowed
from .windows import decoder_mask


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over real tokens, so left padding does not move positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def rebuilt_cache(kv, take):
    """A new transformers DynamicCache whose every layer holds `take(keys)` and `take(values)` of `kv`'s layer
    (tensors [B, heads, columns, head_dim]): rows or columns picked from a cache, which stays unchanged."""
    from transformers import DynamicCache

    out = DynamicCache()
    for index, layer in enumerate(kv.layers):
        out.update(take(layer.keys), take(layer.values), index)
    return out


@contextmanager
def cropped_back(kv, length: int):
    """Crop the K/V cache `kv` back to its first `length` columns when the block ends, however it ends: a cached
    forward appends the columns it computed, which the next forward must not see."""
    try:
        yield kv
    finally:
        grown = kv.get_seq_length() - length
        if grown > 0:
            kv.crop(-grown)


def previous_positions(positions: Tensor, who: str) -> Tensor:
    """Bool [B, L]: the positions one to the left of `positions`, whose hidden states predict them (the AR rule)."""
    if positions[:, 0].any():
        raise ValueError(f"{who} the first position cannot be predicted (nothing precedes it)")
    source = torch.zeros_like(positions)
    source[:, :-1] = positions[:, 1:]
    return source


@dataclass
class PrefixCache:
    """Keys and values of a canvas's first `length` columns, computed with those columns alone.

    `ids` and `attention_mask` ([B, length]) are the cached columns; every cached forward checks that its canvas
    starts with them. `kv` is a transformers `DynamicCache` of exactly `length` positions (None when `length` is
    0: then there is nothing to reuse and the forward is the full one); cached forwards append to it and crop it
    back, so it never grows.
    """

    kv: object
    ids: Tensor
    attention_mask: Tensor
    last_hidden: Tensor | None = None  # [B, H] of the last cached column (prompt-causal + shift: it predicts slot 0)

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @property
    def forwards(self) -> int:
        """Forwards spent building it (0 or 1): reported apart from the sampler's NFE."""
        return int(self.length > 0)

    def select(self, rows: Tensor) -> PrefixCache:
        """A new cache of rows `rows` (LongTensor; repeats allowed, e.g. one context for each of its answers);
        this one is unchanged."""
        rows = rows.to(self.ids.device)
        kv = None if self.kv is None else rebuilt_cache(self.kv, lambda t: t[rows.to(t.device)])
        last = self.last_hidden[rows.to(self.last_hidden.device)] if self.last_hidden is not None else None
        return PrefixCache(kv, self.ids[rows], self.attention_mask[rows], last)


def _cache_keyword(decoder: nn.Module) -> str:
    """transformers 5.24 renamed the decoder's `past_key_values` argument to `cache` (the old name is deprecated)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class Denoiser(nn.Module):
    def __init__(self, model: nn.Module, mask_id: int, shift: bool = False, attention: str = "bidirectional"):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        self.model = model  # a transformers CausalLM, or a PeftModel around one
        self.mask_id = int(mask_id)
        self.shift = bool(shift)
        self.attention = attention  # "prompt_causal": see lad/modeling/prompt_causal.py
        make_bidirectional(model)

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
        return self.attention == "prompt_causal"

    def attention_for(self, input_ids: Tensor, attention_mask, answer_start: Tensor | None):
        """The mask the decoder gets: the 2-D padding mask (transformers' bidirectional path), or with prompt-causal
        attention the 4-D mask built from `answer_start` (required then: without it the prompt would be read
        bidirectionally, which is not what the model was trained on), cut to the model's sliding windows
        (lad/modeling/windows.py). A 4-D mask (or per-layer-type masks) is passed on as it is."""
        if not self.prompt_causal or isinstance(attention_mask, dict) or (
                attention_mask is not None and attention_mask.dim() == 4):
            return attention_mask
        if answer_start is None:
            raise ValueError("this model reads its prompt causally (attention: prompt_causal): "
                             "pass answer_start, the first answer column of each row")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        answer_start = answer_start.to(attention_mask.device)
        return decoder_mask(prompt_causal_allowed(attention_mask, answer_start),
                            answer_columns(answer_start, attention_mask.shape[1]), self.config,
                            self.causal_lm.get_input_embeddings().weight.dtype)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None, answer_start: Tensor | None = None) -> Tensor:
        if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 and position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        attention_mask = self.attention_for(input_ids, attention_mask, answer_start)
        out = self.causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def _decode(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, kv) -> Tensor:
        """Hidden states of `input_ids`, appending their keys and values to the cache `kv`."""
        decoder = self.causal_lm.get_decoder()
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                      **{_cache_keyword(decoder): kv})
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
        exact = self.prompt_causal
        length = max(prompt_ids.shape[1] - (1 if self.shift and not exact else 0), 0)
        ids, mask = prompt_ids[:, :length], prompt_mask[:, :length]
        if not length:
            return PrefixCache(None, ids, mask)
        kv = DynamicCache()
        with causal_attention(self.model, True) if exact else nullcontext():
            hidden = self._decode(ids, mask, position_ids_from_mask(mask), kv)
        return PrefixCache(kv, ids, mask, hidden[:, -1] if exact and self.shift else None)

    def _cached_hidden(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                       cache: PrefixCache) -> Tensor:
        """Hidden states of the columns after the cached prefix ([B, L - length, H]), attending to the prefix's
        cached keys and values and bidirectionally among themselves; the cache is cropped back afterwards."""
        k = cache.length
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.dim() != 2:
            raise ValueError("a cached forward takes a 2-D attention mask (padding) over the whole canvas")
        if input_ids.shape[1] <= k or not (torch.equal(input_ids[:, :k], cache.ids.to(input_ids.device))
                                          and torch.equal(attention_mask[:, :k].bool(),
                                                          cache.attention_mask.to(attention_mask.device).bool())):
            raise ValueError(f"the canvas does not start with the cached prefix ({k} columns)")
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        with cropped_back(cache.kv, k):  # back to the prefix alone, however the forward ended
            return self._decode(input_ids[:, k:], attention_mask, position_ids[:, k:], cache.kv)

    def head(self, hidden: Tensor) -> Tensor:
        logits = self.causal_lm.get_output_embeddings()(hidden)
        # the mask token is never a prediction: keep its probability at zero everywhere
        return logits.index_fill(-1, torch.tensor([self.mask_id], device=logits.device), torch.finfo(logits.dtype).min)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, positions: Tensor | None = None,
                position_ids: Tensor | None = None, cache: PrefixCache | None = None,
                answer_start: Tensor | None = None) -> Tensor:
        """Logits for token i at index i.

        positions: optional bool [B, L]; then only those tokens are predicted and the result is [N, V] in
        row-major order of the True entries. Otherwise [B, L, V].
        cache: a `prefix_cache` of the canvas's first columns; then only the columns after it are run (the
        prefix does not see them), `positions` is required and must not ask for a token predicted from inside
        the prefix. The result has the same shape and order as without the cache.
        answer_start: LongTensor [B], each row's first answer column; required with prompt-causal attention and
        ignored otherwise (callers pass it always: they know where the prompt ends, the model decides).
        """
        if cache is not None and cache.length:
            if positions is None:
                raise ValueError("a cached forward needs `positions` (the tokens to predict)")
            hidden = self._cached_hidden(input_ids, attention_mask, position_ids, cache)
            return self.head_at(hidden, cache.length, positions, cache.last_hidden)
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, answer_start)
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
