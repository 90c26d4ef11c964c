"""Training data: Alpaca-format instruction records and raw text, read, checked and tokenized.

Instruction data (``cla2 finetune``) is a JSON array of records or JSON Lines, one file or a folder of
``*.json`` / ``*.jsonl`` files; each record has ``instruction`` and ``output`` strings and an optional
``input`` string. A record becomes the Alpaca-2 prompt (prompts.py) followed by its output and ``</s>``;
the loss is on the output and ``</s>`` only, as in the seed's build_dataset.py.

Pre-training data (``cla2 pretrain``) is a folder of UTF-8 ``*.txt`` files; every line is tokenized
(with ``<s>``), all lines are joined and cut into blocks of ``block_size`` tokens; the tail that does
not fill a block is dropped. The blocks are cached, keyed by tokenizer, block size and data.

Every error names the file, the record (line) and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from cla2.prompts import DEFAULT_SYSTEM_PROMPT, build_prompt, join_instruction

IGNORE_INDEX = -100
INSTRUCTION_SUFFIXES = (".json", ".jsonl")


class DataError(ValueError):
    """The training data is not usable; the message says where and how to fix it."""


# ----------------------------------------------------------------------------------------- files
def data_files(path: Path, suffixes: Sequence[str]) -> list[Path]:
    """``path`` itself, or the files with one of ``suffixes`` in the folder ``path`` (sorted, recursive)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist: point --data at a file or a folder of "
                        f"{' / '.join(suffixes)} files")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"data folder {path} holds no {' / '.join(suffixes)} files: put the data there "
                        "or point --data at the file")
    return files


