"""`cla2 run`: run one job of a run in the background, under a lock, so that a job lasting days outlives
whatever started it (Ansible, an ssh session, `docker exec`), and a second start attaches to the running
job instead of starting a second process.

A start forks a detached supervisor (its own session, stdio away from the caller, so `docker exec` returns
at once), waits until that supervisor holds the lock and has written the job record, prints ONE JSON line
and exits. The supervisor runs the job, waits for it and records how it ended. Locks are flock(2) locks
held by the supervisor: the kernel drops them when it dies, however it dies, so a lock is never stuck.

Files in RUN_DIR for a job NAME (a contract: the Ansible follower reads them directly):

  .lock-NAME        Empty. Locked with flock(2) (LOCK_EX) by the supervisor for the job's whole life.
                    From the host, `flock -n RUN_DIR/.lock-NAME true` fails while the job runs. These are
                    flock(2) locks, as flock(1) takes, NOT fcntl/lockf (POSIX record) locks.
  NAME.job.json     {"name", "argv", "pid" (the job process), "supervisor_pid", "host", "started" (epoch
                    seconds), "state": "running"}; when the job ends, the same plus "state": "succeeded" or
                    "failed", "rc" (negative: killed by that signal), "ended", "seconds", and "signal"
                    (e.g. "SIGTERM") when it was stopped through the supervisor: such a job is "failed"
                    even if it exited 0. A job that could not be executed at all: "failed", "rc" 127,
                    "error".
                    Always replaced whole (temporary file + rename), never half-written.
  NAME.log          The job's stdout and stderr, appended across attempts, framed by the lines
                    "== start <epoch> <argv, shell-quoted>" and "== end <epoch> rc=<rc>", and
                    "== stale lock of pid P (started T) cleared" when a dead supervisor's record is replaced,
                    "== could not start ARGV: REASON" when the command could not be executed.
  NAME.status.json  The job's own progress, written by the job at $CLA2_STATUS_FILE (which the supervisor
                    sets to this path); removed at each start so that it never shows an earlier attempt.
  .done-NAME        {"argv", "seconds"} once the job succeeded: the same argv is not run again, other
                    arguments are refused (older files also hold "ansible_seconds"; only "argv" counts).

What a start prints (one JSON object on one stdout line) and its exit status:

  {"state": "started", "pid", "supervisor_pid", "argv", "started", ...}  rc 0, the job now runs;
      with "stale": {"pid", "started"} when a dead supervisor's record said "running" (container restarted,
      kill -9): reported on stderr and in the log, then the job starts again.
  {"state": "running", ...NAME.job.json}   rc 0: the same argv already runs; follow it.
  {"state": "done", "argv", "seconds"}     rc 0: the same argv already succeeded.
  {"state": "refused", "error": "..."}     rc 2: other arguments are running or finished, or bad input;
                                           the same message is on stderr; nothing was changed.
  {"state": "failed", "error": "..."}      rc 2: the command could not be started (recorded as failed).

`cla2 run --dir RUN_DIR --name NAME --status` starts nothing and prints {"state": "none" | "running" |
"succeeded" | "failed" | "stale", "lock": "held" | "free", ...NAME.job.json, "progress": NAME.status.json
or null, "done": .done-NAME or null}. With no NAME.job.json but a .done-NAME (a run recorded before
`cla2 run` existed) the state is "succeeded".

SIGTERM, SIGINT and SIGHUP sent to the supervisor are forwarded to the job's process group; the job is then
recorded as failed with its own exit status. If the supervisor itself is killed (kill -9), the job is sent
SIGTERM by the kernel (PR_SET_PDEATHSIG), so that a restart never runs beside an orphan.
"""

from __future__ import annotations

import ctypes
import difflib
import fcntl
import json as jsonlib
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
# how long a start waits for its supervisor to report, and for another start's record to appear
_SUPERVISOR_TIMEOUT_S = 60.0
_RECORD_WAIT_S = 10.0


class _Files:
    """The paths of one job in its run folder (see the module docstring)."""

    def __init__(self, run_dir: Path, name: str):
        self.run_dir = run_dir
        self.lock = run_dir / f".lock-{name}"
        self.job = run_dir / f"{name}.job.json"
        self.log = run_dir / f"{name}.log"
        self.status = run_dir / f"{name}.status.json"
        self.done = run_dir / f".done-{name}"


