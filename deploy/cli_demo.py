"""``fedpath demo``: three synthetic hospitals on this machine, end to end, real processes.

Stages: synthesise slides → ``fedpath prepare`` per hospital → a SuperLink and one SuperNode
per hospital on loopback → one federated FedMix run submitted with ``flwr run`` → run report.
Every stage shows progress; at the end one table per site (test AUC, patch AUC, weight, with
a line saying what the weight is) and the time per stage. Every hospital's test slides carry
complete outlines (``fedpath.synthetic.cli.demo_cohort_config``), so patch AUC is measured at each
one; the prepared-hospitals table shows which split the outlined slides are in. Every process
the demo starts is stopped when it ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedpath.common.errors import ConfigError

EXIT_OK, EXIT_PARTIAL = 0, 1


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if not isinstance(x, int | float) or not math.isfinite(x) else f"{x:.{digits}f}"


def _prepare_sites(
    args: argparse.Namespace,
    console: Console,
    prepare_overrides: Callable[[argparse.Namespace], dict[str, Any]],
    generate_cohort: Callable[[argparse.Namespace, Path, Console], list[Path]],
    stage_seconds: dict[str, float],
) -> tuple[dict[str, Path], int]:
    """Synthesise and prepare each hospital; (site → prepared dir, failed slide count)."""
    from fedpath.client.config import PrepareConfig
    from fedpath.client.prepare.pipeline import prepare_site
    from fedpath.client.progress import prepare_events, summary_line
    from fedpath.common.configio import build_config

    if args.tissue_preset is None:
        args.tissue_preset = "biopsy"  # synthetic slides are biopsy-sized (a few mm² of tissue)
    cfg = build_config(PrepareConfig, args.config, prepare_overrides(args))
    if cfg.patch_only:
        raise ConfigError(
            f"{args.config}: patch_only = true stops before embedding, and the demo trains on "
            "the embedded features; remove it here (it is for `fedpath prepare`)"
        )
    out: Path = args.out
    began = time.perf_counter()
    site_dirs = generate_cohort(args, out / "hospitals", console)
    stage_seconds["synthesise"] = time.perf_counter() - began

    table = Table(
        title="prepared hospitals",
        caption="outlined: slides with patch labels in the train / val / test split",
    )
    columns = ("site", "slides", "tumour / normal", "outlined", "patches", "patches/s")
    for column in columns:
        table.add_column(column, justify="left" if column == "site" else "right")
    prepared: dict[str, Path] = {}
    failed = 0
    for site_dir in site_dirs:
        began = time.perf_counter()
        with prepare_events(console, site_dir.name) as events:
            summary = prepare_site(
                site_dir / "slides.csv", out / "prepared" / site_dir.name, cfg, events=events
            )
        stage_seconds[f"prepare {site_dir.name}"] = time.perf_counter() - began
        # which hospital the totals are of, on one line (the site's name is text, not markup)
        console.print(escape(f"[{site_dir.name}] {summary_line(summary)}"), soft_wrap=True)
        if summary.inference:
            console.print(
                escape(f"[{site_dir.name}] encoder ran as: {summary.inference}"), soft_wrap=True
            )
        failed += summary.count("failed")
        site = json.loads((summary.out_dir / "site.json").read_text(encoding="utf-8"))
        by_label = site["slides"]["by_label"]
        table.add_row(
            site_dir.name,
            str(site["slides"]["usable"]),
            f"{by_label.get('tumour', 0)} / {by_label.get('normal', 0)}",
            outlined_by_split(summary.out_dir),
            str(site["patches"]),
            f"{summary.patches_per_second:.1f}",
        )
        prepared[site_dir.name] = summary.out_dir
    console.print(table)
    return prepared, failed


def outlined_by_split(prepared: Path) -> str:
    """``train / val / test`` counts of the prepared slides that carry patch labels.

    Read from the site's own index (``prepared.csv``), the file training reads: it shows that
    the outlines of the test slides are not in the training split.
    """
    from fedpath.client.prepare.records import INDEX_FILE

    counts = dict.fromkeys(("train", "val", "test"), 0)
    unsplit = 0
    with (prepared / INDEX_FILE).open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if (row.get("has_patch_labels") or "").strip().lower() != "true":
                continue
            split = row.get("split") or ""
            if split in counts:
                counts[split] += 1
            else:
                unsplit += 1
    if unsplit:
        return f"{sum(counts.values()) + unsplit} (no split column)"
    return " / ".join(str(n) for n in counts.values())


def _federate(
    args: argparse.Namespace, console: Console, prepared: dict[str, Path]
) -> tuple[Any, dict[str, float]]:
    from fedpath.deploy.demo_federation import run_demo_federation

    out: Path = args.out
    run_config = {
        "num-server-rounds": args.rounds,
        "strategy": args.strategy,
        "local-epochs": args.local_epochs,
        "min-sites": len(prepared),
        "min-fit-fraction": 0.6,
        # No split-folds: every demo manifest gives each slide its split (outlined test slides).
        "connect-timeout": 120.0,
        "round-timeout": 600.0,
        "runs-dir": str((out / "runs").resolve()),
        "run-name": "demo",
    }
    from fedpath.client.progress import bar_or_lines

    progress = bar_or_lines(
        console,
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with progress:
        task = progress.add_task("federated rounds", total=args.rounds, status="starting")

        def on_stage(text: str) -> None:
            progress.update(task, status=text)

        def on_round(rounds: list[dict[str, Any]]) -> None:
            if not rounds:
                progress.update(task, status="round 1 running")
                return
            last = rounds[-1]
            glob = last.get("global", {})
            weights = ", ".join(f"{s} {w:.2f}" for s, w in sorted(last["weights"].items()))
            failed = f", {len(last['failed'])} failed" if last.get("failed") else ""
            progress.update(
                task,
                completed=len(rounds),
                status=f"val AUC {_fmt(glob.get('val_auc'))}; weights {weights}{failed}",
            )

        result = run_demo_federation(
            prepared, out, run_config, on_stage=on_stage, on_round=on_round
        )
    return result, result.seconds


def weight_note(run_config: dict[str, Any]) -> str:
    """One line saying what the final table's weight column is, for the run's strategy."""
    if run_config.get("strategy", "fedmix") == "fedavg":
        return (
            "weight: the site's share in the last round's model average, n/Σn "
            "(FedAvg; n: training slides)"
        )
    lam, beta = run_config.get("fedmix-lambda", 10.0), run_config.get("fedmix-beta", 1.5)
    return (
        f"weight: the site's share in the last round's model average, ∝ n/Σn + "
        f"{lam:g}·L^{beta:g}/ΣL^{beta:g} (FedMix; n: training slides, L: training loss)"
    )


def threshold_note(final: dict[str, Any]) -> str:
    """One line saying at which threshold the balanced accuracy column was measured: the
    federated model's probabilities are calibrated on the sites' validation slides when they
    allow it, and the reader must know whether the column is that or the argmax."""
    calibration = final.get("calibration") or {}
    if calibration.get("fitted"):
        description = calibration.get("description")
        return f"balanced acc.: calibrated on the sites' validation slides: {description}"
    reason = calibration.get("reason")
    return "balanced acc.: at the argmax, uncalibrated" + (f" ({reason})" if reason else "")


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The run's recorded settings (``config.json``), or none when the run never started."""
    try:
        data = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    settings = data.get("run_config") if isinstance(data, dict) else None
    return settings if isinstance(settings, dict) else {}


