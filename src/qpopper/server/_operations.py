"""What an operator turns on for a running server: the metrics and the
control socket. Loaded only when `metrics-listen` or `control-dir` is set,
so a plain server imports neither the metrics nor this."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ._tally import CountingStream

if TYPE_CHECKING:
    from ._server import Server


def attach(server: Server, per_session_process: bool) -> None:
    """Give `server` its counting streams, its metrics and its control socket, as configured."""
    options = server.options
    tally = None
    if options.metrics_listen:
        if not options.metrics_dir:
            raise ConfigError("metrics-listen needs the metric files' directory (metrics-dir); the daemon sets one")
        from ._metrics import Metrics  # prometheus-client: only where metrics are on

        tally = Metrics(options.metrics_dir, server.sessions)
        tally.publish_each_session = per_session_process
        server.services.tally = tally
    server.new_stream = functools.partial(CountingStream, tally=tally)
    if options.control_dir:
        from ._control import ControlListener

        server.control = ControlListener(server, options.control_dir)
