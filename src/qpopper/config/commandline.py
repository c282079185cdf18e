"""The command line as the registry defines it: getopt's option strings,
the usage line and `--help`, all written from the settings table.

Every setting is an option by its name (`--timeout=600`; Booleans as
`--debug` / `--no-debug`), and by its qpopper switch where it has one
(`-T 600`). The few options that are not settings (modes such as `-i`,
actions such as `--show-config`) are the `FLAGS` below; daemon/cli.py acts
on them and the qpopper(8) page documents them from the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import SETTINGS, Kind, Setting

WIDTH = 100


@dataclass(frozen=True, slots=True)
class Flag:
    """A command-line option that is a mode or an action, not a setting."""

    switches: tuple[str, ...]  # qpopper's one-letter forms, e.g. ("-i",)
    long: str | None  # the --long form without its dashes
    arg: str | None  # what its argument is called; None: it takes none
    help: str


FLAGS: tuple[Flag, ...] = (
    Flag(("-e",), None, "login_delay=N,expire=N",
         "announce LOGIN-DELAY and EXPIRE in CAPA (announce-login-delay, announce-expire)"),
    Flag(("-f",), "config-file", "file", "read a configuration file at this point of the command line"),
    Flag(("-i",), "inetd", None, "inetd mode: one session on standard input and output"),
    Flag(("-R",), None, None, "no reverse lookup of the client's address (reset reverse-lookup)"),
    Flag(("-v", "-V"), "version", None, "print the version and exit"),
    Flag((), "demo", None, "serve a demo user and Maildir from ./qpopper-demo, with a throwaway certificate"),
    Flag((), "show-config", None,
         "print every setting, its value and where it came from (default, file:line, switch), then exit"),
    Flag((), "check-config", None,
         "load the passwd-file, APOP database, certificates and listen addresses as the daemon would; "
         "print each problem, exit 1 on any error"),
    Flag((), "tls-listen", "[address][:port]", "an extra listener speaking implicit TLS (port 995 unless given)"),
    Flag((), "haproxy-listen", "[address][:port]",
         "a listener behind a load balancer: each connection starts with a PROXY header (port 110; "
         "replaces the default *:110)"),
    Flag((), "haproxy-tls-listen", "[address][:port]",
         "the same, speaking implicit TLS after the PROXY header (port 995 unless given)"),
    Flag((), "kpop-listen", "[address][:port]",
         "an extra listener where clients start with KPOP, Kerberos before the greeting (port 1109 unless given; "
         "needs -k)"),
    Flag((), "help", None, "print every option in one line, with its default, then exit"),
)

_FLAG_SWITCHES = {switch for flag in FLAGS for switch in flag.switches}
_FLAG_LONGS = {flag.long for flag in FLAGS if flag.long}


def option_settings() -> list[Setting]:
    """The settings that are options as themselves (config-file is the -f flag)."""
    return [s for s in SETTINGS if s.name.lower() not in _FLAG_LONGS]


def _switch_order(switch: str) -> tuple[str, bool]:
    return switch.lower(), switch[1:].isupper()  # qpopper's order: b B c C ...


def short_options() -> str:
    """getopt's option string: each switch, ':' after those with a value."""
    takes_value = {s.switch: s.kind is not Kind.BOOL for s in option_settings() if s.switch}
    takes_value |= {switch: flag.arg is not None for flag in FLAGS for switch in flag.switches}
    return "".join(
        switch[1] + (":" if takes_value[switch] else "") for switch in sorted(takes_value, key=_switch_order)
    )


def long_options() -> list[str]:
    """getopt's long options: the flags', then every setting's (`no-` too for Booleans)."""
    out = [flag.long + ("=" if flag.arg else "") for flag in FLAGS if flag.long]
    for setting in option_settings():
        name = setting.name.lower()
        out += [name, f"no-{name}"] if setting.kind is Kind.BOOL else [f"{name}="]
    return out


def _switch_words() -> list[tuple[str, str]]:
    """(switch, argument name) of every one-letter option, in qpopper's order."""
    words = {s.switch: "" if s.kind is Kind.BOOL else s.name for s in option_settings() if s.switch}
    words |= {switch: flag.arg or "" for flag in FLAGS for switch in flag.switches}
    return [(switch, words[switch]) for switch in sorted(words, key=_switch_order)]


def usage() -> str:
    """The usage line, wrapped under its own start."""
    items = [f"[{switch} {arg}]" if arg else f"[{switch}]" for switch, arg in _switch_words()]
    items += [
        f"[--{flag.long}" + (f"={flag.arg}]" if flag.arg else "]") for flag in FLAGS if flag.long and not flag.switches
    ]
    items += ["[--SETTING=VALUE ...]", "[[address][:port] ...]"]
    lead = "usage: qpopper"
    lines = [lead]
    for item in items:
        if len(lines[-1]) + 1 + len(item) > WIDTH:
            lines.append(" " * len(lead))
        lines[-1] += " " + item
    return "\n".join(lines)


def _setting_line(setting: Setting) -> str:
    word = "" if setting.kind is Kind.BOOL else "=WORD" if setting.mnemonics else f"={setting.kind.value.upper()}"
    left = f"{setting.switch}, --{setting.name}{word}" if setting.switch else f"    --{setting.name}{word}"
    notes = [f"one of {', '.join(dict.fromkeys(w for w, _ in setting.mnemonics))}"] if setting.mnemonics else []
    notes.append("accepted, no effect" if setting.ignored else f"default: {setting.describe_default()}")
    return f"  {left:<36} {setting.help} ({'; '.join(notes)})"


def _flag_line(flag: Flag) -> str:
    names = [*flag.switches, *([f"--{flag.long}"] if flag.long else [])]
    left = ", ".join(names) + (f" {flag.arg}" if flag.arg else "")
    return f"  {left:<36} {flag.help}"


def help_text() -> str:
    """`qpopper --help`: the usage, then every option in one line each."""
    lines = [usage(), "", "Options that are not settings:"]
    lines += [_flag_line(flag) for flag in FLAGS]
    lines += [
        "",
        "Settings (also `set NAME = VALUE` in a config file; a Boolean takes no value, --no-NAME sets it false):",
    ]
    lines += [_setting_line(s) for s in sorted(option_settings(), key=lambda s: s.name.lower())]
    lines += ["", "Positional [address][:port] arguments are listeners (default: every address, port 110).",
              "See qpopper(8) for the switches and signals, qpopper.conf(5) for every setting."]
    return "\n".join(lines)
