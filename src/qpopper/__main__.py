"""`python -m qpopper` runs the daemon's command line."""

import sys

from .daemon.cli import main

sys.exit(main())
