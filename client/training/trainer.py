"""The site-local trainer (DESIGN §4.4): a pure function of (model, bags, config).

Centralised training and the federated client's local epochs run this same code, so it has no
CLI, prints nothing, reads and writes no files and caches nothing: the caller loads the bags and
decides what to log (``on_epoch``) and what to save (the returned model and history).

Reproducibility: every epoch draws its randomness (slide schedule, dropout, instance sampling)
from streams derived from ``(cfg.seed, epoch)`` alone. A run is therefore identical for the
same seed, and a federated round that resumes at ``start_epoch`` sees the same oversampling
decay and the same random streams as one long run would at that epoch. Dropout needs torch's
global generator; it is seeded inside :func:`torch.random.fork_rng`, so the caller's global
random state is left exactly as it was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedpath.client.training.bags import Bag, sample_patches
from fedpath.client.training.placement import (
    Precision,
    collate_for,
    model_device,
    precision_autocast,
    private_torch_rng,
    to_device,
)
from fedpath.common.cpuinfo import read_cpuinfo
from fedpath.common.device import describe_device
from fedpath.common.errors import DeviceError, FedpathError
from fedpath.common.metrics import slide_metrics
from fedpath.common.mil.losses import mixed_supervision_loss
from fedpath.common.mil.models import MILModel
from fedpath.common.mil.sampling import epoch_schedule
from fedpath.common.patch_metrics import pooled_patch_metrics
from fedpath.common.train_config import TrainConfig

__all__ = [
    "EpochMetrics",
    "TrainResult",
    "TrainingDivergedError",
    "ValidationMetrics",
    "amx_available",
    "check_finite_weights",
    "cuda_bf16",
    "epoch_seeds",
    "evaluate",
    "fast_bf16_cpu",
    "out_of_memory_as_error",
    "physical_batches",
    "resolve_precision",
    "step_lr",
    "stopping_loss",
    "train",
]


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch: training loss and its parts (means over steps), validation metrics.

    Validation fields are NaN when there is no validation set or the metric is undefined
    (e.g. a single class, or no patch labels); ``to_json`` turns NaN into ``None``.
    """

    epoch: int
    train_loss: float
    train_bag_loss: float
    train_instance_loss: float
    train_attention_loss: float
    val_loss: float
    val_auc: float
    val_patch_auc: float
    seconds: float
    n_steps: int
    val_patch_loss: float = math.nan
    """Patch CE over the labelled patches of validation slides with patch labels."""
    val_stopping_loss: float = math.nan
    """The loss early stopping and the best-epoch choice compare (``stopping_loss``)."""

    def to_json(self) -> dict[str, Any]:
        """Strict-JSON dict (JSON has no NaN)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
            else:
                out[key] = value
        return out


@dataclass(frozen=True)
class ValidationMetrics:
    """Slide CE loss (mean over bags), slide AUC and pooled patch AUC of one evaluation pass,
    and the instance classifier's CE over every labelled patch (-1: ambiguous, left out) of
    the bags with patch labels, pooled: NaN when no bag has a labelled patch."""

    loss: float
    auc: float
    patch_auc: float
    patch_loss: float = math.nan


def stopping_loss(val: ValidationMetrics, cfg: TrainConfig) -> float:
    """The validation loss that picks the best epoch and triggers early stopping.

    ``cfg.stopping_loss`` "slide" is CLAM's slide CE. "supervised" weighs it with the patch
    CE as training weighs the bag and instance losses (c_bag, 1 − c_bag); "patch" is the
    patch CE alone. Both only in mixed mode and when validation slides have patch labels;
    otherwise it is the slide CE. A weak-mode run never looks at patch labels, not even to
    choose its epoch.
    """
    mixed = cfg.supervision.mode == "mixed"
    if cfg.stopping_loss == "slide" or not mixed or math.isnan(val.patch_loss):
        return val.loss
    if cfg.stopping_loss == "patch":
        return val.patch_loss
    c = cfg.supervision.bag_weight
    return c * val.loss + (1.0 - c) * val.patch_loss


@dataclass(frozen=True)
class TrainResult:
    """The trained model (best validation epoch restored, or last without validation).

    ``best_epoch`` is an absolute epoch index (as in ``history``). ``mean_train_loss_last_epoch``
    is the FedMix ``L_i`` of this site (DESIGN §4.6). ``precision`` is what ``cfg.precision``
    resolved to on this machine, so a run's record says whether bfloat16 was used, and
    ``device`` which device trained (:func:`fedpath.common.device.describe_device`).
    """

    model: MILModel
    history: list[EpochMetrics]
    best_epoch: int
    stopped_early: bool
    mean_train_loss_last_epoch: float
    n_train_slides: int
    precision: Precision = "float32"
    device: str = "cpu"


@contextmanager
def out_of_memory_as_error(device: torch.device, what: str, hint: str = "") -> Iterator[None]:
    """Turn torch's out-of-memory error into a ``DeviceError`` that says what to change.

    A GPU has a fixed memory, often shared with other jobs: a slide or a batch that does not
    fit would otherwise end a command in a traceback, or a federated round in a ClientApp
    crash instead of an error reply the coordinator can read. ``hint`` names the settings
    that bound the memory; the way out that depends on the device is added here.
    """
    try:
        yield
    except torch.OutOfMemoryError as exc:
        first = (str(exc).strip().splitlines() or ["out of memory"])[0]
        if device.type == "cpu":
            way_out = "free memory on this machine (other jobs)"
        else:
            way_out = "free the device's memory (other jobs) or use the CPU (device cpu)"
        todo = f"{hint}, or {way_out}" if hint else way_out
        raise DeviceError(
            f"{describe_device(device)} ran out of memory while {what} ({first}); {todo}"
        ) from exc


def training_memory_hint(cfg: TrainConfig) -> str:
    """What to lower when training does not fit (the settings that bound its memory)."""
    return (
        f"lower max_batch_patches ({cfg.max_batch_patches}) or max_train_patches "
        f"({cfg.max_train_patches or 'every patch'})"
    )


def amx_available() -> bool:
    """True when oneDNN can use AMX tiles here (Sapphire Rapids and later Xeons).

    Measured on such a Xeon (bench/training.py, one core): a 5120×1280 @ 1280×512 product
    takes 6 ms in bfloat16 with AMX, 46 ms in float32 and 84 ms in bfloat16 when oneDNN is
    limited to AVX512-BF16 — so bfloat16 pays only with AMX, not with AVX512-BF16 alone.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def fast_bf16_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on CPUs where oneDNN's bfloat16 matrix products beat float32 by a wide margin.

    Measured with bench/training.py (the per-patch layers of a training step): on a Xeon with
    AMX, 6 ms in bfloat16 vs 46 ms in float32 for a 5120×1280 @ 1280×512 product; on an AMD
    EPYC with AVX512-BF16, a whole epoch 4.5× faster in bfloat16 (39 vs 176 s) at the same
    validation loss; but on an Intel Xeon with AVX512-BF16 and no AMX, bfloat16 was slower
    (84 vs 46 ms). So: AMX anywhere, or AVX512-BF16 on AMD.
    """
    if amx_available():
        return True
    vendor, flags = read_cpuinfo(cpuinfo)
    return vendor == "AuthenticAMD" and "avx512_bf16" in flags


def cuda_bf16(device: torch.device) -> bool:
    """True when the CUDA GPU computes bfloat16 natively (compute capability 8.0, Ampere, and
    later); older GPUs (V100, T4) only emulate it, slower than their float16 tensor cores."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 0)


