"""Site-local evaluation of a trained MIL model: per-slide predictions and their metrics.

Kept apart from the CLI so the same numbers come out of ``fedpath local eval``, a notebook or a
federated client's local test: the functions here take a model and bag entries, return plain
data and never print. Bags are loaded and scored one at a time (batch of one, no padding), so
memory is bounded by the largest slide however large the test set is.

With a :class:`common.calibration.SlideCalibration` (fitted on the validation split by ``local
train`` and stored in the checkpoint, or fitted by a federation from its sites' sums) the slide
metrics are computed on the calibrated probabilities at the calibrated threshold, and the
uncalibrated ones are kept next to them, so every output can say which is which.

Checkpoints store the weights and the model config as plain JSON types only, so they load with
``torch.load(weights_only=True)`` (no pickled code runs when a hospital opens a model file it
was sent) and the architecture is rebuilt from the config rather than unpickled.
"""

from __future__ import annotations

import csv
import io
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from fedpath.client.training.bags import Bag, load_bag
from fedpath.client.training.site_index import BagEntry
from fedpath.client.training.trainer import out_of_memory_as_error
from fedpath.common.atomic import atomic_write_bytes
from fedpath.common.calibration import SlideCalibration, fit_calibration, scaled_probs
from fedpath.common.errors import ConfigError
from fedpath.common.metrics import SlideMetrics, predict, slide_metrics
from fedpath.common.mil.config import ModelConfig
from fedpath.common.mil.models import MILModel, build_model
from fedpath.common.patch_metrics import PatchMetrics, pooled_patch_metrics
from fedpath.common.safe_load import pickled_reference

__all__ = [
    "EvaluationResult",
    "SlidePrediction",
    "evaluate_bags",
    "evaluate_entries",
    "fit_on_predictions",
    "load_calibration",
    "load_checkpoint",
    "predict_bag",
    "predictions_csv",
    "save_checkpoint",
]


@dataclass(frozen=True)
class SlidePrediction:
    """One slide's class probabilities and, when it has patch labels, its patch predictions."""

    slide_id: str
    label: int
    probs: np.ndarray
    """``[C]`` softmax of the slide logits."""
    patch_labels: np.ndarray | None
    """``[N]`` 1/0/−1 patch labels of the bag, or ``None`` for an unannotated slide."""
    patch_tumour_prob: np.ndarray | None
    """``[N]`` instance tumour probability per real patch (``None`` without patch labels)."""
    logits: np.ndarray | None = None
    """``[C]`` slide logits (what a temperature divides); ``None`` when only probs are known."""

    @property
    def pred(self) -> int:
        return int(np.argmax(self.probs))

    def slide_logits(self) -> np.ndarray:
        """The logits, or log-probabilities (equal up to a shift, which softmax ignores)."""
        if self.logits is not None:
            return np.asarray(self.logits, dtype=np.float64)
        return np.log(np.maximum(np.asarray(self.probs, dtype=np.float64), 1e-300))


@dataclass(frozen=True)
class EvaluationResult:
    """Predictions of a set of slides and the metrics computed from them."""

    predictions: tuple[SlidePrediction, ...]
    slide: SlideMetrics
    """Calibrated when ``calibration`` is a fitted one, else of the raw probabilities."""
    patch: PatchMetrics | None
    """Pooled patch metrics over the annotated slides; ``None`` when none is annotated."""
    calibration: SlideCalibration | None = None
    uncalibrated: SlideMetrics | None = None
    """The raw probabilities' metrics at the argmax, when ``slide`` is calibrated."""

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None and self.calibration.fitted

    def probs(self) -> np.ndarray:
        """``[B, C]`` probabilities the slide metrics are of (calibrated when ``calibrated``)."""
        if not self.calibrated:
            return np.stack([p.probs for p in self.predictions])
        assert self.calibration is not None
        logits = np.stack([p.slide_logits() for p in self.predictions])
        return scaled_probs(logits, self.calibration.temperature)

    def to_json(self) -> dict[str, Any]:
        return {
            "n_slides": len(self.predictions),
            "calibrated": self.calibrated,
            "calibration": None if self.calibration is None else self.calibration.model_dump(),
            "slide_metrics": self.slide.to_json(),
            "slide_metrics_uncalibrated": (
                None if self.uncalibrated is None else self.uncalibrated.to_json()
            ),
            "pooled_patch_metrics": self.patch.to_json() if self.patch is not None else None,
        }


