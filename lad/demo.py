"""`lad-demo --model RUN_DIR`: a local web page that shows a LAD run denoising an answer step by step.

    lad-demo --model runs/tiny                      # http://127.0.0.1:7860 (loopback only)
    lad-demo --model runs/NAME --host 0.0.0.0 --port 8080 --device cuda

The run is loaded once, as `lad-generate` loads it (`lad.generate.load` → `lad.run.load_run`). Each Run starts a
worker thread that calls the chosen strategy with an `on_step` callback; the callback puts every `Step` on a
queue and the page's generator turns them into HTML as they arrive (lad/demo_view.py: masked red, changed
green, the final answer plain). The pause between steps is spent in the page, not in the sampler, so the
timings shown are the model's. Stop sets a flag the callback checks (it raises `Stopped`, ending the sampler
after its current forward) and cancels the page's event. Every error ends as a message in the page.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

from . import demo_view as view
from .sampling import Step, get_strategy
from .sampling.common import eos_token_ids
from .run import RunDirError, check_parent
from .sampling.render import decode_pieces

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
    def eos_ids(self) -> set[int]:
        return eos_token_ids(self.tokenizer, self.denoiser)

    def html(self, step: Step) -> str:
        pieces = decode_pieces(self.tokenizer, step.tokens, self.pieces)
        return view.segments_html(view.segments(step, pieces, self.eos_ids))

    def work(self, prompt: str, strategy: str, options: dict, compare: bool, out: queue.Queue,
             stop: threading.Event) -> None:
        """The worker thread: run the strategy (then the AR parent), reporting everything on `out`."""

        def reporter(kind):
            def on_step(steps: list[Step]) -> None:
                if stop.is_set():
                    raise Stopped
                out.put((kind, steps[0]))
            return on_step

        try:
            with self.lock:
                common = dict(chat_template=self.chat_template, **options)
                (gen,) = get_strategy(strategy)(self.denoiser, self.tokenizer, [prompt], on_step=reporter("lad"),
                                                **common)
                out.put(("lad-done", gen))
                if compare:
                    (ar,) = get_strategy("ar")(self.denoiser, self.tokenizer, [prompt], on_step=reporter("ar"),
                                               **common)
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
            info = getattr(self.denoiser, "lad_info", None)
            if (compare or settings.get("strategy") == "ar") and info is not None:
                try:
                    check_parent(info, "this model")
                except RunDirError as err:
                    raise view.SettingsError(str(err)) from None
            options = view.sampler_options(**settings)
            pause = view.pause_seconds(pause)
        except view.SettingsError as err:
            yield Frame(view.placeholder_html("nothing generated"), idle, view.error_text(str(err)))
            return
        strategy, n = settings["strategy"], options["max_new_tokens"]
        iters = options["iters"]
        out: queue.Queue = queue.Queue()
        threading.Thread(target=self.work, args=(prompt, strategy, options, compare, out, stop), daemon=True,
                         name="lad-demo-worker").start()
        blank = Step(-1, [self.denoiser.mask_id] * n, [True] * n, [False] * n, [0.0] * n, 0)
        frame = Frame(self.html(blank) if strategy != "ar" else view.placeholder_html("…"),
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
                                            iters if kind == "lad" and strategy != "ar" else None)
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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description="Serve a web page that shows a LAD run denoising step by step.")
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="a LAD run directory (holds lad.json)")
    parser.add_argument("--weights", default="final", metavar="{final,best,PATH}", help="default: final")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs internet)")
    return parser.parse_args(argv)


def serve(app, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True):
    """Launch the page (what `lad-demo` and the browser test both call); block=False returns at once, and
    `app.close()` stops it. One generation at a time: they share one model."""
    return app.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=share,
                                                         prevent_thread_lock=not block, quiet=not block,
                                                         show_error=True)


def address_problem(host: str, port: int | None) -> str | None:
    """Can the page listen on --host (and --port)? Asked before the model loads, not after."""
    import errno
    import socket

    if port is not None and not 0 < port < 65536:
        return f"--port must be in 1..65535, got {port}"
    # bound as the server (uvicorn) binds it: IPv6 only for an address with a colon, SO_REUSEADDR
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port or 0))
        except (socket.gaierror, UnicodeError) as err:
            return f"--host {host}: not an address or known host name ({getattr(err, 'strerror', None) or err})"
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"--port {port}: already in use on {host}; choose another port, or leave --port out"
            return f"--host {host}: cannot listen on this address ({err.strerror or err}); 127.0.0.1 serves " \
                   "this machine, 0.0.0.0 every network interface"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .generate import device_problem

    problem = address_problem(args.host, args.port) or device_problem(args.device)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    try:
        import_gradio()  # before the model loads: fail fast
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    import torch

    from .demo_app import build_app
    from .generate import _quiet_libraries, load
    from .modeling.bidirectional import UnsupportedArchitectureError
    from .modeling.locate import ModelNotFoundError

    _quiet_libraries()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        denoiser, tokenizer = load(args.model, device=device, weights=args.weights)
    except (ValueError, OSError, ModelNotFoundError, UnsupportedArchitectureError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    model = DemoModel(denoiser, tokenizer, denoiser.lad_info.chat_template)
    app = build_app(model, title=f"LAD demo: {args.model}")
    try:
        serve(app, host=args.host, port=args.port, share=args.share)
    except OSError as err:  # the port is taken, the address cannot be bound
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
