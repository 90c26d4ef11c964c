"""The unit tests' one way to run the kit's roles: ansible-playbook on this machine (a local connection), with
the kit's ansible.cfg and roles, no colour and no localhost warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

KIT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the kit's ansible-playbook, beside this python (never skipped for want of one on PATH)


def ansible_playbook(play: Path, *args: str, inventory: str = "localhost,",
                     roles_path: Path = KIT / "roles") -> subprocess.CompletedProcess:
    """Run ``play`` (from its folder) and return the finished process; it never raises on a failed play."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(KIT / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(roles_path),
           "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "0",
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0", "ANSIBLE_PYTHON_INTERPRETER": sys.executable}
    return subprocess.run([str(BIN / "ansible-playbook"), "-i", inventory, "-c", "local", *args, str(play)],
                          cwd=play.parent, env=env, capture_output=True, text=True, timeout=300, check=False)


def include_role_play(play: Path, role: str, role_vars: dict, tasks_from: str = "main",
                      gather_facts: bool = False) -> Path:
    """Write a play that includes ``role`` (its entry point ``tasks_from``) on localhost with ``role_vars``."""
    play.write_text(textwrap.dedent(f"""\
        - hosts: localhost
          connection: local
          gather_facts: {str(gather_facts).lower()}
          tasks:
            - ansible.builtin.include_role:
                name: {role}
                tasks_from: {tasks_from}
              vars: {json.dumps(role_vars)}
        """))
    return play
