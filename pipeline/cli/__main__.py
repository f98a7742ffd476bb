"""`python -m pipeline.cli ...` (and `torchrun -m pipeline.cli pretrain ...`) run the `kiln` command."""

import sys

from pipeline.cli import main

if __name__ == "__main__":  # not when a spawned child process (kiln serve's trace writer) imports it
    sys.exit(main())
