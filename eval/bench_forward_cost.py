"""What one forward costs by the number of new columns: the price list behind every multi-token sampler.

    python -m eval.bench_forward_cost --run runs/smollm2_135m_gated --out eval/results/forward_cost.json
    python -m eval.bench_forward_cost                  # SmolLM2-135M-Instruct with no adapter (the parent alone)

A decode step of the AR parent runs one new column against its K/V cache. A block-causal block, a speculative
round or a draft runs several at once: its speed-up over the parent is (tokens kept per forward) / (cost of a
forward of that many columns, in decode steps). On a GPU the second factor stays near 1 up to dozens of columns;
on a CPU it need not (a one-column product is a matrix-vector product, several columns a matrix-matrix one).
This script measures it: a cached forward of n new columns (n = 1, 2, 4, ...) after a `--context`-column prefix,
the LM head at every new column, through the same decoder call, mask and cache the samplers use
(`Denoiser.decode_into`, `draft_mask`), with the adapter off (the parent's weights) and on. Each cost is the median
of `--repeats` timed forwards, as a multiple of the parent's one-column forward timed in the same run; the table
also gives the tokens per forward a sampler must keep to break even and to reach 2x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from eval.common import command_line, environment, load_denoiser, quiet, write_record  # noqa: E402


def forward_ms(denoiser, width: int, context: int, repeats: int, adapter: bool) -> float:
    """Median milliseconds of one cached forward of `width` new columns (mask slots) after `context` text columns,
    logits at every new column; the cache is cropped back to the context after each."""
    import torch
    from transformers import DynamicCache

    from lad.modeling.cache import crop_to, position_ids_from_mask, query_rows

    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, min(1000, denoiser.mask_id), (1, context), generator=generator)  # any clean tokens
    ids = torch.cat([text, torch.full((1, width), denoiser.mask_id)], dim=1)
    mask = torch.ones_like(ids)
    position_ids = position_ids_from_mask(mask)
    decoder_mask = denoiser.draft_mask(mask, context, position_ids)
    switch = getattr(denoiser.model, "disable_adapter", None)
    times = []
    with torch.no_grad(), (switch() if callable(switch) and not adapter else nullcontext()):
        kv = DynamicCache()
        denoiser.decode_into(ids[:, :context], decoder_mask[:, :, :context, :context], position_ids[:, :context], kv)
        positions = torch.zeros_like(ids, dtype=torch.bool)
        positions[:, context:] = True
        for repeat in range(repeats + 2):  # two warm-up forwards
            began = time.perf_counter()
            hidden = denoiser.decode_into(ids[:, context:], query_rows(decoder_mask, context),
                                          position_ids[:, context:], kv)
            denoiser.head(hidden[positions[:, context:]])
            if repeat >= 2:
                times.append((time.perf_counter() - began) * 1000)
            crop_to(kv, context)
    return statistics.median(times)


def measure(denoiser, widths: list[int], context: int, repeats: int) -> list[dict]:
    has_adapter = callable(getattr(denoiser.model, "disable_adapter", None))
    rows, step = [], None
    for width in widths:
        for adapter in ([False, True] if has_adapter else [False]):
            ms = forward_ms(denoiser, width, context, repeats, adapter)
            step = ms if step is None else step  # the parent's one-column forward: the first one measured
            rows.append({"columns": width, "adapter": adapter, "ms": round(ms, 2), "decode_steps": round(ms / step, 3),
                         "tokens_for_2x": round(2 * ms / step, 2)})
            print(f"| {width} | {'on' if adapter else 'off'} | {ms:.1f} | {ms / step:.2f} | {2 * ms / step:.2f} |",
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=None, help="a LAD run folder (default: the bare SmolLM2-135M-Instruct)")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8, 9, 16, 17, 32])
    parser.add_argument("--context", type=int, default=96, help="cached text columns before the new ones")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=None, help="write the record (JSON) here")
    args = parser.parse_args(argv)
    if any(w < 1 for w in args.widths) or args.context < 1 or args.repeats < 1:
        parser.error("--widths, --context and --repeats must be positive")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    denoiser, _, _, description = load_denoiser(args.run)
    print(f"{description}; {torch.get_num_threads()} threads; context {args.context} columns; medians of "
          f"{args.repeats}\n\n| new columns | adapter | ms | decode steps | tokens/forward for 2x |\n|---|---|---|---|---|")
    rows = measure(denoiser, args.widths, args.context, args.repeats)
    if args.out:
        write_record(args.out, {"command": command_line("-m eval.bench_forward_cost", argv), "model": description,
                                "context": args.context, "repeats": args.repeats,
                                "threads": torch.get_num_threads(), "rows": rows, "environment": environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
