"""The text of ``fedpath encoders``: one line per encoder, readable in 80 columns and in logs.

Plain aligned columns rather than a drawn table: nothing wraps in an 80-column terminal, and
a log file (systemd, docker logs) gets the same lines, with no box characters to mangle.
Reads only the catalog, so the command starts without importing torch.
"""

from __future__ import annotations

import textwrap

from fedpath.client.embed.catalog import (
    FOUNDATION_MODELS,
    available_encoders,
    canonical_encoder_id,
    encoder_info,
)

EXAMPLE_WEIGHTS = "/path/to/UNI/pytorch_model.bin"


def encoder_listing() -> list[str]:
    """Lines for ``fedpath encoders``: the table, what its columns mean, where weights come from."""
    infos = [encoder_info(name) for name in available_encoders()]
    width = max(len(info.spec.id) for info in infos)
    rows = [("id", "dim", "input", "mpp", "weights", "licence")]
    for info in infos:
        mpp = f"{info.mpp:g}" if info.mpp is not None else "-"
        rows.append(
            (
                info.spec.id,
                str(info.spec.feature_dim),
                f"{info.spec.input_size} px",
                mpp,
                info.weights,
                info.licence,
            )
        )
    lines = [
        f"{r[0]:<{width}}  {r[1]:>4}  {r[2]:>6}  {r[3]:>3}  {r[4]:<9}  {r[5]}".rstrip()
        for r in rows
    ]
    lines += [
        "",
        "dim: feature width; input: patch side fed to the encoder; mpp: micrometres per",
        "pixel the encoder was trained at (set patching.target_mpp to it).",
        "weights 'packaged': installed with fedpath here; '--weights': request access and",
        "download them yourself under their licence (fedpath never downloads weights),",
        "then give the file or the downloaded folder, e.g.",
        f"  fedpath prepare --encoder uni --weights {EXAMPLE_WEIGHTS} ...",
        "",
        "Where to get the weights:",
    ]
    lines += [
        f"  {info.spec.id:<{width}}  {info.source}" for info in infos if info.weights != "built-in"
    ]
    lines += [
        "",
        "A TorchScript checkpoint can also be given by path (--encoder model.pt).",
        "Details of one encoder (architecture, file to download): fedpath encoders ID",
    ]
    return lines


def encoder_details(name: str) -> list[str]:
    """Lines for ``fedpath encoders ID``: everything the registry knows about one encoder.

    Raises ``EncoderError`` for an unknown id (the CLI prints it).
    """
    info = encoder_info(name)
    spec = info.spec
    key = canonical_encoder_id(name) or spec.id
    entry = FOUNDATION_MODELS.get(key)
    mean = ", ".join(str(v) for v in spec.mean)
    std = ", ".join(str(v) for v in spec.std)
    facts = [
        ("architecture", info.architecture),
        ("output", f"{spec.feature_dim}-d" + (f", {entry.output}" if entry else "")),
        ("input", f"{spec.input_size} px, mean ({mean}), std ({std})"),
        (
            "trained at",
            f"{info.mpp:g} µm/px, {info.magnification}" if info.mpp is not None else "-",
        ),
        ("checkpoint", info.checkpoint),
        ("licence", info.licence),
        ("weights", info.source),
    ]
    title = f"{key}: {entry.name if entry is not None else spec.description}"
    lines = textwrap.wrap(title, width=80, subsequent_indent="  ")
    for label, text in facts:
        lines += textwrap.wrap(
            text,
            width=80,
            initial_indent=f"  {label:<13}",
            subsequent_indent=" " * 15,
            break_on_hyphens=False,
            break_long_words=False,
        )
    if entry is not None:  # unwrapped: it is copied into a command line
        lines.append(
            f"  {'prepare with':<13}--encoder {key} --weights /path/to/{entry.weight_files[0]}"
        )
    return lines
