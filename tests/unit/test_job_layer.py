"""The cla2 job layer's controller side (roles/cla2), in seconds and without a sandbox host:

- cla2_follow (plugins/action/cla2_follow.py) follows a job through thousands of poll rounds, run by
  ansible-playbook against 127.0.0.1, with a stand-in supervisor that keeps the files `cla2 run` keeps
  (flock(1) holding RUN/.lock-NAME, NAME.job.json, NAME.status.json, NAME.log); a job that fails, one whose
  supervisor dies and one that outlives the follow limit each end the play with what to do;
- the filters that check an operator's variables and a job's flags (plugins/filter/cla2_job.py);
- no task file includes itself (the old follower did, and died of Ansible's recursion limit).

molecule/jobs/tests/test_long_jobs.py runs the same against real jobs on a sandbox host.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "cla2"
sys.path.insert(0, str(ROOT / "plugins" / "filter"))
sys.path.insert(0, str(ROOT / "collections"))

from ansible.errors import AnsibleFilterError
from cla2_job import cla2_argv, cla2_unknown_vars

FLAGS = {
    "max-steps": {"type": "int"}, "lr": {"type": "float"}, "overwrite": {"type": "bool"},
    "gradient-checkpointing": {"type": "bool"}, "lora-targets": {"type": "list"},
    "dtype": {"type": "str", "choices": ["auto", "fp32", "fp16", "bf16"]}, "deepspeed": {"type": "str"},
    "gradient-accumulation-steps": {"type": "int"}, "benchmark": {"type": "str", "positional": True},
}


# --- a job followed to its end -------------------------------------------------------------------

def fake_job(run: Path, name: str, rounds: int, rc: int = 0, steps: int = 50) -> subprocess.Popen:
    """What `cla2 run` leaves: a supervisor holding the lock while a job writes its status, then the record.

    The job lasts ``rounds`` rounds of the follower, not a time: each round probes the lock with
    `flock -n RUN/.lock-NAME` (plugins/action/cla2_follow.py), which opens that file, and the job counts those
    opens (inotify IN_OPEN on the run folder; nothing else opens the lock once the stand-in supervisor holds
    it) and ends after the ``rounds``-th, its step moving from 1 to ``steps`` on the way. Returns once the job
    watches and has written its record, so that the follower's first round is counted."""
    script = textwrap.dedent("""
        import ctypes, json, os, struct, sys, time
        run, name, rounds, rc, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        lock = (".lock-" + name).encode()
        def write(path, obj):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(obj, f)
            os.replace(tmp, path)
        libc = ctypes.CDLL(None, use_errno=True)
        watch = libc.inotify_init1(os.O_CLOEXEC)
        if watch < 0 or libc.inotify_add_watch(watch, run.encode(), 0x20) < 0:  # IN_OPEN
            raise OSError(ctypes.get_errno(), "inotify on " + run)
        job = {"name": name, "argv": ["cla2", "finetune"], "pid": os.getpid(), "state": "running", "started": time.time()}
        seen = 0
        def progress():
            step = min(steps, seen * steps // max(rounds, 1) + 1)
            write(f"{run}/{name}.status.json", {"job": "finetune", "phase": "training", "step": step,
                  "total": steps, "unit": "step", "loss": 2.0 / step, "tokens_per_s": 1234.5, "eta_s": 5})
            with open(f"{run}/{name}.log", "a") as f:
                f.write(f"step {step}\\n")
        progress()
        write(f"{run}/{name}.job.json", job)
        while seen < rounds:
            events, at = os.read(watch, 65536), 0
            while at < len(events):
                size = struct.unpack_from("iIII", events, at)[3]
                seen += events[at + 16:at + 16 + size].rstrip(b"\\0") == lock
                at += 16 + size
            progress()
        write(f"{run}/{name}.job.json", {**job, "state": "succeeded" if rc == 0 else "failed", "rc": rc,
                                          "rounds_seen": seen})
    """)
    proc = subprocess.Popen(["flock", str(run / f".lock-{name}"), sys.executable, "-c", script, str(run), name,
                             str(rounds), str(rc), str(steps)])
    deadline = time.monotonic() + 60
    while not (run / f"{name}.job.json").exists():
        assert proc.poll() is None, f"the stand-in job exited with {proc.returncode} before it started"
        assert time.monotonic() < deadline, "the stand-in job did not start within 60 s"
        time.sleep(0.02)
    return proc


