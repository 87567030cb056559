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
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from .bidirectional import causal_attention, make_bidirectional


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over real tokens, so left padding does not move positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Denoiser(nn.Module):
    def __init__(self, model: nn.Module, mask_id: int, shift: bool = False):
        super().__init__()
        self.model = model  # a transformers CausalLM, or a PeftModel around one
        self.mask_id = int(mask_id)
        self.shift = bool(shift)
        make_bidirectional(model)

    # -- the parts of the wrapped model we call directly
    @property
    def causal_lm(self) -> nn.Module:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    @property
    def config(self):
        return self.causal_lm.config

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None) -> Tensor:
        if attention_mask is not None and position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def head(self, hidden: Tensor) -> Tensor:
        logits = self.causal_lm.get_output_embeddings()(hidden)
        # the mask token is never a prediction: keep its probability at zero everywhere
        return logits.index_fill(-1, torch.tensor([self.mask_id], device=logits.device), torch.finfo(logits.dtype).min)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, positions: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """Logits for token i at index i.

        positions: optional bool [B, L]; then only those tokens are predicted and the result is [N, V] in
        row-major order of the True entries. Otherwise [B, L, V].
        """
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        if positions is None:
            logits = self.head(hidden)
            if self.shift:
                logits = torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)
            return logits
        positions = positions.bool()
        if self.shift:
            if positions[:, 0].any():
                raise ValueError("with shift=True the first position cannot be predicted (nothing precedes it)")
            source = torch.zeros_like(positions)
            source[:, :-1] = positions[:, 1:]
        else:
            source = positions
        return self.head(hidden[source])

    logits = forward

    @contextmanager
    def as_parent(self):
        """Run as the causal AR parent: adapter disabled, causal attention (output i predicts token i+1)."""
        disable = getattr(self.model, "disable_adapter", None)
        with (disable() if callable(disable) else nullcontext()), causal_attention(self.model, True):
            yield self.causal_lm

    def parent_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits of the AR parent ([B, L, V], index i predicts token i+1)."""
        position_ids = position_ids_from_mask(attention_mask) if attention_mask is not None else None
        with self.as_parent() as parent:
            return parent(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits
