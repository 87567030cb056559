"""The Gradio page of `lad-demo`: prompt, Run/Stop, the LAD panel, the AR parent's panel, settings.

Only layout and wiring live here; what a Run shows comes from `DemoModel.stream` (lad/demo/model.py). Each browser
session has its own stop flag (keyed by Gradio's session hash), so Stop ends that session's run only.
Element ids (`lad-prompt`, `lad-run`, `lad-stop`, `lad-status`, `lad-view`, `ar-view`, ...) are what the
browser test drives.
"""

import threading  # no `from __future__ import annotations`: Gradio must see the real `gr.Request` hints

from ..defaults import ITERS, MAX_NEW_TOKENS
from ..sampling import STRATEGIES, default_strategy
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
    return (f"base `{base}` · objective `{info.objective}` · shift `{info.shift}` · mask token "
            f"`{info.mask_token}` · step {info.step}")


SETTINGS = ("strategy", "iterations", "max_new", "seed", "no_noise", "noise_start", "retention", "temperature",
            "pause", "remask", "threshold", "block_length", "delay_eos", "block_cache", "compare")  # on_run's order


def settings_controls(gr, model: DemoModel) -> dict:
    """The Settings accordion (inside the page's Blocks): {name in SETTINGS: its component}."""
    with gr.Accordion("Settings", open=True):
        with gr.Row():
            strategy = gr.Dropdown(list(STRATEGIES), value=default_strategy(model.denoiser), label="Strategy",
                                   elem_id="lad-strategy")
            iterations = gr.Slider(1, 128, value=ITERS, step=1, label="Iterations", elem_id="lad-iters")
            max_new = gr.Slider(1, 256, value=MAX_NEW_TOKENS, step=1, label="Max new tokens", elem_id="lad-max-new")
            seed = gr.Number(0, precision=0, label="Seed", elem_id="lad-seed")
        with gr.Row():
            no_noise = gr.Checkbox(False, label="Disable intermediate noising (noise start 0)",
                                   elem_id="lad-no-noise")
            noise_start = gr.Slider(0, 1, value=0.5, step=0.05, label="Noise start (refine)")
            retention = gr.Dropdown(["none", "editable", "locked"], value="none", label="Retention (refine)")
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
        with gr.Row():
            pause = gr.Slider(0, 2, value=0.2, step=0.05, label="Pause between steps (s)", elem_id="lad-pause")
            remask = gr.Dropdown(["default", "random", "confidence"], value="default",
                                 label="Remask (refine, confidence)")
            threshold = gr.Slider(0, 1, value=0.9, step=0.01, label="Threshold τ (threshold)")
            block_length = gr.Number(0, precision=0, label="Block length (confidence, threshold; 0 = one block)")
        with gr.Row():
            delay_eos = gr.Checkbox(False, label="Delay EOS (confidence, threshold: commit the end last)",
                                    elem_id="lad-delay-eos")
            block_cache = gr.Checkbox(False, label="Block cache (confidence, threshold with blocks: faster, "
                                      "approximate)", elem_id="lad-block-cache")
            compare = gr.Checkbox(False, label="Compare with the AR parent (both timings)", elem_id="lad-compare")
    return dict(strategy=strategy, iterations=iterations, max_new=max_new, seed=seed, no_noise=no_noise,
                noise_start=noise_start, retention=retention, temperature=temperature, pause=pause, remask=remask,
                threshold=threshold, block_length=block_length, delay_eos=delay_eos, block_cache=block_cache,
                compare=compare)


def build_app(model: DemoModel, title: str = "LAD demo"):
    """The page for one loaded run (a `gradio.Blocks`; call `.queue().launch(...)` on it)."""
    gr = import_gradio()
    runs: dict[str, dict] = {}  # session hash → {"stop": Event, "status": last status line}

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

        def on_run(prompt, strategy, iterations, max_new, seed, no_noise, noise_start, retention, temperature,
                   pause, remask, threshold, block_length, delay_eos, block_cache, compare, request: gr.Request):
            key = getattr(request, "session_hash", None) or ""
            if key in runs:
                runs[key]["stop"].set()  # a new Run ends this session's previous one
            state = runs[key] = {"stop": threading.Event(), "status": ""}
            settings = dict(strategy=strategy, iterations=iterations, max_new_tokens=max_new, noise_start=noise_start,
                            no_noise=no_noise, retention=retention, remask=remask, temperature=temperature,
                            seed=seed, threshold=threshold, block_length=block_length, delay_eos=delay_eos,
                            block_cache=block_cache)
            try:
                for frame in model.stream(prompt, settings, pause, compare, state["stop"]):
                    state["status"] = frame.status
                    yield frame.lad, frame.ar, frame.status
            except Exception as err:  # noqa: BLE001 — an error belongs in the page
                yield gr.skip(), gr.skip(), view.error_text(f"{type(err).__name__}: {err}")
            finally:
                state["stop"].set()  # a cancelled page event must not leave the worker running
                if runs.get(key) is state:
                    del runs[key]

        def on_stop(request: gr.Request):
            state = runs.get(getattr(request, "session_hash", None) or "")
            if state is None:
                return gr.skip()
            state["stop"].set()
            return f"Stopped at {state['status']}." if state["status"] else "Stopped."

        inputs = [prompt, *(controls[name] for name in SETTINGS)]
        outputs = [lad_out, ar_out, status]
        events = [run.click(on_run, inputs, outputs), prompt.submit(on_run, inputs, outputs)]
        stop.click(on_stop, None, status, cancels=events)
        controls["compare"].change(lambda on: gr.Column(visible=on), controls["compare"], ar_column)
    return app
