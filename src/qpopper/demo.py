"""The embedded default: a demo user and a small Maildir under the working
tree, so that one command gives a server anyone can talk to without root
and without touching the system."""

from __future__ import annotations

import os
import time

DEMO_DIR = "qpopper-demo"
DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
DEMO_PORT = 1110

_MESSAGES = [
    (
        "Welcome to qpopper",
        "This maildrop was made by `qpopper --demo`.\n"
        "Fetch it with curl, poplib, fetchmail or any mail client.\n",
    ),
    (
        "Dot-stuffing example",
        "The next line is a single dot, which POP3 must send as two:\n.\n"
        ".and this line starts with a dot.\n",
    ),
    (
        "A line that starts with From",
        "From here on, this body line begins with 'From ' and needs no quoting in a Maildir.\n",
    ),
]


def prepare(base: str | None = None) -> tuple[str, str]:
    """Create (once) the demo tree; returns (passwd-file, mail location)."""
    root = os.path.abspath(base or DEMO_DIR)
    maildir = os.path.join(root, "mail", DEMO_USER, "Maildir")
    passwd = os.path.join(root, "passwd")
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
    if not os.path.exists(passwd):
        with open(passwd, "w", encoding="utf-8") as f:
            f.write(f"{DEMO_USER}:{{PLAIN}}{DEMO_PASSWORD}::::{os.path.join(root, 'mail', DEMO_USER)}::\n")
    if not os.listdir(os.path.join(maildir, "new")) and not os.listdir(os.path.join(maildir, "cur")):
        now = int(time.time())
        for number, (subject, body) in enumerate(_MESSAGES, 1):
            message = (
                f"From: Qpopper Demo <demo@localhost>\n"
                f"To: {DEMO_USER}@localhost\n"
                f"Subject: {subject}\n"
                f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime(now))}\n"
                f"Message-ID: <demo-{number}-{now}@localhost>\n"
                f"\n{body}"
            ).encode("utf-8")
            name = f"{now}.M{number}P{os.getpid()}.demo"
            tmp = os.path.join(maildir, "tmp", name)
            with open(tmp, "wb") as f:
                f.write(message)
            os.rename(tmp, os.path.join(maildir, "new", name))
    return passwd, "maildir:~/Maildir"


def banner(host: str, port: int) -> str:
    return (
        f"qpopper demo server on {host}:{port}  (user {DEMO_USER!r}, password {DEMO_PASSWORD!r})\n"
        f"  list:      curl pop3://{DEMO_USER}:{DEMO_PASSWORD}@{host}:{port}/\n"
        f"  message 1: curl pop3://{DEMO_USER}:{DEMO_PASSWORD}@{host}:{port}/1\n"
        f"  by hand:   telnet {host} {port}   (USER {DEMO_USER} / PASS {DEMO_PASSWORD} / LIST / RETR 1 / QUIT)\n"
        f"Stop with Ctrl-C. Mail lives in ./{DEMO_DIR}/."
    )
