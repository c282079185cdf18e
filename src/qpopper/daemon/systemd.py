"""systemd integration without libsystemd: socket activation and sd_notify."""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


# FileDescriptorName= values that mark a socket as implicit TLS (port 995).
TLS_FD_NAMES = frozenset({"pop3s", "tls", "implicit-tls"})


def listen_fds(unset: bool = True) -> list[tuple[socket.socket, bool]]:
    """Sockets passed by systemd (LISTEN_FDS), each with whether it is an
    implicit-TLS socket (by its FileDescriptorName)."""
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not pid or not count or not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    sockets = []
    for i, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))):
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) else ""
        sockets.append((socket.socket(fileno=fd), name.lower() in TLS_FD_NAMES))
    return sockets


def notify(state: str) -> bool:
    """Send a state line ("READY=1", "STOPPING=1") to the service manager."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True