def predict_bag(model: MILModel, bag: Bag) -> SlidePrediction:
    """Score one bag (caller sets eval mode and ``no_grad``); float64 softmax sums to 1.

    The outputs are copied to the CPU before they are widened: MPS has no float64, and the
    copy is of a slide's logits only (N x 2 for the patches).
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out = model(bag.features.unsqueeze(0).to(device), None)
    logits = out.logits[0].cpu().double()
    probs = torch.softmax(logits, dim=-1).cpu().numpy()
    labels = tumour = None
    if bag.patch_labels is not None:
        labels = bag.patch_labels.cpu().numpy().astype(np.int64)
        tumour = torch.softmax(out.instance_logits[0].cpu().double(), dim=-1)[:, 1].numpy()
    return SlidePrediction(
        bag.entry.slide_id, int(bag.entry.label), probs, labels, tumour, logits.cpu().numpy()
    )


def evaluate_entries(
    model: MILModel,
    entries: Sequence[BagEntry],
    *,
    feature_dim: int | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    on_slide: Callable[[SlidePrediction], None] | None = None,
    labels: Sequence[str] | None = None,
    calibration: SlideCalibration | None = None,
) -> EvaluationResult:
    """Load and score ``entries`` one bag at a time in eval mode, then compute the metrics.

    ``on_slide`` is called with each slide's prediction as soon as it is scored, in ``entries``
    order, so a caller can show progress over a test set that takes minutes without this
    module printing. The model's train/eval mode is restored afterwards. Raises
    ``ValueError`` for no entries and ``FeatureBagError`` for a bag whose width does not match
    ``feature_dim``.
    """
    if not entries:
        raise ValueError("no slides to evaluate")
    bags = (load_bag(entry, feature_dim) for entry in entries)
    return evaluate_bags(
        model,
        bags,
        bootstrap=bootstrap,
        seed=seed,
        on_slide=on_slide,
        labels=labels,
        calibration=calibration,
    )


def evaluate_bags(
    model: MILModel,
    bags: Iterable[Bag],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    on_slide: Callable[[SlidePrediction], None] | None = None,
    labels: Sequence[str] | None = None,
    calibration: SlideCalibration | None = None,
) -> EvaluationResult:
    """Score ``bags`` as they come, then compute the metrics (see :func:`evaluate_entries`).

    Takes an iterable, so a loader that skips unusable files while it reads
    (:meth:`fedpath.client.training.bags.BagSkips.iter_bags`) reads each bag exactly once and memory
    stays at one bag. ``ValueError`` when it yields no bag.
    """
    was_training = model.training
    model.eval()
    predictions: list[SlidePrediction] = []
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with out_of_memory_as_error(device, "scoring a slide"), torch.no_grad():
            for bag in bags:
                prediction = predict_bag(model, bag)
                predictions.append(prediction)
                if on_slide is not None:
                    on_slide(prediction)
    finally:
        model.train(was_training)
    if not predictions:
        raise ValueError("no slides to evaluate")
    return metrics_of(
        predictions, bootstrap=bootstrap, seed=seed, labels=labels, calibration=calibration
    )


def metrics_of(
    predictions: Iterable[SlidePrediction],
    *,
    bootstrap: int,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    calibration: SlideCalibration | None = None,
) -> EvaluationResult:
    """The metrics of scored slides; calibrated ones too when ``calibration`` is fitted."""
    preds = tuple(predictions)
    y = np.asarray([p.label for p in preds], dtype=np.int64)
    raw = slide_metrics(
        y, np.stack([p.probs for p in preds]), bootstrap=bootstrap, seed=seed, labels=labels
    )
    annotated = [
        (p.patch_labels, p.patch_tumour_prob)
        for p in preds
        if p.patch_labels is not None and p.patch_tumour_prob is not None
    ]
    patch = pooled_patch_metrics(annotated) if annotated else None
    result = EvaluationResult(preds, raw, patch, calibration)
    if not result.calibrated:
        return result
    assert calibration is not None
    calibrated = slide_metrics(
        y,
        result.probs(),
        bootstrap=bootstrap,
        seed=seed,
        labels=labels,
        threshold=calibration.threshold,
    )
    return EvaluationResult(preds, calibrated, patch, calibration, raw)


def fit_on_predictions(
    predictions: Sequence[SlidePrediction], labels: Sequence[str] | None = None
) -> SlideCalibration:
    """Temperature and threshold fitted on scored validation slides (none: not fitted)."""
    if not predictions:
        return SlideCalibration(reason="no validation slides")
    logits = np.stack([p.slide_logits() for p in predictions])
    y = np.asarray([p.label for p in predictions], dtype=np.int64)
    return fit_calibration(logits, y, labels)


def predictions_csv(
    predictions: Sequence[SlidePrediction],
    labels: Sequence[str],
    calibration: SlideCalibration | None = None,
) -> str:
    """CSV text ``slide_id,label,prob_<label>...,pred`` with label names, not indices.

    With a fitted ``calibration`` the ``prob_`` columns are the calibrated probabilities,
    ``pred`` is the decision at the calibrated threshold, and ``raw_prob_<label>`` columns keep
    the model's own probabilities.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    fitted = calibration is not None and calibration.fitted
    header = ["slide_id", "label", *(f"prob_{name}" for name in labels), "pred"]
    writer.writerow(header + ([f"raw_prob_{name}" for name in labels] if fitted else []))
    for p in predictions:
        if len(p.probs) != len(labels):
            raise ValueError(f"{p.slide_id}: {len(p.probs)} probabilities for {len(labels)} labels")
        raw = [f"{float(x):.6f}" for x in p.probs]
        if not fitted:
            writer.writerow([p.slide_id, labels[p.label], *raw, labels[p.pred]])
            continue
        assert calibration is not None
        cal = scaled_probs(p.slide_logits()[None, :], calibration.temperature)
        pred = int(predict(cal, calibration.threshold)[0])
        row = [p.slide_id, labels[p.label], *(f"{float(x):.6f}" for x in cal[0]), labels[pred]]
        writer.writerow(row + raw)
    return buffer.getvalue()


