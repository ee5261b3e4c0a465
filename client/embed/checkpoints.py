"""Reading encoder weights a hospital downloaded itself, and fitting them to an architecture.

Weights come only from a local path: one ``.safetensors`` file (read by the safetensors
package: tensors only), one ``.bin``/``.pth``/``.pt`` file (``torch.load(weights_only=True)``:
no code can run), or a folder, the HuggingFace snapshot the hospital downloaded, in which the
weights file is found by name. Nothing here ever contacts a hub.

A checkpoint is mapped key by key onto the model: for each parameter of the model the layout
says which key(s) of the file hold it (timm files: the same name; HuggingFace files: their
``encoder.layer.N...`` names, query/key/value concatenated into timm's fused ``qkv``). Keys the
model needs but the file lacks, keys the file has that the model does not use, and shapes that
differ are all refused at once, named in the file's own layout, so a hospital that downloaded
the wrong file (or a truncated one) is told which.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpath.client.embed.vit import resample_pos_embed
from fedpath.common.errors import EncoderError
from fedpath.common.hashing import sha256_file, sha256_json
from fedpath.common.safe_load import pickled_reference

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_SHOWN = 5


@dataclass(frozen=True)
class WeightFiles:
    """The file(s) that hold an encoder's weights, and their provenance hash.

    ``sha256`` is the file's own sha256 (what ``sha256sum`` prints) for a single file; for a
    sharded checkpoint it is the sha256 of the sorted (name, sha256) list of its shards.
    ``path`` is what provenance records: the file, or the folder of a sharded checkpoint.
    """

    files: tuple[Path, ...]
    sha256: str
    path: Path


def locate_weights(path: Path, encoder_id: str, preferred: tuple[str, ...]) -> WeightFiles:
    """The weights file(s) at ``path``: the file itself, or the one found in a snapshot folder.

    In a folder, the first of ``preferred`` (the model's published file names) that exists
    wins; then the shards listed by a ``*.index.json``; then the only weights file present.
    A HuggingFace cache folder (``models--org--name``) with one snapshot is entered.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return _describe((path,), path)
    if not path.exists():
        raise EncoderError(f"{encoder_id}: weights path {path} does not exist")
    if not path.is_dir():
        raise EncoderError(f"{encoder_id}: weights path {path} is neither a file nor a folder")
    folder = _enter_hf_cache(path, encoder_id)
    for name in preferred:
        if (folder / name).is_file():
            return _describe((folder / name,), folder / name)
    for index in sorted(folder.glob("*.index.json")):
        shards = _index_shards(index, encoder_id)
        return _describe(shards, folder)
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return _describe((found[0],), found[0])
    looked_for = ", ".join(preferred) or "a weights file"
    if not found:
        raise EncoderError(
            f"{encoder_id}: no weights file in folder {folder} (looked for {looked_for}, or any "
            f"{'/'.join(WEIGHT_SUFFIXES)} file); give the downloaded file or snapshot folder"
        )
    names = ", ".join(p.name for p in found)
    raise EncoderError(
        f"{encoder_id}: folder {folder} holds several weights files ({names}) and none is "
        f"named {looked_for}; pass the file itself with --weights"
    )


def _enter_hf_cache(folder: Path, encoder_id: str) -> Path:
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return folder
    inside = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(inside) == 1:
        return inside[0]
    if len(inside) > 1:
        names = ", ".join(p.name for p in inside)
        raise EncoderError(
            f"{encoder_id}: {folder} holds {len(inside)} downloaded snapshots ({names}); pass "
            f"the one to use: --weights {folder}/snapshots/<name>"
        )
    return folder


def _index_shards(index: Path, encoder_id: str) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EncoderError(f"{encoder_id}: shard index {index} is unreadable ({exc})") from exc
    shards = tuple(index.parent / name for name in names)
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
        raise EncoderError(
            f"{encoder_id}: shard index {index.name} lists files that are not in "
            f"{index.parent}: {', '.join(absent[:_SHOWN])} (incomplete download?)"
        )
    return shards


def _describe(files: tuple[Path, ...], where: Path) -> WeightFiles:
    if len(files) == 1:
        return WeightFiles(files, sha256_file(files[0]), where)
    listed = [{"file": f.name, "sha256": sha256_file(f)} for f in files]
    return WeightFiles(files, sha256_json(listed), where)


def read_state_dict(files: WeightFiles, encoder_id: str) -> dict[str, torch.Tensor]:
    """All tensors of the weight file(s), by key; refuses anything that is not plain tensors."""
    state: dict[str, torch.Tensor] = {}
    for path in files.files:
        part = read_weights_file(path, encoder_id)
        clash = sorted(set(part) & set(state))
        if clash:
            raise EncoderError(f"{encoder_id}: key {clash[0]!r} appears in more than one shard")
        state.update(part)
    return state


def read_weights_file(path: Path, encoder_id: str) -> dict[str, torch.Tensor]:
    """One weights file as a state dict: safetensors, or a torch file read weights-only.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and DataParallel's
    ``module.`` prefix are unwrapped.
    """
    if not path.is_file():
        raise EncoderError(f"{encoder_id}: weights file {path} does not exist")
    if path.stat().st_size == 0:
        raise EncoderError(f"{encoder_id}: weights file {path} is empty")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, encoder_id)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own text advises loading the file unsafely; name what it refused instead.
        what = pickled_reference(exc)
        raise EncoderError(
            f"{encoder_id}: {path} refused by weights-only loading: it holds pickled Python "
            f"objects, not only tensors{what}; fedpath never unpickles code from a file (save "
            "a plain state dict: torch.save(model.state_dict(), path))"
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EncoderError(
            f"{encoder_id}: {path} is not a plain weights file and was refused by weights-only "
            f"loading ({first_line})"
        ) from exc
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(payload, Mapping) and isinstance(payload.get(wrapper), Mapping):
            payload = payload[wrapper]
            break
    if not isinstance(payload, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()
    ):
        raise EncoderError(f"{encoder_id}: {path} does not contain a state dict of tensors")
    prefix = "module."
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in payload.items()}


