"""TEST DOUBLE: what ``torch.mlu`` is while the ``torch_mlu`` double is imported (see the package docstring).

Devices are simulated from the environment, read once at import (CLA2_FAKE_MLU_*, MLU_VISIBLE_DEVICES); the
double's tensors live on the CPU, which ``tensor_device`` says to whoever asks.
"""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import torch

IS_TEST_DOUBLE = True

_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3,
          "t": 1024**4, "tib": 1024**4, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}


def parse_size(text: str) -> int:
    """'24GiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"torch_mlu test double: cannot read the size {text!r}: write e.g. 24GiB, 512MiB or bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _sizes(name: str, text: str, count: int) -> list[int]:
    sizes = [parse_size(part) for part in text.split(",")]
    if len(sizes) == 1:
        return sizes * count
    if len(sizes) != count:
        raise ValueError(f"torch_mlu test double: {name} lists {len(sizes)} sizes for {count} devices "
                         "(CLA2_FAKE_MLU_COUNT): give one size for all or one per device")
    return sizes


def physical_devices(env=os.environ) -> list[dict]:
    """The simulated host's devices, before MLU_VISIBLE_DEVICES: [{"physical", "total", "free"}]."""
    memory = env.get("CLA2_FAKE_MLU_MEMORY") or "24GiB"
    count_text = env.get("CLA2_FAKE_MLU_COUNT")
    count = int(count_text) if count_text else len(memory.split(",")) if "," in memory else 16
    if count < 0:
        raise ValueError(f"torch_mlu test double: CLA2_FAKE_MLU_COUNT={count_text} is negative")
    totals = _sizes("CLA2_FAKE_MLU_MEMORY", memory, count)
    frees = _sizes("CLA2_FAKE_MLU_FREE", env["CLA2_FAKE_MLU_FREE"], count) if env.get("CLA2_FAKE_MLU_FREE") else totals
    return [{"physical": i, "total": t, "free": min(f, t)} for i, (t, f) in enumerate(zip(totals, frees, strict=True))]


def visible_devices(physical: list[dict], env=os.environ) -> list[dict]:
    """MLU_VISIBLE_DEVICES as the driver reads it: unset, all; else the listed physical indices, renumbered in
    the order given, up to the first entry that is not a valid, unused index; empty, none."""
    spec = env.get("MLU_VISIBLE_DEVICES")
    if spec is None:
        return list(physical)
    out: list[dict] = []
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry.isdigit() or int(entry) >= len(physical) or physical[int(entry)] in out:
            break
        out.append(physical[int(entry)])
    return out


_DEVICES = visible_devices(physical_devices())
_BF16 = os.environ.get("CLA2_FAKE_MLU_BF16", "1").strip().lower() not in ("0", "false", "no", "")
_NAME = os.environ.get("CLA2_FAKE_MLU_NAME") or "MLU370-X8"
_MAJOR = 5 if _BF16 else 3  # the compute capability the real is_bf16_supported reads (see get_device_properties)
_current = 0
_initialized = False


def _index(device=None) -> int:
    """Index of ``device`` (None: the current one; an int, "mlu:1", or an object with .type and .index),
    checked as the driver does."""
    if device is None:
        index = _current
    elif isinstance(device, int):
        index = device
    else:
        kind, index = (device.type, device.index) if hasattr(device, "type") else (
            str(device).partition(":")[0], int(str(device).partition(":")[2]) if ":" in str(device) else None)
        if kind != "mlu":
            raise ValueError(f"torch_mlu test double: expected an mlu device, got {device!r}")
        index = _current if index is None else index
    if not 0 <= index < len(_DEVICES):
        raise RuntimeError(f"torch_mlu test double: invalid device ordinal {index}: {len(_DEVICES)} visible "
                           "(CLA2_FAKE_MLU_COUNT, MLU_VISIBLE_DEVICES)")
    return index


def tensor_device(index: int | None = None) -> torch.device:
    """Where the tensors of device ``index`` live: the CPU. cla2.device.Device.torch_device asks for this; the
    real torch_mlu has no such function, so there tensors go to torch.device("mlu", index)."""
    _index(index)
    return torch.device("cpu")


def is_available() -> bool:
    return len(_DEVICES) > 0


def device_count() -> int:
    return len(_DEVICES)


def init() -> None:
    global _initialized
    _initialized = True


def is_initialized() -> bool:
    return _initialized


def set_device(device) -> None:
    global _current
    _current = _index(device)
    init()


def current_device() -> int:
    return _current


def synchronize(device=None) -> None:
    _index(device)


def get_device_name(device=None) -> str:
    return f"{_NAME} (test double, physical {_DEVICES[_index(device)]['physical']})"


def get_device_properties(device):
    """As the real one (no default: the device must be named). ``major`` says what the real torch_mlu derives
    bf16 from (is_bf16_supported: ``major >= 5``): 5 when CLA2_FAKE_MLU_BF16 says bf16, else 3 (an MLU370)."""
    info = _DEVICES[_index(device)]
    return SimpleNamespace(name=get_device_name(device), total_memory=info["total"], major=_MAJOR, minor=0,
                           multi_processor_count=1)


def get_device_capability(device=None) -> tuple[int, int]:
    _index(device)
    return (_MAJOR, 0)


def mem_get_info(device=None) -> tuple[int, int]:
    """(free, total) in bytes, as the real torch.mlu.mem_get_info."""
    info = _DEVICES[_index(device)]
    return info["free"], info["total"]


def is_bf16_supported() -> bool:
    """CLA2_FAKE_MLU_BF16; the real one answers ``get_device_properties(current_device()).major >= 5``, which the
    double's major agrees with."""
    return _BF16


def memory_allocated(device=None) -> int:
    _index(device)
    return 0


max_memory_allocated = memory_reserved = max_memory_reserved = memory_allocated


def reset_peak_memory_stats(device=None) -> None:
    _index(device)


def empty_cache() -> None:
    pass


def manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


manual_seed_all = manual_seed


def seed() -> None:
    torch.default_generator.seed()


seed_all = seed


def initial_seed() -> int:
    return torch.initial_seed()


def get_rng_state(device="mlu") -> torch.Tensor:
    return torch.get_rng_state()


def get_rng_state_all() -> list[torch.Tensor]:
    return [torch.get_rng_state() for _ in _DEVICES]


def set_rng_state(new_state: torch.Tensor, device="mlu") -> None:
    torch.set_rng_state(new_state)


def set_rng_state_all(new_states) -> None:
    for state in list(new_states)[:1]:
        torch.set_rng_state(state)


def _is_in_bad_fork() -> bool:
    return False


random = SimpleNamespace(get_rng_state=get_rng_state, get_rng_state_all=get_rng_state_all,
                         set_rng_state=set_rng_state, set_rng_state_all=set_rng_state_all, manual_seed=manual_seed,
                         manual_seed_all=manual_seed_all, seed=seed, seed_all=seed_all, initial_seed=initial_seed)


def _grad_scaler(init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000, enabled=True):
    """torch.mlu.amp.GradScaler, with the real one's parameters (torch_mlu/mlu/amp/grad_scaler.py; accelerate asks
    for it under fp16): torch's CPU scaler, where the double's tensors are."""
    if not hasattr(torch.amp, "GradScaler"):
        raise RuntimeError(f"torch_mlu test double: torch {torch.__version__} has no CPU GradScaler (torch.amp."
                           "GradScaler came with torch 2.3), so fp16 with a grad scaler cannot run on the double "
                           "under it: use bf16 or fp32 there")
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_factor=growth_factor,
                                backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled)


amp = SimpleNamespace(GradScaler=_grad_scaler)
