"""`cla2 merge`: a LoRA adapter into its base model, one tensor at a time.

The published 13B folders hold three ~10 GB shards: merging shard by shard would not fit a 32 GB
machine, so nothing here ever holds more than one base tensor plus the adapter pieces that tensor needs.
safetensors files are read with plain positioned reads from their header's offsets (no memory map, so the
pages read do not stay in the process), PyTorch ``.bin`` shards through ``torch.load(mmap=True,
weights_only=True)`` with each tensor's pages released once it is written where torch >= 2.6, and through
the pickle-free reader of cla2/torchbin.py (one tensor at a time from its zip entry) before that: torch
2.1's ``weights_only`` can be bypassed by a crafted file (CVE-2025-32434). The output is written the
same way: every shard's header is planned first, then each tensor is streamed into place.

The adapter is checked completely before anything is written: zero-size tensors (what the seed's
ZeRO-3 runs saved), tensors whose shapes do not fit the base (an adapter trained on another model) and
modules the base does not have all fail with the tensor named. The result goes to a temporary folder
beside --out and is renamed at the end, with ``merge.json`` (what was merged) and ``run.json`` (the run
record every cla2 job writes) in it.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from cla2 import status, torchbin
from cla2.compat import torch_load_is_safe
from cla2.io import atomic_output_dir, check_free_space, check_output_dir, human, weight_files
from cla2.record import RUN_FILE, read, run_record, write

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class MergeError(ValueError):
    """The adapter and the base do not fit together, or an input is incomplete."""


# ------------------------------------------------------------------------------ streaming readers
@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: enough to read it later, and its shape and dtype without reading it."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int = -1  # byte offset of the data in a safetensors file
    end: int = -1
    entry: torchbin.TensorEntry | None = None  # a .bin tensor read without torch.load

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _json(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def safetensors_index(path: Path) -> dict[str, TensorRef]:
    """Parse a safetensors header: names, shapes, dtypes and offsets; reads no tensor data.

    The header is checked whole before any tensor is read, against the file's size on disk: every tensor has
    a dtype cla2 reads, a shape of whole numbers >= 0, data_offsets [begin, end] whose length is what the
    shape and dtype make, inside the file, and no two tensors share bytes. A header that claims more than the
    file holds is refused here, not found out after allocating what it claims."""
    fix = "the file is damaged or incomplete: re-download or re-save it"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise MergeError(f"{path} is not a safetensors file (too short): re-download or re-save it")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise MergeError(f"{path} is not a safetensors file (header of {n} bytes): re-download or re-save it")
        if n > size - 8:
            raise MergeError(f"{path}: not a safetensors file or cut short (header of {n} bytes, the file has "
                             f"{size}): re-download or re-save it")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MergeError(f"{path}: the header is not JSON (not a safetensors file, or {fix})") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: the header is not a JSON object (not a safetensors file, or {fix})")
    base = 8 + n
    refs = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(meta, dict):
            raise MergeError(f"{where} is {_json(meta)}, not an object with dtype, shape and data_offsets: {fix}")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in meta:
                raise MergeError(f"{where} has no {key}: {fix}")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise MergeError(f"{where} has dtype {_json(dtype)}, which cla2 merge does not handle (it reads "
                             f"{', '.join(ST_DTYPES)}); if it should be one of those, {fix}")

        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if not isinstance(shape, list) or not all(whole(d) for d in shape):
            raise MergeError(f"{where} has shape {_json(shape)}: a list of whole numbers of 0 or more is "
                             f"allowed; {fix}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(whole(o) for o in offsets) \
                or offsets[0] > offsets[1]:
            raise MergeError(f"{where} has data_offsets {_json(offsets)}: [begin, end] with 0 <= begin <= end "
                             f"is allowed; {fix}")
        start, end = offsets
        nbytes = math.prod(shape) * ST_DTYPES[dtype].itemsize
        if end - start != nbytes:
            raise MergeError(f"{where} is {dtype} {shape}, {nbytes} bytes, but its data_offsets {offsets} hold "
                             f"{end - start}: {fix}")
        if base + end > size:
            raise MergeError(f"{where} ends at byte {base + end} of the file (data_offsets {offsets}), but the "
                             f"file has {size} bytes: {fix}")
        refs[name] = TensorRef(path, name, tuple(shape), ST_DTYPES[dtype], base + start, base + end)
    spans = sorted((r.start, r.end, name) for name, r in refs.items() if r.end > r.start)
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            raise MergeError(f"{path}: tensors {a} (bytes {s0 - base} to {e0 - base}) and {b} (bytes {s1 - base} to "
                             f"{e1 - base}) overlap: {fix}")
    return refs


def read_tensor(ref: TensorRef, fd: int | None = None) -> torch.Tensor:
    """Read one tensor of a safetensors file into fresh memory (positioned read, no memory map)."""
    size = ref.end - ref.start
    buf = bytearray(size)
    own = fd is None
    if own:
        fd = os.open(ref.file, os.O_RDONLY)
    try:
        view, done = memoryview(buf), 0
        while done < size:
            got = os.preadv(fd, [view[done:]], ref.start + done)
            if got == 0:
                raise MergeError(f"{ref.file} is truncated (tensor {ref.name}): re-download or re-save it")
            done += got
    finally:
        if own:
            os.close(fd)
    if size == 0:
        return torch.empty(ref.shape, dtype=ref.dtype)
    return torch.frombuffer(buf, dtype=ref.dtype).reshape(ref.shape)


_libc = None


def release_pages(t: torch.Tensor) -> None:
    """Drop a memory-mapped tensor's pages from this process (they stay in the page cache); Linux only."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        storage = t.untyped_storage()
        start = storage.data_ptr() // page * page
        end = storage.data_ptr() + storage.nbytes()
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