def _read_safetensors(path: Path, encoder_id: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EncoderError(
            f"{encoder_id}: {path} is not a readable safetensors file ({first_line}); "
            "was the download interrupted?"
        ) from exc


# --- layouts: which key(s) of a checkpoint file hold each parameter of the model -------------

SourceKeys = Callable[[str], list[str]]


def timm_keys(key: str) -> list[str]:
    """timm checkpoints use the model's own names."""
    return [key]


def prefixed_keys(prefix: str) -> SourceKeys:
    """A sub-model saved inside a larger one (CONCH's vision tower under ``visual.``)."""

    def keys(key: str) -> list[str]:
        return [prefix + key]

    return keys


_HF_BLOCK = {
    "vit": {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    },
    "dinov2": {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "ls1": "layer_scale1",
        "ls2": "layer_scale2",
    },
}


def hf_keys(flavour: str) -> SourceKeys:
    """HuggingFace ``ViTModel`` (``flavour="vit"``) or ``Dinov2Model`` (``"dinov2"``) names."""
    table = _HF_BLOCK[flavour]
    fixed = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }

    def keys(key: str) -> list[str]:
        if key in fixed:
            return [fixed[key]]
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)", key)
        if match is None:
            raise ValueError(f"no HuggingFace name for {key!r}")
        layer, module, param = f"encoder.layer.{match[1]}.", match[2], match[3]
        if module == "attn.qkv":
            return [f"{layer}attention.attention.{n}.{param}" for n in ("query", "key", "value")]
        if param == "gamma":
            return [f"{layer}{table[module]}.lambda1"]
        return [f"{layer}{table[module]}.{param}"]

    return keys


def fit_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    source_keys: SourceKeys,
    *,
    ignored: re.Pattern[str] | None,
    pos_tables: Mapping[str, int],
    where: str,
) -> dict[str, torch.Tensor]:
    """The model's state dict built from a checkpoint, or an ``EncoderError`` naming every misfit.

    ``expected``: the model's parameter names and shapes; ``ignored``: file keys the model does
    not use by design (a text tower, a pooler head); ``pos_tables``: position tables (by model
    key) with how many prefix rows they hold, resampled when trained on another patch grid.
    Floating tensors come back as float32 (some checkpoints are stored in half precision).
    """
    needed = {key: source_keys(key) for key in expected}
    wanted = {name for names in needed.values() for name in names}
    missing = sorted((name for name in wanted if name not in state), key=_natural)
    unexpected = sorted(
        (k for k in state if k not in wanted and not (ignored and ignored.fullmatch(k))),
        key=_natural,
    )
    fitted: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, names in needed.items():
        if any(name not in state for name in names):
            continue
        parts = [state[name] for name in names]
        label = names[0] if len(names) == 1 else "+".join(names)
        if len(parts) > 1 and len({tuple(p.shape[1:]) for p in parts}) != 1:
            shapes = ", ".join(str(tuple(p.shape)) for p in parts)
            mismatched.append(f"{label}: file {shapes}, model {tuple(expected[key])} combined")
            continue
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if key in pos_tables and tensor.shape != expected[key]:
            tensor = _resampled(tensor, expected[key], pos_tables[key])
        if tensor.shape != expected[key]:
            mismatched.append(f"{label}: file {tuple(tensor.shape)}, model {tuple(expected[key])}")
            continue
        fitted[key] = tensor.float() if tensor.is_floating_point() else tensor
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected {_listed(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatch in {_listed(mismatched, noun='tensor')}")
        raise EncoderError(
            f"{where}: the weights do not fit the architecture: " + "; ".join(problems)
        )
    return fitted


def _resampled(tensor: torch.Tensor, shape: torch.Size, prefix: int) -> torch.Tensor:
    """A position table trained on another grid, resampled; unchanged if it cannot be."""
    if tensor.ndim != 3 or tensor.shape[2] != shape[2] or tensor.shape[1] <= prefix:
        return tensor
    grid = round((shape[1] - prefix) ** 0.5)
    try:
        return resample_pos_embed(tensor, prefix, grid)
    except ValueError:
        return tensor


def _natural(text: str) -> tuple[object, ...]:
    """Sort key with numbers compared as numbers (blocks.2 before blocks.10)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def _listed(items: list[str], noun: str = "key") -> str:
    shown = ", ".join(items[:_SHOWN])
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''} ({shown}{more})"
