"""`python -m pipeline.serve ...` is `kiln serve ...`."""

import sys

from pipeline.cli import main

raise SystemExit(main(["serve", *sys.argv[1:]]))
