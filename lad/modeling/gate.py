"""Mask-gated LoRA (`lora.gate: masked`): the adapter changes only the mask-token columns.

Every LoRA layer adds `lora_B(lora_A(x)) * scaling` to its base layer's output; here that update is multiplied by a
gate that is 1 at the columns holding the mask token and 0 elsewhere, so a clean column computes exactly what the
base model computes (x + 0 is x, bit for bit). Under attention in which clean columns see only clean, earlier
columns (prompt- or block-causal with a causal clean stream), a clean column's keys, values and logits then ARE the
AR parent's: one forward over [text, masks] both verifies a draft with the parent (clean columns) and drafts the
next one (mask columns), over one exact K/V cache (lad/sampling/speculative.py; I-DLM's R-ISD, Apple's "Your LLM
Knows the Future").

Built on PEFT's own LoRA layers, without changing them: a pre-hook on the input embeddings reads which columns of
the forward hold the mask token, and a forward hook on every `lora_B` module multiplies its output by that gate.
Every path through the decoder (training, cached forwards, scoring) embeds its input ids first, so every forward
is gated with its own columns. A gated adapter cannot be merged into the weights (a merged update would act at
every column): export refuses to merge it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

GATES = ("none", "masked")


def check_gate(gate: str | None) -> str | None:
    """The gate as the Denoiser keeps it: None (no gate) or "masked"; ValueError for anything else."""
    if gate in (None, "none"):
        return None
    if gate != "masked":
        raise ValueError(f"lora.gate must be one of {', '.join(GATES)}, got {gate!r}")
    return gate


class MaskGate:
    """The hooks of one gated model; `remove()` takes them off again."""

    def __init__(self, model: nn.Module, mask_id: int):
        self.mask_id = int(mask_id)
        self.columns: Tensor | None = None  # [B, L, 1] of the forward under way: 1 at mask columns
        self.given: Tensor | None = None  # [B, L] set by `at`: the gated columns, whatever tokens they hold
        lora_b = [module for name, module in model.named_modules() if _is_lora_b(name, module)]
        if not lora_b:
            raise ValueError("lora.gate: masked needs a LoRA adapter (the model has no LoRA layers)")
        embeddings = model.get_input_embeddings()
        self.handles = [embeddings.register_forward_pre_hook(self._read_columns)]
        self.handles += [module.register_forward_hook(self._gated) for module in lora_b]

    def _read_columns(self, module, args):
        ids = args[0] if args else None
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.long, torch.int):
            raise ValueError("a mask-gated model is called with input ids (the gate reads the mask columns from them)")
        gated = ids == self.mask_id if self.given is None else self.given.to(ids.device)
        if gated.shape != ids.shape:
            raise ValueError(f"mask gate: {tuple(gated.shape)} gated columns given for input ids {tuple(ids.shape)}")
        self.columns = gated.unsqueeze(-1)

    @contextmanager
    def at(self, columns: Tensor):
        """Gate exactly `columns` (bool [B, L] of the forward's input ids) while inside: a text that contains the
        mask token itself (a parent may write it) is then still read as clean text."""
        self.given = columns
        try:
            yield
        finally:
            self.given = None

    def _gated(self, module, args, output: Tensor) -> Tensor:
        if self.columns is None or self.columns.shape[:-1] != output.shape[:-1]:
            raise RuntimeError("mask gate: a LoRA layer ran on columns the gate was not read for")
        return output * self.columns.to(output.dtype)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _is_lora_b(name: str, module: nn.Module) -> bool:
    """PEFT keeps each LoRA layer's B matrices in a ModuleDict `lora_B` (one entry per adapter)."""
    return ".lora_B." in f".{name}" and isinstance(module, nn.Linear)


def attach_gate(model: nn.Module, mask_id: int, gate: str | None) -> MaskGate | None:
    """Gate `model`'s LoRA layers at the mask columns (gate "masked"); None when there is no gate."""
    return MaskGate(model, mask_id) if check_gate(gate) else None


@contextmanager
def parent_switch(denoiser):
    """The denoiser's mask gate, or for an ungated run one attached for the call: `gate.at(all False)` switches
    the adapter off for a forward (the parent, x + 0 is x) and other columns keep it, with no per-forward mode
    switch (`Denoiser.as_parent` walks every module, which costs as much as a decode step on a CPU)."""
    if denoiser.gated:
        yield denoiser.gate
        return
    gate = MaskGate(denoiser.model, denoiser.mask_id)
    try:
        yield gate
    finally:
        gate.remove()
