"""``python -m pitome.cli`` (e.g. under torchrun) is ``pitome``."""

import sys

from . import main

sys.exit(main())
