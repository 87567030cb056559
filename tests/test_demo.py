"""`lad-demo`: step → coloured tokens, settings → sampler options, the streaming worker (Stop, errors), the CLI,
and the page itself in a real headless browser (Debian's chromium driven by Playwright) on a tiny run."""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from eval.demo_screenshot import CHROMIUM, free_port, set_number  # the README's picture drives the page the same way
from lad.demo import view
from lad.demo import DemoModel, Frame, import_gradio, main
from lad.generate import ar_generate, generate, load
from lad.sampling import Step

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
MASK, EOS = 262, 257  # the tiny run's mask token and the byte tokenizer's EOS
SETTINGS = dict(strategy="refine", iterations=6, max_new_tokens=12, noise_start=0.5, no_noise=False,
                retention="none", remask="default", temperature=0, seed=0, threshold=0.9, block_length=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from lad.finetune import main as finetune

    out = tmp_path_factory.mktemp("demo") / "run"
    code = finetune([str(REPO / "recipes" / "tiny.yaml"), "max_steps=20", f"output_dir={out}", "eval_every=0",
                     "save_every=0"])
    assert code == 0
    return str(out)


@pytest.fixture(scope="module")
def model(run_dir):
    denoiser, tokenizer = load(run_dir)
    return DemoModel(denoiser, tokenizer, denoiser.info.chat_template)


def frames(model, prompt="What is 2+2?", pause=0.0, compare=False, **settings) -> list[Frame]:
    return list(model.stream(prompt, {**SETTINGS, **settings}, pause, compare))


# ---------------------------------------------------------------- demo_view: pure rendering and settings


def test_segments_kinds_and_after_eos():
    step = Step(2, [72, 105, MASK, EOS, 33], [False, False, True, False, False], [False, True, False, False, True],
                [0.5] * 5, 3)
    pieces = ["H", "i", "<mask>", "<|eos|>", "!"]
    assert view.segments(step, pieces, {EOS}) == [
        ("H", "kept", False), ("i", "changed", False), (view.MASK_GLYPH, "masked", False),
        ("<|eos|>", "kept", True), ("!", "changed", True)]
    html = view.segments_html(view.segments(step, pieces, {EOS}))
    assert html.count('class="lad-tok lad-masked"') == 1 and html.count("lad-changed") == 2
    assert html.count("lad-after-eos") == 2 and "&lt;|eos|&gt;" in html and "<|eos|>" not in html
    assert view.STYLES["masked"] in html and view.STYLES["changed"] in html  # red and green inline


def test_a_masked_slot_after_eos_stays_red_and_controls_are_visible():
    step = Step(0, [EOS, MASK, 10, 7], [False, True, False, False], [True, False, True, True], [0.1] * 4, 1)
    parts = view.segments(step, ["<|eos|>", "", "\n", "\x07"], {EOS})
    assert [(p.kind, p.after_eos) for p in parts] == [("changed", True), ("masked", True), ("changed", True),
                                                      ("changed", True)]
    assert parts[2].text == "↵\n" and parts[3].text == "␇"  # a newline breaks the line; a bell is drawn


def test_final_html_is_plain_and_escaped():
    html = view.final_html("a <b>\nc\x00")
    assert 'class="lad-final"' in html and "lad-tok" not in html and "&lt;b&gt;\nc␀" in html
    assert "lad-empty" in view.final_html("")


def test_settings_to_sampler_options():
    options = view.sampler_options(**{**SETTINGS, "iterations": 16.0, "max_new_tokens": 32, "seed": 3})
    assert options == {"iters": 16, "max_new_tokens": 32, "noise_start": 0.5, "retention": "none",
                       "temperature": 0.0, "seed": 3, "threshold": 0.9, "draft_length": 4}  # remask default, one block: out
    assert isinstance(options["iters"], int)
    noiseless = view.sampler_options(**{**SETTINGS, "no_noise": True, "noise_start": 0.8, "remask": "confidence",
                                        "block_length": 4, "delay_eos": True, "delay_repeats": True,
                                        "block_cache": True})
    assert noiseless["noise_start"] == 0.0 and noiseless["remask"] == "confidence" and noiseless["block_length"] == 4
    assert noiseless["delay_eos"] is True and noiseless["block_cache"] is True and noiseless["delay_repeats"] is True


def test_the_page_controls_take_their_ranges_and_choices_from_the_options_table():
    from types import SimpleNamespace

    from lad.demo.app import settings_controls
    from lad.sampling.options import OPTIONS

    gr = import_gradio()
    with gr.Blocks():
        controls = settings_controls(gr, SimpleNamespace(denoiser=SimpleNamespace(info=None)))
    sliders = {"iterations": "iters", "max_new_tokens": "max_new_tokens", "noise_start": "noise_start",
               "temperature": "temperature", "threshold": "threshold", "draft_length": "draft_length",
               "polish": "polish"}
    for control, option in sliders.items():
        spec = OPTIONS[option]
        assert controls[control].minimum == spec.low, control
        assert spec.high is None or controls[control].maximum <= spec.high, control
        assert view.PAGE_HIGH.get(option, spec.high) >= controls[control].maximum, control
    choices = lambda name: [c[0] for c in controls[name].choices]  # noqa: E731
    assert choices("retention") == list(OPTIONS["retention"].choices)
    assert choices("remask") == ["default", *OPTIONS["remask"].choices]


@pytest.mark.parametrize("change, message", [
    ({"iterations": 0}, "iterations must be between 1 and 1024, got 0"),
    ({"iterations": 2.5}, "iterations must be a whole number"),
    ({"max_new_tokens": None}, "max new tokens is empty"),
    ({"noise_start": 1.5}, "noise start must be between 0 and 1"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"seed": -1}, "seed must be between 0 and"),
    ({"block_length": 5}, "block length (5) must divide max new tokens (12)"),
    ({"strategy": "beam"}, "unknown strategy 'beam'"),
])
def test_bad_settings_name_the_setting(change, message):
    with pytest.raises(view.SettingsError, match=re.escape(message)):
        view.sampler_options(**{**SETTINGS, **change})


