"""``python -m cleandift_rt.cli``: the same as the ``cleandift-rt`` command."""

import sys

from .main import main

sys.exit(main())
