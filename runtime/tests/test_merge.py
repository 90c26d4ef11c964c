"""cla2 merge: equal to peft's merge_and_unload, from safetensors or .bin, and its refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cla2 import merge, tiny
from cla2.io import OutputBusyError, OutputExistsError
from cla2.merge import MergeError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, seed: int = 0, r: int = 4) -> Path:
    """A LoRA adapter with non-zero B matrices and changed embed_tokens / lm_head, saved the PEFT way."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                            modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
            elif "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    (out / "run.json").write_text(json.dumps({"job": "finetune", "base_model": str(Path(base_dir).resolve())}))
    # the folder name recorded by peft must not be what merge relies on
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "hfl/not-a-local-folder"
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "lora")


@pytest.fixture(scope="module")
def reference(tiny_model, adapter):
    """peft's own merge on the whole model, and the base+adapter logits."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([[1, 518, 25580, 29962, 32732, 31076, 518, 29914, 25580, 29962]])
    with torch.no_grad():
        logits = model(ids).logits
    merged = model.merge_and_unload()
    return {k: v.clone() for k, v in merged.state_dict().items()}, ids, logits


def _check_equal(out: Path, reference, atol: float = 1e-5) -> None:
    ref_sd, ids, ref_logits = reference
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    sd = model.state_dict()
    assert set(sd) == set(ref_sd)
    diff = max((sd[k].float() - ref_sd[k].float()).abs().max().item() for k in ref_sd)
    assert diff <= atol, diff
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.allclose(logits, ref_logits, atol=1e-4), (logits - ref_logits).abs().max()


def test_merge_equals_peft_merge_and_unload(tmp_path, tiny_model, adapter, reference):
    out = tmp_path / "merged"
    merge.main(adapter, out, shard_size="10MB")  # base found through the adapter's run.json
    _check_equal(out, reference)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((out / s).exists() for s in shards)
    assert (out / "tokenizer.model").exists() and (out / "config.json").exists()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 55296
    # the embed_tokens / lm_head saved in full by the adapter replace the base's
    ad = load_file(adapter / "adapter_model.safetensors")
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert torch.equal(merged["lm_head.weight"], ad["base_model.model.lm_head.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], ad["base_model.model.model.embed_tokens.weight"])
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def bin_copy(tiny_model: Path, base_bin: Path) -> Path:
    """A copy of the model with its weights as PyTorch .bin shards, as the published hfl folders ship."""
    base_bin.mkdir()
    weight_map = {}
    st_index = json.loads((Path(tiny_model) / "model.safetensors.index.json").read_text())
    for i, shard in enumerate(sorted(set(st_index["weight_map"].values()))):
        name = f"pytorch_model-{i + 1:05d}-of-00009.bin"
        sd = load_file(Path(tiny_model) / shard)
        torch.save(sd, base_bin / name)
        weight_map.update({k: name for k in sd})
    (base_bin / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in Path(tiny_model).iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, base_bin / f.name)
    return base_bin


def test_merge_reads_pytorch_bin_shards(tmp_path, tiny_model, adapter, reference):
    """The published hfl folders are .bin: the same merge from a .bin copy of the base."""
    base_bin = bin_copy(Path(tiny_model), tmp_path / "base-bin")
    out = tmp_path / "merged-from-bin"
    merge.main(adapter, out, model=base_bin)
    _check_equal(out, reference)
    assert (out / "model.safetensors").exists()  # one shard at the default 2GB


def test_bin_weights_load_where_transformers_reads_them_else_a_clear_error(tmp_path, tiny_model):
    """transformers refuses .bin files under torch < 2.6 (Cambricon's image): then the jobs say so, and what to
    do, before loading anything; elsewhere the .bin copy loads as the safetensors original."""
    from transformers.utils import import_utils

    from cla2.engine import load_model

    base_bin = bin_copy(Path(tiny_model), tmp_path / "base-bin")
    try:
        getattr(import_utils, "check_torch_load_is_safe", lambda: None)()
        refused = False
    except ValueError:
        refused = True
    if refused:
        with pytest.raises(ValueError, match=r"holds PyTorch \.bin weights .*CVE-2025-32434.*save_pretrained"):
            load_model(base_bin)
        return
    net, _, _ = load_model(base_bin)
    ref, _, _ = load_model(Path(tiny_model))
    ids = torch.tensor([[1, 100, 200, 300]])
    with torch.no_grad():
        assert torch.equal(net(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_dtype_flag_and_cli(tmp_path, adapter, tiny_model, reference):
    out = tmp_path / "merged-fp16"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "cla2", "merge", "--adapter", str(adapter), "--model", str(tiny_model),
                        "--out", str(out), "--dtype", "fp16"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    sd = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in sd.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    ref_sd = reference[0]
    assert max((sd[k].float() - ref_sd[k]).abs().max().item() for k in ref_sd) < 1e-2


def test_adapter_from_another_base_names_each_tensor(tmp_path, tiny_model, tiny_model_small_tok):
    other = make_adapter(tiny_model_small_tok, tmp_path / "other")  # vocabulary 1000, not 55296
    with pytest.raises(MergeError, match=r"trained with another vocabulary \(its saved embed_tokens has 1000 rows, "
                                         r"its saved lm_head has 1000 rows\), but base model .* has a vocabulary "
                                         r"of 55296.*its run.json names .*tiny-small-tok as its base"):
        merge.main(other, tmp_path / "out", model=tiny_model)
    # the vocabulary is checked first; the shapes, tensor by tensor, after it
    with pytest.raises(MergeError) as err:
        merge.plan(merge.load_adapter(other), merge.BaseReader(tiny_model).refs)
    msg = str(err.value)
    assert "does not fit base model" in msg and "trained on another base" in msg
    assert "base_model.model.lm_head.weight: shape [1000, 64], the base tensor lm_head.weight is [55296, 64]" in msg
    assert "model.embed_tokens.weight" in msg
    wide = tiny.main(tmp_path / "wide", hidden_size=32, intermediate_size=88, shards=1)
    lora_only = make_adapter(wide, tmp_path / "wide-lora")
    with pytest.raises(MergeError, match=r"model.layers.0.self_attn.q_proj: lora_A \[4, 32\] x lora_B \[32, 4\] "
                                         r"gives \[32, 32\], the base tensor model.layers.0.self_attn.q_proj.weight "
                                         r"is \[64, 64\]"):
        merge.main(lora_only, tmp_path / "out", model=tiny_model_small_tok)
    assert not (tmp_path / "out").exists()


def test_empty_adapter_is_refused(tmp_path, adapter, tiny_model):
    empty = tmp_path / "empty"
    shutil.copytree(adapter, empty)
    sd = load_file(empty / "adapter_model.safetensors")
    save_file({k: (torch.empty(0) if "lora_" in k else v) for k, v in sd.items()}, empty / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=r"empty \(zero-size\) tensor\(s\).*ZeRO-3"):
        merge.main(empty, tmp_path / "out", model=tiny_model)
    (empty / "adapter_model.safetensors").unlink()
    with pytest.raises(MergeError, match="no adapter_model.safetensors or adapter_model.bin"):
        merge.main(empty, tmp_path / "out", model=tiny_model)
    assert not (tmp_path / "out").exists()


def test_bad_base_and_output(tmp_path, adapter, tiny_model):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(Path(tiny_model) / "config.json", no_weights)
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        merge.main(adapter, tmp_path / "out", model=no_weights)
    lost = tmp_path / "lost"
    shutil.copytree(adapter, lost)
    (lost / "run.json").unlink()
    with pytest.raises(MergeError, match="pass --model"):
        merge.main(lost, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        merge.main(adapter, busy)
    assert [p.name for p in busy.iterdir()] == ["keep"]
    merge.main(adapter, busy, overwrite=True)
    assert (busy / "config.json").exists() and not (busy / "keep").exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_merge_leaves_nothing_that_the_next_merge_does_not_clean(tmp_path, adapter, tiny_model):
    out = tmp_path / "merged"
    # what a SIGKILLed merge leaves: its partial folder (known name, and the older pid-named kind) and its
    # lock file naming a pid that is now dead (the kernel dropped its flock)
    pid = _dead_pid()
    partial = tmp_path / ".merged.partial"
    partial.mkdir()
    (partial / "model-00001-of-00002.safetensors").write_bytes(b"half")
    legacy = tmp_path / f".merged.partial-{pid}"
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".merged.lock").write_text(f"{pid}\n")
    merge.main(adapter, out, model=tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == []
    assert (out / "config.json").exists()


def test_a_live_merge_of_the_same_output_is_never_cleaned(tmp_path, adapter, tiny_model):
    import fcntl

    out = tmp_path / "merged"
    partial = tmp_path / ".merged.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"being written")
    live = tmp_path / f".merged.partial-{os.getpid()}"  # an older writer's partial, its process alive
    live.mkdir()
    fd = os.open(tmp_path / ".merged.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer of the same output, alive
    try:
        with pytest.raises(OutputBusyError, match="pid 4242"):
            merge.main(adapter, out, model=tiny_model)
        assert (partial / "model.safetensors").read_bytes() == b"being written"
        assert not out.exists()
    finally:
        os.close(fd)
    (tmp_path / ".merged.lock").unlink()
    merge.main(adapter, out, model=tiny_model)
    assert live.is_dir() and not partial.exists()


def test_a_swap_cut_between_its_renames_is_rolled_back(tmp_path, adapter, tiny_model):
    out = tmp_path / "merged"
    merge.main(adapter, out, model=tiny_model)
    first = (out / "merge.json").read_text()
    # killed after moving the previous output aside and before renaming the new one in
    (out).rename(tmp_path / ".merged.old")
    (tmp_path / ".merged.partial").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        merge.main(adapter, out, model=tiny_model)  # the previous output is back, and still refused
    assert (out / "merge.json").read_text() == first
    assert not (tmp_path / ".merged.old").exists() and not (tmp_path / ".merged.partial").exists()


def test_outputs_are_fsynced_before_the_rename(tmp_path, adapter, tiny_model, monkeypatch):
    from cla2 import io

    synced: list[str] = []
    real_fsync = os.fsync
    renamed: list[str] = []

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    real_rename = Path.rename

    def rename(self, target):
        renamed.append((str(self), len(synced)))
        return real_rename(self, target)

    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    out = tmp_path / "merged"
    merge.main(adapter, out, model=tiny_model)
    partial = str(tmp_path / ".merged.partial")
    (when,) = [n for src, n in renamed if src == partial]
    before = synced[:when]
    for f in ("config.json", "merge.json", "run.json", "model.safetensors"):
        if (out / f).exists():
            assert f"{partial}/{f}" in before, f"{f} not fsynced before the rename"
    assert partial in before  # the folder's own entries
    assert str(tmp_path) in synced[when:]  # the parent, after the rename
