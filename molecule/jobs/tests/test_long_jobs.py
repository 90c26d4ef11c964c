"""Jobs that run for days, scaled to the sandbox: the job layer (roles/cla2) follows a training job for
hundreds of poll rounds (a 24-hour job at the default 10 s poll is 8640) with progress from its status
file; Ctrl-C on the controller leaves the job running and the same command again attaches to it, as does a
second controller at the same time, with still one trainer; the job's log, run.json, status and TensorBoard
files come back; a finished run is skipped with the same arguments and refused with others; misspelt
variables, flags and presets are refused before anything runs; and --check runs every job playbook on the
provisioned host without changing anything."""

import json
import os
import re
import shlex
import signal
import time
from pathlib import Path

import pytest
from test_faults import OUT, play

DEMO = ["cla2_model=tiny-llama", "cla2_data=cla2-demo/sft/train.jsonl"]
REPORTS = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/tmp")) / "reports" / "cla2-jobs-1"
# The rounds do not depend on the job's length: the test pauses the job (SIGSTOP to its process group) while
# the followers attach and lets it go on after they have made ROUNDS rounds each on average, counted on the host.
# 1300 steps only make sure that it is still training when the test pauses it, a moment after its first
# progress with an ETA.
STEPS = 1300
ROUNDS = 500
LONG = [json.dumps({"cla2_finetune_args": {"max-steps": STEPS, "save-steps": 650, "logging-steps": 5,
                                           "gradient-accumulation-steps": 1, "batch-size": 1}}),
        "cla2_poll_seconds=0.02", "cla2_progress_seconds=10"]
CONTAINER = "cla2-runtime"
# Counts the follower's rounds on the host: each round probes the job's lock with `flock -n RUN/.lock-NAME`
# (plugins/action/cla2_follow.py), which opens it, and nothing else opens it while the supervisor holds it.
# inotify IN_OPEN on the run folder; the count is written (whole) to OUT after each batch of events.
ROUND_COUNTER = r"""
import ctypes, os, struct, sys
folder, lock, out = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_CLOEXEC)
if fd < 0 or libc.inotify_add_watch(fd, folder.encode(), 0x20) < 0:
    raise OSError(ctypes.get_errno(), "inotify on " + folder)
seen = 0
while True:
    with open(out + ".tmp", "w") as f:
        f.write(str(seen))
    os.replace(out + ".tmp", out)
    events, at = os.read(fd, 65536), 0
    while at < len(events):
        size = struct.unpack_from("iIII", events, at)[3]
        seen += events[at + 16:at + 16 + size].rstrip(b"\0") == lock
        at += 16 + size
"""
COUNT_FILE = "/tmp/cla2-long-rounds"


def said(res):
    """The play's output with the callback's YAML line wrapping and quote doubling undone."""
    return " ".join(res.stdout.split()).replace("''", "'")


def status(host, run, name):
    text = host.run(f"cat {OUT}/{run}/{name}.status.json 2>/dev/null").stdout
    return json.loads(text) if text.strip() else {}


def lock_held(host, run, name):
    return host.run(f"flock -n {OUT}/{run}/.lock-{name} true").rc != 0


def signal_job(host, pid, sig):
    """``sig`` to the job's process group (the supervisor makes the job a group leader) in the container."""
    host.check_output(f"docker exec {CONTAINER} python3 -c "
                      f"{shlex.quote(f'import os, signal; os.killpg({int(pid)}, signal.{sig.name})')}")


def start_round_counter(host, run, name):
    """ROUND_COUNTER in the background on the host; returns its pid once it watches (its count file is 0)."""
    host.check_output(f"rm -f {COUNT_FILE}")
    pid = int(host.check_output(
        f"setsid nohup python3 -c {shlex.quote(ROUND_COUNTER)} {OUT}/{run} .lock-{name} {COUNT_FILE} "
        f">{COUNT_FILE}.log 2>&1 < /dev/null & echo $!"))
    for _ in range(600):
        if host.run(f"cat {COUNT_FILE} 2>/dev/null").stdout.strip() == "0":
            return pid
        assert host.run(f"kill -0 {pid}").rc == 0, host.run(f"cat {COUNT_FILE}.log").stdout
        time.sleep(0.1)
    raise AssertionError("the round counter did not start")


