"""qpopper's protocol extensions as pure, I/O-free building blocks.

The protocol core and the server wire these in; nothing here touches a
socket, a file or a clock.
"""
