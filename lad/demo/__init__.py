"""`lad-demo --model RUN_DIR`: a local web page that shows a LAD run denoising an answer step by step.

    lad-demo --model runs/tiny                      # http://127.0.0.1:7860 (loopback only)
    lad-demo --model runs/NAME --host 0.0.0.0 --port 8080 --device cuda

The run is loaded once, as `lad-generate` loads it (`lad.generate.load` → `lad.run.load_run`). Each Run starts a
worker thread that calls the chosen strategy with an `on_step` callback; the callback puts every `Step` on a
queue and the page's generator turns them into HTML as they arrive (lad/demo/view.py: masked red, changed
green, the final answer plain). The pause between steps is spent in the page, not in the sampler, so the
timings shown are the model's. Stop sets a flag the callback checks (it raises `Stopped`, ending the sampler
after its current forward); the page's event then ends by itself. Every error ends as a message in the page.
"""

from .cli import main, parse_args, serve
from .model import DemoModel, Frame, Stopped, import_gradio

__all__ = ["DemoModel", "Frame", "Stopped", "import_gradio", "main", "parse_args", "serve"]
