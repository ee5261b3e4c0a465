"""The ``fedpath`` command. The only place that prints, parses arguments or chooses exit codes.

Exit codes: 0 everything worked; 1 the command ran but some items failed (e.g. slides that
could not be prepared); 2 nothing was done because the input or configuration is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpath.common.errors import ConfigError, FedpathError, ManifestError

if TYPE_CHECKING:  # rich is imported once a command runs: --help needs none of it
    from rich.console import Console

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def _add_prepare_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``prepare`` and ``demo``: they override the TOML config file."""
    group = parser.add_argument_group("preparation settings (override --config)")
    group.add_argument(
        "--config", type=Path, help="TOML file with [resolution] [tissue] ... sections"
    )
    group.add_argument("--encoder", help="encoder id (see `fedpath encoders`) or checkpoint path")
    group.add_argument(
        "--weights",
        type=Path,
        help="the encoder's weights you downloaded: a file, or the snapshot folder",
    )
    group.add_argument("--target-mpp", type=float, help="µm/px of the patches (default 0.5)")
    group.add_argument("--patch-size", type=int, help="patch side in px at target mpp (256)")
    group.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="encoder arithmetic (auto: low precision only where native and faithful)",
    )
    group.add_argument(
        "--device",
        help="auto | cpu | cuda | cuda:N | mps (auto: a GPU when torch sees one, else the CPU)",
    )
    group.add_argument(
        "--backend",
        choices=("auto", "torch", "onnx", "openvino"),
        help="CPU inference engine (auto: the fastest measured here, features checked)",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        help="patches per encoder batch (8 on a CPU; on a GPU: sized to its memory)",
    )
    group.add_argument(
        "--reader-threads", type=int, help="threads decoding patches (2; GPU: cores - 1)"
    )
    group.add_argument(
        "--tissue-preset", choices=("default", "biopsy"), help="biopsy keeps small fragments"
    )
    group.add_argument(
        "--labels",
        help="comma-separated slide labels, the normal one first (default normal,tumour)",
    )
    group.add_argument(
        "--tumour-classes",
        help="comma-separated annotation classes/groups that are tumour, case-insensitive "
        "(default Tumor,Tumour,Carcinoma,Metastasis,metastases,_0,_1)",
    )
    group.add_argument(
        "--on-no-tumour-region",
        choices=("fail", "slide_label_only"),
        help="a tumour slide whose annotation holds no tumour region: fail it (default) or "
        "prepare it with its slide label only",
    )
    group.add_argument("--no-qc", action="store_true", help="skip QC pictures and contours")


def _prepare_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from fedpath.client.config import TissueConfig

    overrides: dict[str, Any] = {
        "resolution": {"target_mpp": args.target_mpp, "patch_size": args.patch_size},
        "embedding": {
            "encoder": args.encoder,
            "weights_path": str(args.weights) if args.weights else None,
            "precision": args.precision,
            "device": args.device,
            "backend": args.backend,
            "batch_size": args.batch_size,
            "reader_threads": args.reader_threads,
        },
        "labels": tuple(s.strip() for s in args.labels.split(",")) if args.labels else None,
        "write_qc": False if args.no_qc else None,
        "patch_only": True if getattr(args, "patch_only", False) else None,
        "annotation": {
            "tumour_classes": _names(args.tumour_classes),
            "on_no_tumour_region": args.on_no_tumour_region,
        },
    }
    if args.tissue_preset:
        overrides["tissue"] = TissueConfig.preset(args.tissue_preset).model_dump()
    return overrides


