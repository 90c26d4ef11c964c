#!/usr/bin/python
"""Documentation of the cla2.mlu.known_vars action (plugins/action/known_vars.py does the work)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: known_vars
short_description: Fail when a variable with the role's prefix is not one the role declares
description:
  - Role argument validation checks the type of every variable a role declares, but ignores a variable it does
    not know, so a misspelt name (C(container_image_tarbal)) is silently dropped and the default is used.
  - This action, run as a role's first task, lists every variable that starts with the role's prefix
    (C(model_weights_)), is not internal (C(model_weights__x)), is not an option of any entry point in the
    role's C(meta/argument_specs.yml) and is not set by the role's own tasks (C(register), C(set_fact)).
  - When there is any, it fails once, naming each unknown variable and the closest declared one.
  - A variable of another role of the collection whose name extends this role's prefix (C(cla2_runtime_x) seen
    from the C(cla2) role) is that role's, not an unknown one.
  - Runs on the controller; changes nothing; works in check mode.
version_added: 0.1.0
author: cla2 kit
options:
  prefix:
    description:
      - The prefix of the role's variables. Defaults to the role's folder name and an underscore.
    type: str
  outputs:
    description:
      - Further variables with the prefix that the role sets for later roles, beyond what its tasks
        C(register) or C(set_fact) (those are found by reading the task files).
    type: list
    elements: str
    default: []
  renamed_from:
    description:
      - The role's former prefix (C(runtime_) for C(cla2_runtime)). A variable with it whose new name the role
        declares gets a deprecation warning naming the new one (the role's C(defaults/main.yml) reads the old
        name for the new one); one without a new counterpart is refused as misspelt, as any other.
    type: str
  removed_in:
    description:
      - The collection version that stops reading the old names, said in the deprecation warning.
    type: str
  role_path:
    description:
      - The role whose argument specs to read. Defaults to the role of the task (C(role_path)).
    type: path
attributes:
  check_mode:
    support: full
    description: Only reads.
notes:
  - An action plugin; this file holds its documentation.
"""

EXAMPLES = r"""
- name: No unknown model_weights_* variable (a misspelt name would otherwise be ignored)
  cla2.mlu.known_vars:

- name: No unknown preflight_* variable; preflight_pci is a fact this role sets for later roles
  cla2.mlu.known_vars:
    outputs: [preflight_pci]

- name: No unknown cla2_runtime_* variable; runtime_* (the role's former name) still read, with a warning
  cla2.mlu.known_vars:
    renamed_from: runtime_
    removed_in: 1.0.0
"""

RETURN = r"""
renamed:
  description: The old names given (C(renamed_from)), each with its new name.
  returned: always
  type: dict
unknown:
  description: The unknown variables (the task fails when there is any).
  returned: always
  type: list
  elements: str
"""
