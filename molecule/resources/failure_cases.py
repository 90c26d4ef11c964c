"""Failure cases as data: run one role with a case's variables against the scenario's host and read back
how it ended, so that a scenario's verify holds its bad-input cases as a table instead of a block/rescue
copy per case (the preflight_driver_failures and image_weights_failures scenarios).

A shared YAML include cannot take a case's role variables (a task's `vars:` cannot be a templated dict),
so Python writes the play: the variables are a literal dict there, and may still hold Jinja
("{{ cla2_sandbox_fixtures }}/..."), which Ansible templates as it would in a playbook. The play runs the
role inside block/rescue and writes, on the controller, either the failed task's name, message and
argument errors, or (when the role passed) the facts the caller asked for.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[2]))
HOSTS = "mlu-hosts"
# the inventory's cla2_sandbox_fixtures falls back to a path next to the playbook, which is a temporary one here
FIXTURES = os.environ.get("CLA2_FIXTURES") or str(ROOT / ".cache" / "fixtures")


@dataclass(frozen=True)
class Outcome:
    """How one run of a role ended: failed (with the failed task, its message and argument errors) or
    passed (with the facts asked for); output is ansible-playbook's, for the test's failure message."""

    failed: bool
    task: str = ""
    msg: str = ""
    argument_errors: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    output: str = ""


@dataclass(frozen=True)
class Case:
    """One bad input: the role (and entry point) run with `vars`, the substrings its error message must
    hold, where it matters the failed task's name and the argument errors, and what must be unchanged:
    `same` reads host state that must read the same after the run as before it, `absent` lists paths on
    the host that must not exist after it, `check` asserts anything else. `needs` puts the host into the
    state the case starts from, in order: fixture names, or functions of the testinfra host."""

    name: str
    role: str
    vars: dict[str, Any]
    expect: Sequence[str] = ()
    tasks_from: str | None = None
    task: str | None = None
    argument_errors: Sequence[str] = ()
    not_expect: Sequence[str] = ()
    same: Callable[[Any], Any] | None = None
    absent: Sequence[str] = ()
    check: Callable[[Any, Outcome], None] | None = None
    needs: Sequence[str | Callable[[Any], None]] = ()
    gather_facts: bool = False


def molecule_only() -> None:
    if "MOLECULE_INVENTORY_FILE" not in os.environ:
        pytest.skip("runs the roles against molecule's inventory (molecule verify only)")


def _play(role: str, role_vars: dict[str, Any], tasks_from: str | None, facts: Sequence[str],
          gather_facts: bool, out: str) -> list[dict[str, Any]]:
    include: dict[str, Any] = {"name": role}
    if tasks_from:
        include["tasks_from"] = tasks_from
    passed = ", ".join(f"{name!r}: {name} | default(none)" for name in facts)
    record = {"delegate_to": "localhost", "become": False}
    return [{
        "name": f"Run {role} with the case's variables",
        "hosts": HOSTS,
        "become": True,
        "gather_facts": gather_facts,
        "tasks": [{
            "name": "Run the role and record how it ended",
            "block": [
                {"name": "Run the role", "ansible.builtin.include_role": include, "vars": role_vars},
                {"name": "Record that the role passed",
                 "ansible.builtin.copy": {"dest": out, "mode": "0600",
                                          "content": "{{ {'failed': false, 'facts': {" + passed + "}} | to_json }}"},
                 **record},
            ],
            "rescue": [
                {"name": "Record the failed task and its error",
                 "ansible.builtin.copy": {
                     "dest": out, "mode": "0600",
                     "content": "{{ {'failed': true, 'task': ansible_failed_task.name,"
                                " 'msg': ansible_failed_result.msg | default(''),"
                                " 'argument_errors': ansible_failed_result.argument_errors | default([])} | to_json }}"},
                 **record},
            ],
        }],
    }]


def ansible_playbook(playbook: str | Path, *args: str) -> subprocess.CompletedProcess:
    """ansible-playbook PLAYBOOK ARGS... against the scenario's inventory, with the kit's ansible.cfg."""
    molecule_only()
    cmd = ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(playbook), *args]
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
           "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1", "CLA2_FIXTURES": FIXTURES}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=900)


def run_role(role: str, role_vars: dict[str, Any] | None = None, *, tasks_from: str | None = None,
             facts: Sequence[str] = (), gather_facts: bool = False) -> Outcome:
    """Run ROLE (its entry point TASKS_FROM) with ROLE_VARS on the scenario's host; facts: the variables
    to bring back when it passes. A play that fails outside the role (unreachable host, bad YAML) fails
    the test with its output."""
    with tempfile.TemporaryDirectory(prefix="cla2-case-") as tmp:
        out, playbook = Path(tmp) / "outcome.json", Path(tmp) / "case.yml"
        # JSON is YAML: the role's variables stay a literal dict, nothing to quote
        playbook.write_text(json.dumps(_play(role, role_vars or {}, tasks_from, facts, gather_facts, str(out))))
        res = ansible_playbook(playbook)
        output = res.stdout + res.stderr
        if res.returncode != 0 or not out.exists():
            pytest.fail(f"ansible-playbook failed outside the role (rc {res.returncode}):\n{output}")
        return Outcome(**json.loads(out.read_text()), output=output)


def passed(role: str, role_vars: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """run_role that must pass: the facts asked for (facts=[...] among the keyword arguments)."""
    outcome = run_role(role, role_vars, **kwargs)
    if outcome.failed:
        pytest.fail(f"{role} failed in task {outcome.task!r}: {outcome.msg}\n{outcome.argument_errors}")
    return outcome.facts


def assert_failed_as_expected(case: Case, outcome: Outcome) -> None:
    """The case's role failed, in its task where one is named, with every expected substring in its
    message, none of the unwanted ones, and each argument error pattern matching exactly one error."""
    if not outcome.failed:
        pytest.fail(f"UNEXPECTED SUCCESS: {case.role} accepted case {case.name}\n{outcome.output}")
    where = f"{outcome.task}: {outcome.msg} {outcome.argument_errors}"
    if case.task is not None:
        assert outcome.task == case.task, f"wrong task: {where}"
    for text in case.expect:
        assert text in outcome.msg, f"{text!r} missing from the error: {where}"
    for text in case.not_expect:
        assert text not in outcome.msg, f"{text!r} in the error: {where}"
    for pattern in case.argument_errors:
        hits = [e for e in outcome.argument_errors if re.search(pattern, e)]
        assert len(hits) == 1, f"argument errors matching {pattern!r}: {hits}; all: {outcome.argument_errors}"


def run_case(case: Case, host: Any, request: pytest.FixtureRequest) -> Outcome:
    """Set up what the case needs, run it, and assert its failure and that it changed nothing."""
    molecule_only()
    for need in case.needs:
        if callable(need):
            need(host)
        else:
            request.getfixturevalue(need)
    before = case.same(host) if case.same else None
    outcome = run_role(case.role, case.vars, tasks_from=case.tasks_from, gather_facts=case.gather_facts)
    assert_failed_as_expected(case, outcome)
    if case.same:
        assert case.same(host) == before, f"case {case.name} changed the host"
    for path in case.absent:
        assert not host.file(path).exists, f"case {case.name} left {path}"
    if case.check:
        case.check(host, outcome)
    return outcome
