"""PyTorch ``.bin`` weights without ``torch.load``: a pickle-free reader and a streaming safetensors writer.

Pure standard library (Python >= 3.9, no torch, nothing third-party): the model_weights role runs this very
file on the host with the system python3 (the collection's plugins/module_utils/cla2_torchbin.py is a link
to it), and ``cla2 convert`` runs it in the runtime container.

Why: hfl publishes the Chinese-LLaMA-2 / Alpaca-2 weights as ``pytorch_model-0000N-of-0000M.bin`` shards,
transformers >= 4.50 refuses ``torch.load`` under torch < 2.6 (CVE-2025-32434) and Cambricon's image has
torch 2.1, whose ``weights_only=True`` is bypassable. This module never runs the pickle's code:

- The ``.bin`` format, read from upstream torch/serialization.py (``_save`` / ``_load``): a zip holding
  ``<archive>/data.pkl`` (the state dict pickled with protocol 2), ``<archive>/byteorder`` and one entry
  ``<archive>/data/<key>`` per storage. Each storage is pickled as a persistent id
  ``('storage', storage_type, key, location, numel)`` where ``storage_type`` is a global such as
  ``torch.HalfStorage`` (``TypedStorage._pickle_storage_type``, torch/storage.py) and ``numel`` counts its
  elements. Each tensor is pickled as a call of ``torch._utils._rebuild_tensor_v2(storage, storage_offset,
  size, stride, requires_grad, backward_hooks[, metadata])`` (torch/_utils.py), offsets and strides in
  elements; a Parameter wraps that in ``torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)``.
- Nothing of the zip is trusted before it is measured (``_check_members``, ``_scan_pickle``): the members'
  compressed sizes must fit in the file (no overlapping members), compressed members may unpack to at most
  ``MAX_RATIO`` times their size (torch.save writes none compressed), ``data.pkl`` is at most
  ``MAX_PICKLE_BYTES``; its opcode stream is walked with ``pickletools.genops`` (which builds nothing) before
  it is unpickled: at most ``MAX_OPS`` opcodes, no sets, memo indices no larger than the opcodes before them (the C
  unpickler allocates for the largest index it is given), objects nested at most ``MAX_DEPTH`` deep (hashing
  a tuple nested 200,000 deep overflows the C stack: a segfault no ``except`` catches) and BUILD only on an
  ``OrderedDict`` (the state dict's ``_metadata``). A state dict pickles to about 35 opcodes and 100 bytes
  a tensor, nested 8 deep.
- Unpickling goes through ``RestrictedUnpickler``: ``find_class`` hands out stand-ins for exactly those
  globals plus ``collections.OrderedDict`` and refuses any other global before it could be called (a
  ``__reduce__`` naming ``os.system`` fails with the class named). ``persistent_load`` returns a lazy
  reference to the zip entry; no tensor data is read while unpickling.
- The safetensors format, from huggingface/safetensors (README.md, "Format"): an unsigned little-endian
  64-bit header size N, N bytes of UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
  "__metadata__": {str: str}}`` with offsets relative to the byte after the header, then the data, which
  must be entirely indexed with no holes; the Rust writer pads the header with spaces to 8 bytes, and so
  do we. Dtypes are ``F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL``; byte order little-endian, C order.

We write safetensors ourselves rather than with ``safetensors.torch.save_file``: that needs every tensor
of a file in memory at once (a 10 GB shard = 10 GB of RAM, and torch), whereas here the header is computed
from shapes and dtypes alone and each tensor's bytes are then copied from its zip entry in chunks, so the
peak is about one chunk whatever the model's size.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHUNK = 8 << 20
STAMP = ".cla2-convert.json"
BIN_INDEX = "pytorch_model.bin.index.json"
ST_INDEX = "model.safetensors.index.json"

# torch.<X>Storage (torch/storage.py _dtype_to_storage_type_map) -> (safetensors dtype, bytes per element)
STORAGES: dict[str, tuple[str, int]] = {
    "DoubleStorage": ("F64", 8), "FloatStorage": ("F32", 4), "HalfStorage": ("F16", 2),
    "BFloat16Storage": ("BF16", 2), "LongStorage": ("I64", 8), "IntStorage": ("I32", 4),
    "ShortStorage": ("I16", 2), "CharStorage": ("I8", 1), "ByteStorage": ("U8", 1), "BoolStorage": ("BOOL", 1),
}


class TorchBinError(ValueError):
    """A .bin file that cannot be converted safely, or a model folder that is incomplete."""


# Bounds on what a .bin file may make us build before it is unpickled (see _check_members, _scan_pickle).
MAX_DEPTH = 100  # a state dict nests 8 levels (dict > Parameter > tensor > args > storage id)
MAX_OPS = 2_000_000  # ~57,000 tensors at ~35 opcodes each; at most ~250 bytes of memory an opcode
MAX_PICKLE_BYTES = 64 << 20  # ~100 bytes a tensor
MAX_RATIO = 20  # compressed members' unpacked / packed bytes (floats deflate ~1.1x; torch.save stores)
_NOT_OURS = "not a checkpoint cla2 reads: re-download it, or get the model as safetensors"


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class StorageRef:
    """One storage of a .bin file: the zip entry that holds its bytes, read only when asked."""

    entry: str  # e.g. "pytorch_model-00001-of-00002/data/3"
    dtype: str  # safetensors name
    itemsize: int
    numel: int


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a .bin file: its shape and dtype (enough to plan a safetensors header) and where its bytes are."""

    file: Path
    name: str
    storage: StorageRef
    offset: int  # in elements of the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.storage.itemsize

    @property
    def contiguous(self) -> bool:
        """C-contiguous: its bytes are one range of its storage (dimensions of size 1 may have any stride)."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):  # noqa: B905  (python 3.9: no strict)
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    @property
    def byte_range(self) -> tuple[int, int]:
        start = self.offset * self.storage.itemsize
        return start, start + self.nbytes


@dataclass(frozen=True)
class _Tensor:
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 on something that is not a storage")
    return _Tensor(storage, int(storage_offset), tuple(int(x) for x in size), tuple(int(x) for x in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch.save state dict into lazy references; any global but the few a state dict needs is
    refused before it could be called."""

    def __init__(self, fh, file: Path, prefix: str, entries: dict[str, zipfile.ZipInfo]):
        super().__init__(fh)
        self.file, self.prefix, self.entries = file, prefix, entries

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in STORAGES:
            return _StorageType(name)
        raise TorchBinError(
            f"not plain tensors: refusing to load {self.file}: its pickle names {module}.{name}, which a weights "
            "file never needs (unpickling it could run any code). Get the weights from a trusted source, "
            "or as safetensors")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise TorchBinError(f"not plain tensors: refusing to load {self.file}: unknown persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise TorchBinError(f"not plain tensors: refusing to load {self.file}: storage of type {stype!r:.80}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        entry = f"{self.prefix}data/{key}"
        dtype, itemsize = STORAGES[stype.name]
        info = self.entries.get(entry)
        if info is None:
            raise TorchBinError(f"{self.file} is damaged: its pickle names storage {key}, which the zip does not "
                                "hold (a partial download?): re-download it")
        if info.file_size < int(numel) * itemsize:
            raise TorchBinError(f"{self.file} is damaged: storage {key} holds {info.file_size} bytes, "
                                f"{int(numel) * itemsize} expected: re-download it")
        return StorageRef(entry, dtype, itemsize, int(numel))


def _check_members(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse a zip whose members could unpack to far more than the file holds, before any is read."""
    size = path.stat().st_size
    packed = sum(i.compress_size for i in infos)
    if packed > size:
        raise TorchBinError(f"{path}: its zip members declare {packed} compressed bytes, more than the file's "
                            f"{size}: overlapping members (a zip bomb) or a damaged file; {_NOT_OURS}")
    for i in infos:
        if i.compress_type == zipfile.ZIP_STORED and i.file_size != i.compress_size:
            raise TorchBinError(f"{path} is damaged: stored member {i.filename} declares {i.file_size} bytes "
                                f"in {i.compress_size}: re-download it")
    squeezed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
    unpacked, packed = sum(i.file_size for i in squeezed), sum(i.compress_size for i in squeezed)
    if unpacked > MAX_RATIO * packed + (1 << 20):
        raise TorchBinError(f"{path}: its compressed zip members unpack to {unpacked} bytes from {packed} "
                            f"(ratio {unpacked / max(packed, 1):.0f}, at most {MAX_RATIO} accepted; torch.save "
                            f"compresses nothing): a zip bomb, {_NOT_OURS}")


_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
_ADD_TO = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}  # change the object below them
_SETS = {"EMPTY_SET", "ADDITEMS", "FROZENSET"}  # 235 bytes for a 1-byte opcode; never in a state dict
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}


def _depth(item) -> int:
    return item if type(item) is int else item[0]


def _tag(item) -> str | None:
    return None if type(item) is int else item[1]


def _scan_pickle(raw: bytes, path: Path) -> None:
    """Walk the opcodes of a data.pkl without building anything (``pickletools.genops``), with a stack of
    nesting depths in place of objects, and refuse a pickle that would be expensive or dangerous to load.

    A stack item is its depth (1 for a scalar, 1 + its deepest part for what is built from parts), or
    (depth, tag) for the few objects whose kind matters: the ``collections.OrderedDict`` class ("OD"), an
    instance made by calling it ("od") and short strings (for STACK_GLOBAL). A container filled after it was
    stored in another keeps its old depth there; only lists, dicts and sets are filled so, and none is
    hashable, so the depth of anything hashed (a dict key, a set item) is exact or more."""
    stack: list = []
    metastack: list = []
    memo: dict = {}
    ops = deepest = 0
    try:
        for op, arg, pos in pickletools.genops(raw):
            ops += 1
            if ops > MAX_OPS:
                raise TorchBinError(f"{path}: its pickle runs more than {MAX_OPS} opcodes (a state dict needs "
                                    f"about 35 a tensor): a pickle bomb, {_NOT_OURS}")
            name = op.name
            if name in _SETS:
                raise TorchBinError(f"not plain tensors: refusing to load {path}: its pickle builds a set, which a "
                                    "state dict never holds")
            if name == "MARK":
                metastack.append(stack)
                stack = []
            elif name in _MEMO_PUT:
                idx = len(memo) if name == "MEMOIZE" else int(arg)
                if not 0 <= idx <= ops:
                    raise TorchBinError(f"{path}: its pickle stores an object under memo index {idx} after {ops} "
                                        f"opcodes (the unpickler would allocate room for {idx} objects): a "
                                        f"memory bomb, {_NOT_OURS}")
                memo[idx] = stack[-1]
            elif name in _MEMO_GET:
                stack.append(memo[int(arg)])
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "POP":
                if stack:
                    stack.pop()
                else:
                    stack = metastack.pop()
            elif name == "POP_MARK":
                stack = metastack.pop()
            elif name == "FRAME":
                if arg > len(raw) - pos:
                    raise TorchBinError(f"{path} is damaged: its pickle declares a frame of {arg} bytes, more "
                                        "than it holds: re-download it")
            elif name in ("PROTO", "STOP"):
                pass
            else:
                before = op.stack_before
                if pickletools.markobject in before:
                    popped, stack = stack, metastack.pop()
                else:
                    n = len(before)
                    if len(stack) < n:
                        raise IndexError("stack underflow")
                    popped = stack[len(stack) - n:]
                    del stack[len(stack) - n:]
                if name in _ADD_TO:
                    target = stack.pop() if name in ("APPENDS", "SETITEMS", "ADDITEMS") else popped.pop(0)
                    if name == "BUILD" and _tag(target) != "od":
                        raise TorchBinError(f"not plain tensors: refusing to load {path}: its pickle sets the "
                                            "state of an object other than an OrderedDict, which a state dict "
                                            "never does")
                    depth = max(_depth(target), 1 + max(map(_depth, popped), default=0))
                    stack.append(depth if _tag(target) is None else (depth, _tag(target)))
                else:
                    depth = 1 + max(map(_depth, popped), default=0)
                    tag = None
                    if name == "GLOBAL" and arg == "collections OrderedDict":
                        tag = "OD"
                    elif name == "STACK_GLOBAL" and [_tag(x) for x in popped] == ["s:collections", "s:OrderedDict"]:
                        tag = "OD"
                    elif name in ("REDUCE", "NEWOBJ") and _tag(popped[0]) == "OD":
                        tag = "od"
                    elif name in _STRINGS and isinstance(arg, str) and len(arg) <= 64:
                        tag = "s:" + arg
                    stack.extend([depth if tag is None else (depth, tag)] * len(op.stack_after))
                deepest = max(deepest, depth)
    except TorchBinError:
        raise
    except Exception as exc:  # noqa: BLE001  (genops raises ValueError; a stack or memo misuse IndexError, KeyError)
        raise TorchBinError(f"{path} is damaged: its data.pkl is not a valid pickle ({type(exc).__name__}: "
                            f"{exc}): re-download it") from None
    if deepest > MAX_DEPTH:
        raise TorchBinError(f"{path}: its pickle nests objects {deepest} deep; a PyTorch checkpoint nests a few "
                            f"levels (cla2 reads at most {MAX_DEPTH}): {_NOT_OURS}")


def read_index(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a torch.save zip file, by name, with shapes, dtypes and where their bytes are; no
    tensor data is read and no code of the file runs."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:1] == b"\x80":
            raise TorchBinError(f"{path} is a legacy torch.save file (not a zip, torch < 1.6 or "
                                "_use_new_zipfile_serialization=False): it cannot be read without running its pickle; "
                                "re-save it with torch >= 2.6 (safetensors), or get the model as safetensors")
        raise TorchBinError(f"{path} is not a PyTorch weights file (not a zip): re-download it")
    with zipfile.ZipFile(path) as zf:
        _check_members(path, zf.infolist())
        infos = {i.filename: i for i in zf.infolist()}
        pkls = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise TorchBinError(f"{path} is not a torch.save file (no single <archive>/data.pkl): re-download it")
        prefix = pkls[0][: -len("data.pkl")]
        order = infos.get(prefix + "byteorder")
        if order is not None:
            with zf.open(order) as fh:
                if fh.read(16).strip() != b"little":
                    raise TorchBinError(f"{path} was saved on a big-endian machine: re-save it on a little-endian one")
        if infos[pkls[0]].file_size > MAX_PICKLE_BYTES:
            raise TorchBinError(f"{path}: its data.pkl is {infos[pkls[0]].file_size} bytes (a state dict "
                                f"pickles to about 100 bytes a tensor; cla2 reads at most {MAX_PICKLE_BYTES}): "
                                f"{_NOT_OURS}")
        with zf.open(pkls[0]) as fh:
            raw = fh.read(MAX_PICKLE_BYTES + 1)
        _scan_pickle(raw, path)
        try:
            obj = RestrictedUnpickler(io.BytesIO(raw), path, prefix, infos).load()
        except TorchBinError:
            raise
        except Exception as exc:  # noqa: BLE001  (a damaged pickle raises many kinds)
            raise TorchBinError(f"{path}: its data.pkl could not be read ({type(exc).__name__}: {exc}): "
                                "re-download it") from None
    if not isinstance(obj, dict):
        raise TorchBinError(f"not plain tensors: refusing to load {path}: it holds a {type(obj).__name__}, "
                            "not a state dict of tensors")
    out: dict[str, TensorEntry] = {}
    for name, t in obj.items():
        if not isinstance(name, str) or not isinstance(t, _Tensor):
            raise TorchBinError(f"not plain tensors: refusing to load {path}: entry {name!r:.80} is a "
                                f"{type(t).__name__}, not a tensor")
        e = TensorEntry(path, name, t.storage, t.offset, t.shape, t.stride)
        last = e.offset + sum((s - 1) * st for s, st in zip(e.shape, e.stride))  # noqa: B905  (python 3.9)
        if e.numel and (last >= e.storage.numel or min(e.stride, default=0) < 0):
            raise TorchBinError(f"{path} is damaged: tensor {name} reaches past its storage: re-download it")
        if e.numel > e.storage.numel:
            raise TorchBinError(f"{path}: tensor {name} has {e.numel} elements in a storage of {e.storage.numel} "
                                f"(its elements overlap, as an expand()ed view's do; a weight never does): {_NOT_OURS}")
        out[name] = e
    return out


def iter_bytes(entry: TensorEntry, zf: zipfile.ZipFile | None = None, chunk: int = CHUNK):
    """The bytes of a contiguous tensor, in chunks of at most ``chunk``, straight from its zip entry."""
    if not entry.contiguous:
        raise TorchBinError(f"{entry.file}: tensor {entry.name} is not contiguous")
    own = zf is None
    if own:
        zf = zipfile.ZipFile(entry.file)
    try:
        start, end = entry.byte_range
        with zf.open(entry.storage.entry) as fh:
            fh.seek(start)
            left = end - start
            while left:
                buf = fh.read(min(chunk, left))
                if not buf:
                    raise TorchBinError(f"{entry.file} is truncated (tensor {entry.name}): re-download it")
                left -= len(buf)
                yield buf
    finally:
        if own:
            zf.close()


def storage_bytes(entry: TensorEntry, zf: zipfile.ZipFile | None = None) -> bytes:
    """All the bytes of a tensor's storage (for a non-contiguous tensor, which torch then strides)."""
    if zf is None:
        with zipfile.ZipFile(entry.file) as own:
            return storage_bytes(entry, own)
    with zf.open(entry.storage.entry) as fh:
        return fh.read(entry.storage.numel * entry.storage.itemsize)


def load_torch(entry: TensorEntry, zf: zipfile.ZipFile | None = None):
    """One tensor as a torch.Tensor in fresh memory (needs torch; contiguous tensors read only their bytes)."""
    import torch

    dtype = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}[entry.dtype]
    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=dtype)
    if entry.contiguous:
        buf = bytearray(b"".join(iter_bytes(entry, zf)))
        return torch.frombuffer(buf, dtype=dtype).reshape(entry.shape)
    storage = torch.frombuffer(bytearray(storage_bytes(entry, zf)), dtype=dtype)
    return torch.as_strided(storage, entry.shape, entry.stride, entry.offset).clone()


