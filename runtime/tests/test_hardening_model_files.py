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


# ------------------------------------------------------------------------------------------ row 7: safetensors
def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
GiB = 1024**3


@pytest.mark.parametrize(("tensors", "data", "says"), [
    ({"w": {"shape": [2, 2], "data_offsets": [0, 16]}}, 16, "tensor w has no dtype"),
    ({"w": {**F32_2x2, "dtype": "Q4"}}, 16, 'tensor w has dtype "Q4"'),
    ({"w": {**F32_2x2, "dtype": 32}}, 16, "tensor w has dtype 32"),
    ({"w": {**F32_2x2, "shape": [2, -2]}}, 16, "tensor w has shape [2, -2]: a list of whole numbers of 0 or more"),
    ({"w": {**F32_2x2, "shape": [2.0, 2]}}, 16, "tensor w has shape [2.0, 2]"),
    ({"w": {**F32_2x2, "shape": "2x2"}}, 16, 'tensor w has shape "2x2"'),
    ({"w": {"dtype": "F32", "shape": [2, 2]}}, 16, "tensor w has no data_offsets"),
    ({"w": {**F32_2x2, "data_offsets": [0]}}, 16, "tensor w has data_offsets [0]: [begin, end]"),
    ({"w": {**F32_2x2, "data_offsets": [16, 0]}}, 16, "tensor w has data_offsets [16, 0]: [begin, end]"),
    ({"w": {**F32_2x2, "data_offsets": [0, 12]}}, 16, "tensor w is F32 [2, 2], 16 bytes, but its data_offsets "
                                                       "[0, 12] hold 12"),
    ({"w": {"dtype": "F16", "shape": [32768, 32768], "data_offsets": [0, 2 * GiB]}}, 43_000,
     "tensor w ends at byte 2147483737 of the file (data_offsets [0, 2147483648]), but the file has 43089 bytes"),
    ({"w": F32_2x2, "v": {**F32_2x2, "data_offsets": [8, 24]}}, 24,
     "tensors w (bytes 0 to 16) and v (bytes 8 to 24) overlap"),
    ({"w": [1, 2]}, 16, "tensor w is [1, 2], not an object"),
])
def test_safetensors_headers_are_checked_before_any_tensor_is_read(tmp_path, tensors, data, says):
    from cla2 import merge

    path = _safetensors(tmp_path / "adapter_model.safetensors", tensors, b"\0" * data)
    with pytest.raises(merge.MergeError) as err:
        merge.safetensors_index(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and says in msg, msg
    assert "re-download or re-save it" in msg


@pytest.mark.parametrize(("raw", "says"), [
    ((10**6).to_bytes(8, "little") + b"{}", "header of 1000000 bytes, the file has 10"),
    ((4).to_bytes(8, "little") + b"{no}", "the header is not JSON"),
    ((2).to_bytes(8, "little") + b"[]", "the header is not a JSON object"),
    ((2).to_bytes(8, "little") + b"\xff\xfe", "the header is not JSON"),
])
def test_a_safetensors_header_that_is_not_one_is_refused(tmp_path, raw, says):
    from cla2 import merge

    path = tmp_path / "model.safetensors"
    path.write_bytes(raw)
    with pytest.raises(merge.MergeError, match=r"re-download or re-save it") as err:
        merge.safetensors_index(path)
    assert says in str(err.value)


def test_a_valid_header_still_indexes(tmp_path):
    import torch
    from safetensors.torch import save_file

    from cla2 import merge

    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "empty": torch.empty(0, 4), "b": torch.ones(3, dtype=torch.int8)},
              str(path), metadata={"format": "pt"})
    refs = merge.safetensors_index(path)
    assert {n: r.shape for n, r in refs.items()} == {"a": (2, 3), "empty": (0, 4), "b": (3,)}
    assert torch.equal(merge.read_tensor(refs["a"]), torch.arange(6.0).reshape(2, 3))


