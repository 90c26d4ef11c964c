"""One style for the names of plays, tasks, blocks and handlers (issue 16).

Every name is an imperative sentence:

- the first word is a verb, capitalised ("Install the driver package", "Wait for ...", "Refuse ...");
  VERBS below lists the verbs the kit uses: a new verb is added there on purpose;
- no trailing period;
- no "Label: sentence" prefix such as "Check mode: ..." or "Job: ..." (say "in check mode" in the
  sentence instead);
- a Jinja template only at the end of the name, after ": " or as the last words (ansible-lint's
  name[template]), e.g. "Show the job's output folder: {{ cla2__job_name }}".

Only the names of plays, tasks, blocks and handlers are read (walking plays, pre_tasks, tasks,
post_tasks, handlers, block, rescue and always), not data that happens to have a `name:` key
(support-matrix entries, model lists, include_role's `name:` argument, loop items).
A failure lists every offending name with its file.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

KIT = Path(__file__).resolve().parents[2]

FILES = [
    "roles/*/tasks/*.yml",
    "roles/*/handlers/*.yml",
    "playbooks/*.yml",
    "site.yml",
    "molecule/*/*.yml",
    "molecule/*/tasks/*.yml",
    "molecule/*/playbooks/*.yml",
]

# The verbs the kit's names start with. A new verb is added here on purpose (it must be a verb).
VERBS = {
    "Activate", "Add", "Ask", "Build", "Check", "Choose", "Compare", "Compute", "Configure", "Converge",
    "Convert", "Copy", "Create", "Decide", "Deploy", "Download", "Drain", "Enable", "Evaluate", "Fail",
    "Fetch", "Find", "Fine-tune", "Follow", "Gather", "Generate", "Install", "Keep", "Link", "List", "Load",
    "Look", "Make", "Manage", "Mark", "Measure", "Merge", "Name", "Parse", "Place", "Plan", "Pre-train",
    "Prepare", "Probe", "Provision", "Put", "Read", "Reboot", "Record", "Refuse", "Reinstall", "Reload",
    "Remove", "Report", "Resolve", "Restart", "Run", "Say", "Send", "Serve", "Set", "Show", "Split", "Start",
    "Stop", "Summarise", "Take", "Train", "Transfer", "Wait", "Weigh", "Write",
    "Give", "Hash", "Inspect", "Pack", "Plant", "Refresh", "Remember", "Repair", "Shrink", "Unpack",
}

TASK_LISTS = ("pre_tasks", "tasks", "post_tasks", "handlers")
BLOCK_KEYS = ("block", "rescue", "always")


def files() -> list[Path]:
    return sorted({path for pattern in FILES for path in KIT.glob(pattern) if path.name != "molecule.yml"})


def task_names(tasks, kind: str):
    """(kind, name) of each task, block and handler in a list, nested blocks included."""
    for task in tasks or []:
        if not isinstance(task, dict):
            continue
        is_block = any(key in task for key in BLOCK_KEYS)
        if isinstance(task.get("name"), str):
            yield ("block" if is_block else kind), task["name"]
        for key in BLOCK_KEYS:
            yield from task_names(task.get(key), kind)


def is_playbook(doc: list) -> bool:
    return any(isinstance(item, dict) and ("hosts" in item or any(key.endswith("import_playbook") for key in item))
               for item in doc)


def names(path: Path):
    """(kind, name) of every play, task, block and handler of one file."""
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, list):
        return
    if is_playbook(doc):
        for play in doc:
            if not isinstance(play, dict):
                continue
            if isinstance(play.get("name"), str):
                yield "play", play["name"]
            for key in TASK_LISTS:
                yield from task_names(play.get(key), "handler" if key == "handlers" else "task")
    else:
        yield from task_names(doc, "handler" if path.parent.name == "handlers" else "task")


def problems(name: str) -> list[str]:
    """What is wrong with one name; empty when it follows the style."""
    found = []
    start = name.find("{{")
    text = name if start < 0 else name[:start]  # the words before the template
    first = re.split(r"[\s,:]", name, maxsplit=1)[0]
    if first not in VERBS:
        found.append(f"the first word {first!r} is not a verb of VERBS")
    if name.rstrip().endswith("."):
        found.append("a trailing period")
    if re.match(r"\S+:", name) or name.startswith("Check mode"):
        found.append("a 'Label:' prefix")
    elif ": " in text.removesuffix(": "):
        found.append("a 'Label: sentence' (a colon before the end)")
    if start >= 0:
        if re.search(r"\w", re.sub(r"\{\{.*?\}\}", "", name[start:])):
            found.append("words after the template (ansible-lint name[template])")
        if not (text.endswith(": ") or re.search(r"\w \Z", text)):
            found.append("the template is not after ': ' or the last words")
    return found


def test_the_style_rules():
    for good in ["Install the driver package (.deb)", "Show the job's output folder: {{ cla2__job_name }}",
                 "Restart {{ replica.unit }}", "Record the merge record of {{ x }}", "Drain in HAProxy: {{ r }}"]:
        assert problems(good) == [], good
    for bad in ["Output folder: {{ x }}", "The merge record of {{ x }}", "Refused: {{ x }}", "Job: {{ x }}",
                "Check mode: the runtime image would be built", "Install the driver.", "Show {{ x }} and more",
                "Show the image, {{ x }}", "Run folder: {{ x }} of {{ y }}", "Check the state: a detail"]:
        assert problems(bad), bad


def test_the_files_are_found_and_read():
    found = {str(path.relative_to(KIT)) for path in files()}
    assert {"site.yml", "playbooks/provision.yml", "roles/container_engine/handlers/main.yml",
            "roles/cla2/tasks/job.yml", "molecule/default/prepare.yml"} <= found
    assert {"molecule/preflight_driver_failures/check-mode.yml", "molecule/image_weights_failures/converge.yml"} <= found
    assert sum(1 for path in files() for _ in names(path)) > 300


def test_every_play_task_block_and_handler_name_is_an_imperative_sentence():
    offending = [f"{path.relative_to(KIT)}: {kind} {name!r}: {'; '.join(wrong)}"
                 for path in files() for kind, name in names(path) if (wrong := problems(name))]
    assert not offending, f"{len(offending)} name(s) off the style:\n" + "\n".join(offending)
