#!/usr/bin/env python3
"""Write, with no torch, two model folders in torch.save's .bin format (a zip of <archive>/data.pkl and
<archive>/data/<key>), as hfl publishes them: OUT/hfl-bin (two fp16/bf16 shards, index, config, and a
SHA256SUMS of the safetensors bytes the conversion must produce) and OUT/evil-bin (a pickle that would run
`touch OUT/pwned`). The pickle names torch's globals through stand-ins registered under torch's names."""

import collections
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

out = sys.argv[1]
torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")


def _rebuild_tensor_v2(*args):
    raise AssertionError("never called")


_rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2
for name in ("HalfStorage", "BFloat16Storage"):
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
sys.modules.update({"torch": torch, "torch._utils": utils})


class Storage:
    def __init__(self, key, cls, numel):
        self.key, self.cls, self.numel = key, cls, numel


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = (self.shape[1], 1) if len(self.shape) == 2 else (1,)
        return (_rebuild_tensor_v2, (self.storage, 0, tuple(self.shape), stride, False, collections.OrderedDict()))


def save(path, tensors):
    state, blobs = collections.OrderedDict(), {}
    for i, (name, (cls, shape, raw)) in enumerate(tensors.items()):
        state[name] = Tensor(Storage(str(i), getattr(torch, cls), len(raw) // 2), shape)
        blobs[str(i)] = raw
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=2)
    p.persistent_id = lambda o: ("storage", o.cls, o.key, "cpu", o.numel) if isinstance(o, Storage) else None
    p.dump(state)
    arc = os.path.basename(path)[:-4]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(arc + "/data.pkl", buf.getvalue())
        zf.writestr(arc + "/byteorder", "little")
        for key, raw in blobs.items():
            zf.writestr(arc + "/data/" + key, raw)


def safetensors(tensors):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (cls, shape, raw) in tensors.items():
        header[name] = {"dtype": {"HalfStorage": "F16", "BFloat16Storage": "BF16"}[cls], "shape": shape,
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(raw for _, _, raw in tensors.values())


folder = os.path.join(out, "hfl-bin")
os.makedirs(folder)
shards = {
    "00001": {"model.embed_tokens.weight": ("HalfStorage", [64, 16], os.urandom(2048)),
              "model.norm.weight": ("BFloat16Storage", [16], os.urandom(32))},
    "00002": {"lm_head.weight": ("HalfStorage", [64, 16], os.urandom(2048))},
}
weight_map, sums = {}, []
for n, tensors in shards.items():
    save(os.path.join(folder, "pytorch_model-%s-of-00002.bin" % n), tensors)
    weight_map.update({k: "pytorch_model-%s-of-00002.bin" % n for k in tensors})
    sums.append("%s  model-%s-of-00002.safetensors\n" % (hashlib.sha256(safetensors(tensors)).hexdigest(), n))
with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as fh:
    json.dump({"metadata": {"total_size": 4128}, "weight_map": weight_map}, fh)
with open(os.path.join(folder, "config.json"), "w") as fh:
    json.dump({"model_type": "llama"}, fh)
with open(os.path.join(out, "hfl-bin.expected.sha256"), "w") as fh:
    fh.writelines(sums)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch %s" % os.path.join(out, "pwned"),))


os.makedirs(os.path.join(out, "evil-bin"))
with zipfile.ZipFile(os.path.join(out, "evil-bin", "pytorch_model.bin"), "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
