"""Self-speculative decoding (lad/sampling/speculative.py) and the mask-gated LoRA (lad/modeling/gate.py).

On tiny random models: greedy `speculative` is token for token the parent's HF `generate` output, alone and in a
batch of 8, for every attention mode, with and without the shift, gated or not, for several draft lengths, fixed or
adaptive; a drafter that is mostly right (an oracle holding the parent's answer, with wrong tokens planted) makes the
acceptance, rollback and bonus paths run and still gives the parent's output in fewer forwards; at temperature > 0
the first two tokens follow the parent's own sampling distribution (a chi-square test, false alarm rate 1e-3); a
gated adapter leaves every clean column exactly the parent's.
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

from lad.modeling.byte_tokenizer import build_byte_tokenizer
from lad.modeling.denoiser import Denoiser
from lad.modeling.gate import parent_switch
from lad.sampling import get_strategy
from lad.sampling.common import render_prompt
from lad.sampling.verify import greedy_round, sampled_round

from conftest import make_tiny_model, random_ids, with_lora

speculative_module = importlib.import_module("lad.sampling.speculative")  # the package's name is the function
MASK_ID = 262
PROMPTS = ["hi", "Reverse the words.\ncold ship", "a", "xyz abc", "The cat sat", "q", "hello world", "12345"]
pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = {"max_new_tokens": 20, "chat_template": False}


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def denoiser(attention="block_causal", shift=True, gate=None, seed=0, **config) -> Denoiser:
    model = with_lora(make_tiny_model(config.pop("kind", "llama"), seed=seed, **config), seed=seed)
    return Denoiser(model, MASK_ID, shift=shift, attention=attention, gate=gate,
                    block_size=4 if attention == "block_causal" else None).eval()


def ids_of(generations):
    return [g.token_ids for g in generations]


MODELS = [("block_causal", True, None), ("prompt_causal", False, None), ("bidirectional", True, None),
          ("block_causal", True, "masked"), ("block_causal", False, "masked"), ("prompt_causal", True, "masked")]


@pytest.mark.parametrize("attention, shift, gate", MODELS)
def test_greedy_output_is_the_parents_alone_and_in_a_batch(tokenizer, attention, shift, gate):
    den = denoiser(attention, shift, gate)
    parent = ids_of(get_strategy("ar")(den, tokenizer, PROMPTS, **OPTIONS))
    for k, adaptive in [(1, False), (4, False), (3, True)]:
        batch = get_strategy("speculative")(den, tokenizer, PROMPTS, draft_length=k, adaptive=adaptive, **OPTIONS)
        assert ids_of(batch) == parent, (k, adaptive)
        assert batch[0].speculation["rounds"] >= 1
    alone = [get_strategy("speculative")(den, tokenizer, [p], draft_length=4, **OPTIONS)[0].token_ids
             for p in PROMPTS[:3]]
    assert alone == parent[:3]


def test_exact_with_sliding_windows(tokenizer):
    den = denoiser("block_causal", True, "masked", kind="mistral", sliding_window=3)
    parent = ids_of(get_strategy("ar")(den, tokenizer, PROMPTS[:4], **OPTIONS))
    assert ids_of(get_strategy("speculative")(den, tokenizer, PROMPTS[:4], draft_length=4, **OPTIONS)) == parent


def oracle_drafter(den, tokenizer, prompts):
    """The real drafter's forward, its tokens replaced by the parent's own greedy answer with every (3 + row)-th
    answer token wrong: rounds then keep some drafted tokens and reject others, as a trained drafter's do, and
    rows keep different numbers."""
    answers = ids_of(get_strategy("ar")(den, tokenizer, prompts, max_new_tokens=40, chat_template=False))
    answers = [a + [0] * (80 - len(a)) for a in answers]
    real = speculative_module._draft

    def draft(denoiser, gate, text, kv, k, generators, sampling, extra=None):
        hidden, _, probs = real(denoiser, gate, text, kv, k, generators, sampling, extra)
        ahead = extra[1].sum(-1) if extra is not None else torch.zeros_like(text.answer_lengths)  # a gated draft
        starts = (text.answer_lengths + ahead.cpu()).tolist()  # rows advance by their own acceptance
        tokens = torch.tensor([a[start:start + k] for a, start in zip(answers, starts)])
        every = 3 + torch.arange(len(starts))[:, None]
        planted = (torch.tensor(starts)[:, None] + torch.arange(k)) % every == every - 1
        return hidden, torch.where(planted, (tokens + 1) % 256, tokens), probs
    return draft


@pytest.mark.parametrize("batch, gate", [(1, None), (4, None), (1, "masked"), (4, "masked")])
def test_accepted_drafts_and_rollbacks_keep_the_parents_output(tokenizer, monkeypatch, batch, gate):
    den = denoiser("block_causal", True, gate)
    prompts = PROMPTS[:batch]
    parent = get_strategy("ar")(den, tokenizer, prompts, **OPTIONS)
    monkeypatch.setattr(speculative_module, "_draft", oracle_drafter(den, tokenizer, prompts))
    out = get_strategy("speculative")(den, tokenizer, prompts, draft_length=4, **OPTIONS)
    assert ids_of(out) == ids_of(parent)
    stats = out[0].speculation
    assert 0 < stats["accepted"] < stats["drafted"]  # some drafts kept, some rejected and rolled back
    assert out[0].nfe < (1 if gate else 2) * parent[0].nfe * 0.8  # rounds keep more than one token
    alone = get_strategy("speculative")(den, tokenizer, prompts[-1:], draft_length=4, **OPTIONS)
    assert alone[0].token_ids == out[-1].token_ids


def test_greedy_round_keeps_each_rows_agreeing_prefix_and_the_parents_next_token():
    logits = torch.full((3, 4, 5), -1.0)
    choice = torch.tensor([[1, 2, 3, 4], [1, 2, 0, 0], [1, 4, 4, 4]])  # the parent's argmax after each column
    logits.scatter_(-1, choice[..., None], 1.0)
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 4, 4]])
    valid = torch.tensor([[True] * 3, [True] * 3, [False] * 3])  # row 2 has no draft of its own this round
    kept, tokens = greedy_round(draft, valid, logits)
    assert kept.tolist() == [3, 2, 0]
    assert [tokens[b, :n + 1].tolist() for b, n in enumerate(kept.tolist())] == [[1, 2, 3, 4], [1, 2, 0], [1]]


def test_sampled_round_keeps_agreeing_drafts_and_draws_the_residual_after_a_rejection():
    generators = [torch.Generator().manual_seed(0)]
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    parent = torch.log(torch.tensor([[[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]]]).clamp(min=1e-30))
    q = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]])  # token 1 sure; then token 1, which p never draws
    kept, tokens = sampled_round(torch.tensor([[1, 1]]), torch.ones(1, 2, dtype=torch.bool), q, parent, generators,
                                 sampling)
    assert kept.tolist() == [1]
    assert tokens[0, 0] == 1 and tokens[0, 1] in (0, 2)  # the residual max(p - q, 0) is p itself here


def chi_square_rejects(counts: dict, expected: dict, n: int, alpha: float = 1e-3) -> tuple[bool, float]:
    from scipy.stats import chi2

    keys = [key for key in expected if expected[key] * n >= 1]  # cells a sample of n can show
    stat = sum((counts.get(key, 0) - n * expected[key]) ** 2 / (n * expected[key]) for key in keys)
    stat += sum(count for key, count in counts.items() if key not in keys)  # impossible outcomes: reject
    return stat > chi2.ppf(1 - alpha, len(keys) - 1), stat


def parent_pair_distribution(den, tokenizer, prompt: str, sampling: dict) -> dict:
    """The parent's exact distribution of its first two answer tokens under `sampling` (filtered as sampled)."""
    from lad.sampling.common import filter_logits

    context = render_prompt(tokenizer, prompt, False)
    ids = torch.tensor([context])
    first = filter_logits(den.parent_logits(ids, torch.ones_like(ids))[0, -1], **sampling).softmax(-1)
    out = {}
    for a in first.nonzero()[:, 0].tolist():
        ids = torch.tensor([context + [a]])
        second = filter_logits(den.parent_logits(ids, torch.ones_like(ids))[0, -1], **sampling).softmax(-1)
        for b in second.nonzero()[:, 0].tolist():
            out[(a, b)] = float(first[a] * second[b])
    return out


