"""cla2 finetune on tiny models: learning, outputs, resume, refusals and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from cla2 import finetune
from cla2.data import DataError
from cla2.device import DeviceError
from cla2.io import OutputExistsError
from cla2.prompts import build_prompt
from cla2.training import TrainingSetupError

RECORDS = [
    {"instruction": "中国的首都是哪里？", "input": "", "output": "北京是中国的首都。"},
    {"instruction": "把下面的句子翻译成英文", "input": "我喜欢猫", "output": "I like cats."},
    {"instruction": "一加一等于几？", "output": "一加一等于二。"},
    {"instruction": "写一句关于春天的话", "input": "", "output": "春天来了，花都开了。"},
]
# small and fast: the tests check behaviour, not the seed's r=64 defaults
FAST = dict(batch_size=4, gradient_accumulation_steps=1, lora_rank=8, lora_alpha=16, logging_steps=1,
            save_steps=1000, device="cpu")


def cla2(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cla2", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_small_tok, sft_data) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sft"
    finetune.main(tiny_model_small_tok, sft_data, out, max_steps=40, lr=1e-2, **FAST)
    return out


def _greedy_answer(model, tok, record: dict) -> str:
    prompt = build_prompt(record["instruction"] + (f"\n{record['input']}" if record.get("input") else ""))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    n = len(tok(record["output"] + tok.eos_token, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_loss_decreases_and_the_tuned_model_reproduces_a_trained_answer(trained, tiny_model_small_tok):
    from peft import PeftModel

    run = json.loads((trained / "run.json").read_text())
    losses = [e["loss"] for e in run["log_history"] if "loss" in e]
    assert run["metrics"]["global_step"] == 40
    assert losses[-1] < 0.25 * losses[0], losses
    tok = AutoTokenizer.from_pretrained(trained)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_small_tok).eval()
    target = RECORDS[0]
    assert _greedy_answer(base, tok, target) != target["output"]
    tuned = PeftModel.from_pretrained(base, trained).eval()
    assert _greedy_answer(tuned, tok, target) == target["output"]


def test_outputs_describe_the_run(trained, tiny_model_small_tok, sft_data):
    cfg = json.loads((trained / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(cfg["modules_to_save"]) == {"embed_tokens", "lm_head"}
    weights = load_file(trained / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.weight" in weights and "base_model.model.lm_head.weight" in weights
    assert sum(".lora_A." in k for k in weights) == 2 * 7  # 2 layers x 7 projections
    assert all(t.numel() > 0 for t in weights.values())
    run = json.loads((trained / "run.json").read_text())
    assert run["status"] == "complete" and run["job"] == "finetune"
    assert run["base_model"] == str(Path(tiny_model_small_tok).resolve())
    assert run["args"]["lr"] == 1e-2 and run["args"]["max_steps"] == 40
    assert run["device"] == "cpu" and run["world_size"] == 1
    assert run["versions"]["torch"] and run["versions"]["transformers"] and run["versions"]["peft"]
    assert run["data"]["records"] == 4 and len(run["data"]["fingerprint"]) == 64
    # the plan budgeted each micro-batch at the data's longest example (on the CPU: no padding to 8)
    tok = AutoTokenizer.from_pretrained(trained)
    longest = max(len(tok(build_prompt(r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")))["input_ids"])
                  + len(tok(r["output"] + tok.eos_token, add_special_tokens=False)["input_ids"]) for r in RECORDS)
    assert run["plan"]["seq_len"] == longest and run["plan"]["tokens_per_micro_batch"] == 4 * longest
    assert run["plan"]["tokens_from"] == (f"the data's longest example after the template, {longest} tokens, "
                                          "of 4 examples")
    assert run["metrics"]["train_loss"] > 0 and run["metrics"]["final_loss"] < run["metrics"]["first_loss"]
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained / "checkpoint-40" / "trainer_state.json").exists()
    assert (trained / "tokenizer.model").exists()


class Crash(TrainerCallback):
    """Stands in for a killed job: dies after the checkpoint at step 4 is written."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt("simulated crash")