def bin_refs(path: Path) -> dict[str, TensorRef]:
    """The tensors of a .bin file through the pickle-free reader: shapes and dtypes, nothing read yet."""
    try:
        entries = torchbin.read_index(path)
    except torchbin.TorchBinError as exc:
        raise MergeError(str(exc)) from None
    return {n: TensorRef(path, n, e.shape, ST_DTYPES[e.dtype], entry=e) for n, e in entries.items()}


class BaseReader:
    """The base model's tensors by name, read one at a time from safetensors or .bin shards."""

    def __init__(self, model_dir: Path):
        self.files = weight_files(model_dir)
        self.refs: dict[str, TensorRef] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        for f in self.files:
            if f.suffix == ".safetensors":
                self.refs.update(safetensors_index(f))
            elif not torch_load_is_safe():
                self.refs.update(bin_refs(f))
            else:
                try:
                    sd = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)  # torch 2.1: a str
                except Exception as exc:  # noqa: BLE001  (torch raises many kinds)
                    raise MergeError(f"{f} could not be read as a PyTorch weights file ({exc}): "
                                     "re-download it") from None
                self._bin[f] = sd
                for name, t in sd.items():
                    self.refs[name] = TensorRef(f, name, tuple(t.shape), t.dtype)

    def read(self, ref: TensorRef) -> torch.Tensor:
        if ref.entry is not None:
            return torchbin.load_torch(ref.entry)
        if ref.file in self._bin:
            t = self._bin[ref.file][ref.name]
            copy = t.clone()
            release_pages(t)
            return copy
        return read_tensor(ref)

    def done_with(self, file: Path) -> None:
        self._bin.pop(file, None)


# -------------------------------------------------------------------------------------- adapter
@dataclass
class Adapter:
    folder: Path
    config: dict
    refs: dict[str, TensorRef]
    loaded: dict[str, torch.Tensor]  # .bin adapters are small enough to hold (LoRA only) or are mmapped

    def get(self, name: str) -> torch.Tensor:
        if name in self.loaded:
            return self.loaded[name]
        if self.refs[name].entry is not None:
            return torchbin.load_torch(self.refs[name].entry)
        return read_tensor(self.refs[name])


