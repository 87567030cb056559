"""The lm-evaluation-harness model `lad`: a LAD run scored by iterative denoising.

It subclasses lm-eval's `TemplateLM`, so the context/continuation split is exactly the stock HF model's
(trailing spaces move to the continuation; context+continuation tokenized together and split at the
context's length; special tokens as the tokenizer adds them by default, as `hf` does). Scoring:

- `score="denoise"` (default): deterministic any-order chain rule over `iters` reveal steps (scoring/denoise.py);
- `score="elbo"`: LLaDA's Monte-Carlo ELBO with `mc_samples`, draws shared by the choices of one question;
- `baseline="ar"`: the AR parent (adapter off, causal attention) on the same prompts, for a fair side by side.

Requests are sharded across processes by lm-eval itself (`rank` / `world_size` below, from Accelerate when
launched with `accelerate launch`).
"""

from __future__ import annotations

import time

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from ..defaults import ITERS
from ..run import load_run
from ..sampling import default_strategy
from .options import SCORE_OPTIONS, batch_size_problem, fixed_batch_size, resolve_settings

HARNESS_ARGS = ("pretrained", "batch_size", "device", "weights", "max_length", "max_batch_size")  # the rest: options


@register_model("lad")
class LadLM(TemplateLM):
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """`lm_eval --model lad --model_args ...`: every key must be one of LadLM's own or a scoring option of
        lad/scoring/options.py (a misspelling is an error, not silently dropped). max_batch_size is accepted and
        unused: LAD scores in fixed batches."""
        import difflib

        from lm_eval.utils import simple_parse_args_string

        known = [*HARNESS_ARGS, *SCORE_OPTIONS]
        for key in simple_parse_args_string(arg_string):
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"--model_args: lad takes no {key!r}{hint}; its arguments: {', '.join(known)}")
        return super().create_from_arg_string(arg_string, additional_config)

    def __init__(self, pretrained: str | None = None, *, denoiser=None, tokenizer=None, info=None,
                 batch_size: int | str = 16, device: str | None = None, weights: str = "final",
                 max_length: int | None = None, max_batch_size: int | None = None, **options):
        """`options`: the scoring options of lad/scoring/options.py (score, iters, order, lookahead, mc_samples,
        prefix_cache, strategy, baseline, seed), Python values or model_args strings; the rest take their
        defaults there. An unknown option or a value out of range is a ValueError."""
        super().__init__()
        settings = resolve_settings(options)
        problem = batch_size_problem(str(batch_size), "batch_size")
        if problem:
            raise ValueError(problem)
        self._setup_processes(device)
        if denoiser is None:
            if pretrained is None:
                raise ValueError("model_args needs pretrained=RUN_DIR")
            denoiser, tokenizer, info = load_run(pretrained, weights=weights)
        self.denoiser = denoiser.to(self._device).eval()
        self.tokenizer = tokenizer
        self.info = info
        self.settings = settings  # every scoring option's value, recorded with the results
        self.baseline, self.score, self.iters = settings["baseline"], settings["score"], settings["iters"]
        self.order, self.lookahead, self.prefix_cache = settings["order"], settings["lookahead"], settings["prefix_cache"]
        self.mc_samples, self.seed = settings["mc_samples"], settings["seed"]  # iters None: one step per token
        self.strategy = settings["strategy"] or default_strategy(self.denoiser)  # generative tasks: the run's own
        self.batch_size = fixed_batch_size(str(batch_size))
        self.max_length = int(max_length or getattr(info, "max_length", None) or 2048)
        self.nfe = 0
        self.seconds = 0.0
        self._bar_off: bool | None = None  # set while loglikelihood() runs: whether LAD's bar is hidden

    # ------------------------------------------------------------- processes (lm-eval shards requests by rank)
    def _setup_processes(self, device: str | None) -> None:
        from accelerate import PartialState

        from accelerate.utils import parse_flag_from_env

        # like Accelerator(): ACCELERATE_USE_CPU (or no GPU) still joins a torchrun/accelerate process group
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
        self._rank, self._world_size = state.process_index, state.num_processes
        if device is None:
            device = str(state.device)
        self._device = torch.device(device)

    @property
    def device(self):
        return self._device

    def all_gather(self, tensor):
        if self._world_size == 1:
            return tensor
        out = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        torch.distributed.all_gather(out, tensor)
        return torch.cat([t.reshape(-1) for t in out])

    def gather_object(self, obj, dst=0):
        if self._world_size == 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            torch.distributed.barrier()

    # ------------------------------------------------------------- tokenization (as lm-eval's `hf` model)
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As `hf`: the tokenizer's own default (LLaMA 3 adds BOS, SmolLM2 does not), unless told otherwise or
        the string already starts with BOS."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
            if add_special_tokens:
                return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------- scoring
    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the end of an over-long context (the continuation is what is scored)."""
        room = self.max_length - len(continuation)
        if room < 1:
            return context[-1:], continuation[-(self.max_length - 1):]
        return context[-room:], continuation

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's tokenization of the requests (a bar of its own, done in a blink: not drawn), then LAD's
        scoring with its bar."""
        self._bar_off = disable_tqdm
        try:
            return super().loglikelihood(requests, disable_tqdm=True)
        finally:
            self._bar_off = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from . import score_ar, score_denoise, score_elbo
        from .single import score_single_tokens

        pairs = [self._fit(list(ctx), list(cont)) for _, ctx, cont in requests]
        groups: dict[str, int] = {}  # the choices of one question share their context string
        group_ids = [groups.setdefault(args[0], len(groups)) for args, _, _ in requests]
        if self._bar_off is not None:  # loglikelihood() hid lm-eval's tokenizing bar, not this one
            disable_tqdm = self._bar_off
        bar = tqdm(total=len(pairs), disable=disable_tqdm or self._rank != 0, desc=f"lad {self._mode()}")
        stats: dict = {}
        started = time.perf_counter()
        common = dict(batch_size=self.batch_size, progress=bar.update, stats=stats)
        single = [i for i, (_, cont) in enumerate(pairs) if len(cont) == 1]
        multi = [i for i, (_, cont) in enumerate(pairs) if len(cont) != 1]
        out: list = [None] * len(pairs)
        if single:  # the choices share one forward (score_single_tokens); exact in every mode
            scores = score_single_tokens(self.denoiser, [pairs[i] for i in single], causal=self.baseline == "ar",
                                         **common)
            for i, value in zip(single, scores):
                out[i] = value
        if multi:
            chosen = [pairs[i] for i in multi]
            if self.baseline == "ar":
                scores = score_ar(self.denoiser, chosen, **common)
            elif self.score == "elbo":
                scores = score_elbo(self.denoiser, chosen, mc_samples=self.mc_samples, seed=self.seed,
                                    group_ids=[group_ids[i] for i in multi], prefix_cache=self.prefix_cache, **common)
            else:
                scores = score_denoise(self.denoiser, chosen, iters=self.iters, order=self.order,
                                       prefix_cache=self.prefix_cache, lookahead=self.lookahead, **common)
            for i, value in zip(multi, scores):
                out[i] = value
        bar.close()
        self.nfe += int(stats.get("nfe", 0))
        self.seconds += time.perf_counter() - started
        return out

    @property
    def prefix_cache_used(self) -> bool:
        """Whether the LAD scorers ran each context once (recorded with the results: it is part of the number
        for a bidirectional run)."""
        from .batching import use_prefix_cache

        return self.baseline != "ar" and use_prefix_cache(self.denoiser, self.prefix_cache)

    def _mode(self) -> str:
        if self.baseline == "ar":
            return "ar baseline"
        if self.score == "elbo":
            return f"elbo x{self.mc_samples}"
        window = "" if self.lookahead is None else f" lookahead={self.lookahead}"
        return f"denoise {self.order} iters={self.iters or 'exact'}{window}"

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity tasks: lm-eval's disjoint rolling windows (each scored given the one token before it, as
        `hf` does), every window's continuation scored by denoising."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for request in tqdm(requests, disable=disable_tqdm or self._rank != 0, desc="lad rolling"):
            tokens = self.tok_encode(request.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length - 1, context_len=1)]
            scores = self._loglikelihood_tokens([((None, None), ctx, cont) for ctx, cont in windows],
                                                disable_tqdm=True)
            results.append(sum(s for s, _ in scores))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate with a LAD sampler (`strategy`, `iters`), or the AR parent with baseline=ar; cut at `until`.
        Requests with the same length and temperature go together in batches of `batch_size` (every sampler
        answers a prompt the same alone or in a batch, so batching changes the speed only)."""
        from ..sampling import get_strategy

        strategy = get_strategy("ar" if self.baseline == "ar" else self.strategy)
        settings = [generation_settings(request.args[1]) for request in requests]
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, (max_new, temperature, _) in enumerate(settings):
            groups.setdefault((max_new, temperature), []).append(index)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self._rank != 0, desc="lad generate")
        for (max_new, temperature), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chunk], strategy, max_new, temperature)
                for i, text in zip(chunk, texts):
                    out[i] = cut_at(text, settings[i][2])
                bar.update(len(chunk))
        bar.close()
        return out

    def _generate(self, contexts: list[str], strategy, max_new: int, temperature: float) -> list[str]:
        """One batch's texts, at most `max_new` tokens each. A block-causal run's canvas is rounded up to whole
        blocks (and given at least one iteration per block); its answers are cut back to `max_new` tokens."""
        block = self.denoiser.block_size if self.baseline != "ar" else None
        slots = -(-max_new // block) * block if block else max_new
        iters = max(min(self.iters or ITERS, slots), slots // block if block else 1)
        started = time.perf_counter()
        generations = strategy(self.denoiser, self.tokenizer, contexts, max_new_tokens=slots, iters=iters,
                               seed=self.seed, temperature=temperature, chat_template="raw")
        self.nfe += generations[0].nfe
        self.seconds += time.perf_counter() - started
        if slots == max_new:
            return [g.text for g in generations]
        return [self.tokenizer.decode(g.token_ids[:max_new], skip_special_tokens=True) for g in generations]


def generation_settings(gen_kwargs: dict) -> tuple[int, float, list[str]]:
    """(max new tokens, temperature, stop strings) of an lm-eval `generate_until` request."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    return int(gen_kwargs.get("max_gen_toks", 256)), float(gen_kwargs.get("temperature", 0.0) or 0.0), until


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first of the stop strings (each tried in order, as lm-eval's `hf` model does)."""
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text