def test_a_misspelt_variable_is_refused_before_anything_runs(host):
    res = play("finetune.yml", "cla2_run=misspelt", *DEMO, "cla2_epoch=3")
    assert res.returncode != 0
    assert "cla2_epoch: not a variable of the cla2 job layer (a flag of cla2 finetune?" in said(res)
    assert '{"cla2_finetune_args": {"epochs": ...}}' in said(res)
    res = play("finetune.yml", "cla2_run=misspelt", *DEMO, "cla2_modle=tiny-llama")
    assert res.returncode != 0
    assert "cla2_modle: not a variable of the cla2 job layer (did you mean cla2_model?)" in said(res)
    assert not host.file(f"{OUT}/misspelt").exists


@pytest.mark.parametrize("extra, message", [
    ('{"cla2_finetune_args": {"max-step": 3}}', "cla2 finetune has no flag --max-step (did you mean --max-steps?)"),
    ('{"cla2_finetune_args": {"dtype": "fp8"}}', "--dtype is one of auto, fp32, fp16, bf16, got 'fp8'"),
    ("cla2_preset=seed-13b-sfx", "no preset seed-13b-sfx"),
])
def test_a_bad_flag_or_preset_is_refused_before_anything_runs(host, extra, message):
    res = play("finetune.yml", "cla2_run=badflag", *DEMO, extra)
    assert res.returncode != 0
    assert message in said(res)
    assert not host.file(f"{OUT}/badflag").exists


def test_a_long_job_survives_ctrl_c_and_every_controller_attaches_to_it(host):
    args = ["cla2_run=long", *DEMO, *LONG]
    first = play("finetune.yml", *args, wait=False)
    paused = counter = None
    try:
        try:
            for _ in range(1200):
                progress = status(host, "long", "sft")
                if progress.get("phase") == "training" and None not in (
                        progress.get("loss"), progress.get("tokens_per_s"), progress.get("eta_s")):
                    break
                time.sleep(0.5)
            else:
                raise AssertionError("the job never reported training with its loss, speed and ETA")
            paused = json.loads(host.file(f"{OUT}/long/sft.job.json").content_string)["pid"]
            signal_job(host, paused, signal.SIGSTOP)  # it waits for the followers' rounds, however slow they are
            progress = status(host, "long", "sft")
            assert progress.get("phase") == "training" and progress["step"] < STEPS, progress
            os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in the operator's terminal
            first.communicate(timeout=120)
        finally:
            if first.poll() is None:
                first.kill()
        # the controller is gone; the job is not
        job = json.loads(host.file(f"{OUT}/long/sft.job.json").content_string)
        assert job["state"] == "running" and lock_held(host, "long", "sft")

        # the same command again, and a second controller at the same time: both attach to the one job, which
        # goes on once they have made 2 * ROUNDS rounds (so one of them at least ROUNDS)
        counter = start_round_counter(host, "long", "sft")
        again, other = play("finetune.yml", *args, wait=False), play("finetune.yml", *args, wait=False)
        try:
            deadline = time.monotonic() + 1200
            while int(host.run(f"cat {COUNT_FILE}").stdout.strip() or 0) < 2 * ROUNDS:
                ended = [p for p in (again, other) if p.poll() is not None]
                assert not ended, ended[0].communicate()[0][-3000:]
                assert time.monotonic() < deadline, "the followers did not make their rounds within 1200 s"
                time.sleep(0.5)
            signal_job(host, paused, signal.SIGCONT)
            paused = None
            outs = [p.communicate(timeout=1200)[0] for p in (again, other)]
        finally:
            for p in (again, other):
                if p.poll() is None:
                    p.kill()
    finally:
        if paused is not None:
            signal_job(host, paused, signal.SIGCONT)
        if counter is not None:
            host.run(f"kill {counter}")
    for p, out in zip((again, other), outs):
        assert p.returncode == 0, out[-3000:]
        assert "already running (pid" in out and "attached to it" in out
    assert host.file(f"{OUT}/long/sft.log").content_string.count("== start") == 1  # one trainer, ever
    rounds = [int(n) for out in outs for n in re.findall(r"sft: succeeded \(rc 0\) after (\d+) poll rounds", out)]
    assert len(rounds) == 2 and sum(rounds) >= 2 * ROUNDS and max(rounds) >= ROUNDS, rounds
    # progress came from the status file while it ran (the first round of each follower shows it)
    assert re.search(rf"sft: training step \d+/{STEPS} \(\d+\.\d%\) · loss \d+\.\d{{4}} · [\d,]+ tok/s · ETA",
                     outs[0])

    final = status(host, "long", "sft")
    assert final["phase"] == "done" and final["step"] == final["total"] == STEPS
    reports = REPORTS / "long"
    assert "== end" in (reports / "sft.log").read_text()
    assert json.loads((reports / "sft.job.json").read_text())["state"] == "succeeded"
    assert json.loads((reports / "sft.status.json").read_text())["phase"] == "done"
    run = json.loads((reports / "sft" / "run.json").read_text())
    assert run["job"] == "finetune" and run["outcome"] == "succeeded" and run["versions"]
    assert list((reports / "sft").rglob("events.out.tfevents.*")), "no TensorBoard files fetched"
    assert (reports / "sft" / "loss.png").exists()

    # finished: the same arguments skip it, other arguments are refused and change nothing
    res = play("finetune.yml", *args)
    assert res.returncode == 0 and "finished earlier with the same arguments: skipped" in res.stdout
    res = play("finetune.yml", "cla2_run=long", *DEMO, '{"cla2_finetune_args": {"max-steps": 3}}')
    assert res.returncode != 0
    assert "already finished with other arguments" in res.stdout
    assert json.loads(host.file(f"{OUT}/long/.done-sft").content_string)["argv"][-1] == "--resume"