def follow(tmp_path: Path, run: Path, name: str, **options) -> subprocess.CompletedProcess:
    args = {"run_dir": str(run), "name": name, "poll": 0, "progress_seconds": 0, **options}
    play = tmp_path / "follow.yml"
    play.write_text(yaml.safe_dump([{
        "hosts": "all", "gather_facts": False,
        "tasks": [{"name": "Follow", "cla2.mlu.cla2_follow": args, "register": "followed"},
                  {"name": "Rounds", "ansible.builtin.debug": {"msg": "rounds={{ followed.rounds }}"}}]}]))
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "127.0.0.1,", "-c", "local",
                           str(play)], env=env, capture_output=True, text=True, timeout=300, check=False)


def test_a_job_is_followed_for_thousands_of_rounds_to_its_end(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    job = fake_job(run, "sft", rounds=2000)  # it ends after the follower's 2000th round, however long that takes
    res = follow(tmp_path, run, "sft")
    job.wait()
    assert res.returncode == 0, res.stdout[-3000:]
    rounds = int(re.search(r"rounds=(\d+)", res.stdout).group(1))
    seen = json.loads((run / "sft.job.json").read_text())["rounds_seen"]
    assert seen >= 2000 and rounds >= seen, (rounds, seen)
    # progress from the status file, on the operator's screen
    assert re.search(r"sft: training step \d+/50 \(\d+\.\d%\) · loss \d\.\d{4} · 1,234 tok/s · ETA 5s", res.stdout)
    assert f"succeeded (rc 0) after {rounds} poll rounds" in res.stdout
    assert "RecursionError" not in res.stdout + res.stderr


def test_a_failed_job_fails_the_play_with_its_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    job = fake_job(run, "eval", rounds=3, rc=3)
    res = follow(tmp_path, run, "eval", tail=2)
    job.wait()
    assert res.returncode != 0
    assert "eval failed on 127.0.0.1 (exit 3)" in res.stdout
    assert f"Log: {run}/eval.log" in res.stdout and "step " in res.stdout


def test_a_job_whose_supervisor_died_is_reported_as_stopped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "pt.job.json").write_text(json.dumps({"name": "pt", "state": "running", "pid": 1}))
    (run / "pt.log").write_text("step 7\n")
    res = follow(tmp_path, run, "pt")
    assert res.returncode != 0
    assert "pt on 127.0.0.1 stopped without finishing" in res.stdout
    assert "Re-run the same command" in res.stdout and "step 7" in res.stdout


