"""The coordinator's Flower ServerApp: one federated run, from the gate to the final report.

``flwr run . CONNECTION`` ships this app to the SuperLink, which starts ``main`` with the run
config of ``[tool.flwr.app.config]`` (plus ``-c`` overrides). The run directory is
``<runs-dir>/<run-name or flwr-<run id>>``; ``resume="<run dir>"`` continues such a directory
from its last checkpoint with the configuration recorded there, to the same final round.

A run that cannot complete raises after writing ``final.json`` with ``status = "failed"`` and
the reason, so Flower marks the run failed and the report says why.
"""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _log(text: str) -> None:
    from flwr.common.logger import log

    log(INFO, "[fedpath] %s", text)


def _warn(text: str) -> None:
    from flwr.common.logger import log

    log(WARNING, "[fedpath] %s", text)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls in the ServerApp process."""
    from fedpath.server.config import RunConfig
    from fedpath.server.federated_run import run_federated

    cfg = RunConfig.from_run_config(dict(context.run_config))
    run_federated(grid, cfg, flwr_run_id=int(context.run_id), report=_log, warn=_warn)
