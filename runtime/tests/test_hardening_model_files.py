"""Model and adapter files that lie about their sizes: refused, with the field or tensor named, before
anything of the claimed size is built or read."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from cla2 import plan

# hfl/chinese-alpaca-2-13b's config.json, the numbers the plan reads.
GOOD = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 5120,
        "intermediate_size": 13824, "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 40,
        "max_position_embeddings": 4096, "vocab_size": 55296, "torch_dtype": "float16",
        "tie_word_embeddings": False}
LIMIT_AS = 1024**3  # the plan of a real config needs ~20 MB of address space; a billion layers need 8 GB


def _model(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**GOOD, **changes}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not ...}))
    return folder


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))


# ------------------------------------------------------------------------------------------ row 6: config.json
@pytest.mark.parametrize(("field", "value", "says"), [
    ("num_hidden_layers", 10**9, "1000000000; allowed: a whole number from 1 to"),
    ("num_hidden_layers", 1e9, "1000000000.0 (a floating-point number)"),
    ("num_hidden_layers", True, "true (a boolean)"),
    ("num_hidden_layers", "40", '"40" (a string)'),
    ("num_hidden_layers", 0, "0; allowed: a whole number from 1 to"),
    ("hidden_size", -5120, "-5120; allowed"),
    ("hidden_size", 5120.0, "5120.0 (a floating-point number)"),
    ("num_attention_heads", 10**7, "10000000; allowed"),
    ("intermediate_size", 10**12, "1000000000000; allowed"),
    ("vocab_size", 2**40, f"{2**40}; allowed"),
    ("vocab_size", None, "null"),
    ("max_position_embeddings", 10**12, "1000000000000; allowed"),
    ("max_position_embeddings", "4096", '"4096" (a string)'),
    ("num_key_value_heads", 3, "3; allowed: a whole number from 1 to 40 that divides num_attention_heads (40)"),
    ("num_key_value_heads", 80, "80; allowed: a whole number from 1 to 40"),
    ("head_dim", 1e3, "1000.0 (a floating-point number)"),
    ("num_attention_heads", 7, "7; allowed: a whole number that divides hidden_size (5120)"),
    ("tie_word_embeddings", "false", '"false" (a string); allowed: true or false'),
])
def test_config_numbers_are_checked_before_the_plan_builds_anything(tmp_path, field, value, says):
    model = _model(tmp_path / "m", **{field: value})
    with pytest.raises(plan.PlanError) as err:
        plan.read_shape(model)
    msg = str(err.value)
    assert str(model / "config.json") in msg and f"{field} is " in msg and says in msg, msg
    assert "re-download the model or fix its config.json" in msg


def test_a_missing_field_is_named(tmp_path):
    with pytest.raises(plan.PlanError, match=r"config.json has no num_hidden_layers; allowed: a whole number from 1"):
        plan.read_shape(_model(tmp_path / "m", num_hidden_layers=...))


def test_real_shapes_and_absent_optional_fields_still_plan(tmp_path):
    shape = plan.read_shape(_model(tmp_path / "m", num_key_value_heads=None, max_position_embeddings=...,
                                   head_dim=None))
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.context) == (40, 40, 128, 4096)
    # LLaMA-2-70B / LLaMA-3.1-405B's shapes and a 256k vocabulary are within the bounds
    shape = plan.read_shape(_model(tmp_path / "big", hidden_size=16384, intermediate_size=53248,
                                   num_attention_heads=128, num_key_value_heads=8, num_hidden_layers=126,
                                   vocab_size=256000, max_position_embeddings=131072))
    assert shape.layers == 126 and shape.kv_heads == 8


def test_cla2_plan_refuses_a_billion_layers_without_building_them(tmp_path):
    """The command under a 1 GiB address-space limit: the refusal, not a MemoryError (or 8.9 GB)."""
    model = _model(tmp_path / "m", num_hidden_layers=10**9)
    r = subprocess.run([sys.executable, "-m", "cla2", "plan", "serve", "--model", str(model), "--devices", "1",
                        "--device-memory", "24GiB"], capture_output=True, text=True, timeout=120,
                       preexec_fn=_limited)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "cla2 plan: error:" in r.stderr and "num_hidden_layers is 1000000000" in r.stderr
    assert "Traceback" not in r.stderr
