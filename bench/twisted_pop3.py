#!/usr/bin/env python3
"""Twisted's POP3 server on a directory of Maildirs: the Python peer of bench/run.py.

Run by bench/run.py with the interpreter of a virtualenv holding Twisted (it makes one, or
is given one with --twisted-venv); it imports nothing of qpopper. Put together from
Twisted's own parts the way its documentation shows a POP3 server: a cred Portal whose
checker is a FilePasswordDB (the same `user:password` file for every user, plain text),
a realm that hands each avatar a `MaildirMailbox`, and a factory of `pop3.POP3`
protocols sharing that portal. No log observer is started, so Twisted writes no record
per session (ours writes two: the benchmark runs ours with its default logging on).

    python bench/twisted_pop3.py --maildirs DIR --passwd FILE --port N [--tls-port N --cert PEM --key PEM]

It prints one line, "ready", once it listens, and runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import sys

from twisted.cred.checkers import FilePasswordDB
from twisted.cred.portal import IRealm, Portal
from twisted.internet import endpoints, protocol, reactor
from twisted.mail import maildir, pop3
from zope.interface import implementer


@implementer(IRealm)
class MaildirRealm:
    """Each authenticated user gets the Maildir named after them under one root."""

    def __init__(self, root: bytes) -> None:
        self.root = root

    def requestAvatar(self, avatar_id: bytes, mind: object, *interfaces: object):
        if pop3.IMailbox not in interfaces:
            raise NotImplementedError("this realm only hands out POP3 mailboxes")
        mailbox = maildir.MaildirMailbox(os.path.join(self.root, avatar_id))
        return pop3.IMailbox, mailbox, lambda: None


class POP3Factory(protocol.ServerFactory):
    """A `pop3.POP3` per connection, each given the shared portal."""

    protocol = pop3.POP3

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def buildProtocol(self, addr: object) -> pop3.POP3:
        proto = protocol.ServerFactory.buildProtocol(self, addr)
        proto.portal = self.portal
        return proto


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--maildirs", required=True, help="directory holding one Maildir per user")
    p.add_argument("--passwd", required=True, help="file of user:password lines (plain text)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls-port", type=int, help="also listen with implicit TLS here (needs --cert and --key)")
    p.add_argument("--cert")
    p.add_argument("--key")
    a = p.parse_args()
    # cache=True: the users are read once, as our passwd-file is; Twisted's default
    # re-reads the file at every login, which would handicap it.
    checker = FilePasswordDB(a.passwd, cache=True)
    portal = Portal(MaildirRealm(os.fsencode(a.maildirs)), [checker])
    factory = POP3Factory(portal)
    listening = [endpoints.serverFromString(reactor, f"tcp:{a.port}:interface=127.0.0.1").listen(factory)]
    if a.tls_port:
        spec = f"ssl:{a.tls_port}:interface=127.0.0.1:privateKey={a.key}:certKey={a.cert}"
        listening.append(endpoints.serverFromString(reactor, spec).listen(factory))

    def ready(_: object) -> None:
        print("ready", flush=True)

    def failed(err: object) -> None:
        print(f"twisted_pop3: cannot listen: {err}", file=sys.stderr, flush=True)
        reactor.stop()

    from twisted.internet.defer import gatherResults

    gatherResults(listening, consumeErrors=True).addCallbacks(ready, failed)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
