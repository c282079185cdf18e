"""The test server for clients in any language: POP3 plus an HTTP JSON API.

    qpopper-testserver [--pop3-port 1110] [--api-port 8025] [--tls stls]
    python -m qpopper.testing ...

Once both listen it prints one JSON line on stdout (the POP3 URL and
ports, the API's URL, the CA file to trust with TLS), so a script can
start it and read where to connect. The API (described by
testing/openapi.json, served at /openapi.json) creates and removes
users, delivers mail, shows a mailbox and the transcript, sets and
clears faults, resets, waits for sessions to end, and answers /health.
It listens on loopback only: it is a test fixture, with no access control.
The standard library's http.server serves it (in a thread) because the API
is a handful of small JSON calls; a web framework would only add a dependency.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib.resources
import json
import signal
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ConfigError, MaildropError
from ..usernames import is_valid_username
from ._server import TestServer

_MAX_BODY = 64 << 20  # a test message of 64 MiB is plenty
_MAX_WAIT = 300.0


class ApiError(Exception):
    """A request the API refuses: its HTTP status and a one-line reason."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _mailbox_json(server: TestServer, user: str) -> dict[str, Any]:
    state = server.mailbox(user)

    def shown(data: bytes) -> dict[str, Any]:
        return {
            "size": len(data),
            "text": data.decode("utf-8", "replace"),
            "base64": base64.b64encode(data).decode("ascii"),
        }

    return {
        "user": user,
        "messages": [{"uid": uid, **shown(data)} for uid, data in zip(state.uids, state.messages, strict=True)],
        "retrieved": [shown(data) for data in state.retrieved],
        "deleted": [shown(data) for data in state.deleted],
        "sessions": state.sessions,
        "updates": state.updates,
    }


class Request(NamedTuple):
    """One call: the path's parts, the query, the body and its type."""

    parts: list[str]
    query: dict[str, list[str]]
    body: bytes
    content_type: str


Answer = tuple[HTTPStatus, Any]


class Api:
    """The API's calls on one TestServer, free of HTTP (tested through it)."""

    def __init__(self, server: TestServer, api_url: str = "") -> None:
        self.server = server
        self.api_url = api_url

    def _user(self, name: str, must_exist: bool = True) -> str:
        if not is_valid_username(name):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"not a valid user name: {name!r}")
        if must_exist and name not in self.server.users.names():
            raise ApiError(HTTPStatus.NOT_FOUND, f"no user {name!r}")
        return name

    def health(self) -> dict[str, Any]:
        """Readiness and where to connect."""
        server = self.server
        return {
            "ready": True,
            "pop3": server.url,
            "host": server.host,
            "port": server.port,
            "implicit_tls_port": server.implicit_tls_port,
            "tls": server.tls,
            "ca_file": server.ca_path,
            "api": self.api_url,
        }

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: bytes, content_type: str) -> Any:
        """Answer one call: (status, JSON value); raises ApiError."""
        parts = [unquote(p) for p in path.strip("/").split("/") if p]
        # A user's name in the path is a parameter: /users/{} and below.
        route = (method, *("{}" if i == 1 and parts[0] == "users" else p for i, p in enumerate(parts)))
        call = self._ROUTES.get(route)
        if call is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such call: {method} {path}")
        return call(self, Request(parts, query, body, content_type))

    def _get_health(self, request: Request) -> Answer:
        return HTTPStatus.OK, self.health()

    def _get_openapi(self, request: Request) -> Answer:
        document = importlib.resources.files(__package__).joinpath("openapi.json").read_text("utf-8")
        return HTTPStatus.OK, json.loads(document)

    def _get_users(self, request: Request) -> Answer:
        return HTTPStatus.OK, {"users": self.server.users.names()}

    def _post_user(self, request: Request) -> Answer:
        fields = _json_object(request.body)
        user = self._user(_text(fields, "user"), must_exist=False)
        self.server.add_user(user, _text(fields, "password", "secret"))
        return HTTPStatus.CREATED, {"user": user}

    def _delete_user(self, request: Request) -> Answer:
        self.server.remove_user(self._user(request.parts[1]))
        return HTTPStatus.OK, {"removed": request.parts[1]}

    def _post_message(self, request: Request) -> Answer:
        user = self._user(request.parts[1])
        uid = request.query.get("uid", [None])[0]
        if request.content_type.startswith("application/json"):
            fields = _json_object(request.body)
            uid = fields.get("uid", uid)
            if "base64" in fields:
                try:
                    message = base64.b64decode(_text(fields, "base64"), validate=True)
                except binascii.Error as exc:
                    raise ApiError(HTTPStatus.BAD_REQUEST, f"base64: {exc}") from None
            else:
                message = _text(fields, "message").encode("utf-8")
        else:
            message = request.body
        if not message:
            raise ApiError(HTTPStatus.BAD_REQUEST, "an empty message")
        try:
            return HTTPStatus.CREATED, {"uid": self.server.deliver(user, message, uid)}
        except MaildropError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None

    def _get_mailbox(self, request: Request) -> Answer:
        return HTTPStatus.OK, _mailbox_json(self.server, self._user(request.parts[1]))

    def _get_faults(self, request: Request) -> Answer:
        return HTTPStatus.OK, {"faults": [f.to_json() for f in self.server.faults.active()]}

    def _post_fault(self, request: Request) -> Answer:
        fields = _json_object(request.body)
        try:
            fault = self.server.add_fault(**fields)
        except (TypeError, ValueError) as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"fault: {exc}") from None
        return HTTPStatus.CREATED, fault.to_json()

    def _delete_faults(self, request: Request) -> Answer:
        self.server.clear_faults()
        return HTTPStatus.OK, {"faults": []}

    def _post_reset(self, request: Request) -> Answer:
        self.server.reset()
        return HTTPStatus.OK, {"reset": True}

    def _get_transcript(self, request: Request) -> Answer:
        return HTTPStatus.OK, {"lines": self.server.transcript()}

    def _post_wait(self, request: Request) -> Answer:
        return HTTPStatus.OK, self._wait(request.query)

    _ROUTES: ClassVar[dict[tuple[str, ...], Callable[[Api, Request], Answer]]] = {
        ("GET", "health"): _get_health,
        ("GET", "openapi.json"): _get_openapi,
        ("GET", "users"): _get_users,
        ("POST", "users"): _post_user,
        ("DELETE", "users", "{}"): _delete_user,
        ("POST", "users", "{}", "messages"): _post_message,
        ("GET", "users", "{}", "mailbox"): _get_mailbox,
        ("GET", "faults"): _get_faults,
        ("POST", "faults"): _post_fault,
        ("DELETE", "faults"): _delete_faults,
        ("POST", "reset"): _post_reset,
        ("GET", "transcript"): _get_transcript,
        ("POST", "wait"): _post_wait,
    }

    def _wait(self, query: dict[str, list[str]]) -> dict[str, Any]:
        try:
            timeout = min(float(query.get("timeout", ["10"])[0]), _MAX_WAIT)
            deleted = int(query.get("deleted", ["0"])[0])
            retrieved = int(query.get("retrieved", ["0"])[0])
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, "timeout, deleted and retrieved are numbers") from None
        try:
            if deleted:
                self.server.wait_deleted(deleted, timeout)
            if retrieved:
                self.server.wait_retrieved(retrieved, timeout)
            self.server.wait_sessions_ended(timeout)
        except TimeoutError as exc:
            raise ApiError(HTTPStatus.REQUEST_TIMEOUT, str(exc)) from None
        controller = self.server.controller
        return {"sessions_ended": True, "deleted": controller.deleted, "retrieved": controller.retrieved}


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "the body is not a JSON object")
    return value


