"""Filters of the preflight role."""

from __future__ import annotations

import posixpath


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


class FilterModule:
    """preflight filters."""

    def filters(self) -> dict:
        return {
            "preflight_mount_for": preflight_mount_for,
            "preflight_human_bytes": preflight_human_bytes,
        }
