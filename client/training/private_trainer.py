"""Slide-level DP-SGD for the site-local trainer (DESIGN §4.5): a function of (model, bags, config).

Same contract as :func:`fedpath.client.training.trainer.train` (no I/O, prints nothing, same loss,
same validation, same best-epoch restore and early stopping) with the three changes DP-SGD
needs, one slide being one privacy unit:

- **Poisson sampling** (Opacus' ``UniformWithReplacementSampler``): every step takes each
  training slide independently with probability q = B/N (B = ``expected_batch_slides``), an
  epoch being round(N/B) steps. The normal/tumour
  pairing and the oversampling of annotated slides of the plain trainer would make a slide's
  chance of being used depend on the other slides, which the accountant cannot express.
- **Per-slide clipping** (Opacus' ``DPOptimizer``): each sampled slide runs alone (physical
  batch 1, no padding, as ``BatchMemoryManager(max_physical_batch_size=1)`` would split it)
  and its gradient becomes the slide's ``grad_sample``; the optimiser clips each to norm C
  and sums them. With one slide per backward pass the ordinary gradient *is* the slide's
  per-sample gradient, so Opacus' ``GradSampleModule`` hooks are not used: they would
  compute the same numbers at extra cost (``tests/test_private_trainer`` checks equality
  with them on a padded batch) and they mis-pair activations when a layer is called twice
  but only one call reaches the loss (ABMIL's slide classifier also reads out its instance
  logits, which its loss does not use).
- **Noise** (``DPOptimizer``): Gaussian noise of std σ·C is added to the step's sum, which is
  divided by the *expected* batch B (``loss_reduction="mean"`` with Poisson sampling); the
  step size is ``step_lr`` for B slides. An empty step still adds noise and steps, as the analysis
  assumes. The optimiser (Adam) only post-processes the noisy gradient.

The sampling and the noise are drawn from ``secret_seed``, which the caller keeps from the
server (the federated client stores it in its privacy ledger): noise that the server could
regenerate from a public seed would protect nothing. The dropout and instance-sampling
streams stay derived from ``cfg.seed`` as in the plain trainer; they need no secrecy.

**Precision** follows ``cfg.precision`` as in the plain trainer (:func:`~fedpath.client.training.
trainer.resolve_precision`: ``auto`` is bfloat16 on a CPU where it is much faster and on a
GPU that computes it natively, float32 elsewhere, never float16). bfloat16 is autocast around
the forward pass only, as in the plain trainer:
the parameters, their per-slide gradients (autograd returns a leaf's gradient in the leaf's
dtype), the per-slide norms, the clipping to C, the sum and the noise are all float32. The
guarantee is a property of what is summed, not of how it was computed: every slide adds a
float32 vector of norm ≤ C and the sum gets noise of std σ·C, whatever arithmetic produced
the unclipped gradient (``tests/test_private_trainer`` checks both under bfloat16). A
rounded forward pass changes which gradient a slide proposes, never how much it can move
the update. ``precision="float32"`` is the float32 trainer it always was.

**Devices.** Training runs where the model's parameters are (a CUDA GPU, MPS or the CPU):
each slide's gradient, the stacked ``grad_sample``, Opacus' per-slide norms, clipping and
sum, and the noise, drawn from a generator on that same device, never leave it. The
accounting does not depend on the device: σ, q and the step count are planned before
training from public settings and N alone. On a GPU ``auto`` precision is bfloat16 where the
GPU computes it natively and float32 otherwise, never float16
(:func:`~fedpath.client.training.trainer.resolve_precision` says why). The same secret seed draws
different noise on another kind of device, so the federated client counts a round retried
on another device as a new release (``fedpath.client.federated.input_digest``). On a CUDA GPU the
training runs with torch's deterministic algorithms (:func:`deterministic_on`): some CUDA
backward passes (the instance loss's indexing) otherwise add with atomics in a varying order,
and a round retried on the same GPU would release the same noise on a gradient that differs
in its last bits (the difference of two such releases has no noise left in it).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fedpath.client.training.bags import Bag, sample_patches
from fedpath.client.training.placement import (
    Precision,
    collate_for,
    model_device,
    precision_autocast,
    private_torch_rng,
    to_device,
)
from fedpath.client.training.privacy_accountant import (
    Mechanism,
    check_delta,
    sampling_plan,
    solve_noise_multiplier,
)
from fedpath.client.training.trainer import (
    EpochMetrics,
    TrainResult,
    evaluate,
    out_of_memory_as_error,
    patch_sampler,
    resolve_precision,
    run_epochs,
    step_lr,
)
from fedpath.common.dp_config import DPConfig
from fedpath.common.errors import ConfigError
from fedpath.common.mil.losses import mixed_supervision_loss
from fedpath.common.mil.models import MILModel
from fedpath.common.train_config import TrainConfig

__all__ = [
    "PrivateTrainResult",
    "check_private_model",
    "clipped_slide_gradient",
    "deterministic_on",
    "epoch_streams",
    "plan_private_training",
    "train_private",
]


@dataclass(frozen=True)
class PrivateTrainResult:
    """The plain trainer's result plus what the accountant must record about this call."""

    result: TrainResult
    mechanism: Mechanism
    """σ, q and the number of noisy steps actually taken (fewer than planned only when
    validation stopped training early)."""
    max_grad_norm: float


