"""cla2.device in this process: the choice, the errors, and the one seam a test double uses.

The MLU branch runs for real in test_mlu_double.py, in subprocesses that import the torch_mlu test double.
"""

from __future__ import annotations

import sys

import pytest
import torch

from cla2 import device


def test_mlu_asked_for_without_torch_mlu_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_mlu", None)  # import torch_mlu raises ImportError
    assert not device._mlu_available()
    with pytest.raises(device.DeviceError, match=r"--device mlu asked for, but torch_mlu is not importable"):
        device.pick("mlu")


def test_unknown_kind_is_refused():
    with pytest.raises(device.DeviceError, match=r"unknown device 'npu': choose one of mlu, cuda, cpu or auto"):
        device.pick("npu")


def test_cpu_device():
    dev = device.pick("cpu")
    assert (dev.kind, dev.backend, dev.visible_devices_env, dev.count) == ("cpu", "gloo", None, 1)
    assert dev.torch_device() == dev.torch_device(3) == torch.device("cpu")
    assert device.parse_dtype("auto", dev) == torch.float32
    with pytest.raises(device.DeviceError, match=r"dtype fp16 is not supported on cpu: use one of fp32, bf16"):
        device.parse_dtype("fp16", dev)


def test_accelerator_tensors_go_to_kind_and_index_unless_the_module_declares_a_device(monkeypatch):
    """The seam: torch.device(kind, index) (LOCAL_RANK by default), unless the device module declares where its
    tensors live, as the torch_mlu test double does."""
    dev = device.Device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert dev.torch_device(2) == torch.device("cuda", 2)
    assert dev.torch_device() == torch.device("cuda", 5)
    asked = []
    monkeypatch.setattr(torch.cuda, "tensor_device", lambda i: asked.append(i) or torch.device("meta"), raising=False)
    assert dev.torch_device(2) == torch.device("meta")
    assert dev.torch_device() == torch.device("meta")
    assert asked == [2, 5]
