"""Run ``cleandift-rt extract`` in this process and SIGKILL it at one chosen moment (kill-and-resume tests).

    python extract_kill_driver.py ENGINE IMAGES OUT FORMAT KIND N

KIND: none (run to the end), output (half-way through writing the N-th per-image output file),
shard (half-way through writing the N-th shard file), record (just before the N-th manifest
record: its outputs in place, unrecorded), manifest (the N-th manifest record cut short),
batch (right after the N-th record: between batches), trim (during the resume's rewrite of a
cut-short manifest). Counts are of this process only.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    engine, images, out, fmt, kind, n = sys.argv[1:7]
    n = int(n)
    import safetensors.numpy
    import torch

    torch.set_num_threads(1)
    from cleandift_rt.cli.main import main as cli
    from cleandift_rt.extraction import manifest as manifest_module

    counts = {"output": 0, "shard": 0, "append": 0}
    real_save, real_append, real_atomic = (safetensors.numpy.save_file, manifest_module.Manifest.append,
                                           manifest_module.atomic_write_bytes)

    def save_then_cut(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        what = "shard" if Path(filename).name.startswith(".shard-") else "output"
        counts[what] += 1
        if kind == what and counts[what] == n:
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            die()

    def append(self, record):
        counts["append"] += 1
        if counts["append"] == n:
            if kind == "record":
                die()
            if kind == "manifest":
                line = manifest_module._line(record)
                with open(self.path, "ab") as f:
                    f.write(line[: len(line) // 2])
                die()
        real_append(self, record)
        if kind == "batch" and counts["append"] == n:
            die()

    def trim_and_die(path, write):
        if kind == "trim":
            path = Path(path)  # what a killed rewrite leaves: its temporary, the manifest itself intact
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            write(tmp)
            die()
        real_atomic(path, write)

    safetensors.numpy.save_file = save_then_cut
    manifest_module.Manifest.append = append
    manifest_module.atomic_write_bytes = trim_and_die
    return cli(["extract", images, "--engine", engine, "--size", "64", "64", "--out", out, "--format", fmt,
                "--batch-size", "2", "--shard-images", "3", "--workers", "2", "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
