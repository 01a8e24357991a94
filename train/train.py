"""Train a CleanDIFT student: ``python train/train.py --base DIR --data DIR --out DIR --steps N --batch-size B``.

The same as ``cleandift-rt train`` (flags in ``cleandift_rt.cli.train``, the training itself in
``cleandift_rt.training``). See docs/training.md.
"""

import sys

from cleandift_rt.cli.train import entry

if __name__ == "__main__":
    sys.exit(entry())
