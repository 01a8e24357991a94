"""Test driver, run in the server environment by test_server.py: ``cleandift-rt serve`` itself (same
arguments, same code), except that the engine it opens fails on demand: a batch holding an image that
is magenta all over (255, 0, 255) makes ``extract`` raise, the way a crashed device or runtime does.

    python serve_driver.py --engine FILE --size 64 --http-port P --grpc-port P --metrics-port P ...
"""

from __future__ import annotations

import sys

import numpy as np

from cleandift_rt.cli import serve as serve_command
from cleandift_rt.cli.main import main

FAILURE = "engine failed: device lost (simulated by the test driver)"
TRIGGER = np.array([255, 0, 255], np.uint8)  # no photo or noise image of the tests is magenta all over


class FailsOnTrigger:
    """An Engine whose ``extract`` raises on a batch holding a uint8 image of ``TRIGGER`` pixels only."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def extract(self, images, taps=None):
        if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[-1] == 3:
            if (images == TRIGGER).reshape(len(images), -1).all(axis=1).any():
                raise RuntimeError(FAILURE)
        return self._engine.extract(images, taps=taps)


def open_failing_engine(args, _open=serve_command.open_engine):
    return FailsOnTrigger(_open(args))


if __name__ == "__main__":
    serve_command.open_engine = open_failing_engine
    sys.exit(main(["serve", *sys.argv[1:]]))
