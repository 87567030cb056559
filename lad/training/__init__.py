"""The parts of LAD's training recipe (lad/finetune.py reads them top to bottom):

    data.py      examples, batches and which examples each step reads (`Schedule`), seeds
    build.py     base model + mask token, trainable parameters, optimizer, LR schedule
    step.py      `train_step`: one optimizer step (corruption, annealing, loss, backward, update)
    validate.py  validation under fixed noise; the best weights so far
    state.py     `Run` (what setup built) and `TrainState` (what a checkpoint carries); checkpoints
    metrics.py   metrics.jsonl and the trackers
"""
