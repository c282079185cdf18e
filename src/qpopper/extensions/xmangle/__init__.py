"""qpopper's XMANGLE: the modifier's grammar (`spec`), the reading of a
stored message for it (`messages`) and the condensing of a message into
one text part (`condense.mangle`, which uses the other modules here).

A plain session imports only `spec` and `messages`; `messages` imports
`condense` on the first mangle, and with it the email package, so a
daemon that never mangles does not carry them.
"""