def test_resume_reaches_the_same_step_with_a_close_loss(tmp_path, tiny_model_small_tok, sft_data):
    kw = dict(max_steps=8, lr=5e-3, **{**FAST, "save_steps": 4, "batch_size": 2})
    whole = finetune.main(tiny_model_small_tok, sft_data, tmp_path / "whole", **kw)
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        finetune.main(tiny_model_small_tok, sft_data, out, _callbacks=[Crash()], **kw)
    assert (out / "checkpoint-4").is_dir() and not (out / "adapter_model.safetensors").exists()
    # the same command again without --resume is refused: the folder is not empty
    with pytest.raises(OutputExistsError, match="--resume"):
        finetune.main(tiny_model_small_tok, sft_data, out, **kw)
    resumed = finetune.main(tiny_model_small_tok, sft_data, out, resume=True, **kw)
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert resumed["metrics"]["global_step"] == whole["metrics"]["global_step"] == 8
    assert resumed["metrics"]["final_loss"] == pytest.approx(whole["metrics"]["final_loss"], rel=0.02, abs=1e-3)
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    # an Ansible re-run of the finished command trains nothing more
    again = finetune.main(tiny_model_small_tok, sft_data, out, resume=True, **kw)
    assert again["metrics"]["global_step"] == 8
    # resuming with other settings is refused, naming the setting
    with pytest.raises(TrainingSetupError, match="lora_rank"):
        finetune.main(tiny_model_small_tok, sft_data, out, resume=True, **{**kw, "lora_rank": 4})
    # so is resuming with another number of ranks: each rank's checkpoint state is its own
    run_file = out / "run.json"
    run_file.write_text(json.dumps({**json.loads(run_file.read_text()), "world_size": 16}))
    with pytest.raises(TrainingSetupError, match=r"written by 16 rank\(s\), this launch has 1"):
        finetune.main(tiny_model_small_tok, sft_data, out, resume=True, **kw)


