"""Multi-process training: 2 CPU processes (torchrun, gloo DDP) train recipes/tiny.yaml exactly like one process
with the same global batch through gradient accumulation; the shipped Accelerate configs parse.

Row r of a step gets the same example and the same noise whatever process and micro-batch it lands in, and the
loss is normalised per optimizer step, so `batch_size: 8` × 2 processes and `batch_size: 8, grad_accum: 2` in
one process compute the same update. Measured: the adapters and every validation loss are bitwise equal; the
stated tolerance (float rounding of the gradient all-reduce) is rtol 1e-5, atol 1e-7 on the weights and
1e-6 relative on the losses.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lad.finetune import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")
SAME = ["max_steps=6", "eval_every=2", "save_every=0"]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


BLOCK_CAUSAL = ["attention=block_causal", "block_size=4", "shift=true", "noise.objective=mask",
                "noise.complementary=true", "distill_weight=0.5"]  # the one-pass layout, with the parent's KL


@pytest.fixture(scope="module", params=[[], BLOCK_CAUSAL], ids=["default", "block_causal"])
def runs(tmp_path_factory, request) -> tuple[Path, Path]:
    if TORCHRUN is None or not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torchrun / gloo not available")
    root = tmp_path_factory.mktemp("ddp")
    two, one = root / "two", root / "one"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                             "--master_port", str(free_port()), "lad/finetune.py", TINY, "batch_size=8", *SAME,
                             *request.param, f"output_dir={two}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "on 2 processes" in result.stderr  # it really was two processes
    assert main([TINY, "batch_size=8", "grad_accum=2", *SAME, *request.param, f"output_dir={one}"]) == 0
    return two, one


def test_two_processes_equal_one_process_with_grad_accum(runs):
    two, one = runs
    log = metrics(two)
    # the logged training loss and token count cover both processes' rows: the 16-row numbers of one process
    for key in ("loss", "acc", "tokens"):
        assert [m[key] for m in log if "loss" in m] == \
            pytest.approx([m[key] for m in metrics(one) if "loss" in m], rel=1e-6), key
    val_two = [(m["step"], m["val_loss"], m["val_acc"]) for m in log if "val_loss" in m]
    val_one = [(m["step"], m["val_loss"], m["val_acc"]) for m in metrics(one) if "val_loss" in m]
    assert [s for s, _, _ in val_two] == [0, 2, 4, 6] == [s for s, _, _ in val_one]
    for (_, loss_2, acc_2), (_, loss_1, acc_1) in zip(val_two, val_one):
        assert loss_2 == pytest.approx(loss_1, rel=1e-6) and acc_2 == pytest.approx(acc_1, rel=1e-6)
    assert val_two[-1][1] < val_two[0][1]  # and it learned
    a, b = load_file(str(two / "adapter_model.safetensors")), load_file(str(one / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert any(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k)  # the weights moved
    info = json.loads((two / "lad.json").read_text(encoding="utf-8"))
    assert info["step"] == 6


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_accelerate_configs_parse(name, kind, monkeypatch):
    """What `accelerate launch --config_file recipes/accelerate/NAME.yaml` reads and turns into its plugin."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = REPO / "recipes" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.name == kind and config.num_machines == 1 and config.mixed_precision == "no"
    args = launch_command_parser().parse_args(["--config_file", str(path), "lad/finetune.py", TINY])
    args = _validate_launch_command(args)[0]
    assert args.num_processes == config.num_processes and (args.use_fsdp if kind == "FSDP" else args.multi_gpu)
    if kind == "FSDP":
        from accelerate import FullyShardedDataParallelPlugin

        for key, value in prepare_multi_gpu_env(args).items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"
