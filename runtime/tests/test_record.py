"""run.json: one format for every job (cla2.record), and records of the older formats still read."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cla2 import record
from cla2.settings import Lora, Train


def test_the_common_keys_and_the_older_names():
    r = record.run_record("finetune", {"model": Path("m"), "train": Train(), "lora": Lora(), "_callbacks": []},
                          time.time() - 3, outcome="running", device="cpu")
    assert set(record.COMMON_KEYS) <= set(r) and r["device"] == "cpu"
    assert r["job"] == r["command"] == "finetune"
    assert r["outcome"] == r["status"] == "running" and r["ended"] is None and r["finished"] is None
    # the settings groups come out flat, as the flags are named; paths absolute; private arguments left out
    assert r["args"]["lr"] == 1e-4 and r["args"]["lora_rank"] == 64 and "train" not in r["args"]
    assert Path(r["args"]["model"]).is_absolute() and "_callbacks" not in r["args"]
    assert r["versions"]["torch"] and r["versions"]["cla2"]
    done = record.run_record("eval", {"shots": 0}, time.time() - 3, time.time())
    assert done["outcome"] == "succeeded" and done["status"] == "complete" and done["finished"] == done["ended"]
    assert done["seconds"] >= 3 and done["command"] == "eval"


def test_write_and_read_back(tmp_path):
    r = record.run_record("merge", {"out": tmp_path}, time.time(), time.time(), base_model="/b")
    record.write(tmp_path, r)
    assert json.loads((tmp_path / "run.json").read_text()) == r
    assert record.read(tmp_path) == r == record.read(tmp_path / "run.json")


def test_older_records_read_with_the_common_keys(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "run.json").write_text(json.dumps({"command": "eval", "args": {"shots": 5}}))
    old_eval = record.read(tmp_path / "eval")
    assert old_eval["job"] == "eval" and old_eval["args"] == {"shots": 5} and old_eval["outcome"] is None
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "run.json").write_text(json.dumps({"job": "finetune", "status": "complete",
                                                          "finished": "2026-01-01T00:00:00Z", "args": {}}))
    old_ft = record.read(tmp_path / "ft")
    assert old_ft["outcome"] == "succeeded" and old_ft["ended"] == "2026-01-01T00:00:00Z"


def test_a_missing_or_broken_record_reads_as_none(tmp_path):
    assert record.read(tmp_path) is None
    (tmp_path / "run.json").write_text("{")
    assert record.read(tmp_path) is None
    (tmp_path / "run.json").write_text("[1]")
    assert record.read(tmp_path) is None
