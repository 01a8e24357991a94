"""A Ray worker setup hook for tests/distributed/test_distributed.py: arms one actor death.

Every Ray worker process runs ``setup()`` at start. While the file named by
``CLEANDIFT_TEST_KILL_ARM`` exists, the second ``Engine.extract`` call of a process deletes it and
ends that process at once (``os._exit``: an actor death, which Ray Data retries; an exception
raised by the batch function it would not). The replacement actor finds no file and lives.
"""

from __future__ import annotations

import os


def setup() -> None:
    arm = os.environ.get("CLEANDIFT_TEST_KILL_ARM")
    if not arm:
        return
    from cleandift_rt.runtime import engine

    real = engine.Engine.extract
    calls = [0]

    def extract(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2 and os.path.exists(arm):
            os.unlink(arm)
            os._exit(1)
        return real(self, *args, **kwargs)

    engine.Engine.extract = extract
