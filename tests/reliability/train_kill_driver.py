"""Run the tiny training and SIGKILL it at one chosen moment (kill-and-resume tests).

    python train_kill_driver.py BASE DATA OUT KIND STEP [--resume]     one run in this process
    python train_kill_driver.py --serve                                 a fork server (below)

The fork server imports torch, diffusers and cleandift_rt once, then reads one JSON request per
line ({"args": [BASE, DATA, OUT, KIND, STEP, "--resume"]}) and answers {"returncode": ...}: each run
is a fork of the server, so a kill costs no interpreter start. Forking is safe here because the
server never runs a torch operation (no OpenMP pool exists yet) and every run is forked from the
same untouched state, so runs are as independent and as deterministic as fresh processes.

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


def run(argv: list[str]) -> None:
    base, data, out, kind, step = argv[:5]
    step, resume = int(step), "--resume" in argv
    import safetensors.torch
    import torch

    torch.set_num_threads(1)
    from cleandift_rt.runs import checkpoints
    from cleandift_rt.training import Trainer, build_config

    config = build_config(overrides=dict(steps=6, batch_size=1, grad_accum=1, size=64, validate_every=0,
                                         checkpoint_every=2, keep_checkpoints=2, lr=1e-4, warmup_steps=2))
    real_save, real_write, real_atomic = (safetensors.torch.save_file, checkpoints.write_safetensors,
                                          checkpoints.atomic_write_bytes)

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
    checkpoints.write_safetensors = write_then_die  # what write_rotating_checkpoint calls before pruning
    checkpoints.atomic_write_bytes = trim_and_die  # what checkpoints.trim_jsonl (the resume's log rewrite) calls
    trainer = Trainer(config, base, data, out, resume=True if resume else None, progress=False, on_step=on_step,
                      log=lambda msg: None)
    trainer.run()


def serve() -> None:
    import json

    import diffusers
    import safetensors.torch  # noqa: F401  (imported once, before any fork)
    import torch  # noqa: F401
    import transformers

    from cleandift_rt.training import Trainer  # noqa: F401

    # diffusers and transformers import their classes lazily, on first attribute access: resolve
    # them here, or every forked run pays the imports again
    for name in ("UNet2DConditionModel", "AutoencoderKL", "DDPMScheduler", "DDIMScheduler"):
        getattr(diffusers, name)
    for name in ("CLIPTextModel", "CLIPTokenizer", "AutoTokenizer"):
        getattr(transformers, name)

    for line in sys.stdin:
        argv = json.loads(line)["args"]
        pid = os.fork()
        if pid == 0:  # the run: exits 0, or is killed by its own hook
            code = 0
            try:
                run(argv)
            except BaseException as exc:  # noqa: BLE001  (reported to the test as a failed run)
                sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": code}), flush=True)


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else run(sys.argv[1:])
