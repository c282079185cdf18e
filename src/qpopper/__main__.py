"""`python -m qpopper` runs the daemon's command line."""

import sys

from .cli import main

sys.exit(main())
