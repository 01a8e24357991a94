"""diffusers and transformers, imported with the model hub switched off.

Every model in cleandift-rt comes from the user's disk: with ``HF_HUB_OFFLINE=1`` set before the
import, a path that is not a local folder fails at once instead of waiting on the network.
"""

from __future__ import annotations

import os


def diffusers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers as module

    return module


def transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers as module

    return module