# gated with the shift, the first slot is read from the last clean column: the parent's own distribution there
@pytest.mark.parametrize("gate, shift", [(None, True), ("masked", False)])
def test_sampled_tokens_follow_the_parents_distribution(tokenizer, gate, shift):
    den = denoiser("block_causal", shift, gate, seed=3)
    sampling = {"temperature": 2.0, "top_k": 3, "top_p": 1.0}  # three tokens a position: nine pairs to test
    expected = parent_pair_distribution(den, tokenizer, "ab", sampling)
    n, counts = 700, {}
    for seed in range(n):
        (gen,) = get_strategy("speculative")(den, tokenizer, ["ab"], max_new_tokens=2, seed=seed, chat_template=False,
                                             draft_length=1, **sampling)
        key = tuple(gen.token_ids[:2])
        counts[key] = counts.get(key, 0) + 1
    rejected, stat = chi_square_rejects(counts, expected, n)
    assert not rejected, (stat, counts, expected)
    drafter = {}  # the test has power: the drafter's own first-token distribution is far from the parent's
    with parent_switch(den) as gate:
        for seed in range(200):
            (_, tokens, _) = speculative_module._draft(den, gate, speculative_module._Text(
                speculative_module.prepare(den, tokenizer, ["ab"], 2, chat_template=False), 0), _cache(), 1,
                [torch.Generator().manual_seed(seed)], sampling)
            drafter[int(tokens[0, 0])] = drafter.get(int(tokens[0, 0]), 0) + 1
    first = {a: sum(p for (x, _), p in expected.items() if x == a) for a in {a for a, _ in expected}}
    assert sum(abs(drafter.get(a, 0) / 200 - p) for a, p in first.items()) > 0.3


