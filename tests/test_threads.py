"""A CPU training process started by `accelerate launch` uses the cores it was given (lad/training/threads.py)."""

import logging

import torch

from lad.training.threads import training_threads, use_training_threads

LAUNCHED = {"ACCELERATE_USE_CPU": "False", "OMP_NUM_THREADS": "1"}  # what accelerate exports without use_cpu


def test_an_accelerate_launch_that_pinned_a_cpu_run_to_one_thread_gets_the_cores_back():
    assert training_threads(LAUNCHED, cuda=False, cores=2) == 2
    assert training_threads(LAUNCHED | {"LOCAL_WORLD_SIZE": "2"}, cuda=False, cores=8) == 4  # shared by processes
    assert training_threads(LAUNCHED | {"LOCAL_WORLD_SIZE": "2"}, cuda=False, cores=2) is None  # one core each


def test_every_other_start_keeps_its_threads():
    assert training_threads({}, cuda=False, cores=2) is None  # lad-finetune: OMP_NUM_THREADS is the user's
    assert training_threads({"OMP_NUM_THREADS": "1"}, cuda=False, cores=2) is None
    assert training_threads(LAUNCHED | {"OMP_NUM_THREADS": "3"}, cuda=False, cores=8) is None  # named threads
    assert training_threads(LAUNCHED | {"ACCELERATE_USE_CPU": "True"}, cuda=False, cores=8) is None  # its policy
    assert training_threads(LAUNCHED, cuda=True, cores=8) is None  # a GPU trains
    assert training_threads(LAUNCHED, cuda=False, cores=1) is None


def test_the_threads_are_applied_and_said_once(monkeypatch, caplog):
    before = torch.get_num_threads()
    monkeypatch.setattr("lad.training.threads.training_threads", lambda: 1 if before != 1 else 2)
    try:
        with caplog.at_level(logging.INFO, logger="lad.test"):
            use_training_threads(logging.getLogger("lad.test"))
        assert torch.get_num_threads() == (1 if before != 1 else 2)
        assert [r.message for r in caplog.records if "CPU training" in r.message]
    finally:
        torch.set_num_threads(before)
