"""Helpers shared by the testinfra suites: reading the kit's variables for the host under test.

The suites run in molecule's verify and unchanged against real servers
(`pytest --hosts=ansible://mlu-hosts --ansible-inventory=...`), so expected values come from the
inventory, falling back to the roles' defaults.
"""

from __future__ import annotations

import pathlib
from functools import cache

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[3]


def ansible_var(host, name, default=None):
    """A variable as the inventory defines it, templated; `default` when the inventory leaves it to the role."""
    value = host.ansible("debug", "var=%s" % name, check=False).get(name)
    if value is None or (isinstance(value, str) and ("NOT DEFINED" in value or "is undefined" in value)):
        return default
    return value


@cache
def _inventory_vars(host) -> dict:
    try:
        return dict(host.ansible.get_variables())
    except RuntimeError:  # not an ansible backend: role defaults only
        return {}


def role_var(host, name: str):
    """A role variable (`<role>_...`) as the inventory sets it, else the role's default (templates are not
    rendered)."""
    value = _inventory_vars(host).get(name)
    if value is not None and not (isinstance(value, str) and "{{" in value):
        return value
    role = next(r.name for r in (ROOT / "roles").iterdir() if name.startswith(r.name + "_"))
    return yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text())[name]
