"""cla2 convert: hfl-shaped .bin folders to safetensors, bit for bit, without running the pickles."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cla2 import convert, torchbin
from cla2.io import dtype_key
from cla2.torchbin import TorchBinError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def save_bin_shards(sd: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    """The state dict as torch.save shards + index, as hfl publishes them (pytorch_model-0000N-of-0000M.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" if shards > 1 else "pytorch_model.bin"
        part = {n: sd[n].contiguous().clone() for n in names[i * per:(i + 1) * per]}
        torch.save(part, folder / fname)
        weight_map.update({n: fname for n in part})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def hfl_folder(tiny: Path, out: Path, dtype: str, shards: int = 3) -> tuple[Path, dict[str, torch.Tensor]]:
    """A copy of the tiny model in ``dtype`` with .bin shards, config and tokenizer, no safetensors."""
    model = AutoModelForCausalLM.from_pretrained(tiny)
    model.to(DTYPES[dtype])
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_bin_shards(sd, out, shards)
    for f in Path(tiny).iterdir():
        if f.is_file() and not f.name.startswith("model"):
            (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg))
    return out, sd


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.numel() else t


def check_same(folder: Path, sd: dict[str, torch.Tensor]) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    got = {}
    for shard in sorted(set(index["weight_map"].values())):
        got.update(load_file(folder / shard))
    for name, t in sd.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(_bits(got[name]), _bits(t)), name


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_in_place_bit_for_bit_keeps_dtype_and_sharding(tmp_path, tiny_model_small_tok, dtype):
    folder, sd = hfl_folder(tiny_model_small_tok, tmp_path / "hfl", dtype)
    result = convert.main(folder)
    assert result["changed"] and result["tensors"] == len(sd)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    check_same(folder, sd)
    # same sharding: each .bin shard's tensors are in the safetensors shard of the same number
    bin_map = json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
    st_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert {n: f.replace("pytorch_model", "model").replace(".bin", ".safetensors") for n, f in bin_map.items()} == st_map
    assert not [p for p in folder.iterdir() if ".cla2-tmp" in p.name]


def test_out_folder_loads_in_transformers(tmp_path, tiny_model_small_tok):
    folder, sd = hfl_folder(tiny_model_small_tok, tmp_path / "hfl", "fp16")
    out = tmp_path / "st"
    convert.main(folder, out=out)
    assert not list(folder.glob("*.safetensors"))  # the source folder is untouched
    assert (out / "config.json").exists() and (out / "tokenizer.model").exists()
    assert not list(out.glob("*.bin"))
    # fp32 compute: torch 2.1 has no fp16 matmul on CPU; fp16 -> fp32 is exact
    model = AutoModelForCausalLM.from_pretrained(out, **{dtype_key(): torch.float32})
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in sd.items())
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_small_tok)
    ref.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-6)


def test_rerun_converts_nothing_and_a_changed_input_converts_again(tmp_path, tiny_model_small_tok):
    folder, sd = hfl_folder(tiny_model_small_tok, tmp_path / "hfl", "bf16")
    convert.main(folder)
    stamp = json.loads((folder / torchbin.STAMP).read_text())
    shard = folder / "pytorch_model-00001-of-00003.bin"
    assert stamp["inputs"][shard.name]["sha256"] == torchbin.sha256_file(shard)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = convert.main(folder)
    assert not again["changed"] and again["reason"] == "already converted"
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    os.utime(shard)  # touched: the stamp no longer matches, the folder is converted again
    assert torchbin.convert_folder(folder, check=True)["changed"]
    assert convert.main(folder)["changed"]
    check_same(folder, sd)


