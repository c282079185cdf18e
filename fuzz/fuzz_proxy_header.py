"""Coverage-guided fuzzing of the PROXY protocol parser with atheris.

    python fuzz/fuzz_proxy_header.py -runs=20000          # the bounded run the tests do
    python fuzz/fuzz_proxy_header.py -max_total_time=600 corpus/

Any input, cut anywhere, must end in a header or a ProxyHeaderError, the
same verdict however it is cut, and the parser must never take a byte past
the header it found.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from qpopper.server.proxyheader import ProxyHeaderError, ProxyHeaderReader


def verdict(pieces: list[bytes]) -> tuple[object, int]:
    reader = ProxyHeaderReader()
    taken = 0
    try:
        for piece in pieces:
            used = reader.feed(piece)
            if not 0 <= used <= len(piece):
                raise AssertionError("took more than it was given")
            taken += used
            if reader.header is not None:
                if taken != reader.header.length:
                    raise AssertionError("took bytes past the header")
                return reader.header, taken
    except ProxyHeaderError:
        return "refused", taken
    return None, taken


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    pieces = []
    while fdp.remaining_bytes():
        pieces.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64)))
    whole = verdict([b"".join(pieces)] if pieces else [])
    cut = verdict(pieces)
    if whole[0] != cut[0]:
        raise AssertionError(f"verdict depends on the cuts: {whole!r} vs {cut!r}")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
