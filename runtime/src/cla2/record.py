"""``run.json``: the one format in which every job records what it did, and the one reader of it.

Every job (finetune, pretrain, merge, generate, eval) writes the same common keys, then its own:

  job         the sub-command: finetune, pretrain, merge, generate or eval
  args        the job's arguments as flags (settings groups flattened: ``lr``, ``lora_rank``, ...), paths absolute
  versions    cla2, python, torch and the libraries around it
  started     ISO 8601 UTC;  ended, seconds: null while it runs
  outcome     running | succeeded | failed (with ``error``)

The older names stay in every record, for readers written against them: ``command`` (eval wrote it: the job),
``status`` (training wrote it: running | complete | failed) and ``finished`` (training: ended once it succeeded).
:func:`read` gives any record, old or new, with both the common and the older names filled in.
"""

from __future__ import annotations

import json
from pathlib import Path

from cla2.io import iso_time, jsonable, versions, write_json
from cla2.settings import flatten

RUN_FILE = "run.json"
COMMON_KEYS = ("job", "args", "versions", "started", "ended", "seconds", "outcome")
# outcome -> the ``status`` training records used to carry, and back
_STATUS = {"running": "running", "succeeded": "complete", "failed": "failed"}
_OUTCOME = {v: k for k, v in _STATUS.items()}


def run_record(job: str, args: dict, started: float, ended: float | None = None, outcome: str = "succeeded",
               **extra) -> dict:
    """A job's run.json: the common keys, the older names, then the job's own ``extra`` keys. ``ended`` None (a
    record written while the job runs) leaves ended and seconds null. ``args`` may hold settings groups."""
    flat = flatten({k: v for k, v in args.items() if not k.startswith("_")})
    record = {"job": job, "args": jsonable({k: v for k, v in flat.items() if not k.startswith("_")}),
              "versions": versions(), "started": iso_time(started),
              "ended": iso_time(ended) if ended is not None else None,
              "seconds": round(ended - started, 2) if ended is not None else None, "outcome": outcome}
    record.update(extra)
    return with_old_names(record)


def with_old_names(record: dict) -> dict:
    """Fill in ``command``, ``status`` and ``finished`` from the common keys (in place)."""
    record["command"] = record["job"]
    record["status"] = _STATUS.get(record["outcome"], record["outcome"])
    record["finished"] = record["ended"] if record["outcome"] == "succeeded" else None
    return record


def write(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` (a folder: its run.json) in one rename, never half-written."""
    path = Path(path)
    write_json(path / RUN_FILE if path.is_dir() else path, record)


def read(path: Path) -> dict | None:
    """The record at ``path`` (a folder: its run.json), old or new format, with the common keys and the older
    names filled in; None when there is none or it is not a JSON object."""
    path = Path(path)
    path = path / RUN_FILE if path.is_dir() else path
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    record.setdefault("job", record.get("command"))
    record.setdefault("args", {})
    record.setdefault("outcome", _OUTCOME.get(record.get("status"), record.get("status")))
    record.setdefault("ended", record.get("finished"))
    for key in COMMON_KEYS:
        record.setdefault(key, None)
    return with_old_names(record)