def resolve_precision(precision: str, device: torch.device, *, private: bool = False) -> Precision:
    """The precision ``"auto"`` stands for on ``device``; explicit choices pass through.

    On a CPU ``auto`` is bfloat16 where it is known to be much faster (:func:`fast_bf16_cpu`):
    there a training step runs several times faster with validation loss unchanged
    (bench/training.py); elsewhere bfloat16 is slower than float32 (Intel AVX512-BF16 alone,
    or emulated), so ``auto`` keeps float32.

    On a CUDA GPU ``auto`` is its native low precision: bfloat16 where it computes it natively
    (:func:`cuda_bf16`), else float16, which the plain trainer runs with a ``GradScaler``
    (float16's narrow range would otherwise flush small gradients to zero). DP-SGD
    (``private``) never takes float16: its per-slide gradients cannot be loss-scaled safely. An
    unscaled float16 backward loses a slide's small gradients or overflows to Inf, and an Inf
    norm makes the clipped gradient NaN (Inf x 0), which poisons the noisy sum; a scaler
    that skips steps and moves its scale when a slide overflows makes a data-dependent
    decision outside the accountant. So DP-SGD runs bfloat16 (same exponent range as float32)
    or float32. On MPS ``auto`` keeps float32 (untested there). The result records which one
    ran (``TrainResult.precision``).
    """
    if precision == "auto":
        if device.type == "cuda":
            if cuda_bf16(device):
                return "bfloat16"
            return "float32" if private else "float16"
        return "bfloat16" if device.type == "cpu" and fast_bf16_cpu() else "float32"
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"unknown precision {precision!r}")
    return "bfloat16" if precision == "bfloat16" else "float32"


