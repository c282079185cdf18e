"""XMANGLE's protocol half: the XMANGLE(...) modifier on LIST, RETR and
TOP, and the sizes of messages as they will be sent once mangled.

A mangled message's size is only known once the server has condensed it,
so a command that needs one asks for it (ComputeSizes) and runs again when
the answer is in; the sizes are kept for the rest of the session, so the
LIST that the client sends before each RETR costs one computation, not two.
"""

from __future__ import annotations

from ...protocol import Awaiting, CommandContext, ComputeSizes
from .spec import NO_MIME, MangleSpec, parse_modifier


def split_modifier(ctx: CommandContext, args: list[bytes]) -> tuple[list[bytes], MangleSpec | None] | None:
    """Split an XMANGLE(...) modifier off the arguments (it may hold
    spaces); without one, -no-mime's spec applies. None: refused."""
    for i, arg in enumerate(args):
        if arg[:7].upper() == b"XMANGLE":
            try:
                spec = parse_modifier(b" ".join(args[i:]).decode("ascii"))
            except ValueError as exc:
                ctx.bad(f"Bad XMANGLE modifier: {exc}"[:200])
                return None
            return args[:i], spec
    return args, (NO_MIME if ctx.mangle else None)


def sizes_as_sent(
    ctx: CommandContext, indices: list[int], spec: MangleSpec | None, line: bytes
) -> dict[int, int] | None:
    """Sizes of these messages as they will be sent; None if some must be
    computed first (the command `line` then runs again)."""
    if spec is None:
        stored = ctx.messages.sizes
        return {i: stored[i] for i in indices}
    known = ctx.mangled_sizes or {}
    missing = tuple(i for i in indices if (spec, i) not in known)
    if missing:
        ctx.rerun_after(ComputeSizes(spec, missing), Awaiting.SIZES, line)
        return None
    return {i: known[(spec, i)] for i in indices}


def remember_sizes(ctx: CommandContext, spec: MangleSpec, computed: dict[int, int]) -> None:
    """Keep the server's answer to ComputeSizes for the rest of the session."""
    if ctx.mangled_sizes is None:
        ctx.mangled_sizes = {}
    for index, size in computed.items():
        ctx.mangled_sizes[(spec, index)] = size
