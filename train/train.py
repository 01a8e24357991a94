"""Train a CleanDIFT student: ``python train/train.py --base DIR --data DIR --out DIR --steps N --batch-size B``.

See docs/training.md. All logic lives in ``cleandift_rt.training``.
"""

import sys

from cleandift_rt.cli.train import entry

if __name__ == "__main__":
    sys.exit(entry())