def check_private_model(model: torch.nn.Module) -> None:
    """Refuse a model DP-SGD cannot protect, with every reason at once (``ConfigError``).

    Opacus' ``ModuleValidator`` names the layers its analysis excludes (BatchNorm mixes the
    slides of a batch; InstanceNorm with running statistics, stock LSTM/GRU, ...). Buffers are
    refused as well: they are part of the model the site sends, updated from its data without
    clipping or noise (BatchNorm's running mean is the usual one).
    """
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()
    try:
        problems = [str(e) for e in ModuleValidator.validate(model, strict=False)]
    finally:
        model.train(was_training)
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        problems.append(
            f"the model has buffers ({', '.join(buffers[:5])}) that would leave the site "
            "without clipping or noise"
        )
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(
            f"this model cannot be trained with DP-SGD ({len(problems)} problem(s)); "
            f"use Linear/LayerNorm/GroupNorm layers without running statistics:\n{lines}"
        )


def plan_private_training(dp: DPConfig, n_slides: int, epochs: int) -> Mechanism:
    """The mechanism one call of :func:`train_private` with ``epochs`` epochs will run.

    σ is ``dp.noise_multiplier``, or solved from ``dp.target_epsilon`` for
    ``dp.planned_rounds`` calls of ``epochs`` epochs each at this site's sampling rate. The
    plan depends only on public settings and N, so every round of a run gets the same σ and
    the privacy ledger can check the budget before anything is trained.
    """
    if not dp.enabled:
        raise ConfigError("DP-SGD is not enabled in this configuration")
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1; got {epochs}")
    check_delta(dp.delta, n_slides)
    q, per_epoch = sampling_plan(n_slides, dp.expected_batch_slides)
    steps = per_epoch * epochs
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        assert dp.target_epsilon is not None  # DPConfig guarantees one of the two
        sigma = solve_noise_multiplier(
            dp.target_epsilon, dp.delta, q, steps * dp.planned_rounds, dp.accountant
        )
    return Mechanism(noise_multiplier=float(sigma), sample_rate=q, steps=steps)


