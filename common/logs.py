"""Routing fedpath's log records somewhere for the length of one job.

Library modules only log (``logging.getLogger(__name__)``); what hears them is decided by the
process: the ``fedpath`` command (the terminal or a log file), the ServerApp (Flower's log,
which reaches ``flwr log``), a ClientApp (the SuperNode's stderr). Each attaches its handler
for the duration and puts the logger back as it was, so nothing is configured at import.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["handler_attached"]


@contextmanager
def handler_attached(logger_name: str, handler: logging.Handler, level: int) -> Iterator[None]:
    """``handler`` on ``logger_name`` at ``level`` inside the block; level and handlers after
    it are what they were before."""
    logger = logging.getLogger(logger_name)
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