def _names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated list of names; None (keep the config's) when not given."""
    if text is None:
        return None
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _prepare_config(args: argparse.Namespace) -> Any:
    from fedpath.client.config import PrepareConfig
    from fedpath.common.configio import build_config

    return build_config(PrepareConfig, args.config, _prepare_overrides(args))


def cmd_prepare(args: argparse.Namespace, console: Console) -> int:
    from fedpath.client.prepare.pipeline import prepare_site
    from fedpath.client.progress import prepare_events, print_summary, summary_line

    cfg = _prepare_config(args)
    if cfg.patch_only:
        _note_embedding_flags(args, console)
    with _stop_on_sigterm(), prepare_events(console) as events:
        summary = prepare_site(
            args.manifest,
            args.out,
            cfg,
            events=events,
            slide_root=args.slide_root,
            overwrite=args.overwrite,
        )
    print_summary(console, summary)
    if summary.patch_only:
        _print_patch_only(console, summary)
    else:
        console.print(summary_line(summary), soft_wrap=True)  # one line to grep in a log
        console.print(
            f"outputs: {summary.out_dir}  (site summary: {summary.out_dir / 'site.json'})"
        )
        reused = [r.slide_id for r in summary.reused_patches()]
        if reused:
            console.print(
                f"{len(reused)} slide(s) embedded from patches an earlier run cut (segmentation "
                f"and patching not redone): {_some(reused)}",
                soft_wrap=True,
            )
    label_only = [
        r.slide_id for r in summary.records if r.annotation and not r.annotation["patch_labels"]
    ]
    if label_only:
        console.print(
            f"[bold yellow]{len(label_only)} slide(s) prepared with their slide label only[/] "
            f"(their annotation has no tumour region): {', '.join(label_only)}; see "
            f"{summary.out_dir / 'status'}"
        )
    if summary.failed:
        rows = sum(1 for r in summary.failed if r.stage == "manifest")
        console.print(
            f"[bold red]{len(summary.failed)} slide(s) failed[/]"
            + (f" ({rows} for manifest problems, not prepared at all)" if rows else "")
            + f"; see the reasons above and {summary.out_dir / 'status'}. Fix them and re-run: "
            "finished slides are reused.",
            soft_wrap=True,  # the path stays whole
        )
    if summary.site_error:
        console.print(
            f"[bold red]error:[/] {summary.site_error}; the slide index and site summary are "
            "not up to date: free space or fix permissions and re-run (finished slides are "
            "reused)"
        )
    return EXIT_PARTIAL if summary.failed or summary.site_error else EXIT_OK


def _some(ids: list[str], shown: int = 10) -> str:
    """Up to ``shown`` slide ids, then how many more: a log line stays a line at 2,000 slides."""
    more = len(ids) - shown
    return ", ".join(ids[:shown]) + (f" and {more} more (see status/)" if more > 0 else "")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``systemctl stop``, ``docker stop``, ``kill``) during ``prepare``."""


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Stop ``prepare`` on SIGTERM as on Ctrl-C: temporaries removed, a line in the log.

    Python's default for SIGTERM ends the process at once, skipping every ``finally``, so
    a stopped service left half-written temporaries and a log that ended mid-slide.
    """

    def stop(signum: int, frame: object) -> None:
        del frame
        raise Terminated(signal.Signals(signum).name)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (a test runner, an embedding application)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _note_embedding_flags(args: argparse.Namespace, console: Console) -> None:
    """Say that embedding flags wait for the embedding run, instead of ignoring them silently."""
    flags = {
        "--encoder": args.encoder,
        "--weights": args.weights,
        "--device": args.device,
        "--backend": args.backend,
        "--precision": args.precision,
        "--batch-size": args.batch_size,
    }
    given = [flag for flag, value in flags.items() if value is not None]
    if given:
        console.print(
            f"note: {', '.join(given)} apply when the patches are embedded (the same command "
            "without --patch-only); this run embeds nothing",
            soft_wrap=True,
        )


def _print_patch_only(console: Console, summary: Any) -> None:
    """A patch-only run's totals: nothing was embedded, and how to embed the patches later."""
    console.print(
        f"patch-only: {summary.count('done')} cut, {summary.count('reused')} reused, "
        f"{summary.count('failed')} failed; {summary.patches_cut} patches cut, none embedded "
        f"({summary.seconds:.1f} s)",
        soft_wrap=True,
    )
    console.print(
        f"outputs: {summary.out_dir / 'patches'} (one .h5 per slide: coords, tissue_fraction, "
        f"patch_labels) and {summary.out_dir / 'patches.csv'}",
        soft_wrap=True,
    )
    console.print("To embed them: the same command without --patch-only (patches are reused).")