@contextmanager
def deterministic_on(device: torch.device) -> Iterator[None]:
    """torch's deterministic algorithms inside the block when ``device`` is a CUDA GPU.

    A retried DP round reuses its recorded secret seed, so it must compute the same gradient
    bit for bit: two releases with the same noise on different gradients reveal their
    difference exactly. CPU kernels already are reproducible; CUDA's index and scatter
    backward passes are not unless asked. ``warn_only``: an operation without a deterministic
    CUDA version warns in the SuperNode's log instead of failing the round (cuBLAS itself
    is made reproducible by ``CUBLAS_WORKSPACE_CONFIG``, set by :mod:`fedpath.client.node_device`
    before CUDA starts). The caller's setting is restored afterwards.
    """
    if device.type != "cuda":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _parameters(model: MILModel) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def slide_gradient(
    model: MILModel,
    bag: Bag,
    cfg: TrainConfig,
    generator: torch.Generator,
    precision: Precision = "float32",
) -> tuple[list[torch.Tensor], np.ndarray]:
    """One slide's (unclipped) gradient and its loss parts: its per-sample gradient.

    The slide runs alone (physical batch 1), so the ordinary gradient of its loss is exactly
    what Opacus' ``GradSampleModule`` would compute for it in a padded batch (tested) without
    its hooks, which mis-pair activations when a layer runs twice but only one call reaches
    the loss (ABMIL's classifier also reads out the instance logits).

    In ``"bfloat16"`` the forward pass runs under autocast on features cast once and, on a
    CPU, padded to a length bucket, exactly as the plain trainer batches them (masked padding
    rows get zero attention and no loss, so they add nothing to the gradient; the bucket lets
    oneDNN reuse its kernels). The loss is computed outside autocast from the model's
    float32 outputs, and the gradients, taken with respect to the float32 parameters, are
    float32: what Opacus clips and sums does not depend on the forward's precision.
    """
    params = _parameters(model)
    device = model_device(model)
    batch = to_device(collate_for([bag], precision, device), device)
    with precision_autocast(device, precision):
        out = model(batch.features, batch.mask)
    parts = mixed_supervision_loss(
        out.logits,
        out.attention,
        out.instance_logits if model.has_instance_task else None,
        batch.labels,
        batch.patch_labels,
        batch.annotation_complete,
        batch.mask,
        cfg.supervision,
        generator,
    )
    grads = torch.autograd.grad(parts.total, params, allow_unused=True)
    flat = [
        torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)
    ]
    losses = np.array(
        [
            float(parts.total.detach()),
            float(parts.bag.detach()),
            float(parts.instance.detach()),
            float(parts.attention.detach()),
        ]
    )
    return flat, losses


def clipped_slide_gradient(
    model: MILModel,
    bag: Bag,
    cfg: TrainConfig,
    generator: torch.Generator,
    max_grad_norm: float,
    precision: Precision = "float32",
) -> tuple[list[torch.Tensor], np.ndarray, float]:
    """One slide's gradient clipped as Opacus clips it; (gradient, loss parts, norm before).

    Training leaves clipping to Opacus' ``DPOptimizer``; this is the same rule
    (factor min(1, C / (norm + 1e-6))) for checks and diagnostics.
    """
    flat, losses = slide_gradient(model, bag, cfg, generator, precision)
    norm = float(torch.sqrt(sum((g.cpu().double() ** 2).sum() for g in flat)))  # MPS: no f64
    factor = min(1.0, max_grad_norm / (norm + 1e-6))
    return [g * factor for g in flat], losses, norm


def epoch_streams(cfg_seed: int, secret_seed: int, epoch: int) -> tuple[int, int, int, int]:
    """(dropout seed, instance-sampling seed) from the public seed; (Poisson, noise) secret."""
    dropout, instances = np.random.SeedSequence([cfg_seed, epoch, 7]).generate_state(2)
    poisson, noise = np.random.SeedSequence([secret_seed, epoch]).generate_state(2, np.uint64)
    return int(dropout), int(instances), int(poisson), int(noise)


def _expected_batch(mechanism: Mechanism, n_slides: int) -> int:
    """q·N, the mean of a step's Poisson batch: what the noisy sum is divided by (B, or N when
    the site has fewer than B slides and q = 1)."""
    return max(1, round(mechanism.sample_rate * n_slides))


