"""The placement plan (`cla2 plan`) on the real model shapes and the real server: 16 devices of 24 GiB."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cla2 import plan

# config.json of hfl/chinese-alpaca-2-13b and -7b: LLaMA-2-13B / 7B's shapes with the 55296-piece vocabulary.
CONFIGS = {
    "chinese-alpaca-2-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                             "num_hidden_layers": 40, "num_key_value_heads": 40},
    "chinese-alpaca-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                            "num_hidden_layers": 32, "num_key_value_heads": 32},
}
COMMON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 4096,
          "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 55296, "tie_word_embeddings": False}
SERVER = ["--devices", "16", "--device-memory", "24GiB"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for name, cfg in CONFIGS.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({**COMMON, **cfg}))
        out[name.rsplit("-", 1)[-1]] = root / name
    return out


def cla2(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cla2", *args], capture_output=True, text=True, timeout=120)


def plan_json(*args: str) -> dict:
    r = cla2("plan", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_13b_weighs_what_hfl_lists(models):
    shape = plan.read_shape(models["13b"])
    assert shape.params * 2 / 1024**3 == pytest.approx(24.7, abs=0.05)  # hfl: 24.7 GiB in fp16
    assert plan.read_shape(models["7b"]).params * 2 / 1e9 == pytest.approx(13.9, abs=0.1)


@pytest.mark.parametrize("job", ["serve", "chat", "generate", "eval"])
def test_13b_inference_needs_two_devices_per_replica_on_the_server(models, job):
    p = plan_json(job, "--model", str(models["13b"]), *SERVER)
    assert p["devices_per_replica"] == 2
    assert p["replicas"] == 8
    assert p["device_groups"] == [[i, i + 1] for i in range(0, 16, 2)]
    assert p["bytes_per_device"] <= 0.9 * 24 * 1024**3
    assert [len(s["layers"]) for s in p["shares"]] == [20, 20]
    assert p["max_batch"] >= 1 and 1 <= p["batch"] <= p["max_batch"]
    assert p["kv_cache_bytes"] == p["batch"] * 4096 * 40 * 2 * 5120 * 2  # batch x context x layers x K,V x fp16


def test_13b_training_runs_16_ranks_of_zero3_as_the_seed_does(models):
    for job in ("finetune", "pretrain"):
        p = plan_json(job, "--model", str(models["13b"]), *SERVER)
        assert p["world_size"] == 16
        assert p["zero_stage"] == 3
        assert p["deepspeed"] == "zero3"
        assert p["bytes_per_device"] <= 0.9 * 24 * 1024**3


def test_13b_on_one_24gib_device_is_refused_with_the_numbers(models):
    r = cla2("plan", "serve", "--model", str(models["13b"]), "--devices", "1", "--device-memory", "24GiB")
    assert r.returncode == 2
    err = r.stderr
    assert "does not fit" in err and "24.7 GiB of fp16 weights" in err
    assert "21.6 GiB usable" in err and "24.0 GiB" in err
    assert "need 2 of these" in err  # what to change
    r = cla2("plan", "finetune", "--model", str(models["13b"]), "--devices", "1", "--device-memory", "24GiB")
    assert r.returncode == 2 and "does not fit" in r.stderr and "more ranks" in r.stderr


def test_13b_fits_one_141gib_device(models):
    p = plan_json("serve", "--model", str(models["13b"]), "--devices", "1", "--device-memory", "141GiB")
    assert p["devices_per_replica"] == 1 and p["replicas"] == 1
    assert p["batch"] == 8


def test_7b_runs_a_replica_per_device(models):
    p = plan_json("serve", "--model", str(models["7b"]), *SERVER)
    assert p["devices_per_replica"] == 1 and p["replicas"] == 16


def test_the_summary_names_the_decisions(models):
    r = cla2("plan", "serve", "--model", str(models["13b"]), *SERVER)
    assert r.returncode == 0, r.stderr
    assert "8 replica(s) of 2 device(s)" in r.stdout and "layers 20 + 20" in r.stdout


def test_layers_are_balanced_by_bytes(models):
    shape = plan.read_shape(models["13b"])
    groups = plan.split_layers(shape, 4, 2)
    assert sum(map(len, groups)) == 40 and [g[0] for g in groups] == sorted(g[0] for g in groups)
    assert all(g == list(range(g[0], g[0] + len(g))) for g in groups)  # contiguous runs
    assert len(groups[0]) <= len(groups[1]) and len(groups[-1]) <= len(groups[1])  # the ends carry embed / head


def test_a_fixed_group_that_cannot_hold_the_model_is_refused(models):
    shape = plan.read_shape(models["13b"])
    devices = plan.Devices("mlu", (24 * 1024**3,) * 16)
    with pytest.raises(plan.PlanError, match="fullest device needs"):
        plan.plan_inference("serve", shape, devices, 2, devices_per_replica=1)
    with pytest.raises(plan.PlanError, match="17 devices per replica"):
        plan.plan_inference("serve", shape, devices, 2, devices_per_replica=17)


def test_fixed_training_decisions_are_kept_and_checked(models):
    shape = plan.read_shape(models["13b"])
    with pytest.raises(plan.PlanError, match="ZeRO-2"):
        plan.plan_training("finetune", shape, 24 * 1024**3, 16, 2, zero_stage=2)
    p = plan.plan_training("finetune", shape, 24 * 1024**3, 16, 2, zero_stage=3, gradient_checkpointing=True, batch=4,
                           gradient_accumulation_steps=2)
    assert p.zero_stage == 3 and p.gradient_checkpointing
    assert p.micro_batch * p.gradient_accumulation_steps == 4 * 2  # the effective batch is kept


def test_sizes_and_devices_are_checked():
    assert plan.parse_size("24GiB") == 24 * 1024**3
    assert plan.parse_size("80GB") == 80 * 10**9
    assert plan.parse_size("16384MiB") == 16 * 1024**3
    for bad in ("24 parsecs", "", "-1GB", "0"):
        with pytest.raises(plan.PlanError, match="device memory"):
            plan.parse_size(bad)
    assert plan.check_devices([0, 1], 16) == [0, 1]
    with pytest.raises(plan.PlanError, match="device 1 twice"):
        plan.check_devices([1, 1], 16)
    with pytest.raises(plan.PlanError, match="device 16 does not exist; this process sees 16"):
        plan.check_devices([15, 16], 16)
    with pytest.raises(plan.PlanError, match="empty"):
        plan.check_devices([], 16)


def test_a_folder_without_a_config_is_refused(tmp_path):
    r = cla2("plan", "serve", "--model", str(tmp_path), *SERVER)
    assert r.returncode == 2 and "has no config.json" in r.stderr


def test_visible_devices_default_to_this_process(tiny_model):
    """On the CPU the plan sees one device with the host's memory, and a tiny model fits it."""
    p = plan_json("generate", "--model", str(tiny_model))
    assert p["kind"] == "cpu" and p["devices"] == 1 and p["devices_per_replica"] == 1
    assert p["dtype"] == "fp32"


def test_jobs_refuse_devices_that_do_not_exist_before_loading(tiny_model, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    r = cla2("generate", "--model", str(tiny_model), "--input", str(prompts), "--output", str(tmp_path / "out.jsonl"),
             "--devices", "0,1", "--device", "cpu")
    assert r.returncode == 2
    assert "device 1 does not exist; this process sees 1 device(s)" in r.stderr
    assert not (tmp_path / "out.jsonl").exists()