def _final_table(result: Any) -> Table:
    table = Table(
        title=f"federated model ({len(result.rounds)} rounds): held-out test slides",
        caption=f"{weight_note(_run_config(result.run_dir))}\n{threshold_note(result.final or {})}",
    )
    table.add_column("site", no_wrap=True)
    for column in ("test slides", "slide AUC", "patch AUC", "balanced acc.", "weight"):
        table.add_column(column, justify="right")
    final = result.final or {}
    weights = result.rounds[-1]["weights"] if result.rounds else {}
    for site, m in sorted((final.get("test") or {}).items()):
        table.add_row(
            site,
            str(m.get("num_examples")),
            _fmt(m.get("auc")),
            _fmt(m.get("patch_auc")),
            _fmt(m.get("balanced_accuracy")),
            _fmt(weights.get(site)),
        )
    g = final.get("global_test") or {}
    if g:
        table.add_row(
            # final.json says how it pooled (newer runs: over all slides and patches); older
            # runs wrote the sites' values weighted by their test slides.
            "all (pooled)" if g.get("pooling") else "all (weighted)",
            str(g.get("num_examples")),
            _fmt(g.get("auc")),
            _fmt(g.get("patch_auc")),
            _fmt(g.get("balanced_accuracy")),
            "",
        )
    return table


