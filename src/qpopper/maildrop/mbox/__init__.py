"""mbox spools: qpopper's server mode and temp-drop mode behind the Maildrop interface.

The parts, each in its module:

* `maildrop` — `MboxMaildrop`: the session's view (listing, RETR, UPDATE);
* `spool` — the spool file, its locks, and server mode (served in place);
* `tempdrop` — temp-drop mode (served from a copy, the spool left to new mail);
* `journal` and `recovery` — the journals of temp-drop mode's two-file
  steps, and the next login's finishing or undoing of a killed session;
* `update` — the planner and writer of a replacement spool;
* `paths` — the names of the files kept around a spool;
* `append` — delivering a message into a spool, as MDAs do.

Importing this package loads the session's modules (not `append`).
"""

from .maildrop import MboxMaildrop
from .paths import (
    gather_journal_path,
    new_spool_path,
    putback_flag_path,
    session_lock_path,
    temp_drop_path,
)
from .spool import QUICK_SPOOL_BYTES

__all__ = [
    "QUICK_SPOOL_BYTES",
    "MboxMaildrop",
    "gather_journal_path",
    "new_spool_path",
    "putback_flag_path",
    "session_lock_path",
    "temp_drop_path",
]
