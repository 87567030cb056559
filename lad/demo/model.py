"""The demo's model side: one loaded run shared by every browser session, and the worker that streams a
sampler's steps to the page (`DemoModel.run`); no Gradio here (lad/demo/app.py builds the page)."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from ..defaults import POLISH_WITH
from ..run import RunDirError, check_parent, has_parent
from ..sampling import PARENT_STRATEGIES, Step, get_strategy, split_options
from ..sampling.common import eos_token_ids
from ..sampling.polish import polish as polish_drafts
from ..sampling.render import decode_pieces
from . import view

PROG = "lad-demo"
POLL_SECONDS = 0.1


class Stopped(Exception):
    """Raised from `on_step` when the user pressed Stop: the sampler ends after its current forward."""


@dataclass
class Frame:
    lad: str  # HTML of the LAD panel
    ar: str  # HTML of the AR parent's panel
    status: str  # one line of Markdown


@dataclass
class DemoModel:
    """One loaded run shared by every browser session; `lock` runs one generation at a time (the `ar`
    strategy switches the shared model to its causal parent while it runs)."""

    denoiser: object
    tokenizer: object
    chat_template: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)
    pieces: dict = field(default_factory=dict)  # token id → decoded text

    @property
    def polish_with(self) -> str:
        """The polish passes' filler: the default (POLISH_WITH), or the denoiser alone on a run without an AR
        parent (a merged export), which the page has no setting to change."""
        info = self.denoiser.info
        return POLISH_WITH if info is None or has_parent(info) else "denoiser"

    @property
    def eos_ids(self) -> set[int]:
        return eos_token_ids(self.tokenizer, self.denoiser)

    def html(self, step: Step) -> str:
        pieces = decode_pieces(self.tokenizer, step.tokens, self.pieces)
        return view.segments_html(view.segments(step, pieces, self.eos_ids))

    def work(self, prompt: str, strategy: str, options: dict, compare: bool, out: queue.Queue,
             stop: threading.Event, polish: int = 0) -> None:
        """The worker thread: run the strategy (then `polish` noiseless passes over its answer, then the AR
        parent), reporting everything on `out`."""

        def reporter(kind):
            def on_step(steps: list[Step]) -> None:
                if stop.is_set():
                    raise Stopped
                out.put((kind, steps[0]))
            return on_step

        try:
            with self.lock:
                common = dict(chat_template=self.chat_template, **options)  # the page's settings, every strategy's
                (gen,) = get_strategy(strategy)(self.denoiser, self.tokenizer, [prompt], on_step=reporter("lad"),
                                                **split_options(strategy, common)[0])
                (gen,) = polish_drafts(self.denoiser, self.tokenizer, [gen], polish,
                                       max_new_tokens=options["max_new_tokens"], chat_template=self.chat_template,
                                       with_=self.polish_with, on_step=reporter("lad"))
                out.put(("lad-done", gen))
                if compare:
                    (ar,) = get_strategy("ar")(self.denoiser, self.tokenizer, [prompt], on_step=reporter("ar"),
                                               **split_options("ar", common)[0])
                    out.put(("ar-done", ar))
        except Stopped:
            out.put(("stopped", None))
        except ValueError as err:  # a setting the strategy refuses (block length, retention, ...)
            out.put(("error", str(err)))
        except Exception as err:  # noqa: BLE001 — the page must show it, not die
            out.put(("error", f"{type(err).__name__}: {err}"))
        finally:
            out.put(("end", None))

    def stream(self, prompt: str, settings: dict, pause, compare: bool, stop: threading.Event | None = None):
        """Yield `Frame`s for one Run: an all-masked canvas, every step, then the answers and both timings.
        A bad setting or a failed generation yields one frame with the error and ends."""
        stop = stop or threading.Event()
        idle = view.placeholder_html("AR parent: tick “Compare with the AR parent”" if not compare else "")
        try:
            if not (prompt or "").strip():
                raise view.SettingsError("type a prompt first")
            info = self.denoiser.info
            if (compare or settings.get("strategy") in PARENT_STRATEGIES) and info is not None:
                try:
                    check_parent(info, "this model")
                except RunDirError as err:
                    raise view.SettingsError(str(err)) from None
            settings = dict(settings)
            polish = view.polish_passes(settings.pop("polish", 0))
            options = view.sampler_options(**settings)
            pause = view.pause_seconds(pause)
        except view.SettingsError as err:
            yield Frame(view.placeholder_html("nothing generated"), idle, view.error_text(str(err)))
            return
        strategy, n = settings["strategy"], options["max_new_tokens"]
        iters = options["iters"] + polish
        out: queue.Queue = queue.Queue()
        threading.Thread(target=self.work, args=(prompt, strategy, options, compare, out, stop, polish), daemon=True,
                         name="lad-demo-worker").start()
        blank = Step(-1, [self.denoiser.mask_id] * n, [True] * n, [False] * n, [0.0] * n, 0)
        frame = Frame(self.html(blank) if strategy not in PARENT_STRATEGIES else view.placeholder_html("…"),
                      view.placeholder_html("waiting for the LAD answer…") if compare else idle, "generating…")
        yield frame
        shown, gen, last = time.monotonic(), None, None
        while True:
            if stop.is_set():
                where = f" after step {last.iteration + 1} ({last.nfe} forwards)" if last is not None else ""
                yield Frame(frame.lad, frame.ar, f"Stopped{where}.")
                return
            try:
                kind, item = out.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if kind == "end":
                return
            if kind == "stopped":
                continue  # reported at the top
            if kind == "error":
                yield Frame(frame.lad, frame.ar, view.error_text(item))
                return
            if kind in ("lad", "ar"):
                last = item
                html = self.html(item)
                status = view.progress_text("LAD" if kind == "lad" else "AR parent", item,
                                            iters if kind == "lad" and strategy not in PARENT_STRATEGIES else None)
                frame = Frame(html, frame.ar, status) if kind == "lad" else Frame(frame.lad, html, status)
                if stop.wait(max(0.0, pause - (time.monotonic() - shown))):
                    continue  # stopped during the pause: reported at the top
            elif kind == "lad-done":
                gen = item
                frame = Frame(view.final_html(gen.text), frame.ar,
                              view.summary_text(gen) + (" · AR parent: generating…" if compare else ""))
            elif kind == "ar-done":
                frame = Frame(frame.lad, view.final_html(item.text), view.summary_text(gen, item))
            yield frame
            shown = time.monotonic()


# ---------------------------------------------------------------- CLI


def import_gradio():
    try:
        import gradio
    except ImportError:
        raise SystemExit(f"{PROG}: error: the demo needs Gradio: pip install 'lad[demo]'") from None
    return gradio



