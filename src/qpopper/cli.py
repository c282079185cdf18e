"""The `qpopper` (alias `popper`) command: the daemon's only entry point.

This is the one place that configures logging, installs signal handlers
and exits the process. Modes: standalone (listen on `[address][:port]`
arguments), inetd (`-i`: one session on stdin/stdout), systemd socket
activation (LISTEN_FDS, detected by itself), and `--demo`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from ._version import __version__
from .errors import ConfigError
from .options import ListenAddress, Options, parse_listen_address
from .policy import parse_clear_text_policy
from .server import Server, listen_fds, notify, serve_inetd

log = logging.getLogger("qpopper")

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"qpopper: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qpopper", description="POP3 server compatible with qpopper 4.1.")
    p.add_argument("listen", nargs="*", metavar="[address][:port]", help="listen here (standalone; default *:110)")
    p.add_argument("-v", "-V", "--version", action="version", version=f"qpopper {__version__} (Python)")
    p.add_argument("-i", "--inetd", action="store_true", help="serve one session on stdin/stdout (inetd, xinetd)")
    p.add_argument("--demo", action="store_true", help="serve a demo user and maildrop from ./qpopper-demo")
    p.add_argument("--passwd-file", metavar="FILE", help="virtual users in Dovecot passwd-file format")
    p.add_argument("--mail-location", metavar="TEMPLATE", help="maildrop template, e.g. maildir:~/Maildir")
    p.add_argument("--default-password-scheme", metavar="SCHEME", help="scheme of hashes without {SCHEME}")
    p.add_argument("--hostname", help="host name in the greeting and the APOP stamp")
    p.add_argument("-T", "--timeout", type=float, metavar="SECONDS", help="autologout timer (default 600)")
    p.add_argument("--auth-fail-delay", type=float, metavar="SECONDS", help="answer failed logins after this delay")
    p.add_argument("--max-connections", type=int, metavar="N", help="sessions at once in total")
    p.add_argument("--max-connections-per-ip", type=int, metavar="N", help="sessions at once per client address")
    p.add_argument("--update-on-abort", action="store_true", help="commit deletions when a connection is lost")
    p.add_argument("--shy", action="store_true", help="hide the version in the greeting and CAPA")
    tls = p.add_argument_group("TLS")
    tls.add_argument("-l", dest="tls_support", choices=["0", "1", "2"], help="TLS: 0 none, 1 STLS, 2 implicit TLS on every listener")
    tls.add_argument("--tls-listen", action="append", default=[], metavar="[address][:port]", help="also listen here with implicit TLS (e.g. :995)")
    tls.add_argument("--tls-server-cert-file", metavar="PEM", help="server certificate")
    tls.add_argument("--tls-private-key-file", metavar="PEM", help="its private key (default: in the certificate file)")
    tls.add_argument("--tls-chain-file", metavar="PEM", help="intermediate certificates sent with it")
    tls.add_argument("--tls-cipher-list", metavar="LIST", help="OpenSSL cipher list for TLS 1.2")
    tls.add_argument("--tls-ciphersuites", metavar="LIST", help="TLS 1.3 cipher suites")
    tls.add_argument("--tls-version", metavar="VERSION", help="minimum: TLSv1.2 (default) or TLSv1.3")
    tls.add_argument("--tls-client-ca-file", metavar="PEM", help="accept client certificates from this CA (SASL EXTERNAL)")
    p.add_argument("-p", "--clear-text-password", metavar="POLICY", help="0 default, 1 never, 2 always, 3 local, 4 tls")
    p.add_argument("--sasl-mechanisms", metavar="LIST", help="space- or comma-separated SASL mechanisms to offer")
    p.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    p.add_argument("-d", "--debug", action="store_true", help="log debug messages")
    return p


def options_from_args(args: argparse.Namespace) -> Options:
    opts = Options()
    changes: dict[str, object] = {}
    if args.listen:
        default_port = 1110 if args.demo else 110
        changes["listen"] = tuple(parse_listen_address(a, default_port) for a in args.listen)
    elif args.demo:
        from .demo import DEMO_PORT

        changes["listen"] = (ListenAddress("127.0.0.1", DEMO_PORT),)
    if args.demo:
        from .demo import DEMO_TLS_PORT, prepare

        demo = prepare()
        changes.update(
            passwd_file=demo.passwd,
            mail_location=demo.mail_location,
            auth_fail_delay=1.0,
            hostname="localhost",
            tls_cert_file=demo.cert,
            tls_key_file=demo.key,
        )
        if not args.tls_listen:
            host = changes["listen"][0].host  # type: ignore[index]
            tls_port = 0 if changes["listen"][0].port == 0 else DEMO_TLS_PORT  # type: ignore[index]
            changes["listen"] = (*changes["listen"], ListenAddress(host, tls_port, tls=True))  # type: ignore[misc]
    if args.tls_listen:
        base = changes.get("listen", opts.listen)
        extra = tuple(parse_listen_address(a, 995, tls=True) for a in args.tls_listen)
        changes["listen"] = (*base, *extra)  # type: ignore[misc]
    if args.tls_support is not None:
        changes["tls_support"] = {"0": "none", "1": "stls", "2": "alternate-port"}[args.tls_support]
    # qpopper's option names on the left, Options fields on the right.
    for arg, field_name in (
        ("tls_server_cert_file", "tls_cert_file"),
        ("tls_private_key_file", "tls_key_file"),
        ("tls_chain_file", "tls_chain_file"),
        ("tls_cipher_list", "tls_cipher_list"),
        ("tls_ciphersuites", "tls_ciphersuites"),
        ("tls_version", "tls_version"),
        ("tls_client_ca_file", "tls_client_ca_file"),
    ):
        value = getattr(args, arg)
        if value is not None:
            changes[field_name] = value
    if args.clear_text_password is not None:
        changes["clear_text_password"] = parse_clear_text_policy(args.clear_text_password)
    if args.sasl_mechanisms is not None:
        from .auth.sasl import ALL_MECHANISMS

        names = tuple(m.upper() for m in args.sasl_mechanisms.replace(",", " ").split())
        unknown = [m for m in names if m not in ALL_MECHANISMS]
        if unknown:
            raise ConfigError(f"unknown SASL mechanism {unknown[0]} (known: {' '.join(ALL_MECHANISMS)})")
        changes["sasl_mechanisms"] = names
    for name in (
        "passwd_file",
        "mail_location",
        "default_password_scheme",
        "hostname",
        "timeout",
        "auth_fail_delay",
        "max_connections",
        "max_connections_per_ip",
    ):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.update_on_abort:
        changes["update_on_abort"] = True
    if args.shy:
        changes["shy"] = True
    if args.no_uvloop:
        changes["use_uvloop"] = False
    if "timeout" in changes and float(changes["timeout"]) <= 0:  # type: ignore[arg-type]
        raise ConfigError("timeout must be positive")
    return opts.replace(**changes)


def _new_loop(options: Options) -> asyncio.AbstractEventLoop:
    if options.use_uvloop:
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


async def _run_daemon(server: Server, demo: bool) -> None:
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
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    notify("READY=1")
    if demo:
        from .demo import banner

        print(banner(server.listeners), flush=True)
    await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s qpopper[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        options = options_from_args(args)
        if args.inetd:
            server = Server(options)
            loop = _new_loop(options)
            try:
                loop.run_until_complete(serve_inetd(server))
                loop.run_until_complete(server.stop())
            finally:
                loop.close()
            return 0
        server = Server(options, sockets=listen_fds())
        loop = _new_loop(options)
        try:
            loop.run_until_complete(_run_daemon(server, args.demo))
        finally:
            loop.close()
    except ConfigError as exc:
        print(f"qpopper: {exc}", file=sys.stderr)
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
