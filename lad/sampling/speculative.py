"""`speculative`: exactly the parent's output, drafted by the denoiser and checked by the parent (lossless).

A LAD run carries its AR parent: the same weights with the adapter off and causal attention (`Denoiser.as_parent`).
Each round the denoiser drafts `draft_length` tokens in one forward (mask slots after the text so far, which it
reads causally: `Denoiser.draft_mask`), the parent checks them in one forward over the draft, and the round keeps
the drafted tokens the parent accepts plus one token of the parent's own (lad/sampling/verify.py): at temperature 0
the output is token for token the parent's greedy output (transformers' `generate`); at temperature > 0 every token
is distributed exactly as the parent's own sampling with the same temperature / top-k / top-p.

Both models keep an exact K/V cache of the accepted text (the parent's causal one, and the denoiser's of the text
read causally); each forward runs only the columns not yet cached plus the draft, and the rejected columns are
cropped back. NFE counts both forwards of a round.

With a mask-gated LoRA (`lora.gate: masked`, lad/modeling/gate.py) the clean columns compute the parent exactly,
so ONE forward over [new text, previous draft, mask slots] checks the previous draft (clean columns) and drafts
the next (mask slots), over one cache: one forward per round. Its mask slots were placed after the whole previous
draft; when the parent rejects part of it, the next round drafts afresh from the corrected text.

`draft_length` k: tokens drafted per round (the last round may run past `max_new_tokens`; the answer is cut);
`adaptive=True` doubles it (up to `max_draft`) after a round in which every row kept its draft in full and halves
it (down to 1) after one in which the rows kept less than half on average; a batch shares one draft length.
Rows of a batch advance by their own acceptance: a row that kept fewer tokens gets left padding (masked, position
ids from the mask, zero keys and values in the caches), so a prompt's output is the same alone or in a batch,
greedy or sampled (with a fixed draft length). `iters` does not apply. `Generation.speculation` reports rounds,
drafted and accepted tokens, and the seconds spent drafting and verifying.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..defaults import DRAFT_LENGTH, ITERS, MAX_DRAFT, MAX_NEW_TOKENS
from ..modeling.gate import MaskGate, parent_switch
from ..modeling.cache import crop_to, left_padded, position_ids_from_mask, query_rows, rebuilt_cache
from .common import Canvas, Step, draw_rows, eos_token_ids, filter_logits, finish, prepare, row_generators
from .verify import greedy_round, sampled_round


class _Text:
    """The batch's accepted text: left-padded rows (prompt, then the answer so far), each row's answer length."""

    def __init__(self, canvas: Canvas, pad_id: int):
        width = canvas.prompt_width
        self.ids, self.mask, self.pad_id = canvas.ids[:, :width], canvas.attention_mask[:, :width], pad_id
        self.answer_lengths = torch.zeros(canvas.ids.shape[0], dtype=torch.long)

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def columns(self, extra: Tensor, extra_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(ids, padding mask) of the text followed by `extra` [B, e] (a draft, mask slots)."""
        extra_mask = torch.ones_like(extra) if extra_mask is None else extra_mask.long()
        return torch.cat([self.ids, extra], dim=1), torch.cat([self.mask, extra_mask], dim=1)

    def answers(self, n: int, fill: int = -1) -> Tensor:
        """[B, n]: each row's first n answer tokens, `fill` after a shorter answer (-1: no token at all)."""
        out = torch.full((self.ids.shape[0], n), fill, dtype=torch.long, device=self.ids.device)
        for row, length in enumerate(self.answer_lengths.tolist()):
            take = min(length, n)
            out[row, :take] = self.ids[row, self.length - length:self.length - length + take]
        return out

    def accept(self, tokens: Tensor, counts: Tensor) -> Tensor:
        """Append tokens[b, :counts[b]] to row b; a row that got fewer than the most is left-padded by the
        difference, so the rows stay one width. Returns the padding each row got ([B])."""
        most, rows = int(counts.max()), self.ids.shape[0]
        pads = most - counts
        ids = torch.full((rows, self.length + most), self.pad_id, dtype=self.ids.dtype, device=self.ids.device)
        mask = torch.zeros_like(ids, dtype=self.mask.dtype)
        for row, (pad, count) in enumerate(zip(pads.tolist(), counts.tolist())):
            ids[row, pad:pad + self.length], mask[row, pad:pad + self.length] = self.ids[row], self.mask[row]
            ids[row, pad + self.length:], mask[row, pad + self.length:] = tokens[row, :count], 1
        self.ids, self.mask = ids, mask
        self.answer_lengths += counts.cpu()
        return pads

    def drop_common_padding(self) -> int:
        """Drop the left columns that are padding in every row (rows that fell behind and caught up again leave
        them): the text stays as wide as its longest row. Returns how many were dropped."""
        common = int((self.mask.cumsum(-1) == 0).sum(-1).min())
        if common:
            self.ids, self.mask = self.ids[:, common:], self.mask[:, common:]
        return common