CONVERGED = ["cla2_run=molecule", "cla2_demo=true", "cla2_nproc_per_node=2",
             '{"cla2_finetune_args": {"max-steps": 2, "save-steps": 1, "deepspeed": "zero3"}, '
             '"cla2_pretrain_args": {"max-steps": 2, "save-steps": 1, "deepspeed": "zero3"}, '
             '"cla2_generate_args": {"max-new-tokens": 8}}',
             "inference_service_api_key=molecule-secret", "inference_service_bind_address=0.0.0.0"]


@pytest.mark.parametrize("playbook, extra", [
    ("finetune.yml", ["cla2_run=molecule", *DEMO]),
    ("pretrain.yml", ["cla2_run=molecule", "cla2_model=tiny-llama", "cla2_data=cla2-demo/pt",
                      "cla2_preset=seed-13b-pt", '{"cla2_pretrain_args": {"max-steps": 2}}']),
    ("merge.yml", ["cla2_run=molecule", "cla2_adapter=molecule/sft", "cla2_job_name=merged-sft"]),
    ("evaluate.yml", ["cla2_run=molecule", "cla2_model=tiny-llama", "cla2_eval_data=cla2-demo/ceval",
                      "cla2_job_name=eval-base"]),
    ("pipeline.yml", CONVERGED),
    ("pipeline.yml", [*CONVERGED, "cla2_pt_base=sft"]),
])
def test_check_mode_runs_every_job_playbook_and_changes_nothing(host, playbook, extra):
    before = host.check_output(f"find {OUT} -newer /etc/hostname | wc -l")
    res = play(playbook, *extra, check=True)
    assert res.returncode == 0, res.stdout[-3000:]
    recap = re.search(r"cla2-jobs-1\s*:\s*ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0", res.stdout)
    assert recap and recap.group(1) == "0", res.stdout[-3000:]
    assert "check mode:" in res.stdout  # what a run would do
    assert host.check_output(f"find {OUT} -newer /etc/hostname | wc -l") == before
    if playbook == "pretrain.yml":  # the preset's flags under the operator's
        assert "--lr 0.0002" in said(res) and "--block-size 1024" in said(res) and "--max-steps 2" in said(res)
    if playbook in ("evaluate.yml", "pipeline.yml"):  # the seed's eval: zero-shot, validation, no template for LLaMA
        assert "--shots 0 --no-with-prompt --no-do-test" in said(res)
    if playbook == "pipeline.yml":  # PT trains the stock model (the seed's), or the SFT-merged one when asked
        base = f"{OUT}/molecule/merged-sft" if "cla2_pt_base=sft" in extra else "/data/models/tiny-llama"
        assert re.search(rf"-m cla2 pretrain --model {re.escape(base)} --data ", said(res)), said(res)[-3000:]
