"""Filters of the cla2 job layer: checking an operator's variables and flags before anything runs.

Ansible's role argument validation (meta/argument_specs.yml) checks the types of the variables a role
declares, but says nothing about a variable it does not know: `-e cla2_epoch=3` would be silently
ignored. `cla2_unknown_vars` finds those (the collection's one check, module_utils/known_vars.py, which
the other roles run as the cla2.mlu.known_vars action) and names the closest valid one, or the job flag
the name looks like. `cla2_argv` turns a job's
flag mapping ({max-steps: 100, gradient-checkpointing: true}) into argv for `cla2 JOB`, checked against
the flags the deployed runtime declares (`cla2 flags JOB --json`), so every flag of `cla2 JOB --help`
can be set and a misspelt or mistyped one is refused before the job starts.
"""

from __future__ import annotations

import difflib

from ansible.errors import AnsibleFilterError
from ansible_collections.cla2.mlu.plugins.module_utils.known_vars import sibling_prefixes, unknown_vars

# Flags the job layer sets itself from the playbook's variables (paths resolved under the data root,
# the resume of a re-run): a mapping may not set them.
RESERVED = {
    "model": "cla2_model", "data": "cla2_data (or the pipeline's cla2_sft_data / cla2_pt_data / cla2_eval_data)",
    "out": "cla2_run and cla2_job_name", "adapter": "cla2_adapter", "resume": "nothing (a re-run resumes)",
    "input": "cla2_prompts", "output": "cla2_run",
}


def _suggest(name: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""


def cla2_unknown_vars(names, known, flags=None, roles_dir=None):
    """Messages for the cla2_* variables in `names` that the job layer does not declare (`known`);
    `flags` ({job: {flag: spec}}) adds a hint when the name looks like a job's flag. The variables of the
    roles beside it in `roles_dir` whose prefix extends cla2_ (cla2_runtime_*) are theirs."""
    flags = flags or {}
    messages = []
    bare_known = {k.removeprefix("cla2_"): k for k in known}

    def score(a, b):
        return difflib.SequenceMatcher(None, a, b).ratio()

    others = sibling_prefixes(roles_dir, "cla2_") if roles_dir else ()
    for name in unknown_vars(names, "cla2_", known, others=others):
        bare = name.removeprefix("cla2_")
        # the closest declared variable, and the closest flag of a job (cla2_max_steps: a flag given as a
        # variable of its own); the closer of the two is the hint
        var = max(bare_known, key=lambda k: score(bare, k), default=None)
        flag = max(((job, f) for job, spec in flags.items() for f in spec
                    if f not in RESERVED and not spec[f].get("positional")),
                   key=lambda jf: score(bare.replace("_", "-"), jf[1]), default=None)
        var_score = score(bare, var) if var else 0
        flag_score = score(bare.replace("_", "-"), flag[1]) if flag else 0
        hint = ""
        if flag_score >= 0.75 and flag_score > var_score:
            hint = (f" (a flag of cla2 {flag[0]}? set it in the job's flag mapping: "
                    f"-e '{{\"cla2_{flag[0]}_args\": {{\"{flag[1]}\": ...}}}}')")
        elif var_score >= 0.7:
            hint = f" (did you mean {bare_known[var]}?)"
        messages.append(f"{name}: not a variable of the cla2 job layer{hint}")
    return messages


def _value(job, flag, spec, value):
    kind = spec.get("type", "str")
    if kind in ("int", "float"):
        try:
            number = (int if kind == "int" else float)(value)
        except (TypeError, ValueError):
            raise AnsibleFilterError(f"cla2_{job}_args: --{flag} takes a{'n' if kind == 'int' else ''} {kind}, "
                                     f"got {value!r}") from None
        if kind == "int" and isinstance(value, float) and value != number:
            raise AnsibleFilterError(f"cla2_{job}_args: --{flag} takes an int, got {value!r}")
        return str(number)
    if kind == "list":
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        return ",".join(str(v) for v in items)
    if isinstance(value, (dict, list)):
        raise AnsibleFilterError(f"cla2_{job}_args: --{flag} takes one {kind}, got {value!r}")
    text = str(value)
    choices = spec.get("choices")
    if choices and text not in [str(c) for c in choices]:
        raise AnsibleFilterError(f"cla2_{job}_args: --{flag} is one of {', '.join(map(str, choices))}, "
                                 f"got {text!r}")
    return text


def _flag(key) -> str:
    return str(key).removeprefix("--").replace("_", "-")


def cla2_argv(mapping, job, flags, presets=None):
    """argv for `cla2 JOB` from {flag: value} over the JOB flags of `presets` (loaded preset files,
    [{name, content}], later ones winning); `flags` is `cla2 flags --json`'s entry for JOB.

    Keys may use - or _ (`max_steps` = `max-steps`); None leaves a flag at cla2's default; a bool flag
    becomes --flag / --no-flag; a list is comma-joined.
    """
    if mapping in (None, ""):
        mapping = {}
    if not isinstance(mapping, dict):
        raise AnsibleFilterError(f"cla2_{job}_args must be a mapping of flag name to value "
                                 f"(e.g. {{max-steps: 100}}), got {mapping!r}")
    merged = _preset_args(presets, job)
    merged.update({_flag(k): v for k, v in mapping.items()})
    argv = []
    for flag, value in merged.items():
        if flag in RESERVED:
            raise AnsibleFilterError(f"cla2_{job}_args: --{flag} is set by the playbook from {RESERVED[flag]}")
        spec = flags.get(flag)
        if spec is None or spec.get("positional"):
            raise AnsibleFilterError(f"cla2_{job}_args: cla2 {job} has no flag --{flag}"
                                     f"{_suggest(flag, [f for f, s in flags.items() if not s.get('positional')], '--')}"
                                     f"; `cla2 {job} --help` lists them")
        if value is None:
            continue
        if spec.get("type") == "bool":
            if not isinstance(value, bool) and str(value).lower() not in ("true", "false", "yes", "no"):
                raise AnsibleFilterError(f"cla2_{job}_args: --{flag} takes true or false, got {value!r}")
            on = value if isinstance(value, bool) else str(value).lower() in ("true", "yes")
            argv.append(f"--{flag}" if on else f"--no-{flag}")
            continue
        argv += [f"--{flag}", _value(job, flag, spec, value)]
    return argv


def _preset_args(presets, job):
    """The flags of `job` from loaded presets [{name, content}], later presets overriding earlier ones."""
    merged = {}
    for preset in presets or []:
        content = preset.get("content") or {}
        if not isinstance(content, dict) or not all(isinstance(v, dict) for v in content.values()):
            raise AnsibleFilterError(f"preset {preset.get('name')}: a mapping of job name to its flags "
                                     f"(finetune: {{lr: 1e-4}}), got {content!r}")
        merged.update({_flag(k): v for k, v in (content.get(job) or {}).items()})
    return merged


class FilterModule:
    def filters(self):
        return {"cla2_unknown_vars": cla2_unknown_vars, "cla2_argv": cla2_argv}
