"""Where a hospital node's fedpath lines go: the SuperNode's log, as ``fedpath: <message>``.

The ClientApp's modules and the resident worker log on their module loggers
(``fedpath.client.*``). Flower starts the ClientApp in a process that configured no logging
of ours, and the worker is a process of its own; both write to stderr, which is where the
SuperNode's log is. :func:`node_log` is what their entry points (the ClientApp's lifespan,
the worker's ``main``) wrap their work in.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from fedpath.common.logs import handler_attached

__all__ = ["NODE_LOG_FORMAT", "node_log"]

NODE_LOG_FORMAT = "fedpath: %(message)s"


class _Stderr(logging.Handler):
    """Writes to the ``sys.stderr`` of the moment: Flower's ClientApp process mirrors it
    into the node's log, and a test's captured stream is a new object each time."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # a logging handler never raises into the code that logged
            self.handleError(record)


@contextmanager
def node_log(level: int = logging.INFO) -> Iterator[None]:
    """Send ``fedpath.client``'s records of ``level`` and above to stderr for the duration.

    A process that configured the ``fedpath`` loggers itself (the ``fedpath`` command, a
    ServerApp running the in-process grid) keeps its own handlers and gets the records there
    instead, once. Level and handlers are restored on exit.
    """
    logger = logging.getLogger("fedpath.client")
    if logger.handlers or logging.getLogger("fedpath").handlers:
        yield
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter(NODE_LOG_FORMAT))
    with handler_attached("fedpath.client", handler, level):
        yield