def test_bad_polish_is_shown_in_the_page(model):
    (frame,) = frames(model, polish=-1)
    assert f"polish passes must be between 0 and {view.PAGE_HIGH['polish']}, got -1" in frame.status


# ---------------------------------------------------------------- DemoModel.stream: what the page receives


def test_stream_shows_masks_changes_then_the_answer(model):
    out = frames(model)
    (gen,) = generate(model.denoiser, "What is 2+2?", tokenizer=model.tokenizer, iters=6, max_new_tokens=12)
    first, steps, last = out[0], out[1:-1], out[-1]
    assert first.lad.count("lad-masked") == 12 and "lad-changed" not in first.lad  # the blank canvas, at once
    assert len(steps) == gen.nfe and [f.status for f in steps] == [
        f"LAD: step {i}/6 · {i} forwards" for i in range(1, gen.nfe + 1)]
    assert "lad-masked" in steps[0].lad and "lad-changed" in steps[0].lad  # step 1: re-masked + predicted
    assert "lad-masked" not in steps[-1].lad  # refine re-masks nothing at the end
    assert last.lad == view.final_html(gen.text) and last.status.startswith(f"**LAD** (refine): {gen.nfe} forwards")


def test_stream_polishes_the_draft_after_its_steps(model):
    plain = frames(model, strategy="confidence")
    out = frames(model, strategy="confidence", polish=3)
    (gen,) = generate(model.denoiser, "What is 2+2?", tokenizer=model.tokenizer, strategy="confidence", iters=6,
                      max_new_tokens=12, polish=3, polish_with=model.polish_with, trace=True)
    passes = len(out) - len(plain)  # the passes are steps of their own, each of the denoiser's forward and the
    # parent's where it flags a slot: one per slot changed (12 at most) and one more
    assert 1 <= passes <= 3 and passes <= gen.polish_forwards <= passes * (1 + 12 + 1)
    assert model.polish_with == "parent"
    assert out[-2].status == f"LAD: step {gen.steps[-1].iteration + 1}/9 · {gen.nfe} forwards"
    assert out[-1].lad == view.final_html(gen.text)
    assert out[-1].status.startswith(f"**LAD** (confidence): {gen.nfe} forwards, {gen.polish_forwards} of them "
                                     "polishing")


