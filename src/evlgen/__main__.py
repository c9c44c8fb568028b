"""`python -m evlgen` (what `torchrun -m evlgen` runs)."""

import sys

from evlgen.cli import main

sys.exit(main())
