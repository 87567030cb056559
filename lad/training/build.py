"""What a run trains and how: the base model with its mask token, the trainable parameters, optimizer and LR
schedule. Each is a function of the recipe alone, so the benchmarks build exactly what training builds."""

from __future__ import annotations

import math

import torch

from lad.modeling.adapters import attach_lora, prepare_embeddings
from lad.modeling.load import load_base
from lad.modeling.mask_token import MaskToken, resolve_mask_token
from lad.recipe import Recipe


def load_model(recipe: Recipe):
    """Base model + tokenizer, with the mask token chosen (and its embedding row added if needed)."""
    model, tokenizer = load_base(recipe.model, seed=recipe.seed)
    mask = resolve_mask_token(tokenizer, recipe.mask_token)
    prepare_embeddings(model, tokenizer)
    if recipe.gradient_checkpointing and not recipe.model.quantization:
        enable = getattr(model, "activation_checkpointing_enable", None)  # the new name (transformers >= 5.2x)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, mask


def add_trainable(model, recipe: Recipe, mask: MaskToken):
    if recipe.lora.enabled:
        return attach_lora(model, recipe.lora, mask, quantized=recipe.model.quantization is not None,
                           gradient_checkpointing=recipe.gradient_checkpointing)
    model.requires_grad_(True)
    return model


def build_optimizer(recipe: Recipe, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=recipe.optim.lr, betas=tuple(recipe.optim.betas), eps=recipe.optim.eps,
                  weight_decay=recipe.optim.weight_decay)
    if recipe.optim.name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("optim.name=adamw_8bit needs bitsandbytes: pip install 'lad[quant]'") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_scheduler(recipe: Recipe, optimizer, total_steps: int):
    warmup = recipe.optim.warmup_steps
    kind = recipe.optim.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
