#!/usr/bin/env python3
"""Time each stage of `make demo` on the sandbox, its re-run, and the kit's job overhead.

    bench/demo_stages.py [--out docs/bench-demo.md] [--skip-provision] [--run NAME]

Runs, from the repository root with the controller venv on PATH, the steps `make demo` runs:
sandbox hosts (playbooks/sandbox.yml), provisioning (site.yml), the whole pipeline on the tiny model
(playbooks/pipeline.yml -e cla2_demo=true), then the pipeline again with the same run name (a re-run:
every stage is skipped). For each job it reads two times from the host:

- the job's own run time: the `== start` / `== end` lines `cla2 run` writes into <run>/<stage>.log,
  measured inside the runtime container around the cla2 process;
- the time Ansible spent on the stage: the sum of the durations of the stage's tasks of
  roles/cla2/tasks/job.yml (input checks, the `cla2 run` start through `docker exec`, the following,
  fetching its reports), from Ansible's junit callback on the first run.

overhead ratio = sum(Ansible time - job time) / sum(job time). The flag checks, the launcher and the
comparison report are outside the stages (part of the pipeline's wall time only).
Prints a table and writes it as Markdown to --out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "cla2-sandbox-1"
JOB_TASKS = "roles/cla2/tasks/job.yml"  # the tasks of one job: their junit test cases end with ": <stage>"


def timed(cmd: list[str], env: dict | None = None) -> float:
    print("+", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return time.monotonic() - t0


def host_read(path: str) -> str:
    return subprocess.run(["docker", "exec", HOST, "cat", path], capture_output=True, text=True, check=True).stdout


def host_ls(path: str) -> list[str]:
    out = subprocess.run(["docker", "exec", HOST, "ls", "-a", path], capture_output=True, text=True, check=True)
    return out.stdout.split()


def job_seconds(log: str) -> float:
    """Sum of (end - start) over the runs recorded in a job log (a resumed job has several)."""
    total, start = 0.0, None
    for line in log.splitlines():
        if line.startswith("== start "):
            start = float(line.split()[2])
        elif line.startswith("== end ") and start is not None:
            total += float(line.split()[2]) - start
            start = None
    return total


def ansible_seconds(junit_dir: Path, stages: list[str]) -> dict[str, float]:
    """Seconds Ansible spent on each stage: the durations of its job.yml tasks on HOST, from junit XML."""
    seconds = dict.fromkeys(stages, 0.0)
    for xml in junit_dir.glob("*.xml"):
        for case in ET.parse(xml).iter("testcase"):
            name, where = case.get("name", ""), case.get("classname", "")
            if not name.startswith(f"[{HOST}] ") or JOB_TASKS not in where:
                continue
            stage = name.rsplit(": ", 1)[-1]
            if stage in seconds:
                seconds[stage] += float(case.get("time") or 0)
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-demo.md")
    ap.add_argument("--skip-provision", action="store_true", help="sandbox and site.yml already done")
    ap.add_argument("--run", default=f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    args = ap.parse_args()

    rows: list[tuple[str, float]] = []
    if not args.skip_provision:
        rows.append(("sandbox host (playbooks/sandbox.yml)", timed(["ansible-playbook", "playbooks/sandbox.yml"])))
        rows.append(("provision (site.yml)", timed(["ansible-playbook", "site.yml", "-l", "mlu-hosts"])))
    pipe = ["ansible-playbook", "playbooks/pipeline.yml", "-l", HOST, "-e", "cla2_demo=true",
            "-e", f"cla2_run={args.run}",
            "-e", '{"cla2_finetune_args": {"max-steps": 4}, "cla2_pretrain_args": {"max-steps": 4}}',
            "-e", "cla2_poll_seconds=1"]
    junit_dir = Path(tempfile.mkdtemp(prefix="demo-stages-junit-"))
    first = timed(pipe, env={"ANSIBLE_CALLBACKS_ENABLED": "ansible.builtin.junit",
                             "JUNIT_OUTPUT_DIR": str(junit_dir), "JUNIT_HIDE_TASK_ARGUMENTS": "true"})
    rows.append(("pipeline, first run (cla2_runtime role + 11 jobs + report + service)", first))
    rerun = timed(pipe)
    rows.append(("pipeline, re-run (same run name: nothing to do)", rerun))

    run_dir = f"/data/outputs/{args.run}"
    names = sorted(n[len(".done-"):] for n in host_ls(run_dir) if n.startswith(".done-"))
    spent = ansible_seconds(junit_dir, names)
    stages = [(name, job_seconds(host_read(f"{run_dir}/{name}.log")), spent[name]) for name in names]
    own_total = sum(s[1] for s in stages)
    ansible_total = sum(s[2] for s in stages)
    ratio = (ansible_total - own_total) / own_total if own_total else float("nan")

    lines = ["# `make demo`: time of each stage (bench/demo_stages.py)", "",
             (f"Machine: {os.cpu_count()} CPUs; run `{args.run}`; tiny model, `max-steps: 4` in "
              "`cla2_finetune_args` and `cla2_pretrain_args`, polling every 1 s."), "",
             "| step | seconds |", "|---|---:|"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in rows]
    lines += ["", f"Re-run / first run: **{rerun / first:.2f}**", "",
              "| job | job's own time (s) | Ansible time (s) | overhead (s) |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {o:.1f} | {a:.1f} | {a - o:.1f} |" for n, o, a in stages]
    lines += [f"| **all jobs** | **{own_total:.1f}** | **{ansible_total:.1f}** | **{ansible_total - own_total:.1f}** |", "",
              f"Job overhead ratio (input checks, `cla2 run` start, following, fetch / job run time): **{ratio:.2f}**", ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
