"""Run the tiny training in this process and SIGKILL it at one chosen moment (kill-and-resume tests).

    python train_kill_driver.py BASE DATA OUT KIND STEP [--resume]

KIND: none (run to the end), step (after optimiser step STEP), ckpt (half-way through writing the
checkpoint of step STEP), rename (the checkpoint of step STEP in place, older ones not yet pruned),
log (a metrics line cut short after step STEP), trim (during the resume's rewrite of the log).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    base, data, out, kind, step = sys.argv[1:6]
    step, resume = int(step), "--resume" in sys.argv
    import safetensors.torch
    import torch

    torch.set_num_threads(1)
    from cleandift_rt.training import Trainer, build_config
    from cleandift_rt.training import trainer as trainer_module

    config = build_config(overrides=dict(steps=10, batch_size=1, grad_accum=1, size=64, validate_every=0,
                                         checkpoint_every=2, keep_checkpoints=2, lr=1e-4, warmup_steps=2))
    real_save, real_write, real_atomic = (safetensors.torch.save_file, trainer_module.write_safetensors,
                                          trainer_module.atomic_write_bytes)

    def save_then_cut(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        if kind == "ckpt" and Path(filename).name.startswith(f".step-{step:07d}"):
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            die()

    def write_then_die(path, tensors, metadata=None):
        real_write(path, tensors, metadata)
        if kind == "rename" and Path(path).name == f"step-{step:07d}.safetensors":
            die()

    def trim_and_die(path, write):
        if kind == "trim" and Path(path).name == "metrics.jsonl":
            path = Path(path)  # what a killed rewrite leaves: its temporary, the log itself intact
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            write(tmp)
            die()
        real_atomic(path, write)

    def on_step(n, record):
        if kind == "step" and n == step:
            die()
        if kind == "log" and n == step:
            with open(Path(out) / "metrics.jsonl", "a") as f:
                f.write('{"step": %d, "loss": 0.12' % (n + 1))
            die()

    safetensors.torch.save_file = save_then_cut
    trainer_module.write_safetensors = write_then_die
    trainer_module.atomic_write_bytes = trim_and_die
    trainer = Trainer(config, base, data, out, resume=True if resume else None, progress=False, on_step=on_step,
                      log=lambda msg: None)
    trainer.run()


if __name__ == "__main__":
    main()
