"""The embedded default: a demo user and a small Maildir under the working
tree, so that one command gives a server anyone can talk to without root
and without touching the system."""

from __future__ import annotations

import datetime
import ipaddress
import os
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEMO_DIR = "qpopper-demo"
DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
DEMO_PORT = 1110
DEMO_TLS_PORT = 1995


@dataclass(frozen=True, slots=True)
class DemoSetup:
    passwd: str
    mail_location: str
    cert: str
    key: str


def _throwaway_certificate(cert_path: str, key_path: str) -> None:
    """A self-signed certificate for localhost, so STLS and implicit TLS
    work out of the box (clients must be told to trust it: curl -k)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qpopper demo (localhost)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))

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


def prepare(base: str | None = None) -> DemoSetup:
    """Create (once) the demo tree: users, mail and a certificate."""
    root = os.path.abspath(base or DEMO_DIR)
    cert = os.path.join(root, "tls-cert.pem")
    key = os.path.join(root, "tls-key.pem")
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
            ).encode()
            name = f"{now}.M{number}P{os.getpid()}.demo"
            tmp = os.path.join(maildir, "tmp", name)
            with open(tmp, "wb") as f:
                f.write(message)
            os.rename(tmp, os.path.join(maildir, "new", name))
    if not (os.path.exists(cert) and os.path.exists(key)):
        _throwaway_certificate(cert, key)
    return DemoSetup(passwd, "maildir:~/Maildir", cert, key)


def banner(listeners: list[tuple[str, int, bool]]) -> str:
    user = f"{DEMO_USER}:{DEMO_PASSWORD}"
    host, port, _ = next(item for item in listeners if not item[2])
    lines = [
        f"qpopper demo server on {host}:{port}  (user {DEMO_USER!r}, password {DEMO_PASSWORD!r})",
        f"  list:      curl pop3://{user}@{host}:{port}/",
        f"  message 1: curl pop3://{user}@{host}:{port}/1",
        f"  with STLS: curl -k --ssl-reqd pop3://{user}@{host}:{port}/1",
    ]
    for tls_host, tls_port, tls in listeners:
        if tls:
            lines.append(f"  pop3s:     curl -k pop3s://{user}@{tls_host}:{tls_port}/1   (implicit TLS)")
    lines += [
        f"  by hand:   telnet {host} {port}   (USER {DEMO_USER} / PASS {DEMO_PASSWORD} / LIST / RETR 1 / QUIT)",
        f"The certificate is a throwaway self-signed one (hence -k). Stop with Ctrl-C. Mail lives in ./{DEMO_DIR}/.",
    ]
    return "\n".join(lines)
