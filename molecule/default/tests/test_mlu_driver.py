"""mlu_driver on a provisioned host: the package version, cnmon's cards, module and device nodes.

Runs in the default scenario's verify (the test-only driver package: simulated cards, no module) and
unchanged against real servers:
    pytest --hosts=ansible://mlu-hosts --ansible-inventory=inventory/production molecule/default/tests
where it also checks the loaded module and counts /dev/cambricon_dev* nodes.
The parser is the role's own (plugins/filter/cnmon.py), so what passes here is what
the role accepts.
"""

from __future__ import annotations

import importlib.util

import pytest
from _infra import ROOT, role_var

_spec = importlib.util.spec_from_file_location(
    "cla2_cnmon", ROOT / "plugins/filter/cnmon.py"
)
cnmon = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cnmon)


def installed_driver_packages(host) -> dict[str, str]:
    prefix = role_var(host, "mlu_driver_package_name")
    if host.exists("dpkg-query"):
        out = host.run(
            f"dpkg-query -W -f '${{Package}} ${{Version}} ${{db:Status-Status}}\\n' '{prefix}*'"
        ).stdout
        rows = [line.split() for line in out.splitlines()]
        pkgs = {r[0]: r[1] for r in rows if len(r) == 3 and r[2] == "installed"}
    else:
        out = host.run(f"rpm -qa --qf '%{{NAME}} %{{VERSION}}\\n' '{prefix}*'").stdout
        pkgs = dict(line.split() for line in out.splitlines() if line.strip())
    return {name: ver for name, ver in pkgs.items() if name == prefix or name.startswith(prefix + "-")}


def test_driver_package_has_the_wanted_version(host):
    packages = installed_driver_packages(host)
    assert packages, f"no {role_var(host, 'mlu_driver_package_name')} package installed"
    assert set(packages.values()) == {str(role_var(host, "mlu_driver_version"))}, packages


def test_staged_package_was_removed(host):
    if role_var(host, "mlu_driver_keep_package"):
        pytest.skip("mlu_driver_keep_package is true")
    staging = str(role_var(host, "mlu_driver_staging_dir"))
    left = host.run(f"ls {staging}/*.deb {staging}/*.rpm 2>/dev/null; true").stdout.split()
    assert left == []


def test_cnmon_reports_every_card_healthy(host):
    result = host.run(role_var(host, "mlu_driver_cnmon_path"))
    assert result.rc == 0, result.stderr
    health = cnmon.mlu_driver_cnmon_health(
        result.stdout,
        role_var(host, "mlu_driver_max_ecc_errors"),
        role_var(host, "mlu_driver_cnmon_fault_markers"),
    )
    assert health["driver_version"] == str(role_var(host, "mlu_driver_version"))
    expected = int(role_var(host, "mlu_driver_expected_devices"))
    if expected >= 0:
        assert len(health["cards"]) == expected, [c["bus_id"] for c in health["cards"]]
    assert health["cards"], "cnmon lists no card"
    assert health["summary"] == []
    assert [c["index"] for c in health["cards"]] == list(range(len(health["cards"])))


def test_kernel_module_is_loaded(host):
    if not role_var(host, "mlu_driver_load_module"):
        pytest.skip("mlu_driver_load_module is false (sandbox host)")
    modules = host.run("cut -d' ' -f1 /proc/modules").stdout.split()
    assert role_var(host, "mlu_driver_module_name") in modules


def test_device_nodes(host):
    if not role_var(host, "mlu_driver_wait_for_device"):
        pytest.skip("mlu_driver_wait_for_device is false (sandbox host)")
    ctl = host.file(role_var(host, "mlu_driver_device_path"))
    assert ctl.exists and ctl.is_character_device
    nodes = host.run("ls -1 /dev/cambricon_dev[0-9]* 2>/dev/null; true").stdout.split()
    expected = int(role_var(host, "mlu_driver_expected_devices"))
    if expected >= 0:
        assert len(nodes) == expected, nodes


# --- the parser itself, on tables in the formats cnmon prints (written for these tests)