# ------------------------------------------------------------------------------------------ writing
def safetensors_header(entries: list[TensorEntry]) -> bytes:
    """The 8-byte size and the JSON header of a safetensors file holding ``entries`` in this order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(target: Path, entries: list[TensorEntry], progress: Callable[[int], None] | None = None) -> int:
    """Write ``entries`` (all from one .bin file) as a safetensors file at ``target``: header first, then each
    tensor's bytes streamed from the zip; flushed to disk. Returns the file's size."""
    with open(target, "wb") as out:
        out.write(safetensors_header(entries))
        zf = zipfile.ZipFile(entries[0].file) if entries else None
        try:
            for e in entries:
                if e.contiguous:
                    for buf in iter_bytes(e, zf):
                        out.write(buf)
                        if progress:
                            progress(len(buf))
                    continue
                try:
                    t = load_torch(e, zf)
                except ImportError:
                    raise TorchBinError(f"{e.file}: tensor {e.name} is not contiguous (stride {list(e.stride)}), "
                                        "which needs torch to convert: run cla2 convert in the runtime container") from None
                import torch

                data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                out.write(data)
                if progress:
                    progress(len(data))
        finally:
            if zf is not None:
                zf.close()
        out.flush()
        os.fsync(out.fileno())
        return out.tell()


# ------------------------------------------------------------------------------------ model folders
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        for buf in iter(lambda: fh.read(CHUNK), b""):
            h.update(buf)
    return h.hexdigest()


def _identity(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def bin_shards(model: Path) -> tuple[list[str], dict[str, str]]:
    """The .bin files of a model folder and, from its index, which file holds each tensor ({} when unsharded).
    Raises TorchBinError when the folder has no .bin weights or a malformed index."""
    index = model / BIN_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map or \
                    not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ValueError("weight_map is not a non-empty {tensor: file} object")
        except (ValueError, KeyError, TypeError) as exc:
            raise TorchBinError(f"{index} is malformed ({exc}): re-download it") from None
        files = sorted(set(weight_map.values()))
        bad = [f for f in files if "/" in f or not f.endswith(".bin")]
        if bad:
            raise TorchBinError(f"{index} names {bad[0]!r}, not a .bin file of the folder: re-download it")
        missing = [f for f in files if not (model / f).is_file()]
        if missing:
            raise TorchBinError(f"{index} names shards that are missing: {', '.join(missing)}: re-download them")
        return files, weight_map
    if (model / "pytorch_model.bin").is_file():
        return ["pytorch_model.bin"], {}
    raise TorchBinError(f"{model} holds no PyTorch .bin weights (pytorch_model.bin or {BIN_INDEX})")


def has_safetensors(model: Path) -> bool:
    return (model / ST_INDEX).exists() or (model / "model.safetensors").exists()


def output_name(bin_name: str, count: int) -> str:
    """pytorch_model-00001-of-00003.bin -> model-00001-of-00003.safetensors; an unsharded folder -> model.safetensors."""
    m = re.fullmatch(r"pytorch_model-(\d+)-of-(\d+)\.bin", bin_name)
    if m:
        return f"model-{m.group(1)}-of-{m.group(2)}.safetensors"
    if count == 1:
        return "model.safetensors"
    return re.sub(r"\.bin$", "", bin_name).replace("pytorch_model", "model") + ".safetensors"


def _side_files(model: Path) -> list[str]:
    """Files copied beside the converted weights when --out differs: config, tokenizer, everything not weights."""
    return sorted(f.name for f in model.iterdir() if f.is_file() and not f.name.startswith(".")
                  and not f.name.endswith((".bin", ".safetensors")) and f.name not in (BIN_INDEX, ST_INDEX))


def check_stamp(model: Path, out: Path) -> str | None:
    """None when ``out`` holds a complete conversion of ``model``'s current .bin files (sizes and mtimes of
    inputs and outputs as recorded), else why not. Reads no weight."""
    stamp = read_stamp(out)
    if stamp is None:
        return "not converted"
    try:
        files, _ = bin_shards(model)
        inputs = {f: _identity(model / f) for f in files + ([BIN_INDEX] if (model / BIN_INDEX).exists() else [])}
    except (TorchBinError, OSError):
        return "the .bin files changed"
    try:
        if {k: [v["size"], v["mtime_ns"]] for k, v in stamp["inputs"].items()} != inputs:
            return "the .bin files changed since they were converted"
        for name, rec in stamp["outputs"].items():
            try:
                if _identity(out / name) != [rec["size"], rec["mtime_ns"]]:
                    return f"{name} changed since it was written"
            except OSError:
                return f"{name} is missing"
    except (KeyError, TypeError, AttributeError):
        return f"{STAMP} is malformed"
    return None


def read_stamp(out: Path) -> dict | None:
    try:
        data = json.loads((Path(out) / STAMP).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def plan(model: Path) -> tuple[list[tuple[str, str, list[TensorEntry]]], int]:
    """Read every .bin file's pickle (safely) and check the folder is complete: [(bin file, output file,
    tensors in zip order)] and the total bytes. Raises TorchBinError before anything is written."""
    files, weight_map = bin_shards(model)
    shards = []
    total = 0
    seen: dict[str, str] = {}
    for f in files:
        entries = read_index(model / f)
        for name in entries:
            if name in seen:
                raise TorchBinError(f"tensor {name} is in both {seen[name]} and {f}: re-download the model")
            seen[name] = f
        if weight_map:
            wanted = [n for n, where in weight_map.items() if where == f]
            missing = [n for n in wanted if n not in entries]
            if missing:
                raise TorchBinError(f"{model / f} lacks tensor {missing[0]} that {BIN_INDEX} puts there "
                                    f"({len(missing)} missing): re-download it")
            extra = [n for n in entries if weight_map.get(n) != f]
            if extra:
                raise TorchBinError(f"{model / f} holds tensor {extra[0]} that {BIN_INDEX} does not put there: "
                                    "the index and the shards disagree, re-download the model")
        # zip order: the file is read front to back
        with zipfile.ZipFile(model / f) as zf:
            where = {i.filename: i.header_offset for i in zf.infolist()}
        ordered = sorted(entries.values(), key=lambda e: (where[e.storage.entry], e.byte_range[0], e.name))
        shards.append((f, output_name(f, len(files)), ordered))
        total += sum(e.nbytes for e in ordered)
    return shards, total


def convert_folder(model: Path, out: Path | None = None, check: bool = False,
                   progress: Callable[[int], None] | None = None, hash_inputs: bool = True,
                   _fail_after: int | None = None) -> dict:
    """Convert the PyTorch .bin weights of ``model`` to safetensors shards in ``out`` (default: ``model``).

    Returns {"changed", "reason", "outputs", "bytes", "tensors"}. A complete earlier conversion of the same
    .bin files (the stamp) converts nothing; ``check`` reports what would be done without writing. Every
    .bin file's pickle is read and checked before anything is written; shards are written under temporary
    names, flushed and renamed at the end, then the index, then the stamp."""
    model = Path(model)
    out = Path(out) if out is not None else model
    if not model.is_dir():
        raise TorchBinError(f"model folder {model} does not exist")
    result: dict = {"changed": False, "model": str(model), "out": str(out), "outputs": [], "bytes": 0, "tensors": 0}
    bin_shards(model)  # a clear error when the folder has no .bin weights at all
    reason = check_stamp(model, out)
    if reason is None:
        result["reason"] = "already converted"
        return result
    if has_safetensors(out) and read_stamp(out) is None:
        result["reason"] = f"{out} already holds safetensors weights (not written by cla2 convert): nothing to do"
        return result
    shards, total = plan(model)
    side = _side_files(model) if out.resolve() != model.resolve() else []
    result.update(reason=reason, changed=True, bytes=total, tensors=sum(len(s[2]) for s in shards),
                  outputs=[o for _, o, _ in shards] + ([ST_INDEX] if len(shards) > 1 else []) + side)
    if check:
        return result
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.cla2-tmp-*"):  # what a killed run left (never under a final name)
        stale.unlink()
    tag = f".cla2-tmp-{os.getpid()}"
    temps: list[tuple[Path, Path]] = []
    # The inputs' sha256 (for the stamp) on a thread of its own, while the tensors are copied: hashlib
    # releases the GIL, so hashing (slower than a disk read on some CPUs) overlaps the conversion.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    hashed = {f: pool.submit(sha256_file, model / f) for f, _, _ in shards} if hash_inputs else {}
    try:
        # An earlier conversion's stamp stays until the new one replaces it: it no longer matches the inputs,
        # so an interrupted run is converted again next time.
        inputs = {}
        for _bin, name, entries in shards:
            tmp = out / f".{name}{tag}"
            temps.append((tmp, out / name))
            write_safetensors(tmp, entries, progress)
            if _fail_after is not None and len(temps) >= _fail_after:
                raise OSError("simulated failure")
        for f, _, _ in shards:
            size, mtime = _identity(model / f)
            inputs[f] = {"size": size, "mtime_ns": mtime, "sha256": hashed[f].result() if hash_inputs else None}
        if (model / BIN_INDEX).exists():
            size, mtime = _identity(model / BIN_INDEX)
            inputs[BIN_INDEX] = {"size": size, "mtime_ns": mtime, "sha256": sha256_file(model / BIN_INDEX)}
        if len(shards) > 1:
            weight_map = {e.name: name for _, name, entries in shards for e in entries}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            tmp = out / f".{ST_INDEX}{tag}"
            _write_durable(tmp, json.dumps(index, indent=2) + "\n")
            temps.append((tmp, out / ST_INDEX))
        for name in side:
            tmp = out / f".{name}{tag}"
            shutil.copyfile(model / name, tmp)
            temps.append((tmp, out / name))
        for tmp, final in temps:
            os.replace(tmp, final)
        _fsync_dir(out)
        outputs = {}
        for _, final in temps:
            size, mtime = _identity(final)
            outputs[final.name] = {"size": size, "mtime_ns": mtime}
        stamp = {"format": 1, "tool": "cla2 convert", "source": str(model.resolve()), "inputs": inputs,
                 "outputs": outputs, "tensors": result["tensors"], "total_size": total}
        _write_durable(out / f"{STAMP}{tag}", json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        os.replace(out / f"{STAMP}{tag}", out / STAMP)
        _fsync_dir(out)
    except BaseException:
        for future in hashed.values():
            future.cancel()
        for tmp, _ in temps:
            try:
                tmp.unlink()
            except OSError:
                pass
        raise
    finally:
        pool.shutdown(wait=True)
    return result


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def converted_files(folder: Path) -> list[str]:
    """The files a conversion wrote into ``folder`` (from its stamp), and the stamp itself; [] when none."""
    stamp = read_stamp(folder)
    if stamp is None:
        return []
    return sorted(stamp.get("outputs", {})) + [STAMP]
