"""The text of ``fedpath encoders``: one line per encoder, readable in 80 columns and in logs.

Plain aligned columns rather than a drawn table: nothing wraps in an 80-column terminal, and
a log file (systemd, docker logs) gets the same lines, with no box characters to mangle.
"""

from __future__ import annotations

from client.embed.registry import available_encoders, encoder_info

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
    lines += ["", "A TorchScript checkpoint can also be given by path (--encoder model.pt)."]
    return lines
