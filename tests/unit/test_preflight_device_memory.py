"""The preflight role's device memory arithmetic (plugins/filter/preflight.py): cnmon's
summary table as the test-only driver prints it, read into each device's memory, and weighed against
the models a host must run. The molecule scenario preflight_driver_failures runs the same filters
inside the role on a sandbox host; these pin the numbers and the messages, in milliseconds.

An MLU370-X8 card is two chips, each one device of 24 GB (cnmon: 23374 MiB); Chinese-Alpaca-2-13B
fp16 is 26.5 GB of weights, 7B 13.9 GB.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "plugins" / "filter" / "preflight.py"
CNMON = ROOT / "sandbox" / "fixtures" / "mlu-driver" / "cnmon"
GIB = 1 << 30
MIB = 1 << 20
RESERVE = 2 * GIB
A13B = {"name": "chinese-alpaca-2-13b", "weight_bytes": 26_500_000_000, "devices_per_replica": 2}
A7B = {"name": "chinese-alpaca-2-7b", "weight_bytes": 13_900_000_000, "devices_per_replica": 1}


def load_plugin():
    spec = importlib.util.spec_from_file_location("preflight_filters", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pf = load_plugin()


def cnmon(tmp_path: Path, memories: list[int]) -> dict:
    """Run the test-only cnmon on simulated cards of these sizes (MiB); the result as the role registers it."""
    conf = tmp_path / "cards.conf"
    conf.write_text("# index name firmware bus-id ecc status memory-MiB\n" + "".join(
        f"{i} MLU370-X8 v1.1.6 0000:{0x3B + 2 * i:02X}:00.0 0 ok {mib}\n" for i, mib in enumerate(memories)))
    proc = subprocess.run(["sh", str(CNMON)], capture_output=True, text=True, timeout=30, check=False,
                          env={**os.environ, "CNMON_SIM_CONFIG": str(conf)})
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def weigh(memories: list[int], models: list[dict], tmp_path: Path, **kw) -> dict:
    memory = pf.preflight_cnmon_memory(cnmon(tmp_path, memories))
    return pf.preflight_device_memory(memory, models, kw.pop("reserve", RESERVE), kw.pop("fraction", 0.9), **kw)


def test_cnmon_table_gives_each_device_memory(tmp_path):
    memory = pf.preflight_cnmon_memory(cnmon(tmp_path, [23374, 23374, 20638]))
    assert memory["read"] and memory["error"] == ""
    assert [(d["index"], d["memory_mib"], d["bus_id"]) for d in memory["devices"]] == [
        (0, 23374, "0000:3B:00.0"), (1, 23374, "0000:3D:00.0"), (2, 20638, "0000:3F:00.0")]


@pytest.mark.parametrize(("result", "error"), [
    ({"rc": 127, "stdout": "", "stderr": ""}, "cnmon not found on the host (it comes with the MLU driver)"),
    ({"rc": 1, "stdout": "", "stderr": "cnmon: cannot read /etc/x: no MLU device found\n"},
     "cnmon failed (rc 1): cnmon: cannot read /etc/x: no MLU device found"),
    ({"rc": 0, "stdout": "no table here\n", "stderr": ""}, "cnmon lists no MLU device"),
    ({}, "cnmon failed (rc 1)"),
])
def test_cnmon_that_cannot_be_read_says_why(result, error):
    memory = pf.preflight_cnmon_memory(result)
    assert memory["read"] is False
    assert memory["error"] == error
    assert memory["devices"] == []


def test_device_without_memory_cell_is_named():
    table = ("| 0     /   MLU370-X8    v1.1.6 |         0000:3B:00.0 | 0%                  0 |\n"
             "|  0%   30C        100 W/ 250 W |     0 MiB/ 23374 MiB | FULL          Default |\n"
             "| 1     /   MLU370-X8    v1.1.6 |         0000:3D:00.0 | 0%                  0 |\n"
             "|  0%   31C        101 W/ 250 W |          N/A         | FULL          Default |\n")
    memory = pf.preflight_cnmon_memory({"rc": 0, "stdout": table})
    assert memory["read"] is False
    assert memory["error"] == "cnmon shows no memory size for device(s) 1"


@pytest.mark.parametrize(("weight", "per", "need"), [
    (26_500_000_000, 2, 13_250_000_000 + RESERVE),
    (26_500_000_000, 1, 26_500_000_000 + RESERVE),
    (13_900_000_000, 1, 13_900_000_000 + RESERVE),
    (10, 3, 4 + RESERVE),  # rounded up: no byte of a shard left out
])
def test_per_device_need(weight, per, need):
    assert pf.preflight_per_device_need(weight, per, RESERVE) == need


def test_13b_on_two_x8_chips_fits_and_7b_on_one(tmp_path):
    answer = weigh([23374] * 16, [A13B, A7B], tmp_path)
    assert answer["state"] == "checked" and answer["ok"] and answer["message"] == ""
    assert answer["usable_bytes"] == 22_058_473_881  # floor(0.9 x 23374 MiB)
    assert answer["smallest"] == {"index": 0, "memory_mib": 23374}
    a13, a7 = answer["models"]
    assert (a13["need_bytes"], a13["replicas"], a13["devices_that_fit"]) == (15_397_483_648, 8, 2)
    assert (a7["need_bytes"], a7["replicas"], a7["devices_that_fit"]) == (16_047_483_648, 16, 1)
    assert pf.preflight_device_memory_summary(answer) == (
        "16 device(s) of 23374 MiB (chinese-alpaca-2-13b: 8 replica(s) of 2 device(s), "
        "chinese-alpaca-2-7b: 16 replica(s) of 1 device(s))")


def test_13b_on_one_device_is_refused_with_the_numbers_and_the_split_that_fits(tmp_path):
    answer = weigh([23374, 23374], [{**A13B, "devices_per_replica": 1}], tmp_path)
    assert answer["state"] == "checked" and not answer["ok"]
    message = answer["message"]
    assert message.startswith("the devices cannot hold the models: chinese-alpaca-2-13b (26500000000 bytes = 24.7 GiB")
    assert "on 1 device(s) per replica needs 28647483648 bytes = 26.7 GiB per device" in message
    assert "reserve 2147483648 bytes = 2.0 GiB" in message
    assert "the smallest device (index 0, 23374 MiB) offers 22058473881 bytes = 20.5 GiB at usable fraction 0.9" in message
    assert "set devices_per_replica to 2 for chinese-alpaca-2-13b (more devices per replica: 15397483648 bytes" in message
    assert "1 replica(s) on this host), or use a smaller model" in message
    assert message.endswith("override preflight_ignore_device_memory)")


def test_the_smallest_device_decides(tmp_path):
    # one chip of the pair reports much less memory: it is named, and 2 devices per replica no longer fit
    answer = weigh([23374, 8192], [A13B], tmp_path)
    assert not answer["ok"]
    assert answer["smallest"] == {"index": 1, "memory_mib": 8192}
    message = answer["message"]
    assert "the smallest device (index 1, 8192 MiB) offers 7730941132 bytes" in message
    assert "needs 15397483648 bytes = 14.3 GiB per device" in message
    # 26.5e9 / (7730941132 - 2 GiB) = 4.75: 5 devices would do, the host has 2
    assert "no split over this host's 2 device(s) fits, it would take 5 devices per replica" in message
    assert "use a smaller model" in message


def test_more_devices_per_replica_than_the_host_has(tmp_path):
    answer = weigh([23374, 23374], [{**A7B, "devices_per_replica": 4}], tmp_path)
    assert not answer["ok"]
    model = answer["models"][0]
    assert model["fits_memory"] and not model["fits_count"]
    assert "on 4 device(s) per replica" in answer["message"]
    assert "but the host has only 2 device(s) (cnmon)" in answer["message"]
    assert "set devices_per_replica to 1 for chinese-alpaca-2-7b (fewer devices per replica" in answer["message"]


def test_every_problem_in_one_message(tmp_path):
    answer = weigh([8192, 8192], [A13B, A7B], tmp_path)
    assert not answer["ok"]
    assert answer["message"].count("device(s) per replica needs") == 2
    assert "it would take 5 devices per replica" in answer["message"]  # 13B
    assert "it would take 3 devices per replica" in answer["message"]  # 7B


def test_boundary_is_inclusive(tmp_path):
    usable = pf.preflight_device_memory(pf.preflight_cnmon_memory(cnmon(tmp_path, [23374])), [], 0, 0.9)["usable_bytes"]
    at = {"name": "edge", "weight_bytes": usable - RESERVE, "devices_per_replica": 1}
    assert weigh([23374], [at], tmp_path)["ok"]
    assert not weigh([23374], [{**at, "weight_bytes": usable - RESERVE + 1}], tmp_path)["ok"]


def test_reserve_that_fills_the_device(tmp_path):
    answer = weigh([4096], [A7B], tmp_path, reserve=4 * GIB)
    assert not answer["ok"]
    assert answer["models"][0]["devices_that_fit"] is None
    assert "the reserve alone fills a 4096 MiB device: lower preflight_device_memory_reserve_bytes" in answer["message"]


def test_no_models_no_gate(tmp_path):
    answer = weigh([23374, 23374], [], tmp_path)
    assert answer["state"] == "not_required" and answer["ok"] and answer["message"] == ""
    assert pf.preflight_device_memory_summary(answer) == (
        "2 device(s) of 23374 MiB (preflight_models is empty: no memory gate)")


def test_unknown_memory_is_a_notice_before_the_driver_and_a_problem_after():
    absent = pf.preflight_cnmon_memory({"rc": 127, "stdout": "", "stderr": ""})
    before = pf.preflight_device_memory(absent, [A13B], RESERVE, 0.9, False)
    assert before["state"] == "unknown" and before["ok"] and before["message"] == ""
    assert before["notice"].startswith("device memory unknown yet: cnmon not found on the host")
    assert "Not checked until the driver is installed: the gate right after mlu_driver" in before["notice"]
    assert "chinese-alpaca-2-13b needs 15397483648 bytes = 14.3 GiB on each of 2 device(s) per replica" in before["notice"]
    assert pf.preflight_device_memory_summary(before) == (
        "device memory unknown yet: cnmon not found on the host (it comes with the MLU driver)")

    after = pf.preflight_device_memory(absent, [A13B], RESERVE, 0.9, True)
    assert after["state"] == "unknown" and not after["ok"] and after["notice"] == ""
    assert after["message"].startswith("device memory unknown: cnmon not found on the host")
    assert "override preflight_ignore_device_memory" in after["message"]
    # nothing to weigh: unknown memory is no problem
    assert pf.preflight_device_memory(absent, [], RESERVE, 0.9, True)["ok"]


@pytest.mark.parametrize(("models", "reserve", "fraction", "error"), [
    ([{**A13B, "devices_per_replica": 0}], RESERVE, 0.9, "chinese-alpaca-2-13b has devices_per_replica 0: it must be 1 or more"),
    ([{**A13B, "weight_bytes": 0}], RESERVE, 0.9, "chinese-alpaca-2-13b has weight_bytes 0"),
    ([A13B], RESERVE, 1.5, "preflight_device_memory_usable_fraction is 1.5: it must be above 0 and at most 1"),
    ([A13B], RESERVE, 0, "preflight_device_memory_usable_fraction is 0"),
    ([A13B], -1, 0.9, "preflight_device_memory_reserve_bytes is -1: it must be 0 or more"),
])
def test_bad_settings_are_refused_even_before_the_driver(models, reserve, fraction, error):
    absent = pf.preflight_cnmon_memory({"rc": 127})
    with pytest.raises(ValueError, match=re.escape(error)):
        pf.preflight_device_memory(absent, models, reserve, fraction)
