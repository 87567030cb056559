"""Attach trainable parameters: PEFT LoRA (optionally over 4/8-bit weights: QLoRA), or full fine-tuning.

When the mask token was added to the vocabulary, its new embedding row is trained through PEFT's
`trainable_token_indices`, which trains that row alone (and keeps tied input/output embeddings tied).
"""

from __future__ import annotations

from torch import nn

from ..recipe import LoraSpec
from .mask_token import MaskToken


def prepare_embeddings(model: nn.Module, tokenizer) -> None:
    """Resize the embeddings when the tokenizer grew (a new mask token); the new row starts at the mean."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def attach_lora(model: nn.Module, spec: LoraSpec, mask: MaskToken, *, quantized: bool = False,
                gradient_checkpointing: bool = False) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
        trainable_token_indices=[mask.id] if mask.added else None,
    )
    return get_peft_model(model, config)


class LoraTargetError(ValueError):
    """lora.target_modules names no layer of the base model (one line, before anything is written)."""


def check_lora_targets(model: nn.Module, spec: LoraSpec) -> None:
    """Refuse target_modules that match no linear layer, by PEFT's own rule (a list entry matches a module whose
    name is it or ends with '.' + it; a string is a regex the whole name must match), before the run writes."""
    import re

    targets = spec.target_modules
    if targets == "all-linear":
        return
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if isinstance(targets, str):
        try:
            found = any(re.fullmatch(targets, name) for name in names)
        except re.error as err:
            raise LoraTargetError(f"lora.target_modules: {targets!r} is not a valid regular expression "
                                  f"({err})") from None
        missing = [] if found else [targets]
        if missing and any(n.endswith("." + targets) for n in names):
            raise LoraTargetError(f"lora.target_modules: a single string is a regular expression the whole layer name "
                                  f"must match, and {targets!r} matches none; write a list: [{targets}]")
    else:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing or not targets:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise LoraTargetError(f"lora.target_modules: {missing[0] if missing else targets!r} matches no linear layer of "
                              f"the base model (its layers: {', '.join(kinds)}; or all-linear)")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
