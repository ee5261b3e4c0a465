"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def flower_task() -> Iterator[None]:
    """Flower's Message constructor reads the process's task identity, which a SuperLink or
    SuperNode sets; Flower's own tests set it in a fixture the same way."""
    from server.inprocess_grid import task_identity

    with task_identity():
        yield