def adapter_tensors(folder: Path) -> tuple[dict[str, TensorRef], dict[str, torch.Tensor]]:
    """An adapter folder's tensors: where each is (nothing read yet), and those a .bin load already holds."""
    folder = Path(folder)
    st, binf = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    loaded: dict[str, torch.Tensor] = {}
    if st.exists():
        refs = safetensors_index(st)
    elif binf.exists() and not torch_load_is_safe():
        refs = bin_refs(binf)
    elif binf.exists():
        loaded = torch.load(str(binf), map_location="cpu", mmap=True, weights_only=True)
        refs = {n: TensorRef(binf, n, tuple(t.shape), t.dtype) for n, t in loaded.items()}
    else:
        raise MergeError(f"{folder} has no adapter_model.safetensors or adapter_model.bin: the training run did not "
                         "finish; resume it (cla2 finetune ... --resume) or point --adapter at a finished one")
    return refs, loaded


def adapter_vocab(refs: dict[str, TensorRef]) -> list[tuple[str, int]]:
    """The vocabulary sizes an adapter's tensors show: rows of the embed_tokens / lm_head it saved in full
    (modules_to_save), as (what, size)."""
    out = []
    for module in ("embed_tokens", "lm_head"):
        for name, ref in refs.items():
            key = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            if key.endswith(f"{module}.weight") and ".lora_" not in key and len(ref.shape) == 2 and ref.shape[0]:
                out.append((f"its saved {module} has {ref.shape[0]} rows", ref.shape[0]))
    return out


def tokenizer_size(folder: Path) -> int | None:
    """Pieces of the tokenizer a folder ships (what transformers' len(tokenizer) says), or None without one."""
    folder = Path(folder)
    if not any((folder / n).exists() for n in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(str(folder)))
    except (OSError, ValueError):
        return None  # not a tokenizer transformers reads: the adapter's tensors are checked still


def check_adapter_vocab(adapter: Path, refs: dict[str, TensorRef], model: Path, tokenizer_pieces: int | None) -> None:
    """The adapter's vocabulary (the rows of its saved embed_tokens / lm_head, and its tokenizer's pieces when it
    ships one) must be the base's (config.json vocab_size): cla2 trains only with a tokenizer of the model's
    size, so a difference means an adapter of another base, whose layer shapes may still fit."""
    config = json.loads((Path(model) / "config.json").read_text())
    vocab = config.get("vocab_size")
    if vocab is None and isinstance(config.get("text_config"), dict):
        vocab = config["text_config"].get("vocab_size")
    if not isinstance(vocab, int):
        return  # the plan refuses such a config with its own message
    seen = adapter_vocab(refs)
    if tokenizer_pieces is not None:
        seen.append((f"its tokenizer has {tokenizer_pieces} pieces", tokenizer_pieces))
    wrong = [(what, n) for what, n in seen if n != vocab]
    if not wrong:
        return
    run = read(Path(adapter)) or {}
    named = run.get("base_model")
    if named:
        todo = (f"its run.json names {named} as its base: use that one (--model {named})"
                if Path(named).resolve() != Path(model).resolve() else
                f"its run.json names this base ({named}), which has changed since: use the base it was trained on")
    else:
        todo = "its run.json names no base: use the base model it was trained on"
    what = ", ".join(w for w, _ in wrong)
    raise MergeError(f"adapter {adapter} was trained with another vocabulary ({what}), but base model {model} has "
                     f"a vocabulary of {vocab} (config.json vocab_size): the adapter was trained on another base; "
                     f"{todo}")


