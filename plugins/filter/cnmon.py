"""Parse the summary table that Cambricon's `cnmon` prints (no arguments), for the mlu_driver role.

Each card takes two rows of three `|`-separated cells, e.g. (cnmon v5.10):

    | CNMON v5.10.22                                               Driver v5.10.22 |
    | Card  VF  Name       Firmware |               Bus-Id | Util        Ecc-Error |
    | Fan   Temp      Pwr:Usage/Cap |         Memory-Usage | Mode     Compute-Mode |
    | 0     /   MLU370-X8    v1.1.6 |         0000:13:00.0 | 0%                  0 |
    |  0%   28C        107 W/ 250 W |     0 MiB/ 20638 MiB | FULL          Default |

Older drivers (v4.20) print `Inited  Driver` in the middle cell instead of the Bus-Id; both parse.
A card is unhealthy when its Ecc-Error count is above the allowed number, or when one of its cells reads
a fault marker (ERR!, Error, ...). "N/A" is not a fault: cards without ECC reporting print it.
"""

from __future__ import annotations

import re

_BUS_ID = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]$")
_DRIVER = re.compile(r"Driver\s+v?([0-9][\w.\-+~]*)")
_CNMON = re.compile(r"CNMON\s+v?([0-9][\w.\-+~]*)")
_MEMORY = re.compile(r"(\d+)\s*MiB\s*/\s*(\d+)\s*MiB")


def _cells(line: str) -> list[str]:
    line = line.strip()
    if not (line.startswith("|") and line.endswith("|")):
        return []
    return [cell.strip() for cell in line[1:-1].split("|")]


def mlu_driver_cnmon_cards(text: str) -> dict:
    """cnmon's table -> {"cnmon_version", "driver_version", "cards": [{index, name, firmware, bus_id, util, ecc, ...}]}."""
    result: dict = {"cnmon_version": "", "driver_version": "", "cards": []}
    card: dict | None = None
    for line in str(text).splitlines():
        if not result["driver_version"]:
            match = _DRIVER.search(line)
            if match:
                result["driver_version"] = match.group(1)
        if not result["cnmon_version"]:
            match = _CNMON.search(line)
            if match:
                result["cnmon_version"] = match.group(1)
        cells = _cells(line)
        if len(cells) != 3:
            card = None
            continue
        first = cells[0].split()
        if first and first[0].isdigit():
            middle = cells[1].split()
            last = cells[2].split()
            card = {
                "index": int(first[0]),
                "vf": first[1] if len(first) > 1 else "",
                "name": first[2] if len(first) > 2 else "",
                "firmware": first[3] if len(first) > 3 else "",
                "bus_id": next((tok for tok in middle if _BUS_ID.match(tok)), ""),
                "util": last[0] if last else "",
                "ecc": last[1] if len(last) > 1 else "",
                "memory_used_mib": None,
                "memory_total_mib": None,
                "cells": list(cells),
            }
            if not card["bus_id"] and len(middle) >= 2:
                card["inited"], card["driver"] = middle[0], middle[1]
            result["cards"].append(card)
            continue
        if card is not None and len(card["cells"]) == 3:
            # the card's second row: fan, temperature, power | memory | mode
            match = _MEMORY.search(cells[1])
            if match:
                card["memory_used_mib"] = int(match.group(1))
                card["memory_total_mib"] = int(match.group(2))
            card["cells"].extend(cells)
            card = None
            continue
        card = None
    if not result["driver_version"]:
        # v4.20 prints the driver version per card
        result["driver_version"] = next(
            (c["driver"].lstrip("v") for c in result["cards"] if c.get("driver")), ""
        )
    return result


def mlu_driver_cnmon_health(text: str, max_ecc_errors: int = 0, fault_markers: list | None = None) -> dict:
    """Parsed table plus "unhealthy": [{index, name, bus_id, reasons}] and "summary" (one line per bad card)."""
    markers = [
        str(m)
        for m in (
            fault_markers if fault_markers is not None else ["ERR!", "Error", "Fault", "Lost", "Unknown"]
        )
    ]
    parsed = mlu_driver_cnmon_cards(text)
    unhealthy = []
    for card in parsed["cards"]:
        reasons = []
        ecc = card["ecc"]
        if ecc.isdigit() and int(ecc) > int(max_ecc_errors):
            reasons.append(f"{ecc} ECC errors (allowed {int(max_ecc_errors)})")
        if card.get("inited") and card["inited"].lower() != "on":
            reasons.append(f"not initialised (Inited {card['inited']})")
        tokens = " ".join(card["cells"]).split()
        found = sorted(
            {tok for tok in tokens for marker in markers if marker and tok.lower() == marker.lower()}
        )
        if found:
            reasons.append("cnmon reads " + ", ".join(found))
        if reasons:
            unhealthy.append(
                {"index": card["index"], "name": card["name"], "bus_id": card["bus_id"], "reasons": reasons}
            )
    parsed["unhealthy"] = unhealthy
    parsed["summary"] = [
        f"card {bad['index']} ({bad['name'] or '?'} at {bad['bus_id'] or '?'}): {'; '.join(bad['reasons'])}"
        for bad in unhealthy
    ]
    for card in parsed["cards"]:
        card.pop("cells", None)
    return parsed


class FilterModule:
    """mlu_driver filters."""

    def filters(self) -> dict:
        return {
            "mlu_driver_cnmon_cards": mlu_driver_cnmon_cards,
            "mlu_driver_cnmon_health": mlu_driver_cnmon_health,
        }
