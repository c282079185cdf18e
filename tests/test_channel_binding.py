"""tls-server-end-point from our small DER reader, checked against the
`cryptography` package's reading of the same certificates, and refusals of
files that are not certificates."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from qpopper.errors import ConfigError
from qpopper.server._channel_binding import server_end_point


def _reference(cert: x509.Certificate) -> bytes:
    """RFC 5929 as cryptography sees the certificate."""
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, (hashes.MD5, hashes.SHA1)):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert.public_bytes(serialization.Encoding.DER))
    return digest.finalize()


# The digests a certificate may be signed with (cryptography's own annotation of sign()).
_SigningHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512


def _certificate(key: Any, algorithm: _SigningHash | None, **sign: Any) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pop.example.org")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    return builder.sign(key, algorithm, **sign)


_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_PSS = {"rsa_padding": padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)}
KINDS = {
    "rsa-sha256": lambda: _certificate(_RSA, hashes.SHA256()),
    "rsa-sha384": lambda: _certificate(_RSA, hashes.SHA384()),
    "rsa-sha512": lambda: _certificate(_RSA, hashes.SHA512()),
    "rsa-pss-sha512": lambda: _certificate(_RSA, hashes.SHA512(), **_PSS),
    "rsa-pss-sha384": lambda: _certificate(_RSA, hashes.SHA384(), **_PSS),
    "ecdsa-p256-sha256": lambda: _certificate(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()),
    "ecdsa-p384-sha384": lambda: _certificate(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()),
    "ecdsa-p521-sha512": lambda: _certificate(ec.generate_private_key(ec.SECP521R1()), hashes.SHA512()),
    "ed25519": lambda: _certificate(ed25519.Ed25519PrivateKey.generate(), None),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_binding_matches_the_reference(kind: str, tmp_path: Path) -> None:
    cert = KINDS[kind]()
    path = tmp_path / "cert.pem"
    # A chain file: the server's certificate first, then an intermediate.
    other = KINDS["ecdsa-p256-sha256"]()
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + other.public_bytes(serialization.Encoding.PEM))
    assert server_end_point(str(path)) == _reference(cert)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
     b"-----BEGIN CERTIFICATE-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END CERTIFICATE-----\n"],
)
def test_what_is_not_a_certificate_is_a_clear_error(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="cannot read the certificate"):
        server_end_point(str(path))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the certificate"):
        server_end_point(str(tmp_path / "absent.pem"))
