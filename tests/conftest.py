"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from bench.prepared_cohort import PreparedCohort


@pytest.fixture
def flower_task() -> Iterator[None]:
    """Flower's Message constructor reads the process's task identity, which a SuperLink or
    SuperNode sets; Flower's own tests set it in a fixture the same way."""
    from fedpath.deploy.inprocess_grid import task_identity

    with task_identity():
        yield


@pytest.fixture(autouse=True, scope="session")
def _export_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Exported encoder graphs and backend choices go to a session folder, not ~/.cache.

    Subprocesses inherit it, so every `fedpath prepare` a test starts shares one export per
    encoder instead of exporting and measuring in each.
    """
    CACHE_ENV = "FEDPATH_CACHE_DIR"  # fedpath.client.embed.backends.CACHE_ENV (not imported: torch)
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("fedpath-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> PreparedCohort:
    """``tests/bench_fixtures.py``'s TINY cohort, generated and prepared once per session for
    every benchmark test that scores on it (``cohort.root.parent`` is its cache)."""
    import torch

    from bench.prepared_cohort import build_cohort
    from tests.bench_fixtures import TINY

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that built it themselves ran
    try:
        return build_cohort(TINY, tmp_path_factory.mktemp("tiny-cohort"))
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny forward passes split over threads only wait on each other (see bench.accuracy)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LONGEST_FILES = (
    "tests/test_demo.py",
    "tests/test_faults.py",
    "tests/test_fault_coordinator_loss.py",
    "tests/test_fault_all_sites_lost.py",
    "tests/test_deployment.py",
    "tests/test_cli_coordinator.py",
    "tests/test_coordinator_truth.py",
    "tests/test_security.py",
    "tests/test_reverse_proxy.py",
    "tests/test_simulate.py",
    "tests/test_load.py",
    "tests/test_golden.py",
)
"""The files whose tests run longest (real Flower processes, the demo, large real slides),
longest first, as measured with ``--durations`` on the 2-core CI machine."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first, each file's tests together and in their own order: with
    pytest-xdist's ``--dist loadfile`` (as scripts/test.sh runs) they are handed out first
    (in batches, so some share a worker), and a module-scoped fixture is built once."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
