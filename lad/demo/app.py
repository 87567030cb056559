"""The Gradio page of `lad-demo`: prompt, Run/Stop, the LAD panel, the AR parent's panel, settings.

Only layout and wiring live here; what a Run shows comes from `DemoModel.stream` (lad/demo/model.py). Each browser
session has its own stop flag (keyed by Gradio's session hash), so Stop ends that session's run only. While a
Run is asked for, waiting for the model or running, its button reads "Running…" and is disabled.
Element ids (`lad-prompt`, `lad-run`, `lad-stop`, `lad-status`, `lad-view`, `ar-view`, ...) are what the
browser test drives.
"""

import threading  # no `from __future__ import annotations`: Gradio must see the real `gr.Request` hints

from ..defaults import DRAFT_LENGTH, ITERS, MAX_DRAFT, MAX_NEW_TOKENS
from ..generate import toy_note
from ..sampling import STRATEGIES, default_strategy
from ..sampling.options import OPTIONS
from . import view
from .model import DemoModel, import_gradio

LEGEND = ('<span style="{masked}padding:0 4px;border-radius:3px">░ masked</span> '
          '<span style="{changed}padding:0 4px;border-radius:3px">changed this step</span> '
          '<span style="opacity:.4">after the end of the answer</span>').format(**view.STYLES)


def describe(model: DemoModel) -> str:
    info = model.denoiser.info
    if info is None:
        return ""
    base = info.base_model.get("name_or_path") or info.base_model.get("init", "")
    base = "trained from scratch" if base == "./base" else f"base `{base}`"  # a scratch base kept in the run
    note = toy_note(model.denoiser)
    return (f"{base} · objective `{info.objective}` · shift `{info.shift}` · mask token `{info.mask_token}` · "
            f"step {info.step}" + (f"\n\n**Note:** {note}." if note else ""))


def option_slider(gr, name: str, top: float, value, step: float, **kwargs):
    """A slider over option `name`'s valid range (lad/sampling/options.py, as lad-generate checks it); `top` is
    the page's own end where the option has none (iterations, temperature), or a lower one."""
    spec = OPTIONS[name]
    high = top if spec.high is None else min(spec.high, top)
    return gr.Slider(spec.low, high, value=value, step=step, **kwargs)


def settings_controls(gr, model: DemoModel) -> dict:
    """The Settings accordion (inside the page's Blocks): {setting: its component}, the one list of the page's
    settings (`on_run` receives their values in this order; the names are `DemoModel.stream`'s, plus `pause` and
    `compare`)."""
    with gr.Accordion("Settings", open=True):
        with gr.Row():
            strategy = gr.Dropdown(list(STRATEGIES), value=default_strategy(model.denoiser), label="Strategy",
                                   elem_id="lad-strategy")
            iterations = option_slider(gr, "iters", 128, ITERS, 1, label="Iterations", elem_id="lad-iters")
            max_new = option_slider(gr, "max_new_tokens", 256, MAX_NEW_TOKENS, 1, label="Max new tokens",
                                    elem_id="lad-max-new")
            seed = gr.Number(0, precision=0, label="Seed", elem_id="lad-seed")
        with gr.Row():
            no_noise = gr.Checkbox(False, label="Disable intermediate noising (noise start 0)",
                                   elem_id="lad-no-noise")
            noise_start = option_slider(gr, "noise_start", 1, 0.5, 0.05, label="Noise start (refine)")
            retention = gr.Dropdown(list(OPTIONS["retention"].choices), value="none", label="Retention (refine)")
            temperature = option_slider(gr, "temperature", 2, 0, 0.05, label="Temperature (0 = greedy)")
        with gr.Row():
            pause = gr.Slider(0, 2, value=0.2, step=0.05, label="Pause between steps (s)", elem_id="lad-pause")
            remask = gr.Dropdown(["default", *OPTIONS["remask"].choices], value="default",
                                 label="Remask (refine, confidence)")
            threshold = option_slider(gr, "threshold", 1, 0.9, 0.01, label="Threshold τ (threshold)")
            block_length = gr.Number(0, precision=0, label="Block length (confidence, threshold; 0 = one block)")
        with gr.Row():
            delay_eos = gr.Checkbox(False, label="Delay EOS (confidence, threshold: commit the end last)",
                                    elem_id="lad-delay-eos")
            delay_repeats = gr.Checkbox(False, label="Delay repeats (confidence, threshold: a mask repeating the "
                                        "word of the mask left of it waits for it)", elem_id="lad-delay-repeats")
            block_cache = gr.Checkbox(False, label="Block cache (confidence, threshold with blocks: faster, "
                                      "approximate)", elem_id="lad-block-cache")
            draft_length = option_slider(gr, "draft_length", MAX_DRAFT, DRAFT_LENGTH, 1,
                                         label="Draft length (speculative: the parent's exact output)",
                                         elem_id="lad-draft-length")
            polish = option_slider(gr, "polish", 8, 0, 1, label="Polish passes (any strategy: noiseless refinement "
                                   "of the finished draft)", elem_id="lad-polish")
            compare = gr.Checkbox(False, label="Compare with the AR parent (both timings)", elem_id="lad-compare")
    return dict(strategy=strategy, iterations=iterations, max_new_tokens=max_new, seed=seed, no_noise=no_noise,
                noise_start=noise_start, retention=retention, temperature=temperature, pause=pause, remask=remask,
                threshold=threshold, block_length=block_length, delay_eos=delay_eos,
                delay_repeats=delay_repeats, block_cache=block_cache, draft_length=draft_length, polish=polish,
                compare=compare)