def physical_batches(lengths: Sequence[int], max_patches: int) -> list[list[int]]:
    """Positions of one step's slides grouped into forward passes of ≤ ``max_patches`` padded rows.

    A pass pads its slides to the longest, so slides are taken longest first (ties in order)
    and a pass closes when one more slide would exceed ``max_patches`` = B × longest: small
    bags share a pass (bigger matrix products, fewer Python round trips), bags of thousands
    of patches run alone, unpadded, so nothing is copied and memory is bounded by the largest
    slide rather than by the sum of a step's slides. Every slide stays its own row (DP unit).
    """
    if max_patches < 1:
        raise ValueError(f"max_patches must be >= 1; got {max_patches}")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    passes: list[list[int]] = []
    for i in order:
        if passes and int(lengths[passes[-1][0]]) * (len(passes[-1]) + 1) <= max_patches:
            passes[-1].append(i)
        else:
            passes.append([i])
    return passes


def step_lr(cfg: TrainConfig, slides: int) -> float:
    """Adam's step size for a step of ``slides`` slides: ``cfg.lr`` scaled by ``cfg.lr_scaling``.

    ``cfg.lr`` is a per-slide rate (CLAM and DESIGN §4.4 use 2e-4 with one slide per step);
    Adam's update hardly grows with the batch, so k slides per step cover ~1/k of the
    distance per epoch unless the rate grows with k.
    """
    if cfg.lr_scaling == "linear":
        return cfg.lr * slides
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(slides)
    return cfg.lr


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int, int]:
    """Independent seeds for (numpy schedule, torch dropout, instance sampling) of one epoch."""
    a, b, c = np.random.SeedSequence([seed, epoch]).generate_state(3)
    return int(a), int(b), int(c)


def patch_sampler(seed: int, epoch: int) -> torch.Generator:
    """The generator that picks each large slide's training patches in one epoch
    (:func:`~fedpath.client.training.bags.sample_patches`): its own stream, so runs whose slides are
    all small draw exactly the dropout and instance samples they drew before it existed."""
    (state,) = np.random.SeedSequence([seed, epoch, 11]).generate_state(1)
    return torch.Generator().manual_seed(int(state))


def evaluate(
    model: MILModel, bags: Sequence[Bag], precision: Precision = "float32"
) -> ValidationMetrics:
    """Validation metrics, one bag at a time in eval mode without gradients.

    One bag per forward needs no padding and bounds memory by the largest slide. The model's
    train/eval mode is restored afterwards. All NaN when ``bags`` is empty. ``precision``
    "bfloat16" runs the per-patch layers under autocast (the trainer validates in the
    precision it trains in); the default float32 is what evaluation reports use.
    """
    if not bags:
        return ValidationMetrics(math.nan, math.nan, math.nan)
    device = model_device(model)
    was_training = model.training
    model.eval()
    losses: list[float] = []
    probs: list[np.ndarray] = []
    labels: list[int] = []
    patches: list[tuple[np.ndarray, np.ndarray]] = []
    patch_nll = 0.0
    n_patch = 0
    try:
        with torch.no_grad():
            for bag in bags:
                batch = to_device(collate_for([bag], precision, device), device)
                with precision_autocast(device, precision):
                    out = model(batch.features, batch.mask)
                # Scored in float64 on the CPU: a slide's few logits cost nothing to copy,
                # and MPS has no float64.
                slide_logits = out.logits.cpu().double()
                losses.append(float(F.cross_entropy(slide_logits, batch.labels.cpu())))
                probs.append(torch.softmax(slide_logits, dim=1)[0].numpy())
                labels.append(int(bag.entry.label))
                if bag.patch_labels is not None:
                    logits = out.instance_logits[0, : bag.num_patches].cpu().double()
                    tumour = torch.softmax(logits, dim=-1)[:, 1]
                    patch_labels = bag.patch_labels.long()
                    known = patch_labels >= 0
                    if bool(known.any()):
                        patch_nll += float(
                            F.cross_entropy(logits[known], patch_labels[known], reduction="sum")
                        )
                        n_patch += int(known.sum())
                    patches.append((bag.patch_labels.numpy().astype(np.int64), tumour.numpy()))
    finally:
        model.train(was_training)
    auc = slide_metrics(np.asarray(labels), np.stack(probs), bootstrap=0).auc.value
    patch_auc = pooled_patch_metrics(patches).auc if patches else math.nan
    patch_loss = patch_nll / n_patch if n_patch else math.nan
    return ValidationMetrics(float(np.mean(losses)), float(auc), float(patch_auc), patch_loss)


