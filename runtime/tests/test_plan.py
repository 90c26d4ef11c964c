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


# --- training planned from the data (issue 23): a micro-batch is budgeted at the data's longest batch
SEED_SFT = ["--batch-size", "16", "--context", "1024"]  # the seed's 13B SFT: 16 per device, max_seq_length 1024
CITY = "春天来了，公园里的花都开了。人们在湖边散步，孩子们放风筝，老人下棋聊天。城市的历史悠久，文化丰富，吸引了很多游客。"


def sft_file(path, chars: list[int]):
    """Alpaca-format records whose outputs are ``chars`` characters of Chinese text."""
    records = [{"instruction": f"请写一段关于第{i}个城市的介绍。", "input": "",
                "output": (CITY * (n // len(CITY) + 2))[i % len(CITY):i % len(CITY) + n]} for i, n in enumerate(chars)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    return path


def test_13b_sft_on_alpaca_length_data_keeps_the_seeds_16_x_1(models, real_tokenizer_dir, tmp_path):
    import random
    import statistics

    from transformers import AutoTokenizer

    from cla2.data import instruction_dataset

    rng = random.Random(0)  # Alpaca-like lengths: a long tail, median about 200 tokens after the template
    data = sft_file(tmp_path / "alpaca.jsonl", [min(int(rng.lognormvariate(5.6, 0.45)), 720) for _ in range(500)])
    lengths = instruction_dataset(data, AutoTokenizer.from_pretrained(real_tokenizer_dir), 1024, progress=False)[0].lengths
    assert 180 <= statistics.median(lengths) <= 240 and max(lengths) < 512, (statistics.median(lengths), max(lengths))
    p = plan_json("finetune", "--model", str(models["13b"]), *SERVER, *SEED_SFT, "--data", str(data),
                  "--tokenizer", str(real_tokenizer_dir))
    assert (p["world_size"], p["zero_stage"], p["gradient_checkpointing"]) == (16, 3, True)
    assert (p["micro_batch"], p["gradient_accumulation_steps"]) == (16, 1), p["notes"]
    padded = -(-max(lengths) // 8) * 8  # the collator pads to a multiple of 8 on an accelerator
    assert p["seq_len"] == padded and p["tokens_per_micro_batch"] == 16 * padded
    assert p["tokens_from"] == (f"the data's longest example after the template, {max(lengths)} tokens, padded to "
                                f"{padded} (a multiple of 8), of 500 examples")
    assert p["bytes_per_device"] <= 0.9 * 24 * 1024**3 and not p["notes"]


def test_13b_sft_on_full_length_data_cuts_the_batch_and_says_so(models, real_tokenizer_dir, tmp_path):
    data = sft_file(tmp_path / "long.jsonl", [3000] * 8)  # every example longer than --max-seq-length
    r = cla2("plan", "finetune", "--model", str(models["13b"]), *SERVER, *SEED_SFT, "--data", str(data),
             "--tokenizer", str(real_tokenizer_dir), "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["seq_len"] == 1024 and p["micro_batch"] == 4 and p["gradient_accumulation_steps"] == 4
    assert p["tokens_per_micro_batch"] == 4 * 1024
    assert p["tokens_from"] == ("the data's longest example after the template, 1024 tokens (cut at "
                                "--max-seq-length), of 8 examples")
    [note] = p["notes"]
    assert note.startswith("micro-batch cut from 16 to 4 to fit: 16 sequences of 1024 tokens need ")
    assert note.endswith(" GiB per rank, above the 21.6 GiB usable; gradient accumulation 1 -> 4 keeps the effective batch")
    assert float(note.split(" need ")[1].split(" GiB")[0]) > 21.6


def test_without_data_every_sequence_is_budgeted_at_full_length(models, tmp_path):
    p = plan_json("finetune", "--model", str(models["13b"]), *SERVER, *SEED_SFT)
    assert p["seq_len"] == 1024 and p["micro_batch"] == 4
    assert p["tokens_from"] == "--max-seq-length 1024, every sequence at full length (no data read)"
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("从前有座山。\n", encoding="utf-8")
    p = plan_json("pretrain", "--model", str(models["13b"]), *SERVER, "--context", "512", "--data",
                  str(tmp_path / "corpus"))
    assert p["seq_len"] == 512 and p["tokens_from"] == "--block-size 512: pre-training's blocks are all full"


def test_data_the_plan_cannot_read_is_refused_as_the_job_refuses_it(models, real_tokenizer_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c"}]')
    r = cla2("plan", "finetune", "--model", str(models["13b"]), *SERVER, "--data", str(bad),
             "--tokenizer", str(real_tokenizer_dir))
    assert r.returncode == 2 and "record 2 of the array: missing field output" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = cla2("plan", "finetune", "--model", str(models["13b"]), *SERVER, "--data", str(bad))  # no tokenizer there
    assert r.returncode == 2 and "pass --tokenizer DIR" in r.stderr and str(models["13b"]) in r.stderr, r.stderr
    r = cla2("plan", "pretrain", "--model", str(models["13b"]), *SERVER, "--data", str(tmp_path / "none"))
    assert r.returncode == 2 and f"data path {tmp_path / 'none'} does not exist" in r.stderr, r.stderr
    r = cla2("plan", "pretrain", "--model", str(models["13b"]), *SERVER, "--data", str(bad))
    assert r.returncode == 2 and "is a file: cla2 pretrain reads a folder of .txt files" in r.stderr, r.stderr
