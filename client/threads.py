"""How many intra-op threads torch may use for a block of work, and a node's setting for it.

A hospital machine that runs one SuperNode should let torch use every core (torch's default).
Several nodes on one machine (the demo, the benchmarks, a compose file on one host) must not:
each worker would start one OpenMP thread per core, and threads of one parallel region wait
for each other at its end, so a region stalls whenever another process holds one of its cores
(measured in ``bench/load.py``: the same site's round took 5-30 s instead of 0.3-2 s with two
threads per site on two loaded cores). The node config key ``torch-threads`` caps it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from fedpath.common.errors import ConfigError

NODE_THREADS_KEY = "torch-threads"
MAX_THREADS = 1024


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block and restore it afterwards.

    torch is imported here, not at module import: the ClientApp's message process imports
    this module and must stay light when it only forwards to the resident worker.
    """
    if count is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def node_torch_threads(node_config: Mapping[str, Any]) -> int | None:
    """The node's ``torch-threads`` (None: torch's default, every core); ConfigError if bad."""
    value = node_config.get(NODE_THREADS_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_THREADS:
        raise ConfigError(
            f"node config {NODE_THREADS_KEY} must be a whole number from 1 to {MAX_THREADS}, "
            f"got {value!r}"
        )
    return value
