""".bin files built to crash or exhaust the pickle-free reader (cla2/torchbin.py), which `cla2 convert`, the
cla2_convert Ansible module and `cla2 merge` (.bin under torch < 2.6) share: each is refused before it is
unpickled, with a message naming the file and what is wrong, in little memory.

The bombs are built here from raw opcodes. Each is read in a child python (the reader loaded by file path,
no torch) under RLIMIT_AS, so that a crash (rc -11) or a memory bomb fails the test and never the run or
the machine; the child reports its peak resident memory.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from cla2 import torchbin

LIMIT = 768 << 20  # the child's address space: a bomb that needs more fails in the child, not here
CHILD = r"""
import importlib.util, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]), int(sys.argv[3])))
spec = importlib.util.spec_from_file_location("tb", sys.argv[1])
tb = importlib.util.module_from_spec(spec)
sys.modules["tb"] = tb
spec.loader.exec_module(tb)
out = {}
try:
    out["tensors"] = sorted(tb.read_index(sys.argv[2]))
except tb.TorchBinError as exc:
    out["error"] = str(exc)
# VmHWM: this process's own peak (ru_maxrss would include the pytest process it was forked from)
hwm = [x for x in open("/proc/self/status") if x.startswith("VmHWM:")][0]
out["peak_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(out))
"""


def read_in_child(path: Path) -> dict:
    r = subprocess.run([sys.executable, "-I", "-c", CHILD, torchbin.__file__, str(path), str(LIMIT)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"the reader died (rc {r.returncode}): {r.stderr[-2000:]}"
    return json.loads(r.stdout)


def bin_file(path: Path, pkl: bytes, members: dict[str, bytes] | None = None,
             compression: int = zipfile.ZIP_STORED) -> Path:
    """A zip laid out as torch.save's: archive/data.pkl (``pkl``), archive/byteorder and ``members``."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
        for name, raw in (members or {}).items():
            zf.writestr(name, raw)
    return path


PROTO2 = b"\x80\x02"


def nested_key(depth: int) -> bytes:
    """{((((None,),),)...): None}: a tuple nested ``depth`` deep as a dict key (TUPLE1 repeated); hashing the
    key recurses once a level in C: 200,000 levels overflow the C stack."""
    return PROTO2 + b"}" + b"N" + b"\x85" * depth + b"N" + b"s" + b"."


def test_a_tuple_nested_200000_deep_as_a_key_is_refused_not_a_segfault(tmp_path):
    path = bin_file(tmp_path / "pytorch_model.bin", nested_key(200_000))
    assert path.stat().st_size > 200_000
    out = read_in_child(path)
    assert "nests objects 200002 deep" in out["error"] and str(path) in out["error"]
    assert "a PyTorch checkpoint nests a few levels" in out["error"] and "re-download it" in out["error"]
    assert out["peak_mb"] < 100


@pytest.mark.parametrize("how", ["marks", "tuple2-in-list", "value", "list-chain"])
def test_deep_nesting_of_any_kind_is_refused(tmp_path, how):
    n = 50_000
    pkl = {
        # ((((...)))) with MARK ... TUPLE, as a key
        "marks": PROTO2 + b"}" + b"(" * n + b"t" * n + b"N" + b"s" + b".",
        # a list holding (((None, None), None), None)... made with TUPLE2
        "tuple2-in-list": PROTO2 + b"]" + b"N" + b"N\x86" * n + b"a" + b".",
        # a deep tuple as a dict value: never hashed, but nothing a checkpoint holds
        "value": PROTO2 + b"}" + b"X\x01\x00\x00\x00w" + b"N" + b"\x85" * n + b"s" + b".",
        # [[[[...]]]] with EMPTY_LIST / APPEND
        "list-chain": PROTO2 + b"]" * n + b"a" * (n - 1) + b".",
    }[how]
    out = read_in_child(bin_file(tmp_path / "pytorch_model.bin", pkl))
    assert "deep; a PyTorch checkpoint nests a few levels" in out["error"]


def test_a_255_byte_pickle_with_a_huge_memo_index_is_refused_in_little_memory(tmp_path):
    # LONG_BINPUT 49,000,000: the C unpickler makes its memo table 98,000,000 entries (784 MB) to store one object
    pkl = PROTO2 + b"}" + b"r" + struct.pack("<I", 49_000_000) + b"." + b"\x00" * 246
    assert len(pkl) == 255
    out = read_in_child(bin_file(tmp_path / "pytorch_model.bin", pkl))
    assert "memo index 49000000" in out["error"] and "memory bomb" in out["error"]
    assert out["peak_mb"] < 100


def test_a_declared_length_beyond_the_pickle_is_refused(tmp_path):
    # BINBYTES8 of 700 MB in a pickle of 20 bytes: the C unpickler allocates the bytes before reading them
    pkl = PROTO2 + b"\x8e" + struct.pack("<Q", 700 << 20) + b"."
    out = read_in_child(bin_file(tmp_path / "pytorch_model.bin", pkl))
    assert "is damaged: its data.pkl is not a valid pickle" in out["error"]
    assert out["peak_mb"] < 100


@pytest.mark.parametrize("member", ["archive/byteorder", "archive/data.pkl", "archive/data/0"])
def test_a_zip_bomb_is_refused_before_anything_is_unpacked(tmp_path, member):
    """A member of ~400 KB deflated that unpacks to 400 MB (a ratio of ~1000; torch.save stores members)."""
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ("archive/data.pkl", "archive/byteorder", "archive/data/0"):
            if name == member:
                zf.writestr(name, (b"little" if "byteorder" in name else b"N") + b" " * (400 << 20))
            elif name.endswith("data.pkl"):
                zf.writestr(name, pickle.dumps({}, protocol=2))
            else:
                zf.writestr(name, b"little" if "byteorder" in name else b"\x00" * 8)
    assert path.stat().st_size < 500_000
    out = read_in_child(path)
    assert "a zip bomb" in out["error"] and "ratio 10" in out["error"] and str(path) in out["error"]
    assert out["peak_mb"] < 100


def test_too_many_opcodes_are_refused(tmp_path):
    # a 2 MB pickle of empty dicts would hold 2,000,001 objects (73 bytes each, 146 MB): over the bound
    pkl = PROTO2 + b"}" * (torchbin.MAX_OPS + 1) + b"."
    out = read_in_child(bin_file(tmp_path / "pytorch_model.bin", pkl))
    assert f"more than {torchbin.MAX_OPS} opcodes" in out["error"] and "pickle bomb" in out["error"]


def test_sets_and_build_on_anything_but_an_ordered_dict_are_refused(tmp_path):
    for i, obj in enumerate(({1, 2}, frozenset((1, 2)))):  # protocol 4: EMPTY_SET + ADDITEMS, FROZENSET
        out = read_in_child(bin_file(tmp_path / f"s{i}.bin", pickle.dumps({"w": obj}, protocol=4)))
        assert "builds a set, which a state dict never holds" in out["error"]
    # BUILD on a storage reference: it could later give a hashed object a deep part the scan never saw
    pid = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ"
    pkl = PROTO2 + b"}X\x01\x00\x00\x00w" + pid + b"}X\x05\x00\x00\x00entryNsb" + b"s."
    out = read_in_child(bin_file(tmp_path / "b.bin", pkl, {"archive/data/0": b"\x00" * 4}))
    assert "sets the state of an object other than an OrderedDict" in out["error"]


def test_an_expanded_tensor_is_refused(tmp_path):
    """A tensor of 10**9 elements over a storage of one (stride 0) would be 4 GB once converted or merged."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(1).expand(10**9)}, path)
    out = read_in_child(path)
    assert "has 1000000000 elements in a storage of 1" in out["error"]


def test_real_checkpoints_still_read(tmp_path):
    """Module state dicts (an OrderedDict with _metadata, set by BUILD), Parameters, protocols 2 and 4."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    for proto in (2, 4):
        path = tmp_path / f"sd{proto}.bin"
        torch.save(net.state_dict(), path, pickle_protocol=proto)
        assert read_in_child(path)["tensors"] == sorted(net.state_dict())
        path = tmp_path / f"p{proto}.bin"
        torch.save({"p": torch.nn.Parameter(torch.ones(2, 2)), "t": torch.ones(3, 4).t()}, path,
                   pickle_protocol=proto)
        assert read_in_child(path)["tensors"] == ["p", "t"]


def test_cla2_convert_and_merge_refuse_the_nested_bomb_with_a_message(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    bomb = bin_file(folder / "pytorch_model.bin", nested_key(200_000))
    r = subprocess.run([sys.executable, "-m", "cla2", "convert", "--model", str(folder)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "cla2 convert: error:" in r.stderr and "nests objects 200002 deep" in r.stderr
    assert not list(folder.glob("*.safetensors"))
    code = ("import sys; from cla2 import merge\n"
            "try: merge.bin_refs(sys.argv[1])\n"
            "except merge.MergeError as exc: print(exc)")
    r = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "nests objects 200002 deep" in r.stdout
