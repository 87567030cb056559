"""The README's picture of the demo, taken from a real run in a real browser (chromium + Playwright).

    python -m eval.demo_screenshot --model runs/ablate/prompt_causal_mask --out docs/img/demo.png

It serves `lad-demo`'s page for the run, types the prompt, turns on the AR parent beside it, clicks Run and takes
the picture while the answer is still being denoised (masked slots red, changed slots green), then a second one
when both answers are done (`--out` with `_done` before the suffix). Nothing is faked: the page is the one users
get; the pause between steps only slows the streaming so that a step can be caught.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import quiet  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_number(page, elem_id: str, value) -> None:
    """A Gradio slider's number box: type the value, then leave the box so the slider takes it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def shoot(model_dir: str, prompt: str, out: Path, iters: int, max_new_tokens: int, step: int) -> Path:
    """Both pictures; returns the second's path."""
    from playwright.sync_api import sync_playwright

    from lad.demo import serve
    from lad.demo.app import build_app
    from lad.demo.model import DemoModel
    from lad.generate import load

    denoiser, tokenizer = load(model_dir)
    app = build_app(DemoModel(denoiser, tokenizer, denoiser.info.chat_template), title=f"LAD demo: {model_dir}")
    port = free_port()
    serve(app, port=port, block=False)
    done = out.with_name(f"{out.stem}_done{out.suffix}")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(600_000)  # a loaded 2-core machine: 32 steps, 1.5 s apart, then the parent
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#lad-prompt textarea").fill(prompt)
            set_number(page, "lad-iters", iters)
            set_number(page, "lad-max-new", max_new_tokens)
            set_number(page, "lad-pause", 1.5)
            page.locator("#lad-compare input").check()
            page.click("#lad-run")
            page.wait_for_function(f"document.querySelector('#lad-status').innerText.includes('step {step}/')")
            page.screenshot(path=str(out), full_page=True)
            page.wait_for_selector("#ar-view .lad-final, #ar-view .lad-empty")
            page.screenshot(path=str(done), full_page=True)
            browser.close()
    finally:
        app.close()
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a LAD run directory")
    p.add_argument("--prompt", default="Give three tips for staying healthy.")
    p.add_argument("--out", default="docs/img/demo.png")
    p.add_argument("--iters", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--step", type=int, default=12, help="the step the first picture shows")
    args = p.parse_args(argv)
    if not Path(CHROMIUM).exists():
        p.error(f"{CHROMIUM} not found: apt-get install chromium")
    quiet()
    done = shoot(args.model, args.prompt, Path(args.out), args.iters, args.max_new_tokens, args.step)
    print(f"wrote {args.out} and {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
