"""The coordinator's Flower ServerApp: one federated run, from the gate to the final report.

``flwr run . CONNECTION`` ships this app to the SuperLink, which starts ``main`` with the run
config of ``[tool.flwr.app.config]`` (plus ``-c`` overrides). The run directory is
``<runs-dir>/<run-name or flwr-<run id>>``; ``resume="<run dir>"`` continues such a directory
from its last checkpoint with the configuration recorded there, to the same final round.

A run that cannot complete raises after writing ``final.json`` with ``status = "failed"`` and
the reason, so Flower marks the run failed and the report says why.

The round loop logs on the ``fedpath`` loggers; while ``main`` runs, their records go to
Flower's own logger as ``[fedpath] <message>`` lines, which is what ``flwr log`` shows and what
``fedpath run`` reads the run directory from (``server.run_log.RUN_DIR_PREFIX``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpath.common.logs import handler_attached

__all__ = ["FLOWER_PREFIX", "app", "fedpath_to_flower_log", "main"]

app = ServerApp()

FLOWER_PREFIX = "[fedpath] "
"""What marks fedpath's lines in the ServerApp's log among Flower's own."""


class _ToFlowerLog(logging.Handler):
    """Re-logs a fedpath record on Flower's logger, at its level, as ``[fedpath] <message>``:
    Flower's handler formats it and ships it to the SuperLink with the rest of the app's log."""

    def emit(self, record: logging.LogRecord) -> None:
        from flwr.common.logger import FLOWER_LOGGER

        try:
            FLOWER_LOGGER.log(
                record.levelno,
                "%s%s",
                FLOWER_PREFIX,
                record.getMessage(),
                exc_info=record.exc_info,
            )
        except Exception:  # a logging handler never raises into the code that logged
            self.handleError(record)


@contextmanager
def fedpath_to_flower_log(level: int = logging.INFO) -> Iterator[None]:
    """Send the ``fedpath`` loggers' records of ``level`` and above to Flower's log for the
    duration; the logger's level and handlers are restored afterwards."""
    with handler_attached("fedpath", _ToFlowerLog(), level):
        yield


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls in the ServerApp process."""
    from fedpath.server.config import RunConfig
    from fedpath.server.federated_run import run_federated

    with fedpath_to_flower_log():
        cfg = RunConfig.from_run_config(dict(context.run_config))
        run_federated(grid, cfg, flwr_run_id=int(context.run_id))
