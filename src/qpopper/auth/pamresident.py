"""PAM's libraries and modules kept loaded in the long-lived parent.

In system-users mode every session is a fresh process forked from the
parent, and it runs the whole PAM transaction itself. Left alone, each one
would first have python-pam look libpam up (ctypes' find_library runs
`ldconfig -p` twice, two extra processes per login) and then have
pam_start dlopen every module of the service and the libraries they pull
in (pam_unix, libcrypt, the `other` service's session modules, libselinux,
libaudit...): relocation and page faults, per login, for code that never
changes. Loaded once in the parent, a forked child inherits all of it
mapped, and its own pam_start finds each module already there.

What is kept is a PAM handle that was started and never used: no user
was ever authenticated with it, and no module function has run. The
child still starts its own transaction (the service file is read again
each time, so an edit takes effect at the next login, as before); only the
loading is shared. SIGHUP (`reload`) starts a new handle, so modules
upgraded on disk are picked up then.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("qpopper.auth")

# The conversation of the resident handle: never called (no stage runs on
# it), and it would refuse if it were.
_CONV_FUNC = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
)
_PAM_CONV_ERR = 19


class _PamConv(ctypes.Structure):
    _fields_ = [("conv", _CONV_FUNC), ("appdata_ptr", ctypes.c_void_p)]


def _refuse(_n: int, _msgs: int | None, _resp: int | None, _data: int | None) -> int:
    return _PAM_CONV_ERR


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


class ResidentPam:
    """A started, unused PAM handle for `service`, held until `close`."""

    def __init__(self, service: str, libpam: str = "libpam.so.0") -> None:
        self.service = service
        self._lib = ctypes.CDLL(libpam)
        self._lib.pam_start.restype = ctypes.c_int
        self._lib.pam_start.argtypes = [
            ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_PamConv), ctypes.POINTER(ctypes.c_void_p)
        ]
        self._lib.pam_end.restype = ctypes.c_int
        self._lib.pam_end.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self._callback = _CONV_FUNC(_refuse)  # referenced here: libpam keeps a pointer to it
        self._conv = _PamConv(self._callback, None)
        self._handle: ctypes.c_void_p | None = None

    def open(self) -> bool:
        """Start the handle (loading the service's modules); False, logged, if PAM refused."""
        self.close()
        before = _thread_count()
        handle = ctypes.c_void_p()
        # No user: pam_start accepts NULL and nothing is asked of anyone.
        rc = self._lib.pam_start(self.service.encode(), None, ctypes.byref(self._conv), ctypes.byref(handle))
        if rc != 0 or not handle.value:
            log.warning("PAM service %s: pam_start failed (%d); each session loads PAM itself", self.service, rc)
            return False
        self._handle = handle
        if _thread_count() > before:
            # The parent forks a session per connection and should stay single-threaded;
            # unloading now could pull the code from under that thread, so it is only said.
            log.warning("PAM service %s: a module started a thread while loading", self.service)
        return True

    @property
    def is_open(self) -> bool:
        return self._handle is not None

    def close(self) -> None:
        if self._handle is not None:
            self._lib.pam_end(self._handle, 0)
            self._handle = None