def save_checkpoint(
    path: str | Path,
    model: MILModel,
    model_config: ModelConfig,
    calibration: SlideCalibration | None = None,
) -> None:
    """Write weights + model config (+ calibration) atomically, loadable with
    ``weights_only=True``.

    Serialised in memory first: torch's zip writer turns a failed write (a full disk) into a
    bare ``RuntimeError`` ("unexpected pos …"); written as bytes, it is an ``OutputWriteError``
    naming the file and the OS error.
    """
    payload: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model_config.model_dump(mode="json"),
    }
    if calibration is not None:
        payload["calibration"] = calibration.model_dump(mode="json")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> tuple[MILModel, ModelConfig]:
    """Rebuild the model from a checkpoint's config and load its weights (CPU).

    Raises ``ConfigError`` naming the file when it is missing, not a fedpath checkpoint, or its
    weights do not fit the architecture its config describes.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model checkpoint not found: {file} (run `fedpath local train`)")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{file}: refused: the checkpoint holds pickled Python objects, not only tensors "
            f"and plain values{pickled_reference(exc)}; fedpath never unpickles code from a file"
        ) from exc
    except Exception as exc:  # torch raises several unrelated types for unreadable files
        raise ConfigError(f"{file}: not a readable fedpath checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or {"state_dict", "model_config"} - payload.keys():
        raise ConfigError(f"{file}: not a fedpath checkpoint (state_dict/model_config missing)")
    try:
        cfg = ModelConfig.model_validate(payload["model_config"])
    except ValidationError as exc:
        raise ConfigError(f"{file}: invalid model_config ({exc})") from exc
    with torch.random.fork_rng(devices=[]):  # the init draws are overwritten; keep caller RNG
        model = build_model(cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(f"{file}: weights do not match its model_config ({exc})") from exc
    model.eval()
    return model, cfg


def load_calibration(path: str | Path) -> SlideCalibration | None:
    """The calibration stored with a checkpoint, ``None`` for one saved without (older runs).

    ``ConfigError`` naming the file when the stored calibration is malformed.
    """
    file = Path(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # load_checkpoint gives the detailed refusal; keep this one short
        raise ConfigError(f"{file}: not a readable fedpath checkpoint ({exc})") from exc
    raw = payload.get("calibration") if isinstance(payload, dict) else None
    if raw is None:
        return None
    try:
        return SlideCalibration.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{file}: invalid calibration ({exc})") from exc
