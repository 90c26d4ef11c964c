"""The misspelt-variable check every role of the collection runs first (one copy, used by the
`cla2.mlu.known_vars` action and the job layer's `cla2_unknown_vars` filter).

Ansible's role argument validation checks the types of the variables a role declares, but says nothing
about one it does not know: `-e container_image_tarbal=...` would be ignored silently. A role's variables
all start with its prefix (`model_weights_`), its internal ones with the prefix and a second underscore
(`model_weights__known`), so every variable with the prefix that the role neither declares nor sets
itself is a misspelt name.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable


def closest(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to `name`, or None when none is close enough."""
    found = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=cutoff)
    return found[0] if found else None


def unknown_vars(given: Iterable[str], prefix: str, declared: Iterable[str], outputs: Iterable[str] = (),
                 others: Iterable[str] = ()) -> list[str]:
    """The names in `given` that start with `prefix` (not `prefix_`, the internal ones) and are neither
    declared nor set by the role itself (`outputs`), sorted. A name with a longer prefix in `others` is
    another role's (`cla2_runtime_image_repo` is cla2_runtime's, not the cla2 role's)."""
    public = re.compile(re.escape(prefix) + "[^_]")
    known = set(declared) | set(outputs)
    others = tuple(o for o in others if o.startswith(prefix) and o != prefix)
    return sorted({n for n in given if public.match(n) and n not in known and not n.startswith(others)})


def sibling_prefixes(roles_dir: str, prefix: str) -> list[str]:
    """The prefixes (`name_`) of the roles beside this one in `roles_dir` that extend `prefix`: their
    variables are theirs, not misspelt names of this role."""
    try:
        names = sorted(os.listdir(roles_dir))
    except OSError:
        return []
    return [n + "_" for n in names
            if (n + "_").startswith(prefix) and n + "_" != prefix and os.path.isdir(os.path.join(roles_dir, n, "tasks"))]


def renamed_vars(given: Iterable[str], old_prefix: str, prefix: str, declared: Iterable[str]) -> tuple[list[str], list[str]]:
    """The names in `given` with a role's former prefix (`runtime_` before the role became
    `cla2_runtime`): (those that have a declared new name, read through the role's defaults with a
    deprecation warning; those that have none: misspelt). Internal names (`runtime__x`) are ignored."""
    public = re.compile(re.escape(old_prefix) + "[^_]")
    declared = set(declared)
    old = sorted({n for n in given if public.match(n)})
    return ([n for n in old if prefix + n[len(old_prefix):] in declared],
            [n for n in old if prefix + n[len(old_prefix):] not in declared])


def unknown_vars_message(role: str, unknown: list[str], declared: Iterable[str], spec_file: str) -> str:
    """One error naming every unknown variable and, for each, the closest declared name."""
    declared = sorted(set(declared))
    hints = []
    for name in unknown:
        near = closest(name, declared)
        hints.append(f"{name}: did you mean {near}?" if near else f"{name}: no declared name is close")
    text = f"{role}: unknown variable(s) {', '.join(unknown)}: misspelt? {'; '.join(hints)}"
    return f"{text}{'' if text.endswith('?') else '.'} The role reads {', '.join(declared)} ({spec_file})"


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def set_by_tasks(documents: Iterable, prefix: str) -> set[str]:
    """Variables with `prefix` that task files (parsed YAML) set themselves: `register:` names and
    `set_fact` keys. A second run of a role in the same play sees them: they are not misspelt."""
    names: set[str] = set()
    for doc in documents:
        for task in _walk(doc):
            register = task.get("register")
            if isinstance(register, str):
                names.add(register)
            for key in ("ansible.builtin.set_fact", "ansible.legacy.set_fact", "set_fact"):
                if isinstance(task.get(key), dict):
                    names.update(str(k) for k in task[key])
    return {n for n in names if n.startswith(prefix)}


def declared_options(argument_specs: dict) -> set[str]:
    """Every option of every entry point of a role's argument_specs."""
    names: set[str] = set()
    for entry in (argument_specs or {}).values():
        names.update(((entry or {}).get("options") or {}).keys())
    return names
