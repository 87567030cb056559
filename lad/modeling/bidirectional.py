"""Make every attention layer of a LLaMA-family model bidirectional, reversibly.

We use transformers' own mechanism instead of hand-built 4-D masks: with `config.is_causal = False`,
`create_causal_mask` builds a bidirectional mask that still hides padding, and every attention module's
`is_causal` flag (read by SDPA and flash attention when no mask is materialised) is set to match. A dense
all-zero mask would ignore padding, lose SDPA's fast kernels and break flash attention.

The flag lives on the config object, which transformers shares between every module built from it (and
between models built from one config object). `make_bidirectional` therefore gives the model its own copy of
the config first, so that patching one model never silently patches another.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

from torch import nn

# Architectures whose masks go through `create_causal_mask` and whose attention modules carry `is_causal`.
# Each one is covered by tests/test_bidirectional.py.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedArchitectureError(ValueError):
    """Raised for a model whose attention LAD cannot make bidirectional."""


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "is_causal") and m is not model and hasattr(m, "config")]


def check_model_type(model_type: str | None, where: str | None = None) -> None:
    """Refuse an architecture LAD cannot make bidirectional (called with the config alone before weights load,
    and on the loaded model by `check_supported`)."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{where + ': ' if where else ''}model_type {model_type!r} is not supported; LAD makes attention "
            f"bidirectional for {', '.join(SUPPORTED_MODEL_TYPES)} (LLaMA-family decoders)")


def check_supported(model: nn.Module) -> None:
    """Raise a clear error unless LAD knows how to make this architecture bidirectional."""
    inner = _inner(model)
    check_model_type(getattr(getattr(inner, "config", None), "model_type", None))
    if not _attention_modules(inner):
        raise UnsupportedArchitectureError(f"no attention module with an `is_causal` flag found in {type(inner).__name__}")


def _detach_config(model: nn.Module) -> None:
    """Give `model` a private copy of its config, re-pointing every module that shared the old one."""
    old = model.config
    # remembered on the model, not as a config attribute: that would be saved to config.json and make every
    # model later built from the reloaded config skip the copy
    if getattr(model, "_lad_private_config", None) is old:
        return
    new = copy.deepcopy(old)
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new
    model._lad_private_config = new


def set_causal(model: nn.Module, causal: bool) -> None:
    """Switch every attention layer to causal (the AR parent) or bidirectional (the denoiser)."""
    inner = _inner(model)
    check_supported(inner)
    _detach_config(inner)
    inner.config.is_causal = causal
    for module in _attention_modules(inner):
        module.is_causal = causal
    # sub-configs (e.g. text_config) share the flag's meaning; keep them in step
    for sub in ("text_config", "decoder"):
        sub_config = getattr(inner.config, sub, None)
        if sub_config is not None and hasattr(sub_config, "is_causal"):
            sub_config.is_causal = causal


def make_bidirectional(model: nn.Module) -> nn.Module:
    """Make attention bidirectional (padding stays masked); returns the same model for chaining."""
    set_causal(model, False)
    return model


def is_causal(model: nn.Module) -> bool:
    return bool(getattr(_inner(model).config, "is_causal", True))


@contextmanager
def causal_attention(model: nn.Module, causal: bool = True):
    """Temporarily run `model` with causal (default) or bidirectional attention, restoring the old mode."""
    before = is_causal(model)
    set_causal(model, causal)
    try:
        yield model
    finally:
        set_causal(model, before)
