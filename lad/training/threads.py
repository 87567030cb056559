"""CPU threads of a training process: every core it was given, unless its launcher was told otherwise.

`accelerate launch` exports OMP_NUM_THREADS=1 to the script unless the launch names a thread count
(`--num_cpu_threads_per_process`) or sets `use_cpu`, in which case accelerate's own CPU policy shares the cores
among the processes. LAD's one-process config (recipes/accelerate/single.yaml) serves GPU and CPU machines alike,
so it cannot set `use_cpu`, and on a CPU-only machine the README's launch command trained on one core: the
one-hour SmolLM2 recipe took 17-25 s a step on the 2-core machine instead of about 10. LAD applies accelerate's CPU
policy itself in exactly that case; a process started any other way (`lad-finetune`, a launch that named its
threads, a GPU) keeps the threads it was given.
"""

from __future__ import annotations

import os


def available_cores() -> int | None:
    """The CPUs this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def training_threads(environ=None, cuda: bool | None = None, cores: int | None = None) -> int | None:
    """Torch threads for this training process, or None to keep what it has: the cores available to it divided
    among the machine's processes, when `accelerate launch` (not told `use_cpu`) pinned a CPU-only run to one."""
    environ = os.environ if environ is None else environ
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    launched_without_cpu_policy = environ.get("ACCELERATE_USE_CPU", "").lower() == "false"
    if cuda or not launched_without_cpu_policy or environ.get("OMP_NUM_THREADS") != "1":
        return None
    cores = available_cores() if cores is None else cores
    share = (cores or 1) // max(int(environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return share if share > 1 else None


def use_training_threads(log) -> None:
    """Apply `training_threads` to torch, saying so in one log line."""
    threads = training_threads()
    if threads:
        import torch

        torch.set_num_threads(threads)
        log.info("CPU training: %d threads (accelerate launch had set OMP_NUM_THREADS=1; start with lad-finetune "
                 "to choose the threads yourself)", threads)
