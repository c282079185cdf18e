"""The `qpopper` (alias `popper`) command: the daemon's only entry point.

This is the one place that configures logging, installs signal handlers
and exits the process. Modes: standalone (listen on `[address][:port]`
arguments), inetd (`-i`: one session on stdin/stdout), systemd socket
activation (LISTEN_FDS, detected by itself), and `--demo`.

The switches are qpopper's, parsed as qpopper's getopt did (`-T600` and
`-T 600`, switches in any order, processed left to right so that `-f`
files and later switches override earlier ones); every setting of the
registry is also a long option (`--timeout=600`, `--no-reverse-lookup`).
getopt's strings, the usage and `--help` come from the registry
(config/commandline.py); this module acts on what they accept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getopt
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .._version import __version__
from ..auth.cleartext import plaintext_allowed
from ..auth.sasl import offered_mechanisms
from ..config.commandline import help_text, long_options, short_options, usage
from ..config.configfile import Context, read_config
from ..config.options import ListenAddress, Options, apply_settings, doubtful_settings, parse_listen_address
from ..config.settings import BY_LONG, BY_SWITCH, SETTINGS, Kind, Setting
from ..errors import ConfigError
from ..server import Server
from ..server._memory import limit_malloc_arenas
from .inetd import check_inetd_streams, serve_inetd, started_by_inetd
from .logsetup import attach_loop, configure_logging, detach_loop
from .systemd import listen_fds, notify

log = logging.getLogger("qpopper")

EXIT_USAGE = 2
SHORT_OPTIONS = short_options()
LONG_OPTIONS = long_options()
USAGE = usage()


@dataclass
class Invocation:
    """What the command line asked for, before Options are built."""

    assignments: list[tuple[str, object, str]] = field(default_factory=list)
    listen: list[str] = field(default_factory=list)
    tls_listen: list[str] = field(default_factory=list)
    haproxy_listen: list[tuple[str, bool]] = field(default_factory=list)  # (address, implicit TLS)
    kpop_listen: list[str] = field(default_factory=list)
    demo: bool = False
    inetd: bool = False
    show_config: bool = False
    check_config: bool = False
    version: bool = False
    help: bool = False
    argv: list[str] = field(default_factory=list)


def _usage_error(message: str) -> ConfigError:
    return ConfigError(message, "command line")


def _switch_value(setting: Setting, value: str, where: str) -> object:
    if setting.kind is Kind.BOOL:
        return True
    return setting.parse(value, where)


# Flags that say what this run does, not how the server is set up: each sets one Invocation field.
_MODE_FLAGS = {
    "-v": "version", "-V": "version", "--version": "version",
    "--help": "help",
    "-i": "inetd", "--inetd": "inetd",
    "--demo": "demo",
    "--show-config": "show_config",
    "--check-config": "check_config",
}  # fmt: skip


def parse_command_line(argv: Sequence[str]) -> Invocation:
    try:
        opts, positional = getopt.gnu_getopt(list(argv), SHORT_OPTIONS, LONG_OPTIONS)
    except getopt.GetoptError as exc:
        raise _usage_error(str(exc)) from None
    inv = Invocation(listen=list(positional), argv=list(argv))
    for flag, value in opts:
        mode = _MODE_FLAGS.get(flag)
        if mode is not None:
            setattr(inv, mode, True)
        elif flag == "--tls-listen":
            inv.tls_listen.append(value)
        elif flag in ("--haproxy-listen", "--haproxy-tls-listen"):
            inv.haproxy_listen.append((value, flag == "--haproxy-tls-listen"))
        elif flag == "--kpop-listen":
            inv.kpop_listen.append(value)
        else:
            inv.assignments += _assignments(flag, value)
    return inv


def _assignments(flag: str, value: str) -> list[tuple[str, object, str]]:
    """The settings one switch assigns, in order: a -f file's, -e's two, or one."""
    if flag in ("-f", "--config-file"):
        return [(a.setting.name, a.value, a.source) for a in read_config(value, Context.INIT)]
    if flag == "-e":
        return _announcements(value)
    if flag == "-R":
        return [("reverse-lookup", False, "-R")]
    if flag in BY_SWITCH:
        setting = BY_SWITCH[flag]
        return [(setting.name, _switch_value(setting, value, flag), flag)]
    if flag.startswith("--no-") and flag[5:] in BY_LONG:
        return [(BY_LONG[flag[5:]].name, False, flag)]
    if flag[2:] in BY_LONG:
        setting = BY_LONG[flag[2:]]
        return [(setting.name, _switch_value(setting, value, flag), flag)]
    raise _usage_error(f"option {flag} not recognized")  # pragma: no cover - getopt only returns what we declared


def _announcements(value: str) -> list[tuple[str, object, str]]:
    """-e login_delay=nn,expire=nn (qpopper's sub-option syntax)."""
    out: list[tuple[str, object, str]] = []
    for item in value.split(","):
        key, sep, text = item.strip().partition("=")
        key = key.strip().lower()
        if key not in ("login_delay", "expire") or not sep or not text.strip():
            raise _usage_error(f"-e takes login_delay=SECONDS,expire=DAYS|never, not {item!r}")
        if key == "login_delay":
            if not text.strip().isdigit():
                raise _usage_error(f"-e login_delay must be a number of seconds, not {text!r}")
            out.append(("announce-login-delay", int(text), "-e"))
        else:
            out.append(("announce-expire", text.strip(), "-e"))
    return out


def build_options(inv: Invocation) -> Options:
    opts = apply_settings(Options(), inv.assignments)
    changes: dict[str, object] = {}
    sources = dict(opts.sources)
    listen = list(opts.listen)
    if inv.listen:
        default_port = 1110 if inv.demo else 110
        listen = [parse_listen_address(a, default_port) for a in inv.listen]
        sources["listen"] = "command line"
    elif inv.demo:
        from .demo import DEMO_PORT

        listen = [ListenAddress("127.0.0.1", DEMO_PORT)]
    if inv.demo:
        from .demo import DEMO_TLS_PORT, prepare

        demo = prepare()
        for name, value in (
            ("passwd_file", demo.passwd),
            ("mail_location", demo.mail_location),
            ("hostname", "localhost"),
            ("tls_cert_file", demo.cert),
            ("tls_key_file", demo.key),
            ("reverse_lookup", False),
        ):
            if name not in opts.sources:
                changes[name] = value
                sources[name] = "--demo"
        if not inv.tls_listen:
            first = listen[0]
            listen.append(ListenAddress(first.host, 0 if first.port == 0 else DEMO_TLS_PORT, tls=True))
    if inv.tls_listen:
        listen += [parse_listen_address(a, 995, tls=True) for a in inv.tls_listen]
        sources["listen"] = "command line"
    if inv.haproxy_listen:
        if not inv.listen and not inv.demo:  # behind a balancer only: no plain *:110 beside it
            listen = [a for a in listen if a != ListenAddress(None, 110)]
        listen += [parse_listen_address(a, 995 if tls else 110, tls=tls, proxy=True) for a, tls in inv.haproxy_listen]
        sources["listen"] = "command line"
    if inv.kpop_listen:
        listen += [dataclasses.replace(parse_listen_address(a, 1109), kpop=True) for a in inv.kpop_listen]
        sources["listen"] = "command line"
    changes["listen"] = tuple(listen)
    return opts.replace(sources=sources, **changes)


def _with_source(text: str, source: str) -> str:
    """A line and, in a column (or after one space if it is long), its source."""
    return f"{text.ljust(51)} # {source}"


def offered_sasl_lines(options: Options) -> list[str]:
    """Which of the configured mechanisms CAPA offers, per kind of connection.

    The rule is `auth.sasl.offered_mechanisms`, the one the protocol uses;
    what it needs to know about a connection is filled in here from the
    settings: a TLS connection has the certificate to bind to, one without
    TLS from another host gets PLAIN and LOGIN only if the clear-text
    policy allows them there.
    """
    configured = options.sasl_mechanisms
    policy = options.clear_text_password
    client_ca = options.tls_client_ca_file is not None
    tls_connections = options.tls_configured and (
        options.effective_tls_support != "none" or any(a.tls for a in options.listen)
    )
    lines = []
    if tls_connections:
        over_tls = offered_mechanisms(
            configured,
            plaintext_allowed=plaintext_allowed(policy, tls_active=True, peer="192.0.2.1", tls_configured=True),
            channel_binding=True,
            client_certificate=client_ca,
            kerberos=options.kerberos,
        )
        note = " (EXTERNAL: to clients with a certificate from tls-client-ca-file)" if "EXTERNAL" in over_tls else ""
        lines.append(f"#   offered over TLS: {' '.join(over_tls) or 'none'}{note}")
    remote, local = (
        offered_mechanisms(
            configured,
            plaintext_allowed=plaintext_allowed(
                policy, tls_active=False, peer=peer, tls_configured=options.tls_configured
            ),
            channel_binding=False,
            client_certificate=False,
            kerberos=options.kerberos,
        )
        for peer in ("192.0.2.1", "127.0.0.1")
    )
    extra = [m for m in local if m not in remote]
    note = f" (from loopback also {' '.join(extra)})" if extra else ""
    lines.append(f"#   offered without TLS: {' '.join(remote) or 'none'}{note}")
    if "GSSAPI" in configured and not options.kerberos:
        lines.append("#   not offered: GSSAPI (kerberos is off)")
    if "EXTERNAL" in configured and not (tls_connections and client_ca):
        reason = "no TLS connections" if client_ca else "tls-client-ca-file is not set"
        lines.append(f"#   not offered: EXTERNAL ({reason})")
    return lines


def _user_database_line(options: Options) -> str:
    """What the sql or ldap backend's args file amounts to (no secret, no connection)."""
    from ..auth.userdb import open_user_database

    try:
        database, _ = open_user_database(options.auth_backend, options.auth_backend_args or "")
    except ConfigError as exc:
        return f"# user database: {exc}"
    return f"# user database: {database.describe()}"


def show_config(options: Options) -> str:
    """Every setting with its effective value and where it came from."""
    lines = []
    for setting in SETTINGS:
        if setting.field is None:
            if setting.name in options.ignored:
                lines.append(
                    f"# {setting.name}: given at {options.source_of(setting.name)}, ignored: {setting.ignored}"
                )
            continue
        value = getattr(options, setting.field)
        source = options.source_of(setting.field)
        if value is None:
            lines.append(_with_source(f"# {setting.name} is not set", source))
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = '"' + " ".join(str(v) for v in value) + '"'
        elif isinstance(value, float):
            text = f"{value:g}"
        else:
            text = str(value)
            if any(c in text for c in " \t#\"'"):
                text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(_with_source(f"set {setting.name} = {text}", source))
        if setting.field == "sasl_mechanisms":
            lines += offered_sasl_lines(options)
        if setting.field == "auth_backend_args" and options.auth_backend in ("sql", "ldap"):
            lines.append(_user_database_line(options))
    listen = " ".join(str(a) for a in options.listen)
    lines.append(f"# listen: {listen}  ({options.source_of('listen')})")
    return "\n".join(lines) + "\n"


def _new_loop(options: Options) -> asyncio.AbstractEventLoop:
    if options.use_uvloop:
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


def _reloader(
    server: Server, inv: Invocation, adjust: Callable[[Options], Options] | None = None
) -> Callable[[], None]:
    """SIGHUP: the command line is read again, with its -f files."""

    def reload() -> None:
        try:
            options = build_options(parse_command_line(inv.argv))
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        server.reload(adjust(options) if adjust is not None else options)

    return reload


def _serve_workers(options: Options, inv: Invocation) -> None:
    """Virtual users on several cores: a pool of forked event-loop servers."""
    from .workers import WorkerPool, worker_options  # only this mode needs them

    count = options.effective_workers

    def adjust(new: Options) -> Options:
        return worker_options(new, count)

    pool = WorkerPool(options, listen_fds())
    pool.bind()
    # Built here, before the fork: a bad certificate or user database is
    # one start-up error, and the workers share the server's memory (user
    # database, TLS context, the event loop's modules) instead of copying it.
    server = Server(adjust(options), sockets=pool.listeners)
    _new_loop(options).close()  # imports uvloop now

    def serve() -> None:
        loop = _new_loop(options)
        try:
            loop.run_until_complete(_run_daemon(server, False, _reloader(server, inv, adjust)))
        finally:
            loop.close()

    pool.run(serve, _reloader(server, inv, adjust))


async def _run_daemon(server: Server, demo: bool, reload: Callable[[], None]) -> None:
    await server.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def stop(drain: bool) -> None:
        if not stopping:
            log.info("stopping (%s)", "draining" if drain else "fast")
            notify("STOPPING=1")
            stopping.append(loop.create_task(server.stop(drain=drain)))

    loop.add_signal_handler(signal.SIGTERM, stop, True)
    loop.add_signal_handler(signal.SIGINT, stop, False)
    loop.add_signal_handler(signal.SIGHUP, reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # a worker's may be pending
    if server.options.metrics_listen:
        from .operations import current_exporter

        exporter = current_exporter()  # None in a worker: its parent supervises the exporter
        if exporter is not None:
            exporter.supervise_in(loop)
    notify("READY=1")
    if demo:
        from .demo import banner

        print(banner(server.listeners), flush=True)
    attach_loop(loop)  # stderr's records: one write per loop turn
    try:
        await server.serve_forever()
    finally:
        detach_loop()


def _check_config(inv: Invocation) -> int:
    """--check-config: every problem on its own line; 1 on any error, 2 for bad usage."""
    from .checkconfig import ERROR, Problem, check_options, report

    try:
        options = build_options(parse_command_line(inv.argv))
    except ConfigError as exc:
        if _is_usage_error(exc):
            raise
        # A config file's error: read the files again collecting every error, not only the first.
        found = [error for path in _config_files(inv.argv) for error in _config_file_errors(path)]
        problems = [Problem(ERROR, None, str(error)) for error in found or [exc]]
    else:
        problems = check_options(options)
    text, status = report(problems)
    (sys.stderr if status else sys.stdout).write(text)
    return status


def _config_files(argv: list[str]) -> list[str]:
    """The -f / --config-file paths of a command line, in order."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("-f", "--config-file") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config-file="):
            paths.append(arg.partition("=")[2])
        elif arg.startswith("-f") and len(arg) > 2 and not arg.startswith("--"):
            paths.append(arg[2:])
    return paths


def _config_file_errors(path: str) -> list[ConfigError]:
    errors: list[ConfigError] = []
    try:
        read_config(path, Context.INIT, problems=errors)
    except ConfigError as exc:  # the file itself: unreadable, not UTF-8, included in a loop
        errors.append(exc)
    return errors


def _log_startup_warnings(options: Options, *, inetd: bool) -> None:
    """Settings that do nothing or contradict each other, and what --check-config would say
    about the files (not in inetd mode: a process per connection would check them each time)."""
    for name in options.ignored:
        log.warning("setting %s is accepted for compatibility but has no effect here", name)
    for doubt in doubtful_settings(options):
        log.warning("%s", doubt)
    if inetd:
        return
    from .checkconfig import content_problems

    for problem in content_problems(options):
        log.warning("%s", problem)


def _settle_inetd(inv: Invocation) -> None:
    """inetd mode with -i, or without it when inetd handed us a connection and no listener was given
    (an inetd.conf line written for qpopper's inetd build); then stdin/stdout must be able to carry it."""
    listeners = inv.listen or inv.tls_listen or inv.haproxy_listen or inv.kpop_listen
    if not inv.inetd and not (listeners or inv.demo) and started_by_inetd():
        inv.inetd = True
    if inv.inetd:
        check_inetd_streams()


def _serve_inetd(options: Options) -> None:
    server = Server(options, per_session_process=True)
    loop = _new_loop(options)
    try:
        loop.run_until_complete(serve_inetd(server))
        loop.run_until_complete(server.stop())
    finally:
        loop.close()


def _is_usage_error(exc: ConfigError) -> bool:
    return exc.source is not None and (exc.source.startswith("-") or exc.source == "command line")


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if "--check-config" in args:
            # Parsed again inside, so that a -f file's error is a finding (exit 1), not bad usage.
            return _check_config(Invocation(argv=args))
        inv = parse_command_line(args)
        if inv.version:
            print(f"qpopper {__version__} (Python)")
            return 0
        if inv.help:
            print(help_text())
            return 0
        options = build_options(inv)
        if inv.show_config:
            sys.stdout.write(show_config(options))
            return 0
        _settle_inetd(inv)
        configure_logging(options, foreground=not inv.inetd)
        limit_malloc_arenas()
        _log_startup_warnings(options, inetd=inv.inetd)
        if options.system_users and os.geteuid() != 0:
            raise ConfigError(
                "system users (PAM, a process per session that switches to the user) need root; "
                "run as root, or serve virtual users with --passwd-file"
            )
        if inv.inetd:
            # One session per process and nothing that outlives it: no exporter, no control socket.
            _serve_inetd(options.replace(metrics_listen=None, control_dir=None))
            return 0
        if options.metrics_listen or options.control_dir:
            from .operations import start_operations

            options = start_operations(options)  # before anything forks or starts a thread
        if options.system_users:
            from .forking import ForkingServer  # only this mode needs it

            system_server = Server(options, per_session_process=True)
            forking = ForkingServer(system_server, listen_fds(), _reloader(system_server, inv))
            forking.bind()
            forking.serve_forever()
            return 0
        if options.effective_workers > 1 and not inv.demo:
            _serve_workers(options, inv)
            return 0
        server = Server(options, sockets=listen_fds())
        loop = _new_loop(options)
        try:
            loop.run_until_complete(_run_daemon(server, inv.demo, _reloader(server, inv)))
        finally:
            loop.close()
    except ConfigError as exc:
        print(f"qpopper: {exc}", file=sys.stderr)
        if _is_usage_error(exc) and "--check-config" not in args:
            print(USAGE, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # An administrator gets one clear line; the traceback only with -d.
        log.debug("fatal error", exc_info=True)
        print(f"qpopper: fatal error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
