"""`cla2 flags`: each job's flags as data, so that the Ansible layer can turn an operator's mapping
{flag-name: value} into an argv, and refuse a misspelt flag (naming the closest valid one) before anything
runs, rather than learning of it from argparse hours into a playbook.

The description is read off the very parser that `cla2 JOB --help` uses (cli.add_function_arguments on the
job's main), so the two cannot drift apart. For each flag, by its name without the leading dashes:

  type        int | float | str | path | bool | list. bool flags take no value: emit --flag or --no-flag.
              list flags take one comma-joined value (--devices 0,1); "item" is the type of an element.
  required    whether the job refuses to start without it.
  default     the value when it is not given (null: none, or the job decides).
  choices     the allowed values, or null.
  positional  true for a positional argument (`cla2 eval ceval`): emit its value, without a flag, first.
  help        the flag's help text, as in --help.

`cla2 run` and `cla2 flags` themselves are not jobs the Ansible layer passes flags to, and are left out.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json as jsonlib
from pathlib import Path

from cla2 import cli

_NOT_JOBS = ("run", "flags")
_TYPES = {int: "int", float: "float", str: "str", Path: "path"}


def jobs() -> list[str]:
    """The jobs whose flags `cla2 flags` describes."""
    return [j for j in cli.COMMANDS if j not in _NOT_JOBS]


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _type_name(tp) -> str:
    return _TYPES.get(tp, "str")


def describe(job: str) -> dict[str, dict]:
    """{flag-name: {"type", "required", "default", "choices", "positional", "help"[, "item"]}} of ``job``."""
    if job not in jobs():
        close = difflib.get_close_matches(job, jobs(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"{job!r} is not a job{hint}; the jobs are: {', '.join(jobs())}")
    parser = argparse.ArgumentParser(prog=f"cla2 {job}")
    cli.add_function_arguments(parser, importlib.import_module(cli.COMMANDS[job]).main)
    flags: dict[str, dict] = {}
    for action in parser._actions:  # argparse keeps no public list of a parser's arguments
        if isinstance(action, argparse._HelpAction):
            continue
        positional = not action.option_strings
        entry: dict = {}
        if isinstance(action, argparse.BooleanOptionalAction):
            entry["type"] = "bool"
        elif isinstance(action.type, cli.CommaList):
            entry["type"], entry["item"] = "list", _type_name(action.type.item)
        elif action.nargs in ("+", "*"):
            entry["type"], entry["item"] = "list", _type_name(action.type)
        elif action.choices is not None:
            entry["type"] = _type_name(type(next(iter(action.choices))))
        else:
            entry["type"] = _type_name(action.type)
        entry["required"] = action.nargs not in ("?", "*") if positional else bool(action.required)
        entry["default"] = _jsonable(action.default)
        entry["choices"] = _jsonable(list(action.choices)) if action.choices is not None else None
        entry["positional"] = positional
        entry["help"] = action.help or ""
        flags[action.dest if positional else action.option_strings[0][2:]] = entry
    return flags


def _table(job: str, flags: dict[str, dict]) -> str:
    rows = []
    for name, f in flags.items():
        shown = name.upper() if f["positional"] else ("--[no-]" if f["type"] == "bool" else "--") + name
        kind = "{" + ",".join(map(str, f["choices"])) + "}" if f["choices"] else f["type"]
        if f["type"] == "list":
            kind = f"list of {f['item']}" + (" (comma-joined)" if not f["positional"] else "")
        default = jsonlib.dumps(f["default"], ensure_ascii=False)
        default = default if len(default) <= 24 else default[:21] + "..."
        need = "required" if f["required"] else f"default {default}"
        rows.append((shown, kind, need, " ".join(f["help"].split())))
    widths = [max(len(r[i]) for r in rows) for i in range(3)] if rows else [0, 0, 0]
    lines = [f"cla2 {job}"]
    lines += [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)


def main(job: list[str], /, *, json: bool = False) -> dict:
    """Describe the flags of one or more jobs: type, required, default, choices, positional, help.

    With --json, prints {job: {flag-name: {"type": int|float|str|path|bool|list, "required", "default",
    "choices", "positional", "help"}}}; see `pydoc cla2.flags`. Read off the same parser as `cla2 JOB --help`.

    Args:
        job: The jobs to describe, e.g. finetune eval.
        json: Print JSON instead of a table.
    """
    wanted = list(dict.fromkeys(job))
    unknown = [j for j in wanted if j not in jobs()]
    if unknown:
        describe(unknown[0])  # raises, naming the jobs
    result = {j: describe(j) for j in wanted}
    if json:
        print(jsonlib.dumps(result, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(_table(j, f) for j, f in result.items()))
    return result
