"""Runs: what every long run shares, whatever it trains or measures.

Owns the resumable run loop that the student trainer, GATE, the aggregator and the probes supply
steps to (``loop.ResumableRun``: resume, the objective check, ``metrics.jsonl`` trimming, progress,
validation and checkpoint cadence), the training checkpoints under it (``checkpoints``: rotating
``step-*.safetensors`` files, optimiser and RNG state, the metrics trim) and the skip log of what a
run left out and why (``skips.SkipLog``: evaluation, training, probes, GATE, the aggregator). It may
import only the top-level shared modules (``checkpoint.py``'s file I/O), torch and tqdm.
"""

from .checkpoints import list_checkpoints
from .loop import ResumableRun
from .skips import SkipLog

__all__ = ["ResumableRun", "SkipLog", "list_checkpoints"]
