"""cla2 pretrain: raw text into blocks, cached; the same outputs and rules as finetune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cla2 import pretrain
from cla2.data import DataError
from cla2.io import OutputExistsError

POEM = "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n"
FAST = dict(batch_size=2, gradient_accumulation_steps=1, lora_rank=8, lora_alpha=16, logging_steps=1, device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(POEM * 15, encoding="utf-8")
    (d / "nested").mkdir()
    (d / "nested" / "b.txt").write_text("Chinese-LLaMA-2 扩充了中文词表。\n" * 15, encoding="utf-8")
    (d / "ignored.md").write_text("not text data")
    return d


def test_pretrain_learns_and_writes_the_outputs(tmp_path, tiny_model, corpus):
    cache = tmp_path / "cache"
    out = tmp_path / "pt"
    run = pretrain.main(tiny_model, corpus, out, block_size=64, cache_dir=cache, max_steps=12, lr=5e-3,
                        save_steps=6, **FAST)
    assert run["data"]["cache_hit"] is False and run["data"]["blocks"] >= 4
    assert [Path(f).name for f in run["data"]["files"]] == ["a.txt", "b.txt"]
    losses = [e["loss"] for e in run["log_history"] if "loss" in e]
    assert run["metrics"]["global_step"] == 12 and losses[-1] < losses[0]
    for name in ("adapter_config.json", "adapter_model.safetensors", "run.json", "loss.png", "tokenizer.model"):
        assert (out / name).exists(), name
    assert json.loads((out / "run.json").read_text())["job"] == "pretrain"
    assert json.loads((out / "run.json").read_text())["vocab_size"] == 55296
    # the same data and tokenizer again: read from the cache, not tokenized again
    again = pretrain.main(tiny_model, corpus, tmp_path / "pt2", block_size=64, cache_dir=cache, max_steps=1, **FAST)
    assert again["data"]["cache_hit"] is True and again["data"]["cache"] == run["data"]["cache"]
    # a finetune folder is not a pretrain folder
    with pytest.raises(OutputExistsError):
        pretrain.main(tiny_model, corpus, out, block_size=64, cache_dir=cache, max_steps=1, **FAST)


def test_bad_text_data(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        pretrain.main(tiny_model, tmp_path / "empty", tmp_path / "o", max_steps=1, cache_dir=tmp_path / "c", **FAST)
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("太短了。\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"fewer than one block of --block-size 1024: add text or lower --block-size"):
        pretrain.main(tiny_model, tmp_path / "short", tmp_path / "o", max_steps=1, cache_dir=tmp_path / "c", **FAST)
    assert not (tmp_path / "o").exists()
