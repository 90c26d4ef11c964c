"""`cla2 generate`: JSONL in, JSONL out, batched, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cla2 import generate


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cla2", "generate", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_generate_cli(tiny_model, tmp_path):
    src = tmp_path / "in.jsonl"
    recs = [{"instruction": "写一首诗", "id": 1}, {"instruction": "翻译", "input": "hello", "id": 2},
            {"messages": [{"role": "user", "content": "你好"}], "id": 3}, {"prompt": "从前有座山", "id": 4}]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    p = run_cli("--model", tiny_model, "--input", src, "--output", out, "--batch-size", "4",
                "--max-new-tokens", "12", "--temperature", "0")
    assert p.returncode == 0, p.stderr
    assert "generated tokens/s" in p.stderr
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [x["id"] for x in lines] == [1, 2, 3, 4]
    for x in lines:
        assert x["completion_tokens"] <= 12 and x["prompt_tokens"] > 0 and x["seconds"] >= 0
        assert x["finish_reason"] in ("stop", "length") and isinstance(x["output"], str)
    # refuses to overwrite, unless asked
    p = run_cli("--model", tiny_model, "--input", src, "--output", out)
    assert p.returncode == 2 and "--overwrite" in p.stderr


def test_generate_outputs_do_not_depend_on_batch_size(tiny_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"instruction": f"第{i}个问题"}, ensure_ascii=False) for i in range(6)),
                   encoding="utf-8")
    a = [json.loads(x) for x in generate.main(model=tiny_model, input=src, output=tmp_path / "a.jsonl", batch_size=1,
                                              max_new_tokens=16, seed=3).read_text().splitlines()]
    b = [json.loads(x) for x in generate.main(model=tiny_model, input=src, output=tmp_path / "b.jsonl", batch_size=6,
                                              max_new_tokens=16, seed=3).read_text().splitlines()]
    assert [x["output"] for x in a] == [x["output"] for x in b]


def test_bad_input_names_the_line(tiny_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"instruction": "ok"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"in.jsonl, line 2: not valid JSON"):
        generate.main(model=tiny_model, input=src, output=tmp_path / "o.jsonl")
    src.write_text('{"instruction": "ok"}\n{"question": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: needs a string 'instruction'"):
        generate.main(model=tiny_model, input=src, output=tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
