"""Check mode on the converged service: `playbooks/serve.yml --check --diff` with the scenario's variables runs
to the end against the running replicas (health, HAProxy's view and the smoke request are read) and reports
changed=0. Runs before test_replicas.py, which kills and restarts replicas."""

import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
VARS = {"inference_service_model": "tiny-llama", "inference_service_device_groups": [[0], [1]],
        "inference_service_api_key": "molecule-secret", "inference_service_bind_address": "0.0.0.0"}
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def test_serve_check_mode_changes_nothing_on_a_running_service(host):
    units = {u: host.service(u).is_running for u in ("cla2-serve", "cla2-serve-r0", "cla2-serve-r1")}
    assert all(units.values()), units
    before = host.check_output("cat /etc/cla2/cla2-serve-r0.applied /etc/cla2/cla2-serve-r1.applied")
    cmd = ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(ROOT / "playbooks" / "serve.yml"),
           "--check", "--diff", "-e", json.dumps(VARS)]
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
           "ANSIBLE_NOCOLOR": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    recap = RECAP.findall(res.stdout.split("PLAY RECAP", 1)[-1])
    assert recap, out[-2000:]
    for name, _ok, changed, unreachable, failed in recap:
        assert (int(changed), int(unreachable), int(failed)) == (0, 0, 0), (name, out[-4000:])
    # the live checks ran (read-only) instead of being skipped
    assert "Wait until HAProxy sees every replica UP" in res.stdout and "Check that the service answered" in res.stdout
    assert "check mode: cla2-serve" not in res.stdout
    assert host.check_output("cat /etc/cla2/cla2-serve-r0.applied /etc/cla2/cla2-serve-r1.applied") == before