V5 = """Thu Nov 26 09:12:03 2026
+------------------------------------------------------------------------------+
| CNMON v5.10.29                                               Driver v5.10.29 |
+-------------------------------+----------------------+-----------------------+
| Card  VF  Name       Firmware |               Bus-Id | Util        Ecc-Error |
| Fan   Temp      Pwr:Usage/Cap |         Memory-Usage | Mode     Compute-Mode |
|===============================+======================+=======================|
| 0     /   MLU370-X8    v1.1.6 |         0000:1A:00.0 | 3%                  0 |
|  0%   36C        110 W/ 250 W |  1024 MiB/ 23374 MiB | FULL          Default |
+-------------------------------+----------------------+-----------------------+
| 1     /   MLU370-X8    v1.1.6 |         0000:1C:00.0 | 0%                N/A |
|  0%   38C        104 W/ 250 W |     0 MiB/ 23374 MiB | FULL          Default |
+-------------------------------+----------------------+-----------------------+
| 2     /   MLU370-X8    v1.1.6 |         0000:3D:00.0 | ERR!                7 |
|  0%   39C        101 W/ 250 W |     0 MiB/ 23374 MiB | FULL          Default |
+-------------------------------+----------------------+-----------------------+

+------------------------------------------------------------------------------+
| Processes:                                                                   |
|  Card  MI  PID     Command Line                             MLU Memory Usage |
|==============================================================================|
|    0    /  4121    python train.py                                  1024 MiB |
+------------------------------------------------------------------------------+
"""

V4 = """+------------------------------------------------------------------------------+
| CNMON v4.20.18                                                               |
+-------------------------------+----------------------+-----------------------+
| Card  VF  Name       Firmware | Inited        Driver | Util        Ecc-Error |
| Fan   Temp      Pwr:Usage/Cap |         Memory-Usage |         vMemory-Usage |
|===============================+======================+=======================|
| 0     /   MLU370-X8    v1.1.4 | On          v4.20.18 | 0%          N/A       |
|  0%   30C         62 W/ 250 W |     0 MiB/ 23374 MiB | 10240 MiB/1048576 MiB |
+-------------------------------+----------------------+-----------------------+
| 1     /   MLU370-X8    v1.1.4 | Off         v4.20.18 | 0%          N/A       |
|  0%   31C         60 W/ 250 W |     0 MiB/ 23374 MiB | 10240 MiB/1048576 MiB |
+-------------------------------+----------------------+-----------------------+
"""


def test_parser_reads_cards_versions_and_memory():
    parsed = cnmon.mlu_driver_cnmon_cards(V5)
    assert parsed["driver_version"] == "5.10.29"
    assert [c["bus_id"] for c in parsed["cards"]] == ["0000:1A:00.0", "0000:1C:00.0", "0000:3D:00.0"]
    assert parsed["cards"][0]["memory_used_mib"] == 1024
    assert parsed["cards"][0]["memory_total_mib"] == 23374
    assert parsed["cards"][0]["name"] == "MLU370-X8"


def test_parser_names_only_the_unhealthy_card():
    health = cnmon.mlu_driver_cnmon_health(V5)
    assert [bad["index"] for bad in health["unhealthy"]] == [2]
    assert health["summary"] == [
        "card 2 (MLU370-X8 at 0000:3D:00.0): 7 ECC errors (allowed 0); cnmon reads ERR!"
    ]
    assert cnmon.mlu_driver_cnmon_health(V5, max_ecc_errors=10, fault_markers=[])["unhealthy"] == []


def test_parser_reads_the_v4_layout():
    health = cnmon.mlu_driver_cnmon_health(V4)
    assert health["driver_version"] == "4.20.18"
    assert len(health["cards"]) == 2
    assert health["summary"] == ["card 1 (MLU370-X8 at ?): not initialised (Inited Off)"]


def test_parser_finds_no_card_in_an_error_message():
    assert cnmon.mlu_driver_cnmon_cards("cnmon: no MLU device found\n")["cards"] == []