def _draft(denoiser, gate, text: _Text, kv, k: int, generators, sampling: dict, extra=None):
    """A denoiser forward over the text's uncached columns, `extra` ((draft, valid): a gated run's previous draft)
    and k mask slots against `kv`: (hidden states, drafted tokens [B, k], their distributions or None). The
    adapter acts at the slots alone on a gated run, everywhere on an ungated one."""
    rows = text.ids.shape[0]
    slots = torch.full((rows, k), denoiser.mask_id, dtype=torch.long, device=text.ids.device)
    draft, valid = extra if extra is not None else (slots[:, :0], slots[:, :0].bool())
    ids, mask = text.columns(torch.cat([draft, slots], dim=1), torch.cat([valid, torch.ones_like(slots)], dim=1))
    first, first_slot = kv.get_seq_length(), ids.shape[1] - k
    position_ids = position_ids_from_mask(mask)
    decoder_mask = query_rows(denoiser.draft_mask(mask, first_slot, position_ids), first)
    adapted = torch.ones_like(ids[:, first:], dtype=torch.bool)
    if denoiser.gated:  # the slots alone, even where the text holds the mask token
        adapted[:, :first_slot - first] = False
    with gate.at(adapted):
        hidden = denoiser.decode_into(ids[:, first:], decoder_mask, position_ids[:, first:], kv)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, first_slot:] = True
    logits = denoiser.head_at(hidden, first, positions).view(rows, k, -1).float()
    if sampling["temperature"] <= 0:
        return hidden, logits.argmax(-1), None
    probs = filter_logits(logits, **sampling).softmax(-1)
    return hidden, draw_rows(probs, generators), probs


def _verify(denoiser, gate, text: _Text, kv, draft: Tensor) -> Tensor:
    """The parent's next-token logits [B, d + 1, V] after the text's last token and after each draft token, from
    one forward over the uncached columns and the draft (appended to `kv`) with the adapter gated off everywhere
    (x + 0 is x: the base model exactly) and causal attention: the parent, without switching the model's mode."""
    ids, mask = text.columns(draft)
    first, position_ids = kv.get_seq_length(), position_ids_from_mask(mask)
    causal = query_rows(denoiser.draft_mask(mask, ids.shape[1], position_ids), first)  # no draft slots: all causal
    with gate.at(torch.zeros_like(ids[:, first:], dtype=torch.bool)):
        hidden = denoiser.decode_into(ids[:, first:], causal, position_ids[:, first:], kv)
    return _parent_head(denoiser, hidden, draft.shape[1] + 1)


def _parent_head(denoiser, hidden: Tensor, count: int) -> Tensor:
    """The parent's own LM head (every token, the mask token too, as its `generate` sees them) over the last
    `count` columns of `hidden`: float logits [B, count, V]."""
    return denoiser.causal_lm.get_output_embeddings()(hidden[:, -count:]).float()


