"""RFC 5929 tls-server-end-point, read straight from the certificate's DER.

The binding is a hash of the server certificate, made with the hash of the
certificate's own signature algorithm (SHA-256 standing in for MD5, SHA-1
and algorithms without a single hash, such as Ed25519). Finding that hash
needs one field of the certificate, so a few lines of DER reading do here
what loading an X.509 library (about 8 MB of a server's memory) would.
"""

from __future__ import annotations

import hashlib
import re
import ssl

from ..errors import ConfigError

# signatureAlgorithm -> the hash it signs with (RFC 4055, 5758, 8017).
_SIGNATURE_HASHES = {
    "1.2.840.113549.1.1.11": "sha256",  # sha256WithRSAEncryption
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
    "1.2.840.113549.1.1.14": "sha224",
    "1.2.840.10045.4.3.1": "sha224",  # ecdsa-with-SHA224
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
    "2.16.840.1.101.3.4.3.1": "sha224",  # dsa-with-sha224
    "2.16.840.1.101.3.4.3.2": "sha256",
}
_RSASSA_PSS = "1.2.840.113549.1.1.10"
# Hash algorithms as they appear inside RSASSA-PSS parameters.
_HASHES = {
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    "2.16.840.1.101.3.4.2.4": "sha224",
}
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _element(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at `pos`."""
    if pos + 2 > len(der):
        raise ValueError("truncated")
    tag, first = der[pos], der[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or pos + count > len(der):
            raise ValueError("bad length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > len(der):
        raise ValueError("truncated")
    return tag, pos, pos + length


def _oid(content: bytes) -> str:
    first, arcs, value = content[0], [], 0
    arcs += [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    for byte in content[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    return ".".join(map(str, arcs))


def _signature_hash(der: bytes) -> str:
    """The hash RFC 5929 wants for this DER certificate."""
    tag, cert, _ = _element(der, 0)  # Certificate
    tag_tbs, _, tbs_end = _element(der, cert)  # tbsCertificate
    tag_alg, alg, alg_end = _element(der, tbs_end)  # signatureAlgorithm
    tag_oid, oid_start, oid_end = _element(der, alg)
    if (tag, tag_tbs, tag_alg, tag_oid) != (0x30, 0x30, 0x30, 0x06):
        raise ValueError("not an X.509 certificate")
    oid = _oid(der[oid_start:oid_end])
    if oid == _RSASSA_PSS and oid_end < alg_end:
        # RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier
        # DEFAULT sha1, ... }: the hash is in the parameters.
        tag, params, params_end = _element(der, oid_end)
        if tag == 0x30 and params < params_end:
            tag, explicit, _ = _element(der, params)
            if tag == 0xA0:
                _, ident, _ = _element(der, explicit)
                tag, start, end = _element(der, ident)
                if tag == 0x06:
                    return _HASHES.get(_oid(der[start:end]), "sha256")
    return _SIGNATURE_HASHES.get(oid, "sha256")


def server_end_point(cert_file: str) -> bytes:
    """The channel binding of the first certificate in `cert_file` (PEM)."""
    try:
        with open(cert_file, "rb") as f:
            match = _PEM_CERT.search(f.read())
        if match is None:
            raise ValueError("no PEM certificate")
        der = ssl.PEM_cert_to_DER_cert(match.group(0).decode("ascii"))
        return hashlib.new(_signature_hash(der), der).digest()
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the certificate {cert_file}: {exc}") from None
