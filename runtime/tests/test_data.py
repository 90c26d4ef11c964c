"""Instruction data: reading, checking, the label mask token by token."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from cla2.data import (
    IGNORE_INDEX,
    DataError,
    PadCollator,
    instruction_dataset,
    load_instructions,
    text_dataset,
)
from cla2.prompts import DEFAULT_SYSTEM_PROMPT


@pytest.fixture(scope="module")
def real_tok(real_tokenizer_dir):
    return AutoTokenizer.from_pretrained(real_tokenizer_dir)


def test_labels_mask_the_prompt_token_by_token(tmp_path, real_tok):
    rec = {"instruction": "把这句话翻译成英文", "input": "我喜欢猫", "output": "I like cats."}
    (tmp_path / "d.json").write_text(json.dumps([rec], ensure_ascii=False))
    ds, info = instruction_dataset(tmp_path / "d.json", real_tok, max_seq_length=512)
    ex = ds[0]
    # the template, written out here independently of prompts.py
    prompt = f"[INST] <<SYS>>\n{DEFAULT_SYSTEM_PROMPT}\n<</SYS>>\n\n把这句话翻译成英文\n我喜欢猫 [/INST]"
    prompt_ids = real_tok(prompt)["input_ids"]
    answer_ids = real_tok("I like cats.", add_special_tokens=False)["input_ids"] + [real_tok.eos_token_id]
    assert prompt_ids[0] == real_tok.bos_token_id
    assert ex["input_ids"] == prompt_ids + answer_ids
    assert len(ex["labels"]) == len(ex["input_ids"])
    for i, (tok, label) in enumerate(zip(ex["input_ids"], ex["labels"], strict=True)):
        if i < len(prompt_ids):
            assert label == IGNORE_INDEX, f"prompt token {i} ({real_tok.convert_ids_to_tokens(tok)}) is not masked"
        else:
            assert label == tok, f"answer token {i} is not trained on"
    assert ex["labels"][-1] == real_tok.eos_token_id
    assert real_tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX], skip_special_tokens=True) == "I like cats."
    assert info["records"] == 1 and len(info["fingerprint"]) == 64


def test_truncation_keeps_masks_aligned_and_collator_pads(tmp_path, real_tok):
    recs = [{"instruction": "问题" * 5, "output": "答案" * 50}, {"instruction": "短", "output": "好"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs))
    ds, _ = instruction_dataset(tmp_path / "d.jsonl", real_tok, max_seq_length=48)
    assert len(ds[0]["input_ids"]) == 48 and len(ds[0]["labels"]) == 48
    batch = PadCollator(pad_token_id=0)([ds[0], ds[1]])
    n1 = len(ds[1]["input_ids"])
    assert batch["input_ids"].shape == (2, 48)
    assert batch["attention_mask"][1, :n1].all() and not batch["attention_mask"][1, n1:].any()
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()


def test_folder_of_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "甲", "output": "乙"}], ensure_ascii=False))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"instruction": "丙", "input": "丁", "output": "戊"}\n\n')
    records, files = load_instructions(tmp_path)
    assert [r["instruction"] for r in records] == ["甲", "丙"] and len(files) == 2
    assert records[1]["input"] == "丁"


@pytest.mark.parametrize("content, expected", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', r"line 2: malformed JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', r"line 2: missing field output"),
    ('{"input": "x"}\n', r"line 1: missing fields instruction, output"),
    ('{"instruction": "a", "output": 3}\n', r"line 1: field 'output' must be a string"),
    ('[{"instruction": "a", "output": "b"}, ["x"]]', r"record 2 of the array: a record must be a JSON object"),
    ('[{"instruction": "a", "output": "b"},\n {"instruction": }]', r"malformed JSON at line 2"),
    ("", r"is empty"),
    ("[]", r"is empty"),
])
def test_bad_records_name_file_and_line(tmp_path, content, expected):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=expected) as err:
        load_instructions(f)
    assert str(f) in str(err.value)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_instructions(tmp_path / "nope.json")
    with pytest.raises(DataError, match="holds no .json / .jsonl files"):
        load_instructions(tmp_path)


def test_text_blocks_are_cached_by_tokenizer_and_block_size(tmp_path, real_tok):
    data = tmp_path / "txt"
    data.mkdir()
    (data / "a.txt").write_text("春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。\n" * 20, encoding="utf-8")
    cache = tmp_path / "cache"
    ds, info = text_dataset(data, real_tok, block_size=32, cache_dir=cache)
    assert not info["cache_hit"] and len(ds) == info["blocks"] > 1
    assert all(len(ds[i]["input_ids"]) == 32 and ds[i]["labels"] == ds[i]["input_ids"] for i in range(len(ds)))
    ds2, info2 = text_dataset(data, real_tok, block_size=32, cache_dir=cache)
    assert info2["cache_hit"] and info2["cache"] == info["cache"] and ds2[0] == ds[0]
    _, info3 = text_dataset(data, real_tok, block_size=16, cache_dir=cache)
    assert not info3["cache_hit"] and info3["cache"] != info["cache"]
    with pytest.raises(DataError, match="fewer than one block of --block-size 100000"):
        text_dataset(data, real_tok, block_size=100000, cache_dir=cache)


def test_length_grouped_sampler_cuts_padding_and_keeps_batches_aligned():
    import random

    from cla2.data import LengthGroupedSampler

    rnd = random.Random(0)
    lengths = [int(min(1024, 40 + rnd.lognormvariate(4.8, 0.8))) for _ in range(1000)]
    bs = 16
    sampler = LengthGroupedSampler(lengths, bs, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(1000))  # every sample once
    batches = [order[k:k + bs] for k in range(0, len(order), bs)]
    assert batches == sampler.batches()  # the loader's cuts are the sampler's batches

    def pad_fraction(bs_list):
        slots = sum(len(b) * max(lengths[i] for i in b) for b in bs_list)
        return 1 - sum(lengths) / slots

    shuffled = list(range(1000))
    rnd.shuffle(shuffled)
    assert pad_fraction(batches) < 0.1 < 0.4 < pad_fraction([shuffled[k:k + bs] for k in range(0, 1000, bs)])
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest first
    assert list(LengthGroupedSampler(lengths, bs, seed=3)) == order  # the same on every rank and on resume
    sampler.set_epoch(1)
    assert list(sampler) != order


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_utf8_byte_order_mark_is_accepted(tmp_path, kind):
    recs = [{"instruction": "问", "input": "", "output": "答"}, {"instruction": "q2", "output": "a2"}]
    if kind == "json":
        text = json.dumps(recs, ensure_ascii=False)
    else:
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n"
    f = tmp_path / f"d.{kind}"
    f.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    records, _ = load_instructions(f)
    assert [r["instruction"] for r in records] == ["问", "q2"]
    assert records[0]["output"] == "答"


def test_text_blocks_are_tokenized_in_bounded_memory(tmp_path, real_tok, monkeypatch):
    import tracemalloc

    from cla2 import data

    line = "今天天气很好，我们去公园散步吧。The quick brown fox jumps over the lazy dog."
    monkeypatch.setattr(data, "TOKENIZE_LINES", 100, raising=False)

    def tokenize(lines: int):
        corpus = tmp_path / f"corpus-{lines}"
        corpus.mkdir()
        (corpus / "a.txt").write_text((line + "\n") * lines, encoding="utf-8")
        tracemalloc.start()
        try:
            ds, info = text_dataset(corpus, real_tok, block_size=64, cache_dir=tmp_path / "cache", progress=False)
            return ds, info, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    _, small_info, small_peak = tokenize(16000)
    ds, info, peak = tokenize(48000)
    assert info["tokens"] == len(ds) * 64 > 3 * small_info["tokens"] - 64
    # three times the corpus, about the same peak (a list of every token id would grow by 8 bytes an id and more)
    assert peak < small_peak + 200_000, f"peak {peak} bytes for 3x the corpus, {small_peak} for 1x"
    seq = real_tok(line)["input_ids"]
    flat = seq * 48000
    n = len(ds)
    assert ds[0]["input_ids"] == flat[:64] and ds[n - 1]["input_ids"] == flat[(n - 1) * 64:n * 64]
    assert info["dropped_tail_tokens"] == len(flat) - n * 64
    again, info2 = text_dataset(tmp_path / "corpus-48000", real_tok, block_size=64, cache_dir=tmp_path / "cache",
                                progress=False)
    assert info2["cache_hit"] and again[n - 1] == ds[n - 1]