def _train_epoch(
    model: MILModel,
    optimiser: torch.optim.Optimizer,
    bags: Sequence[Bag],
    labels: np.ndarray,
    annotated: np.ndarray,
    epoch: int,
    cfg: TrainConfig,
    device: torch.device,
    precision: Precision,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, float, float, float, int]:
    """One epoch of steps; returns mean (total, bag, instance, attention) loss and step count.

    A step's loss is the mean over its slides whatever the forward passes they were split
    into (:func:`physical_batches`): each pass backpropagates its slides' share of that mean,
    so the accumulated gradient is the one of the whole step in a single padded batch.
    With ``scaler`` (float16) each pass backpropagates the scaled loss; the step's gradient
    is unscaled before clipping, and a step whose gradient overflowed is skipped while the
    scale shrinks (``torch.amp.GradScaler``).
    """
    np_seed, torch_seed, gen_seed = epoch_seeds(cfg.seed, epoch)
    rng = np.random.default_rng(np_seed)
    torch.manual_seed(torch_seed)  # dropout; global state is forked by the caller
    generator = torch.Generator().manual_seed(gen_seed)
    patches = patch_sampler(cfg.seed, epoch)
    schedule = epoch_schedule(labels, annotated, epoch, cfg.supervision, rng, cfg.steps_per_epoch)
    model.train()
    instance_logits_used = model.has_instance_task
    sums = np.zeros(4, dtype=np.float64)
    for group in schedule:
        for param_group in optimiser.param_groups:
            param_group["lr"] = step_lr(cfg, len(group))
        optimiser.zero_grad(set_to_none=True)
        step = np.zeros(4, dtype=np.float64)
        step_bags = [sample_patches(bags[i], cfg.max_train_patches, patches) for i in group]
        lengths = [bag.num_patches for bag in step_bags]
        for positions in physical_batches(lengths, cfg.max_batch_patches):
            chosen = [step_bags[p] for p in positions]
            batch = to_device(collate_for(chosen, precision, device), device)
            with precision_autocast(device, precision):
                out = model(batch.features, batch.mask)
            parts = mixed_supervision_loss(
                out.logits,
                out.attention,
                out.instance_logits if instance_logits_used else None,
                batch.labels,
                batch.patch_labels,
                batch.annotation_complete,
                batch.mask,
                cfg.supervision,
                generator,
            )
            share = len(positions) / len(group)
            loss = parts.total * share
            (loss if scaler is None else scaler.scale(loss)).backward()
            step += share * np.array(
                [
                    float(parts.total.detach()),
                    float(parts.bag.detach()),
                    float(parts.instance.detach()),
                    float(parts.attention.detach()),
                ]
            )
        if scaler is not None:
            scaler.unscale_(optimiser)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if scaler is None:
            optimiser.step()
        else:
            scaler.step(optimiser)
            scaler.update()
        sums += step
    n = len(schedule)
    means = sums / n if n else np.full(4, math.nan)
    return float(means[0]), float(means[1]), float(means[2]), float(means[3]), n


def train(
    model: MILModel,
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    cfg: TrainConfig,
    *,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    start_epoch: int = 0,
) -> TrainResult:
    """Train ``model`` in place with Adam on ``train_bags``; validate on ``val_bags`` each epoch.

    Runs epochs ``start_epoch .. start_epoch + cfg.epochs - 1``. ``start_epoch`` continues the
    oversampling decay and random streams of a longer run (federated rounds); the optimiser
    starts fresh on every call. With validation bags the weights of the epoch with the lowest
    validation loss (:func:`stopping_loss`: the slide loss unless ``cfg.stopping_loss`` says
    otherwise) are restored at the end, and training stops once ``cfg.patience``
    epochs pass without a strictly lower loss, provided at least ``cfg.min_epochs`` epochs
    (counted from epoch 0) are done. Without validation bags every epoch runs and the last
    weights are kept. ``on_epoch`` is called once per epoch with its metrics.

    Annotated slides (patch labels present) are oversampled only in ``mixed`` mode: ``weak``
    mode ignores patch labels, so boosting those slides would only skew the slide sample.

    ``cfg.precision`` is resolved once (:func:`resolve_precision`) and used for training and
    validation alike; the result records it. Training runs on the device the model's
    parameters are on (move the model first, e.g. to ``fedpath.common.device.resolve_device``'s
    choice): batches follow it, and so do the optimiser's state and the dropout RNG.
    """
    if not train_bags:
        raise ValueError("no training bags")
    if start_epoch < 0:
        raise ValueError(f"start_epoch must be >= 0; got {start_epoch}")
    device = model_device(model)
    precision = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "float16" else None
    labels = np.asarray([b.entry.label for b in train_bags], dtype=np.int64)
    mixed = cfg.supervision.mode == "mixed"
    annotated = np.asarray([mixed and b.patch_labels is not None for b in train_bags], dtype=bool)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    memory = out_of_memory_as_error(device, "training", training_memory_hint(cfg))

    with memory, private_torch_rng(device):

        def one_epoch(epoch: int) -> tuple[Sequence[float], int]:
            *losses, n_steps = _train_epoch(
                model,
                optimiser,
                train_bags,
                labels,
                annotated,
                epoch,
                cfg,
                device,
                precision,
                scaler,
            )
            return losses, n_steps

        return run_epochs(
            model,
            train_bags,
            val_bags,
            cfg,
            one_epoch,
            lambda: evaluate(model, val_bags, precision),
            precision=precision,
            on_epoch=on_epoch,
            start_epoch=start_epoch,
        )


