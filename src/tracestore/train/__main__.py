"""`python -m tracestore.train ...` and `torchrun --nproc_per_node=N -m tracestore.train ...`."""

import sys

from .trainer import main

if __name__ == "__main__":
    sys.exit(main())
