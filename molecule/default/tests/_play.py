"""Running the kit's playbooks from a verify test against the scenario's inventory (molecule only)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def molecule_only():
    if "MOLECULE_INVENTORY_FILE" not in os.environ:
        pytest.skip("runs playbooks against molecule's inventory (molecule verify only)")


def play(playbook: str, *args: str) -> subprocess.CompletedProcess:
    cmd = ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(ROOT / playbook), *args]
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
           "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=900)


def recap(stdout: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines -> {host: {ok, changed, unreachable, failed}}."""
    return {m[1]: dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups()[1:]), strict=False))
            for m in RECAP.finditer(stdout.split("PLAY RECAP", 1)[-1])}