class Refused(ValueError):
    """A start that must not go ahead; its message says why and what to do."""


class _Failed(RuntimeError):
    """The job could not be started, or its supervisor did not report."""


def _when(epoch) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(epoch)))
    except (TypeError, ValueError):
        return str(epoch)


def _read_json(path: Path, *, lenient: bool = False) -> dict | None:
    """The JSON object in ``path``; None when there is none. A damaged record is an error (with what to do)
    unless ``lenient`` (the job's progress file, written by the job, may be caught mid-write)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        obj = jsonlib.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        if lenient:
            return None
        raise Refused(f"{path} is not a valid record ({exc}): remove it (the job is then run again)") \
            from None
    return obj


def _write_json(path: Path, obj: dict) -> None:
    """Replace ``path`` with ``obj`` at once: a reader sees the old record or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(jsonlib.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append_log(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive flock(2) lock on ``path``, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _lock_held(path: Path) -> bool:
    """Whether a supervisor holds ``path``; probes with a shared lock and creates nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _differences(old: list[str], new: list[str]) -> str:
    """What changed between two argvs, as an operator would say it: `--max-steps 10 -> --max-steps 20`."""
    parts = []
    ops = difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            continue
        # a changed value is shown with its flag
        flag = [old[i1 - 1]] if i1 > 0 and old[i1 - 1].startswith("-") and tag != "insert" else []
        was, now = shlex.join(flag + old[i1:i2]), shlex.join(flag + new[j1:j2])
        if tag == "replace":
            parts.append(f"{was} -> {now}")
        elif tag == "delete":
            parts.append(f"{was} is gone")
        else:
            parts.append(f"{now} is new")
    return "; ".join(parts) or "the same tokens"


def _check_command(argv: list[str], run_dir: Path, name: str) -> None:
    """Refuse a command that cannot be executed, before anything changes."""
    prog = argv[0]
    if "/" in prog:
        path = Path(prog) if os.path.isabs(prog) else run_dir / prog
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise Refused(f"cannot start {name}: {path} is not an executable file (a relative path is taken "
                          f"from {run_dir}, the job's working directory)")
    elif shutil.which(prog) is None:
        raise Refused(f"cannot start {name}: {prog!r} is not a command on PATH "
                      f"({os.environ.get('PATH', '')}); give its full path, or install it")


def _with_state(state: str, record: dict, **more) -> dict:
    """``record`` with "state" first, as the printed JSON has it."""
    return {"state": state, **{k: v for k, v in record.items() if k != "state"}, **more}


def _done(files: _Files, name: str, argv: list[str], done: dict) -> dict:
    if done.get("argv") == argv:
        return _with_state("done", done)
    old = [str(a) for a in done.get("argv") or []]
    raise Refused(f"the run {name} in {files.run_dir} already finished with other arguments "
                  f"({_differences(old, argv)}; it ran: {shlex.join(old)}): pick another run name, or remove "
                  f"{files.done} to run it again")


def _attach(files: _Files, name: str, argv: list[str], job: dict) -> dict:
    if job.get("argv") == argv:
        return _with_state("running", job)
    pid, spid = job.get("pid"), job.get("supervisor_pid")
    old = [str(a) for a in job.get("argv") or []]
    raise Refused(f"{name} is already running in {files.run_dir} with other arguments (pid {pid}, supervisor "
                  f"pid {spid} on {job.get('host')}, since {_when(job.get('started'))}; "
                  f"{_differences(old, argv)}): wait for it, or stop it with kill {spid} (the job is stopped "
                  "and recorded as failed)")


def _wait_for_record_or_lock(files: _Files, name: str) -> tuple[dict | None, int | None]:
    """The lock is held: the record of the job that holds it, or the lock once it is free. A start that
    has just taken the lock writes its record within milliseconds; `--status` probes hold it for less."""
    deadline = time.monotonic() + _RECORD_WAIT_S
    while True:
        job = _read_json(files.job)
        if job and job.get("state") == "running" and (
                job.get("host") != socket.gethostname() or _pid_alive(job.get("supervisor_pid"))):
            return job, None
        lock = _try_lock(files.lock)
        if lock is not None:
            return None, lock
        if time.monotonic() > deadline:
            raise Refused(f"{files.lock} is held but {files.job} names no running job: another `cla2 run` "
                          f"is starting {name}; try again in a few seconds (or see who holds it: "
                          f"fuser -v {files.lock})")
        time.sleep(0.05)


def _job_preexec(supervisor_pid: int, libc):
    """Runs in the job process before exec: its own process group (signals reach all of its processes), a
    SIGTERM when the supervisor dies, and the signals the supervisor blocked unblocked."""

    def preexec() -> None:
        os.setpgid(0, 0)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        if os.getppid() != supervisor_pid:  # the supervisor died before prctl
            os._exit(143)

    return preexec


def _supervise(files: _Files, name: str, argv: list[str], report_fd: int) -> int:
    """The supervisor, in the forked child that holds the lock: start the job, report its record to the
    caller through ``report_fd``, wait for it, record how it ended. Returns the supervisor's exit status."""
    started = time.time()
    _append_log(files.log, f"== start {started:.3f} {shlex.join(argv)}")
    files.status.unlink(missing_ok=True)
    record = {"name": name, "argv": argv, "pid": None, "supervisor_pid": os.getpid(),
              "host": socket.gethostname(), "started": started, "state": "running"}
    try:
        libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        libc = None
    # Signals wait until the job exists and the handlers that forward them are in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    log_fd = os.open(files.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        env = {**os.environ, "CLA2_STATUS_FILE": str(files.status)}
        proc = subprocess.Popen(argv, cwd=files.run_dir, stdin=subprocess.DEVNULL, stdout=log_fd,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=_job_preexec(os.getpid(), libc))
    except OSError as exc:
        ended = time.time()
        error = f"could not start {shlex.join(argv)}: {exc}"
        _append_log(files.log, f"== {error}")
        _append_log(files.log, f"== end {ended:.3f} rc=127")
        _write_json(files.job, {**record, "state": "failed", "rc": 127, "ended": ended,
                                "seconds": round(ended - started, 3), "error": error})
        os.write(report_fd, (jsonlib.dumps({"error": error}) + "\n").encode())
        os.close(report_fd)
        return 127
    finally:
        os.close(log_fd)
    record["pid"] = proc.pid
    _write_json(files.job, record)
    os.write(report_fd, (jsonlib.dumps(record) + "\n").encode())
    os.close(report_fd)

    stopped_by: list[str] = []

    def forward(signum, _frame) -> None:
        stopped_by.append(signal.Signals(signum).name)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    for sig in _SIGNALS:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    rc = proc.wait()
    ended = time.time()
    seconds = round(ended - started, 3)
    _append_log(files.log, f"== end {ended:.3f} rc={rc}")
    # A job stopped by a signal is not done, even when it exits 0 after saving a checkpoint.
    succeeded = rc == 0 and not stopped_by
    if succeeded:
        _write_json(files.done, {"argv": argv, "seconds": seconds})
    end = {"state": "succeeded" if succeeded else "failed", "rc": rc, "ended": ended, "seconds": seconds}
    if stopped_by:
        end["signal"] = stopped_by[0]
    _write_json(files.job, {**record, **end})
    return rc if rc >= 0 else 128 - rc


def _fork_supervisor(files: _Files, name: str, argv: list[str], lock_fd: int) -> dict:
    """Fork the detached supervisor, which inherits the lock; return the record it reports."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the supervisor: never returns into the caller's code
        code = 1
        try:
            os.close(read_fd)
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            out = os.open(files.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            os.dup2(devnull, 0)
            os.dup2(out, 1)  # the supervisor's own failures land in the log, not in the caller's pipe
            os.dup2(out, 2)
            os.close(devnull)
            os.close(out)
            code = _supervise(files, name, argv, write_fd)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    os.close(lock_fd)  # the supervisor's copy keeps the lock
    data = b""
    deadline = time.monotonic() + _SUPERVISOR_TIMEOUT_S
    with os.fdopen(read_fd, "rb") as pipe:
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                raise _Failed(f"the supervisor of {name} (pid {pid}) did not report within "
                                   f"{_SUPERVISOR_TIMEOUT_S:.0f} s; see {files.log}")
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk:
                raise _Failed(f"the supervisor of {name} (pid {pid}) died before starting the job; "
                                   f"see the end of {files.log}")
            data += chunk
    report = jsonlib.loads(data)
    if "error" in report:
        raise _Failed(report["error"])
    return report


def _start(files: _Files, name: str, argv: list[str]) -> dict:
    done = _read_json(files.done)
    if done is not None:
        return _done(files, name, argv, done)
    _check_command(argv, files.run_dir, name)
    lock = _try_lock(files.lock)
    if lock is None:
        job, lock = _wait_for_record_or_lock(files, name)
        if job is not None:
            return _attach(files, name, argv, job)
    try:
        done = _read_json(files.done)  # it may have finished between the first look and the lock
        old = _read_json(files.job) if done is None else None
    except BaseException:
        os.close(lock)
        raise
    if done is not None:
        os.close(lock)
        return _done(files, name, argv, done)
    stale = None
    if old and old.get("state") == "running":
        stale = {"pid": old.get("pid"), "started": old.get("started")}
        print(f"cla2 run: {name} in {files.run_dir} was recorded as running (pid {old.get('pid')}, "
              f"supervisor pid {old.get('supervisor_pid')} on {old.get('host')}, since "
              f"{_when(old.get('started'))}) but nothing holds its lock: its supervisor died (container "
              "restart, kill -9). Starting it again.", file=sys.stderr, flush=True)
        _append_log(files.log, f"== stale lock of pid {stale['pid']} (started {stale['started']}) cleared")
    record = _fork_supervisor(files, name, argv, lock)
    return _with_state("started", record, **({"stale": stale} if stale else {}))


def job_status(run_dir: Path, name: str) -> dict:
    """The state of job ``name`` in ``run_dir``, as `cla2 run --status` prints it."""
    files = _Files(Path(run_dir), name)
    job = _read_json(files.job) or {}
    held = _lock_held(files.lock)
    done = _read_json(files.done)
    if held:
        state = "running"
    elif not job:
        state = "succeeded" if done else "none"
    elif job.get("state") == "running":
        state = "stale"
    else:
        state = job.get("state", "none")
    return _with_state(state, {"lock": "held" if held else "free", **job},
                       progress=_read_json(files.status, lenient=True), done=done)


def main(*argv: str, dir: Path, name: str, status: bool = False) -> dict:
    """Run one job in the background under a lock: `cla2 run --dir RUN_DIR --name NAME -- CMD [ARGS...]`.

    Prints one JSON line: {"state": "started" | "running" | "done", ...} (exit status 0), or
    {"state": "refused" | "failed", "error": ...} (exit status 2, the reason also on stderr). The job's
    files are RUN_DIR/NAME.job.json, NAME.log, NAME.status.json, .lock-NAME and .done-NAME; see
    `pydoc cla2.run`. A second start with the same command attaches to the running job; with other
    arguments it is refused.

    Args:
        argv: The job's command, after `--`; it runs in RUN_DIR, CLA2_STATUS_FILE=RUN_DIR/NAME.status.json.
        dir: The run folder (must exist); it holds the job's lock, record, log and progress.
        name: The job's name in the run (letters, digits, . _ -), e.g. finetune or eval-ceval.
        status: Print the job's state (none, running, succeeded, failed, stale), lock, record, progress and
            done record, and start nothing.
    """
    want_status = status
    try:
        run_dir = Path(dir)
        if not _NAME.match(name):
            raise Refused(f"--name {name!r} is not a job name: use letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit (e.g. finetune, eval-ceval)")
        if not run_dir.is_dir():
            raise Refused(f"--dir {run_dir} is not a folder: create the run folder first")
        files = _Files(run_dir.resolve(), name)
        if want_status:
            if argv:
                raise Refused(f"--status starts nothing: drop the command after -- ({shlex.join(argv)})")
            result = job_status(files.run_dir, name)
        else:
            if not argv:
                raise Refused("no command to run: give the job's command after --, e.g. "
                              f"cla2 run --dir {dir} --name {name} -- cla2 finetune --model ...")
            result = _start(files, name, list(argv))
    except Refused as exc:
        print(jsonlib.dumps({"state": "refused", "error": str(exc)}), flush=True)
        raise
    except _Failed as exc:
        print(jsonlib.dumps({"state": "failed", "error": str(exc)}), flush=True)
        raise
    print(jsonlib.dumps(result), flush=True)
    return result
