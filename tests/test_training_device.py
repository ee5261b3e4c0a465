"""Where training and evaluation run: ``--device`` of ``local train/eval/heatmaps``, the node's
``device`` setting in a federation, and the trainers on the device they are given.

This machine has no GPU: the plumbing is tested on the CPU (the device named is the one that
ran, a GPU that is absent stops the command before anything is read or written), and the
CUDA-only tests run the same code on a real GPU where there is one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, MessageType, RecordDict

from fedpath.client import cli_node
from fedpath.client.app import app
from fedpath.client.federated import (
    evaluate_on_site,
    input_digest,
    load_global_model,
    train_on_site,
)
from fedpath.client.node_device import node_device, node_device_name
from fedpath.client.training import trainer
from fedpath.client.training.evaluate import evaluate_bags
from fedpath.client.training.private_trainer import train_private
from fedpath.client.training.trainer import train
from fedpath.common.dp_config import DPConfig
from fedpath.common.errors import ConfigError, DeviceError
from fedpath.common.federation import RoundInstructions
from fedpath.deploy.cli import main
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site
from tests.round_messages import round_message
from tests.test_cli_local import _make_site
from tests.test_worker import runtime_dir  # noqa: F401 - a fixture
from tests.trainer_data import TRAIN, VAL, toy_model, train_cfg

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"
)
SPEC = SyntheticSiteSpec(n_slides=10, feature_dim=16, patches=(10, 30))


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as torch sees it when it has no GPU, even on a machine that has one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("fedpath.common.device._mps_available", lambda: False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_site(tmp_path_factory.mktemp("site") / "a", SPEC, seed=0)


def _train_argv(data: Path, run: Path, *more: str) -> list[str]:
    argv = ["local", "train", "--data", str(data), "--out", str(run), "--epochs", "2"]
    return [*argv, "--config", str(data / "train.toml"), *more]


# --- local train / eval / heatmaps -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_local_train_and_eval_say_which_device_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_gpu: None, device: str
) -> None:
    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)
    assert main(_train_argv(data, run, "--device", device)) == 0
    out = capsys.readouterr().out
    assert "supervision; device cpu" in out  # auto without a GPU is the CPU, and says so
    assert "trained on cpu in float32" in out or "trained on cpu in bfloat16" in out
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert config["device"] == "cpu" and config["precision"] in ("float32", "bfloat16")

    argv = ["local", "eval", "--data", str(data), "--run", str(run), "--device", device]
    assert main(argv) == 0
    assert "scored on cpu (float32)" in capsys.readouterr().out
    assert json.loads((run / "eval_test.json").read_text(encoding="utf-8"))["device"] == "cpu"


def test_device_at_the_top_of_the_train_toml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)
    toml = data / "train.toml"
    toml.write_text('device = "CPU"\n' + toml.read_text(encoding="utf-8"), encoding="utf-8")
    assert main(_train_argv(data, run)) == 0
    assert json.loads((run / "config.json").read_text())["config"]["device"] == "cpu"
    capsys.readouterr()
    toml.write_text('device = "gpu"\n', encoding="utf-8")
    assert main(_train_argv(data, tmp_path / "run2")) == 2
    out = capsys.readouterr().out
    assert "train.toml: device: Value error, device must be auto | cpu | cuda" in out
    assert not (tmp_path / "run2").exists()


def test_an_absent_gpu_stops_train_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_gpu: None
) -> None:
    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)
    assert main(_train_argv(data, run, "--device", "cuda")) == 2
    out = capsys.readouterr().out
    assert "error: device 'cuda' asked for, but torch sees no CUDA GPU here" in out
    assert "use --device cpu or auto" in out
    assert not run.exists()  # nothing trained, no run directory


def test_an_absent_gpu_stops_eval_and_heatmaps_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)
    assert main(_train_argv(data, run, "--device", "cpu")) == 0
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["local", "eval", "--data", str(data), "--run", str(run), "--device", "cuda:1"]
    assert main(argv) == 2
    assert "device 'cuda:1' asked for, but torch sees no CUDA GPU" in capsys.readouterr().out
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide_id,path,label\n", encoding="utf-8")
    argv = ["local", "heatmaps", "--data", str(data), "--run", str(run)]
    assert main([*argv, "--manifest", str(manifest), "--device", "cuda"]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == before  # no predictions, no heatmaps


# --- the trainers on the device they are given ---------------------------------------------


def _spy_adam(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The devices of Adam's moment estimates after every step."""
    devices: set[str] = set()
    real = torch.optim.Adam.step

    def step(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        out = real(self, *args, **kwargs)
        devices.update(str(state["exp_avg"].device) for state in self.state.values())
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return devices


def test_training_follows_the_models_device_and_records_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[torch.device] = []
    model = toy_model()
    optimiser = _spy_adam(monkeypatch)

    def on_epoch(_: Any) -> None:
        seen.append(next(model.parameters()).device)

    result = train(model, TRAIN[:6], VAL[:4], train_cfg(epochs=1), on_epoch=on_epoch)
    assert seen == [torch.device("cpu")] and result.device == "cpu"
    assert optimiser == {"cpu"}


def test_float16_trains_with_a_grad_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 (what ``auto`` picks on a GPU without native bfloat16) backpropagates a scaled
    loss and unscales before the step; run here under CPU autocast, the same code path."""
    scaled: list[float] = []

    class Spy(torch.amp.GradScaler):
        def scale(self, outputs: Any) -> Any:  # type: ignore[override]
            scaled.append(float(self.get_scale()))
            return super().scale(outputs)

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    monkeypatch.setattr(trainer, "resolve_precision", lambda *a, **k: "float16")
    cfg = train_cfg(epochs=2, steps_per_epoch=3)
    result = train(toy_model(dropout=0.0), TRAIN[:8], VAL[:2], cfg)
    assert result.precision == "float16"
    assert scaled and all(s > 1.0 for s in scaled)  # the loss was scaled, not raw float16
    assert all(math.isfinite(m.train_loss) for m in result.history)
    monkeypatch.undo()
    float32 = cfg.model_copy(update={"precision": "float32"})
    plain = train(toy_model(dropout=0.0), TRAIN[:8], VAL[:2], float32)
    # Unscaled before Adam: the same steps as float32, up to float16 rounding.
    for a, b in zip(result.history, plain.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, abs=2e-2)


def _spy_noise(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, set[str], bool]]:
    """Record, at every noisy step, the noise generator's device, the grad_samples' ones and
    whether torch's deterministic algorithms are on."""
    from opacus.optimizers import DPOptimizer

    seen: list[tuple[str, set[str], bool]] = []
    real = DPOptimizer.add_noise

    def add_noise(self: DPOptimizer) -> None:
        devices = {str(p.grad_sample.device) for p in self.params}
        deterministic = torch.are_deterministic_algorithms_enabled()
        seen.append((str(self.generator.device), devices, deterministic))
        real(self)

    monkeypatch.setattr(DPOptimizer, "add_noise", add_noise)
    return seen


def _dp_run(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[Any]]:
    seen = _spy_noise(monkeypatch)
    dp = DPConfig(enabled=True, noise_multiplier=1.0, expected_batch_slides=4)
    model = toy_model(dropout=0.0).to(device)
    result = train_private(model, TRAIN[:12], [], train_cfg(epochs=2), dp, secret_seed=7)
    return result, seen


def test_dp_noise_and_per_slide_gradients_are_on_the_models_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    private, seen = _dp_run(torch.device("cpu"), monkeypatch)
    assert seen and all(gen == "cpu" and grads == {"cpu"} for gen, grads, _ in seen)
    assert not any(det for *_, det in seen)  # CPU kernels are reproducible as they are
    assert private.result.device == "cpu"
    assert private.mechanism.steps == len(seen)  # one noisy step per planned step


# --- the node's device in a federation -----------------------------------------------------


def test_node_device_setting_is_the_nodes_and_checked() -> None:
    assert node_device_name({}) == "auto"
    assert node_device_name({"device": " CUDA:1 "}) == "cuda:1"
    assert node_device({"device": "cpu"}) == torch.device("cpu")
    for bad in ("gpu", 1, True):
        with pytest.raises(ConfigError, match=r"node config device must be auto \| cpu"):
            node_device_name({"device": bad})


def _node_context(site: Path, **node: object) -> Context:
    config = {"data-path": str(site), "site": "site_a", **node}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


@pytest.mark.usefixtures("flower_task")
def test_clientapp_trains_on_the_nodes_device_and_logs_it(
    site: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedpath.client.federated as federated

    devices: list[torch.device | None] = []
    real = federated.train_on_site

    def spy(*args: Any, **kwargs: Any) -> Any:
        devices.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(federated, "train_on_site", spy)
    reply = app(
        round_message(MessageType.TRAIN, SPEC.feature_dim), _node_context(site, device="cpu")
    )
    assert not reply.has_error(), reply.error
    assert devices == [torch.device("cpu")]
    arrays = reply.content.array_records["arrays"]
    assert all(isinstance(v.numpy(), np.ndarray) for v in arrays.values())
    err = capsys.readouterr().err
    assert "fedpath: site_a: train round 1 on cpu in float" in err and " slides, " in err
    assert "device" not in dict(reply.content.metric_records["metrics"])  # stays at the site

    reply = app(round_message(MessageType.EVALUATE, SPEC.feature_dim), _node_context(site))
    assert not reply.has_error(), reply.error
    assert "fedpath: site_a: evaluate (val) round 1 on " in capsys.readouterr().err


@pytest.mark.usefixtures("flower_task")
def test_a_node_asking_for_an_absent_gpu_replies_an_error_and_trains_nothing(
    site: Path, no_gpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedpath.client.federated as federated

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("trained although the node's device is absent")

    monkeypatch.setattr(federated, "train_on_site", never)
    monkeypatch.setattr(federated, "evaluate_on_site", never)
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = app(round_message(kind, SPEC.feature_dim), _node_context(site, device="cuda"))
        assert reply.has_error()
        assert "site_a: device 'cuda' asked for, but torch sees no CUDA GPU" in reply.error.reason


@pytest.mark.usefixtures("flower_task")
def test_the_run_config_cannot_choose_the_device(site: Path) -> None:
    """The round instructions are the server's: a device key in them is refused, the
    node's own setting is the only one."""
    message = round_message(MessageType.TRAIN, SPEC.feature_dim)
    raw = json.loads(message.content.config_records["config"]["instructions"])
    with pytest.raises(Exception, match="device"):
        RoundInstructions.from_json(json.dumps({**raw, "device": "cuda"}))
    with pytest.raises(Exception, match="device"):
        RoundInstructions.from_json(json.dumps({**raw, "train": {**raw["train"], "device": "x"}}))


@pytest.mark.usefixtures("flower_task")
def test_a_dp_round_on_another_device_is_another_release() -> None:
    """The same secret seed draws other noise on another device: the ledger must count a
    retry there as a new round, while CPU digests stay what they were."""
    message = round_message(MessageType.TRAIN, SPEC.feature_dim)
    instructions = RoundInstructions.from_json(
        message.content.config_records["config"]["instructions"]
    )
    state = {k: v.numpy() for k, v in message.content.array_records["arrays"].items()}
    cpu = input_digest(instructions, state)
    assert input_digest(instructions, state, device="cpu") == cpu
    gpu = input_digest(instructions, state, device="cuda:0 (NVIDIA A100-SXM4-40GB)")
    assert gpu != cpu
    assert gpu != input_digest(instructions, state, device="cuda:0 (Tesla T4)")


def test_node_command_writes_and_checks_the_device(tmp_path: Path, no_gpu: None) -> None:
    import argparse

    data = write_synthetic_site(tmp_path / "site_a", SyntheticSiteSpec(n_slides=4), seed=0)
    args = dict(superlink="l:9092", data=data, key=None, ca=None, site=None, port=9094)
    argv = cli_node.supernode_argv(argparse.Namespace(**args, insecure=True, device="CPU"))
    assert argv[argv.index("--node-config") + 1].endswith('device="cpu"')
    with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
        cli_node.supernode_argv(argparse.Namespace(**args, insecure=True, device="cuda:0"))
    with pytest.raises(ConfigError, match="device must be"):
        cli_node.supernode_argv(argparse.Namespace(**args, insecure=True, device="gpu"))
    assert cli_node.device_label("CPU") == "the CPU"
    assert cli_node.device_label("auto").startswith("auto (a GPU when torch sees one")


def test_node_command_says_where_it_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_gpu: None
) -> None:
    data = write_synthetic_site(tmp_path / "site_a", SyntheticSiteSpec(n_slides=4), seed=0)
    argv = ["node", "--superlink", "l:9092", "--data", str(data), "--insecure", "--print-only"]
    assert main([*argv, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "training and evaluation on the CPU" in out and 'device="cpu"' in out
    assert main([*argv, "--device", "cuda"]) == 2
    assert "error: device 'cuda' asked for, but torch sees no CUDA GPU" in capsys.readouterr().out


# --- on a real GPU ---------------------------------------------------------------------------


@pytest.fixture
def cuda() -> Iterator[torch.device]:
    yield torch.device("cuda", 0)
    torch.cuda.empty_cache()


@CUDA
def test_cuda_training_runs_on_the_gpu_in_its_native_low_precision(
    cuda: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    optimiser = _spy_adam(monkeypatch)
    model = toy_model().to(cuda)
    result = train(
        model,
        TRAIN,
        VAL,
        train_cfg(epochs=3),
        on_epoch=lambda _: seen.append(next(model.parameters()).device.type),
    )
    assert seen == ["cuda"] * 3 and result.device.startswith("cuda:0 (")
    assert optimiser == {"cuda:0"}
    assert result.precision in ("bfloat16", "float16")
    assert all(math.isfinite(m.train_loss) and math.isfinite(m.val_loss) for m in result.history)
    assert result.history[-1].train_loss < result.history[0].train_loss + 0.5


@CUDA
def test_cuda_dp_sgd_keeps_noise_and_gradients_on_the_gpu_and_the_accounting(
    cuda: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, seen = _dp_run(cuda, monkeypatch)
    assert seen and all(gen.startswith("cuda") and grads == {"cuda:0"} for gen, grads, _ in seen)
    assert all(det for *_, det in seen)  # a retried round computes the same gradient
    assert not torch.are_deterministic_algorithms_enabled()  # restored
    assert private.result.precision in ("bfloat16", "float32")  # never float16 under DP
    monkeypatch.undo()
    on_cpu, _ = _dp_run(torch.device("cpu"), monkeypatch)
    assert private.mechanism == on_cpu.mechanism  # σ, q and steps do not depend on the device
    state = private.result.model.state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in state.values())


@CUDA
def test_cuda_evaluation_matches_the_cpu(cuda: torch.device) -> None:
    model = toy_model(dropout=0.0).eval()
    on_cpu = evaluate_bags(model, VAL, bootstrap=0)
    on_gpu = evaluate_bags(model.to(cuda), VAL, bootstrap=0)
    for a, b in zip(on_cpu.predictions, on_gpu.predictions, strict=True):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-4)


@CUDA
@pytest.mark.usefixtures("flower_task")
def test_cuda_site_round_sends_cpu_arrays(cuda: torch.device, site: Path) -> None:
    message = round_message(MessageType.TRAIN, SPEC.feature_dim)
    instructions = RoundInstructions.from_json(
        message.content.config_records["config"]["instructions"]
    )
    state = {k: v.numpy() for k, v in message.content.array_records["arrays"].items()}
    weights, metrics = train_on_site(site, instructions, state, device=cuda)
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    assert math.isfinite(metrics["train-loss"])
    assert next(load_global_model(instructions, state, cuda).parameters()).is_cuda
    scores = evaluate_on_site(site, instructions, state, device=cuda)
    assert scores["num-examples"] > 0


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("flower_task", "runtime_dir")
def test_the_resident_worker_trains_on_the_nodes_device(
    site: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The node's device reaches the handlers in the resident worker (a process of its own,
    started by the first message), which logs where it trained; an absent GPU is an error
    reply from there too."""
    worker = {"resident-worker": True}
    message = round_message(MessageType.TRAIN, SPEC.feature_dim)
    reply = app(message, _node_context(site, device="cpu", **worker))
    assert not reply.has_error(), reply.error
    assert "fedpath: site_a: train round 1 on cpu in float" in capfd.readouterr().err
    if torch.cuda.is_available():
        return  # the worker sees this machine's real GPU: nothing absent to refuse
    message = round_message(MessageType.TRAIN, SPEC.feature_dim)
    reply = app(message, _node_context(site, device="cuda:0", **worker))
    assert reply.has_error()
    assert "site_a: device 'cuda:0' asked for, but torch sees no CUDA GPU" in reply.error.reason


# --- a device that runs out of memory ------------------------------------------------------

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"


def _out_of_memory(*args: Any, **kwargs: Any) -> Any:
    raise torch.OutOfMemoryError(OOM)


@pytest.mark.slow
def test_out_of_memory_in_local_train_and_eval_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU too small for a batch ends the command with what to change, not a traceback;
    no model is written."""
    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_train_epoch", _out_of_memory)
        assert main(_train_argv(data, run, "--device", "cpu")) == 2
    out = capsys.readouterr().out
    assert f"error: cpu ran out of memory while training ({OOM}); lower max_batch_patches" in out
    assert "or free memory on this machine (other jobs)" in out
    assert "model.pt was not written" in out
    assert not (run / "model.pt").exists()

    assert main(_train_argv(data, run, "--device", "cpu")) == 0
    capsys.readouterr()
    import fedpath.client.training.evaluate as evaluate

    monkeypatch.setattr(evaluate, "predict_bag", _out_of_memory)
    assert main(["local", "eval", "--data", str(data), "--run", str(run)]) == 2
    out = capsys.readouterr().out
    assert "ran out of memory while scoring a slide" in out
    assert not (run / "eval_test.json").exists()


@pytest.mark.usefixtures("flower_task")
def test_out_of_memory_in_a_round_is_an_error_reply(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a ClientApp crash: the coordinator reads why the site failed the round."""
    monkeypatch.setattr(trainer, "_train_epoch", _out_of_memory)
    reply = app(round_message(MessageType.TRAIN, SPEC.feature_dim), _node_context(site))
    assert reply.has_error()
    assert "ran out of memory while training" in reply.error.reason


def test_out_of_memory_drawing_a_heatmap_names_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded as that slide's reason (the other heatmaps are still drawn)."""
    from fedpath.client.training.heatmaps import slide_maps

    model = toy_model()
    monkeypatch.setattr(type(model), "forward", _out_of_memory)
    with pytest.raises(DeviceError, match=r"^cpu ran out of memory while scoring the slide"):
        slide_maps(model, VAL[0])


@CUDA
def test_cuda_per_slide_gradient_is_the_cpus(cuda: torch.device) -> None:
    """DP-SGD's per-sample gradient (one slide per backward pass; equal to Opacus' hooks on
    the CPU, tests/test_private_trainer.py) is the same gradient when computed on the GPU."""
    from fedpath.client.training.private_trainer import clipped_slide_gradient

    cfg = train_cfg()
    model = toy_model(dropout=0.0).train()
    on_gpu = toy_model(dropout=0.0).train().to(cuda)
    on_gpu.load_state_dict(model.state_dict())
    for bag in TRAIN[:4]:
        here, _, norm_here = clipped_slide_gradient(
            model, bag, cfg, torch.Generator().manual_seed(0), 1e9
        )
        there, _, norm_there = clipped_slide_gradient(
            on_gpu, bag, cfg, torch.Generator().manual_seed(0), 1e9
        )
        assert all(g.is_cuda for g in there)
        for a, b in zip(here, there, strict=True):
            assert torch.allclose(a, b.cpu(), atol=1e-4)
        assert norm_there == pytest.approx(norm_here, rel=1e-3)


def test_dp_on_a_gpu_runs_deterministic_algorithms_and_restores_the_setting() -> None:
    """A retried DP round reuses its noise seed: on CUDA its gradient must not vary with the
    order of atomic additions. The switch needs no GPU to be checked."""
    from fedpath.client.training.private_trainer import deterministic_on

    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_on(torch.device("cpu")):
        assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_on(torch.device("cuda", 0)):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_cuda_node_makes_cublas_reproducible_unless_the_hospital_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedpath.common.device

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    node_device({"device": "cpu"})
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setattr(
        fedpath.common.device, "resolve_device", lambda name: torch.device("cuda", 0)
    )
    assert node_device({"device": "cuda"}) == torch.device("cuda", 0)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    node_device({"device": "cuda"})
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_out_of_memory_on_a_gpu_points_to_the_cpu() -> None:
    """The way out depends on the device: a GPU's memory can be freed or the CPU used."""
    from fedpath.client.training.trainer import out_of_memory_as_error

    with (
        pytest.raises(DeviceError, match=r"^mps ran out of memory while training \(x\); lower"),
        out_of_memory_as_error(torch.device("mps"), "training", "lower max_batch_patches (8)"),
    ):
        raise torch.OutOfMemoryError("x")
    with pytest.raises(DeviceError) as caught, out_of_memory_as_error(torch.device("mps"), "x"):
        raise torch.OutOfMemoryError("y")
    assert str(caught.value).endswith(
        "; free the device's memory (other jobs) or use the CPU (device cpu)"
    )


def test_out_of_memory_in_dp_training_names_the_setting_that_bounds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DP-SGD runs one slide per pass: only the patches sampled per slide bound its memory."""
    import fedpath.client.training.private_trainer as private_trainer

    monkeypatch.setattr(private_trainer, "_private_epoch", _out_of_memory)
    dp = DPConfig(enabled=True, noise_multiplier=1.0, expected_batch_slides=4)
    with pytest.raises(DeviceError) as caught:
        train_private(toy_model(dropout=0.0), TRAIN[:8], [], train_cfg(epochs=1), dp, secret_seed=1)
    message = str(caught.value)
    assert message.startswith("cpu ran out of memory while training with DP-SGD (CUDA out")
    assert "lower max_train_patches (2048), or free memory" in message
    assert "max_batch_patches" not in message
