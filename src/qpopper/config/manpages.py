"""Manual pages generated from the settings registry, so they cannot drift.

    python -m qpopper.config.manpages docs/man     # writes qpopper.8, qpopper.conf.5, popauth.8

A test compares the committed pages with what this module generates.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .._version import __version__
from .commandline import FLAGS, option_settings
from .settings import SETTINGS, Restriction

_DATE = "2026-11-27"


def _esc(text: str) -> str:
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in out.split("\n"))


def _header(name: str, section: str, title: str) -> list[str]:
    return [
        f'.TH {name.upper()} {section} "{_DATE}" "qpopper {__version__}" "{title}"',
        ".SH NAME",
        f"{_esc(name)} \\- {_esc(title)}",
    ]


def qpopper_8() -> str:
    lines = _header("qpopper", "8", "POP3 server compatible with qpopper 4.1")
    lines += [
        ".SH SYNOPSIS",
        ".B qpopper",
        "[\\fIswitches\\fR] [\\fB\\-\\-\\fIsetting\\fB=\\fIvalue\\fR ...] [[\\fIaddress\\fR][:\\fIport\\fR] ...]",
        ".br",
        ".B qpopper \\-i",
        "[\\fIswitches\\fR]",
        ".SH DESCRIPTION",
        "A POP3 server (RFC 1939, 2449, 2595, 3206, 5034) for Unix mbox spools and Maildirs.",
        "It takes qpopper's switches and configuration file (see \\fBqpopper.conf\\fR(5)).",
        "Each positional \\fIaddress\\fR:\\fIport\\fR is a listener (IPv6 addresses in brackets);",
        "without one the server listens on every address, port 110.",
        "With \\fB\\-i\\fR it serves one session on standard input and output, as inetd runs it;",
        "sockets passed by systemd (LISTEN_FDS) are used instead of binding.",
        ".SH SWITCHES",
    ]
    switches = sorted((s for s in SETTINGS if s.switch), key=lambda s: (s.switch or "").lower() + (s.switch or ""))
    extra = [(", ".join(f.switches), f.arg or "", f.help) for f in FLAGS if f.switches]
    entries = [
        (
            s.switch or "",
            s.value_word(),
            f"{s.help} ({s.name})" + (f"; accepted, no effect: {s.ignored}" if s.ignored else ""),
        )
        for s in switches
        if s in option_settings()
    ]
    for flag, arg, text in sorted(entries + extra, key=lambda e: (e[0].lower(), e[0])):
        lines += [".TP", f"\\fB{_esc(flag)}\\fR" + (f" \\fI{_esc(arg)}\\fR" if arg else ""), _esc(text)]
    lines.append(".SH OPTIONS OF THIS SERVER")
    for f in FLAGS:
        if f.long and not f.switches:
            lines += [
                ".TP",
                f"\\fB{_esc('--' + f.long)}\\fR" + (f"=\\fI{_esc(f.arg)}\\fR" if f.arg else ""),
                _esc(f.help),
            ]
    lines += [
        ".TP",
        "\\fB\\-\\-\\fIsetting\\fB=\\fIvalue\\fR, \\fB\\-\\-\\fIsetting\\fR, \\fB\\-\\-no\\-\\fIsetting\\fR",
        "any setting of \\fBqpopper.conf\\fR(5) by its name; Booleans without a value.",
        ".SH SIGNALS",
        ".TP",
        "\\fBSIGTERM\\fR",
        "stop accepting; sessions already in UPDATE finish their commit, others close without deleting anything",
        ".TP",
        "\\fBSIGINT\\fR",
        "stop at once (nothing is deleted for sessions not yet in UPDATE)",
        ".TP",
        "\\fBSIGHUP\\fR",
        "re-read the configuration files, the user and APOP databases and the TLS certificate, for new sessions",
        ".SH EXIT STATUS",
        "0 after a clean stop; 2 for a usage or configuration error (the message names the switch or file:line);",
        "1 for other fatal errors.",
        ".SH SEE ALSO",
        "\\fBqpopper.conf\\fR(5), \\fBpopauth\\fR(8)",
    ]
    return "\n".join(lines) + "\n"


def qpopper_conf_5() -> str:
    lines = _header("qpopper.conf", "5", "qpopper configuration file")
    lines += [
        ".SH SYNOPSIS",
        "\\fBset\\fR \\fIoption\\fR [= \\fIvalue\\fR] [# \\fIcomment\\fR]",
        ".br",
        "\\fBreset\\fR \\fIoption\\fR [# \\fIcomment\\fR]",
        ".SH DESCRIPTION",
        "Read with \\fBqpopper \\-f\\fR \\fIfile\\fR, and after login from \\fI~/.qpopper\\-options\\fR (with \\-u)",
        "and \\fI<spool\\-dir>/.<user>.qpopper\\-options\\fR (with \\-U; read second, so it wins).",
        "Option names are case\\-insensitive. A Boolean given alone is true; \\fBreset\\fR makes it false;",
        "values true, false, 1, 0. Numbers may be written in hex (0x1F) or octal (017).",
        "Strings may be quoted with \\(dq, \\(aq or \\(ga, a backslash escaping the quote.",
        "\\fBset config\\-file = \\fIpath\\fR reads another file at that point.",
        ".PP",
        "Unlike qpopper, a last line without a newline is accepted, and an error at start\\-up names",
        "file:line and stops the server instead of skipping the rest of the file. In the user option files",
        "a restricted option (marked below) is refused with a log line and the rest of the file still applies.",
        ".SH OPTIONS",
    ]
    for setting in sorted(SETTINGS, key=lambda s: s.name.lower()):
        word = setting.value_word()
        head = f"\\fB{_esc(setting.name)}\\fR" + (f" = \\fI{_esc(word)}\\fR" if word else "")
        notes = [f"default: {setting.describe_default()}"]
        if setting.switch:
            notes.append(f"switch {setting.switch}")
        if setting.restriction is Restriction.USER:
            notes.append("restricted: not in user option files")
        elif setting.restriction is Restriction.INIT:
            notes.append("start-up only: not in user option files")
        if not setting.qpopper:
            notes.append("not in qpopper 4.1")
        text = setting.help + " (" + "; ".join(notes) + ")."
        if setting.ignored:
            text += f" Accepted and ignored: {setting.ignored}."
        lines += [".TP", head, _esc(text)]
    lines += [".SH SEE ALSO", "\\fBqpopper\\fR(8), \\fBpopauth\\fR(8)"]
    return "\n".join(lines) + "\n"


def popauth_8() -> str:
    lines = _header("popauth", "8", "manage the APOP database")
    lines += [
        ".SH SYNOPSIS",
        ".B popauth",
        "[\\-file \\fIpath\\fR] \\-init [\\-force] | \\-list [\\fIuser\\fR] | \\-user \\fIname\\fR [\\fIsecret\\fR] |",
        "\\-delete \\fIname\\fR | [\\fIsecret\\fR]",
        ".SH DESCRIPTION",
        "Keeps the shared secrets for APOP, CRAM\\-MD5 and SCRAM in \\fI/etc/qpopper/pop.auth\\fR",
        "(setting \\fBapop\\-file\\fR), one \\fIuser\\fR:{PLAIN}\\fIsecret\\fR line each, mode 0600.",
        "Changes are written to a new file and renamed over the old one under a lock.",
        "root manages every entry; other users may only set their own secret.",
        "Without a secret on the command line it is asked twice "
        "(or read from standard input when that is not a terminal).",
        "Under the default clear\\-text policy users listed here cannot log in with USER/PASS.",
        ".SH EXIT STATUS",
        "0 done; 1 refused or failed, with the reason; 2 usage error.",
        ".SH SEE ALSO",
        "\\fBqpopper\\fR(8), \\fBqpopper.conf\\fR(5)",
    ]
    return "\n".join(lines) + "\n"


PAGES = {"qpopper.8": qpopper_8, "qpopper.conf.5": qpopper_conf_5, "popauth.8": popauth_8}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    target = args[0] if args else os.path.join("docs", "man")
    os.makedirs(target, exist_ok=True)
    for name, render in PAGES.items():
        with open(os.path.join(target, name), "w", encoding="utf-8") as f:
            f.write(render())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
