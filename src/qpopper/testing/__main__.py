"""python -m qpopper.testing: the standalone test server (see standalone.py)."""

from .standalone import main

raise SystemExit(main())
