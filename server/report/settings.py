"""Which recorded settings a run used, and which it did not (with the reason).

config.json holds every key with its default, but some could not have changed the run (FedMix
λ/β in a FedAvg run, DP settings with DP off, the trainer's early stopping, which a federated
round never does): the page lists those apart, with the reason, not among the settings in
effect. Pure data from the run's own values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedpath.server.report.cells import Table, key_values, setting_text
from fedpath.server.report.paths import PathScrub, shown_path

NO_EARLY_STOPPING = (
    "a federated round trains local-epochs with no validation inside the round, so there is "
    "no early stopping and no best-epoch choice: the server's round count decides"
)
DP_SGD_SAMPLING = (
    "slide-level DP-SGD draws each step's slides by Poisson sampling, one slide per forward "
    "pass, and clips each slide's gradient to dp-max-grad-norm"
)


@dataclass(frozen=True)
class Settings:
    """The settings in effect as (key, value) pairs, and those that did not apply as a table
    of setting, value and reason (None when every setting applied)."""

    used: list[tuple[str, str]]
    unused: Table | None


def flatten_settings(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested settings as sorted ``a.b`` keys (an empty block stays one key)."""
    items: list[tuple[str, Any]] = []
    for key in sorted(data):
        value = data[key]
        if isinstance(value, dict) and value:
            items.extend(flatten_settings(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def settings_view(
    settings: dict[str, Any], unused: dict[str, str], scrub: PathScrub, *, flatten: bool = False
) -> Settings:
    """The settings in effect, and those the run did not use apart, with the reason."""
    items = flatten_settings(settings) if flatten else sorted(settings.items())
    used = [(k, shown_path(v, scrub)) for k, v in items if k not in unused]
    skipped = [(k, shown_path(v, scrub)) for k, v in items if k in unused]
    table = None
    if skipped:
        rows: list[list[Any]] = [[k, setting_text(v), unused[k]] for k, v in skipped]
        table = Table(["setting", "value", "why it did not apply"], rows, 99)
    return Settings(key_values(used), table)


def _number(value: Any) -> float:
    """A numeric setting as a float (0 for anything else: the off value of every DP knob)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return 0.0


def unused_run_settings(run_config: dict[str, Any]) -> dict[str, str]:
    """Run-config keys this run did not use, each with the reason (from the run's own values).

    A key only listed here was recorded (config.json holds every key with its default) but
    could not have changed the run: showing it among the settings in effect would suggest it
    did.
    """
    unused: dict[str, str] = {}
    strategy = run_config.get("strategy")
    if strategy is not None and strategy != "fedmix":
        for key in ("fedmix-lambda", "fedmix-beta"):
            unused[key] = f"λ and β weigh FedMix only; the strategy is {strategy}"
    if run_config.get("client-dp", "off") == "off":
        for key in run_config:
            if key.startswith("client-dp-"):
                unused[key] = "client-level DP is off (client-dp = off)"
    sigma = _number(run_config.get("dp-noise-multiplier"))
    target = _number(run_config.get("dp-target-epsilon"))
    if sigma == 0 and target == 0:
        for key in run_config:
            if key.startswith("dp-") and key not in ("dp-noise-multiplier", "dp-target-epsilon"):
                unused[key] = (
                    "slide-level DP-SGD is off (dp-noise-multiplier and dp-target-epsilon are 0)"
                )
    elif sigma == 0:
        unused["dp-noise-multiplier"] = "σ is solved from dp-target-epsilon"
    elif target == 0:
        unused["dp-target-epsilon"] = "σ is given by dp-noise-multiplier"
    if run_config.get("resume") == "":
        unused["resume"] = "not a resumed run"
    if run_config.get("simulation-data") == "":
        unused["simulation-data"] = "not a simulation: each SuperNode names its own data"
    return unused


def unused_train_settings(
    train_config: dict[str, Any], run_config: dict[str, Any]
) -> dict[str, str]:
    """Keys of the recorded trainer config (flattened) that a federated round does not use."""
    unused = {
        key: NO_EARLY_STOPPING
        for key in ("patience", "min_epochs", "stopping_loss")
        if key in train_config
    }
    supervision = train_config.get("supervision")
    if isinstance(supervision, dict) and supervision.get("mode") == "weak":
        for key in ("annotated_positives", "attention_weight", "oversample_weight",
                    "oversample_decay"):  # fmt: skip
            if key in supervision:
                unused[f"supervision.{key}"] = "supervision is weak: patch labels are not used"
    dp_on = _number(run_config.get("dp-noise-multiplier")) > 0 or (
        _number(run_config.get("dp-target-epsilon")) > 0
    )
    if dp_on:
        for key in ("grad_clip", "steps_per_epoch", "max_batch_patches"):
            if key in train_config:
                unused[key] = DP_SGD_SAMPLING
        if isinstance(supervision, dict):
            for key in ("pair_normal_tumour", "oversample_weight", "oversample_decay"):
                if key in supervision:
                    unused[f"supervision.{key}"] = DP_SGD_SAMPLING
    return unused