def cmd_demo(
    args: argparse.Namespace,
    console: Console,
    prepare_overrides: Callable[[argparse.Namespace], dict[str, Any]],
    generate_cohort: Callable[[argparse.Namespace, Path, Console], list[Path]],
) -> int:
    """The README's first command; exit 0 only when the federated run completed."""
    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}
    console.rule("1/2  hospitals prepare their slides (each on its own data)")
    prepared, failed = _prepare_sites(
        args, console, prepare_overrides, generate_cohort, stage_seconds
    )
    console.rule("2/2  federated training: SuperLink + 3 SuperNodes on loopback")
    result, fed_seconds = _federate(args, console, prepared)
    stage_seconds.update(fed_seconds)
    console.print(_final_table(result))
    stages = Table(title="time per stage")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    for stage, seconds in stage_seconds.items():
        stages.add_row(stage, f"{seconds:.1f}")
    stages.add_row("total", f"{time.perf_counter() - started:.1f}")
    console.print(stages)
    report = result.run_dir / "report.html"
    console.print(f"prepared data: {args.out / 'prepared'}  (QC pictures in each site's qc/)")
    console.print(f"run directory: {result.run_dir}")
    if report.is_file():
        console.print(f"run report:    {report}")
    if result.status != "finished:completed":
        reason = (result.final or {}).get("reason") or "see the SuperLink log"
        console.print(
            f"[bold red]the federated run did not complete ({result.status}):[/] {reason}"
        )
        console.print(f"process logs: {args.out / 'network'}")
        return EXIT_PARTIAL
    return EXIT_PARTIAL if failed else EXIT_OK


def add_demo_command(
    sub: Any,
    add_prepare_options: Callable[[argparse.ArgumentParser], None],
    prepare_overrides: Callable[[argparse.Namespace], dict[str, Any]],
) -> None:
    """Register ``demo``: the synthetic cohort's options, then every ``prepare`` option."""
    from fedpath.synthetic.cli import add_cohort_options, generate_cohort_with_progress

    demo = sub.add_parser(
        "demo",
        help="three synthetic hospitals on this machine: prepare, federate, report",
        description=(
            "Generate a synthetic three-hospital cohort (different label levels and stain; "
            "each hospital's test slides outlined, so patch AUC is measured everywhere), "
            "run `fedpath prepare` for each hospital, start a SuperLink and one SuperNode per "
            "hospital on loopback, run a federated FedMix run, write its report and stop "
            "every process."
        ),
    )
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="working folder")
    add_cohort_options(demo)
    add_prepare_options(demo)
    demo.add_argument("--rounds", type=int, default=5, help="federated rounds (5)")
    demo.add_argument(
        "--strategy", choices=("fedmix", "fedavg"), default="fedmix", help="aggregation (fedmix)"
    )
    demo.add_argument("--local-epochs", type=int, default=2, help="epochs per site per round (2)")

    def demo_cohort(args: argparse.Namespace, out: Path, console: Console) -> list[Path]:
        return generate_cohort_with_progress(args, out, console, demo=True)

    def run_demo(args: argparse.Namespace, console: Console) -> int:
        return cmd_demo(args, console, prepare_overrides, demo_cohort)

    demo.set_defaults(handler=run_demo)
