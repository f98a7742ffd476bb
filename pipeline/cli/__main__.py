"""`python -m pipeline.cli ...` (and `torchrun -m pipeline.cli pretrain ...`) run the `kiln` command."""

import sys

from pipeline.cli import main

sys.exit(main())
