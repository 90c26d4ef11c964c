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

ROLES = ["preflight", "mlu_driver", "container_engine", "container_image", "model_weights", "cla2_runtime",
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


def test_a_longer_prefix_of_another_role_is_that_roles():
    # cla2_runtime_* seen from the job layer cla2: the runtime role's variables, not misspelt cla2_* ones
    given = ["cla2_model", "cla2_modle", "cla2_runtime_env", "cla2_runtime_x"]
    assert kv.unknown_vars(given, "cla2_", ["cla2_model"], others=["cla2_runtime_", "cla2_"]) == ["cla2_modle"]


def test_sibling_prefixes_are_the_roles_beside_that_extend_the_prefix():
    prefixes = kv.sibling_prefixes(str(KIT / "roles"), "cla2_")
    assert prefixes == ["cla2_runtime_"]
    assert kv.sibling_prefixes(str(KIT / "roles"), "model_weights_") == []


def test_old_names_are_split_into_renamed_and_misspelt():
    renamed, misspelt = kv.renamed_vars(["runtime_env", "runtime_evn", "runtime__x", "cla2_runtime_env"],
                                        "runtime_", "cla2_runtime_", ["cla2_runtime_env"])
    assert (renamed, misspelt) == (["runtime_env"], ["runtime_evn"])


def test_every_cla2_runtime_default_reads_its_former_name_first():
    """The deprecation path of the runtime role's rename (0.2.0): an inventory written for `runtime` still works
    only if every variable's default reads the old name."""
    role = KIT / "roles" / "cla2_runtime"
    declared = kv.declared_options(yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"])
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    assert set(defaults) == declared
    # added after the rename: no former name to read
    newer = {"cla2_runtime_lock"}
    assert newer <= declared
    for name, value in defaults.items():
        old = name.removeprefix("cla2_")
        if name in newer:
            assert old not in str(value), (name, value)
            continue
        assert isinstance(value, str) and value.startswith("{{ " + old + " | default("), (name, value)


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


def run_renamed_role(tmp_path: Path, role_vars: dict) -> subprocess.CompletedProcess:
    """A role `new_demo`, once called `demo`: its defaults read the old names, its guard has renamed_from; a role
    `new_demo_extra` beside it, whose variables extend the prefix."""
    roles = tmp_path / "roles"
    for name in ("new_demo", "new_demo_extra"):
        (roles / name / "meta").mkdir(parents=True)
        (roles / name / "tasks").mkdir()
        (roles / name / "defaults").mkdir()
    (roles / "new_demo_extra" / "tasks" / "main.yml").write_text("[]\n")
    (roles / "new_demo" / "meta" / "argument_specs.yml").write_text(yaml.safe_dump({"argument_specs": {
        "main": {"options": {"new_demo_port": {"type": "int", "default": 1}}}}}))
    (roles / "new_demo" / "defaults" / "main.yml").write_text('new_demo_port: "{{ demo_port | default(1) }}"\n')
    (roles / "new_demo" / "tasks" / "main.yml").write_text(textwrap.dedent("""\
        - name: Guard
          cla2.mlu.known_vars:
            renamed_from: demo_
            removed_in: 9.0.0
        - name: Show the port
          ansible.builtin.debug:
            msg: "port={{ new_demo_port }}"
        """))
    play = tmp_path / "play.yml"
    play.write_text(textwrap.dedent(f"""\
        - hosts: localhost
          connection: local
          gather_facts: false
          vars: {role_vars!r}
          roles:
            - new_demo
        """))
    return ansible_playbook(play, roles_path=roles)


def test_a_former_name_still_works_with_a_deprecation_warning(tmp_path):
    res = run_renamed_role(tmp_path, {"demo_port": 7, "new_demo_extra_x": 1})
    out = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 0, out
    assert "port=7" in out
    assert "DEPRECATION" in out and "new_demo: demo_port is now new_demo_port" in out
    assert "9.0.0" in out


def test_the_new_name_wins_over_the_former_one(tmp_path):
    res = run_renamed_role(tmp_path, {"demo_port": 7, "new_demo_port": 8})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "port=8" in res.stdout


def test_a_misspelt_former_name_is_refused_with_the_new_name(tmp_path):
    res = run_renamed_role(tmp_path, {"demo_prot": 7})
    out = " ".join((res.stdout + res.stderr).split())
    assert res.returncode != 0, out
    assert "new_demo: unknown variable(s) demo_prot: misspelt? demo_prot: did you mean new_demo_port?" in out
