"""Where a running job stands, in one small JSON file that a supervisor can read at any moment.

Jobs run for days; ``run.json`` tells what a job did once it is over, this file tells what it is doing
now: its phase, how far it got (``step`` of ``total`` ``unit``s), the last loss, the throughput and an
estimate of the time left. ``cla2 run`` points ``CLA2_STATUS_FILE`` at ``RUN_DIR/NAME.status.json``; when
the variable is unset (unit tests, a job started by hand) nothing is written. Only rank 0 writes.

The file is replaced in one rename (never half-written) and at most about once a second, except on a
phase change and the final write, so a training loop may report every step for free. A job that raises
leaves phase ``failed`` with the error's message; one that returns leaves ``done``.

Format (one JSON object)::

    {"job": "finetune", "phase": "training", "step": 120, "total": 4000, "unit": "step",
     "loss": 1.234, "tokens_per_s": 2345.6, "eta_s": 18000.0, "elapsed_s": 611.2,
     "updated": 1764687000.5, "pid": 4242, "error": null}

``loss``, ``tokens_per_s``, ``eta_s``, ``total`` and ``unit`` are null while unknown. ``eta_s`` comes
from the rate of the current phase so far in this process (a resumed training starts counting at its
checkpoint's step, so the steps done before the restart do not inflate the rate).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cla2.io import write_json

ENV = "CLA2_STATUS_FILE"
PHASES = ("loading", "training", "saving", "evaluating", "generating", "merging", "done", "failed")
INTERVAL_S = 1.0

F = TypeVar("F", bound=Callable[..., Any])

_current: Status | None = None


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


class Status:
    """The progress of one job. ``update`` as often as you like; the file follows at most once a second."""

    def __init__(self, job: str, path: str | Path | None = None, interval_s: float | None = None):
        if path is None:
            path = os.environ.get(ENV) or None
        self.path = Path(path) if path and _is_rank_zero() else None
        self.job = job
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.started = time.time()
        self.phase = "loading"
        self.step: int | None = None
        self.total: int | None = None
        self.unit: str | None = None
        self.loss: float | None = None
        self.tokens_per_s: float | None = None
        self.error: str | None = None
        self._last_write = 0.0
        self._base: tuple[float, int] | None = None  # (time, step) where the current phase started counting

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def update(self, phase: str | None = None, *, step: int | None = None, total: int | None = None,
               unit: str | None = None, loss: float | None = None, tokens_per_s: float | None = None,
               force: bool = False) -> None:
        """Record progress; writes the file on a phase change, when ``force``, or a second after the last write."""
        now = time.time()
        changed = phase is not None and phase != self.phase
        if phase is not None:
            if phase not in PHASES:
                raise ValueError(f"status phase {phase!r}: use one of {', '.join(PHASES)}")
            if changed:
                self.phase = phase
                self._base = None
                self.tokens_per_s = None
        if total is not None:
            self.total = total
        if unit is not None:
            self.unit = unit
        if loss is not None:
            self.loss = float(loss)
        if tokens_per_s is not None:
            self.tokens_per_s = float(tokens_per_s)
        if step is not None:
            self.step = int(step)
            if self._base is None:
                self._base = (now, self.step)
        if self.path is not None and (changed or force or now - self._last_write >= self.interval_s):
            self.write(now)

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left at the rate of this phase so far, or None while there is no rate yet."""
        if self._base is None or self.step is None or not self.total or self.phase in ("done", "failed"):
            return None
        t0, s0 = self._base
        now = time.time() if now is None else now
        done, spent = self.step - s0, now - t0
        if done <= 0 or spent <= 0:
            return None
        return round(max(0, self.total - self.step) * spent / done, 1)

    def as_dict(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        return {"job": self.job, "phase": self.phase, "step": self.step, "total": self.total, "unit": self.unit,
                "loss": self.loss,
                "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 1),
                "eta_s": self.eta_s(now), "elapsed_s": round(now - self.started, 1), "updated": now,
                "pid": os.getpid(), "error": self.error}

    def write(self, now: float | None = None) -> None:
        if self.path is None:
            return
        now = time.time() if now is None else now
        self._last_write = now
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, self.as_dict(now))
        except OSError:
            pass  # progress is a courtesy: a full disk or a vanished folder must not stop the job

    def done(self) -> None:
        self.update("done", force=True)

    def fail(self, exc: BaseException) -> None:
        self.error = error_message(exc)
        self.update("failed", force=True)


def error_message(exc: BaseException) -> str:
    """What a status file or a run record says of an exception: its message, "interrupted" for Ctrl-C."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return str(exc).strip() or type(exc).__name__


def current() -> Status:
    """The status of the job running in this process, or a disabled one (nothing to write) outside a job."""
    return _current if _current is not None else Status("none", path="")


def tracked(job: str) -> Callable[[F], F]:
    """Decorate a job's ``main``: it reports under ``job`` (phase ``loading`` at once), ends ``done`` when it
    returns and ``failed`` with the message when it raises. A job called from inside another keeps the outer
    job's status."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            global _current
            if _current is not None:
                return fn(*args, **kwargs)
            status = Status(job)
            _current = status
            status.update(force=True)
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                status.fail(exc)
                raise
            finally:
                _current = None
            status.done()
            return result

        return wrapper  # type: ignore[return-value]

    return decorate
