"""TEST DOUBLE of Cambricon's ``torch_mlu``, backed by the CPU. Never installed by the product, never shipped.

It lives under ``runtime/tests/doubles`` (outside ``src/``, so not in the wheel) beside a dist-info that gives
it the version ``0.0.0+testdouble``, and is importable only where a test puts that folder on ``sys.path``
(``PYTHONPATH`` of a subprocess, so nothing leaks into the pytest process). Importing it does what importing the
real ``torch_mlu`` does for cla2 and the libraries it uses:

- ``torch.mlu`` (and ``sys.modules["torch.mlu"]``) is ``torch_mlu.mlu``, with the real package's signatures
  (tests/test_torch_mlu_conformance.py holds them to fixtures/torch_mlu_api.json): is_available, device_count,
  mem_get_info, get_device_name, get_device_properties, set_device, current_device, synchronize,
  is_bf16_supported, memory_allocated and friends, seeds, RNG state, amp.GradScaler;
- ``cncl`` is a torch.distributed backend, carried by gloo, so ``init_process_group(backend="cncl")`` works
  across real processes.

What it cannot do is hold tensors on an "mlu" device: torch has no "mlu" kernels without the real extension.
So ``torch.mlu.tensor_device(index)`` says where the double's tensors live (the CPU), and cla2's
``Device.torch_device`` asks for it; the real ``torch_mlu`` has no such function. The double does not rename
torch's PrivateUse1 backend to "mlu" as the real one does: ``torch.device("mlu")`` then would parse, but torch
itself (``torch._C._get_accelerator()`` in ``dist.barrier``, for one) would take the renamed backend for the
accelerator and fail. So code that names "mlu" on its own fails with torch's "Expected one of cpu, cuda, ...
device string: mlu", which is how the tests see a library going around cla2.device.

DeepSpeed picks its MLU accelerator whenever ``torch_mlu`` imports, and that one puts tensors on "mlu": the
double sets ``DS_ACCELERATOR=cpu`` unless already set. Where that CPU accelerator and DeepSpeed's MLU accelerator
differ, the double makes the CPU one answer as the MLU one would about the simulated device: its dtypes.
DeepSpeed's CPU accelerator asks the host CPU whether it has fp16 units (``torch.ops.mkldnn.
_is_mkldnn_fp16_supported()``: true on some Intel CPUs, false on others and on AMD), and says bf16 always;
its MLU accelerator says fp16 always (every MLU has it) and bf16 as ``torch.mlu.is_bf16_supported()``. So the
double's DeepSpeed checks (``_do_sanity_check``: "Type fp16 is not supported on your device") and picks
follow CLA2_FAKE_MLU_BF16, never the CPU model. It patches ``deepspeed.accelerator.cpu_accelerator.
CPU_Accelerator`` (is_fp16_supported, is_bf16_supported, supported_dtypes) when DeepSpeed imports it, or at
once when it already is; nothing imports DeepSpeed for it.

The simulated host comes from the environment, read at import:

CLA2_FAKE_MLU_COUNT    number of physical devices (default: the length of CLA2_FAKE_MLU_MEMORY when it is a
                       list, else 16, an 8-card MLU370-X8 server); 0: none (is_available() is False).
CLA2_FAKE_MLU_MEMORY   total memory per device: one size for all ("24GiB") or a comma list, one per physical
                       device ("24GiB,24GiB,16GiB"); units B, KiB, MiB, GiB, TiB (K, M, G, T mean the same),
                       KB, MB, GB, TB (powers of 1000), or plain bytes. Default 24GiB.
CLA2_FAKE_MLU_FREE     free memory per device, same syntax (default: the total).
CLA2_FAKE_MLU_BF16     1 or 0: what is_bf16_supported() answers (default 1), and so the compute capability major
                       that get_device_properties() / get_device_capability() report: 5 or 3, since the real
                       is_bf16_supported() is ``major >= 5`` (an MLU370 reports 3: the real package says no bf16
                       there; see docs/torch_mlu_double.md).
CLA2_FAKE_MLU_NAME     the model in get_device_name() (default "MLU370-X8"; the name adds "(test double,
                       physical N)").
MLU_VISIBLE_DEVICES    as the real driver reads it: a comma list of physical indices selects those devices and
                       renumbers them 0..n-1 in the order given; the list ends at the first entry that is not a
                       valid, unused index (as CUDA_VISIBLE_DEVICES does); an empty value hides every device.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

import torch
import torch.distributed as dist

from torch_mlu import mlu

__version__ = "0.0.0+testdouble"
IS_TEST_DOUBLE = True


def _register_cncl() -> None:
    """``cncl`` as a distributed backend, carried by gloo on the CPU."""
    if not dist.is_available() or "cncl" in dist.Backend.backend_list:
        return

    def make_gloo(store, rank, world_size, timeout):
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)

    try:
        dist.Backend.register_backend("cncl", make_gloo, devices=["cpu"])
    except TypeError:  # torch < 2.1: no devices argument
        dist.Backend.register_backend("cncl", make_gloo)


def _module_mlu(self, device=None):
    """``nn.Module.mlu()``, which the real torch_mlu adds as torch adds ``.cuda()`` (accelerate's dispatch_model
    wraps it when an MLU is there): moves the module to where the double's tensors live."""
    return self.to(mlu.tensor_device(device if isinstance(device, int) else None))


_DS_CPU_ACCELERATOR = "deepspeed.accelerator.cpu_accelerator"


def _mlu_dtypes(cpu_accelerator_module) -> None:
    """DeepSpeed's CPU accelerator answers about dtypes as its MLU accelerator (deepspeed/accelerator/
    mlu_accelerator.py) answers about the simulated MLU: fp16 yes, bf16 as the double's device says. Where the
    double's tensors really are, on the CPU, torch computes in both dtypes on every x86-64 CPU."""
    cls = cpu_accelerator_module.CPU_Accelerator

    def is_fp16_supported(self) -> bool:
        return True

    def is_bf16_supported(self) -> bool:
        return mlu.is_bf16_supported()

    def supported_dtypes(self) -> list:
        return [torch.float, torch.half] + ([torch.bfloat16] if mlu.is_bf16_supported() else [])

    cls.is_fp16_supported, cls.is_bf16_supported, cls.supported_dtypes = (
        is_fp16_supported, is_bf16_supported, supported_dtypes)
    cls.IS_TEST_DOUBLE_DTYPES = True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs ``_mlu_dtypes`` on DeepSpeed's CPU accelerator module once the module has been executed."""

    def find_spec(self, name, path, target=None):
        if name != _DS_CPU_ACCELERATOR:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module

                def exec_module(module, run=run):
                    run(module)
                    _mlu_dtypes(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


def _patch_deepspeed_dtypes() -> None:
    if _DS_CPU_ACCELERATOR in sys.modules:
        _mlu_dtypes(sys.modules[_DS_CPU_ACCELERATOR])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


if getattr(torch, "mlu", None) is not mlu:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.mlu = mlu
    sys.modules["torch.mlu"] = mlu
    torch.nn.Module.mlu = _module_mlu
    _register_cncl()
    _patch_deepspeed_dtypes()
