"""qpopper's config-file grammar, the registry and option precedence."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpopper.config.configfile import Context, read_config
from qpopper.config.options import Options, apply_settings
from qpopper.config.settings import SETTINGS, Kind, Restriction
from qpopper.daemon.cli import build_options, parse_command_line, show_config
from qpopper.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "qpopper.conf") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def options_from(path: Path, context: Context = Context.INIT) -> Options:
    return apply_settings(Options(), ((a.setting.name, a.value, a.source) for a in read_config(str(path), context)))


def test_grammar(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# a comment\n"
        "\n"
        "   set debug\n"
        "set Statistics   # implicit true, case-insensitive name\n"
        "reset reverse-lookup\n"
        "set timeout = 0x258\n"
        "set announce-login-delay=017\n"
        "set log-login = \"(v%0) POP login by user \\\"%1\\\" at (%2) %3\"\n"
        "set nonauth-file = '/etc/ftp users'  # quoted with blanks\n"
        "set auth-file = `/etc/pop.allow`\n"
        "set update-on-abort = 1\n"
        "set shy = false\n"
        "set clear-text-password = TLS\n"
        "set tls-support = STLS\n"
        "set announce-expire = never",  # no final newline: accepted
    )
    o = options_from(path)
    assert o.debug and o.statistics and not o.reverse_lookup
    assert o.timeout == 600 and o.announce_login_delay == 15  # hex and octal, as strtol(..., 0)
    assert o.log_login == '(v%0) POP login by user "%1" at (%2) %3'
    assert o.nonauth_file == "/etc/ftp users" and o.auth_file == "/etc/pop.allow"
    assert o.update_on_abort is True and o.shy is False
    assert o.clear_text_password == "tls" and o.tls_support == "stls" and o.announce_expire == "NEVER"
    assert o.source_of("timeout") == f"{path}:6"
    assert o.source_of("hostname") == "default"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("sett debug", "expected 'set' or 'reset'"),
        ("set nosuch = 1", "unknown option 'nosuch'"),
        ("set timeout", "timeout needs '= value'"),
        ("reset timeout = 5", "expected '=' and a value"),
        ("set timeout = abc", "timeout: expected a number"),
        ("set debug = 2", "debug: expected true, false, 1 or 0"),
        ("set timeout = 600 extra", "expected a comment or the end of the line"),
        ("set log-login = \"unterminated", "unterminated quoted string"),
        ("set tls-support = sometimes", "tls-support: expected one of"),
        ("set timeout =", "expected a value"),
        ("set " + "x" * 1100, "line too long"),
    ],
)
def test_errors_name_file_line_and_what_was_expected(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, "set debug\n" + line + "\nset statistics\n")
    with pytest.raises(ConfigError) as info:
        read_config(str(path))
    assert str(info.value).startswith(f"{path}:2: ")
    assert message in str(info.value)


def test_includes_and_their_limits(tmp_path: Path) -> None:
    inner = write(tmp_path, "set timeout = 900\n", "inner.conf")
    outer = write(tmp_path, f"set timeout = 700\nset config-file = {inner}\nset statistics\n", "outer.conf")
    o = options_from(outer)
    assert o.timeout == 900 and o.statistics and o.source_of("timeout") == f"{inner}:1"
    loop = write(tmp_path, "set config-file = {}\n".format(tmp_path / "loop.conf"), "loop.conf")
    with pytest.raises(ConfigError, match="includes itself"):
        read_config(str(loop))


def test_c_only_options_are_accepted_and_reported_as_ignored(tmp_path: Path) -> None:
    path = write(
        tmp_path, "set tls-options = 0x4\nset chunky-writes = never\nset tls-workarounds\nset tls-passphrase = x\n"
    )
    o = options_from(path)
    assert set(o.ignored) == {"tls-options", "chunky-writes", "tls-workarounds", "tls-passphrase"}
    assert "ignored" in show_config(o)


def test_restricted_options_refused_in_user_files_rest_still_applies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path,
        "set statistics\nset clear-text-password = always\nset tracefile = /tmp/x\nbroken line\nset timeout = 900\n",
        ".qpopper-options",
    )
    with caplog.at_level(logging.WARNING, logger="qpopper.config"):
        for context in (Context.USER, Context.SPOOL):
            o = options_from(path, context)
            assert o.statistics and o.timeout == 900
            assert o.clear_text_password is None and o.trace_file is None
    assert "clear-text-password is not allowed in a user option file" in caplog.text
    assert "tracefile is not allowed in a spool option file" in caplog.text
    assert f"{path}:4" in caplog.text


def test_every_restricted_setting_is_refused_in_user_context(tmp_path: Path) -> None:
    for setting in SETTINGS:
        if setting.restriction is Restriction.NONE:
            continue
        value = (
            "1"
            if setting.kind in (Kind.BOOL, Kind.INT, Kind.FLOAT)
            else (setting.mnemonics[0][0] if setting.mnemonics else "x")
        )
        path = write(tmp_path, f"set {setting.name} = {value}\n", "user.conf")
        assert read_config(str(path), Context.USER) == [], setting.name


def test_command_line_precedence_left_to_right(tmp_path: Path) -> None:
    path = write(tmp_path, "set timeout = 900\nset statistics\n")
    o = build_options(parse_command_line(["-T", "700", "-f", str(path)]))
    assert o.timeout == 900 and o.source_of("timeout") == f"{path}:1"
    o = build_options(parse_command_line(["-f", str(path), "-T700", "127.0.0.1:1110", "-s", "[::1]:995"]))
    assert o.timeout == 700 and o.source_of("timeout") == "-T"
    assert [str(a) for a in o.listen] == ["127.0.0.1:1110", "[::1]:995"]


def test_show_config_round_trips(tmp_path: Path) -> None:
    original = build_options(parse_command_line(["-T", "700", "-s", "-p", "3", "-e", "login_delay=30,expire=7", "-c"]))
    path = write(tmp_path, show_config(original))
    again = options_from(path)
    for setting in SETTINGS:
        if setting.field:
            assert getattr(again, setting.field) == getattr(original, setting.field), setting.name


def test_show_config_command_names_sources(tmp_path: Path) -> None:
    path = write(tmp_path, "set timeout = 900\n")
    out = subprocess.run(
        [sys.executable, "-m", "qpopper", "-f", str(path), "-s", "--show-config"],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    assert "set timeout = 900".ljust(52) + f"# {path}:1" in out
    assert "set statistics = true".ljust(52) + "# -s" in out
    assert "set shy = false".ljust(52) + "# default" in out


@settings(max_examples=500, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("setrs =#\"'`\\-_abcdgiloumnpy0123456789x\t\n.")), max_size=200))
def test_any_input_parses_or_names_a_line(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.conf"
    path.write_text(text)
    error: ConfigError | None = None
    try:
        options_from(path)
    except ConfigError as exc:
        error = exc
    assert error is None or str(error).startswith(str(path))


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_unicode_never_raises_anything_else(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.conf"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        options_from(path)
    except ConfigError:
        pass
    for context in (Context.USER, Context.SPOOL):
        read_config(str(path), context)  # user files never raise on content