class _Round:
    """One round's forwards: ungated, the denoiser drafts and the parent checks (two caches); gated, one forward
    checks the previous draft and drafts the next (one cache, the parent's)."""

    def __init__(self, denoiser, gate: MaskGate, text: _Text, generators, sampling: dict):
        from transformers import DynamicCache

        self.denoiser, self.gate, self.text, self.generators, self.sampling = denoiser, gate, text, generators, sampling
        self.parent_kv, self.draft_kv = DynamicCache(), DynamicCache()
        empty = text.ids[:, :0]
        self.next = (empty, empty.bool(), None)  # a gated run's next draft: tokens, valid columns, distributions
        self.forwards, self.seconds = 0, {"draft_seconds": 0.0, "verify_seconds": 0.0}

    def run(self, k: int):
        """(draft [B, d], valid [B, d], its distributions, the parent's logits [B, d + 1, V])."""
        began = time.perf_counter()
        if self.denoiser.gated:
            draft, valid, probs = self.next
            hidden, fresh, fresh_probs = _draft(self.denoiser, self.gate, self.text, self.parent_kv, k + 1,
                                                self.generators, self.sampling, (draft, valid))
            clean = hidden[:, :hidden.shape[1] - k - 1]  # the parent's hidden states: the text and the draft
            logits = _parent_head(self.denoiser, clean, draft.shape[1] + 1)
            self.fresh = (fresh[:, 1:], None if fresh_probs is None else fresh_probs[:, 1:])
            self.forwards += 1
            self.seconds["verify_seconds"] += time.perf_counter() - began
            return draft, valid, probs, logits
        _, draft, probs = _draft(self.denoiser, self.gate, self.text, self.draft_kv, k, self.generators,
                                 self.sampling)
        crop_to(self.draft_kv, self.text.length - 1)
        checked = time.perf_counter()
        logits = _verify(self.denoiser, self.gate, self.text, self.parent_kv, draft)
        self.forwards += 2
        self.seconds["draft_seconds"] += checked - began
        self.seconds["verify_seconds"] += time.perf_counter() - checked
        return draft, torch.ones_like(draft, dtype=torch.bool), probs, logits

    def accepted(self, kept: Tensor, aligned: Tensor, before: int, pads: Tensor) -> None:
        """Realign the caches to the text after it accepted kept[b] + 1 tokens per row (left padding `pads`):
        each keeps the accepted columns it computed, all but the text's last. `aligned` [B]: rows whose slots
        followed their accepted text (a gated run's next draft)."""
        counts = kept + 1
        length = self.text.length - 1
        self.parent_kv = left_padded(self.parent_kv, before - 1 + counts, pads, length)
        if not self.denoiser.gated:
            self.draft_kv = left_padded(self.draft_kv, torch.full_like(kept, before - 1), pads, before - 1)
        common = self.text.drop_common_padding()
        if common:
            self.parent_kv = rebuilt_cache(self.parent_kv, lambda t: t[:, :, common:])
            if self.draft_kv.get_seq_length():
                self.draft_kv = rebuilt_cache(self.draft_kv, lambda t: t[:, :, common:])
        if not self.denoiser.gated:
            return
        fresh, probs = self.fresh  # slots after a fully kept draft drafted the next one; other rows draft afresh
        self.next = (fresh, aligned[:, None].expand_as(fresh).to(fresh.device), probs)