def test_stream_with_the_ar_parent_and_both_timings(model):
    out = frames(model, compare=True, max_new_tokens=8)
    (ar,) = ar_generate(model.denoiser, model.tokenizer, ["What is 2+2?"], max_new_tokens=8)
    assert out[-1].ar == view.final_html(ar.text)
    assert re.fullmatch(r"\*\*LAD\*\* \(refine\): \d+ forwards, [\d.]+ s · \*\*AR parent\*\*: "
                        rf"{ar.nfe} tokens, [\d.]+ s", out[-1].status)
    assert any(f.status == "AR parent: 1 tokens" for f in out)  # the parent streams token by token too


def test_pause_spaces_the_frames_but_not_the_timings(model):
    started = time.monotonic()
    out = frames(model, pause=0.15, iterations=3, max_new_tokens=4)
    elapsed = time.monotonic() - started
    steps = sum(f.status.startswith("LAD: step") for f in out)
    assert elapsed >= 0.15 * steps * 0.9
    seconds = float(re.search(r"forwards, ([\d.]+) s", out[-1].status).group(1))
    assert seconds < elapsed - 0.1  # the model's own time, without the pauses


@pytest.mark.parametrize("prompt, change, message", [
    ("   ", {}, "type a prompt first"),
    ("hi", {"iterations": -3}, "iterations must be between"),
    ("hi", {"strategy": "confidence", "iterations": 1, "block_length": 4}, "must be at least the number of blocks"),
])
def test_errors_end_as_a_message_in_the_page(model, prompt, change, message):
    out = frames(model, prompt, **change)
    assert out[-1].status.startswith("**Error:** ") and message in out[-1].status
    assert not model.lock.locked()


def test_an_exported_model_has_no_parent_to_compare_with(model, monkeypatch):
    import dataclasses

    monkeypatch.setattr(model.denoiser, "info", dataclasses.replace(model.denoiser.info, merged=True))
    for out in (frames(model, compare=True), frames(model, strategy="ar")):
        assert out[-1].status.startswith("**Error:** ") and "exported (merged) model" in out[-1].status
    assert frames(model)[-1].status.startswith("**LAD** (refine)")  # the denoiser itself still runs
    assert model.polish_with == "denoiser"  # and polishes alone: there is no parent to fill from
    assert frames(model, polish=1)[-1].status.startswith("**LAD** (refine)")


def test_an_unexpected_failure_is_shown_and_the_next_run_works(model, monkeypatch):
    import lad.demo.model

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(lad.demo.model, "get_strategy", lambda name: broken)
    assert frames(model)[-1].status == "**Error:** RuntimeError: out of memory, say"
    monkeypatch.undo()
    assert frames(model)[-1].status.startswith("**LAD** (refine)")


class StopAfterFirstStep(queue.Queue):
    """The worker's queue, pressing Stop as soon as the first step arrives."""

    def __init__(self, stop: threading.Event):
        super().__init__()
        self.stop = stop

    def put(self, item, *args, **kwargs):
        super().put(item, *args, **kwargs)
        if item[0] == "lad":
            self.stop.set()


@pytest.mark.parametrize("strategy", ["refine", "ar"])
def test_stop_aborts_the_sampler_after_its_current_step(model, strategy):
    before = frames(model, strategy=strategy)[-1].lad
    stop = threading.Event()
    out = StopAfterFirstStep(stop)
    options = view.sampler_options(**{**SETTINGS, "strategy": strategy, "iterations": 10})
    model.work("What is 2+2?", strategy, options, True, out, stop)
    kinds = [out.get_nowait()[0] for _ in range(out.qsize())]
    assert kinds == ["lad", "stopped", "end"]  # no second step, no answer, no AR run
    assert not model.lock.locked()
    assert frames(model, strategy=strategy)[-1].lad == before  # `ar` restored the bidirectional denoiser


def test_stop_interrupts_the_pause_and_ends_the_stream(model):
    stop = threading.Event()
    stream = model.stream("What is 2+2?", SETTINGS, 9.0, False, stop)
    next(stream)  # the blank canvas
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    assert next(stream).status == "Stopped after step 1 (1 forwards)."
    assert time.monotonic() - started < 5  # not the 9 s pause
    with pytest.raises(StopIteration):
        next(stream)


