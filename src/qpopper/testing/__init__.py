"""A POP3 test server for the developers of mail clients.

`TestServer` runs the real server over an in-memory store: create users,
deliver mail, run the client under test, then read back what it retrieved
and deleted, the session transcript, and make the server misbehave on
purpose with scripted `Fault`s. The pytest plugin (`qpopper.testing.plugin`,
loaded by the pytest11 entry point) gives it as fixtures named `pop3_*`;
`python -m qpopper.testing` serves it to clients in any language with an
HTTP JSON API (see docs/testing.md).

The names are imported on first use: pytest loads the plugin, and so this
package, in every run of every project that has qpopper installed, and a
run that uses no fixture of it should not pay for the server's import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._faults import FAULT_KINDS, Fault, FaultPlan
    from ._server import TestServer, TlsMode
    from ._store import MailboxState

_LAZY = {
    "FAULT_KINDS": "._faults",
    "Fault": "._faults",
    "FaultPlan": "._faults",
    "TestServer": "._server",
    "TlsMode": "._server",
    "MailboxState": "._store",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["FAULT_KINDS", "Fault", "FaultPlan", "MailboxState", "TestServer", "TlsMode"]
