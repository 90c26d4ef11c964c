"""The model_weights role converts a placed model's PyTorch .bin weights to safetensors on the host
(plugins/modules/cla2_convert.py, with plugins/module_utils/cla2_torchbin.py, a link to the runtime's torchbin.py): run by
ansible-playbook on 127.0.0.1 as the role runs it, with this python and no torch.

The .bin fixtures are made here in torch.save's format (a zip of data.pkl + data/<key> entries, the pickle
naming torch._utils._rebuild_tensor_v2 and torch.<X>Storage) by pickling stand-ins registered under torch's
names, since this virtualenv has no torch.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import yaml
from kit_ansible import ansible_playbook

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "model_weights"

ITEMSIZE = {"HalfStorage": 2, "BFloat16Storage": 2, "FloatStorage": 4}
ST_DTYPE = {"HalfStorage": "F16", "BFloat16Storage": "BF16", "FloatStorage": "F32"}


class _Storage:
    def __init__(self, key: str, cls, numel: int):
        self.key, self.cls, self.numel = key, cls, numel


@pytest.fixture
def torch_save(monkeypatch):
    """torch_save(path, {name: (storage class name, shape, raw bytes)}) writes a torch.save zip."""
    fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only pickled by name
        raise AssertionError

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ITEMSIZE:
        setattr(fake_torch, name, type(name, (), {"__module__": "torch"}))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setitem(sys.modules, "torch._utils", fake_utils)

    class _Tensor:
        def __init__(self, storage, shape):
            self.storage, self.shape = storage, shape

        def __reduce__(self):
            stride, n = [], 1
            for d in reversed(self.shape):
                stride.insert(0, n)
                n *= d
            return (_rebuild_tensor_v2, (self.storage, 0, tuple(self.shape), tuple(stride), False,
                                         collections.OrderedDict()))

    def save(path: Path, tensors: dict) -> None:
        state, blobs = collections.OrderedDict(), {}
        for i, (name, (cls, shape, raw)) in enumerate(tensors.items()):
            storage = _Storage(str(i), getattr(fake_torch, cls), len(raw) // ITEMSIZE[cls])
            state[name] = _Tensor(storage, shape)
            blobs[str(i)] = raw
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=2)
        pickler.persistent_id = lambda o: ("storage", o.cls, o.key, "cpu", o.numel) if isinstance(o, _Storage) else None
        pickler.dump(state)
        archive = path.name.removesuffix(".bin")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(f"{archive}/data.pkl", buf.getvalue())
            zf.writestr(f"{archive}/byteorder", "little")
            for key, raw in blobs.items():
                zf.writestr(f"{archive}/data/{key}", raw)

    return save


def hfl_source(folder: Path, torch_save) -> dict:
    """Two .bin shards + index + config, as hfl publishes them; returns name -> (dtype, shape, bytes)."""
    folder.mkdir(parents=True)
    tensors = {
        "model.embed_tokens.weight": ("HalfStorage", [10, 4], os.urandom(80)),
        "model.norm.weight": ("BFloat16Storage", [4], os.urandom(8)),
        "lm_head.weight": ("FloatStorage", [10, 4], os.urandom(160)),
    }
    shards = {"pytorch_model-00001-of-00002.bin": ["model.embed_tokens.weight", "model.norm.weight"],
              "pytorch_model-00002-of-00002.bin": ["lm_head.weight"]}
    for fname, names in shards.items():
        torch_save(folder / fname, {n: tensors[n] for n in names})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 248}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tensors


def read_safetensors(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in header.items()}


def run_role(tmp_path: Path, items: list, check: bool = False, **extra) -> subprocess.CompletedProcess:
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{
        "hosts": "all", "gather_facts": False,
        "vars": {"model_weights_models": items, "model_weights_models_dir": str(tmp_path / "models"),
                 "model_weights_datasets_dir": str(tmp_path / "datasets"), **extra},
        "roles": ["model_weights"]}], sort_keys=False))
    return ansible_playbook(play, *(["--check"] if check else []), inventory="127.0.0.1,")


def recap_changed(res: subprocess.CompletedProcess) -> int:
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("127.0.0.1") and "changed=" in x)
    return int(line.split("changed=")[1].split()[0])


def conversion(res: subprocess.CompletedProcess) -> str:
    """What the conversion task reported: changed, ok, skipping (or failed)."""
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    lines = res.stdout.splitlines()
    i = next(i for i, x in enumerate(lines) if "Convert PyTorch .bin weights to safetensors" in x)
    return next(x for x in lines[i + 1:] if x.strip()).split(":")[0]


def test_placed_bin_model_is_converted_once_and_placement_stays_current(tmp_path, torch_save):
    src = tmp_path / "share" / "hfl-13b"
    tensors = hfl_source(src, torch_save)
    items = [{"name": "hfl-13b", "path": str(src)}]
    dest = tmp_path / "models" / "hfl-13b"

    # check mode before anything is placed: changes nothing
    assert recap_changed(run_role(tmp_path, items, check=True)) >= 1
    assert not dest.exists()

    assert conversion(run_role(tmp_path, items)) == "changed"
    got = {}
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        got.update(read_safetensors(dest / shard))
    assert got == {n: (ST_DTYPE[c], shape, raw) for n, (c, shape, raw) in tensors.items()}
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["lm_head.weight"] == "model-00002-of-00002.safetensors"
    assert index["metadata"]["total_size"] == 248
    assert (dest / "pytorch_model-00001-of-00002.bin").exists()  # the .bin files stay, as placed

    # a re-run: the placement stamp does not take the safetensors files (nor what a killed conversion
    # leaves) for damage; nothing converts
    (dest / ".model-00001-of-00002.safetensors.cla2-tmp-999").write_bytes(b"partial")
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert recap_changed(run_role(tmp_path, items)) == 0
    assert recap_changed(run_role(tmp_path, items, check=True)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before


def test_convert_switches_and_check_mode(tmp_path, torch_save):
    src = tmp_path / "share" / "m"
    hfl_source(src, torch_save)
    dest = tmp_path / "models" / "m"
    # an image with torch >= 2.6 reads .bin: auto converts nothing
    assert conversion(run_role(tmp_path, [{"name": "m", "path": str(src)}],
                               model_weights_image_torch_version="2.13")) == "skipping"
    assert not list(dest.glob("*.safetensors"))
    # the item asks for it: check mode says it would convert, and writes nothing
    items = [{"name": "m", "path": str(src), "convert": True}]
    res = run_role(tmp_path, items, check=True, model_weights_image_torch_version="2.13")
    assert conversion(res) == "changed" and recap_changed(res) == 1
    assert not list(dest.glob("*.safetensors")) and not (dest / ".cla2-convert.json").exists()
    assert conversion(run_role(tmp_path, items, model_weights_image_torch_version="2.13")) == "changed"
    assert (dest / "model-00002-of-00002.safetensors").exists()
    # never: an unconverted item stays so, even on torch 2.1
    other = tmp_path / "share" / "n"
    hfl_source(other, torch_save)
    assert conversion(run_role(tmp_path, [{"name": "n", "path": str(other)}], model_weights_convert="never")) == "skipping"
    assert not list((tmp_path / "models" / "n").glob("*.safetensors"))


def test_unsafe_pickle_fails_the_item_without_running_it(tmp_path, torch_save):
    src = tmp_path / "share" / "evil"
    src.mkdir(parents=True)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(src / "pytorch_model.bin", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
    res = run_role(tmp_path, [{"name": "evil", "path": str(src)}])
    assert res.returncode != 0
    assert "not plain tensors: refusing to load" in res.stdout and "system" in res.stdout
    assert not marker.exists()
    assert not list((tmp_path / "models" / "evil").glob("*.safetensors"))


def test_module_utils_is_the_runtime_file():
    """One copy of the converter: the collection's module_utils is the runtime's torchbin.py."""
    link = ROOT / "plugins" / "module_utils" / "cla2_torchbin.py"
    assert link.is_symlink()
    assert link.resolve() == (ROOT / "runtime" / "src" / "cla2" / "torchbin.py").resolve()


def nested_bomb(path: Path) -> None:
    """A 200 KB torch.save-shaped zip whose pickle is a dict keyed by a tuple nested 200,000 deep (TUPLE1
    repeated): unpickling it hashes the key, which recursed in C until the process died (SIGSEGV)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}N" + b"\x85" * 200_000 + b"Ns.")
        zf.writestr("archive/byteorder", "little")