# ---------------------------------------------------------------- CLI


def test_run_button_is_ready_again_only_after_the_sessions_last_run():
    from lad.demo.app import Sessions

    sessions = Sessions()
    sessions.ask("a")
    first = sessions.start("a")
    sessions.ask("a")  # Enter while it runs: the first is told to stop, the second waits for the model
    assert first["stop"].is_set()
    assert not sessions.end("a", first)  # the first is over, but the second has not run yet
    second = sessions.start("a")
    assert sessions.end("a", second)
    sessions.ask("a")
    third = sessions.start("a")
    third["status"] = "LAD: step 2/6"
    assert sessions.stop("a") == "Stopped at LAD: step 2/6." and third["stop"].is_set()
    assert sessions.end("a", third)  # the cancelled run ends once: the next Run is counted from here
    sessions.ask("b")
    assert sessions.stop("a") is None and "b" not in sessions.runs  # another session's Run is its own
    sessions.ask("c")  # a Run waiting for the model (another session holds it) when Stop is pressed
    assert sessions.stop("c") is None
    waited = sessions.start("c")
    assert waited["stop"].is_set() and sessions.end("c", waited)  # it never runs
    sessions.ask("c")
    assert not sessions.start("c")["stop"].is_set()  # a Run asked after the Stop runs


