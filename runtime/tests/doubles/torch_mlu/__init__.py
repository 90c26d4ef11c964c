"""TEST DOUBLE of Cambricon's ``torch_mlu``, backed by the CPU. Never installed by the product, never shipped.

It lives under ``runtime/tests/doubles`` (outside ``src/``, so not in the wheel) beside a dist-info that gives
it the version ``0.0.0+testdouble``, and is importable only where a test puts that folder on ``sys.path``
(``PYTHONPATH`` of a subprocess, so nothing leaks into the pytest process). Importing it does what importing the
real ``torch_mlu`` does for cla2 and the libraries it uses:

- ``torch.mlu`` (and ``sys.modules["torch.mlu"]``) is ``torch_mlu.mlu``: is_available, device_count,
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
double sets ``DS_ACCELERATOR=cpu`` unless already set.

The simulated host comes from the environment, read at import:

CLA2_FAKE_MLU_COUNT    number of physical devices (default: the length of CLA2_FAKE_MLU_MEMORY when it is a
                       list, else 16, an 8-card MLU370-X8 server); 0: none (is_available() is False).
CLA2_FAKE_MLU_MEMORY   total memory per device: one size for all ("24GiB") or a comma list, one per physical
                       device ("24GiB,24GiB,16GiB"); units B, KiB, MiB, GiB, TiB (K, M, G, T mean the same),
                       KB, MB, GB, TB (powers of 1000), or plain bytes. Default 24GiB.
CLA2_FAKE_MLU_FREE     free memory per device, same syntax (default: the total).
CLA2_FAKE_MLU_BF16     1 or 0: what is_bf16_supported() answers (default 1).
CLA2_FAKE_MLU_NAME     the model in get_device_name() (default "MLU370-X8"; the name adds "(test double,
                       physical N)").
MLU_VISIBLE_DEVICES    as the real driver reads it: a comma list of physical indices selects those devices and
                       renumbers them 0..n-1 in the order given; the list ends at the first entry that is not a
                       valid, unused index (as CUDA_VISIBLE_DEVICES does); an empty value hides every device.
"""

from __future__ import annotations

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


if getattr(torch, "mlu", None) is not mlu:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.mlu = mlu
    sys.modules["torch.mlu"] = mlu
    torch.nn.Module.mlu = _module_mlu
    _register_cncl()