def test_resume_without_checkpoint_starts_fresh(tmp_path, tiny_model_small_tok, sft_data):
    out = tmp_path / "fresh"
    r = finetune.main(tiny_model_small_tok, sft_data, out, resume=True, max_steps=2, **FAST)
    assert r["resumed_from"] is None and r["metrics"]["global_step"] == 2


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_bad_inputs_fail_before_anything_is_written(tmp_path, tiny_model_small_tok, real_tokenizer_dir, sft_data):
    out = tmp_path / "out"
    # tokenizer size != model vocabulary: both numbers named
    with pytest.raises(TrainingSetupError, match=r"has 55296 pieces but model .* vocabulary of 1000"):
        finetune.main(tiny_model_small_tok, sft_data, out, tokenizer=real_tokenizer_dir, max_steps=1, **FAST)
    # a model folder without weights
    empty_model = tmp_path / "no-weights"
    empty_model.mkdir()
    for f in Path(tiny_model_small_tok).iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, empty_model / f.name)
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        finetune.main(empty_model, sft_data, out, max_steps=1, **FAST)
    # a dtype the device does not support
    with pytest.raises(DeviceError, match="fp16 is not supported on cpu"):
        finetune.main(tiny_model_small_tok, sft_data, out, max_steps=1, dtype="fp16", **FAST)
    # an empty dataset, a malformed record
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        finetune.main(tiny_model_small_tok, tmp_path / "empty.jsonl", out, max_steps=1, **FAST)
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: malformed JSON"):
        finetune.main(tiny_model_small_tok, tmp_path / "bad.jsonl", out, max_steps=1, **FAST)
    assert _nothing_written(out)
    # an output folder that exists and is not empty: refused and left as it was
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        finetune.main(tiny_model_small_tok, sft_data, out, max_steps=1, **FAST)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_reports_bad_input_clearly(tmp_path, tiny_model_small_tok):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c"}]')
    r = cla2("finetune", "--model", str(tiny_model_small_tok), "--data", str(bad), "--out", str(tmp_path / "o"),
             "--max-steps", "1", "--device", "cpu")
    assert r.returncode == 2, r.stderr
    assert "record 2 of the array: missing field output" in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_saves_a_complete_adapter(stage, tmp_path, trained, tiny_model_small_tok, sft_data):
    """Single process, gloo, on CPU; compared with the plain run's adapter (same LoRA settings)."""
    pytest.importorskip("deepspeed", reason="deepspeed is part of the runtime's test install (cla2[deepspeed])")
    out = tmp_path / stage
    port = str(29500 + (os.getpid() + (stage == "zero3")) % 1000)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    r = cla2("finetune", "--model", str(tiny_model_small_tok), "--data", str(sft_data), "--out", str(out),
             "--deepspeed", stage, "--max-steps", "3", "--batch-size", "2", "--gradient-accumulation-steps", "1",
             "--lora-rank", "8", "--lora-alpha", "16", "--save-steps", "2", "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    plain = load_file(trained / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in plain.items()}
    assert all(t.numel() > 0 and torch.isfinite(t).all() for t in got.values())
    run = json.loads((out / "run.json").read_text())
    assert run["deepspeed"]["zero_optimization"]["stage"] == int(stage[-1])
    assert run["metrics"]["global_step"] == 3
    if stage == "zero3":
        # the large tensors really were partitioned (locally empty) before the save gathered them
        assert run["metrics"]["partitioned_tensors_gathered"] > 0
    # the adapter loads into peft and changes the model's output
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_small_tok)
    ids = torch.tensor([[1, 100, 200, 300]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, out)(ids).logits
    assert not torch.allclose(before, after)


def test_torchrun_two_processes_zero3(tmp_path, trained, tiny_model_small_tok, sft_data):
    """Two CPU processes under torchrun (gloo): ZeRO-3 splits each large tensor across the ranks, and the
    adapter is still complete; run.json records the world size."""
    pytest.importorskip("deepspeed", reason="deepspeed is part of the runtime's test install (cla2[deepspeed])")
    out = tmp_path / "ddp"
    port = str(30500 + os.getpid() % 1000)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
         "-m", "cla2", "finetune", "--model", str(tiny_model_small_tok), "--data", str(sft_data), "--out", str(out),
         "--deepspeed", "zero3", "--max-steps", "2", "--batch-size", "1", "--gradient-accumulation-steps", "1",
         "--lora-rank", "8", "--lora-alpha", "16", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["metrics"]["global_step"] == 2
    assert run["metrics"]["partitioned_tensors_gathered"] > 0
    plain = load_file(trained / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in plain.items()}
    assert all(t.numel() > 0 for t in got.values())


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_final_files_are_replaced_as_one_set(tmp_path, tiny_model_small_tok, sft_data, monkeypatch):
    from cla2 import training

    out = tmp_path / "sft"
    finetune.main(tiny_model_small_tok, sft_data, out, max_steps=2, lr=1e-2, **FAST)
    before = {f: (out / f).read_bytes() for f in ("adapter_model.safetensors", "adapter_config.json")}

    def disk_full(*a, **kw):
        raise OSError(28, "No space left on device")

    # the save fails after the new adapter is written: the previous adapter stays, whole
    monkeypatch.setattr(training, "plot_loss", disk_full)
    with pytest.raises(OSError, match="No space"):
        finetune.main(tiny_model_small_tok, sft_data, out, max_steps=3, lr=5e-2, overwrite=True, **FAST)
    assert {f: (out / f).read_bytes() for f in before} == before
    assert json.loads((out / "run.json").read_text())["outcome"] == "failed"
    assert _siblings(out) == []
    monkeypatch.undo()
    r = finetune.main(tiny_model_small_tok, sft_data, out, max_steps=3, lr=5e-2, overwrite=True, **FAST)
    assert r["outcome"] == "succeeded"
    assert (out / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
    # what else --out held (checkpoints) is kept through the swap
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-3").is_dir()
    assert _siblings(out) == []


def test_a_run_killed_while_saving_is_finished_by_the_next_run(tmp_path, tiny_model_small_tok, sft_data):
    out = tmp_path / "sft"
    finetune.main(tiny_model_small_tok, sft_data, out, max_steps=2, lr=1e-2, **FAST)
    # SIGKILL in the middle of the swap: --out moved aside as .sft.carry, the new final files renamed in,
    # the checkpoint not yet moved back; and a second run's partial, its lock naming a dead pid
    carry = tmp_path / ".sft.carry"
    out.rename(carry)
    out.mkdir()
    for f in carry.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    partial = tmp_path / ".sft.partial"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".sft.lock").write_text(f"{dead.pid}\n")
    assert not (out / "checkpoint-2").exists()
    r = finetune.main(tiny_model_small_tok, sft_data, out, max_steps=2, lr=1e-2, resume=True, **FAST)
    assert r["resumed_from"] is not None and r["resumed_from"].endswith("checkpoint-2")
    assert r["metrics"]["global_step"] == 2
    assert _siblings(out) == []
