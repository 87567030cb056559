"""LAD: turn a pretrained autoregressive LLaMA-family model into a diffusion language model with LoRA."""

__version__ = "0.1.0"
