"""site.yml alone leaves a host that runs jobs: the runtime container is up on the image container_image
loaded, with cla2 installed, the data root mounted, and a job (batch generation on the model model_weights
placed) runs in it to the end. Runs unchanged against a real server (the model then is the first one the
inventory places; set CLA2_SITE_CHECK_MODEL to pick another)."""

from __future__ import annotations

import json
import os
import shlex

from _infra import ansible_var

CONTAINER = "cla2-runtime"


def data_root(host):
    return ansible_var(host, "cla2_runtime_data_root") or "/data"


def test_runtime_container_runs_on_the_loaded_image(host):
    state = json.loads(host.check_output(f"docker inspect {CONTAINER}"))[0]
    assert state["State"]["Running"], state["State"]
    base = "{}:{}".format(ansible_var(host, "container_image_name"), ansible_var(host, "container_image_tag"))
    # the runtime image is derived from the base image container_image loaded: its first layers are the base's
    derived = json.loads(host.check_output(f"docker image inspect {state['Image']}"))[0]["RootFS"]["Layers"]
    loaded = json.loads(host.check_output(f"docker image inspect {shlex.quote(base)}"))[0]["RootFS"]["Layers"]
    assert derived[: len(loaded)] == loaded, f"{CONTAINER} does not run on {base}"


def test_cla2_answers_in_the_container(host):
    env = json.loads(host.check_output(f"docker exec {CONTAINER} cla2 env --json"))
    assert env["torch"], env
    assert host.file("/etc/ansible/facts.d/cla2_runtime.fact").exists


def test_a_job_runs_on_the_placed_model(host):
    root = data_root(host)
    models = ansible_var(host, "model_weights_models", []) or []
    model = os.environ.get("CLA2_SITE_CHECK_MODEL") or next(m["name"] for m in models if m.get("kind", "model") == "model")
    out = f"{root}/outputs/site-check"
    prompts = json.dumps({"instruction": "你好"}, ensure_ascii=False)
    host.check_output(f"docker exec {CONTAINER} sh -c " + shlex.quote(
        f"mkdir -p {out} && printf '%s\\n' {shlex.quote(prompts)} > {out}/prompts.jsonl"))
    try:
        run = host.run(f"docker exec {CONTAINER} cla2 generate --model {root}/models/{model} "
                       f"--input {out}/prompts.jsonl --output {out}/answers.jsonl --max-new-tokens 4 "
                       "--replicas 1 --overwrite")
        assert run.rc == 0, run.stderr[-3000:]
        answers = [json.loads(line) for line in host.file(f"{out}/answers.jsonl").content_string.splitlines()]
        assert len(answers) == 1 and answers[0]["completion_tokens"] > 0, answers
    finally:
        host.run(f"rm -rf {out}")
