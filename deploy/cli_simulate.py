"""``fedpath simulate``: the same ServerApp and ClientApp in Flower's simulation engine.

Many synthetic sites on one machine (``fedpath.deploy.simulate``): for trying strategies and
round timings at a scale no test network reaches.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fedpath.common.errors import ConfigError

EXIT_OK, EXIT_FAILED = 0, 1


def cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    from fedpath.deploy.simulate import run_simulation, simulation_run_config

    if args.sites < 2:
        raise ConfigError(f"--sites must be at least 2, got {args.sites}")
    run_config = simulation_run_config(args.rounds, args.strategy, args.local_epochs)
    console.print(
        f"simulating {args.sites} synthetic sites in Flower's simulation engine under {args.out}",
        soft_wrap=True,
    )
    shown = 0

    def progress(rounds: list[dict[str, Any]]) -> None:
        nonlocal shown
        for record in rounds[shown:]:
            weights = list(record["weights"].values())
            console.print(
                f"round {record['round']}: {len(record['replied'])}/{len(record['sampled'])} "
                f"sites, {record['seconds']:.1f} s, weights {min(weights):.3f}–"
                f"{max(weights):.3f}, val AUC {record['global'].get('val_auc') or float('nan'):.3f}"
            )
        shown = len(rounds)

    result = run_simulation(args.out, args.sites, run_config, seed=args.seed, on_poll=progress)
    progress(result.rounds)
    per_round = [r["seconds"] for r in result.rounds]
    if per_round:
        console.print(
            f"{len(per_round)} round(s), median {sorted(per_round)[len(per_round) // 2]:.1f} s "
            f"per round with {args.sites} sites; total {result.seconds:.0f} s"
        )
    if result.run_dir.is_dir():
        console.print(f"run directory: {result.run_dir}", soft_wrap=True)
    else:  # a path that does not exist sends the reader looking for files that never were
        console.print(
            f"no run directory: the ServerApp wrote none ({result.run_dir})", soft_wrap=True
        )
    if result.status != "finished:completed":
        console.print(f"[bold red]the simulation did not complete ({result.status})[/]")
        reason = result.reason or "not recorded by the ServerApp (see its log)"
        console.print(f"reason: {escape(reason)}", soft_wrap=True)
        if result.server_log is not None:
            console.print(f"ServerApp log: {result.server_log}", soft_wrap=True)
        return EXIT_FAILED
    return EXIT_OK


def add_simulate_command(sub: Any) -> None:
    """Register ``simulate``."""
    simulate = sub.add_parser(
        "simulate",
        help="the same apps in Flower's simulation engine, many synthetic sites",
        description="Write N synthetic prepared sites and run one federated run over them "
        "with Flower's simulation engine (Ray) on this machine.",
    )
    simulate.add_argument("--sites", type=int, default=20, help="virtual hospitals (20)")
    simulate.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    simulate.add_argument("--strategy", choices=("fedmix", "fedavg"), default="fedmix")
    simulate.add_argument("--local-epochs", type=int, default=1, help="epochs per round (1)")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--out", type=Path, default=Path("simulation-output"))
    simulate.set_defaults(handler=cmd_simulate)
