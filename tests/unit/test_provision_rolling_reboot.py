"""playbooks/provision.yml activates the MLU driver as a rolling reboot (issue 14).

Play structure only (the sandbox scenarios run it): the driver is installed on every host at once, then
activated (drain, reboot, health, ready) provision_reboot_serial hosts at a time with a failed host stopping
the roll, then the rest of provisioning runs in the order it always had. The role alone still installs and
activates (tasks/main.yml), and every variable the activation reads is declared for the misspelt-name guard.
"""

from __future__ import annotations

from pathlib import Path

import yaml

KIT = Path(__file__).resolve().parents[2]
ROLE = KIT / "roles" / "mlu_driver"


def plays() -> list[dict]:
    return yaml.safe_load((KIT / "playbooks" / "provision.yml").read_text())


def imported(play: dict) -> list[str]:
    """role[:tasks_from] of every import_role/include_role in a play, in order."""
    out = []
    for task in play.get("tasks", []):
        for key in ("ansible.builtin.import_role", "ansible.builtin.include_role", "import_role", "include_role"):
            if key in task:
                spec = task[key]
                out.append(spec["name"] + (":" + spec["tasks_from"] if "tasks_from" in spec else ""))
    return out


def test_the_driver_is_installed_in_parallel_then_activated_host_by_host_then_the_rest():
    ps = plays()
    roles = [imported(p) for p in ps]
    install = next(i for i, r in enumerate(roles) if "mlu_driver:setup" in r)
    activate = next(i for i, r in enumerate(roles) if "mlu_driver:activate" in r)
    rest = next(i for i, r in enumerate(roles) if "preflight:device_memory" in r)
    assert install < activate < rest
    assert roles[install] == ["preflight", "mlu_driver:setup"]
    assert roles[activate] == ["mlu_driver:activate"]
    assert roles[rest] == ["preflight:device_memory", "container_engine", "container_image", "model_weights"]
    assert "serial" not in ps[install] and "serial" not in ps[rest]
    roll = ps[activate]
    assert roll["name"] == "Activate the driver, a rolling reboot"
    assert roll["serial"] == "{{ provision_reboot_serial | default(1) }}"
    assert roll["max_fail_percentage"] == 0
    assert roll["hosts"] == ps[install]["hosts"] == ps[rest]["hosts"]
    assert "mlu_driver" in roll["tasks"][0]["tags"]


def test_the_provision_report_is_started_before_the_driver_and_set_in_the_last_task():
    ps = plays()
    start = [t for p in ps for t in p.get("tasks", []) if "provision_report_start" in str(t.get("ansible.builtin.set_fact", ""))]
    assert len(start) == 1 and "always" in start[0]["tags"]
    last = ps[-1]["tasks"][-1]
    assert "always" in last["tags"]
    assert "provision_report" in last["block"][-1]["ansible.builtin.set_fact"]


def test_the_role_alone_installs_then_activates():
    main = yaml.safe_load((ROLE / "tasks" / "main.yml").read_text())
    assert [t["ansible.builtin.include_tasks"] for t in main] == ["setup.yml", "activate.yml"]
    activate = (ROLE / "tasks" / "activate.yml").read_text()
    assert activate.index("mlu_driver_reboot_drain_command") < activate.index("ansible.builtin.reboot:")
    assert activate.index("ansible.builtin.reboot:") < activate.index("health.yml") < activate.index(
        "mlu_driver_reboot_ready_command }}\"]")


def test_the_drain_and_ready_variables_are_declared_with_defaults_and_docs():
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    readme = (ROLE / "README.md").read_text()
    for name in ("mlu_driver_reboot_drain_command", "mlu_driver_reboot_ready_command",
                 "mlu_driver_reboot_ready_timeout", "mlu_driver_reboot_ready_delay"):
        assert name in defaults
        for entry in ("main", "setup", "activate"):
            assert name in specs[entry]["options"], (entry, name)
        assert f"`{name}`" in readme
    assert defaults["mlu_driver_reboot_drain_command"] == "/usr/local/sbin/cla2-serve-drain"
    assert defaults["mlu_driver_reboot_ready_command"] == "/usr/local/sbin/cla2-serve-ready"
    assert defaults["mlu_driver_reboot_ready_timeout"] == 900
