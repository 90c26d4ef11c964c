"""`cla2 flags`: the jobs' flags as data, read off the same parser as `cla2 JOB --help`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cla2 import cli, flags


def cla2(*args: str) -> subprocess.CompletedProcess:
    # wide enough that argparse does not wrap a flag's name
    return subprocess.run([sys.executable, "-m", "cla2", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "400"})


def test_json_describes_finetune_and_eval():
    p = cla2("flags", "finetune", "eval", "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert list(data) == ["finetune", "eval"]
    ft = data["finetune"]
    assert ft["max-steps"] == {"type": "int", "required": False, "default": -1, "choices": None,
                               "positional": False, "help": ft["max-steps"]["help"]}
    assert "Optimizer steps" in ft["max-steps"]["help"]
    gas = ft["gradient-accumulation-steps"]
    assert gas["type"] == "int" and gas["default"] == 8
    assert ft["lr"]["type"] == "float"
    assert ft["model"]["type"] == "path" and ft["model"]["required"] is True
    assert ft["overwrite"]["type"] == "bool" and ft["overwrite"]["default"] is False
    assert ft["group-by-length"]["type"] == "bool" and ft["group-by-length"]["default"] is True
    assert ft["dtype"]["choices"] == ["auto", "fp32", "fp16", "bf16"] and ft["dtype"]["type"] == "str"
    assert ft["deepspeed"]["type"] == "str" and ft["deepspeed"]["default"] == "auto"
    assert ft["lora-targets"]["type"] == "list" and ft["lora-targets"]["item"] == "str"
    assert "q_proj" in ft["lora-targets"]["default"]
    assert "callbacks" not in ft and "_callbacks" not in ft
    ev = data["eval"]
    assert next(iter(ev)) == "benchmark"
    assert ev["benchmark"]["positional"] is True and ev["benchmark"]["required"] is True
    assert ev["benchmark"]["choices"] == ["ceval", "cmmlu"]
    assert ev["devices"]["type"] == "list" and ev["devices"]["item"] == "int"
    assert ev["shots"]["type"] == "int" and not ev["shots"]["positional"]


def test_every_flag_of_finetune_help_is_described():
    p = cla2("finetune", "--help")
    assert p.returncode == 0
    options = p.stdout.split("\noptions:\n", 1)[1]
    shown = set(re.findall(r"^  (?:-h, )?--([a-z][a-z0-9-]*)", options, re.M)) - {"help"}
    shown = {f for f in shown if not f.startswith("no-")}
    described = set(flags.describe("finetune"))
    assert shown and shown == described


def _sample(f: dict) -> tuple[str, object]:
    """A command-line value for a described flag, and what the parser must make of it."""
    if f["choices"]:
        return str(f["choices"][0]), f["choices"][0]
    if f["type"] == "list":
        return ("1,2", [1, 2]) if f["item"] == "int" else ("a,b", ["a", "b"])
    return {"int": ("3", 3), "float": ("0.5", 0.5), "str": ("x", "x"), "path": ("p", Path("p"))}[f["type"]]


@pytest.mark.parametrize("job", flags.jobs())
def test_an_argv_built_from_the_description_parses_as_described(job):
    """What the Ansible side emits from the description (--flag VALUE, comma-joined lists, --no-flag for
    a bool, positionals first) is what the job's own parser accepts, with the values it expects."""
    described = flags.describe(job)
    assert described, f"{job} has no flags"
    argv, expected = [job], {}
    for name, f in described.items():
        assert {"type", "required", "default", "choices", "positional", "help"} <= f.keys()
        json.dumps(f)
        dest = name.replace("-", "_")
        if f["type"] == "bool":
            argv.append(f"--no-{name}")
            expected[dest] = False
            continue
        text, value = _sample(f)
        argv += [text] if f["positional"] else [f"--{name}", text]
        expected[dest] = value
    parsed = vars(cli.build_parser(argv).parse_args(argv))
    for dest, value in expected.items():
        assert parsed[dest] == value, (job, dest)


def test_unknown_job_is_refused_with_the_list():
    p = cla2("flags", "finetun", "--json")
    assert p.returncode == 2
    assert "'finetun' is not a job (did you mean finetune?)" in p.stderr
    assert "env, plan, tiny, finetune" in p.stderr and p.stdout == ""


def test_run_and_flags_are_not_jobs_for_flags():
    assert "run" not in flags.jobs() and "flags" not in flags.jobs()
    with pytest.raises(ValueError, match="the jobs are"):
        flags.describe("run")


def test_table_lists_the_flags(capsys):
    flags.main(["eval"])
    text = capsys.readouterr().out
    assert text.startswith("cla2 eval\n")
    assert re.search(r"^  BENCHMARK +\{ceval,cmmlu\} +required", text, re.M)
    assert re.search(r"^  --\[no-\]overwrite +bool +default false", text, re.M)
    assert re.search(r"^  --devices +list of int \(comma-joined\) +default null", text, re.M)