def test_a_2gib_claim_in_a_43kb_file_allocates_nothing(tmp_path):
    """Under an address-space limit of what the process already holds plus 512 MiB: reading the adapter the way
    merge does is refused, where it used to allocate the claimed 2 GiB and then report truncation."""
    path = _safetensors(tmp_path / "adapter_model.safetensors",
                        {"w": {"dtype": "F16", "shape": [32768, 32768], "data_offsets": [0, 2 * GiB]}},
                        b"\0" * 43_000)
    script = f"""
import resource, sys
from cla2 import merge
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + 512 * 1024**2, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    for ref in merge.safetensors_index({str(path)!r}).values():
        merge.read_tensor(ref)
except merge.MergeError as exc:
    print("refused:", exc)
    sys.exit(3)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr[-2000:]
    assert "tensor w ends at byte 2147483737" in r.stdout


def test_a_truncated_adapter_is_refused_before_merge_reads_a_tensor(tmp_path, tiny_model_small_tok, monkeypatch):
    """End to end: an adapter whose last tensor runs past the end of its file (a download cut short) is refused
    by merge before it reads any tensor, base or adapter; nothing is written."""
    from test_merge import make_adapter

    from cla2 import merge

    adapter = make_adapter(tiny_model_small_tok, tmp_path / "lora")
    st = adapter / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:-1024])

    def no_read(*a, **k):
        raise AssertionError("a tensor was read before the adapter's header was checked")

    monkeypatch.setattr(merge, "read_tensor", no_read)
    monkeypatch.setattr(merge.BaseReader, "read", no_read)
    with pytest.raises(merge.MergeError, match=r"adapter_model.safetensors: tensor .* ends at byte \d+ .* but the "
                                               r"file has \d+ bytes.*re-download or re-save it"):
        merge.main(adapter, tmp_path / "out", model=tiny_model_small_tok)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ row 3: vocabulary
def _lora_only(base_dir: Path, out: Path) -> Path:
    """A LoRA-only adapter (no embed_tokens / lm_head saved) of ``base_dir``, saved as cla2 finetune saves one:
    with its base's tokenizer beside it and a run.json naming the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cla2.training import copy_tokenizer

    torch.manual_seed(0)
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    net.save_pretrained(out)
    copy_tokenizer(base_dir, out)
    (out / "run.json").write_text(json.dumps({"job": "finetune", "base_model": str(Path(base_dir).resolve())}))
    return out


def _vocab(model: Path) -> int:
    return json.loads((Path(model) / "config.json").read_text())["vocab_size"]


def test_merge_refuses_an_adapter_whose_tokenizer_is_another_vocabulary(tmp_path, tiny_model, tiny_model_small_tok):
    """The layer shapes fit, so the tensors alone do not tell; the adapter's tokenizer does. Refused naming
    both sizes and the base the adapter's run.json names, and nothing written."""
    from cla2 import merge

    small = _vocab(tiny_model_small_tok)
    adapter = _lora_only(tiny_model_small_tok, tmp_path / "lora")
    with pytest.raises(merge.MergeError) as err:
        merge.main(adapter, tmp_path / "out", model=tiny_model)
    msg = str(err.value)
    assert f"its tokenizer has {small} pieces" in msg and f"base model {tiny_model} has a vocabulary of 55296" in msg
    assert f"its run.json names {Path(tiny_model_small_tok).resolve()} as its base" in msg
    assert not (tmp_path / "out").exists()
    # with its own base it merges
    merge.main(adapter, tmp_path / "ok", model=tiny_model_small_tok)
    assert _vocab(tmp_path / "ok") == small


def test_merge_refuses_saved_embeddings_of_another_vocabulary(tmp_path, tiny_model, tiny_model_small_tok):
    from test_merge import make_adapter

    from cla2 import merge

    adapter = make_adapter(tiny_model_small_tok, tmp_path / "full")  # saves embed_tokens and lm_head
    with pytest.raises(merge.MergeError) as err:
        merge.main(adapter, tmp_path / "out", model=tiny_model)
    msg = str(err.value)
    small = _vocab(tiny_model_small_tok)
    assert f"its saved embed_tokens has {small} rows" in msg and "has a vocabulary of 55296" in msg
    assert str(Path(tiny_model_small_tok).resolve()) in msg


def test_serve_refuses_an_adapter_of_another_vocabulary_before_loading_weights(tmp_path, tiny_model,
                                                                                  tiny_model_small_tok, monkeypatch):
    """load_model (serve, chat, generate, eval --adapter) used to shrink the base's 55296 embedding rows to the
    adapter tokenizer's size and go on."""
    from cla2 import io, loading
    from cla2.merge import MergeError

    adapter = _lora_only(tiny_model_small_tok, tmp_path / "lora")
    real = io.load_pretrained

    def no_load(*a, **k):
        raise AssertionError("the base's weights were loaded before the adapter's vocabulary was checked")

    monkeypatch.setattr(io, "load_pretrained", no_load)
    with pytest.raises(MergeError, match=rf"its tokenizer has {_vocab(tiny_model_small_tok)} pieces.* has a "
                                         r"vocabulary of 55296.*its run.json names"):
        loading.load_model(tiny_model, adapter, device="cpu")
    monkeypatch.setattr(io, "load_pretrained", real)
    net, tok, _ = loading.load_model(tiny_model_small_tok, adapter, device="cpu")  # its own base: loads
    assert net.get_input_embeddings().weight.shape[0] == len(tok) == _vocab(tiny_model_small_tok)