def _cache():
    from transformers import DynamicCache

    return DynamicCache()


# ---------------------------------------------------------------- the gate


@pytest.mark.parametrize("shift", [False, True])
def test_a_gated_adapter_leaves_clean_columns_exactly_the_parent(shift):
    den = denoiser("block_causal", shift, "masked")
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    noisy = ids.clone()
    noisy[:, 8:] = MASK_ID
    with torch.no_grad():
        parent = den.parent_logits(ids, mask)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = den.causal_lm.get_decoder()(input_ids=noisy, attention_mask=den.draft_mask(mask, 8, position_ids),
                                             position_ids=position_ids).last_hidden_state
        gated = den.causal_lm.get_output_embeddings()(hidden)
    real = mask.bool()
    real[:, 8:] = False
    assert torch.equal(gated[real], parent[real])  # bit for bit, not just close
    assert not torch.allclose(gated[:, 8:], parent[:, 8:])  # the adapter does act at the mask columns
    ungated = denoiser("block_causal", shift, None)
    with torch.no_grad():
        hidden = ungated.causal_lm.get_decoder()(input_ids=noisy, attention_mask=ungated.draft_mask(mask, 8, position_ids),
                                                 position_ids=position_ids).last_hidden_state
    assert not torch.allclose(ungated.causal_lm.get_output_embeddings()(hidden)[real], parent[real])


def test_the_gate_reads_given_columns_when_the_text_holds_the_mask_token():
    den = denoiser("block_causal", True, "masked")
    ids = random_ids(1, 6)
    ids[0, 2] = MASK_ID  # a parent may write the mask token: as text it must stay ungated
    with torch.no_grad():
        parent = den.parent_logits(ids, torch.ones_like(ids))
        with den.gate.at(torch.zeros_like(ids, dtype=torch.bool)):
            hidden = den.causal_lm.get_decoder()(input_ids=ids, attention_mask=den.draft_mask(
                torch.ones_like(ids), 6, None)).last_hidden_state
    assert torch.equal(den.causal_lm.get_output_embeddings()(hidden), parent)


def test_gate_needs_lora_and_a_known_name():
    with pytest.raises(ValueError, match="LoRA"):
        Denoiser(make_tiny_model(), MASK_ID, gate="masked")
    with pytest.raises(ValueError, match="lora.gate"):
        denoiser(gate="everywhere")


def test_speculative_refuses_a_model_without_its_parent(tokenizer):
    den = Denoiser(make_tiny_model(), MASK_ID, attention="prompt_causal")
    with pytest.raises(ValueError, match="parent"):
        get_strategy("speculative")(den, tokenizer, ["hi"], **OPTIONS)


