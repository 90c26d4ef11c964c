"""Failure paths of preflight and mlu_driver: every bad input is refused with a clear error before
anything changes. CASES is the table (role, variables, expected error, what must be unchanged); the
tests after it are the good runs the cases are measured against: the support gate on the sandbox's own
Debian 12, check mode on a fresh host, the gates passing or turned into warnings, a driver installed
from a URL, half-installed packages repaired, and a driver change that drains, reboots and waits.

Runs in molecule's verify only: each run of a role is one ansible-playbook run against the scenario's
host (molecule/resources/failure_cases.py), on the host converge.yml set up. Every case states the host
it starts from (`needs`): the driver absent or installed, the simulated cards' state, a fake sysfs.
Only mlu_driver's plays gather facts (it reads the OS family from them); preflight gathers the few its
gates read itself, after its support probe, as in provision.yml's first play.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from failure_cases import FIXTURES, Case, ansible_playbook, passed, run_case

SCENARIO = Path(__file__).resolve().parents[1]
FACT = "/etc/ansible/facts.d/cla2_mlu_pci.fact"
FAKE_OS = "/usr/local/lib/cla2-test/fake-os"  # converge.yml
FAKE_SYSFS = "/tmp/cla2-fake-sysfs"
DRIVER_DEB = f"{FIXTURES}/cambricon-mlu-driver_5.10.22_amd64.deb"
MIRROR_URL = "file:///srv/mirror/cambricon-mlu-driver_5.10.22_amd64.deb"
TOO_MUCH_DISK = 1125899906842624
# A container shares its host's boot_id; the start time of its PID 1 changes when it boots again.
BOOT_TIME = "cut -d ' ' -f 22 /proc/1/stat"
PENDING = "/var/lib/cla2/mlu_driver-activation-pending"
EVENTS = "/var/lib/cla2-test/events"
ALL_PROBLEMS = "Fail once with every problem found"
MEMORY_GATE = "Fail when the devices cannot hold the models"
REBOOTS = {"mlu_driver_reboot_allowed": True, "mlu_driver_reboot_timeout": 300,
           "mlu_driver_reboot_boot_time_command": BOOT_TIME}
HEALTHY = ("0 MLU370-X8 v1.1.6 0000:3B:00.0 0 ok 23374", "1 MLU370-X8 v1.1.6 0000:3D:00.0 0 ok 23374")


def driver_status(host) -> str:
    return host.run("dpkg-query -W -f '${Status}|${Version}' cambricon-mlu-driver").stdout


def boot_time(host) -> str:
    return host.check_output(BOOT_TIME)


# ---- the host a case starts from -----------------------------------------------------------------


def driver_absent(host) -> None:
    """No driver package (purged, with its cards.conf, so that the next install starts from the fixture's)."""
    host.check_output("dpkg --purge cambricon-mlu-driver")


def untouched_host(host) -> None:
    """A host the roles never touched: no driver, no preflight facts script."""
    driver_absent(host)
    host.check_output(f"rm -f {FACT}")


def driver_installed(host) -> None:
    """The sandbox's driver installed as mlu_driver installs it, both simulated cards healthy."""
    if driver_status(host) != "install ok installed|5.10.22":
        passed("mlu_driver", gather_facts=True)
    cards(*HEALTHY)(host)


def cards(*lines: str):
    """Set the simulated cards' lines of /etc/cambricon-sim/cards.conf (index first), as cnmon reads them."""
    def setup(host) -> None:
        for line in lines:
            host.check_output(f"sed -i 's/^{line.split()[0]} .*/{line}/' /etc/cambricon-sim/cards.conf")
    return setup


def fake_sysfs(good: int, dropped: int):
    """A fake sysfs PCI tree with GOOD answering MLU devices and DROPPED ones (files/make-fake-sysfs.sh)."""
    def setup(host) -> None:
        host.check_output(f"/usr/local/lib/cla2-test/make-fake-sysfs.sh {FAKE_SYSFS} {good} {dropped}")
    return setup


# ---- what must be unchanged ----------------------------------------------------------------------


def nothing_installed(host, _outcome=None) -> None:
    """A failed (or check mode) mlu_driver run left no driver package and no staged copy."""
    status = host.run("dpkg-query -W -f '${Status}' cambricon-mlu-driver")
    assert status.rc != 0 or "not-installed" in status.stdout or "config-files" in status.stdout, status.stdout
    staged = host.run("find /var/cache/cla2/mlu_driver -name '*.deb'").stdout.split()
    assert staged == [], f"staged: {staged}"


def pending_marker_left(host, _outcome) -> None:
    assert host.file(PENDING).exists, "no marker of the driver not activated yet"


CASES = [
    # --- role variables: argument_specs and the undeclared-name check, on a host the roles never touched
    Case("misspelt_preflight_variable", "preflight", {"preflight_expected_device": 16},
         expect=["unknown variable(s) preflight_expected_device:", "misspelt"],
         needs=[untouched_host], absent=[FACT]),
    Case("mistyped_preflight_variable", "preflight", {"preflight_expected_devices": "sixteen"},
         argument_errors=["preflight_expected_devices", "int"], needs=[untouched_host], absent=[FACT]),
    Case("misspelt_preflight_models_key", "preflight", tasks_from="device_memory",
         vars={"preflight_models": [
             {"name": "chinese-alpaca-2-13b", "weight_bytes": 26500000000, "devices_per_replicas": 2}]},
         argument_errors=["^missing required arguments: devices_per_replica found in preflight_models$",
                          "preflight_models.devices_per_replicas"],
         needs=[untouched_host], absent=[FACT]),
    # --- the support gate (roles/preflight/vars/support_matrix.yml) on the fake os-release files
    Case("os_refused_centos7", "preflight", {"preflight_os_release_path": f"{FAKE_OS}/centos7"},
         task=ALL_PROBLEMS,
         expect=["preflight found 1 problem(s)",
                 "CentOS Linux 7 (Core) (os-release ID centos, VERSION_ID 7) is CentOS 7 / RHEL 7, which this kit cannot manage",
                 "it has yum but no dnf", "June 2024. Reinstall the host with a supported OS",
                 "See docs/support.md; no override"],
         needs=[untouched_host], absent=[FACT]),
    Case("python_too_old_ubuntu1804", "preflight",
         {"preflight_os_release_path": f"{FAKE_OS}/ubuntu1804", "ansible_python_interpreter": f"{FAKE_OS}/python3.6"},
         task="Refuse a host whose Python cannot run Ansible's modules (no fact gathered, nothing changed)",
         expect=["before gathering facts, nothing was changed: 2 problem(s)",
                 "is Ubuntu 18.04 (bionic), which this kit cannot manage: its python3 is 3.6",
                 f"[2] target Python 3.6.9 ({FAKE_OS}/python3.6) is older than 3.8",
                 "upgrade the host to Ubuntu 22.04 or 20.04"],
         needs=[untouched_host], absent=[FACT]),
    Case("support_entry_python_too_old", "preflight", tasks_from="support",
         vars={"preflight_os_release_path": f"{FAKE_OS}/ubuntu1804",
               "ansible_python_interpreter": f"{FAKE_OS}/python3.6"},
         expect=["before gathering facts, nothing was changed: 2 problem(s)", "target Python 3.6.9"],
         needs=[untouched_host], absent=[FACT]),
    Case("os_without_code_path", "preflight",
         {"preflight_os_release_path": f"{FAKE_OS}/opensuse", "preflight_ignore_os": True},
         task=ALL_PROBLEMS,
         expect=["openSUSE Leap 15.5 (os-release ID opensuse-leap, VERSION_ID 15.5) is not in the support matrix",
                 "apt (Debian family) or dnf (RedHat family) only"],
         needs=[untouched_host], absent=[FACT]),
    Case("os_not_in_matrix", "preflight", {"preflight_os_release_path": f"{FAKE_OS}/debian13"},
         expect=["UNSUPPORTED OS: Debian GNU/Linux 13 (trixie) (os-release ID debian, VERSION_ID 13) is not in the support matrix",
                 "set preflight_ignore_os: true to run anyway"],
         needs=[untouched_host], absent=[FACT]),
    Case("misspelt_mlu_driver_variable", "mlu_driver", {"mlu_driver_reboot_alowed": True},
         expect=["unknown variable(s) mlu_driver_reboot_alowed:"],
         needs=[driver_absent], check=nothing_installed, gather_facts=True),
    Case("mistyped_mlu_driver_variable", "mlu_driver", {"mlu_driver_reboot_allowed": "perhaps"},
         argument_errors=["mlu_driver_reboot_allowed", "bool"],
         needs=[driver_absent], check=nothing_installed, gather_facts=True),
    # --- preflight gates (no driver: the device memory is unknown)
    Case("wrong_card_count", "preflight", {"preflight_expected_devices": 16},
         expect=["preflight found 1 problem(s)", "expected 16 MLU devices (PCI vendor 0xcabc) but found 0"],
         needs=[driver_absent]),
    Case("dropped_device", "preflight", {"preflight_sysfs_root": FAKE_SYSFS, "preflight_expected_devices": 16},
         expect=["preflight found 2 problem(s)", "expected 16 MLU devices (PCI vendor 0xcabc) but found 15",
                 "dropped PCI device(s), config space reads as all ones: 0000:80:00.0"],
         needs=[driver_absent, fake_sysfs(15, 1)]),
    Case("device_memory_unknown_after_driver", "preflight", {}, tasks_from="device_memory",
         task=MEMORY_GATE,
         expect=["device memory unknown: cnmon not found on the host",
                 "chinese-alpaca-2-13b needs 15397483648 bytes = 14.3 GiB on each of 2 device(s) per replica",
                 "preflight_ignore_device_memory"],
         needs=[driver_absent]),
    Case("disk_too_small", "preflight", {"preflight_required_free_bytes": TOO_MUCH_DISK},
         expect=["free space under /data", "needs 1024.0 TiB (1125899906842624 bytes)"],
         needs=[driver_absent]),
    Case("all_problems_at_once", "preflight",
         {"preflight_os_release_path": f"{FAKE_OS}/debian13", "preflight_expected_devices": 16,
          "preflight_required_free_bytes": TOO_MUCH_DISK, "preflight_kernel_headers_required": True},
         task=ALL_PROBLEMS,
         expect=["preflight found 4 problem(s)", "UNSUPPORTED OS: Debian GNU/Linux 13 (trixie)",
                 "expected 16 MLU devices", "free space under /data", "kernel headers for the running kernel"],
         needs=[driver_absent]),
    # --- mlu_driver package source
    Case("driver_file_missing", "mlu_driver",
         {"mlu_driver_package_file": "/nonexistent/cambricon-mlu-driver_5.10.22_amd64.deb"},
         expect=["driver package file /nonexistent/cambricon-mlu-driver_5.10.22_amd64.deb not found on the controller"],
         needs=[driver_absent], check=nothing_installed, gather_facts=True),
    Case("driver_checksum_mismatch", "mlu_driver", {"mlu_driver_package_checksum": "sha256:" + "0" * 64},
         expect=[f"checksum mismatch for driver package file {DRIVER_DEB}", "expected sha256:" + "0" * 64],
         needs=[driver_absent], check=nothing_installed, gather_facts=True),
    Case("driver_url_checksum_mismatch", "mlu_driver",
         {"mlu_driver_package_file": "", "mlu_driver_package_url": MIRROR_URL,
          "mlu_driver_package_checksum": "sha256:" + "f" * 64},
         expect=[f"could not get driver package {MIRROR_URL}", "checksum"],
         needs=[driver_absent], check=nothing_installed, gather_facts=True),
    # --- mlu_driver health (the driver installed, its simulated cards as cnmon reports them)
    Case("unhealthy_card", "mlu_driver", {},
         expect=["unhealthy card 1 (MLU370-X8 at 0000:3D:00.0): 3 ECC errors (allowed 0)"], not_expect=["card 0"],
         needs=[driver_installed, cards("1 MLU370-X8 v1.1.6 0000:3D:00.0 3 ok 23374")], gather_facts=True),
    Case("two_unhealthy_cards", "mlu_driver", {},
         expect=["unhealthy card 0 (MLU370-X8 at 0000:3B:00.0): cnmon reads ERR!",
                 "unhealthy card 1 (MLU370-X8 at 0000:3D:00.0)"],
         needs=[driver_installed, cards("0 MLU370-X8 v1.1.6 0000:3B:00.0 0 fault 23374",
                                        "1 MLU370-X8 v1.1.6 0000:3D:00.0 3 ok 23374")], gather_facts=True),
    Case("cnmon_card_count", "mlu_driver", {"mlu_driver_expected_devices": 16},
         expect=["cnmon reports 2 cards, expected 16"], needs=[driver_installed], gather_facts=True),
    Case("driver_file_holds_another_version", "mlu_driver", {"mlu_driver_version": "5.10.99"},
         expect=["reports version '5.10.22', but mlu_driver_version is 5.10.99"],
         needs=[driver_installed], gather_facts=True),
    # --- device memory read from cnmon: the sandbox's preflight_models is 13B fp16 on 2 devices
    Case("device_memory_too_small", "preflight", {}, task=ALL_PROBLEMS,
         expect=["preflight found 1 problem(s)", "chinese-alpaca-2-13b (26500000000 bytes = 24.7 GiB of weights)",
                 "on 2 device(s) per replica needs 15397483648 bytes = 14.3 GiB per device",
                 "the smallest device (index 1, 8192 MiB) offers 7730941132 bytes = 7.2 GiB at usable fraction 0.9",
                 "it would take 5 devices per replica", "use a smaller model",
                 "override preflight_ignore_device_memory"],
         needs=[driver_installed, cards("1 MLU370-X8 v1.1.6 0000:3D:00.0 0 ok 8192")]),
    Case("device_memory_too_small_after_driver", "preflight", {}, tasks_from="device_memory", task=MEMORY_GATE,
         expect=["(device memory, read after mlu_driver)", "needs 15397483648 bytes = 14.3 GiB per device",
                 "the smallest device (index 1, 8192 MiB)"],
         needs=[driver_installed, cards("1 MLU370-X8 v1.1.6 0000:3D:00.0 0 ok 8192")]),
    Case("device_memory_too_few_devices", "preflight",
         {"preflight_models": [{"name": "chinese-alpaca-2-7b", "weight_bytes": 13900000000, "devices_per_replica": 4}]},
         expect=["chinese-alpaca-2-7b (13900000000 bytes = 12.9 GiB of weights) on 4 device(s) per replica",
                 "but the host has only 2 device(s) (cnmon)",
                 "set devices_per_replica to 1 for chinese-alpaca-2-7b (fewer devices per replica"],
         needs=[driver_installed]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_before_anything_changes(case: Case, host, request) -> None:
    run_case(case, host, request)


# ---- the good runs -------------------------------------------------------------------------------


def test_support_gate_passes_on_the_sandbox_debian_12(host) -> None:
    """The sandbox is the matrix's tested Debian 12, and the support entry point installs nothing."""
    untouched_host(host)
    support = passed("preflight", tasks_from="support", facts=["preflight_support"])["preflight_support"]
    assert support["ok"] and support["python_usable"], support
    assert support["entry"]["name"] == "Debian 12 (bookworm)" and support["entry"]["tested"] == "sandbox", support
    assert support["notes"] == [], support
    assert not host.file(FACT).exists


def test_check_mode_installs_nothing_and_says_the_memory_is_unknown(host) -> None:
    """Both roles, and the device memory gate after mlu_driver, pass in check mode on a host without the
    driver (check-mode.yml), install nothing, and say the device memory is unknown yet, once each."""
    driver_absent(host)
    res = ansible_playbook(SCENARIO / "check-mode.yml", "--check")
    assert res.returncode == 0 and "failed=0" in res.stdout, res.stdout + res.stderr
    # one notice from preflight, one from the gate after mlu_driver (the callback may wrap the rest)
    assert len(re.findall("preflight NOTE. device memory unknown yet", res.stdout)) == 2, res.stdout
    assert "preflight device memory:" not in res.stdout, res.stdout
    nothing_installed(host)


def test_preflight_counts_16_answering_devices_not_the_virtual_function(host) -> None:
    driver_absent(host)
    fake_sysfs(16, 0)(host)
    facts = passed("preflight", {"preflight_sysfs_root": FAKE_SYSFS, "preflight_expected_devices": 16},
                   facts=["preflight_pci", "preflight_problems", "preflight_device_memory"])
    assert facts["preflight_pci"]["count"] == 16 and facts["preflight_pci"]["dropped"] == [], facts
    assert facts["preflight_problems"] == [], facts
    # no driver yet: the memory of the sandbox's preflight_models is unknown, said and not failed
    memory = facts["preflight_device_memory"]
    assert memory["state"] == "unknown" and memory["ok"], memory
    assert "cnmon not found on the host" in memory["notice"], memory
    assert memory["models"][0]["need_bytes"] == 15397483648, memory


def test_overrides_turn_every_problem_into_a_warning(host) -> None:
    driver_absent(host)
    facts = passed("preflight", {
        "preflight_os_release_path": f"{FAKE_OS}/debian13", "preflight_expected_devices": 16,
        "preflight_required_free_bytes": TOO_MUCH_DISK, "preflight_kernel_headers_required": True,
        "preflight_ignore_os": True, "preflight_ignore_device_count": True, "preflight_ignore_disk_space": True,
        "preflight_ignore_kernel_headers": True}, facts=["preflight_problems", "preflight_warnings"])
    assert facts["preflight_problems"] == [], facts
    assert len(facts["preflight_warnings"]) == 4, facts
    assert re.match("UNSUPPORTED OS. Debian GNU/Linux 13", facts["preflight_warnings"][0]), facts


def test_driver_installs_from_a_url_with_the_right_checksum(host) -> None:
    driver_absent(host)
    checksum = host.check_output("sha256sum /srv/mirror/cambricon-mlu-driver_5.10.22_amd64.deb").split()[0]
    facts = passed("mlu_driver", {"mlu_driver_package_file": "", "mlu_driver_package_url": MIRROR_URL,
                                  "mlu_driver_package_checksum": f"sha256:{checksum}"},
                   facts=["mlu_driver_changed", "mlu_driver_installed_version", "mlu_driver_health"], gather_facts=True)
    assert facts["mlu_driver_changed"] and facts["mlu_driver_installed_version"] == "5.10.22", facts
    assert len(facts["mlu_driver_health"]["cards"]) == 2 and facts["mlu_driver_health"]["unhealthy"] == [], facts


def test_device_memory_override_turns_the_refusal_into_a_warning(host) -> None:
    driver_installed(host)
    cards("1 MLU370-X8 v1.1.6 0000:3D:00.0 0 ok 8192")(host)
    facts = passed("preflight", {"preflight_ignore_device_memory": True},
                   facts=["preflight_problems", "preflight_warnings"])
    assert facts["preflight_problems"] == [] and len(facts["preflight_warnings"]) == 1, facts
    assert "the smallest device (index 1, 8192 MiB)" in facts["preflight_warnings"][0], facts


def test_both_memory_gates_pass_on_devices_that_hold_the_models(host) -> None:
    """13B on 2 devices per replica, both at 23374 MiB: preflight and the gate after mlu_driver weigh the
    memory read from cnmon and pass."""
    driver_installed(host)
    assert passed("preflight", facts=["preflight_problems"])["preflight_problems"] == []
    memory = passed("preflight", tasks_from="device_memory", facts=["preflight_device_memory"])["preflight_device_memory"]
    assert memory["state"] == "checked" and memory["ok"] and memory["device_count"] == 2, memory
    assert memory["smallest"]["memory_mib"] == 23374 and memory["usable_bytes"] == 22058473881, memory
    assert memory["models"][0]["need_bytes"] == 15397483648 and memory["models"][0]["replicas"] == 1, memory


@pytest.mark.parametrize("half_status", ["install ok half-configured", "install reinstreq half-installed"])
def test_half_installed_driver_is_repaired(host, half_status: str) -> None:
    """A package dpkg leaves half done (a failed DKMS build in its postinst, a failed unpack) still reports
    its version: mlu_driver must see through it, say so, and reinstall until dpkg says installed."""
    driver_installed(host)
    host.check_output(
        f"perl -0pi -e 's/(Package: cambricon-mlu-driver\\nStatus: )[^\\n]+/${{1}}{half_status}/' /var/lib/dpkg/status")
    assert driver_status(host) == f"{half_status}|5.10.22"
    facts = passed("mlu_driver", facts=["mlu_driver_changed", "mlu_driver__broken", "mlu_driver_health"],
                   gather_facts=True)
    assert facts["mlu_driver_changed"] and len(facts["mlu_driver__broken"]) == 1, facts
    assert f"cambricon-mlu-driver: {half_status}" in facts["mlu_driver__broken"][0], facts
    assert driver_status(host) == "install ok installed|5.10.22"
    assert facts["mlu_driver_health"]["unhealthy"] == [], facts


def test_installed_driver_is_recognised_and_its_file_never_looked_at(host) -> None:
    driver_installed(host)
    facts = passed("mlu_driver", facts=["mlu_driver_changed", "mlu_driver_health"], gather_facts=True)
    assert not facts["mlu_driver_changed"] and facts["mlu_driver_health"]["unhealthy"] == [], facts
    facts = passed("mlu_driver", {"mlu_driver_package_file": "/nonexistent/cambricon-mlu-driver_5.10.22_amd64.deb",
                                  "mlu_driver_package_checksum": "sha256:" + "0" * 64},
                   facts=["mlu_driver_changed"], gather_facts=True)
    assert not facts["mlu_driver_changed"], facts


# ---- reboot: when the driver changed and reboots are allowed, and only then; the host's service is
# drained first and waited for afterwards (fake drain and ready commands record the boot they ran in
# and, for ready, the try)


def plant(host, name: str, script: str) -> None:
    """An executable /usr/local/sbin/NAME holding SCRIPT."""
    path = f"/usr/local/sbin/{name}"
    host.check_output(f"printf '%s\\n' {shlex.quote(script)} > {path} && chmod 0755 {path}")


def test_driver_change_drains_reboots_and_waits_until_ready(host) -> None:
    plant(host, "cla2-serve-drain", f'#!/bin/sh\nmkdir -p /var/lib/cla2-test\necho "drain $({BOOT_TIME})" >> {EVENTS}')
    plant(host, "cla2-serve-ready",
          "#!/bin/sh\nn=$(( $(cat /var/lib/cla2-test/ready-tries 2>/dev/null || echo 0) + 1 ))\n"
          f'echo "$n" > /var/lib/cla2-test/ready-tries\necho "ready $({BOOT_TIME}) try $n" >> {EVENTS}\n'
          '[ "$n" -ge 2 ]')
    host.check_output("rm -rf /var/lib/cla2-test")
    driver_absent(host)
    before = boot_time(host)
    facts = passed("mlu_driver", {**REBOOTS, "mlu_driver_reboot_ready_timeout": 60, "mlu_driver_reboot_ready_delay": 2},
                   facts=["mlu_driver_changed", "mlu_driver_needs_activation", "mlu_driver_health"], gather_facts=True)
    after = boot_time(host)
    events = host.check_output(f"cat {EVENTS}").splitlines()
    assert facts["mlu_driver_changed"] and facts["mlu_driver_needs_activation"], facts
    assert after != before, "not rebooted"
    assert len(facts["mlu_driver_health"]["cards"]) == 2 and facts["mlu_driver_health"]["unhealthy"] == [], facts
    # drained once before the reboot, ready tried after it until it passed (its second try)
    assert events == [f"drain {before}", f"ready {after} try 1", f"ready {after} try 2"], events

    facts = passed("mlu_driver", {"mlu_driver_reboot_allowed": True, "mlu_driver_reboot_boot_time_command": BOOT_TIME},
                   facts=["mlu_driver_changed", "mlu_driver_needs_activation"], gather_facts=True)
    assert not facts["mlu_driver_changed"] and not facts["mlu_driver_needs_activation"], facts
    assert boot_time(host) == after, "an unchanged driver rebooted the host"
    assert len(host.check_output(f"cat {EVENTS}").splitlines()) == 3, "an unchanged driver drained the host"


DRAIN_FAILS = Case(
    "drain_fails_no_reboot", "mlu_driver", REBOOTS,
    expect=["the drain command /usr/local/sbin/cla2-serve-drain failed on ",
            "(rc 3): cla2-serve-drain: 3 requests still running after 120 s", "The host was NOT rebooted"],
    same=boot_time, check=pending_marker_left, gather_facts=True,
    needs=[lambda host: plant(host, "cla2-serve-drain", '#!/bin/sh\necho "cla2-serve-drain: 3 requests still '
                                                         'running after 120 s" >&2\nexit 3'),
           driver_absent])


def test_failed_drain_does_not_reboot_and_the_next_run_activates(host, request) -> None:
    """A drain that fails: no reboot, a clear error; the driver stays installed, and the next run (a host
    without the service now) reboots to activate it."""
    run_case(DRAIN_FAILS, host, request)
    failed_at = boot_time(host)
    host.check_output("rm -f /usr/local/sbin/cla2-serve-drain /usr/local/sbin/cla2-serve-ready")
    facts = passed("mlu_driver", REBOOTS, facts=["mlu_driver_changed", "mlu_driver_needs_activation", "mlu_driver_health"],
                   gather_facts=True)
    assert not facts["mlu_driver_changed"] and facts["mlu_driver_needs_activation"], facts
    assert boot_time(host) != failed_at, "not rebooted"
    assert not host.file(PENDING).exists
    assert facts["mlu_driver_health"]["unhealthy"] == [], facts
