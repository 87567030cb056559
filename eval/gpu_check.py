"""Checks only a CUDA GPU can make, for a lent GPU machine (run by `eval/gpu_check.sh`, one prepared script).

    python -m eval.gpu_check env                         versions and the GPU
    python -m eval.gpu_check attention                   SDPA's flash kernel on LAD's bidirectional path
    python -m eval.gpu_check make-base --shape llama3-8b --tokenizer DIR --out DIR
    python -m eval.gpu_check summarise RUN_DIR ...       peak memory and tokens/s of finished runs

Why random weights: the GPU machine reaches no hub, so the 8B recipes run on a model with LLaMA-3.1-8B's exact
shape (and therefore its memory and speed) but random weights, saved as safetensors and loaded by LAD's own
loader. Losses and generations of such a run mean nothing; memory, tokens/s and that every code path runs on
CUDA (bf16, 4-bit QLoRA, 8-bit AdamW, gradient checkpointing) are what it measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# LLaMA-3.1-8B's shape (meta-llama/Llama-3.1-8B-Instruct config.json); "tiny" dry-runs the script on a CPU.
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=50000, max_position_embeddings=2048),
}


def env() -> dict:
    import accelerate
    import peft
    import transformers

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "peft": peft.__version__, "accelerate": accelerate.__version__, "python": sys.version.split()[0],
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import bitsandbytes
        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        out["bitsandbytes"] = f"unavailable: {type(err).__name__}: {err}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   bf16=torch.cuda.is_bf16_supported())
    return out


def make_base(shape: str, tokenizer: str, out: str, device: str) -> dict:
    """A randomly initialised LLaMA of `shape`, in bf16, saved (safetensors) with `tokenizer`'s files."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False, torch_dtype="bfloat16")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    built = time.perf_counter() - t0
    model.save_pretrained(out, max_shard_size="5GB")
    tok.save_pretrained(out)
    (Path(out) / "RANDOM_WEIGHTS.txt").write_text(f"random {shape} weights made by eval/gpu_check.py\n")
    params = sum(p.numel() for p in model.parameters())
    return {"shape": shape, "parameters": params, "build_s": round(built, 1),
            "save_s": round(time.perf_counter() - t0 - built, 1)}


def _median_ms(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 2)


def attention_check(batch: int = 4, length: int = 1024) -> dict:
    """Does LAD's bidirectional path keep SDPA's fused kernels? With no padding, transformers passes no mask and
    `is_causal=False`, so the flash kernel must accept the call (forced with `sdpa_kernel`); its logits must match
    the math kernel's; the first position must see the last token (bidirectional); the prompt-causal 4-D mask
    must run on the memory-efficient kernel. Times: one forward of batch × length with each."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import LlamaConfig, LlamaForCausalLM

    from lad.modeling.denoiser import Denoiser

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    denoiser = Denoiser(model, mask_id=0, attention="bidirectional")
    pc = Denoiser(model, mask_id=0, attention="prompt_causal")
    ids = torch.randint(1, 32000, (batch, length), device="cuda")
    start = torch.full((batch,), length // 2, device="cuda")
    out: dict = {"batch": batch, "length": length, "model": "LLaMA 8 layers × 2048, bf16, random weights"}

    def run(backends, fn):
        with torch.no_grad(), sdpa_kernel(backends):
            return fn()

    def full():
        return denoiser(ids)

    math_logits = run([SDPBackend.MATH], full).float()
    try:
        flash_logits = run([SDPBackend.FLASH_ATTENTION], full).float()
        out["flash_accepts_bidirectional"] = True
        out["flash_vs_math_max_abs_diff"] = round(float((flash_logits - math_logits).abs().max()), 4)
        out["flash_vs_math_mean_abs_diff"] = round(float((flash_logits - math_logits).abs().mean()), 5)
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 32000
        moved = run([SDPBackend.FLASH_ATTENTION], lambda: denoiser(changed)).float()
        out["flash_first_position_sees_last_token"] = bool((moved[:, 0] - flash_logits[:, 0]).abs().max() > 0)
        out["ms_flash"] = _median_ms(lambda: run([SDPBackend.FLASH_ATTENTION], full))
    except RuntimeError as err:
        out["flash_accepts_bidirectional"] = False
        out["flash_error"] = str(err)[:300]
    out["ms_math"] = _median_ms(lambda: run([SDPBackend.MATH], full))

    def prompt_causal():
        return pc(ids, torch.ones_like(ids), answer_start=start)

    pc_math = run([SDPBackend.MATH], prompt_causal).float()
    try:
        pc_eff = run([SDPBackend.EFFICIENT_ATTENTION], prompt_causal).float()
        out["prompt_causal_efficient_max_abs_diff"] = round(float((pc_eff - pc_math).abs().max()), 4)
        out["ms_prompt_causal_efficient"] = _median_ms(lambda: run([SDPBackend.EFFICIENT_ATTENTION], prompt_causal))
    except RuntimeError as err:
        out["prompt_causal_efficient_error"] = str(err)[:300]
    out["ms_prompt_causal_math"] = _median_ms(lambda: run([SDPBackend.MATH], prompt_causal))
    return out


def adapter_check(path: Path) -> dict:
    """What the saved adapter holds: a sharded (FSDP) run that saved before gathering would leave empty or missing
    tensors, and an untrained one all-zero `lora_B` (PEFT's init)."""
    if not path.is_file():
        return {"saved_adapter": False}
    from safetensors.torch import load_file

    weights = load_file(str(path))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    return {"saved_adapter": True, "adapter_tensors": len(weights),
            "adapter_parameters": sum(v.numel() for v in weights.values()),
            "adapter_finite": all(bool(torch.isfinite(v).all()) for v in weights.values()),
            "lora_B_max_abs": max((float(v.abs().max()) for v in lora_b if v.numel()), default=0.0)}


def summarise(runs: list[str]) -> dict:
    """Peak GPU memory, tokens/s (median over logged steps after the first) and losses of finished runs."""
    out = {}
    for run in runs:
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            out[run] = {"error": f"{path} missing: the run did not finish"}
            continue
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [e for e in lines if "tokens_per_s" in e]
        later = train[1:] or train
        out[run] = {
            "steps": train[-1]["step"] if train else 0,
            "tokens_per_s_median": round(statistics.median(e["tokens_per_s"] for e in later), 1) if later else None,
            "tokens_per_step_median": statistics.median(
                b["tokens"] - a["tokens"] for a, b in zip(train, train[1:])) if len(train) > 1 else None,
            **{key: max((e[key] for e in train if key in e), default=None)
               for key in ("gpu_peak_allocated_mb", "gpu_peak_reserved_mb")},
            "loss_first_last": [train[0]["loss"], train[-1]["loss"]] if train else None,
            "val_loss": next((e["val_loss"] for e in reversed(lines) if "val_loss" in e), None),
            **adapter_check(Path(run) / "adapter_model.safetensors"),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json-out", help="also write the result here")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", parents=[common])
    att = sub.add_parser("attention", parents=[common])
    att.add_argument("--batch", type=int, default=4)
    att.add_argument("--length", type=int, default=1024)
    mk = sub.add_parser("make-base", parents=[common])
    mk.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    mk.add_argument("--tokenizer", required=True)
    mk.add_argument("--out", required=True)
    mk.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sm = sub.add_parser("summarise", parents=[common])
    sm.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "env":
        result = env()
    elif args.cmd == "attention":
        result = attention_check(args.batch, args.length)
    elif args.cmd == "make-base":
        result = make_base(args.shape, args.tokenizer, args.out, args.device)
    else:
        result = summarise(args.runs)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
