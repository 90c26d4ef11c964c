"""Filters of the preflight role."""

from __future__ import annotations

import importlib.util
import math
import posixpath
import re
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
    """mlu_driver's parser of cnmon's summary table (one parser for the kit, the filter file beside this one;
    loaded by path, so that this file also runs as a script and in the unit tests, outside the collection)."""
    path = Path(__file__).resolve().parent / "cnmon.py"
    spec = importlib.util.spec_from_file_location("cla2_mlu_driver_cnmon", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"preflight needs the cnmon parser at {path}")
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


# ---- the support matrix: which OS and which Python the kit can manage (tasks/support.yml) ------------------

# The oldest target Python ansible-core 2.19 runs modules with: module_utils/basic.py refuses anything older
# (_PY_MIN = (3, 8); changelog 2.18: "The minimum supported Python version on targets is now Python 3.8").
# On 3.6 and older the modules do not even compile (`from __future__ import annotations`).
ANSIBLE_CORE_MIN_PYTHON = (3, 8)
SUPPORT_DOC = "docs/support.md"
# os-release ID / ID_LIKE words -> ansible_facts.os_family, the key of the roles' code paths
_FAMILY_WORDS = {
    "debian": "Debian",
    "ubuntu": "Debian",
    "rhel": "RedHat",
    "centos": "RedHat",
    "fedora": "RedHat",
    "rocky": "RedHat",
    "almalinux": "RedHat",
    "kylin": "RedHat",
}
# the OS families the roles have code paths for (tasks/install-<os_family>.yml, vars/<os_family>.yml)
CODE_PATH_FAMILIES = ("Debian", "RedHat")


