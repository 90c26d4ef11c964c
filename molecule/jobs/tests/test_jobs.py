"""Verify the jobs scenario: runtime container, jobs' outputs and reports, the inference service."""

import json
import os
from pathlib import Path

import pytest

DATA = "/data"
RUN = f"{DATA}/outputs/molecule"
CONTAINER = "cla2-runtime"


def inspect(host, name):
    out = host.check_output(f"docker inspect {name}")
    return json.loads(out)[0]


def test_runtime_container_running_unprivileged_and_confined(host):
    info = inspect(host, CONTAINER)
    assert info["State"]["Running"]
    hc = info["HostConfig"]
    assert hc["Privileged"] is False
    assert hc["NetworkMode"] == "none"  # loopback only: what a job's ranks listen on stays inside (issue 24 row 14)
    assert hc["RestartPolicy"]["Name"] == "unless-stopped"
    # its own IPC namespace (a job's ranks share it) with a /dev/shm big enough for their buffers
    assert hc["IpcMode"] == "private" and hc["ShmSize"] == 32 * 1024**3
    assert "no-new-privileges" in hc["SecurityOpt"] and hc["CapDrop"] == ["ALL"] and not hc["CapAdd"]
    assert hc["PidsLimit"] == 32768
    memtotal_kib = int(host.check_output("awk '/^MemTotal:/ {print $2}' /proc/meminfo"))
    assert hc["Memory"] == int(memtotal_kib * 0.9) * 1024 == hc["MemorySwap"]
    # what a job runs as: no capability, none to gain
    status = host.check_output(f"docker exec {CONTAINER} cat /proc/self/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["CapEff"].strip() == "0000000000000000" and fields["NoNewPrivs"].strip() == "1"


def test_runtime_container_gets_exactly_the_host_devices(host):
    on_host = sorted(host.check_output("ls -1 /dev | grep '^cambricon_' || true").split())
    assert on_host == ["cambricon_ctl", "cambricon_dev0", "cambricon_dev1", "cambricon_ipcm0"]
    passed = sorted(d["PathOnHost"] for d in inspect(host, CONTAINER)["HostConfig"]["Devices"])
    assert passed == [f"/dev/{d}" for d in on_host]
    in_container = host.check_output(f"docker exec {CONTAINER} sh -c 'ls -1 /dev | grep ^cambricon_'").split()
    assert sorted(in_container) == on_host


def test_runtime_container_mounts_data_and_cnmon(host):
    mounts = {m["Destination"]: m for m in inspect(host, CONTAINER)["Mounts"]}
    for sub in ("models", "datasets", "outputs"):
        assert mounts[f"{DATA}/{sub}"]["Source"] == f"{DATA}/{sub}"
        assert mounts[f"{DATA}/{sub}"]["RW"] is True
    assert mounts["/usr/bin/cnmon"]["RW"] is False
    assert "0 cards" in host.check_output(f"docker exec {CONTAINER} cnmon")


def test_wheel_in_container_is_the_one_on_the_host(host):
    fact = json.loads(host.file("/etc/ansible/facts.d/cla2_runtime.fact").content_string)
    wheel = fact["wheel"]
    version = wheel.split("-")[1]
    shown = host.check_output(f"docker exec {CONTAINER} python3 -m pip show cla2")
    assert f"Version: {version}" in shown
    assert host.file(f"/opt/cla2/dist/{wheel}").exists
    # The image's torch (the CPU stand-in for Cambricon's) was not replaced by the install.
    torch = host.check_output(f"docker exec {CONTAINER} python3 -c 'import torch; print(torch.__version__)'")
    assert torch.strip() == "2.13.0+cpu"
    env = json.loads(host.check_output(f"docker exec {CONTAINER} cla2 env --json"))
    assert env["device"] == "cpu"
    assert env["cla2"] == version


@pytest.mark.parametrize("stage", ["base", "sft", "pt"])
def test_each_stage_evaluated_on_the_host(host, stage):
    # as the seed's eval commands: zero-shot, the validation split; tiny-llama is no Alpaca model: no template
    done = json.loads(host.file(f"{RUN}/.done-eval-{stage}").content_string)
    assert done["argv"][-4:] == ["--shots", "0", "--no-with-prompt", "--no-do-test"], done["argv"]
    summary = json.loads(host.file(f"{RUN}/eval-{stage}/take0/summary.json").content_string)
    assert summary["computer_network"]["num"] == 5
    assert summary["high_school_physics"]["num"] == 5
    # the seed's layout: All (and each group) is {"score": fraction, "num", "correct"}
    assert list(summary["All"]) == ["score", "num", "correct"]
    assert 0.0 <= summary["All"]["score"] <= 1.0
    assert summary["All"]["num"] == sum(g["num"] for g in summary["grouped"].values())


def test_training_outputs_and_merges(host):
    for stage in ("sft", "pt"):
        assert host.file(f"{RUN}/{stage}/adapter_model.safetensors").size > 0
        assert host.file(f"{RUN}/merged-{stage}/config.json").exists
        assert host.file(f"{RUN}/.done-{stage}").exists
    run = json.loads(host.file(f"{RUN}/sft/run.json").content_string)
    assert run["world_size"] == 2  # the converge trains as 2 ranks of ZeRO-3 (test_ranks.py)
    # The PT stage trained the stock model, as the seed's run_pretraining_13b.sh (cla2_pt_base: stock), not the
    # SFT-merged one; its merge went onto the stock model too.
    pt = json.loads(host.file(f"{RUN}/pt/run.json").content_string)
    assert pt["base_model"] == f"{DATA}/models/tiny-llama", pt["base_model"]
    assert "merged-sft" not in json.dumps(pt)
    merge = json.loads(host.file(f"{RUN}/merged-pt/merge.json").content_string)
    assert merge["base_model"] == f"{DATA}/models/tiny-llama"


def test_reports_fetched_to_the_controller():
    reports = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "reports" / "cla2-jobs-1" / "molecule"
    for stage in ("base", "sft", "pt"):
        summary = json.loads((reports / f"eval-{stage}" / "take0" / "summary.json").read_text())
        assert summary["computer_network"]["num"] == 5
        assert (reports / f"eval-{stage}" / "report.md").stat().st_size > 0
    assert (reports / "sft" / "run.json").exists()
    assert (reports / "sft" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    comparison = (reports / "comparison.md").read_text()
    assert "| computer_network | 5 |" in comparison
    assert "**All**" in comparison


def test_service_unit_enabled_and_api_key_file_private(host):
    svc = host.service("cla2-serve")
    assert svc.is_running
    assert svc.is_enabled
    env = host.file("/etc/cla2/cla2-serve.env")
    assert env.mode == 0o600
    assert "CLA2_API_KEY=molecule-secret" in env.content_string


def test_chat_completion_through_the_service_port(host):
    body = json.dumps({"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0})
    out = host.check_output(
        "curl -sf -H 'Authorization: Bearer molecule-secret' -H 'Content-Type: application/json' "
        f"-d '{body}' http://127.0.0.1:19327/v1/chat/completions")
    answer = json.loads(out)
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] >= 1
    # Without the key the server refuses.
    code = host.check_output(
        "curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' "
        f"-d '{body}' http://127.0.0.1:19327/v1/chat/completions")
    assert code == "401"


def test_service_comes_back_after_docker_restart(host):
    host.check_output("systemctl restart docker")
    out = host.check_output(
        "for i in $(seq 1 60); do s=$(curl -s http://127.0.0.1:19327/health) && "
        "echo \"$s\" | grep -q '\"ok\"' && echo \"$s\" && exit 0; sleep 2; done; exit 1")
    assert json.loads(out)["status"] == "ok"
    assert inspect(host, CONTAINER)["State"]["Running"]


def test_no_secret_in_the_unit(host):
    assert "molecule-secret" not in host.file("/etc/systemd/system/cla2-serve.service").content_string
