"""Action of cla2.mlu.known_vars: fail when a variable with the role's prefix is not one the role knows.

Documentation: plugins/modules/known_vars.py. The check itself: plugins/module_utils/known_vars.py.
"""

from __future__ import annotations

import glob
import os

import yaml
from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible_collections.cla2.mlu.plugins.module_utils.known_vars import (
    declared_options,
    renamed_vars,
    set_by_tasks,
    sibling_prefixes,
    unknown_vars,
    unknown_vars_message,
)


def _load(path):
    with open(path, encoding="utf-8") as stream:
        return yaml.safe_load(stream)


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("prefix", "outputs", "role_path", "renamed_from", "removed_in"))
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        args = self._task.args
        role_path = args.get("role_path") or task_vars.get("role_path")
        if not role_path:
            raise AnsibleActionFail("cla2.mlu.known_vars runs inside a role (no role_path); or set role_path")
        role = os.path.basename(os.path.normpath(role_path))
        prefix = args.get("prefix") or role + "_"

        spec_file = os.path.join(role_path, "meta", "argument_specs.yml")
        if os.path.exists(spec_file):
            specs = (_load(spec_file) or {}).get("argument_specs") or {}
        else:
            spec_file = os.path.join(role_path, "meta", "main.yml")
            specs = (_load(spec_file) or {}).get("argument_specs") or {}
        declared = declared_options(specs)

        task_files = [f for pattern in ("tasks/**/*.yml", "tasks/**/*.yaml", "handlers/**/*.yml")
                      for f in glob.glob(os.path.join(role_path, pattern), recursive=True)]
        outputs = set_by_tasks((_load(f) for f in task_files), prefix) | set(args.get("outputs") or [])

        others = sibling_prefixes(os.path.dirname(os.path.normpath(role_path)), prefix)
        unknown = unknown_vars(task_vars.keys(), prefix, declared, outputs, others)
        renamed = {}  # old name -> new name
        old_prefix = args.get("renamed_from")
        if old_prefix:
            # the role's defaults read each old name (cla2_runtime_x: "{{ runtime_x | default(...) }}"); a
            # name with the old prefix and no new counterpart is as misspelt as one with the new prefix
            old_names, misspelt_old = renamed_vars(task_vars.keys(), old_prefix, prefix, declared)
            renamed = {n: prefix + n[len(old_prefix):] for n in old_names}
            unknown = sorted(set(unknown) | set(misspelt_old))
        result.update(changed=False, unknown=unknown, renamed=renamed)
        if renamed:
            removed_in = args.get("removed_in") or "a later release"
            result["deprecations"] = [{
                "msg": f"{role}: {old} is now {new} (the role was renamed from {old_prefix.rstrip('_')}); "
                       f"the old name is read until {removed_in}, rename it in your inventory",
                "version": args.get("removed_in"), "collection_name": "cla2.mlu"} for old, new in renamed.items()]
        if unknown:
            rel = os.path.join("roles", role, os.path.relpath(spec_file, role_path))
            result.update(failed=True, msg=unknown_vars_message(role, unknown, declared, rel))
        return result
