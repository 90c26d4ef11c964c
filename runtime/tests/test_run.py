"""`cla2 run`: a job started in the background under a flock lock; attach, refuse, done, stale, signals.

Every start goes through `python -m cla2 run` in a subprocess, as Ansible runs it; the jobs are small
`python -c` scripts. What a test checks while a job runs, it checks while the job waits for the test's
"go" file (GO); what the job has done before the test acts, the job says with a file of its own (a
handshake): no test depends on how fast the machine is.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PY = sys.executable
# A job's statement that waits until the test creates RUN_DIR/go (the job's working directory); one line, so
# that the job's argv stays one line in its log.
GO = "import os, time; any(time.sleep(0.01) for _ in iter(lambda: os.path.exists('go'), True))"
# Generous: a wait ends as soon as its condition holds; only a broken job waits this long.
WAIT_S = 60.0


def cla2_run(run_dir: Path, name: str, *argv: str, status: bool = False) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "cla2", "run", "--dir", str(run_dir), "--name", name]
    cmd += ["--status"] if status else ["--", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def out(p: subprocess.CompletedProcess) -> dict:
    lines = p.stdout.splitlines()
    assert len(lines) == 1, f"one JSON line expected, got {p.stdout!r} (stderr {p.stderr!r})"
    return json.loads(lines[0])


def job(code: str) -> list[str]:
    return [PY, "-c", code]


def lock_held(lock: Path) -> bool:
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def wait_free(run_dir: Path, name: str, timeout: float = WAIT_S) -> dict:
    """Wait until the job's lock is free; its final record."""
    deadline = time.monotonic() + timeout
    while lock_held(run_dir / f".lock-{name}"):
        assert time.monotonic() < deadline, f"{name} still holds its lock after {timeout} s"
        time.sleep(0.05)
    return json.loads((run_dir / f"{name}.job.json").read_text())


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_dead(pid: int, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive after {timeout} s"
        time.sleep(0.05)


def wait_file(path: Path, timeout: float = WAIT_S) -> None:
    """Wait until the job has written ``path`` (its side of a handshake)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"the job did not write {path} within {timeout} s"
        time.sleep(0.02)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    yield d
    for record in d.glob("*.job.json"):  # leave no job behind
        rec = json.loads(record.read_text())
        for pid in (rec.get("supervisor_pid"), rec.get("pid")):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_start_returns_at_once_and_records_the_job(run_dir):
    code = ("import json, os; print('job says hi'); "
            "open(os.environ['CLA2_STATUS_FILE'], 'w').write(json.dumps({'step': 3, 'of': 10})); "
            f"open('ready', 'w').close(); {GO}; print('job says bye')")
    # The job cannot end before the test creates "go", after the start returned: a start that waited for
    # its job would never return (cla2_run's timeout).
    p = cla2_run(run_dir, "ft", *job(code))
    returned = time.time()
    assert p.returncode == 0, p.stderr
    started = out(p)
    assert started["state"] == "started"
    assert started["argv"] == job(code)
    rec = json.loads((run_dir / "ft.job.json").read_text())
    assert rec["state"] == "running" and rec["pid"] == started["pid"] and rec["argv"] == job(code)
    assert {"name", "supervisor_pid", "host", "started"} <= rec.keys() and rec["name"] == "ft"
    assert alive(rec["pid"]) and alive(rec["supervisor_pid"])
    assert lock_held(run_dir / ".lock-ft")
    # the host-side contract: flock(1) sees the lock
    if shutil.which("flock"):
        assert subprocess.run(["flock", "-n", str(run_dir / ".lock-ft"), "true"]).returncode == 1
    wait_file(run_dir / "ready")  # its progress is written
    st = out(cla2_run(run_dir, "ft", status=True))
    assert st["state"] == "running" and st["lock"] == "held" and st["pid"] == rec["pid"]
    assert st["progress"] == {"step": 3, "of": 10} and st["done"] is None
    assert not (run_dir / ".done-ft").exists()

    (run_dir / "go").touch()
    released = time.time()
    final = wait_free(run_dir, "ft")
    assert final["state"] == "succeeded" and final["rc"] == 0
    # the job ran from before the start returned until after it was let go
    assert final["started"] <= returned <= released <= final["ended"]
    assert final["seconds"] == round(final["ended"] - final["started"], 3)
    done = json.loads((run_dir / ".done-ft").read_text())
    assert done["argv"] == job(code) and done["seconds"] == final["seconds"]
    log = (run_dir / "ft.log").read_text().splitlines()
    assert log[0].startswith("== start ") and log[1:3] == ["job says hi", "job says bye"], log
    assert log[3].startswith("== end ") and log[3].endswith(" rc=0")
    if shutil.which("flock"):
        assert subprocess.run(["flock", "-n", str(run_dir / ".lock-ft"), "true"]).returncode == 0
    st = out(cla2_run(run_dir, "ft", status=True))
    assert st["state"] == "succeeded" and st["lock"] == "free" and st["done"] == done


def test_the_job_runs_in_the_run_dir_with_the_status_file(run_dir):
    code = "import os; print('cwd', os.getcwd()); print('status', os.environ['CLA2_STATUS_FILE'])"
    assert cla2_run(run_dir, "env", *job(code)).returncode == 0
    wait_free(run_dir, "env")
    log = (run_dir / "env.log").read_text()
    assert f"cwd {run_dir.resolve()}\n" in log
    assert f"status {run_dir.resolve() / 'env.status.json'}\n" in log


def test_second_start_attaches_to_the_running_job(run_dir):
    code = f"import os; open('starts', 'a').write(f'{{os.getpid()}}\\n'); {GO}"
    first = out(cla2_run(run_dir, "ft", *job(code)))
    second = cla2_run(run_dir, "ft", *job(code))
    assert second.returncode == 0, second.stderr
    attached = out(second)
    assert attached["state"] == "running"
    assert attached["pid"] == first["pid"] and attached["started"] == first["started"]
    assert attached["argv"] == job(code)
    (run_dir / "go").touch()
    wait_free(run_dir, "ft")
    assert (run_dir / "starts").read_text().split() == [str(first["pid"])], "one job process, not two"
    assert (run_dir / "ft.log").read_text().count("== start ") == 1


def test_other_arguments_while_running_are_refused(run_dir):
    first = out(cla2_run(run_dir, "ft", *job(GO), "--max-steps", "10"))
    before = (run_dir / "ft.job.json").read_bytes()
    p = cla2_run(run_dir, "ft", *job(GO), "--max-steps", "20")
    assert p.returncode == 2
    refused = out(p)
    assert refused["state"] == "refused"
    assert "ft is already running" in p.stderr and "other arguments" in p.stderr
    assert f"kill {first['supervisor_pid']}" in p.stderr and "--max-steps 10 -> --max-steps 20" in p.stderr
    assert refused["error"] in p.stderr
    assert (run_dir / "ft.job.json").read_bytes() == before
    (run_dir / "go").touch()
    assert wait_free(run_dir, "ft")["argv"] == [*job(GO), "--max-steps", "10"]


def test_finished_with_the_same_arguments_is_done_without_running_again(run_dir):
    code = "open('runs', 'a').write('x')"
    assert out(cla2_run(run_dir, "ft", *job(code)))["state"] == "started"
    wait_free(run_dir, "ft")
    before = snapshot(run_dir)
    p = cla2_run(run_dir, "ft", *job(code))
    assert p.returncode == 0, p.stderr
    done = out(p)
    assert done["state"] == "done" and done["argv"] == job(code) and "seconds" in done
    time.sleep(0.3)
    assert snapshot(run_dir) == before
    assert (run_dir / "runs").read_text() == "x"


def test_an_older_done_record_counts_by_its_argv_only(run_dir):
    argv = job("open('runs', 'a').write('x')")
    (run_dir / ".done-ft").write_text(json.dumps({"argv": argv, "ansible_seconds": 12.5}))
    done = out(cla2_run(run_dir, "ft", *argv))
    assert done == {"state": "done", "argv": argv, "ansible_seconds": 12.5}
    assert not (run_dir / "runs").exists()
    st = out(cla2_run(run_dir, "ft", status=True))
    assert st["state"] == "succeeded" and st["lock"] == "free"


def test_finished_with_other_arguments_is_refused_and_nothing_changes(run_dir):
    assert cla2_run(run_dir, "ft", *job("pass"), "--max-steps", "10").returncode == 0
    wait_free(run_dir, "ft")
    before = snapshot(run_dir)
    p = cla2_run(run_dir, "ft", *job("pass"), "--max-steps", "20")
    assert p.returncode == 2
    assert out(p)["state"] == "refused"
    assert f"the run ft in {run_dir.resolve()} already finished with other arguments" in p.stderr
    assert "--max-steps 10 -> --max-steps 20" in p.stderr
    assert "pick another run name" in p.stderr and f"remove {run_dir.resolve() / '.done-ft'}" in p.stderr
    assert snapshot(run_dir) == before


def test_a_failing_job_records_its_rc_and_no_done(run_dir):
    argv = job("import sys; print('bad'); sys.exit(3)")
    assert out(cla2_run(run_dir, "ft", *argv))["state"] == "started"
    final = wait_free(run_dir, "ft")
    assert final["state"] == "failed" and final["rc"] == 3
    assert not (run_dir / ".done-ft").exists()
    assert (run_dir / "ft.log").read_text().splitlines()[-1].endswith(" rc=3")
    assert out(cla2_run(run_dir, "ft", status=True))["state"] == "failed"
    # a failed job is run again by the same start
    assert out(cla2_run(run_dir, "ft", *argv))["state"] == "started"
    wait_free(run_dir, "ft")
    assert (run_dir / "ft.log").read_text().count("== start ") == 2


def test_a_stale_lock_is_reported_cleared_and_the_job_started(run_dir):
    argv = job("import time; time.sleep(300)")
    first = out(cla2_run(run_dir, "ft", *argv))
    os.kill(first["supervisor_pid"], signal.SIGKILL)
    os.kill(first["pid"], signal.SIGKILL)
    wait_dead(first["supervisor_pid"])
    wait_dead(first["pid"])
    assert json.loads((run_dir / "ft.job.json").read_text())["state"] == "running"
    st = out(cla2_run(run_dir, "ft", status=True))
    assert st["state"] == "stale" and st["lock"] == "free"

    p = cla2_run(run_dir, "ft", *argv)
    assert p.returncode == 0, p.stderr
    again = out(p)
    assert again["state"] == "started" and again["pid"] != first["pid"]
    assert again["stale"] == {"pid": first["pid"], "started": first["started"]}
    assert "was recorded as running" in p.stderr and "its supervisor died" in p.stderr
    assert f"== stale lock of pid {first['pid']} (started {first['started']}) cleared" in \
        (run_dir / "ft.log").read_text()
    assert alive(again["pid"]) and lock_held(run_dir / ".lock-ft")
    os.kill(again["supervisor_pid"], signal.SIGTERM)
    assert wait_free(run_dir, "ft")["state"] == "failed"


def test_the_job_does_not_outlive_a_killed_supervisor(run_dir):
    started = out(cla2_run(run_dir, "ft", *job("import time; time.sleep(300)")))
    os.kill(started["supervisor_pid"], signal.SIGKILL)
    wait_dead(started["pid"])  # PR_SET_PDEATHSIG: no orphan runs beside a restart


def test_sigterm_to_the_supervisor_stops_the_job_and_records_failed(run_dir):
    # the job has no handler: whenever the signal reaches it, it dies of it
    started = out(cla2_run(run_dir, "ft", *job("import time; time.sleep(300)")))
    os.kill(started["supervisor_pid"], signal.SIGTERM)
    final = wait_free(run_dir, "ft")
    assert final["state"] == "failed" and final["rc"] == -signal.SIGTERM and final["signal"] == "SIGTERM"
    wait_dead(started["pid"])
    assert not (run_dir / ".done-ft").exists()
    assert (run_dir / "ft.log").read_text().splitlines()[-1].endswith(f" rc={-signal.SIGTERM}")


@pytest.mark.parametrize("case", ["no-dir", "bad-name", "no-command", "not-found", "status-with-command"])
def test_bad_input_is_refused_before_anything_changes(tmp_path, case):
    run_dir, name, argv = tmp_path, "ft", job("pass")
    if case == "no-dir":
        run_dir = tmp_path / "missing"
    elif case == "bad-name":
        name = "../ft"
    elif case == "no-command":
        argv = []
    elif case == "not-found":
        argv = ["no-such-command-xyz", "--flag"]
    cmd = [PY, "-m", "cla2", "run", "--dir", str(run_dir), "--name", name]
    cmd += ["--status"] if case == "status-with-command" else []
    cmd += ["--", *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p
    refused = out(p)
    assert refused["state"] == "refused" and refused["error"] in p.stderr
    expected = {"no-dir": "is not a folder", "bad-name": "is not a job name",
                "no-command": "give the job's command",
                "not-found": "'no-such-command-xyz' is not a command on PATH",
                "status-with-command": "--status starts nothing"}[case]
    assert expected in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_status_of_a_job_never_started(run_dir):
    p = cla2_run(run_dir, "ft", status=True)
    assert p.returncode == 0
    assert out(p) == {"state": "none", "lock": "free", "progress": None, "done": None}
    assert list(run_dir.iterdir()) == []


def test_concurrent_starts_run_one_job(run_dir):
    code = f"import os; open('starts', 'a').write(f'{{os.getpid()}}\\n'); {GO}"
    cmd = [PY, "-m", "cla2", "run", "--dir", str(run_dir), "--name", "ft", "--", *job(code)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=30)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout))
    assert sorted(r["state"] for r in results) == ["running", "running", "running", "started"]
    assert len({r["pid"] for r in results}) == 1
    (run_dir / "go").touch()
    wait_free(run_dir, "ft")
    assert (run_dir / "starts").read_text().split() == [str(results[0]["pid"])]


def test_a_job_stopped_through_the_supervisor_is_not_done_even_if_it_exits_0(run_dir):
    # The job says its handler is in place with a file it writes after installing it. (Waiting for a line in
    # the log raced: the log's "== start" line holds the job's argv, so it holds that line before the job runs,
    # and a SIGTERM before the handler killed the job, rc -15.)
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
            "open('ready', 'w').close(); time.sleep(300)")
    started = out(cla2_run(run_dir, "ft", *job(code)))
    wait_file(run_dir / "ready")
    os.kill(started["supervisor_pid"], signal.SIGTERM)
    final = wait_free(run_dir, "ft")
    assert final["rc"] == 0 and final["state"] == "failed" and final["signal"] == "SIGTERM"
    assert not (run_dir / ".done-ft").exists()


def test_a_command_that_cannot_be_executed_is_recorded_as_failed(run_dir):
    script = run_dir / "broken.sh"
    script.write_text("#!/no/such/interpreter\n")
    script.chmod(0o755)
    p = cla2_run(run_dir, "ft", "./broken.sh")
    assert p.returncode == 2
    failed = out(p)
    assert failed["state"] == "failed" and "could not start ./broken.sh" in failed["error"]
    assert failed["error"] in p.stderr
    rec = json.loads((run_dir / "ft.job.json").read_text())
    assert rec["state"] == "failed" and rec["rc"] == 127 and "could not start" in rec["error"]
    wait_free(run_dir, "ft")
    assert not (run_dir / ".done-ft").exists()
    log = (run_dir / "ft.log").read_text().splitlines()
    assert log[-2].startswith("== could not start ./broken.sh") and log[-1].endswith(" rc=127")
