"""preflight on a provisioned host: the facts script is installed and reads sysfs right.

Runs in the default scenario's verify and unchanged against real servers:
    pytest --hosts=ansible://mlu-hosts --ansible-inventory=inventory/production molecule/default/tests
where the device count is the real one (16 on an 8-card MLU370-X8 server).
"""

from __future__ import annotations

import json
import shlex

import pytest
from _infra import role_var

FACT = "/etc/ansible/facts.d/cla2_mlu_pci.fact"


def run_fact(host, *args: str, env: str = "") -> dict:
    cmd = f"{env} {FACT} {' '.join(shlex.quote(a) for a in args)}".strip()
    result = host.run(cmd)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def test_facts_script_installed(host):
    fact = host.file(FACT)
    assert fact.is_file
    assert fact.user == "root"
    assert fact.mode == 0o755


def test_mlu_devices_on_pci_match_the_expected_count(host):
    report = run_fact(host)
    expected = int(role_var(host, "preflight_expected_devices"))
    if expected > 0:  # a server: its PCI bus must have been read (a sandbox VM may have none)
        assert report["error"] == ""
        assert report["scanned"] > expected, "too few PCI functions: the script read the wrong sysfs"
    assert report["count"] == expected, report["devices"]
    assert len(report["devices"]) == expected
    assert report["dropped"] == []


def test_mlu_devices_agree_with_sysfs(host):
    # An independent count: every PCI function whose vendor reads 0xcabc, less virtual functions.
    listed = host.run(
        'for d in /sys/bus/pci/devices/*; do [ -e "$d/physfn" ] && continue; '
        '[ "$(cat "$d/vendor" 2>/dev/null)" = 0xcabc ] && echo "${d##*/}"; done; true'
    ).stdout.split()
    report = run_fact(host)
    assert sorted(dev["address"] for dev in report["devices"]) == sorted(listed)


FAKE_SYSFS = r"""
set -e
root=$(mktemp -d /tmp/cla2-sysfs.XXXXXX)
add() { d="$root/bus/pci/devices/$1"; mkdir -p "$d"; echo "$2" > "$d/vendor"; echo 0x0370 > "$d/device";
        echo 0x120000 > "$d/class"; echo "$3" > "$d/numa_node"; printf "$4" > "$d/config"; }
add 0000:00:00.0 0x8086 0 '\206\200\127\015'
add 0000:3b:00.0 0xcabc 0 '\274\312\160\003'
add 0000:3d:00.0 0xCABC 1 '\274\312\160\003'
add 0000:3f:00.0 0xcabc 1 '\377\377\377\377'
add 0000:41:00.0 0xffff 1 '\377\377\377\377'
add 0000:3b:00.1 0xcabc 0 '\274\312\161\003'
ln -s ../0000:3b:00.0 "$root/bus/pci/devices/0000:3b:00.1/physfn"
echo "$root"
"""


@pytest.fixture
def fake_sysfs(host):
    root = host.run(FAKE_SYSFS).stdout.strip()
    assert root.startswith("/tmp/cla2-sysfs.")
    yield root
    host.run(f"rm -rf {shlex.quote(root)}")


def test_facts_script_counts_and_finds_dropped_devices_on_a_fake_sysfs(host, fake_sysfs):
    report = run_fact(host, env=f"CLA2_SYSFS_ROOT={fake_sysfs}")
    assert report["sysfs_root"] == fake_sysfs
    assert report["scanned"] == 6
    # 0000:3b:00.1 is a virtual function, 0000:3f and 0000:41 dropped (all-ones config / vendor).
    assert [dev["address"] for dev in report["devices"]] == ["0000:3b:00.0", "0000:3d:00.0"]
    assert report["count"] == 2
    assert report["devices"][1]["numa_node"] == 1
    assert sorted(report["dropped"]) == ["0000:3f:00.0", "0000:41:00.0"]


def test_facts_script_takes_root_and_vendor_as_arguments(host, fake_sysfs):
    assert run_fact(host, fake_sysfs)["count"] == 2
    other = run_fact(host, fake_sysfs, "0x8086")
    assert [dev["address"] for dev in other["devices"]] == ["0000:00:00.0"]


def test_facts_script_reports_a_missing_sysfs(host):
    report = run_fact(host, "/nonexistent-sysfs")
    assert report["count"] == 0
    assert "no PCI device directory" in report["error"]