def run_module(tmp_path: Path, folder: Path) -> dict:
    """cla2.mlu.cla2_convert on ``folder`` as a play task; the result it registered (JSON, as Ansible got it)."""
    result = tmp_path / "result.json"
    play = tmp_path / "module.yml"
    play.write_text(yaml.safe_dump([{"hosts": "all", "gather_facts": False, "tasks": [
        {"name": "Convert", "cla2.mlu.cla2_convert": {"path": str(folder)}, "register": "out",
         "ignore_errors": True},
        {"name": "Keep the result", "ansible.builtin.copy": {"content": "{{ out | to_json }}", "dest": str(result)}},
    ]}], sort_keys=False))
    res = ansible_playbook(play, inventory="127.0.0.1,")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    return json.loads(result.read_text())


@pytest.mark.parametrize("bomb", ["nested", "memo", "zip"])
def test_pickle_and_zip_bombs_fail_the_module_with_json_not_a_crash(tmp_path, bomb):
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "pytorch_model.bin"
    if bomb == "nested":
        nested_bomb(path)
        expect = "nests objects 200002 deep; a PyTorch checkpoint nests a few levels"
    elif bomb == "memo":  # LONG_BINPUT 49,000,000: the C unpickler's memo grows to 784 MB
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", b"\x80\x02}r" + struct.pack("<I", 49_000_000) + b".")
        expect = "memo index 49000000"
    else:  # 400 MB of byteorder deflated to ~400 KB
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
            zf.writestr("archive/byteorder", b"little" + b" " * (400 << 20))
        expect = "a zip bomb"
    out = run_module(tmp_path, folder)
    assert out["failed"] is True and "module_stderr" not in out and "rc" not in out, out
    assert expect in out["msg"] and str(path) in out["msg"], out["msg"]
    assert out["msg"].startswith(f"model_weights: {folder}: converting its .bin weights to safetensors: ")
    assert not list(folder.glob("*.safetensors"))