def load_adapter(folder: Path) -> Adapter:
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise MergeError(f"{folder} has no adapter_config.json: point --adapter at a PEFT LoRA adapter folder "
                         "(the --out of cla2 finetune / pretrain)")
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{cfg_path}: peft_type is {config.get('peft_type')}, cla2 merge merges LoRA adapters only")
    if config.get("use_dora"):
        raise MergeError(f"{cfg_path}: DoRA adapters are not supported by cla2 merge: merge with peft's merge_and_unload")
    if config.get("fan_in_fan_out"):
        raise MergeError(f"{cfg_path}: fan_in_fan_out adapters (GPT-2 style Conv1D) are not LLaMA adapters")
    refs, loaded = adapter_tensors(folder)
    if not refs:
        raise MergeError(f"adapter {folder} holds no tensors: retrain it")
    empty = [n for n, r in refs.items() if math.prod(r.shape) == 0]
    if empty:
        raise MergeError(
            f"adapter {folder} holds {len(empty)} empty (zero-size) tensor(s) of {len(refs)}, e.g. {empty[0]} "
            f"{list(refs[empty[0]].shape)}: it was saved under DeepSpeed ZeRO-3 without gathering the "
            "parameters (the seed's bug); retrain with cla2 finetune --deepspeed zero3, which saves complete adapters"
        )
    return Adapter(folder, config, refs, loaded)


def _pattern_value(module: str, patterns: dict, default):
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module) or module.endswith(key):
            return value
    return default


def plan(adapter: Adapter, base_refs: dict[str, TensorRef]) -> tuple[dict[str, dict], dict[str, str]]:
    """Map adapter tensors onto base tensors and check every shape; nothing is read.

    Returns ({base tensor: {A, B, scaling, embedding}}, {base tensor: full replacement adapter tensor}).
    """
    cfg = adapter.config
    lora: dict[str, dict] = {}
    full: dict[str, str] = {}
    problems: list[str] = []
    unknown: list[str] = []
    for name in adapter.refs:
        key = name.removeprefix("base_model.model.")
        m = re.fullmatch(r"(.+)\.lora_(A|B|embedding_A|embedding_B)(?:\.[^.]+)?\.weight", key) or \
            re.fullmatch(r"(.+)\.lora_(embedding_A|embedding_B)(?:\.[^.]+)?", key)
        if m:
            module, part = m.group(1), m.group(2)
            entry = lora.setdefault(f"{module}.weight", {"module": module})
            entry[part[-1]] = name
            entry["embedding"] = part.startswith("embedding")
            continue
        if ".lora_magnitude_vector" in key or ".lora_" in key:
            unknown.append(name)
            continue
        full[key.replace(".modules_to_save.default", "")] = name
    if unknown:
        raise MergeError(f"adapter {adapter.folder}: tensors cla2 merge does not understand: {', '.join(unknown[:5])}")
    for base_name, entry in lora.items():
        if "A" not in entry or "B" not in entry:
            problems.append(f"{base_name}: the adapter has only one of lora_A / lora_B")
            continue
        if base_name not in base_refs:
            problems.append(f"{entry['module']}: the base model has no tensor {base_name}")
            continue
        a, b = adapter.refs[entry["A"]].shape, adapter.refs[entry["B"]].shape
        want = base_refs[base_name].shape
        got = (b[0], a[1]) if not entry["embedding"] else (a[1], b[0])
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or got != tuple(want):
            problems.append(f"{entry['module']}: lora_A {list(a)} x lora_B {list(b)} gives {list(got)}, "
                            f"the base tensor {base_name} is {list(want)}")
            continue
        module = entry["module"]
        r = _pattern_value(module, cfg.get("rank_pattern"), cfg.get("r", a[0]))
        alpha = _pattern_value(module, cfg.get("alpha_pattern"), cfg.get("lora_alpha", r))
        entry["scaling"] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    for base_name, name in full.items():
        if base_name not in base_refs:
            problems.append(f"{name}: the base model has no tensor {base_name}")
        elif adapter.refs[name].shape != base_refs[base_name].shape:
            problems.append(f"{name}: shape {list(adapter.refs[name].shape)}, the base tensor {base_name} is "
                            f"{list(base_refs[base_name].shape)}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise MergeError(f"adapter {adapter.folder} does not fit base model (trained on another base?):\n  {shown}\n"
                         "use the base model the adapter was trained on (see the adapter's run.json), or pass --model")
    return lora, full


# -------------------------------------------------------------------------------------- writing
def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)?\s*", str(text), re.I)
    if not m:
        raise MergeError(f"--shard-size {text!r}: give a size such as 2GB, 500MB or a number of bytes")
    unit = (m.group(2) or "").upper().replace("I", "").rstrip("B")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