def _text(fields: dict[str, Any], name: str, default: str | None = None) -> str:
    value = fields.get(name, default)
    if not isinstance(value, str):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name!r} is required and must be a string")
    return value


class _Handler(BaseHTTPRequestHandler):
    api: Api  # set on the subclass made per server
    server_version = "qpopper-testserver"

    def _answer(self) -> None:
        url = urlsplit(self.path)
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0 or length > _MAX_BODY:
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"bodies are at most {_MAX_BODY} octets")
            body = self.rfile.read(length) if length else b""
            status, value = self.api.handle(
                self.command, url.path, parse_qs(url.query), body, self.headers.get("Content-Type", "")
            )
        except ApiError as exc:
            status, value = exc.status, {"error": str(exc)}
        except ValueError:
            status, value = HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"}
        data = json.dumps(value, indent=2).encode("utf-8") + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged: stdout carries the ready line only."""


def serve_api(api: Api, host: str, port: int) -> ThreadingHTTPServer:
    """Start the HTTP API in a daemon thread; returns its server."""
    handler = type("Handler", (_Handler,), {"api": api})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    api.api_url = f"http://{host}:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, name="qpopper-testserver-api", daemon=True).start()
    return httpd


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qpopper-testserver", description="A POP3 test server with an HTTP JSON API on loopback."
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address for POP3 and the API")
    parser.add_argument("--pop3-port", type=int, default=0, help="POP3 port (default: a free one)")
    parser.add_argument("--api-port", type=int, default=0, help="HTTP API port (default: a free one)")
    parser.add_argument("--tls", choices=("none", "stls", "implicit", "both"), default="none")
    parser.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD", help="create a user")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run until SIGTERM or SIGINT; exit 2 with one line for bad arguments."""
    args = _parser().parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost"):
        print(f"qpopper-testserver: the API has no access control; --host must be loopback, not {args.host}",
              file=sys.stderr)
        return 2
    users = []
    for item in args.user:
        name, sep, password = item.partition(":")
        if not sep or not is_valid_username(name):
            print(f"qpopper-testserver: --user wants NAME:PASSWORD, not {item!r}", file=sys.stderr)
            return 2
        users.append((name, password))
    server = TestServer(tls=args.tls, host=args.host, port=args.pop3_port)
    api = Api(server)
    try:
        server.start()
        httpd = serve_api(api, args.host, args.api_port)
    except (ConfigError, OSError) as exc:
        server.stop()
        print(f"qpopper-testserver: {exc}", file=sys.stderr)
        return 2
    for name, password in users:
        server.add_user(name, password)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(json.dumps(api.health()), flush=True)
    stop.wait()
    httpd.shutdown()
    httpd.server_close()
    server.stop()
    return 0
