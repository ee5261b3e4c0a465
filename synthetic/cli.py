"""``fedpath synth``: synthetic slides and hospitals for trying fedpath without data.

The demo uses only real components: the generated slides are real pyramidal TIFFs read by
OpenSlide, and they go through exactly the ``prepare`` pipeline a hospital runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

EXIT_OK = 0


def cmd_synth_slide(args: argparse.Namespace, console: Console) -> int:
    from fedpath.common.configio import build_config
    from fedpath.synthetic.slides import SynthSlideConfig, generate_slide

    overrides = {
        "width_px": args.width,
        "height_px": args.height,
        "mpp": args.mpp,
        "tumour_fraction": args.tumour_fraction,
        "annotated_region_fraction": args.annotated_fraction,
        "stain": args.stain,
        "write_mpp": False if args.no_mpp else None,
        "write_objective": False if args.no_objective else None,
    }
    cfg = build_config(SynthSlideConfig, args.config, overrides)
    started = time.perf_counter()
    slide = generate_slide(args.out, args.slide_id, cfg, args.seed)
    console.print(
        f"wrote {slide.slide_path} ({slide.dimensions[0]}x{slide.dimensions[1]} px, "
        f"{slide.label}, tumour {slide.tumour_fraction:.1%} of tissue) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    if slide.geojson_path:
        state = "complete" if slide.annotation_complete else "partial"
        console.print(f"annotations ({state}): {slide.geojson_path}, {slide.asap_xml_path}")
    return EXIT_OK


DEMO_SPLIT_SHARES = (1 / 3, 1 / 3)
"""The demo's train/val/test thirds: its smallest site (C) has 3 slides of each label."""


def demo_cohort_config(cfg: Any) -> Any:
    """The demo's cohort: a fixed split in every manifest and complete outlines on every tumour
    slide of the test split, so the final table measures localisation (patch AUC) at every
    hospital. The training label levels stay as configured (the reference cohort: A outlines
    30 % of its tumour training slides, B and C give slide labels only); test slides are never
    trained on, so their outlines teach nothing. A site's own ``split_shares`` are kept."""
    from fedpath.synthetic.slides import SynthCohortConfig, SynthSiteConfig

    sites = tuple(
        SynthSiteConfig.model_validate(
            {
                **site.model_dump(),
                "split_shares": site.split_shares or DEMO_SPLIT_SHARES,
                "outline_test": True,
            }
        )
        for site in cfg.sites
    )
    return SynthCohortConfig.model_validate({**cfg.model_dump(), "sites": sites})


def cohort_config(args: argparse.Namespace, *, demo: bool = False) -> Any:
    from fedpath.common.configio import build_config
    from fedpath.synthetic.slides import SynthCohortConfig

    cfg = build_config(SynthCohortConfig, args.config_cohort)
    if demo:
        cfg = demo_cohort_config(cfg)
    if args.slides_per_site:
        # Keep the reference proportions: the smallest site stays about half the size.
        largest = max(site.n_slides for site in cfg.sites)
        sites = tuple(
            site.model_copy(
                update={"n_slides": max(2, round(args.slides_per_site * site.n_slides / largest))}
            )
            for site in cfg.sites
        )
        cfg = SynthCohortConfig.model_validate({**cfg.model_dump(), "sites": sites})
    return cfg


def generate_cohort_with_progress(
    args: argparse.Namespace, out: Path, console: Console, *, demo: bool = False
) -> list[Path]:
    from fedpath.synthetic.slides import generate_cohort

    cfg = cohort_config(args, demo=demo)
    total = sum(site.n_slides for site in cfg.sites)
    started = time.perf_counter()
    from fedpath.client.progress import bar_or_lines

    with bar_or_lines(
        console,
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as progress:
        task = progress.add_task(f"synthesising {len(cfg.sites)} sites", total=total)
        site_dirs = generate_cohort(
            out, cfg, args.seed, on_slide=lambda slide: progress.advance(task)
        )
    console.print(
        f"synthesised {total} slides in {len(site_dirs)} sites under {out} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return site_dirs


def cmd_synth_cohort(args: argparse.Namespace, console: Console) -> int:
    site_dirs = generate_cohort_with_progress(args, args.out, console)
    for site_dir in site_dirs:
        console.print(f"  {site_dir.name}: manifest {site_dir / 'slides.csv'}")
    return EXIT_OK


def add_synth_commands(sub: Any) -> None:
    """Register ``synth slide`` and ``synth cohort`` on the top-level parser."""
    synth = sub.add_parser("synth", help="generate synthetic slides with known ground truth")
    synth_sub = synth.add_subparsers(dest="synth_command", required=True, metavar="KIND")

    slide = synth_sub.add_parser("slide", help="one slide with masks and annotations")
    slide.add_argument("out", type=Path, help="output folder")
    slide.add_argument("--slide-id", default="synthetic", help="file name stem")
    slide.add_argument("--seed", type=int, default=0)
    slide.add_argument("--config", type=Path, help="TOML with SynthSlideConfig fields")
    slide.add_argument("--width", type=int, help="level-0 width in px")
    slide.add_argument("--height", type=int, help="level-0 height in px")
    slide.add_argument("--mpp", type=float, help="level-0 µm/px (0.5)")
    slide.add_argument("--tumour-fraction", type=float, help="share of tissue that is tumour")
    slide.add_argument(
        "--annotated-fraction", type=float, help="share of tumour outlined (<1: partial)"
    )
    slide.add_argument("--stain", help="stain preset name")
    slide.add_argument("--no-mpp", action="store_true", help="omit the resolution metadata")
    slide.add_argument("--no-objective", action="store_true", help="omit the objective power")
    slide.set_defaults(handler=cmd_synth_slide)

    cohort = synth_sub.add_parser("cohort", help="several hospitals, each with a manifest")
    cohort.add_argument("out", type=Path, help="output folder (one sub-folder per site)")
    add_cohort_options(cohort)
    cohort.set_defaults(handler=cmd_synth_cohort)


def add_cohort_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cohort-config", dest="config_cohort", type=Path, help="TOML with SynthCohortConfig"
    )
    parser.add_argument(
        "--slides-per-site", type=int, help="scale the cohort: slides at the largest site"
    )