def test_interrupted_conversion_leaves_no_shard_under_a_final_name(tmp_path, tiny_model_small_tok):
    folder, sd = hfl_folder(tiny_model_small_tok, tmp_path / "hfl", "fp16")
    with pytest.raises(OSError, match="simulated failure"):
        torchbin.convert_folder(folder, _fail_after=2)
    assert not list(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").exists()
    assert not (folder / torchbin.STAMP).exists()
    assert not [p for p in folder.iterdir() if ".cla2-tmp" in p.name]
    # what a killed run (no clean-up) leaves is hidden, and removed by the next conversion
    (folder / ".model-00001-of-00003.safetensors.cla2-tmp-999").write_bytes(b"partial")
    convert.main(folder)
    check_same(folder, sd)
    assert not [p for p in folder.iterdir() if ".cla2-tmp" in p.name]


def test_dry_run_writes_nothing(tmp_path, tiny_model_small_tok):
    folder, _ = hfl_folder(tiny_model_small_tok, tmp_path / "hfl", "fp16")
    before = sorted(p.name for p in folder.iterdir())
    result = convert.main(folder, dry_run=True)
    assert result["changed"] and "model-00002-of-00003.safetensors" in result["outputs"]
    assert sorted(p.name for p in folder.iterdir()) == before


def test_unsharded_parameters_and_non_contiguous(tmp_path):
    """One pytorch_model.bin (-> model.safetensors), Parameters, a transposed view and tensors sharing storage."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {"p": torch.nn.Parameter(torch.randn(2, 3).half()), "t": base.t(), "row": base[1],
          "scalar": torch.tensor(7, dtype=torch.int64), "empty": torch.empty(0, 5), "mask": torch.tensor([True, False])}
    folder = tmp_path / "one"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    convert.main(folder)
    got = load_file(folder / "model.safetensors")
    assert not (folder / "model.safetensors.index.json").exists()
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v.detach()), k


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_without_running(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": Evil(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(TorchBinError, match=r"not plain tensors: refusing to load .*pytorch_model.bin.*(posix|os)\.system"):
        convert.main(folder)
    assert not marker.exists()
    assert not list(folder.glob("*.safetensors"))
    # the command line says it in one line, exit status 2
    r = subprocess.run([sys.executable, "-m", "cla2", "convert", "--model", str(folder)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "cla2 convert: error: not plain tensors: refusing to load" in r.stderr
    assert not marker.exists()


def test_bad_input_fails_before_writing(tmp_path, tiny_model_small_tok):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TorchBinError, match="holds no PyTorch .bin weights"):
        convert.main(empty)
    folder, _ = hfl_folder(tiny_model_small_tok, tmp_path / "hfl", "fp16")
    index = folder / "pytorch_model.bin.index.json"
    good = index.read_text()
    index.write_text("{not json")
    with pytest.raises(TorchBinError, match="malformed"):
        convert.main(folder)
    data = json.loads(good)
    data["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "pytorch_model-00003-of-00003.bin"
    index.write_text(json.dumps(data))
    with pytest.raises(TorchBinError, match=r"pytorch_model-00003-of-00003.bin lacks tensor model.layers.9"):
        convert.main(folder)
    assert not list(folder.glob("*.safetensors")) and not [p for p in folder.iterdir() if p.name.startswith(".")]
    # a legacy (non-zip) torch.save file
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"w": torch.ones(2)}, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(TorchBinError, match="legacy torch.save file"):
        convert.main(legacy)
    # a storage the pickle names but the zip lacks
    broken = tmp_path / "broken"
    broken.mkdir()
    torch.save({"w": torch.ones(4)}, broken / "src.bin")
    with zipfile.ZipFile(broken / "src.bin") as zin, zipfile.ZipFile(broken / "pytorch_model.bin", "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/0"):
                zout.writestr(info, zin.read(info))
    (broken / "src.bin").unlink()
    with pytest.raises(TorchBinError, match="does not hold"):
        convert.main(broken)


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    """Anything but the state-dict globals is refused by name, whatever the pickle protocol."""
    for proto in (2, 4):
        raw = pickle.dumps({"a": print}, protocol=proto)
        path = tmp_path / f"p{proto}.bin"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", raw)
        with pytest.raises(TorchBinError, match=r"names (__builtin__|builtins)\.print"):
            torchbin.read_index(path)


def test_torchbin_imports_without_torch(tmp_path):
    """The model_weights role runs torchbin.py with the host's python3: no torch, nothing third-party."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None; "
            "import importlib.util as u; s = u.spec_from_file_location('tb', sys.argv[1]); m = u.module_from_spec(s); sys.modules['tb'] = m; "
            "s.loader.exec_module(m); print(m.convert_folder(sys.argv[2])['tensors'])")
    folder = tmp_path / "m"
    save_bin_shards({"a": torch.randn(3, 4).half(), "b": torch.ones(5, dtype=torch.bfloat16)}, folder, 2)
    r = subprocess.run([sys.executable, "-I", "-c", code, torchbin.__file__, str(folder)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "2"
    assert load_file(folder / "model-00002-of-00002.safetensors")["b"].dtype == torch.bfloat16


def test_merge_reads_bin_base_and_adapter_without_torch_load(tmp_path, tiny_model_small_tok, monkeypatch):
    """Under torch < 2.6 cla2 merge reads .bin shards and adapter_model.bin through the pickle-free reader:
    forced here on any torch, the tensors are those torch.load gives, and torch.load is never called."""
    from cla2 import merge

    folder, sd = hfl_folder(tiny_model_small_tok, tmp_path / "hfl", "bf16")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    lora = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4)}
    torch.save(lora, adapter / "adapter_model.bin")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    monkeypatch.setattr(merge, "torch_load_is_safe", lambda: False)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    reader = merge.BaseReader(folder)
    assert set(reader.refs) == set(sd)
    for name, t in sd.items():
        got = reader.read(reader.refs[name])
        assert got.dtype == t.dtype and torch.equal(_bits(got), _bits(t)), name
    ad = merge.load_adapter(adapter)
    assert all(torch.equal(ad.get(k), v) for k, v in lora.items())
    out = tmp_path / "merged"
    merge.main(adapter, out, model=folder)
    merged = load_file(out / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    expected = (sd[q].float() + 2.0 * (lora[q.replace("model.", "base_model.model.model.", 1).replace(
        ".weight", ".lora_B.weight")] @ lora[q.replace("model.", "base_model.model.model.", 1).replace(
            ".weight", ".lora_A.weight")])).to(torch.bfloat16)
    assert torch.equal(merged[q], expected)