def _private_epoch(
    model: MILModel,
    optimiser: DPOptimizer,
    bags: Sequence[Bag],
    epoch: int,
    cfg: TrainConfig,
    dp: DPConfig,
    mechanism: Mechanism,
    secret_seed: int,
    precision: Precision,
) -> tuple[np.ndarray, int]:
    """One epoch of noisy steps; mean loss parts over the slides used, and the step count.

    Opacus does the privacy-critical part: its ``UniformWithReplacementSampler`` draws each
    step's slides (Poisson), and its ``DPOptimizer`` clips every slide's gradient to C, adds
    Gaussian noise of std σ·C from the secret generator, divides by the expected batch and
    hands the result to Adam. What fedpath adds is the per-sample gradient itself: one slide
    per backward pass (see :func:`slide_gradient`), stacked as Opacus' ``grad_sample``.
    """
    dropout_seed, instance_seed, poisson_seed, noise_seed = epoch_streams(
        cfg.seed, secret_seed, epoch
    )
    torch.manual_seed(dropout_seed)  # dropout; the caller forked the global RNG
    instances = torch.Generator().manual_seed(instance_seed)
    patches = patch_sampler(cfg.seed, epoch)
    n = len(bags)
    steps = sampling_plan(n, dp.expected_batch_slides)[1]
    sampler = UniformWithReplacementSampler(
        num_samples=n,
        sample_rate=mechanism.sample_rate,
        generator=torch.Generator().manual_seed(poisson_seed % (2**63)),
        steps=steps,
    )
    optimiser.generator = torch.Generator(device=model_device(model)).manual_seed(
        noise_seed % (2**63)
    )
    params = _parameters(model)
    lr = step_lr(cfg, _expected_batch(mechanism, n))
    sums = np.zeros(4, dtype=np.float64)
    used = 0
    model.train()
    for chosen in sampler:
        per_slide: list[list[torch.Tensor]] = [[] for _ in params]
        for i in chosen:
            bag = sample_patches(bags[int(i)], cfg.max_train_patches, patches)
            grads, losses = slide_gradient(model, bag, cfg, instances, precision)
            for column, g in zip(per_slide, grads, strict=True):
                column.append(g)
            sums += losses
            used += 1
        for p, column in zip(params, per_slide, strict=True):
            p.grad_sample = (
                torch.stack(column)
                if column
                else torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            )
        for group in optimiser.param_groups:
            group["lr"] = lr
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    return (sums / used if used else np.full(4, math.nan)), steps


def train_private(
    model: MILModel,
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    cfg: TrainConfig,
    dp: DPConfig,
    *,
    secret_seed: int | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    start_epoch: int = 0,
) -> PrivateTrainResult:
    """Train ``model`` in place with DP-SGD (Adam on the noisy gradient) for ``cfg.epochs``.

    The mechanism is :func:`plan_private_training` for ``len(train_bags)`` slides; the result
    says how many of its steps ran. Validation, best-epoch restore and early stopping are the
    plain trainer's (the validation slides are not training slides: the guarantee covers the
    training split, the validation numbers are released as aggregate metrics). Without
    ``secret_seed`` the sampling and noise come from the OS's entropy, so a run cannot be
    repeated; a federated site passes its ledger's secret so that a retried round releases
    exactly the same update and costs nothing more.

    ``cfg.precision`` is resolved once (:func:`~fedpath.client.training.trainer.resolve_precision`)
    for the forward passes of training and validation, as in the plain trainer; the result
    records it. Clipping and noise are float32 in every precision (module docstring).
    """
    if not train_bags:
        raise ValueError("no training bags")
    if start_epoch < 0:
        raise ValueError(f"start_epoch must be >= 0; got {start_epoch}")
    check_private_model(model)
    planned = plan_private_training(dp, len(train_bags), cfg.epochs)
    seed = secrets.randbits(64) if secret_seed is None else int(secret_seed)
    device = model_device(model)
    precision = resolve_precision(cfg.precision, device, private=True)
    optimiser = DPOptimizer(
        torch.optim.Adam(_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay),
        noise_multiplier=planned.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=_expected_batch(planned, len(train_bags)),
        loss_reduction="mean",
    )
    # One slide per pass (max_batch_patches plays no part): its sampled patches bound memory.
    hint = f"lower max_train_patches ({cfg.max_train_patches or 'every patch'})"
    memory = out_of_memory_as_error(device, "training with DP-SGD", hint)
    with memory, deterministic_on(device), private_torch_rng(device):

        def one_epoch(epoch: int) -> tuple[Sequence[float], int]:
            means, n_steps = _private_epoch(
                model, optimiser, train_bags, epoch, cfg, dp, planned, seed, precision
            )
            return tuple(float(m) for m in means), n_steps

        result = run_epochs(
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
    steps_done = sum(h.n_steps for h in result.history)
    spent = Mechanism(planned.noise_multiplier, planned.sample_rate, steps_done)
    return PrivateTrainResult(result=result, mechanism=spent, max_grad_norm=dp.max_grad_norm)