class Sessions:
    """Each browser session's run: its stop flag and last status line, and how many Runs it asked for, started and
    saw end, so the Run button is enabled again only when the session's last Run is over, and a Run still waiting
    for the model when Stop is pressed never starts. Stop works through these flags, not by cancelling the page
    event: a cancelled event can leave Gradio's "Error" badge on its outputs (a race seen on a loaded machine)."""

    def __init__(self):
        self.runs: dict[str, dict] = {}  # session → {"stop": Event, "status": last status line}
        self.asked: dict[str, int] = {}
        self.started: dict[str, int] = {}
        self.ended: dict[str, int] = {}
        self.cancelled: dict[str, int] = {}  # the session's Runs up to this count were stopped

    def ask(self, key: str) -> None:
        """Run clicked (or Enter): counted, and this session's current run told to end."""
        self.asked[key] = self.asked.get(key, 0) + 1
        if key in self.runs:
            self.runs[key]["stop"].set()

    def start(self, key: str) -> dict:
        """A Run reaches the model; its flag is already set when Stop came while it waited."""
        self.started[key] = self.started.get(key, 0) + 1
        state = self.runs[key] = {"stop": threading.Event(), "status": ""}
        if self.started[key] <= self.cancelled.get(key, 0):
            state["stop"].set()
        return state

    def end(self, key: str, state: dict) -> bool:
        """The run is over (finished, failed or stopped); True when no later Run of this session waits."""
        state["stop"].set()  # a page event that ended early must not leave the worker running
        if self.runs.get(key) is state:
            del self.runs[key]
        self.ended[key] = min(self.ended.get(key, 0) + 1, self.asked.get(key, 0))  # a stopped run is counted once
        return self.ended[key] == self.asked.get(key, 0)

    def stop(self, key: str) -> str | None:
        """Stop pressed: every Run of this session asked so far ends (or never starts); the status line to show,
        None when idle."""
        self.ended[key] = self.cancelled[key] = self.asked.get(key, 0)
        state = self.runs.get(key)
        if state is None:
            return None
        state["stop"].set()
        return f"Stopped at {state['status']}." if state["status"] else "Stopped."


def session(request) -> str:
    return getattr(request, "session_hash", None) or ""


def build_app(model: DemoModel, title: str = "LAD demo"):
    """The page for one loaded run (a `gradio.Blocks`; call `.queue().launch(...)` on it)."""
    gr = import_gradio()
    sessions = Sessions()

    def ready():  # the Run button between runs; while one runs (or waits for the model) it reads "Running…"
        return gr.Button("Run", interactive=True)

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\n{describe(model)}\n\nType a prompt and watch the answer form: {LEGEND}")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", lines=2, scale=5, elem_id="lad-prompt",
                                placeholder="What is the capital of France?")
            with gr.Column(scale=1, min_width=140):
                run = gr.Button("Run", variant="primary", elem_id="lad-run")
                stop = gr.Button("Stop", variant="stop", elem_id="lad-stop")
        status = gr.Markdown("Ready.", elem_id="lad-status")
        with gr.Row():
            with gr.Column():
                gr.Markdown("**LAD** (iterative denoising)")
                lad_out = gr.HTML(view.placeholder_html("the answer forms here"), elem_id="lad-view")
            with gr.Column(visible=False) as ar_column:
                gr.Markdown("**AR parent** (adapter off, causal attention, KV cache)")
                ar_out = gr.HTML(view.placeholder_html(""), elem_id="ar-view")
        controls = settings_controls(gr, model)

        def on_ask(request: gr.Request):  # unqueued: shown at once, even while another session holds the model
            sessions.ask(session(request))
            return gr.Button("Running…", interactive=False), "Waiting for the model…"

        def on_run(request: gr.Request, prompt, *values):  # values: the controls' values, in `controls`' order
            key = session(request)
            state = sessions.start(key)
            settings = dict(zip(controls, values))
            pause, compare = settings.pop("pause"), settings.pop("compare")
            last = False
            try:
                frames = () if state["stop"].is_set() else model.stream(prompt, settings, pause, compare,
                                                                        state["stop"])  # () : stopped while waiting
                for frame in frames:
                    if state["stop"].is_set():  # Stop (or a newer Run) has said what happens: keep its line
                        yield frame.lad, frame.ar, gr.skip(), gr.skip()
                        continue
                    state["status"] = frame.status
                    yield frame.lad, frame.ar, frame.status, gr.skip()
            except Exception as err:  # noqa: BLE001 — an error belongs in the page
                yield gr.skip(), gr.skip(), view.error_text(f"{type(err).__name__}: {err}"), gr.skip()
            finally:
                last = sessions.end(key, state)
            yield gr.skip(), gr.skip(), gr.skip(), ready() if last else gr.skip()  # (Stop: on_stop does it)

        def on_stop(request: gr.Request):
            line = sessions.stop(session(request))
            return (gr.skip() if line is None else line), ready()

        inputs = [prompt, *controls.values()]
        outputs = [lad_out, ar_out, status, run]
        for trigger in (run.click, prompt.submit):
            trigger(on_ask, None, [run, status], queue=False).then(on_run, inputs, outputs)
        stop.click(on_stop, None, [status, run], queue=False)  # unqueued: at once, while the Run holds the queue
        controls["compare"].change(lambda on: gr.Column(visible=on), controls["compare"], ar_column)
    return app
