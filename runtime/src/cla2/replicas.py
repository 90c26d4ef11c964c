"""Work split over the replicas of a host: one `cla2` process per device group of the plan.

`cla2 eval` and `cla2 generate` use it. Each replica is a process of its own that loads its own copy of
the model on its own devices (``--devices``), so a replica that fails cannot leave the others in a
state nobody sees, and nothing is shared between them but the files they are given. Why processes and
not torch.multiprocessing: a replica is exactly the job run on a share of the input, so the job's own
command line is the interface, and its output and its errors are those of a one-replica run.

Each replica reports its progress to a status file of its own in the scratch folder; the parent adds
them up into the job's status file (:mod:`cla2.status`), so a split job shows one count, of the whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cla2 import status

PHASES = {"eval": "evaluating", "generate": "generating"}


def groups(placement, replica: list[int], devices: list[int] | None, replicas: int | None, items: int,
           what: str) -> list[list[int]]:
    """The device groups to run on: the one ``--devices`` names, else the plan's, the first ``replicas`` of
    them, and never more than there are ``items`` (subjects, prompts) to share out."""
    if replicas is not None and replicas < 1:
        raise ValueError(f"--replicas {replicas}: give 1 or more")
    if replicas is not None and replicas > 1 and devices is not None:
        raise ValueError(f"--replicas with --devices: --devices names the devices of one replica; leave it out to "
                         f"split the {what} over the plan's replicas")
    out = [replica] if devices is not None else list(placement.device_groups)
    if replicas is not None:
        if replicas > len(out):
            raise ValueError(f"--replicas {replicas}: the plan finds room for {len(out)} replica(s) of "
                             f"{placement.devices_per_replica} device(s) on this host's {placement.devices} device(s)")
        out = out[:replicas]
    return out[:max(1, items)]


def flags(values: dict) -> list[str]:
    """Command-line flags for a job's parameters as its CLI spells them (None: left out)."""
    argv: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(map(str, value))]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


@contextmanager
def run(job: str, argvs: Sequence[list[str]], device_groups: Sequence[list[int]], sizes: Sequence[int],
        unit: str) -> Iterator[tuple[Path, float]]:
    """Run ``cla2 JOB ARGV --devices GROUP`` for each share at once and wait for all; yields the scratch folder
    (each process's paths in ARGV may point into it: ``{tmp}`` is replaced by it) and the seconds they took.
    A replica that fails raises, with its log's end, once all have stopped."""
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix=f"cla2-{job}-replicas-") as tmp:
        procs = []
        started = time.perf_counter()
        print(f"cla2 {job}: {sum(sizes)} {unit}s over {len(device_groups)} replicas (devices "
              f"{'; '.join(','.join(map(str, g)) for g in device_groups)})", file=sys.stderr)
        for i, (argv, group) in enumerate(zip(argvs, device_groups, strict=True)):
            log = open(Path(tmp) / f"replica-{i}.log", "w")  # noqa: SIM115 - closed below, once the process ends
            cmd = [sys.executable, "-m", "cla2", job, *(a.replace("{tmp}", tmp) for a in argv),
                   "--devices", ",".join(map(str, group))]
            env = {**os.environ, status.ENV: str(Path(tmp) / f"replica-{i}.status.json")}
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        _follow(job, [p for p, _ in procs], Path(tmp), sum(sizes), unit)
        failed = []
        with tqdm(total=sum(sizes), desc=f"{job} over {len(device_groups)} replicas", unit=unit, file=sys.stderr) as bar:
            for (proc, log), group, n in zip(procs, device_groups, sizes, strict=True):
                proc.wait()
                log.close()
                bar.update(n)
                if proc.returncode != 0:
                    failed.append((group, proc.returncode, Path(log.name).read_text(errors="replace")[-2000:]))
        if failed:
            group, code, tail = failed[0]
            raise RuntimeError(f"the replica on devices {','.join(map(str, group))} failed (exit {code}); nothing "
                               f"was written. Its log ends:\n{tail}")
        yield Path(tmp), time.perf_counter() - started


def _follow(job: str, procs: list[subprocess.Popen], tmp: Path, total: int, unit: str) -> None:
    """Until every replica has stopped, put the sum of their status files' steps into this job's status."""
    st = status.current()
    st.update(PHASES.get(job, "loading"), step=0, total=total, unit=unit, force=True)
    if not st.enabled:
        return
    while True:
        running = any(p.poll() is None for p in procs)
        step = 0
        for i in range(len(procs)):
            try:
                step += int(json.loads((tmp / f"replica-{i}.status.json").read_text(encoding="utf-8"))["step"] or 0)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # not written yet
        st.update(step=step, force=not running)
        if not running:
            return
        time.sleep(st.interval_s or 0.2)
