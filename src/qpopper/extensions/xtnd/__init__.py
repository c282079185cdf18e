"""qpopper's XTND XMIT and XLST, EUIDL and MDEF, in two halves.

`commands` is the protocol half: the command handlers the core's command
table names. `execute` is the server's half: reading header lines from
stored messages and handing XMIT messages to the mail system. The server's
names are re-exported here but loaded on first use, because `execute`
runs sendmail (subprocess, and with it threading) and logs, and the
protocol core that imports `commands` must load neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .execute import (
        EUIDL_VALUE_MAX,
        EX_TEMPFAIL,
        HEADER_READ_MAX,
        SENDMAIL_TIMEOUT,
        euidl_value,
        find_header,
        header_lines,
        submit,
        xlst_lines,
    )

__all__ = [
    "EUIDL_VALUE_MAX",
    "EX_TEMPFAIL",
    "HEADER_READ_MAX",
    "SENDMAIL_TIMEOUT",
    "euidl_value",
    "find_header",
    "header_lines",
    "submit",
    "xlst_lines",
]
_EXECUTE_NAMES = frozenset(__all__)


def __getattr__(name: str) -> Any:
    if name not in _EXECUTE_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".execute", __name__), name)
    globals()[name] = value
    return value