def cmd_encoders(args: argparse.Namespace, console: Console) -> int:
    from fedpath.client.embed.listing import encoder_details, encoder_listing

    lines = encoder_details(args.name) if args.name else encoder_listing()
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return EXIT_OK


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; built on demand, never at import.

    With ``command`` (the one about to run) only that command's module is imported and its
    parser built; the other commands are listed by name and help. None builds every parser."""
    parser = argparse.ArgumentParser(
        prog="fedpath",
        description="Federated attention-MIL for computational pathology: hospital and "
        "coordinator commands.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages too (default: info)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = sub.add_parser(
        "prepare",
        help="turn a slide manifest into feature bags",
        description=(
            "Validate the manifest, then for each slide: read it with OpenSlide, segment "
            "tissue, cut patches, turn annotations into patch labels, embed the patches and "
            "write an HDF5 feature bag. Resumable: finished slides are reused. With "
            "--patch-only it stops before embedding (no model needed); a later run embeds "
            "those patches without cutting them again."
        ),
    )
    prepare.add_argument(
        "--manifest", type=Path, required=True, help="CSV: slide_id,path,label,..."
    )
    prepare.add_argument("--out", type=Path, required=True, help="prepared data directory")
    prepare.add_argument(
        "--slide-root",
        type=Path,
        help="folder every slide and annotation must be inside (default: the manifest's folder)",
    )
    prepare.add_argument(
        "--overwrite", action="store_true", help="redo slides that are already prepared"
    )
    prepare.add_argument(
        "--patch-only",
        action="store_true",
        help="segment, cut and label patches and draw QC, embed nothing (patches/<id>.h5, "
        "patches.csv); a later run without it embeds these patches without cutting again",
    )
    _add_prepare_options(prepare)
    prepare.set_defaults(handler=cmd_prepare)

    encoders = sub.add_parser("encoders", help="list the patch encoders available offline")
    encoders.add_argument(
        "name", nargs="?", help="one encoder id: its architecture, checkpoint file, licence"
    )
    encoders.set_defaults(handler=cmd_encoders)

    for adder, commands in _COMMAND_GROUPS:
        if command is None or command in dict(commands):
            adder(sub)
        else:  # listed in --help, never parsed: the module that defines it is not imported
            for name, help_text in commands:
                sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _add_synth(sub: Any) -> None:
    from fedpath.synthetic.cli import add_synth_commands

    add_synth_commands(sub)


def _add_demo(sub: Any) -> None:
    from fedpath.deploy.cli_demo import add_demo_command

    add_demo_command(sub, _add_prepare_options, _prepare_overrides)


def _add_local(sub: Any) -> None:
    from fedpath.client.cli_local import add_local_commands

    add_local_commands(sub)


def _add_report(sub: Any) -> None:
    from fedpath.server.cli_server import add_server_commands

    add_server_commands(sub)


def _add_security(sub: Any) -> None:
    from fedpath.server.cli_security import add_security_commands

    add_security_commands(sub)


def _add_link(sub: Any) -> None:
    from fedpath.server.cli_link import add_link_command

    add_link_command(sub)


def _add_run(sub: Any) -> None:
    from fedpath.server.cli_run import add_run_commands

    add_run_commands(sub)


def _add_status(sub: Any) -> None:
    from fedpath.server.cli_status import add_status_command

    add_status_command(sub)


def _add_simulate(sub: Any) -> None:
    from fedpath.deploy.cli_simulate import add_simulate_command

    add_simulate_command(sub)


def _add_node(sub: Any) -> None:
    from fedpath.client.cli_node import add_node_command

    add_node_command(sub)


def _add_privacy(sub: Any) -> None:
    from fedpath.client.cli_privacy import add_privacy_command

    add_privacy_command(sub)


_COMMAND_GROUPS: tuple[tuple[Callable[[Any], None], tuple[tuple[str, str], ...]], ...] = (
    (_add_synth, (("synth", "generate synthetic slides with known ground truth"),)),
    (
        _add_demo,
        (("demo", "three synthetic hospitals on this machine: prepare, federate, report"),),
    ),
    (
        _add_local,
        (("local", "site-local baseline: train, evaluate and draw heatmaps on one site"),),
    ),
    (_add_report, (("report", "render a federated run's HTML report with plots"),)),
    (
        _add_security,
        (
            ("certs", "make a CA and the SuperLink's TLS certificate"),
            ("keys", "SuperNode key pairs: make them, register them"),
        ),
    ),
    (_add_link, (("link", "run the SuperLink (coordinator)"),)),
    (
        _add_run,
        (
            ("run", "submit a federated run and follow it"),
            ("stop", "stop a federated run on the SuperLink"),
        ),
    ),
    (_add_status, (("status", "runs and connected hospitals"),)),
    (
        _add_simulate,
        (("simulate", "the same apps in Flower's simulation engine, many synthetic sites"),),
    ),
    (
        _add_node,
        (("node", "run this hospital's SuperNode (the federated client daemon)"),),
    ),
    (_add_privacy, (("privacy", "summarise the privacy ledger of a prepared data directory"),)),
)
"""The commands defined in other modules, with their one-line help: the root parser lists them
all but imports only the module of the command being run (start-up stays well under a second,
whatever those modules import). ``tests/test_startup.py`` checks the help matches theirs."""


@contextlib.contextmanager
def _fedpath_logging(verbose: bool) -> Iterator[None]:
    """Where the ``fedpath`` loggers' records go while a command runs (library code logs and
    never configures): stderr, through rich in a terminal, else as plain one-line records, so
    a log file has no box drawing and no path wrapped in the middle. Removed on return."""
    import logging

    from fedpath.common.logs import handler_attached

    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.highlighter import NullHighlighter
        from rich.logging import RichHandler

        handler = RichHandler(
            console=Console(stderr=True),
            show_time=False,
            show_path=False,
            markup=False,  # text, not markup: "[annotation] tumour_classes" must survive
            highlighter=NullHighlighter(),
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    with handler_attached("fedpath", handler, logging.DEBUG if verbose else logging.INFO):
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedpath`` console script."""
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in words if not word.startswith("-")), "")
    args = build_parser(command).parse_args(words)
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=False, highlight=False)

    def say(head: str, exc: Exception) -> None:
        # The message is text, not markup ("[annotation] tumour_classes" must survive), and
        # is not wrapped: paths and commands in it stay whole to be copied.
        console.print(f"[bold red]{head}[/]{escape(str(exc))}", soft_wrap=True)

    try:
        with _fedpath_logging(args.verbose):
            return int(args.handler(args, console))
    except ManifestError as exc:
        say("error: ", exc)
        console.print("Nothing was prepared. Fix the manifest and run the command again.")
        return EXIT_USAGE
    except ConfigError as exc:
        say("configuration error:\n", exc)
        return EXIT_USAGE
    except FedpathError as exc:
        say("error: ", exc)
        return EXIT_USAGE
    except Terminated as exc:
        console.print(f"stopped ({exc}); finished items are kept, re-run to continue")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        console.print("interrupted; finished items are kept, re-run to continue")
        return 130


if __name__ == "__main__":
    sys.exit(main())