def fingerprint(files: Sequence[Path]) -> str:
    """sha256 over the names and bytes of the data files: run.json records it, the cache is keyed by it."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- instruction records
def _check_record(rec: object, where: str) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object with instruction, input and output, "
                        f"got {type(rec).__name__}")
    missing = [k for k in ("instruction", "output") if k not in rec]
    if missing:
        raise DataError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                        f"(has {', '.join(sorted(rec)) or 'no fields'}): every record needs "
                        "\"instruction\" and \"output\" strings, \"input\" is optional")
    for k in ("instruction", "input", "output"):
        v = rec.get(k)
        if k == "input" and v is None:
            continue
        if not isinstance(v, str):
            raise DataError(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
    if not rec["output"].strip():
        raise DataError(f"{where}: field 'output' is empty: there is nothing to train on; remove the record "
                        "or fill in the answer")
    return {"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec["output"]}


def _read_file(f: Path) -> list[dict]:
    try:
        # utf-8-sig: a byte order mark at the start (Windows editors write one) is not part of the JSON
        text = f.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{f}: not UTF-8 text ({exc}): save the file as UTF-8") from None
    stripped = text.lstrip()
    records = []
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{f}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                            "fix the file (a JSON array of records, or one JSON object per line)") from None
        # line of each record is not known for an array: name it by position
        for i, rec in enumerate(data):
            records.append(_check_record(rec, f"{f}: record {i + 1} of the array"))
        return records
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{f}: line {lineno}: malformed JSON record ({exc.msg}, column {exc.colno}): "
                            "fix the line, or remove it; JSON Lines need one complete object per line") from None
        records.append(_check_record(rec, f"{f}: line {lineno}"))
    return records


def load_instructions(path: Path) -> tuple[list[dict], list[Path]]:
    """Read and check every record of a file or folder; returns (records, files)."""
    files = data_files(path, INSTRUCTION_SUFFIXES)
    records: list[dict] = []
    for f in files:
        records.extend(_read_file(f))
    if not records:
        raise DataError(f"dataset {path} is empty ({', '.join(str(f) for f in files)} hold no record): "
                        "add Alpaca-format records (instruction, input, output)")
    return records, files


def tokenize_instruction(record: dict, tokenizer, max_seq_length: int,
                         system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> dict[str, list[int]]:
    """``<s>`` + prompt (label -100) followed by output + ``</s>`` (labelled), cut to ``max_seq_length``."""
    prompt = build_prompt(join_instruction(record["instruction"], record["input"]), system_prompt)
    source = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target = tokenizer(record["output"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    input_ids = (source + target)[:max_seq_length]
    labels = ([IGNORE_INDEX] * len(source) + target)[:max_seq_length]
    return {"input_ids": input_ids, "labels": labels}


class TokenizedDataset(torch.utils.data.Dataset):
    """A list of {input_ids, labels} examples (lists of ints)."""

    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]

    @property
    def longest(self) -> int:
        return max(map(len, (e["input_ids"] for e in self.examples)), default=0)


def instruction_dataset(path: Path, tokenizer, max_seq_length: int,
                        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                        progress: bool = True) -> tuple[TokenizedDataset, dict]:
    """Load, check and tokenize; returns the dataset and a description for run.json."""
    from tqdm.auto import tqdm

    records, files = load_instructions(path)
    examples = []
    dropped = 0
    for rec in tqdm(records, desc="tokenizing", unit="rec", disable=not progress or len(records) < 2000):
        ex = tokenize_instruction(rec, tokenizer, max_seq_length, system_prompt)
        if all(label == IGNORE_INDEX for label in ex["labels"]):
            dropped += 1  # the prompt alone fills max_seq_length: nothing left to learn from
            continue
        examples.append(ex)
    if not examples:
        raise DataError(f"dataset {path}: every record's prompt is longer than --max-seq-length "
                        f"{max_seq_length}, so no answer token is left to train on: raise --max-seq-length")
    info = {"path": str(path), "files": [str(f) for f in files], "fingerprint": fingerprint(files),
            "records": len(records), "examples": len(examples), "dropped_too_long": dropped,
            "tokens": sum(len(e["input_ids"]) for e in examples)}
    return TokenizedDataset(examples), info


class PadCollator:
    """Pad a batch to its longest example (right side): pad id, attention 0, label -100.

    ``pad_to_multiple_of`` rounds the length up (8 suits accelerator matmuls).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(e["input_ids"]) for e in batch)
        if self.multiple:
            n = -(-n // self.multiple) * self.multiple
        ids = torch.full((len(batch), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, e in enumerate(batch):
            k = len(e["input_ids"])
            ids[i, :k] = torch.tensor(e["input_ids"])
            labels[i, :k] = torch.tensor(e["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices in batches of similar length, the batches in random order.

    Each epoch: shuffle, cut into mega-batches of ``mega_batches`` batches, sort each by length, cut
    into batches, shuffle the batches (the one holding the longest sample goes first, so an out-of-memory
    error shows at once); a short last batch stays last so that the data loader's batches line up. The
    order depends only on ``seed`` and the epoch: every rank of a distributed run, and a resumed run,
    sees the same. (transformers' own grouping sorts within only 4 mega-batches on small data sets.)
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batches: int = 64):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega = max(1, mega_batches) * batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.randperm(len(self.lengths), generator=g).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(idx), self.mega):
            chunk = sorted(idx[start:start + self.mega], key=lambda i: -self.lengths[i])
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        if not batches:
            return tail
        order = torch.randperm(len(batches), generator=g).tolist()
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
        order.remove(longest)
        return [batches[longest]] + [batches[b] for b in order] + tail

    def __iter__(self):
        return iter([i for b in self.batches() for i in b])


# -------------------------------------------------------------------------------------- raw text
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's files (vocabulary and settings) and its size."""
    h = hashlib.sha256(str(len(tokenizer)).encode())
    folder = Path(getattr(tokenizer, "name_or_path", "") or "")
    vocab_file = getattr(tokenizer, "vocab_file", None)
    files = [Path(vocab_file)] if vocab_file else []
    if folder.is_dir():
        files += sorted(p for p in folder.iterdir()
                        if p.is_file() and (p.name.startswith("tokenizer") or p.name == "special_tokens_map.json"))
    for f in dict.fromkeys(files):
        if f.is_file():
            h.update(f.read_bytes())
    h.update(json.dumps(tokenizer.all_special_tokens).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLA2_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cla2")


class BlockDataset(torch.utils.data.Dataset):
    """Fixed blocks of ``block_size`` tokens; labels = input ids. ``blocks`` is a (blocks, block_size) array:
    a read-only memory map of the cache file (pages come from disk as they are read), or a tensor."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = self.blocks[i].tolist()
        return {"input_ids": ids, "labels": ids}

    @property
    def lengths(self) -> list[int]:
        return [self.blocks.shape[1]] * len(self)

    @property
    def longest(self) -> int:
        return int(self.blocks.shape[1])


TOKENIZE_LINES = 1000  # lines tokenized at once: what the tokenizer holds in memory, whatever the corpus size


def _line_chunks(f: Path, n: int):
    """The non-empty lines of ``f`` (UTF-8), ``n`` at a time, read as they come (never the whole file)."""
    chunk: list[str] = []
    try:
        with open(f, encoding="utf-8", newline=None) as fh:
            for read in fh:
                for line in read.splitlines():  # the same lines as str.splitlines() of the whole text
                    if line.strip():
                        chunk.append(line)
                if len(chunk) >= n:
                    yield chunk
                    chunk = []
    except UnicodeDecodeError as exc:
        raise DataError(f"{f}: not UTF-8 text ({exc}): save the file as UTF-8") from None
    if chunk:
        yield chunk


def text_files(folder: Path) -> list[Path]:
    """The .txt files of a pre-training data folder; DataError when it is a file, missing or holds none."""
    if Path(folder).is_file():
        raise DataError(f"--data {folder} is a file: cla2 pretrain reads a folder of .txt files")
    return data_files(Path(folder), (".txt",))


def text_dataset(folder: Path, tokenizer, block_size: int, cache_dir: Path | None = None,
                 progress: bool = True) -> tuple[BlockDataset, dict]:
    """Tokenize the .txt files of ``folder`` into blocks, once: later runs read the cache.

    The cache is a flat file of int32 token ids (``blocks-<block size>-<key>.i32``), written chunk by chunk
    as the lines are tokenized and read back as a memory map: memory stays bounded by one chunk of lines,
    whatever the size of the corpus.
    """
    import numpy as np
    from tqdm.auto import tqdm

    folder = Path(folder)
    files = text_files(folder)
    data_fp = fingerprint(files)
    tok_fp = tokenizer_fingerprint(tokenizer)
    key = hashlib.sha256(f"{tok_fp}:{block_size}:{data_fp}".encode()).hexdigest()[:24]
    cache = Path(cache_dir or default_cache_dir()) / "pretrain" / f"blocks-{block_size}-{key}.i32"
    info = {"path": str(folder), "files": [str(f) for f in files], "fingerprint": data_fp,
            "tokenizer_fingerprint": tok_fp, "block_size": block_size, "cache": str(cache)}
    itemsize = np.dtype(np.int32).itemsize
    if cache.exists() and cache.stat().st_size >= block_size * itemsize:
        blocks = np.memmap(cache, dtype=np.int32, mode="r").reshape(-1, block_size)
        info.update(blocks=int(blocks.shape[0]), tokens=int(blocks.size), cache_hit=True)
        return BlockDataset(blocks), info
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
    total = 0
    try:
        with open(tmp, "wb") as out:
            for f in tqdm(files, desc="tokenizing", unit="file", disable=not progress):
                for lines in _line_chunks(f, TOKENIZE_LINES):
                    for seq in tokenizer(lines, add_special_tokens=True)["input_ids"]:
                        np.asarray(seq, dtype=np.int32).tofile(out)
                        total += len(seq)
            n = total // block_size
            if n == 0:
                raise DataError(f"data folder {folder} holds {total} tokens, fewer than one block of "
                                f"--block-size {block_size}: add text or lower --block-size")
            out.truncate(n * block_size * itemsize)  # the tail that does not fill a block
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, cache)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    blocks = np.memmap(cache, dtype=np.int32, mode="r").reshape(n, block_size)
    info.update(blocks=n, tokens=n * block_size, dropped_tail_tokens=total - n * block_size, cache_hit=False)
    return BlockDataset(blocks), info
