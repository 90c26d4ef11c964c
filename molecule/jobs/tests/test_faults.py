"""Bad input and faults, driven through the kit's playbooks against the converged sandbox host:
a missing model fails before any container work, a failed job keeps its log and the play shows its tail,
a killed runtime container mid-training resumes from the last checkpoint, and a service whose model fails
to load makes the play fail with the cause from /health."""

import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
OUT = "/data/outputs"


def play(playbook, *extra, wait=True, check=False):
    """ansible-playbook PLAYBOOK -e EXTRA... against the scenario's host (wait=False: the running process,
    in a session of its own, as a terminal's foreground job is, so that a Ctrl-C can reach all of it)."""
    cmd = ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(ROOT / "playbooks" / playbook),
           "-e", "cla2_poll_seconds=2", "-e", "cla2_reports_dir=" + os.environ["MOLECULE_EPHEMERAL_DIRECTORY"] + "/reports"]
    for e in extra:
        cmd += ["-e", e]
    cmd += ["--check"] if check else []
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(ROOT / "roles")}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def test_missing_model_fails_before_the_container_work(host):
    res = play("finetune.yml", "cla2_run=fault-missing", "cla2_model=no-such-model",
               "cla2_data=cla2-demo/sft/train.jsonl")
    assert res.returncode != 0
    assert "/data/models/no-such-model" in res.stdout
    assert not host.file(f"{OUT}/fault-missing/sft.log").exists


def test_failed_job_keeps_its_log_and_the_play_shows_its_tail(host):
    # A folder with no C-Eval files: cla2 eval starts, fails, and says why.
    res = play("evaluate.yml", "cla2_run=fault-eval", "cla2_model=tiny-llama", "cla2_eval_data=cla2-demo/pt")
    assert res.returncode != 0
    log = host.file(f"{OUT}/fault-eval/eval.log")
    assert log.exists
    assert "no val files" in log.content_string
    assert "no val files" in res.stdout
    assert f"{OUT}/fault-eval/eval.log" in res.stdout
    assert not host.file(f"{OUT}/fault-eval/.done-eval").exists


def test_killed_training_resumes_from_its_last_checkpoint(host):
    args = ["cla2_run=fault-resume", "cla2_model=tiny-llama", "cla2_data=cla2-demo/sft/train.jsonl",
            '{"cla2_finetune_args": {"max-steps": 40, "save-steps": 2, "gradient-accumulation-steps": 1}}']
    proc = play("finetune.yml", *args, wait=False)
    try:
        for _ in range(300):
            if host.run(f"ls -d {OUT}/fault-resume/sft/checkpoint-* 2>/dev/null").stdout.strip():
                break
            time.sleep(1)
        else:
            raise AssertionError("no checkpoint appeared")
        host.check_output("docker kill cla2-runtime")
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0, out
    assert not host.file(f"{OUT}/fault-resume/.done-sft").exists
    res = play("finetune.yml", *args)
    assert res.returncode == 0, res.stdout[-3000:]
    run = json.loads(host.file(f"{OUT}/fault-resume/sft/run.json").content_string)
    assert run["resumed_from"] and "checkpoint-" in run["resumed_from"]
    assert host.file(f"{OUT}/fault-resume/sft.log").content_string.count("== start") == 2
    assert host.file(f"{OUT}/fault-resume/sft/adapter_model.safetensors").size > 0


def test_service_that_cannot_load_its_model_fails_with_the_cause(host):
    host.check_output("mkdir -p /data/models/broken && echo '{\"model_type\": \"llama\"}' > /data/models/broken/config.json")
    try:
        res = play("serve.yml", "inference_service_model=broken", "inference_service_name=cla2-broken",
                   "inference_service_port=19400", "inference_service_health_timeout=180")
        assert res.returncode != 0
        assert "did not load /data/models/broken" in res.stdout
        health = json.loads(host.check_output("curl -s http://127.0.0.1:19400/health"))
        assert health["status"] == "error" and health["error"]
    finally:
        # the endpoint and its replica units (cla2-broken, cla2-broken-r0)
        host.run("systemctl disable --now cla2-broken cla2-broken-r0; rm -f /etc/systemd/system/cla2-broken*.service; "
                 "systemctl daemon-reload")