def _version_tuple(text: object) -> tuple[int, ...] | None:
    parts = []
    for piece in str(text or "").strip().split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def preflight_os_release(text: str) -> dict:
    """/etc/os-release (KEY=value lines, values optionally quoted) -> dict; {} for empty text."""
    info: dict = {}
    for line in str(text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        info[key.strip()] = value
    return info


def preflight_probe(stdout: str) -> dict:
    """The output of files/cla2_probe.sh (run with ansible.builtin.raw: no Python needed) -> {os_release,
    os_release_path, release_files, pythons: [{name, path, version}], complete}."""
    answer: dict = {"os_release": {}, "os_release_path": "", "release_files": {}, "pythons": [], "complete": False}
    section, buffer, release_file = "", [], ""
    for raw in str(stdout or "").splitlines():
        line = raw.rstrip("\r")
        if line.startswith("@@"):
            if section == "os-release":
                answer["os_release"] = preflight_os_release("\n".join(buffer))
            elif section == "release-file":
                answer["release_files"][release_file] = "\n".join(buffer).strip()
            word, _, rest = line[2:].partition(" ")
            section, buffer = word, []
            if word == "os-release":
                answer["os_release_path"] = rest.strip()
            elif word == "release-file":
                release_file = rest.strip()
            elif word == "end":
                answer["complete"] = True
            continue
        if section in ("os-release", "release-file"):
            buffer.append(line)
        elif section == "pythons" and line.startswith("python "):
            fields = line.split(" ", 3)
            if len(fields) == 4:
                answer["pythons"].append({"name": fields[1], "path": fields[2], "version": fields[3].strip()})
    return answer


def _family_of(os_release: dict, facts_family: str = "") -> str:
    for word in [os_release.get("ID", "")] + os_release.get("ID_LIKE", "").split():
        family = _FAMILY_WORDS.get(word.strip().lower())
        if family:
            return family
    return "" if os_release else str(facts_family or "")


def _matches(entry: dict, os_id: str, version: str) -> bool:
    if os_id not in [str(i).lower() for i in entry.get("os_release_ids") or []]:
        return False
    return any(version == str(v) or version.startswith(str(v) + ".") for v in entry.get("versions") or [])


def preflight_support_entry(matrix: list, os_id: str, version: str) -> dict | None:
    """The matrix entry for an os-release ID and VERSION_ID, or None."""
    os_id, version = str(os_id or "").lower(), str(version or "")
    for entry in matrix or []:
        if _matches(entry, os_id, version):
            return entry
    return None


def _supported_list(matrix: list) -> str:
    return ", ".join(str(e["name"]) for e in matrix or [] if e.get("status") == "supported")


def preflight_os_support(
    host: dict,
    matrix: list,
    min_python: str = "3.8",
    ignore_os: bool = False,
    ignore_python: bool = False,
) -> dict:
    """Can the kit manage this host? The OS against the support matrix, the target Python against ansible-core.

    host: {os_release: parsed /etc/os-release ({} when there is none), facts: {distribution,
    distribution_version, os_family} (optional: after fact gathering), python: {version, path} of the
    interpreter Ansible uses (None: none found), python_source: "probe" or "facts"}.

    Returns {ok, refused, python_usable, manageable, os: {id, version, name, family}, entry, checks, notes,
    summary}. checks are the os and python gates as tasks/main.yml lists them ({gate, ok, ignored,
    overridable, message}); refused is true when one of them fails and has no override: a refused
    OS, an OS whose family has no code path and a Python older than ansible-core's floor cannot be ignored;
    an OS the matrix does not name (of a family with a code path) can, with preflight_ignore_os, and a
    Python between the floor and a raised preflight_min_python_version with preflight_ignore_python.
    python_usable is false when Ansible cannot run a module on the host at all (fact gathering included).
    """
    host = host or {}
    os_release = dict(host.get("os_release") or {})
    facts = dict(host.get("facts") or {})
    os_id = str(os_release.get("ID", "")).lower()
    version = str(os_release.get("VERSION_ID", ""))
    if not os_release and facts:
        os_id = str(facts.get("distribution", "")).lower()
        version = str(facts.get("distribution_version", ""))
    name = os_release.get("PRETTY_NAME") or " ".join(
        x for x in (os_release.get("NAME") or facts.get("distribution", ""), version) if x
    )
    family = _family_of(os_release, facts.get("os_family", ""))
    entry = preflight_support_entry(matrix, os_id, version)
    where = f"{name or 'unknown OS'} (os-release ID {os_id or '?'}, VERSION_ID {version or '?'})"
    supported = _supported_list(matrix)

    # --- OS
    os_check = {"gate": "os", "ok": True, "ignored": False, "overridable": False, "message": ""}
    notes = []
    if entry is not None and entry.get("status") == "supported":
        if entry.get("tested") != "sandbox":
            notes.append(
                f"{entry['name']} is in the support matrix but tested: {entry.get('tested')}: the kit's "
                f"{entry.get('package_manager')}/{entry.get('driver_package')} code path has not been run on it "
                f"({SUPPORT_DOC})"
            )
    elif entry is not None:
        remedy = str(entry.get("remedy", "")).strip().rstrip(".")
        os_check.update(
            ok=False,
            message=(
                f"{where} is {entry['name']}, which this kit cannot manage: {entry.get('reason', '').strip()}. "
                f"{remedy[:1].upper() + remedy[1:]}. See {SUPPORT_DOC}; no override (the roles "
                "would fail half way)"
            ),
        )
    elif not os_id:
        os_check.update(
            ok=False,
            message=(
                f"cannot tell which OS this is: no /etc/os-release ({host.get('os_release_path') or 'not readable'})"
                f"{', ' + family + ' family' if family else ''}. The kit supports {supported} ({SUPPORT_DOC}); "
                "no override"
            ),
        )
    elif family in CODE_PATH_FAMILIES:
        os_check.update(
            ok=False,
            ignored=bool(ignore_os),
            overridable=True,
            message=(
                f"UNSUPPORTED OS: {where} is not in the support matrix (roles/preflight/vars/support_matrix.yml, "
                f"{SUPPORT_DOC}): the roles have a code path for its {family} family but nobody has checked this "
                f"release. Supported: {supported}. Use one of those, or set preflight_ignore_os: true to run "
                "anyway (override preflight_ignore_os)"
            ),
        )
    else:
        os_check.update(
            ok=False,
            message=(
                f"{where} is not in the support matrix and the roles have no code path for its family "
                f"({family or 'unknown'}): they install packages with apt (Debian family) or dnf (RedHat family) "
                f"only. Supported: {supported} ({SUPPORT_DOC}); no override"
            ),
        )

    # --- Python
    python = host.get("python") or None
    floor = ".".join(map(str, ANSIBLE_CORE_MIN_PYTHON))
    wanted = _version_tuple(min_python) or ANSIBLE_CORE_MIN_PYTHON
    py_check = {"gate": "python", "ok": True, "ignored": False, "overridable": False, "message": ""}
    py_version = _version_tuple(python.get("version")) if python else None
    python_usable = bool(py_version) and py_version >= ANSIBLE_CORE_MIN_PYTHON
    if entry is not None and entry.get("status") == "refused":
        fix = str(entry.get("remedy", "")).strip().rstrip(".")
    else:
        fix = (
            f"install Python {floor} or newer on the host and point ansible_python_interpreter at it (its package "
            "manager's Python bindings must exist for that Python), or use a supported OS"
        )
    if not python:
        py_check.update(
            ok=False,
            message=(
                f"no Python interpreter found on the target (tried {', '.join(host.get('python_tried') or []) or '?'})"
                f": ansible-core 2.19 needs Python {floor} or newer there to run any module: {fix}. No override"
            ),
        )
    elif not py_version:
        py_check.update(
            ok=False,
            message=(
                f"the target's Python {python.get('path')} did not say its version ({python.get('version')}): "
                f"ansible-core 2.19 needs Python {floor} or newer there: {fix}. No override"
            ),
        )
    elif py_version < ANSIBLE_CORE_MIN_PYTHON:
        py_check.update(
            ok=False,
            message=(
                f"target Python {python.get('version')} ({python.get('path')}) is older than {floor}, the oldest "
                f"Python ansible-core 2.19 runs modules with (fact gathering and every module fail on it): {fix}. "
                "No override"
            ),
        )
    elif py_version < wanted:
        py_check.update(
            ok=False,
            ignored=bool(ignore_python),
            overridable=True,
            message=(
                f"target Python {python.get('version')} ({python.get('path')}) is older than "
                f"{min_python} (preflight_min_python_version, override preflight_ignore_python)"
            ),
        )

    checks = [os_check, py_check]
    ok = all(c["ok"] or c["ignored"] for c in checks)
    # refused: no override can make the kit manage it (the other gates are not weighed on such a host)
    refused = any(not c["ok"] and not c["overridable"] for c in checks)
    if entry is not None:
        summary = (
            f"{entry['name']} ({entry.get('package_manager')}, {entry.get('driver_package')} driver, "
            f"tested: {entry.get('tested')})"
        )
    else:
        summary = f"{where} (not in the support matrix)"
    return {
        "ok": ok,
        "refused": refused,
        "python_usable": python_usable,
        "manageable": ok and python_usable,
        "os": {"id": os_id, "version": version, "name": name, "family": family},
        "entry": entry,
        "python": python,
        "python_source": host.get("python_source", ""),
        "checks": checks,
        "notes": notes,
        "summary": summary,
    }


def preflight_support_failure(answer: dict, host: str) -> str:
    """The refusal the probe prints when the host cannot even run a module: every problem at once."""
    problems = [c["message"] for c in (answer or {}).get("checks", []) if not c["ok"] and not c["ignored"]]
    text = "; ".join(f"[{i}] {p}" for i, p in enumerate(problems, 1))
    return f"preflight refused {host} before gathering facts, nothing was changed: {len(problems)} problem(s): {text}"


_TABLE_HEAD = (
    "| OS | os-release ID | versions | package manager | driver package | system python3 | status | tested |",
    "|---|---|---|---|---|---|---|---|",
)


def preflight_support_table(matrix: list) -> str:
    """docs/support.md's table, one row per matrix entry (tests/unit/test_preflight_support.py compares)."""
    rows = list(_TABLE_HEAD)
    for e in matrix or []:
        cells = [
            e["name"],
            ", ".join(f"`{i}`" for i in e.get("os_release_ids") or []),
            ", ".join(str(v) for v in e.get("versions") or []),
            e.get("package_manager", ""),
            e.get("driver_package", ""),
            str(e.get("python", "")),
            "**refused**" if e.get("status") == "refused" else e.get("status", ""),
            e.get("tested", ""),
        ]
        rows.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


# ---- the stack matrix (roles/preflight/vars/stack_matrix.yml): Cambricon's PyTorch images ------------------

STACK_MATRIX_FILE = "roles/preflight/vars/stack_matrix.yml"
# the facts of a stack matrix entry, each null or with its sources (tests/unit/test_stack_matrix.py checks)
STACK_FACTS = (
    "file", "repo", "tag", "python", "torch", "torch_mlu", "cntoolkit", "deepspeed_wheel", "min_driver",
    "driver_seen", "mlu370",
)
_RELEASE = re.compile(r"v?(\d+(?:\.\d+)*)")


def _release(text: object) -> tuple[int, ...] | None:
    """The leading release numbers of a version: '2.1.0+cpu' -> (2, 1, 0), '5.10.22-1' -> (5, 10, 22),
    'v1.22.2+torch2.1.0' -> (1, 22, 2); None when it starts with none."""
    match = _RELEASE.match(str(text or "").strip())
    return tuple(int(p) for p in match.group(1).split(".")) if match else None


def _image_ref(entry: dict) -> str:
    return f"{entry['repo']}:{entry['tag']}" if entry.get("repo") and entry.get("tag") else ""


def _stack_matches(entry: dict, image: dict) -> bool:
    """The image's Python (major.minor), torch (as many numbers as the entry gives) and, where both are known,
    torch_mlu (major.minor) are the entry's."""
    want_py, want_torch = _release(entry.get("python")), _release(entry.get("torch"))
    have_py, have_torch = _release(image.get("python")), _release(image.get("torch"))
    if not (want_py and want_torch and have_py and have_torch):
        return False
    if have_py[:2] != want_py[:2] or have_torch[: len(want_torch)] != want_torch:
        return False
    want_mlu, have_mlu = _release(entry.get("torch_mlu")), _release(image.get("torch_mlu"))
    return not (want_mlu and have_mlu) or have_mlu[:2] == want_mlu[:2]


def preflight_stack_entry(matrix: list, image: dict | str) -> dict | None:
    """The stack matrix entry of an image: the one whose repo:tag is the image's ref, else the first whose
    Python, torch and torch_mlu are the image's (see preflight_stack_support); None when none is."""
    image = {"ref": image} if isinstance(image, str) else dict(image or {})
    ref = str(image.get("ref") or "").strip()
    for entry in matrix or []:
        if ref and _image_ref(entry) == ref:
            return entry
    for entry in matrix or []:
        if _stack_matches(entry, image):
            return entry
    return None


def _stack_offer(entry: dict) -> str:
    """How a refusal names an image to load instead."""
    named = entry.get("file") or _image_ref(entry) or "ask Cambricon for it: its file name is not public"
    driver = f", MLU driver {entry['min_driver']} or newer" if entry.get("min_driver") else ""
    return f"{entry['name']} ({named}{driver})"


def preflight_stack_support(
    matrix: list,
    image: dict | str,
    driver_version: str | None = None,
    ignore: bool = False,
) -> dict:
    """Can the kit's runtime run on this Cambricon PyTorch image, on this host's driver? The stack gate.

    matrix: preflight__stack_matrix (roles/preflight/vars/stack_matrix.yml). image: the loaded image, as
    {ref: "repo:tag", python, torch, torch_mlu}, the versions read inside it (e.g. `python3 -c` printing
    platform.python_version(), torch.__version__ and torch_mlu.__version__), or just its "repo:tag" string.
    It is the entry whose repo:tag is ref, else the first whose Python (major.minor), torch (as many numbers
    as the entry gives) and torch_mlu (major.minor, where both are known) are the image's: Cambricon's torch
    2.1 image has no public tag, so it is known by its versions. driver_version: the host's MLU driver
    (cnmon's, e.g. "6.2.10"; "" or None: not read yet, not checked). ignore: preflight_ignore_stack.

    Refused: an image the matrix lists as refused (its reason and remedy), an image it does not list, and an
    image whose minimum driver is newer than the host's. Each message names the image's versions and what to
    load instead (the supported entries). Returns {gate: "stack", ok, ignored, overridable, message, notes,
    entry, image, summary}, a check as tasks/main.yml lists them: message is "" when ok; with ignore, a
    refusal stays in message and ignored is true (the play warns instead of failing).
    """
    image = {"ref": image} if isinstance(image, str) else dict(image or {})
    entry = preflight_stack_entry(matrix, image)
    versions = ", ".join(
        f"{label} {image[key]}" for key, label in (("python", "Python"), ("torch", "torch"), ("torch_mlu", "torch_mlu"))
        if image.get(key)
    ) or "its versions not read"
    where = f"image {image.get('ref') or '(no repo:tag)'} ({versions})"
    supported = [e for e in matrix or [] if e.get("status") == "supported"]
    instead = "; ".join(_stack_offer(e) for e in supported) or "none (the stack matrix lists no supported image)"
    override = "set preflight_ignore_stack: true to run anyway (override preflight_ignore_stack)"
    problems, notes = [], []
    if entry is None:
        problems.append(
            f"UNSUPPORTED IMAGE: {where} is not in the stack matrix ({STACK_MATRIX_FILE}, {SUPPORT_DOC}). "
            f"Load a supported image: {instead}"
        )
    elif entry.get("status") != "supported":
        remedy = str(entry.get("remedy", "")).strip().rstrip(".")
        problems.append(
            f"{where} is {entry['name']}, which the kit's runtime refuses: {' '.join(str(entry.get('reason', '')).split())}. "
            f"{remedy[:1].upper() + remedy[1:]}. Supported: {instead}"
        )
    if entry is not None and entry.get("min_driver"):
        have = _release(driver_version)
        if not str(driver_version or "").strip():
            notes.append(
                f"{entry['name']} needs MLU driver {entry['min_driver']} or newer; the host's driver version is not "
                "known yet, so it is not checked"
            )
        elif have is None or have < _release(entry["min_driver"]):
            problems.append(
                f"{where} is {entry['name']}, whose torch_mlu {entry.get('torch_mlu') or '(version unknown)'} needs MLU "
                f"driver {entry['min_driver']} or newer, and the host's driver is {driver_version}: install driver "
                f"{entry['min_driver']} or newer (mlu_driver), or load an image built for driver {driver_version}. "
                f"Supported: {instead}"
            )
    elif entry is not None and entry.get("status") == "supported":
        notes.append(f"{entry['name']}: no public source gives its minimum MLU driver, so the driver is not checked")
    ok = not problems
    message = ""
    if problems:
        message = "; ".join(problems) + f" ({SUPPORT_DOC}); {override}"
    summary = f"{entry['name']} ({entry.get('status')})" if entry is not None else f"{where} (not in the stack matrix)"
    return {
        "gate": "stack",
        "ok": ok,
        "ignored": bool(ignore) and not ok,
        "overridable": True,
        "message": message,
        "notes": notes,
        "entry": entry,
        "image": image,
        "summary": summary,
    }


_STACK_TABLE_HEAD = (
    "| image | file / repo:tag | Python | torch | torch_mlu | CNToolkit | DeepSpeed wheel | min. driver | status |",
    "|---|---|---|---|---|---|---|---|---|",
)


def _cell(value: object) -> str:
    return "unknown" if value is None else str(value)


def preflight_stack_table(matrix: list) -> str:
    """docs/support.md's image table, one row per stack matrix entry (tests/unit/test_stack_matrix.py compares)."""
    rows = list(_STACK_TABLE_HEAD)
    for e in matrix or []:
        named = " / ".join(f"`{n}`" for n in (e.get("file"), _image_ref(e)) if n) or "not public (ask Cambricon)"
        cells = [
            e["name"],
            named,
            _cell(e.get("python")),
            _cell(e.get("torch")),
            _cell(e.get("torch_mlu")),
            _cell(e.get("cntoolkit")),
            f"`{e['deepspeed_wheel']}`" if e.get("deepspeed_wheel") else "unknown",
            _cell(e.get("min_driver")),
            "**refused**" if e.get("status") == "refused" else e.get("status", ""),
        ]
        rows.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


class FilterModule:
    """preflight filters."""

    def filters(self) -> dict:
        return {
            "preflight_mount_for": preflight_mount_for,
            "preflight_human_bytes": preflight_human_bytes,
            "preflight_cnmon_memory": preflight_cnmon_memory,
            "preflight_device_memory": preflight_device_memory,
            "preflight_device_memory_summary": preflight_device_memory_summary,
            "preflight_os_release": preflight_os_release,
            "preflight_probe": preflight_probe,
            "preflight_os_support": preflight_os_support,
            "preflight_support_failure": preflight_support_failure,
            "preflight_support_table": preflight_support_table,
            "preflight_stack_entry": preflight_stack_entry,
            "preflight_stack_support": preflight_stack_support,
            "preflight_stack_table": preflight_stack_table,
        }


if __name__ == "__main__":
    import sys

    import yaml

    TABLES = {
        "--support-table": ("support_matrix.yml", "preflight__support_matrix", preflight_support_table),
        "--stack-table": ("stack_matrix.yml", "preflight__stack_matrix", preflight_stack_table),
    }
    if len(sys.argv) != 2 or sys.argv[1] not in TABLES:
        sys.exit("usage: preflight.py --support-table | --stack-table  (prints docs/support.md's OS table from "
                 "roles/preflight/vars/support_matrix.yml, or its image table from roles/preflight/vars/stack_matrix.yml)")
    file_name, variable, render = TABLES[sys.argv[1]]
    matrix_file = Path(__file__).resolve().parents[2] / "roles" / "preflight" / "vars" / file_name
    sys.stdout.write(render(yaml.safe_load(matrix_file.read_text())[variable]))
