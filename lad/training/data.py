"""Training data: examples encoded from the recipe's sources, batches, and which examples each step reads.

Determinism: the data order is a pure function of (seed, epoch), so a resumed run reads exactly what it missed;
`seed_for` mixes the integers every other seed of training is drawn from.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import torch

from lad.data import DataError, Example, batch_indices, collate, encode_rows, load_rows
from lad.modeling.attention import answer_start_from
from lad.modeling.denoiser import position_ids_from_mask
from lad.recipe import Recipe

log = logging.getLogger("lad.finetune")  # the whole recipe logs under one name


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers, so (seed, step, row) never collide like seed+step would."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class TokenIds:
    """The token ids batches and corruption are built with."""

    mask: int
    pad: int
    eos: int
    special: frozenset[int]  # never drawn as `structural` replacement tokens

    @classmethod
    def of(cls, tokenizer, mask_id: int) -> TokenIds:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(mask_id, pad, tokenizer.eos_token_id, frozenset(tokenizer.all_special_ids) | {mask_id})


def encode_sources(sources, recipe: Recipe, tokenizer) -> list[Example]:
    examples: list[Example] = []
    for source in sources:
        text_field = source.fields.get("text", "text")
        try:
            rows = load_rows(source.path, split=source.split, text_field=text_field, max_rows=source.max_rows,
                             separator=source.separator)
            encoded, stats = encode_rows(rows, tokenizer, fmt=source.format, fields=source.fields or None,
                                         max_length=recipe.data.max_length, truncation=recipe.data.truncation,
                                         chat_template=recipe.data.chat_template,
                                         system_prompt=recipe.data.system_prompt, source_name=source.path)
        except DataError:
            raise
        except ValueError as err:  # bad fields / template / limits: name the source, no traceback
            raise DataError(f"{source.path}: {err}") from None
        log.info(stats.summary())
        if not encoded:
            raise DataError(f"{source.path}: no usable rows left (every row was dropped; see the counts above)")
        examples += encoded
    return examples


def load_data(recipe: Recipe, tokenizer, sources=None) -> tuple[list[Example], list[Example]]:
    """Encode train and validation examples; hold out `val_fraction` of train when no validation is given.
    sources: (train, validation) to read instead of the recipe's (distilled sources resolved to their files)."""
    train_sources, val_sources = sources or (recipe.data.train, recipe.data.validation)
    train = encode_sources(train_sources, recipe, tokenizer)
    if val_sources:
        val = encode_sources(val_sources, recipe, tokenizer)
    elif recipe.data.val_fraction > 0:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
        n_val = min(max(1, int(len(train) * recipe.data.val_fraction)), recipe.data.val_max_examples)
        held = set(order[:n_val])
        val = [train[i] for i in sorted(held)]
        train = [e for i, e in enumerate(train) if i not in held]
    else:
        val = []
    return train, val[: recipe.data.val_max_examples]


def prompt_style(recipe: Recipe, tokenizer) -> str:
    """How inference renders a prompt, recorded in lad.json (lad/integrity.py PROMPT_STYLES): "raw" when every training
    source is plain text (the model learnt to continue text, so "Once upon a time" is continued as it is), else
    "chat" when the chat template was used, "plain" when not."""
    if all(source.format == "text" for source in recipe.data.train):
        return "raw"
    templated = bool(getattr(tokenizer, "chat_template", None)) and recipe.data.chat_template is not False
    return "chat" if templated else "plain"


def replacement_pool(examples: list[Example], special_ids: set[int]) -> torch.Tensor:
    """Answer tokens of these examples minus special tokens: plausible wrong tokens for `structural` noise."""
    tokens = torch.tensor([t for e in examples for t in e.answer_ids if t not in special_ids], dtype=torch.long)
    return tokens if tokens.numel() else torch.tensor([t for e in examples for t in e.answer_ids], dtype=torch.long)


def make_batch(examples: list[Example], recipe: Recipe, pad_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    batch = collate(examples, pad_id, shift=recipe.shift)
    batch["real_answer"] = batch["answer_mask"].clone()  # without EOS padding: where the parent is a target
    if recipe.eos_padding:  # LLaDA: answers padded with EOS to the batch length, inside the loss
        pad = batch["attention_mask"] == 0
        batch["input_ids"][pad] = eos_id
        batch["attention_mask"][pad] = 1
        batch["answer_mask"] |= pad
        batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    batch["answer_start"] = answer_start_from(batch["answer_mask"])  # where prompt-causal attention stops
    return batch


class Schedule:
    """Which examples each optimizer step reads: a pure function of the step (for exact resume)."""

    GROUP = 50  # steps whose examples are sorted together when grouping by length

    def __init__(self, n_examples: int, recipe: Recipe, num_processes: int, lengths: list[int] | None = None):
        self.lengths = lengths if recipe.data.group_by_length else None
        self.per_step = recipe.batch_size * num_processes * recipe.grad_accum
        self.steps_per_epoch = n_examples // self.per_step
        if self.steps_per_epoch == 0:
            raise DataError(f"the training data has {n_examples} examples, fewer than one optimizer step needs "
                            f"(batch_size {recipe.batch_size} × processes {num_processes} × grad_accum "
                            f"{recipe.grad_accum} = {self.per_step})")
        self.n, self.seed = n_examples, recipe.seed
        by_epochs = math.ceil(recipe.epochs * self.steps_per_epoch) if recipe.epochs is not None else None
        self.total_steps = min(s for s in (recipe.max_steps, by_epochs) if s is not None)
        self._epoch, self._order = -1, []

    def step_indices(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = batch_indices(self.n, self.per_step, seed=self.seed, epoch=epoch, drop_last=True)
            if self.lengths is not None:
                self._order = self.group_by_length(self._order, epoch)
            self._epoch = epoch
        return self._order[index]

    def group_by_length(self, steps: list[list[int]], epoch: int) -> list[list[int]]:
        """Sort each run of GROUP shuffled steps by example length and re-cut it, then shuffle the steps:
        batches of similar lengths waste little padding, and the order is still a function of (seed, epoch)."""
        out = []
        for start in range(0, len(steps), self.GROUP):
            pool = sorted((i for s in steps[start:start + self.GROUP] for i in s), key=lambda i: -self.lengths[i])
            out += [pool[k:k + self.per_step] for k in range(0, len(pool), self.per_step)]
        order = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed_for(self.seed, epoch, 7)))
        return [out[i] for i in order.tolist()]
