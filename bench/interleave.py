"""Arms timed epoch by epoch in turn, in one process, from the same initial weights.

The machine is shared and noisy: each arm waits for the others' epoch before running its next
one, so neighbouring epochs of all arms see the same load and ratios are taken per epoch pair.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedpath.client.embed.extract import cpu_supports_bf16
from fedpath.client.training.trainer import ValidationMetrics, resolve_precision


@dataclass
class ArmEpoch:
    """One arm's epoch: training seconds (validation excluded), steps, metrics after it."""

    seconds: float
    steps: int
    train_loss: float
    val: ValidationMetrics


class Turns:
    """Round-robin hand-off between arm threads: exactly one arm computes at any time.

    Each arm runs in its own thread (the trainer is one call that runs every epoch; only its
    ``on_epoch`` hook lets it pause), and waits for its turn at the start of every epoch, so
    epoch ``e`` of every arm runs before epoch ``e + 1`` of any.
    """

    def __init__(self, n: int) -> None:
        self._turn = 0
        self._n = n
        self._cv = threading.Condition()

    def wait(self, arm: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._turn == arm)

    def done(self, arm: int) -> None:
        with self._cv:
            self._turn = (arm + 1) % self._n
            self._cv.notify_all()


def run_arms(
    arms: dict[str, Callable[[Callable[[ArmEpoch], None]], None]],
    epochs: int,
    report: Callable[[str, int, ArmEpoch], None],
) -> dict[str, list[ArmEpoch]]:
    """Run every arm for ``epochs`` epochs, interleaved epoch by epoch."""
    names = list(arms)
    turns = Turns(len(names))
    results: dict[str, list[ArmEpoch]] = {name: [] for name in names}
    errors: list[BaseException] = []

    def runner(index: int, name: str) -> None:
        def after_epoch(record: ArmEpoch) -> None:
            results[name].append(record)
            report(name, len(results[name]) - 1, record)
            turns.done(index)
            if len(results[name]) < epochs:
                turns.wait(index)

        turns.wait(index)
        try:
            arms[name](after_epoch)
        except BaseException as exc:  # surface in the main thread, let the others go on
            errors.append(exc)
            turns.done(index)

    threads = [
        threading.Thread(target=runner, args=(i, name), daemon=True) for i, name in enumerate(names)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def contrast_precision() -> str | None:
    """The precision of an arm that contrasts the shipped one: float32 where "auto" is bfloat16,
    bfloat16 where it is float32 but the CPU has native bfloat16, else None."""
    if resolve_precision("auto", torch.device("cpu")) == "bfloat16":
        return "float32"
    return "bfloat16" if cpu_supports_bf16() else None