@torch.no_grad()
def speculative(denoiser, tokenizer, prompts: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS, iters: int = ITERS,
                seed: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                draft_length: int = DRAFT_LENGTH, adaptive: bool = False, max_draft: int = MAX_DRAFT,
                chat_template: bool = True, on_step=None, trace: bool = False):
    if draft_length < 1 or max_draft < draft_length:
        raise ValueError(f"draft_length must be >= 1 and <= max_draft ({max_draft}), got {draft_length}")
    if not callable(getattr(denoiser.model, "disable_adapter", None)):
        raise ValueError("speculative needs the run's parent (its adapter switched off): a merged or fully trained "
                         "model has none")
    started = time.perf_counter()
    canvas = prepare(denoiser, tokenizer, prompts, max_new_tokens, chat_template=chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    text, rows = _Text(canvas, pad), canvas.ids.shape[0]
    eos = torch.tensor(sorted(eos_token_ids(tokenizer, denoiser)), dtype=torch.long, device=canvas.ids.device)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    generators = row_generators(rows, seed, canvas.ids.device)
    steps = [[] for _ in range(rows)] if trace else None
    with parent_switch(denoiser) as gate:
        round_ = _Round(denoiser, gate, text, generators, sampling)
        stats = _decode(round_, max_new_tokens, eos, (draft_length, adaptive, max_draft), steps, on_step)
    answers = text.answers(max_new_tokens, fill=pad)
    canvas = Canvas(torch.cat([canvas.ids[:, :canvas.prompt_width], answers], dim=1),
                    canvas.attention_mask, canvas.prompt_width, canvas.prompts)
    out = finish(tokenizer, canvas, "speculative", round_.forwards, started, set(eos.tolist()), steps, mask_id=-1)
    for generation in out:
        generation.speculation = dict(stats, **round_.seconds, draft_length=draft_length, adaptive=adaptive)
    return out


def _decode(round_: _Round, max_new_tokens: int, eos: Tensor, drafts: tuple, steps, on_step) -> dict:
    """Rounds until every row has ended (EOS or max_new_tokens); returns the rounds, the rounds of unfinished rows,
    and their drafted and accepted tokens."""
    k, adaptive, max_draft = drafts
    text, temperature = round_.text, round_.sampling["temperature"]
    stats = {"rounds": 0, "row_rounds": 0, "drafted": 0, "accepted": 0}  # row_rounds: rounds of unfinished rows
    while True:
        done = torch.isin(text.answers(max_new_tokens), eos).any(-1) | (text.answer_lengths >= max_new_tokens)
        if bool(done.all()):
            return stats
        draft, valid, probs, logits = round_.run(k)
        kept, tokens = greedy_round(draft, valid, logits) if temperature <= 0 else \
            sampled_round(draft, valid, probs, logits, round_.generators, round_.sampling)
        # a row kept all of its own draft (or had none): the slots after it drafted its next one
        d, aligned = draft.shape[1], kept == valid.sum(-1)
        stats["rounds"] += 1
        stats["row_rounds"] += int((~done).sum())
        stats["drafted"] += int(valid[~done].sum())
        stats["accepted"] += int(kept[~done].sum())
        before = text.length
        round_.accepted(kept, aligned, before, text.accept(tokens, kept + 1))
        _record(steps, on_step, text, kept + 1, round_.forwards, logits, tokens)
        live = ~done & valid.any(-1)  # the rows that had a draft to judge
        if adaptive and bool(live.any()):  # grow after drafts kept in full, shrink after drafts mostly rejected
            k = min(max_draft, 2 * k) if bool(aligned[live].all()) else \
                max(1, k // 2) if 2 * float(kept[live].float().mean()) < d else k


def _record(steps, on_step, text: _Text, counts: Tensor, nfe: int, logits: Tensor, tokens: Tensor) -> None:
    """One Step per round: each row's answer so far, the tokens this round added marked changed, with the parent's
    probability of each (earlier tokens keep theirs)."""
    if steps is None and on_step is None:
        return
    chosen = logits.softmax(-1).gather(-1, tokens[..., None])[..., 0]
    records = []
    for b in range(text.ids.shape[0]):
        n, new = int(text.answer_lengths[b]), int(counts[b])
        row = text.ids[b, text.length - n:].tolist()
        earlier = steps[b][-1].confidence if steps is not None and steps[b] else []
        iteration = len(steps[b]) if steps is not None else 0
        confidence = (earlier + [0.0] * n)[:n - new] + chosen[b, :new].tolist()
        records.append(Step(iteration, row, [False] * n, [False] * (n - new) + [True] * new, confidence, nfe))
    if steps is not None:
        for b, record in enumerate(records):
            steps[b].append(record)
    if on_step is not None:
        on_step(records)