class TrainingDivergedError(FedpathError):
    """The weights stopped being finite: the model is useless and must not be saved or sent."""


def _finite(model: MILModel) -> bool:
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def check_finite_weights(model: MILModel, epoch: int, loss: float, cfg: TrainConfig) -> None:
    """Raise :class:`TrainingDivergedError` when a parameter holds NaN or Inf after ``epoch``.

    A diverged model scores every slide NaN: saved, it fails every later evaluation; sent to
    the server, it turns the global model of every site into NaN. The loss alone cannot tell
    (a DP-SGD epoch that sampled no slide has a NaN mean loss and unchanged weights).
    """
    if _finite(model):
        return
    hint = (
        f"lower the learning rate (lr = {cfg.lr:g}) or set grad_clip"
        if cfg.grad_clip is None
        else f"lower the learning rate (lr = {cfg.lr:g}) or grad_clip ({cfg.grad_clip:g})"
    )
    raise TrainingDivergedError(
        f"training diverged in epoch {epoch}: the model's weights are no longer finite "
        f"(mean training loss {loss:.4g}); {hint}"
    )


def run_epochs(
    model: MILModel,
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    cfg: TrainConfig,
    one_epoch: Callable[[int], tuple[Sequence[float], int]],
    validate: Callable[[], ValidationMetrics],
    *,
    precision: Precision,
    on_epoch: Callable[[EpochMetrics], None] | None,
    start_epoch: int,
) -> TrainResult:
    """The epoch loop both trainers share: metrics, best-epoch restore and early stopping.

    ``one_epoch(epoch)`` trains one epoch and returns its mean (total, bag, instance,
    attention) loss and step count; ``validate()`` scores the current weights. The rules are
    those :func:`train` documents; the model's train/eval mode is restored at the end.
    """
    if not _finite(model):  # not this training's fault: say so rather than "diverged"
        raise TrainingDivergedError(
            "the model to train already holds NaN or Inf weights (it diverged before it got "
            "here, e.g. a global model averaged from a diverged site); nothing was trained"
        )
    was_training = model.training
    history: list[EpochMetrics] = []
    best_loss = math.inf
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    since_best = 0
    stopped_early = False
    for epoch in range(start_epoch, start_epoch + cfg.epochs):
        began = time.perf_counter()
        (loss, bag_loss, inst_loss, att_loss), n_steps = one_epoch(epoch)
        check_finite_weights(model, epoch, loss, cfg)
        val = validate()
        score = stopping_loss(val, cfg)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=float(loss),
            train_bag_loss=float(bag_loss),
            train_instance_loss=float(inst_loss),
            train_attention_loss=float(att_loss),
            val_loss=val.loss,
            val_auc=val.auc,
            val_patch_auc=val.patch_auc,
            seconds=time.perf_counter() - began,
            n_steps=n_steps,
            val_patch_loss=val.patch_loss,
            val_stopping_loss=score,
        )
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
        if not val_bags:
            continue
        if score < best_loss:  # NaN never counts as an improvement
            best_loss, best_epoch, since_best = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
        if since_best >= cfg.patience and epoch + 1 >= cfg.min_epochs:
            stopped_early = epoch < start_epoch + cfg.epochs - 1
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    model.train(was_training)
    return TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch if best_epoch is not None else history[-1].epoch,
        stopped_early=stopped_early,
        mean_train_loss_last_epoch=history[-1].train_loss,
        n_train_slides=len(train_bags),
        precision=precision,
        device=describe_device(model_device(model)),
    )
