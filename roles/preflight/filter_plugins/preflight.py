"""Filters of the preflight role."""

from __future__ import annotations

import importlib.util
import math
import posixpath
from decimal import Decimal
from pathlib import Path

MIB = 1 << 20
# rc of the shell wrapper in tasks/cnmon.yml when cnmon is not on the host (the driver is not installed)
CNMON_ABSENT_RC = 127


def preflight_mount_for(mounts: list[dict], path: str) -> dict:
    """The mount (from ansible_facts.mounts) that holds PATH: the longest mount point above it.

    PATH need not exist yet (a fresh server has no /data/models): the mount above it is where it will
    be created. Returns {} when no mount matches (no mounts gathered).
    """
    path = posixpath.normpath("/" + str(path).lstrip("/"))
    best: dict = {}
    best_len = -1
    for mount in mounts or []:
        point = posixpath.normpath(str(mount.get("mount", "")))
        if not point.startswith("/"):
            continue
        inside = point == "/" or path == point or path.startswith(point + "/")
        if inside and len(point) > best_len:
            best, best_len = mount, len(point)
    return best


def preflight_human_bytes(value: float | str) -> str:
    """1073741824 -> '1.0 GiB'."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _human(value: int) -> str:
    """Bytes as the messages print them, exact and readable: 26500000000 -> '26500000000 bytes = 24.7 GiB'."""
    return f"{int(value)} bytes = {preflight_human_bytes(value)}"


def _cnmon_parser():
    """mlu_driver's parser of cnmon's summary table (one parser for the kit, loaded by path: a role's
    filter_plugins are not importable as a package, and mlu_driver need not be in the play yet)."""
    path = Path(__file__).resolve().parents[2] / "mlu_driver" / "filter_plugins" / "cnmon.py"
    spec = importlib.util.spec_from_file_location("cla2_mlu_driver_cnmon", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"preflight needs the mlu_driver role's cnmon parser at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preflight_cnmon_memory(result: dict, cnmon_path: str = "cnmon") -> dict:
    """The registered result of running cnmon (tasks/cnmon.yml) -> {"read", "devices", "error"}.

    devices: [{index, name, bus_id, memory_mib}], one per MLU device as cnmon lists them (an MLU370-X8
    card shows two, one per chip). "read" is false, and "error" says why, when cnmon is not installed
    (rc 127 from the wrapper: the driver is not installed yet), when it failed, when it listed no device
    or when a device's memory could not be read.
    """
    result = result or {}
    rc = int(result["rc"]) if result.get("rc") is not None else 1
    if rc == CNMON_ABSENT_RC:
        return {"read": False, "devices": [], "error": f"{cnmon_path} not found on the host (it comes with the MLU driver)"}
    if rc != 0:
        detail = str(result.get("stderr") or result.get("msg") or "").strip()
        return {"read": False, "devices": [], "error": f"{cnmon_path} failed (rc {rc}){': ' + detail if detail else ''}"}
    cards = _cnmon_parser().mlu_driver_cnmon_cards(str(result.get("stdout", "")))["cards"]
    devices = [
        {"index": c["index"], "name": c["name"], "bus_id": c["bus_id"], "memory_mib": c["memory_total_mib"]}
        for c in cards
    ]
    if not devices:
        return {"read": False, "devices": [], "error": f"{cnmon_path} lists no MLU device"}
    blank = [str(d["index"]) for d in devices if not d["memory_mib"]]
    if blank:
        return {
            "read": False,
            "devices": devices,
            "error": f"{cnmon_path} shows no memory size for device(s) {', '.join(blank)}",
        }
    return {"read": True, "devices": devices, "error": ""}


def _validate(models: list, reserve_bytes: int, usable_fraction: float) -> list[dict]:
    fraction = float(usable_fraction)
    if not 0 < fraction <= 1:
        raise ValueError(
            f"preflight_device_memory_usable_fraction is {usable_fraction}: it must be above 0 and at most 1 (e.g. 0.9)"
        )
    if int(reserve_bytes) < 0:
        raise ValueError(f"preflight_device_memory_reserve_bytes is {reserve_bytes}: it must be 0 or more")
    checked = []
    for i, model in enumerate(models or []):
        name = str(model.get("name") or f"preflight_models[{i}]")
        weight, per = int(model.get("weight_bytes", 0)), int(model.get("devices_per_replica", 0))
        if weight <= 0:
            raise ValueError(f"preflight_models: {name} has weight_bytes {weight}: give the size of its weights in bytes")
        if per < 1:
            raise ValueError(f"preflight_models: {name} has devices_per_replica {per}: it must be 1 or more")
        checked.append({"name": name, "weight_bytes": weight, "devices_per_replica": per})
    return checked


def preflight_per_device_need(weight_bytes: int, devices_per_replica: int, reserve_bytes: int) -> int:
    """Bytes one device of a replica must hold: its share of the weights (layers split over the replica's
    devices, rounded up) plus the reserve (accelerator context, KV cache for one sequence)."""
    return -(-int(weight_bytes) // int(devices_per_replica)) + int(reserve_bytes)


def preflight_devices_that_fit(weight_bytes: int, usable_bytes: int, reserve_bytes: int) -> int | None:
    """Fewest devices per replica whose per-device need fits in usable_bytes; None when none does (the
    reserve alone takes the usable memory)."""
    room = int(usable_bytes) - int(reserve_bytes)
    if room <= 0:
        return None
    return max(1, -(-int(weight_bytes) // room))


def preflight_device_memory(
    memory: dict,
    models: list,
    reserve_bytes: int,
    usable_fraction: float,
    required: bool = False,
) -> dict:
    """Weigh the devices' memory (preflight_cnmon_memory's answer) against the models the host must run.

    Per device, a replica of a model needs ceil(weight_bytes / devices_per_replica) + reserve_bytes: that
    must be at most usable_fraction x the smallest device's memory, and devices_per_replica at most the
    number of devices. Returns {state, ok, message, notice, error, device_count, smallest, usable_bytes,
    reserve_bytes, usable_fraction, devices, models}. state is "not_required" (no model listed), "unknown"
    (the memory was not read: ok unless required, with a notice) or "checked". message lists every
    problem with its numbers and what to change; models gains need_bytes, fits, devices_that_fit, replicas.
    """
    memory = memory or {}
    checked = _validate(models, reserve_bytes, usable_fraction)
    reserve = int(reserve_bytes)
    devices = list(memory.get("devices") or [])
    for model in checked:
        model["need_bytes"] = preflight_per_device_need(model["weight_bytes"], model["devices_per_replica"], reserve)
    answer: dict = {
        "state": "not_required",
        "ok": True,
        "message": "",
        "notice": "",
        "error": str(memory.get("error") or ("" if memory.get("read") else "the devices' memory was not read")),
        "device_count": len(devices),
        "smallest": {},
        "usable_bytes": None,
        "reserve_bytes": reserve,
        "usable_fraction": float(usable_fraction),
        "devices": devices,
        "models": checked,
    }
    if memory.get("read"):
        fraction = Decimal(str(usable_fraction))
        smallest = min(devices, key=lambda d: (int(d["memory_mib"]), int(d["index"])))
        answer["smallest"] = {"index": smallest["index"], "memory_mib": int(smallest["memory_mib"])}
        answer["usable_bytes"] = math.floor(fraction * int(smallest["memory_mib"]) * MIB)
    if not checked:
        return answer

    if not memory.get("read"):
        needs = "; ".join(
            f"{m['name']} needs {_human(m['need_bytes'])} on each of {m['devices_per_replica']} device(s) per replica"
            for m in checked
        )
        answer.update(state="unknown", ok=not required)
        if required:
            answer["message"] = (
                f"device memory unknown: {answer['error']}, so the models cannot be weighed against it ({needs}). "
                "Install the driver (mlu_driver) so that cnmon lists each device's memory, point "
                "preflight_cnmon_path at cnmon, or override preflight_ignore_device_memory"
            )
        else:
            answer["notice"] = (
                f"device memory unknown yet: {answer['error']}. Not checked until the driver is installed: the gate "
                f"right after mlu_driver (preflight's device_memory entry point) checks it, except in check mode, "
                f"where nothing is installed. {needs}"
            )
        return answer

    answer["state"] = "checked"
    count, usable = len(devices), answer["usable_bytes"]
    smallest_index, smallest_mib = answer["smallest"]["index"], answer["smallest"]["memory_mib"]
    problems = []
    for model in checked:
        name, weight, per, need = model["name"], model["weight_bytes"], model["devices_per_replica"], model["need_bytes"]
        fit = preflight_devices_that_fit(weight, usable, reserve)
        model.update(
            fits_memory=need <= usable,
            fits_count=per <= count,
            devices_that_fit=fit,
            replicas=count // per,
        )
        model["fits"] = model["fits_memory"] and model["fits_count"]
        if model["fits"]:
            continue
        short = []
        if not model["fits_memory"]:
            short.append(
                f"the smallest device (index {smallest_index}, {smallest_mib} MiB) offers {_human(usable)} "
                f"at usable fraction {usable_fraction}"
            )
        if not model["fits_count"]:
            short.append(f"the host has only {count} device(s) (cnmon)")
        if fit is None:
            change = (
                f"the reserve alone fills a {smallest_mib} MiB device: lower preflight_device_memory_reserve_bytes, "
                "or use a host with larger devices"
            )
        elif fit <= count:
            change = (
                f"set devices_per_replica to {fit} for {name} ({'more' if fit > per else 'fewer'} devices per "
                f"replica: {_human(preflight_per_device_need(weight, fit, reserve))} per device, {count // fit} "
                "replica(s) on this host)" + (", or use a smaller model" if fit > per else "")
            )
        else:
            change = (
                f"no split over this host's {count} device(s) fits, it would take {fit} devices per replica: use a "
                "smaller model, or a host with more or larger devices"
            )
        problems.append(
            f"{name} ({_human(weight)} of weights) on {per} device(s) per replica needs {_human(need)} per device "
            f"(its share of the weights + reserve {_human(reserve)}), but {' and '.join(short)}: {change}"
        )
    answer["ok"] = not problems
    if problems:
        answer["message"] = (
            f"the devices cannot hold the models: {'; '.join(problems)} (preflight_models, "
            "preflight_device_memory_reserve_bytes, preflight_device_memory_usable_fraction; override "
            "preflight_ignore_device_memory)"
        )
    return answer


def preflight_device_memory_summary(answer: dict) -> str:
    """One line for the host's summary: the devices' memory and the replicas each model gets."""
    answer = answer or {}
    if not answer.get("smallest"):
        return f"device memory {'unknown yet' if answer.get('state') == 'unknown' else 'not read'}: {answer.get('error')}"
    devices = answer.get("devices") or []
    sizes = sorted({int(d["memory_mib"]) for d in devices})
    fits = [
        f"{m['name']}: {m['replicas']} replica(s) of {m['devices_per_replica']} device(s)"
        for m in answer.get("models") or []
        if m.get("fits")
    ]
    text = f"{len(devices)} device(s) of {'/'.join(map(str, sizes))} MiB"
    if answer.get("state") == "not_required":
        return text + " (preflight_models is empty: no memory gate)"
    return text + (f" ({', '.join(fits)})" if fits else "")


class FilterModule:
    """preflight filters."""

    def filters(self) -> dict:
        return {
            "preflight_mount_for": preflight_mount_for,
            "preflight_human_bytes": preflight_human_bytes,
            "preflight_cnmon_memory": preflight_cnmon_memory,
            "preflight_device_memory": preflight_device_memory,
            "preflight_device_memory_summary": preflight_device_memory_summary,
        }