def test_every_combination_of_batch_rows_finishing_is_exact(tokenizer):
    """Rows that end early (EOS) must not hold the others back, and their own text stays the parent's."""
    den = denoiser("prompt_causal", True, "masked", seed=1)
    for prompts in itertools.islice(itertools.permutations(PROMPTS[:5], 3), 4):
        prompts = list(prompts)
        parent = ids_of(get_strategy("ar")(den, tokenizer, prompts, max_new_tokens=30, chat_template=False))
        out = get_strategy("speculative")(den, tokenizer, prompts, max_new_tokens=30, chat_template=False,
                                          draft_length=2, adaptive=True)
        assert ids_of(out) == parent


# ---------------------------------------------------------------- training a gated run


@pytest.mark.parametrize("shift", [False, True])
def test_gated_one_pass_layout_trains_each_block_as_it_is_drafted(shift):
    """Under the gate the clean answer of the training layout reads causally (it is the parent), so each noisy
    block is trained exactly as speculative drafts it: after the text before it read causally."""
    from lad.data import collate
    from lad.noise import NoiseConfig
    from lad.training.blocks import block_batch
    from test_block_causal import examples

    den = denoiser("block_causal", shift, "masked")
    batch = collate(examples(), pad_id=0, shift=shift)
    laid = block_batch(batch, NoiseConfig(objective="mask"), 4, shift, MASK_ID, [11, 12, 13], torch.arange(256))
    with torch.no_grad():
        mask = den.layout_mask(laid.kind, laid.block, laid.attention_mask, laid.position_ids)
        one_pass = den(laid.input_ids, mask, position_ids=laid.position_ids, sources=laid.sources)
        length = batch["input_ids"].shape[1]
        for n in range(len(laid.targets)):
            row, column = divmod(int(laid.logical[n]), length)
            answer = batch["answer_mask"][row].nonzero().flatten()
            start, end = int(answer[0]), int(answer[-1]) + 1
            block_first = start + (column - start) // 4 * 4
            block_end = min(block_first + 4, end)
            noisy = laid.input_ids[row, end + block_first - start:end + block_end - start]
            ids = torch.cat([batch["input_ids"][row, :block_first], noisy])[None]
            positions = torch.zeros_like(ids, dtype=torch.bool)
            positions[0, column] = True
            alone = den(ids, den.draft_mask(torch.ones_like(ids), block_first, None), positions=positions)
            assert torch.allclose(one_pass[n], alone[0], atol=2e-5), n


def test_a_gated_run_trains_loads_refuses_to_merge_and_decodes_as_its_parent(tmp_path, tokenizer):
    from conftest import train_tiny
    from lad.export import ExportError, export_run
    from lad.generate import generate
    from lad.run import LadInfo, load_run

    run = train_tiny(tmp_path / "gated", "attention=block_causal", "block_size=4", "shift=true", "lora.gate=masked",
                     "noise.objective=mask", "max_steps=4", "save_every=0", "eval_every=0", "batch_size=4")
    assert LadInfo.load(run).lora_gate == "masked"
    den, tok, _ = load_run(run)
    assert den.gated
    with pytest.raises(ExportError, match="gated"):
        export_run(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    prompts = ["What is 2+2?", "Name a colour."]
    parent = generate(str(run), prompts, strategy="ar", max_new_tokens=12)
    fast = generate(str(run), prompts, strategy="speculative", max_new_tokens=12, draft_length=3)
    assert [g.token_ids for g in fast] == [g.token_ids for g in parent]
    assert fast[0].nfe <= parent[0].nfe + 1  # one forward a round: never more than the parent's own


def test_the_gate_recipe_key_and_its_checks():
    from lad.recipe import RecipeError, load_recipe
    from conftest import TINY_RECIPE

    assert load_recipe(TINY_RECIPE, ["attention=prompt_causal", "lora.gate=masked"]).lora.gate == "masked"
    with pytest.raises(RecipeError, match="bidirectional"):
        load_recipe(TINY_RECIPE, ["attention=bidirectional", "lora.gate=masked"])
    with pytest.raises(RecipeError, match="lora.gate"):
        load_recipe(TINY_RECIPE, ["attention=prompt_causal", "lora.gate=maybe"])