def test_header_names_a_scratch_base_and_the_toy_models_noise(model):
    from lad.demo.app import describe

    header = describe(model)
    assert header.startswith("trained from scratch · objective") and "./base" not in header
    assert "140,864-parameter model answers with noise" in header


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    pytest.importorskip("gradio")
    assert main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lad-demo: error: ") and "is not a LAD run" in err
    assert main(["--model", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path, capsys):
    """Not after loading the model (the folder given is not even a run: the port is checked first)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["--model", str(tmp_path / "nowhere"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lad-demo: error: --port {port}: already in use on 127.0.0.1; choose another port, or leave " \
                  "--port out"


def test_missing_gradio_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    with pytest.raises(SystemExit, match=re.escape("pip install 'lad[demo]'")):
        import_gradio()
    assert main(["--model", str(tmp_path)]) == 2
    assert "pip install 'lad[demo]'" in capsys.readouterr().err


def test_startup_says_where_the_page_is_in_lad_terms(run_dir):
    """One line with the address and how to stop it; no library warnings, no `share=True` in `launch()` hint."""
    pytest.importorskip("gradio")
    import subprocess

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lad.cli", "demo", "--model", run_dir, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stdout.readline()
    finally:
        proc.terminate()
    rest = proc.communicate(timeout=30)[0]
    assert first == f"lad-demo: open http://127.0.0.1:{port}/ in a browser; Ctrl-C stops the page (--share adds " \
                    "a public link)\n", first + rest
    assert "launch()" not in rest and "Warning" not in rest, rest


def test_lad_demo_binds_loopback_by_default():
    from lad.demo import parse_args

    args = parse_args(["--model", "runs/x"])
    assert args.host == "127.0.0.1" and args.port is None and not args.share


# ---------------------------------------------------------------- the page in a real browser


BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]

RECORD = """() => {
  const seen = window.__seen = {masked: 0, changed: 0, both: false, statuses: [], red: null, green: null};
  const panel = document.querySelector('#lad-view'), status = document.querySelector('#lad-status');
  new MutationObserver(() => {
    const masked = panel.querySelectorAll('.lad-masked'), changed = panel.querySelectorAll('.lad-changed');
    seen.masked = Math.max(seen.masked, masked.length);
    seen.changed = Math.max(seen.changed, changed.length);
    seen.both = seen.both || (masked.length > 0 && changed.length > 0);
    if (masked.length) seen.red = getComputedStyle(masked[0]).backgroundColor;
    if (changed.length) seen.green = getComputedStyle(changed[0]).backgroundColor;
    const text = status.innerText.trim();
    if (text && seen.statuses[seen.statuses.length - 1] !== text) seen.statuses.push(text);
  }).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def browser_or_skip():
    """playwright.sync_api, or a skip naming what is missing (a failure under LAD_REQUIRE_BROWSER=1, as in CI)."""
    missing = [name for name in ("gradio", "playwright") if importlib.util.find_spec(name) is None]
    missing += [f"{CHROMIUM} (apt-get install chromium)"] if not os.path.exists(CHROMIUM) else []
    if missing:
        reason = "the browser test needs " + ", ".join(missing)
        pytest.fail(reason) if os.environ.get("LAD_REQUIRE_BROWSER") else pytest.skip(reason)
    from playwright import sync_api

    return sync_api




def test_page_in_a_real_browser(model, tmp_path):
    """Type a prompt, Run: red masks and green changes stream in, then the answers and both timings; Stop
    ends a slow run; an empty prompt shows an error. Screenshots go to test-artifacts/."""
    playwright = browser_or_skip()
    from lad.demo import serve
    from lad.demo.app import build_app

    prompt = "What is 2+2?"
    (gen,) = generate(model.denoiser, prompt, tokenizer=model.tokenizer, iters=6, max_new_tokens=16)
    (ar,) = ar_generate(model.denoiser, model.tokenizer, [prompt], max_new_tokens=16)
    ARTIFACTS.mkdir(exist_ok=True)
    app = build_app(model, title="LAD demo: tiny run")
    port = free_port()
    serve(app, port=port, block=False)
    try:
        with playwright.sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS,
                viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#lad-prompt textarea").fill(prompt)
            set_number(page, "lad-iters", 6)
            set_number(page, "lad-max-new", 16)
            set_number(page, "lad-pause", 0.3)
            page.locator("#lad-compare input").check()
            page.evaluate(RECORD)
            page.click("#lad-run")
            page.wait_for_selector("#lad-view .lad-masked")
            page.wait_for_selector("#lad-view .lad-changed")
            page.screenshot(path=str(ARTIFACTS / "demo_streaming.png"), full_page=True)
            page.wait_for_selector("#ar-view .lad-final, #ar-view .lad-empty")
            seen = page.evaluate("window.__seen")
            assert seen["both"] and seen["masked"] > 0 and seen["changed"] > 0
            assert seen["red"] == "rgb(254, 202, 202)" and seen["green"] == "rgb(187, 247, 208)"
            assert "LAD: step 1/6 · 1 forwards" in seen["statuses"]
            assert f"LAD: step {gen.nfe}/6 · {gen.nfe} forwards" in seen["statuses"]  # streamed, step by step
            if gen.text:
                assert page.locator("#lad-view .lad-final").text_content() == view.plain(gen.text)
            else:
                assert page.locator("#lad-view .lad-empty").count() == 1
            assert page.locator("#lad-view .lad-tok").count() == 0  # the answer is plain
            assert page.locator("#ar-view .lad-final").text_content() == view.plain(ar.text)
            status = page.inner_text("#lad-status")
            assert re.fullmatch(rf"LAD \(refine\): {gen.nfe} forwards, [\d.]+ s · AR parent: {ar.nfe} tokens, "
                                r"[\d.]+ s", status), status
            page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

            assert page.is_enabled("#lad-run") and page.inner_text("#lad-run") == "Run"  # ready for the next

            set_number(page, "lad-iters", 40)  # a slow run: one step every 2 s
            set_number(page, "lad-pause", 2)
            page.click("#lad-run")
            page.wait_for_function("document.querySelector('#lad-status').innerText.includes('LAD: step 1/40')")
            assert page.is_disabled("#lad-run") and page.inner_text("#lad-run") == "Running…"  # busy, visibly
            page.click("#lad-stop")
            page.wait_for_function("document.querySelector('#lad-status').innerText.startsWith('Stopped')")
            page.wait_for_timeout(2500)
            assert page.inner_text("#lad-status").startswith("Stopped")  # no later step overwrote it
            assert page.is_enabled("#lad-run") and page.inner_text("#lad-run") == "Run"
            assert page.locator("#lad-view .lad-final").count() == 0 and page.locator("#lad-view .lad-tok").count()

            page.locator("#lad-prompt textarea").fill("")
            page.click("#lad-run")
            page.wait_for_function("document.querySelector('#lad-status').innerText.includes('type a prompt')")
            assert page.inner_text("#lad-status") == "Error: type a prompt first"
            context.close()
    finally:
        app.close()
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000
