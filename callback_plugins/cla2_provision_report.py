"""Writes reports/<host>/provision.json at the end of a provisioning run (playbooks/provision.yml).

The play asks for the report; the callback only records and writes:

- a task that sets the fact ``provision_report_start`` (``{"dir": <reports dir>}``) starts the record for
  its host: from then on every task result on that host with ``changed: true`` is noted under its role
  ("play" for a task outside any role), handlers included;
- a task that sets the fact ``provision_report`` (the versions and devices the roles know) gives the summary;
  recording goes on to the end of the playbook, and a later task may set it again (site.yml adds the
  runtime it deployed after provision.yml);
- when the playbook ends, ``<dir>/<host>/provision.json`` is written for each host that started a record:
  ``{"host", "time", "ansible_version", "versions", "devices", "changed": {role: [task, ...]}, "ok"}``,
  ``ok`` true only when the host reached the summary and no task failed (unrescued) or was
  unreachable on it in this run. The same report is appended as one line to
  ``<dir>/<host>/provision-history.jsonl``: what each provisioning run changed, oldest first.

No play sets those facts in check mode (provision.yml skips them), so ``--check`` writes nothing. Any other
playbook is unaffected: the callback is loaded for every run (ansible.cfg ``callback_plugins``) but does
nothing for a host that never set ``provision_report_start``.
"""

from __future__ import annotations

DOCUMENTATION = """
    name: cla2_provision_report
    type: aggregate
    short_description: per-host provision.json (what changed, versions, devices) for playbooks/provision.yml
    description:
      - Records the tasks that changed something on each host between the facts provision_report_start and
        provision_report, and writes <dir>/<host>/provision.json when the playbook ends.
    requirements: []
"""

import datetime
import json
import os
import tempfile

from ansible import __version__ as ansible_version
from ansible.plugins.callback import CallbackBase

START_FACT = "provision_report_start"
END_FACT = "provision_report"


def _parts(result):
    """(host name, task, result dict) for both the 2.19+ and the older callback result objects."""
    host = getattr(result, "host", None) or result._host
    task = getattr(result, "task", None) or result._task
    data = getattr(result, "result", None)
    if data is None:
        data = result._result
    return host.get_name(), task, data


def _role_of(task) -> str:
    role = getattr(task, "_role", None)
    return role.get_name(include_role_fqcn=False) if role else "play"


def _task_name(task) -> str:
    return task.get_name(include_role_fqcn=False).split(" : ", 1)[-1] if task.get_name() else task.action


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "cla2_provision_report"
    # Always loaded, silent: it writes only for hosts whose play set provision_report_start.
    CALLBACK_NEEDS_ENABLED = False

    def __init__(self):
        super().__init__()
        self._hosts: dict[str, dict] = {}

    # ---- recording -------------------------------------------------------------------------------
    def _record(self, result) -> None:
        host, task, data = _parts(result)
        facts = data.get("ansible_facts") or {}
        if START_FACT in facts:
            self._hosts[host] = {"dir": str(facts[START_FACT].get("dir", "reports")), "changed": {},
                                 "summary": None}
            return
        rec = self._hosts.get(host)
        if not rec:
            return
        if data.get("changed"):
            names = rec["changed"].setdefault(_role_of(task), [])
            name = _task_name(task)
            if name not in names:
                names.append(name)
        if END_FACT in facts:
            # the summary so far; a later play may set it again (site.yml adds the runtime it deployed), and
            # what changes until the playbook ends is recorded too
            rec["summary"] = facts[END_FACT]

    def v2_runner_on_ok(self, result):
        self._record(result)

    # ---- writing ---------------------------------------------------------------------------------
    def v2_playbook_on_stats(self, stats):
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        for host, rec in self._hosts.items():
            summary = rec["summary"] or {}
            host_stats = stats.summarize(host)
            report = {
                "host": host,
                "time": now,
                "ansible_version": ansible_version,
                "versions": summary.get("versions", {}),
                "devices": summary.get("devices", {}),
                "changed": rec["changed"],
                # the play reached the end of the provisioning tasks, and no task failed unrescued
                "ok": bool(rec["summary"] is not None and not host_stats.get("failures")
                           and not host_stats.get("unreachable")),
            }
            folder = os.path.join(rec["dir"], host)
            try:
                os.makedirs(folder, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=".provision.json.")
                with os.fdopen(fd, "w") as out:
                    json.dump(report, out, indent=2, sort_keys=True, default=str)
                    out.write("\n")
                os.chmod(tmp, 0o644)
                os.replace(tmp, os.path.join(folder, "provision.json"))
                with open(os.path.join(folder, "provision-history.jsonl"), "a") as history:
                    history.write(json.dumps(report, sort_keys=True, default=str) + "\n")
            except OSError as exc:
                self._display.warning(f"cla2_provision_report: could not write {folder}/provision.json: {exc}")
                continue
            self._display.display(f"provision report: {os.path.join(folder, 'provision.json')}")
