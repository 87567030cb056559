"""`lad-demo`'s command line: arguments checked before the model loads, then the page served."""

from __future__ import annotations

import argparse
import sys
import time

from ..console import Parser, quiet_libraries
from .model import PROG, DemoModel, import_gradio

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog=PROG, description="Serve a web page that shows a LAD run denoising step by step.")
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
    `app.close()` stops it. One generation at a time: they share one model. Gradio's own startup lines (its
    hint names `launch()`, not a flag of this command) are replaced by LAD's."""
    app.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=share,
                                                  prevent_thread_lock=True, quiet=True, show_error=True)
    if not block:
        return app
    print(f"{PROG}: open {app.local_url} in a browser; Ctrl-C stops the page"
          + ("" if share else " (--share adds a public link)"), flush=True)
    try:
        while app.is_running:
            time.sleep(0.2)
    finally:
        app.close()
    return app


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
    from ..console import device_problem

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

    from ..generate import load
    from ..modeling.bidirectional import UnsupportedArchitectureError
    from ..modeling.locate import ModelNotFoundError
    from .app import build_app

    quiet_libraries()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        denoiser, tokenizer = load(args.model, device=device, weights=args.weights)
    except (ValueError, OSError, ModelNotFoundError, UnsupportedArchitectureError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    model = DemoModel(denoiser, tokenizer, denoiser.info.chat_template)
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