class ShardWriter:
    """Writes safetensors shards whose headers are planned up front, so each tensor is streamed in once."""

    def __init__(self, folder: Path, layout: list[list[tuple[str, tuple[int, ...], torch.dtype]]]):
        self.folder = folder
        n = len(layout)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.where: dict[str, tuple[int, int]] = {}
        self.files = []
        for i, shard in enumerate(layout):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype in shard:
                size = math.prod(shape) * dtype.itemsize
                header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
                offset += size
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = folder / self.names[i]
            f = open(path, "wb")  # noqa: SIM115  (closed in close())
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
            self.files.append((f, 8 + len(raw)))
            for name, _, _ in shard:
                self.where[name] = (i, 8 + len(raw) + header[name]["data_offsets"][0])

    def write(self, name: str, t: torch.Tensor) -> None:
        i, pos = self.where[name]
        f, _ = self.files[i]
        f.seek(pos)
        if t.numel():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())

    def close(self) -> dict[str, str]:
        for f, _ in self.files:
            f.close()
        return {name: self.names[i] for name, (i, _) in self.where.items()}


def _layout(entries: list[tuple[str, tuple[int, ...], torch.dtype]], shard_bytes: int):
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e[1]) * e[2].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def check_space(out: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], shard_bytes: int, model: Path,
                tok_src: Path) -> None:
    """Refuse before writing when the merged folder does not fit the free space of --out's file system: the
    tensors' bytes (from the base's headers, in the output dtype), the shards' headers, the files copied
    (config, generation config, tokenizer) and a margin for block rounding. With --overwrite the old OUT stays
    until the new one is complete, so it needs no less."""
    tensors = sum(math.prod(s) * d.itemsize for _, s, d in entries)
    shards = len(_layout(entries, shard_bytes))
    copied = [f for f in (*Path(tok_src).iterdir(), model / "config.json", model / "generation_config.json")
              if f.is_file() and (f.name.startswith("tokenizer") or f.name in (
                  "special_tokens_map.json", "added_tokens.json", "config.json", "generation_config.json"))]
    extra = sum(f.stat().st_size for f in copied) + 256 * len(entries) + 4096 * (shards + len(copied) + 4) + (1 << 20)
    check_free_space(out, tensors + extra, f"{shards} safetensors shard(s) holding {human(tensors)} of tensors, "
                     f"their headers, the config and tokenizer files and a margin")


def _base_from_run(adapter: Path) -> Path:
    run = read(adapter)
    if run and run.get("base_model"):
        return Path(run["base_model"])
    cfg = adapter / "adapter_config.json"
    if cfg.exists():
        base = json.loads(cfg.read_text()).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            return Path(base)
    raise MergeError(f"cannot tell the base model of {adapter}: it has no run.json naming it and its "
                     "adapter_config.json base_model_name_or_path is not a local folder; pass --model")


def ordered(reader: BaseReader) -> list[TensorRef]:
    """Base tensors in file order, and by offset within a file (sequential reads)."""
    rank = {f: i for i, f in enumerate(reader.files)}
    return sorted(reader.refs.values(), key=lambda r: (rank[r.file], r.start))


