"""The device setting: spelling checked in configs, presence checked on this machine."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ValidationError

from fedpath.common.device import describe_device, resolve_device
from fedpath.common.device_name import DeviceName
from fedpath.common.errors import DeviceError


class _Cfg(BaseModel):
    device: DeviceName = "auto"


def test_auto_resolves_to_cpu_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("fedpath.common.device._mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert describe_device(resolve_device("cpu")) == "cpu"


def test_auto_prefers_cuda_when_torch_sees_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("AUTO") == torch.device("cuda", 0)


def test_missing_cuda_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
        resolve_device("cuda:1")


def test_cuda_index_beyond_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match="sees 2 CUDA GPU"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_missing_mps_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedpath.common.device._mps_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS"):
        resolve_device("mps")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "tpu", ""])
def test_bad_spelling_refused_by_config_and_resolver(bad: str) -> None:
    with pytest.raises(ValidationError, match="device must be"):
        _Cfg(device=bad)
    with pytest.raises(DeviceError, match="device must be"):
        resolve_device(bad)


def test_config_normalises_spelling() -> None:
    assert _Cfg(device=" CUDA:0 ").device == "cuda:0"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_real_cuda_resolves() -> None:
    device = resolve_device("cuda")
    assert device.type == "cuda"
    assert "cuda:" in describe_device(device)
