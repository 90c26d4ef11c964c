"""cla2_follow: follow one job that `cla2 run` started, to its end, in constant memory and time per round.

Why an action plugin: the kit used to follow a job with a task file that included itself once per
poll. Ansible's include recursion dies with RecursionError after a few hundred rounds (under an hour
at a 10 s poll) and slows down with every round before that. `until`/`retries` loops run in constant
memory but print nothing but "FAILED - RETRYING" while they wait, and a job that runs for a day needs
its progress on the operator's screen. So the loop lives here: each round is one shell command on the
host (no module transfer) that reads the files `cla2 run` keeps in the run folder, and the play shows a
progress line (step / total, loss, tokens/s, ETA) whenever it moved, at most every `progress_seconds`.

The files (see runtime/src/cla2/run.py): RUN_DIR/.lock-NAME, flock(2)-held by the job's supervisor for
the job's life, so a free lock means no supervisor; RUN_DIR/NAME.job.json, the supervisor's record
(state running|succeeded|failed, rc); RUN_DIR/NAME.status.json, the progress the job writes; and
RUN_DIR/NAME.log.

Options: run_dir, name (required); poll (seconds between rounds, default 10); timeout (seconds to
follow, default 86400: the job goes on past it and a re-run attaches again); progress_seconds (default
30); tail (log lines in the failure message, default 30).
Returns: state, rc, rounds, seconds, progress (the last status), job (the last job.json).
"""

from __future__ import annotations

import json
import shlex
import time

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

display = Display()
SEP = "\x1e"


def _duration(seconds) -> str:
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(status: dict) -> str:
    """'training step 120/4000 (3.0%) · loss 1.2345 · 2,345 tok/s · ETA 5h12m' from a status file."""
    parts = [str(status.get("phase") or "running")]
    step, total, unit = status.get("step"), status.get("total"), status.get("unit") or "step"
    if step is not None:
        parts[0] += f" {unit} {step}" + (f"/{total} ({100 * step / total:.1f}%)" if total else "")
    if status.get("loss") is not None:
        parts.append(f"loss {status['loss']:.4f}")
    if status.get("tokens_per_s"):
        parts.append(f"{status['tokens_per_s']:,.0f} tok/s")
    if status.get("eta_s") is not None:
        parts.append(f"ETA {_duration(status['eta_s'])}")
    if status.get("error"):
        parts.append(f"error: {status['error']}")
    return " · ".join(parts)


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("run_dir", "name", "poll", "timeout", "progress_seconds", "tail"))

    def _round(self, run_dir: str, name: str) -> tuple[bool, dict, dict]:
        """(lock held, job.json, status.json) in one command on the host."""
        d, n = shlex.quote(run_dir), name
        cmd = (f"cd {d} && {{ if flock -n {shlex.quote('.lock-' + n)} true; then echo free; else echo held; fi; "
               f"printf '{SEP}'; cat {shlex.quote(n + '.job.json')} 2>/dev/null; printf '{SEP}'; "
               f"cat {shlex.quote(n + '.status.json')} 2>/dev/null; true; }}")
        res = self._low_level_execute_command(cmd, sudoable=True)
        if res.get("rc") != 0:
            raise AnsibleActionFail(f"cannot read the state of {name} in {run_dir}: "
                                    f"{(res.get('stderr') or res.get('stdout') or '').strip()}")
        lock, job, status = (res.get("stdout") or "").split(SEP, 2)

        def parse(text):
            try:
                return json.loads(text) if text.strip() else {}
            except ValueError:  # written atomically, so only a file from elsewhere; read it next round
                return {}
        return lock.strip() == "held", parse(job), parse(status)

    def _tail(self, run_dir: str, name: str, lines: int) -> str:
        res = self._low_level_execute_command(
            f"tail -n {int(lines)} {shlex.quote(run_dir + '/' + name + '.log')}", sudoable=True)
        return (res.get("stdout") or "").rstrip()

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        if self._play_context.check_mode:
            return {**result, "skipped": True, "msg": "check mode: a job is not followed (nothing was started)"}
        args = self._task.args
        run_dir, name = args.get("run_dir"), args.get("name")
        if not run_dir or not name:
            raise AnsibleActionFail("cla2_follow needs run_dir and name")
        poll = float(args.get("poll", 10))
        timeout = float(args.get("timeout", 86400))
        every = float(args.get("progress_seconds", 30))
        host = task_vars.get("inventory_hostname", "?") if task_vars else "?"

        t0 = time.monotonic()
        rounds, shown, last_line, last_phase, status, job = 0, -every, None, None, {}, {}
        while True:
            rounds += 1
            held, job, status = self._round(run_dir, name)
            state = job.get("state")
            now = time.monotonic() - t0
            line = progress_line(status) if status else None
            # a line when the progress moved, at most every `every` seconds, and at once on a new phase
            if line and line != last_line and (now - shown >= every or status.get("phase") != last_phase):
                display.display(f"[{host}] {name}: {line}")
                shown, last_line, last_phase = now, line, status.get("phase")
            if state in ("succeeded", "failed") and not held:
                break
            if not held and state == "running":
                tail = self._tail(run_dir, name, args.get("tail", 30))
                raise AnsibleActionFail(
                    f"{name} on {host} stopped without finishing: its supervisor is gone (the runtime container "
                    f"restarted or the process was killed) after {job.get('seconds') or _duration(now)}. Re-run the "
                    f"same command to start it again (training resumes from its last checkpoint). "
                    f"Log {run_dir}/{name}.log, last lines:\n{tail}")
            if not job and not held and rounds > 3:
                raise AnsibleActionFail(f"{name} on {host}: no job record {run_dir}/{name}.job.json and no "
                                        f"supervisor holding {run_dir}/.lock-{name}: it was never started")
            if now >= timeout:
                raise AnsibleActionFail(
                    f"{name} on {host} still runs after {_duration(timeout)} of following (cla2_job_timeout); it "
                    f"goes on. Re-run the same command to attach to it again. Last progress: {line or 'none yet'}")
            time.sleep(poll)

        seconds = round(time.monotonic() - t0, 2)
        out = {**result, "state": state, "rc": job.get("rc"), "rounds": rounds, "seconds": seconds,
               "progress": status, "job": job, "changed": False}
        display.display(f"[{host}] {name}: {state} (rc {job.get('rc')}) after {rounds} poll rounds over "
                        f"{_duration(seconds)} of following")
        if state != "succeeded":
            tail = self._tail(run_dir, name, args.get("tail", 30))
            out.update(failed=True, msg=f"{name} failed on {host} (exit {job.get('rc')}). "
                                        f"Log: {run_dir}/{name}.log; its last lines:\n{tail}")
        return out