@status.tracked("merge")
def main(
    adapter: Path,
    out: Path,
    model: Path | None = None,
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto",
    shard_size: str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Merge a LoRA adapter into its base model, tensor by tensor, and write a complete model folder.

    Reads the base's safetensors or PyTorch .bin shards (the published hfl folders are .bin) one tensor at
    a time, adds scaling * B @ A to each LoRA target, replaces the modules the adapter saved in full
    (embed_tokens, lm_head), and writes safetensors shards with an index, config.json, generation_config.json
    and the tokenizer (the adapter's if it has one, else the base's). Peak memory is about one base tensor
    plus its adapter pieces. The output appears under OUT only once complete.

    Args:
        adapter: LoRA adapter folder (adapter_config.json + adapter_model.safetensors or .bin), e.g. the --out
            of cla2 finetune / pretrain.
        out: Output model folder; refused if it exists and is not empty, unless --overwrite.
        model: Base model folder; default: the base_model recorded in the adapter's run.json
            (or its adapter_config.json's base_model_name_or_path).
        dtype: Dtype of the merged floating-point weights: auto keeps the base's, or fp32, fp16, bf16.
        shard_size: Largest output shard, e.g. 2GB, 500MB, or bytes.
        overwrite: Replace a non-empty OUT (only once the new folder is complete).
    """
    args = dict(locals())  # the flags, before anything else is a local
    began = time.time()
    from tqdm.auto import tqdm

    adapter, out = Path(adapter), Path(out)
    check_output_dir(out, overwrite)
    shard_bytes = parse_size(shard_size)
    ad = load_adapter(adapter)
    model = Path(model) if model is not None else _base_from_run(adapter)
    if not (model / "config.json").exists():
        if not model.is_dir():
            raise MergeError(f"base model folder {model} does not exist: pass --model pointing at it")
        raise MergeError(f"base model folder {model} has no config.json: point --model at a Hugging Face model folder")
    check_adapter_vocab(adapter, ad.refs, model, tokenizer_size(adapter))
    reader = BaseReader(model)
    lora, full = plan(ad, reader.refs)
    config = json.loads((model / "config.json").read_text())
    out_dtype = DTYPES.get(dtype)

    def target_dtype(ref: TensorRef) -> torch.dtype:
        return out_dtype if out_dtype is not None and ref.dtype.is_floating_point else ref.dtype

    order = ordered(reader)
    entries = [(r.name, r.shape, target_dtype(r)) for r in order]
    tok_src = adapter if (adapter / "tokenizer_config.json").exists() else model
    check_space(out, entries, shard_bytes, model, tok_src)
    started = time.time()
    st = status.current()
    st.update("merging", step=0, total=len(order), unit="tensor", force=True)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, _layout(entries, shard_bytes))
        try:
            total = sum(math.prod(s) * d.itemsize for _, s, d in entries)
            with tqdm(total=total, unit="B", unit_scale=True, desc="merging") as bar:
                for i, ref in enumerate(order):
                    if ref.name in full:
                        t = ad.get(full[ref.name])
                    else:
                        t = reader.read(ref)
                        if ref.name in lora:
                            e = lora[ref.name]
                            a = ad.get(e["A"]).float()
                            b = ad.get(e["B"]).float()
                            delta = (b @ a).T if e["embedding"] else b @ a
                            t = (t.float() + delta * e["scaling"])
                            del a, b, delta
                    writer.write(ref.name, t.to(target_dtype(ref)))
                    bar.update(math.prod(ref.shape) * target_dtype(ref).itemsize)
                    st.update(step=i + 1)
                    del t
                    if i + 1 == len(order) or order[i + 1].file != ref.file:
                        reader.done_with(ref.file)  # unmaps a .bin shard
        finally:
            weight_map = writer.close()
        if len(writer.names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if out_dtype is not None:
            name = str(out_dtype).replace("torch.", "")
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "torch_dtype":
                    config[key] = name
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        for f in ("generation_config.json",):
            if (model / f).exists():
                shutil.copyfile(model / f, tmp / f)
        from cla2.training import copy_tokenizer

        copy_tokenizer(tok_src, tmp)
        info = {"job": "merge", "adapter": str(adapter.resolve()), "base_model": str(model.resolve()),
                "dtype": dtype, "lora_tensors_merged": len(lora), "tensors_replaced": sorted(full),
                "shards": writer.names, "seconds": round(time.time() - started, 2)}
        (tmp / "merge.json").write_text(json.dumps(info, indent=2))
        st.update("saving", force=True)
        write(tmp / RUN_FILE, run_record("merge", args, began, time.time(), **{
            k: v for k, v in info.items() if k not in ("job", "seconds")}, merge_seconds=info["seconds"]))
    print(f"merged {len(lora)} LoRA targets and {len(full)} full tensors into {out}")
    return out
