"""Shared helpers of the model_weights benchmarks: stand-in weight folders and a local run of the role."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHUNK = 8 << 20


def ansible_bin(name: str) -> str:
    venv = REPO / ".venv" / "bin" / name
    if venv.exists():
        return str(venv)
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found: run `make venv` first")
    return found


def workdir(base: str | None) -> Path:
    root = Path(base or os.environ.get("CLA2_BENCH_DIR") or REPO / ".cache" / "bench")
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="weights-", dir=root))


def make_model(folder: Path, total_bytes: int, shards: int = 4) -> int:
    """A model-like folder: a config and `shards` random safetensors-like files adding up to total_bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "stand_in": True}))
    per = max(1, total_bytes // shards)
    block = os.urandom(CHUNK)
    for i in range(shards):
        left = per
        with open(folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as fh:
            # Mutate each block a little so no file system could deduplicate it.
            n = 0
            while left > 0:
                chunk = block[: min(CHUNK, left)]
                fh.write(n.to_bytes(8, "little") + chunk[8:])
                left -= len(chunk)
                n += 1
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def read_all(folder: Path) -> None:
    """Read every file once so that the source is in the page cache for every contender alike."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as fh:
                while fh.read(CHUNK):
                    pass


PLAYBOOK = """---
- name: Place weights with the model_weights role alone
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Run model_weights
      ansible.builtin.include_role:
        name: model_weights
    - name: Save the placement results
      ansible.builtin.copy:
        dest: "{{ bench_results }}"
        content: "{{ {'placed': model_weights__placed | default({}), 'query': model_weights__query | default({})} | to_json }}"
        mode: "0644"
      changed_when: false  # the bench's own bookkeeping: the recap counts the role's changes only
"""


def run_role(work: Path, items: list[dict], data_root: Path, verify: str = "stamp",
             extra_vars: dict | None = None) -> tuple[float, dict, str]:
    """ansible-playbook with the model_weights role against this machine; (seconds, results, output)."""
    playbook = work / "place.yml"
    playbook.write_text(PLAYBOOK)
    extra = work / "vars.json"
    results = work / "results.json"
    extra.write_text(json.dumps({
        "cla2_data_root": str(data_root), "model_weights_models": items, "model_weights_verify": verify,
        "bench_results": str(results), **(extra_vars or {}),
        "ansible_python_interpreter": str(REPO / ".venv" / "bin" / "python")
        if (REPO / ".venv" / "bin" / "python").exists() else sys.executable}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(REPO / "roles"),
               ANSIBLE_FORCE_COLOR="0", ANSIBLE_STDOUT_CALLBACK="default", ANSIBLE_CALLBACK_RESULT_FORMAT="yaml",
               ANSIBLE_FACT_CACHING="memory")
    cmd = [ansible_bin("ansible-playbook"), "-i", "localhost,", str(playbook), "-e", f"@{extra}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-3000:])
        sys.exit(f"ansible-playbook failed (rc {proc.returncode}): see the output above")
    return seconds, json.loads(results.read_text()), proc.stdout


def changed_count(output: str) -> int:
    for line in output.splitlines():
        if line.startswith("localhost") and "changed=" in line:
            return int(line.split("changed=")[1].split()[0])
    raise RuntimeError("no PLAY RECAP line in the output")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GB"