@pytest.fixture
def module_code(monkeypatch):
    """plugins/modules/cla2_convert.py imported as the collection's module (the kit's collections/ link)."""
    monkeypatch.syspath_prepend(str(ROOT / "collections"))
    import importlib

    return importlib.import_module("ansible_collections.cla2.mlu.plugins.modules.cla2_convert")


def test_a_converter_that_crashes_or_raises_still_gets_an_answer(module_code):
    """What a file does to the reader (any exception, a segfault, the OOM killer) stays in the forked child."""
    import faulthandler
    import signal

    assert module_code.isolated(lambda a, b=0: {"sum": a + b}, 2, b=3) == ({"sum": 5}, None)
    was = faulthandler.is_enabled()
    faulthandler.disable()  # pytest's: it would print the child's stack on the deliberate SIGSEGV
    try:
        result, error = module_code.isolated(lambda: os.kill(os.getpid(), signal.SIGSEGV))
    finally:
        if was:
            faulthandler.enable()
    assert result is None and error.startswith("the converter was killed by SIGSEGV while reading the files")
    result, error = module_code.isolated(lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert "killed by SIGKILL (out of memory?)" in error

    def exhausted():
        raise MemoryError("no room")

    assert module_code.isolated(exhausted) == (None, "MemoryError: no room")
    assert module_code.isolated(lambda: os._exit(3)) == (None, "the converter exited with status 3 and no result")
