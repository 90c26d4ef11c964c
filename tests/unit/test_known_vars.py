"""The misspelt-variable guard (issue 16): one piece, cla2.mlu.known_vars, run first by all seven roles.

The pure check (plugins/module_utils/known_vars.py) and the action through ansible-playbook on a role made
here: an unknown name fails with the name and its closest declared one; internal names, names the role sets
itself and declared names of any entry point pass.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from kit_ansible import ansible_playbook

KIT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(KIT / "collections"))

from ansible_collections.cla2.mlu.plugins.module_utils import known_vars as kv

ROLES = ["preflight", "mlu_driver", "container_engine", "container_image", "model_weights", "runtime",
         "inference_service"]


def test_unknown_names_are_the_prefixed_public_undeclared_ones():
    given = ["demo_port", "demo_prot", "demo__internal", "demo_result", "other_x", "demo_zzz", "demo"]
    assert kv.unknown_vars(given, "demo_", ["demo_port"], ["demo_result"]) == ["demo_prot", "demo_zzz"]


def test_the_message_names_each_unknown_and_its_closest_declared_name():
    msg = kv.unknown_vars_message("demo", ["demo_prot", "demo_qqqqqqqq"], ["demo_port", "demo_host"],
                                  "roles/demo/meta/argument_specs.yml")
    assert msg.startswith("demo: unknown variable(s) demo_prot, demo_qqqqqqqq: misspelt? ")
    assert "demo_prot: did you mean demo_port?" in msg
    assert "demo_qqqqqqqq: no declared name is close" in msg
    assert msg.endswith("The role reads demo_host, demo_port (roles/demo/meta/argument_specs.yml)")


def test_names_set_by_tasks_are_found_in_nested_blocks():
    docs = [[{"block": [{"ansible.builtin.set_fact": {"demo_a": 1, "other": 2}}, {"register": "demo_b"}]},
             {"set_fact": {"demo_c": 3}}, {"register": "elsewhere"}]]
    assert kv.set_by_tasks(docs, "demo_") == {"demo_a", "demo_b", "demo_c"}


def test_options_of_every_entry_point_are_declared():
    specs = {"main": {"options": {"demo_a": {}}}, "other": {"options": {"demo_b": {}}}, "bare": {}}
    assert kv.declared_options(specs) == {"demo_a", "demo_b"}


@pytest.mark.parametrize("role", ROLES)
def test_every_role_runs_the_shared_guard_first(role):
    tasks = yaml.safe_load((KIT / "roles" / role / "tasks" / "main.yml").read_text())
    first = tasks[0]
    for key in ("ansible.builtin.import_tasks", "ansible.builtin.include_tasks"):  # preflight, mlu_driver
        if key in first:
            first = yaml.safe_load((KIT / "roles" / role / "tasks" / first[key]).read_text())[0]
    assert "cla2.mlu.known_vars" in first, f"{role}: first task is {first.get('name')}"


def test_no_role_keeps_a_copy_of_the_guard():
    for path in (KIT / "roles").glob("*/tasks/*.yml"):
        text = path.read_text()
        assert "varnames" not in text, f"{path.relative_to(KIT)} checks variable names itself"


def run_role(tmp_path: Path, role_vars: dict) -> subprocess.CompletedProcess:
    role = tmp_path / "roles" / "demo"
    (role / "meta").mkdir(parents=True)
    (role / "tasks").mkdir()
    (role / "meta" / "argument_specs.yml").write_text(yaml.safe_dump({"argument_specs": {
        "main": {"options": {"demo_port": {"type": "int", "default": 1}}},
        "extra": {"options": {"demo_host": {"type": "str", "default": "h"}}}}}))
    (role / "tasks" / "main.yml").write_text(textwrap.dedent("""\
        - name: Guard
          cla2.mlu.known_vars:
        - name: Something the role records
          ansible.builtin.set_fact:
            demo_result: done
        """))
    play = tmp_path / "play.yml"
    play.write_text(textwrap.dedent(f"""\
        - hosts: localhost
          connection: local
          gather_facts: false
          tasks:
            - ansible.builtin.include_role:
                name: demo
              vars: {role_vars!r}
            - ansible.builtin.include_role:
                name: demo
        """))
    return ansible_playbook(play, roles_path=tmp_path / "roles")


def test_the_action_fails_on_a_misspelt_name_with_the_closest_one(tmp_path):
    res = run_role(tmp_path, {"demo_prot": 2, "demo__x": 1})
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "demo: unknown variable(s) demo_prot: misspelt? demo_prot: did you mean demo_port?" in " ".join(out.split())


def test_the_action_passes_declared_internal_and_own_names(tmp_path):
    # demo_host is declared by another entry point; demo_result is set by the first run, seen by the second
    res = run_role(tmp_path, {"demo_port": 2, "demo_host": "x", "demo__x": 1})
    assert res.returncode == 0, res.stdout + res.stderr
