"""``fedpath local train / eval / heatmaps``: the site-local (non-federated) baseline.

A hospital trains on its own prepared site with exactly the trainer the federated client uses,
so the local baseline and the federated result differ only in federation. This module only
wires files, options and terminal output; training is ``fedpath.client.training.trainer.train``,
scoring is ``client.training.evaluate`` and the pictures are ``client.training.heatmaps``.

A run directory holds ``metrics.jsonl`` (one line per epoch, rewritten atomically so a crash
never leaves a torn line), ``model.pt`` (weights + model config + the slide calibration fitted
on the validation split, which ``eval`` applies), ``config.json`` (full config,
labels and the slide ids of every split, so ``eval`` scores exactly the slides held out) and,
after ``eval``, ``predictions_<split>.csv`` and ``eval_<split>.json``; ``heatmaps`` writes
``heatmaps/<slide_id>.png`` (by default inside the run). All of it stays on the hospital's disk.

``--device`` (``auto | cpu | cuda | cuda:N | mps``; for ``train`` also ``device`` at the top of
its TOML) chooses where the model runs, resolved before anything is read or written: a GPU
asked for by name that torch does not see stops the command with nothing done. The device
that ran is printed and recorded in ``config.json`` / ``eval_<split>.json``.

A slide whose feature file cannot be used is skipped with its reason on screen (recorded in
``config.json`` / ``eval_<split>.json``) and the command goes on with the others, ending with
exit code 1; a split left with no usable slide stops the command.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedpath.client.prepare.records import SITE_FILE
from fedpath.client.site_facts import read_site
from fedpath.common.configbase import StrictModel
from fedpath.common.device_name import DEVICE_HELP, DeviceName
from fedpath.common.errors import ConfigError, DeviceError
from fedpath.common.mil.config import ModelConfig
from fedpath.common.train_config import TrainConfig

if TYPE_CHECKING:
    import torch

    from fedpath.client.progress import LogProgress
    from fedpath.client.training.bags import BagSkips
    from fedpath.client.training.evaluate import EvaluationResult
    from fedpath.client.training.heatmaps import HeatmapRecord
    from fedpath.client.training.site_index import BagEntry
    from fedpath.client.training.trainer import TrainResult
    from fedpath.common.calibration import SlideCalibration
    from fedpath.common.metrics import MetricWithCI
    from fedpath.common.mil.models import MILModel

EXIT_OK, EXIT_PARTIAL = 0, 1
"""As in ``fedpath.deploy.cli``: 1 means the command ran but some slides failed."""
MODEL_FILE, CONFIG_FILE, METRICS_FILE = "model.pt", "config.json", "metrics.jsonl"
EVAL_SPLITS = ("test", "val", "train", "all")


class LocalTrainConfig(StrictModel):
    """The TOML file of ``fedpath local train``: a ``[model]`` and a ``[train]`` section, and
    ``device`` at its top (before the sections, as TOML wants top-level keys).

    ``device`` is not part of ``[train]``: that section is also what a federated run sends to
    every site, and which of its own devices a hospital trains on is the hospital's choice
    (the node's ``device`` setting), never the server's.
    """

    device: DeviceName = Field("auto", description=f"where to train: {DEVICE_HELP}")
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def _on_device(name: str) -> tuple[torch.device, str]:
    """The device ``name`` stands for here and its label; ``DeviceError`` (exit 2) if absent.

    Called before a command reads a bag or writes a file, so asking for a GPU this machine
    lacks costs nothing and leaves nothing behind.
    """
    from fedpath.common.device import describe_device, resolve_device

    device = resolve_device(name)
    return device, describe_device(device)


def _labels(args_labels: str | None, site: dict[str, Any], where: Path) -> tuple[str, ...]:
    if args_labels:
        labels = tuple(s.strip() for s in args_labels.split(",") if s.strip())
    else:
        raw = site.get("labels")
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise ConfigError(f"{where / SITE_FILE}: no label list; give --labels")
        labels = tuple(raw)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ConfigError(f"need at least two distinct labels, got {list(labels)}")
    return labels


def _float(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.4f}"


def _progress(console: Console) -> Progress | LogProgress:
    """One bar with a status text (last epoch's or last slide's outcome) and elapsed time; in
    a log (stdout not a terminal) one line per epoch or slide instead."""
    from fedpath.client.progress import bar_or_lines

    return bar_or_lines(
        console,
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )


def _bag_skips(console: Console) -> BagSkips:
    """Skipped slides printed as they happen (the run goes on) and remembered for the record."""
    from fedpath.client.training.bags import BagSkips, SkippedBag

    def show(skipped: SkippedBag) -> None:
        # The error is text: a path or "[annotation]" in it is not rich markup.
        console.print(
            f"[bold red]{escape(skipped.entry.slide_id)} skipped:[/] {escape(str(skipped.error))}",
            soft_wrap=True,
        )

    return BagSkips(show)


def _skipped_json(skips: BagSkips) -> list[dict[str, str]]:
    return [{"slide_id": s.entry.slide_id, "reason": str(s.error)} for s in skips.skipped]


def _skipped_line(skips: BagSkips) -> str:
    return (
        f"[bold red]{len(skips.skipped)} slide(s) skipped[/] (reasons above); delete those "
        "feature files, run `fedpath prepare` again (it redoes slides whose file is gone) and "
        "then this command."
    )


def _calibration_line(
    scores: EvaluationResult, calibration: SlideCalibration, labels: Sequence[str]
) -> str:
    """Validation balanced accuracy, Brier and ECE before and after calibration, one line."""
    from fedpath.client.training.evaluate import metrics_of

    after = metrics_of(scores.predictions, bootstrap=0, labels=labels, calibration=calibration)
    before = after.uncalibrated or after.slide
    return (
        f"  val balanced accuracy {_float(before.balanced_accuracy.value)} → "
        f"{_float(after.slide.balanced_accuracy.value)}, Brier {_float(before.brier)} → "
        f"{_float(after.slide.brier)}, ECE {_float(before.ece)} → {_float(after.slide.ece)} "
        "(uncalibrated → calibrated)"
    )


def _best_epoch_line(result: TrainResult, cfg: TrainConfig) -> str:
    """Which epoch's weights were kept, counted from 1 as a reader counts, and why.

    Without a finite validation loss nothing was chosen (the last weights are kept and early
    stopping never ran), which must not read as a "best" epoch. With ``stopping_loss`` other
    than the slide loss, the loss that chose the epoch is shown next to the slide loss.
    """
    n = len(result.history)
    best = next(m for m in result.history if m.epoch == result.best_epoch)
    at = f"epoch {best.epoch - result.history[0].epoch + 1} of {n}"
    at += f' ("epoch": {best.epoch} in {METRICS_FILE})'
    if not math.isfinite(best.val_stopping_loss):
        return (
            f"no validation loss (no usable val slide): kept the weights of the last {at}; "
            "no best-epoch choice, no early stopping"
        )
    chosen_by = ""
    if cfg.stopping_loss != "slide" and best.val_stopping_loss != best.val_loss:
        chosen_by = f"val {cfg.stopping_loss} loss {_float(best.val_stopping_loss)} (chose it), "
    return (
        f"best {at}{' (stopped early)' if result.stopped_early else ''}: {chosen_by}"
        f"val slide loss {_float(best.val_loss)}, val AUC {_float(best.val_auc)}"
    )


def cmd_local_train(args: argparse.Namespace, console: Console) -> int:
    import torch

    from fedpath.client.training.evaluate import evaluate_bags, fit_on_predictions, save_checkpoint
    from fedpath.client.training.site_index import load_site_index, split_entries
    from fedpath.client.training.trainer import EpochMetrics, TrainingDivergedError, train
    from fedpath.common import __version__
    from fedpath.common.atomic import atomic_write_json, atomic_write_text
    from fedpath.common.configio import build_config
    from fedpath.common.mil.models import build_model

    data: Path = args.data
    site = read_site(data)
    labels = _labels(args.labels, site, data)
    overrides = {
        "model": {"kind": args.model, "feature_dim": site["feature_dim"], "n_classes": len(labels)},
        "train": {
            "epochs": args.epochs,
            "seed": args.seed,
            "supervision": {"mode": args.mode},
        },
        "device": args.device,
    }
    cfg = build_config(LocalTrainConfig, args.config, overrides)
    device, device_label = _on_device(cfg.device)

    entries = load_site_index(data, labels)
    try:
        splits = split_entries(entries, k=args.folds, fold=args.fold, seed=cfg.train.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not splits["train"]:
        raise ConfigError(f"{data}: the training split is empty")
    skips = _bag_skips(console)
    train_bags = skips.bags("train", splits["train"], cfg.model.feature_dim)
    val_bags = skips.bags("val", splits["val"], cfg.model.feature_dim)
    console.print(
        f"site {data}: {len(train_bags)} train / {len(val_bags)} val / "
        f"{len(splits['test'])} test slides; model {cfg.model.kind}, "
        f"{cfg.train.supervision.mode} supervision; device {device_label}"
    )

    run: Path = args.out
    run.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
    model.to(device)  # after the seeded build: the same initial weights on every device

    lines: list[str] = []
    with _progress(console) as progress:
        task = progress.add_task("epochs", total=cfg.train.epochs, status="")

        def on_epoch(m: EpochMetrics) -> None:
            lines.append(json.dumps(m.to_json(), sort_keys=True))
            atomic_write_text(run / METRICS_FILE, "\n".join(lines) + "\n")
            status = f"loss {m.train_loss:.4f} val {_float(m.val_loss)} auc {_float(m.val_auc)}"
            progress.update(task, advance=1, status=status)

        try:
            result = train(model, train_bags, val_bags, cfg.train, on_epoch=on_epoch)
        except (TrainingDivergedError, DeviceError) as exc:
            before = f"; the epochs before are in {run / METRICS_FILE}" if lines else ""
            message = f"{exc}. {run / MODEL_FILE} was not written{before}"
            raise type(exc)(message) from exc

    # Post-hoc calibration of the restored best model on the validation split (no slide of
    # it is trained on): a temperature for the slide logits and a decision threshold.
    val_scores = evaluate_bags(result.model, val_bags, bootstrap=0) if val_bags else None
    calibration = fit_on_predictions(
        val_scores.predictions if val_scores is not None else [], labels
    )
    save_checkpoint(run / MODEL_FILE, result.model, cfg.model, calibration)
    atomic_write_json(
        run / CONFIG_FILE,
        {
            "fedpath_version": __version__,
            "data": str(data.resolve()),
            "labels": list(labels),
            "feature_dim": cfg.model.feature_dim,
            "config": cfg.model_dump(mode="json"),
            "fold": args.fold,
            "folds": args.folds,
            "splits": {name: [e.slide_id for e in items] for name, items in splits.items()},
            "skipped": _skipped_json(skips),
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "device": result.device,
            "precision": result.precision,
            "calibration": calibration.model_dump(mode="json"),
        },
    )
    console.print(f"trained on {result.device} in {result.precision}")
    console.print(_best_epoch_line(result, cfg.train))
    console.print(f"calibration on the val split: {calibration.describe()}")
    if val_scores is not None and calibration.fitted:
        console.print(_calibration_line(val_scores, calibration, labels))
    console.print(
        f"run: {run}  (model {run / MODEL_FILE}, metrics {run / METRICS_FILE})", soft_wrap=True
    )
    if skips.skipped:
        console.print(_skipped_line(skips))
        return EXIT_PARTIAL
    return EXIT_OK


def _read_run_config(run: Path) -> dict[str, Any]:
    path = run / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run} is not a training run: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(config, dict) or not {"labels", "splits"} <= config.keys():
        raise ConfigError(f"{path}: labels/splits missing")
    return config


@dataclass(frozen=True)
class _TrainedRun:
    """A ``local train`` run opened against a prepared site, as eval and heatmaps need it."""

    config: dict[str, Any]
    labels: tuple[str, ...]
    model: MILModel
    model_cfg: ModelConfig


def _open_run(run: Path, data: Path) -> _TrainedRun:
    """Read the site and run; refuse a site whose features are not the model's width."""
    from fedpath.client.training.evaluate import load_checkpoint

    site = read_site(data)
    config = _read_run_config(run)
    model, model_cfg = load_checkpoint(run / MODEL_FILE)
    if model_cfg.feature_dim != site["feature_dim"]:
        raise ConfigError(
            f"the model expects {model_cfg.feature_dim}-d features but {data} has "
            f"{site['feature_dim']}-d (prepared with a different encoder?)"
        )
    return _TrainedRun(config, tuple(config["labels"]), model, model_cfg)


def _split_entries(
    entries: Sequence[BagEntry], config: dict[str, Any], split: str, data: Path, run: Path
) -> list[BagEntry]:
    """The slides of ``split`` as recorded by ``local train`` (``all``: every prepared slide)."""
    if split == "all":
        chosen = list(entries)
    else:
        wanted = list(config["splits"].get(split, []))
        by_id = {e.slide_id: e for e in entries}
        missing = [s for s in wanted if s not in by_id]
        if missing:
            raise ConfigError(
                f"{len(missing)} slide(s) of the {split} split are not in {data} "
                f"(e.g. {missing[0]}): is this the site the model was trained on?"
            )
        chosen = [by_id[s] for s in wanted]
    if not chosen:
        raise ConfigError(f"the {split} split of {run} has no slides")
    return chosen


def cmd_local_eval(args: argparse.Namespace, console: Console) -> int:
    from fedpath.client.training.evaluate import (
        SlidePrediction,
        evaluate_entries,
        load_calibration,
        predictions_csv,
    )
    from fedpath.client.training.site_index import load_site_index
    from fedpath.common.atomic import atomic_write_json, atomic_write_text

    data: Path = args.data
    run: Path = args.run
    device, device_label = _on_device(args.device or "auto")
    opened = _open_run(run, data)
    opened.model.to(device)
    labels = opened.labels
    calibration = None if args.uncalibrated else load_calibration(run / MODEL_FILE)
    chosen = _split_entries(load_site_index(data, labels), opened.config, args.split, data, run)
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    skips = _bag_skips(console)
    chosen = skips.entries(args.split, chosen, opened.model_cfg.feature_dim)

    with _progress(console) as progress:
        task = progress.add_task(f"scoring {args.split}", total=len(chosen), status="")

        def on_slide(p: SlidePrediction) -> None:
            status = f"{p.slide_id}: {labels[p.pred]} ({float(p.probs[p.pred]):.2f})"
            progress.update(task, advance=1, status=status)

        result = evaluate_entries(
            opened.model,
            chosen,
            feature_dim=opened.model_cfg.feature_dim,
            bootstrap=args.bootstrap,
            on_slide=on_slide,
            labels=labels,
            calibration=calibration,
        )
    scored = [p.slide_id for p in result.predictions]
    not_held_out = _not_held_out(
        args.split, scored, opened.config, calibration is not None and calibration.fitted
    )
    csv_path = run / f"predictions_{args.split}.csv"
    json_path = run / f"eval_{args.split}.json"
    atomic_write_text(csv_path, predictions_csv(result.predictions, labels, calibration))
    atomic_write_json(
        json_path,
        {
            "split": args.split,
            "labels": list(labels),
            **result.to_json(),
            "skipped": _skipped_json(skips),
            "not_held_out": not_held_out,
            "device": device_label,
        },
    )

    console.print(_eval_table(args.split, result, labels, len(skips.skipped)))
    if not_held_out:
        console.print(f"[bold yellow]not a held-out estimate:[/] {not_held_out}")
    for line in _calibration_notes(result, args.uncalibrated):
        console.print(line)
    console.print(f"scored on {device_label} (float32)")
    console.print(f"wrote {csv_path} and {json_path}", soft_wrap=True)
    if skips.skipped:
        console.print(_skipped_line(skips))
        return EXIT_PARTIAL
    return EXIT_OK


def _not_held_out(
    split: str, scored: Sequence[str], config: dict[str, Any], calibrated: bool
) -> str | None:
    """Why the scores of ``split`` overstate the model (``None`` for the test split).

    Train slides were fitted; the val split chose the kept epoch and fitted the calibration
    (temperature and threshold), so its numbers are optimistic too. A table of such slides
    printed like the test split's reads as the model's performance on new slides.
    """
    if split == "test":
        return None
    splits = config.get("splits") or {}
    scored_set = set(scored)
    trained = len(scored_set & set(splits.get("train") or []))
    tuned = len(scored_set & set(splits.get("val") or []))
    parts = []
    if trained:
        parts.append(f"{trained} of these {len(scored)} slides were trained on")
    if tuned:
        what = "chose the kept epoch" + (" and fitted the calibration" if calibrated else "")
        parts.append(f"{tuned} are val slides, which {what}")
    if not parts:
        return None
    return (
        "; ".join(parts) + ": these numbers are optimistic. `--split test` scores held-out slides."
    )


def _eval_table(
    split: str, result: EvaluationResult, labels: Sequence[str], skipped: int = 0
) -> Table:
    """Slide metrics with their intervals (or why there is none), then patch metrics.

    Rows marked ``*`` depend on the calibration (the threshold or the probabilities); AUC does
    not (a temperature keeps the ranking).
    """
    slide = result.slide
    counts = " / ".join(f"{n} {labels[i]}" for i, n in enumerate(slide.class_counts))
    mark = "*" if result.calibrated else ""
    # The title travels with the table (pasted into a report): it says what was left out.
    left_out = f"; {skipped} of {slide.n_slides + skipped} skipped, not scored" if skipped else ""
    table = Table(title=f"{split}: {slide.n_slides} slides ({counts}{left_out})")
    for column in ("metric", "value", "95% CI"):
        table.add_column(column)
    rows: list[tuple[str, MetricWithCI]] = [("slide AUC", slide.auc)]
    rows.append((f"balanced accuracy{mark}", slide.balanced_accuracy))
    if slide.n_classes == 2 and len(slide.recall) == 2:
        rows.append((f"sensitivity ({labels[1]}){mark}", slide.recall[1]))
        rows.append((f"specificity ({labels[0]}){mark}", slide.recall[0]))
    else:
        rows += [(f"recall {labels[i]}{mark}", r) for i, r in enumerate(slide.recall)]
    rows.append((f"F1{mark}", slide.f1))
    for name, metric in rows:
        table.add_row(name, _float(metric.value), metric.interval_text())
    table.add_row(f"Brier score{mark}", _float(slide.brier), "")
    table.add_row(f"ECE{mark}", _float(slide.ece), "")
    if result.patch is not None:
        p = result.patch
        for name, value in (("patch AUC", p.auc), ("patch AP", p.average_precision)):
            table.add_row(name, _float(value), "")
        table.add_row("patch Dice", _float(p.dice), f"({p.n_labelled} labelled patches)")
    return table


def _calibration_notes(result: EvaluationResult, refused: bool) -> list[str]:
    """Which numbers are calibrated, how, and what they were before."""
    if refused:
        return ["uncalibrated (--uncalibrated): model probabilities, decision at the argmax"]
    cal = result.calibration
    if cal is None:
        return [
            "uncalibrated: this model.pt holds no calibration (trained by an older fedpath); "
            "run `fedpath local train` again to fit one on the val split"
        ]
    if not cal.fitted:
        return [f"uncalibrated (T = 1, argmax): the val split could not fit one: {cal.reason}"]
    raw = result.uncalibrated
    assert raw is not None
    lines = [f"* calibrated on the val split: {cal.describe()}"]
    lines.append(
        f"  uncalibrated (T = 1, argmax): balanced accuracy "
        f"{_float(raw.balanced_accuracy.value)}, Brier {_float(raw.brier)}, "
        f"ECE {_float(raw.ece)}"
    )
    if cal.temperature_at_bound:
        lines.append(
            "  the temperature is at its upper search bound: on the val split the model "
            "ranks slides no better than chance"
        )
    return lines


def _select_slides(entries: list[BagEntry], wanted: str | None, split: str) -> list[BagEntry]:
    """``--slides id1,id2`` picked out of the split's slides; unknown ids are a usage error."""
    if not wanted:
        return entries
    ids = [s.strip() for s in wanted.split(",") if s.strip()]
    by_id = {e.slide_id: e for e in entries}
    unknown = [s for s in ids if s not in by_id]
    if unknown:
        where = "prepared slides" if split == "all" else f"{split} split (try --split all)"
        raise ConfigError(f"not among the {where}: {', '.join(unknown)}")
    return [by_id[s] for s in dict.fromkeys(ids)]


def cmd_local_heatmaps(args: argparse.Namespace, console: Console) -> int:
    from fedpath.client.prepare.layout import SiteLayout
    from fedpath.client.prepare.manifest import load_manifest
    from fedpath.client.training.heatmaps import HeatmapConfig, SlideSource, write_heatmaps
    from fedpath.client.training.site_index import load_site_index
    from fedpath.common.configio import build_config

    data: Path = args.data
    run: Path = args.run
    cfg = build_config(HeatmapConfig, None, {"top_k": args.top_k})
    device, device_label = _on_device(args.device or "auto")
    opened = _open_run(run, data)
    opened.model.to(device)
    labels = opened.labels
    split = args.split or ("all" if args.slides else "test")
    chosen = _split_entries(load_site_index(data, labels), opened.config, split, data, run)
    chosen = _select_slides(chosen, args.slides, split)
    # Slide files are named by the manifest only; missing files are reported per slide below.
    manifest = load_manifest(args.manifest, labels, slide_root=args.slide_root, check_files=False)
    for problem in manifest.problems:  # those rows' slides fail below as "not in the manifest"
        console.print(
            f"[yellow]manifest {escape(str(args.manifest))}:[/] {escape(problem)}", soft_wrap=True
        )
    layout = SiteLayout(data, encoder_dir="")  # only its patches/<id>.h5 path is used
    sources = {
        row.slide_id: SlideSource(
            row.slide_id, row.path, row.annotation, row.mpp, layout.coords(row.slide_id)
        )
        for row in manifest.rows
    }
    out: Path = args.out if args.out is not None else run / "heatmaps"

    failed: list[HeatmapRecord] = []
    warned: list[HeatmapRecord] = []
    with _progress(console) as progress:
        task = progress.add_task("heatmaps", total=len(chosen), status="")

        def on_slide(record: HeatmapRecord) -> None:
            if record.ok:
                status = record.slide_id
            else:
                failed.append(record)
                progress.console.print(
                    f"[bold red]{escape(record.slide_id)} skipped:[/] {escape(str(record.error))}",
                    soft_wrap=True,
                )
                status = f"{record.slide_id}: failed"
            for warning in record.warnings:
                progress.console.print(
                    f"[yellow]{escape(record.slide_id)}:[/] {escape(warning)}", soft_wrap=True
                )
            if record.ok and record.warnings:
                warned.append(record)
            progress.update(task, advance=1, status=status)

        records = write_heatmaps(
            opened.model,
            chosen,
            sources,
            out,
            labels,
            cfg,
            feature_dim=opened.model_cfg.feature_dim,
            on_slide=on_slide,
        )
    written = len(records) - len(failed)
    console.print(f"model run on {device_label}")
    console.print(f"wrote {written} heatmap(s) to {out}", soft_wrap=True)
    if warned:  # a warning scrolled past among many slides must not read as "all fine"
        console.print(
            f"[yellow]{len(warned)} of them drawn with a warning[/] (above; the outline of a "
            f"broken annotation file is left out): {', '.join(r.slide_id for r in warned)}"
        )
    if failed:
        console.print(
            f"[bold red]{len(failed)} slide(s) failed[/]: {', '.join(r.slide_id for r in failed)}"
            " (reasons above); the others were written."
        )
        return EXIT_PARTIAL
    return EXIT_OK


def _add_device(parser: Any, what: str, more: str) -> None:
    parser.add_argument(
        "--device",
        help=f"device to {what}: {DEVICE_HELP}; default auto{more}",
    )


def add_local_commands(sub: Any) -> None:
    """Register ``local train``, ``local eval`` and ``local heatmaps`` on the subparsers."""
    local = sub.add_parser(
        "local", help="site-local baseline: train, evaluate and draw heatmaps on one site"
    )
    local_sub = local.add_subparsers(dest="local_command", required=True, metavar="COMMAND")

    tr = local_sub.add_parser(
        "train",
        help="train a MIL model on this site's prepared bags",
        description="Train with the federated client's trainer on the train split, early-"
        "stopping on the val split; splits come from the manifest, else stratified k-fold.",
    )
    tr.add_argument("--data", type=Path, required=True, help="prepared site directory")
    tr.add_argument("--out", type=Path, required=True, help="run directory to write")
    tr.add_argument("--config", type=Path, help="TOML file with [model] and [train] sections")
    tr.add_argument("--model", choices=("clam_sb", "clam_mb", "abmil"), help="architecture")
    tr.add_argument("--mode", choices=("weak", "mixed"), help="supervision mode")
    tr.add_argument("--epochs", type=int, help="maximum epochs")
    tr.add_argument("--seed", type=int, help="seed of model init, sampling and k-fold")
    tr.add_argument("--fold", type=int, default=0, help="test fold when no split column (0)")
    tr.add_argument("--folds", type=int, default=5, help="number of folds (5)")
    tr.add_argument("--labels", help="comma-separated labels (default: site.json)")
    _add_device(tr, "train on", ", or device = ... at the top of --config")
    tr.set_defaults(handler=cmd_local_train)

    ev = local_sub.add_parser(
        "eval",
        help="evaluate a trained run on one split",
        description="Score the slides of a split recorded by `local train` (or all slides) "
        "and write predictions_<split>.csv and eval_<split>.json into the run directory.",
    )
    ev.add_argument("--data", type=Path, required=True, help="prepared site directory")
    ev.add_argument("--run", type=Path, required=True, help="run directory of `local train`")
    ev.add_argument("--split", choices=EVAL_SPLITS, default="test", help="slides to score")
    ev.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples of the intervals that need them (F1; AUC of >2 labels) (1000)",
    )
    ev.add_argument(
        "--uncalibrated",
        action="store_true",
        help="ignore the calibration stored with the model (raw probabilities, argmax)",
    )
    _add_device(ev, "score on", "")
    ev.set_defaults(handler=cmd_local_eval)

    hm = local_sub.add_parser(
        "heatmaps",
        help="draw attention and tumour-probability heatmaps of a trained run",
        description="For each slide of a split (or --slides): a PNG with the slide, attention "
        "percentiles, instance tumour probability, the annotated tumour outline when the "
        "manifest has one, and the top-k attended patches. Written on this machine only.",
    )
    hm.add_argument("--data", type=Path, required=True, help="prepared site directory")
    hm.add_argument("--run", type=Path, required=True, help="run directory of `local train`")
    hm.add_argument(
        "--manifest",
        type=Path,
        required=True,
        help="the slides.csv given to `fedpath prepare` (where the slide files are)",
    )
    hm.add_argument(
        "--slide-root", type=Path, help="as for prepare (default: the manifest's folder)"
    )
    hm.add_argument(
        "--split",
        choices=EVAL_SPLITS,
        help="slides to draw (default test; all when --slides is given)",
    )
    hm.add_argument("--slides", help="comma-separated slide ids (e.g. id1,id2)")
    hm.add_argument("--top-k", type=int, default=8, help="top attended patches shown (8)")
    hm.add_argument("--out", type=Path, help="folder for the PNGs (default RUN/heatmaps)")
    _add_device(hm, "run the model on", "")
    hm.set_defaults(handler=cmd_local_heatmaps)
