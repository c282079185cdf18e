"""The settings registry is the one source of defaults, checks, getopt's
strings, the usage, `--help` and the effective SASL list of --show-config."""

from __future__ import annotations

import dataclasses
import itertools
import re
import socket

import pytest

from qpopper.auth.sasl import ALL_MECHANISMS, offered_mechanisms
from qpopper.config.commandline import FLAGS, help_text, long_options, option_settings, short_options, usage
from qpopper.config.options import Options, apply_settings
from qpopper.config.settings import BY_FIELD, SETTINGS
from qpopper.daemon.cli import build_options, main, parse_command_line, show_config
from qpopper.errors import ConfigError
from qpopper.protocol import ConnectionSecurity, Session, SessionConfig
from test_protocol import STAMP, lines, run

# Options fields that are not settings: listeners come from positional
# arguments, apop/allow_user_pass from embedding code, the rest is bookkeeping.
NOT_SETTINGS = {"listen", "apop", "allow_user_pass", "sources", "ignored"}


def test_every_options_field_takes_its_default_from_its_setting() -> None:
    fields = {f.name: f for f in dataclasses.fields(Options)}
    assert set(fields) - NOT_SETTINGS == set(BY_FIELD)
    for name, setting in BY_FIELD.items():
        if setting.default_factory is not None:
            assert fields[name].default_factory is setting.default_factory, name
        else:
            assert fields[name].default == setting.default, name
    assert Options().hostname == socket.getfqdn()


def test_every_default_passes_its_own_check() -> None:
    for setting in SETTINGS:
        if setting.field is not None and setting.default is not None:
            assert setting.convert(setting.default, "default") == setting.default, setting.name


def test_options_stay_frozen_typed_and_cheap_to_copy() -> None:
    o = Options(timeout=900.0)
    assert not hasattr(o, "__dict__")  # slots
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.timeout = 1.0  # type: ignore[misc]
    assert o.replace(debug=True).timeout == 900.0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("timeout", 0.0, "timeout must be a positive number of seconds"),
        ("drain-timeout", -1.0, "drain-timeout must be a positive number of seconds"),
        ("workers", 300, "workers must be 0 (one per CPU) to 256"),
        ("max-connections", 0, "max-connections must be at least 1"),
        ("hash-spool", 3, "hash-spool must be 0, 1 or 2"),
        ("temp-name", "x", "temp-name must hold one %s and no slash"),
        ("announce-expire", "soon", "announce-expire must be a number of days or never"),
        ("announce-login-delay", -5, "announce-login-delay must be a number of seconds"),
        ("sasl-mechanisms", "PLAIN FOO", "unknown SASL mechanism FOO"),
    ],
)
def test_each_setting_checks_its_values(name: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match="^where: " + message.replace("(", r"\(").replace(")", r"\)")):
        apply_settings(Options(), [(name, value, "where")])


def test_the_getopt_strings_are_qpoppers() -> None:
    assert short_options() == "b:BcCdD:e:f:FikK:l:L:p:RsSt:T:uUvVxy:"  # qpopper 4.1's, plus -i
    longs = set(long_options())
    for setting in option_settings():
        assert (setting.name.lower() in longs) or (f"{setting.name.lower()}=" in longs)
    assert {"demo", "inetd", "show-config", "help", "version", "tls-listen=", "config-file="} <= longs


def test_usage_names_every_switch_once() -> None:
    text = usage()
    switches = [s.switch for s in option_settings() if s.switch] + [sw for f in FLAGS for sw in f.switches]
    for switch in switches:
        assert text.count(f"[{switch} ") + text.count(f"[{switch}]") == 1, switch
    assert all(len(line) <= 100 for line in text.splitlines())


def test_help_lists_every_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out == help_text() + "\n"
    for setting in option_settings():
        (line,) = [x for x in out.splitlines() if re.match(rf"  (-., |    )--{re.escape(setting.name)}(=[A-Z]+)? ", x)]
        assert ("accepted, no effect" if setting.ignored else f"default: {setting.describe_default()}") in line
    for flag in FLAGS:
        assert flag.help in out
    assert "qpopper(8)" in out


def test_show_config_puts_a_space_before_every_comment() -> None:
    for line in show_config(Options()).splitlines():
        if line.startswith("set "):
            value, _, source = line.rpartition("# ")
            assert value.endswith(" ") and source, line


def capa_sasl(security: ConnectionSecurity, kerberos: bool) -> list[str]:
    s = Session(SessionConfig(sasl_mechanisms=ALL_MECHANISMS), timestamp=STAMP, security=security)
    s.kerberos = object() if kerberos else None
    run(s)
    out, _ = run(s, b"CAPA\r\n")
    found = [line.decode().split()[1:] for line in lines(out) if line.startswith(b"SASL ")]
    return found[0] if found else []


@pytest.mark.parametrize(
    ("plain", "binding", "certificate", "kerberos"), list(itertools.product((False, True), repeat=4))
)
def test_the_one_offer_rule_is_what_capa_offers(plain: bool, binding: bool, certificate: bool, kerberos: bool) -> None:
    security = ConnectionSecurity(
        tls=binding,
        plaintext_allowed=plain,
        channel_binding=b"x" * 32 if binding else None,
        certificate_user="carol" if certificate else None,
    )
    rule = offered_mechanisms(
        ALL_MECHANISMS,
        plaintext_allowed=plain,
        channel_binding=binding,
        client_certificate=certificate,
        kerberos=kerberos,
    )
    assert capa_sasl(security, kerberos) == rule


def sasl_lines(*argv: str) -> list[str]:
    text = show_config(build_options(parse_command_line(list(argv))))
    return [line for line in text.splitlines() if line.startswith("#   ") and "offered" in line]


def test_show_config_prints_what_capa_offers_by_default() -> None:
    out = sasl_lines()
    assert out[0] == "#   offered without TLS: SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN"
    assert "not offered: GSSAPI (kerberos is off)" in out[1]
    assert "not offered: EXTERNAL (tls-client-ca-file is not set)" in out[2]
    text = show_config(Options())
    assert '"GSSAPI EXTERNAL SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN" # default' in text  # -PLUS only when named


def test_show_config_per_condition_with_tls_kerberos_and_a_client_ca() -> None:
    out = sasl_lines("--tls-server-cert-file=/c.pem", "--tls-client-ca-file=/ca.pem", "-k")
    assert out[0] == (
        "#   offered over TLS: GSSAPI EXTERNAL SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN"
        " (EXTERNAL: to clients with a certificate from tls-client-ca-file)"
    )
    # The default clear-text policy with TLS configured: passwords only over TLS or from loopback.
    assert (
        out[1] == "#   offered without TLS: GSSAPI SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 (from loopback also PLAIN LOGIN)"
    )
    assert len(out) == 2
    out = sasl_lines("--tls-server-cert-file=/c.pem", f"--sasl-mechanisms={' '.join(ALL_MECHANISMS)}")
    assert out[0].startswith(
        "#   offered over TLS: SCRAM-SHA-256-PLUS SCRAM-SHA-256 SCRAM-SHA-1-PLUS SCRAM-SHA-1 CRAM-MD5"
    )
    out = sasl_lines("--tls-server-cert-file=/c.pem", "-p", "never", "--sasl-mechanisms=SCRAM-SHA-256 PLAIN")
    assert out == ["#   offered over TLS: SCRAM-SHA-256", "#   offered without TLS: SCRAM-SHA-256"]
