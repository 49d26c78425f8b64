"""``python -m spielft.cli`` (what torchrun / accelerate launch can run)."""

import sys

from . import main

sys.exit(main())
