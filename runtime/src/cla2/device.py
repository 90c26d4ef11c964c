"""The one place that knows about devices.

The kind is decided once per process: ``mlu`` (Cambricon, torch_mlu, distributed backend cncl, cards
chosen with MLU_VISIBLE_DEVICES), ``cuda`` (nccl, CUDA_VISIBLE_DEVICES) or ``cpu`` (gloo). ``--device``
on every command overrides the automatic choice. Nothing else in the package names a device.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

KINDS = ("mlu", "cuda", "cpu")
_BACKENDS = {"mlu": "cncl", "cuda": "nccl", "cpu": "gloo"}
_VISIBLE_ENV = {"mlu": "MLU_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES", "cpu": None}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DeviceError(RuntimeError):
    """The requested device or dtype is not usable here."""


def _mlu_available() -> bool:
    try:
        import torch_mlu  # noqa: F401  (registers torch.mlu)
    except ImportError:
        return False
    return bool(getattr(torch, "mlu", None) and torch.mlu.is_available())


@dataclass(frozen=True)
class Device:
    kind: str

    @property
    def backend(self) -> str:
        """torch.distributed backend for this kind."""
        return _BACKENDS[self.kind]

    @property
    def visible_devices_env(self) -> str | None:
        """Environment variable that selects the cards (None on CPU)."""
        return _VISIBLE_ENV[self.kind]

    @property
    def module(self):
        """torch.mlu or torch.cuda (None on CPU)."""
        return getattr(torch, self.kind) if self.kind != "cpu" else None

    @property
    def count(self) -> int:
        return self.module.device_count() if self.module else 1

    def torch_device(self, index: int | None = None) -> torch.device:
        """The torch device that tensors of card ``index`` (default: LOCAL_RANK) go to."""
        if self.kind == "cpu":
            return torch.device("cpu")
        if index is None:
            index = int(os.environ.get("LOCAL_RANK", "0"))
        # The one seam for a test double: a device module that declares where its tensors live is asked
        # (runtime/tests/doubles/torch_mlu keeps them on the CPU). The real torch_mlu and torch.cuda declare
        # nothing, so tensors go to torch.device(kind, index). Nothing else in cla2 knows of the double.
        declared = getattr(self.module, "tensor_device", None)
        return declared(index) if declared else torch.device(self.kind, index)

    def set_device(self, index: int) -> None:
        if self.module:
            self.module.set_device(index)

    def dtype_supported(self, dtype: torch.dtype) -> bool:
        if dtype == torch.float32:
            return True
        if self.kind == "cpu":
            # CPU matmuls exist for both, but fp16 training on CPU is not supported by torch autocast.
            return dtype == torch.bfloat16
        if self.kind == "cuda":
            return dtype == torch.float16 or torch.cuda.is_bf16_supported()
        # MLU370 supports fp16; bf16 depends on the card and torch_mlu build.
        if dtype == torch.float16:
            return True
        probe = getattr(self.module, "is_bf16_supported", None)
        return bool(probe and probe())

    def memory(self) -> list[dict]:
        """Total and free memory per card, in bytes (host memory on CPU)."""
        if self.kind == "cpu":
            pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            return [{"index": 0, "total": pages, "free": avail}]
        out = []
        for i in range(self.count):
            free, total = self.module.mem_get_info(i)
            out.append({"index": i, "total": int(total), "free": int(free)})
        return out

    def name(self, index: int = 0) -> str:
        if self.kind == "cpu":
            import platform

            return platform.processor() or platform.machine()
        return self.module.get_device_name(index)

    def synchronize(self) -> None:
        if self.module:
            self.module.synchronize()


@functools.cache
def pick(kind: str | None = None) -> Device:
    """Return the device to use: ``kind`` if given (error if unusable), else mlu, then cuda, then cpu."""
    if kind is not None and kind not in KINDS and kind != "auto":
        raise DeviceError(f"unknown device {kind!r}: choose one of {', '.join(KINDS)} or auto")
    if kind in (None, "auto"):
        kind = os.environ.get("CLA2_DEVICE") or None
    if kind == "mlu" or kind is None and _mlu_available():
        if not _mlu_available():
            raise DeviceError("--device mlu asked for, but torch_mlu is not importable or sees no MLU card: "
                              "run inside Cambricon's PyTorch container with /dev/cambricon_* passed in")
        return Device("mlu")
    if kind == "cuda" or kind is None and torch.cuda.is_available():
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda asked for, but torch sees no CUDA device")
        return Device("cuda")
    return Device("cpu")


def parse_dtype(name: str | None, device: Device) -> torch.dtype:
    """Map 'fp32' / 'fp16' / 'bf16' / 'auto' to a torch dtype the device supports, or fail clearly.

    'auto' is bf16 where supported on an accelerator, else fp16 on an accelerator, else fp32.
    """
    if name in (None, "auto"):
        if device.kind == "cpu":
            return torch.float32
        return torch.bfloat16 if device.dtype_supported(torch.bfloat16) else torch.float16
    if name not in _DTYPES:
        raise DeviceError(f"unknown dtype {name!r}: use one of fp32, fp16, bf16, auto")
    dtype = _DTYPES[name]
    if not device.dtype_supported(dtype):
        supported = [n for n in ("fp32", "fp16", "bf16") if device.dtype_supported(_DTYPES[n])]
        raise DeviceError(f"dtype {name} is not supported on {device.kind}: use one of {', '.join(supported)}")
    return dtype
