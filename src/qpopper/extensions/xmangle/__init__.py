"""qpopper's XMANGLE: the modifier's grammar (`spec`), the condensing of
a message into one text part (`condense`) and the reading of a stored
message for it (`messages`)."""