def test_following_past_the_time_limit_leaves_the_job_running(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    job = fake_job(run, "sft", rounds=10**9)  # it cannot end while followed: only the time limit ends the follow
    try:
        res = follow(tmp_path, run, "sft", timeout=1, poll=0.1)
        assert res.returncode != 0
        assert "still runs after 1s of following (cla2_job_timeout); it goes on" in res.stdout
        assert job.poll() is None  # the job is not the follower's to stop
    finally:
        job.kill()


# --- variables and flags -------------------------------------------------------------------------

def test_flags_become_argv():
    argv = cla2_argv({"max_steps": 100, "lr": 1e-4, "gradient-checkpointing": True, "overwrite": False,
                      "lora-targets": ["q_proj", "v_proj"], "dtype": "fp16", "deepspeed": None}, "finetune", FLAGS)
    assert argv == ["--max-steps", "100", "--lr", "0.0001", "--gradient-checkpointing", "--no-overwrite",
                    "--lora-targets", "q_proj,v_proj", "--dtype", "fp16"]


def test_presets_apply_under_the_operator_s_flags():
    presets = [{"name": "a", "content": {"finetune": {"lr": 2e-4, "max-steps": 5}, "pretrain": {"lr": 1}}},
               {"name": "b", "content": {"finetune": {"gradient_accumulation_steps": 8}}}]
    argv = cla2_argv({"max_steps": 7}, "finetune", FLAGS, presets)
    assert argv == ["--lr", "0.0002", "--max-steps", "7", "--gradient-accumulation-steps", "8"]


@pytest.mark.parametrize("mapping, message", [
    ({"max-step": 3}, "cla2 finetune has no flag --max-step (did you mean --max-steps?)"),
    ({"max-steps": "many"}, "--max-steps takes an int, got 'many'"),
    ({"max-steps": 2.5}, "--max-steps takes an int, got 2.5"),
    ({"dtype": "fp8"}, "--dtype is one of auto, fp32, fp16, bf16, got 'fp8'"),
    ({"overwrite": "maybe"}, "--overwrite takes true or false"),
    ({"out": "/tmp/x"}, "--out is set by the playbook from cla2_run"),
    ({"benchmark": "ceval"}, "has no flag --benchmark"),
    (["--max-steps", "3"], "must be a mapping of flag name to value"),
])
def test_bad_flags_are_refused_with_what_to_change(mapping, message):
    with pytest.raises(AnsibleFilterError, match=re.escape(message)):
        cla2_argv(mapping, "finetune", FLAGS)


def test_the_cla2_runtime_roles_variables_are_not_the_job_layers():
    """The runtime role is cla2_runtime (0.2.0): its variables, set in the same inventory, share the cla2_ prefix
    and are left to its own check; a cla2_runtime name that is no variable of it is still refused here."""
    known = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    messages = cla2_unknown_vars(["cla2_runtime_env", "cla2_runtime_base_image", "cla2_runtimes"], list(known),
                                 roles_dir=str(ROOT / "roles"))
    assert [m.split(":")[0] for m in messages] == ["cla2_runtimes"]


def test_misspelt_variables_get_the_closest_name():
    known = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    messages = cla2_unknown_vars(["cla2_modle", "cla2_run", "cla2_max_steps", "cla2_qqqqqqqqqq"], list(known),
                                 {"finetune": FLAGS})
    assert messages == [
        ("cla2_max_steps: not a variable of the cla2 job layer (a flag of cla2 finetune? set it in the job's flag "
         "mapping: -e '{\"cla2_finetune_args\": {\"max-steps\": ...}}')"),
        "cla2_modle: not a variable of the cla2 job layer (did you mean cla2_model?)",
        "cla2_qqqqqqqqqq: not a variable of the cla2 job layer",
    ]


def test_every_variable_is_declared_and_defaulted():
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert set(defaults) <= set(specs)
    # the two kit-wide variables the inventory sets are declared so that they are not refused
    assert set(specs) - set(defaults) == {"cla2_data_root", "cla2_sandbox_fixtures"}
    used = set()
    jobs = ["finetune", "pretrain", "merge", "evaluate", "pipeline"]
    for path in list(ROLE.rglob("*.yml")) + [ROOT / "playbooks" / f"{job}.yml" for job in jobs]:
        used |= set(re.findall(r"(?<![\w.])cla2_(?!_)[a-z0-9_]+", path.read_text()))
    # every cla2_* name the job layer reads is declared (filters and lookups are not variables); cla2_runtime_*
    # are the cla2_runtime role's, which the job layer's check leaves to that role
    used = {name for name in used if not name.startswith("cla2_runtime_")}
    assert used - set(specs) <= {"cla2_argv", "cla2_unknown_vars", "cla2_follow", "cla2_runtime"}, used - set(specs)


def test_no_task_file_includes_itself():
    for path in list(ROOT.glob("roles/*/tasks/*.yml")) + list(ROOT.glob("playbooks/**/*.yml")):
        for task in re.findall(r"(?:include_tasks|import_tasks):\s*(\S+)", path.read_text()):
            assert Path(task.strip("'\"")).name != path.name, f"{path} includes itself"


# --- eval as the seed's: zero-shot, the validation split, the chat template for Alpaca models ---------

EVAL_FLAGS = {"shots": {"type": "int"}, "with-prompt": {"type": "bool"}, "do-test": {"type": "bool"},
              "subjects": {"type": "list"}, "benchmark": {"type": "str", "positional": True}}


def eval_argv(tmp_path: Path, model: str, template="auto", eval_args=None, presets=()) -> list[str]:
    """The eval flags tasks/eval_template.yml decides for `model` (on 127.0.0.1, no runtime needed)."""
    defaults = yaml.safe_load((ROLE / "tasks" / "flags.yml").read_text())
    layer = next(t for t in defaults if "cla2__job_defaults" in t.get("ansible.builtin.set_fact", {}))
    play = tmp_path / "eval_template.yml"
    play.write_text(yaml.safe_dump([{
        "hosts": "all", "gather_facts": False,
        "vars": {"cla2_eval_template": template, "cla2_eval_args": eval_args or {}, "cla2_eval_benchmark": "ceval",
                 "cla2_demo": False, "cla2__args": {"eval": []}, "cla2__flags": {"eval": EVAL_FLAGS},
                 "cla2__presets": list(presets),
                 "cla2__job_defaults": layer["ansible.builtin.set_fact"]["cla2__job_defaults"]},
        "tasks": [{"name": "Decide", "ansible.builtin.include_tasks": str(ROLE / "tasks" / "eval_template.yml"),
                   "vars": {"cla2__template_model": model}},
                  {"name": "Argv", "ansible.builtin.debug": {"msg": "ARGV={{ cla2__args.eval | join(' ') }}"}}]}],
                                  sort_keys=False))
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    res = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "127.0.0.1,", "-c", "local",
                          "-e", f"ansible_python_interpreter={sys.executable}", str(play)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return re.search(r"ARGV=(.*)$", res.stdout, re.MULTILINE).group(1).strip("'\"").split()


def merged(path: Path, base: Path) -> Path:
    """A model folder as cla2 merge leaves it: merge.json names the base model."""
    path.mkdir(parents=True)
    (path / "merge.json").write_text(json.dumps({"job": "merge", "adapter": str(path) + "-adapter",
                                                 "base_model": str(base)}))
    return path


def test_eval_is_the_seed_s_zero_shot_validation_with_the_template_for_alpaca(tmp_path):
    # the seed's run_mlu_eval*.sh: --few_shot False --with_prompt True --do_test False on chinese-alpaca-2-13b
    alpaca = tmp_path / "models" / "chinese-alpaca-2-13b"
    alpaca.mkdir(parents=True)
    assert eval_argv(tmp_path, str(alpaca)) == ["--shots", "0", "--with-prompt", "--no-do-test"]
    # a base LLaMA model: no chat template (upstream keeps it for Alpaca-2 models)
    llama = tmp_path / "models" / "chinese-llama-2-13b"
    llama.mkdir(parents=True)
    assert eval_argv(tmp_path, str(llama)) == ["--shots", "0", "--no-with-prompt", "--no-do-test"]
    # the run folder's name does not count, only model folders
    assert "--no-with-prompt" in eval_argv(tmp_path, str(merged(tmp_path / "alpaca-run" / "merged", llama)))


def test_a_cla2_merged_model_is_an_alpaca_model_when_its_base_is(tmp_path):
    alpaca = tmp_path / "models" / "Chinese-Alpaca-2-13B"
    alpaca.mkdir(parents=True)
    sft = merged(tmp_path / "run" / "merged-sft", alpaca)
    assert "--with-prompt" in eval_argv(tmp_path, str(sft))
    # PT on the SFT-merged model (cla2_pt_base: sft): two merges back
    assert "--with-prompt" in eval_argv(tmp_path, str(merged(tmp_path / "run" / "merged-pt", sft)))
    # a folder that does not exist yet (check mode) is not an Alpaca model by its own name
    assert "--no-with-prompt" in eval_argv(tmp_path, str(tmp_path / "run" / "merged-x"))


def test_the_eval_defaults_are_overridable(tmp_path):
    alpaca = tmp_path / "chinese-alpaca-2-13b"
    alpaca.mkdir()
    assert "--no-with-prompt" in eval_argv(tmp_path, str(alpaca), template=False)
    assert "--with-prompt" in eval_argv(tmp_path, str(tmp_path), template="true")
    # cla2_eval_args wins over the layer's defaults and over cla2_eval_template; null gives cla2's default
    assert eval_argv(tmp_path, str(alpaca), eval_args={"shots": 5, "with-prompt": None, "do-test": True}) == [
        "--shots", "5", "--do-test"]
    # a preset too
    preset = {"name": "p", "content": {"eval": {"with-prompt": False, "subjects": ["law"]}}}
    assert eval_argv(tmp_path, str(alpaca), presets=[preset]) == [
        "--shots", "0", "--no-with-prompt", "--no-do-test", "--subjects", "law"]


def test_an_unknown_eval_template_is_refused(tmp_path):
    with pytest.raises(AssertionError, match="cla2_eval_template: one of auto, true, false; got maybe"):
        eval_argv(tmp_path, str(tmp_path), template="maybe")


@pytest.mark.parametrize("pt_base, delta", [("stock", "+5.0"), ("sft", "-5.0")])
def test_the_comparison_compares_pt_with_the_model_it_trained(pt_base, delta):
    import jinja2

    def summary(score):
        return {"law": {"score": score, "num": 10, "correct": score / 10},
                "grouped": {}, "All": {"score": score / 100, "num": 10, "correct": score / 10}}

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROLE / "templates")), trim_blocks=True)
    text = env.get_template("comparison.md.j2").render(
        cla2__run_name="r", inventory_hostname="h", cla2__model_path="/data/models/chinese-alpaca-2-13b",
        cla2_pt_base=pt_base, cla2_eval_benchmark="ceval", cla2__args={"eval": ["--shots", "0", "--with-prompt"]},
        cla2__stage_summaries={"base": summary(40.0), "sft": summary(50.0), "pt": summary(45.0)})
    # pt (45) against the stock model (40) by default, as the seed trains it; against sft (50) with cla2_pt_base=sft
    assert f"| law | 10 | 40.0 | 50.0 | +10.0 | 45.0 | {delta} |" in text
    assert f"**45.0** | {delta} |" in text
    assert "`cla2 eval ceval --shots 0 --with-prompt`" in " ".join(text.split())
