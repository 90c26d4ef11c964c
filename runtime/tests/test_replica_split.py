"""A replica whose layers are spread over several devices gives, token for token, what one device gives.

Here every device of the replica is the CPU: the model is dispatched with accelerate's hooks exactly as
on a real split (the hooks carry the hidden states and the KV cache stays with each layer), so the
engine's and the eval's split code paths run; bench/gpu_split.py runs the same over a GPU and the CPU.
"""

from __future__ import annotations

import threading

import pytest
import torch

from cla2 import eval as ev
from cla2.engine import Engine, SamplingParams
from cla2.loading import load_model

GROUPS = [[0], [1]]  # the tiny model's two layers, one per device


@pytest.fixture(scope="module")
def split_and_single(tiny_model):
    split = Engine.from_pretrained(tiny_model, device="cpu", devices=[0, 1], layer_groups=GROUPS, max_batch_size=4)
    single = Engine.from_pretrained(tiny_model, device="cpu", max_batch_size=4)
    yield split, single
    split.close()
    single.close()


def test_the_split_model_is_dispatched_as_the_plan_says(split_and_single):
    split, single = split_and_single
    net = split.model
    assert getattr(net, "_hf_hook", None) is not None  # accelerate's hooks run the replica
    device_map = net.hf_device_map
    assert {k for k in device_map if k.startswith("model.layers.")} == {"model.layers.0", "model.layers.1"}
    assert set(device_map) >= {"model.embed_tokens", "model.norm", "lm_head"}
    assert getattr(single.model, "_hf_hook", None) is None


PROMPTS = ["你好", "龘龘龘 hello world", "[INST] 写一首诗 [/INST]", "a b c d e f g", "测试一下", "很长" * 40]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_new_tokens=30),
                                    SamplingParams(max_new_tokens=30, seed=7)], ids=["greedy", "seeded"])
def test_batched_outputs_equal_one_device(split_and_single, params):
    split, single = split_and_single
    split.max_running = 0
    got = split.generate(PROMPTS, params)
    assert split.max_running == 4  # requests joined and left the batch on the split replica
    want = single.generate(PROMPTS, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.text for r in got] == [r.text for r in want]


def test_streaming_equals_one_device(split_and_single):
    split, single = split_and_single
    params = SamplingParams(temperature=0, max_new_tokens=25)
    pieces = list(split.stream("从前有座山", params))
    want = single.generate(["从前有座山"], params)[0]
    assert "".join(p for p in pieces[:-1]) == want.text == pieces[-1].text


def test_concurrent_requests_join_the_split_batch(split_and_single):
    split, single = split_and_single
    params = SamplingParams(temperature=0, max_new_tokens=40)
    results = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, split.generate([p], params)[0]))
               for p in PROMPTS[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for p in PROMPTS[:4]:
        assert results[p].token_ids == single.generate([p], params)[0].token_ids


def test_static_decode_path_on_a_split_replica(tiny_model):
    """The static-cache step (the CUDA-graph path's cache, eager here) keeps each layer's cache on its device."""
    split = Engine.from_pretrained(tiny_model, device="cpu", devices=[0, 1], layer_groups=GROUPS, decode_graphs=True)
    single = Engine.from_pretrained(tiny_model, device="cpu", decode_graphs=False)
    try:
        params = SamplingParams(temperature=0, max_new_tokens=30)
        got = split.generate(["你好"], params)[0]
        assert split.static_steps > 0 and split.decode_graphs  # it ran on the static path, without falling back
        assert got.token_ids == single.generate(["你好"], params)[0].token_ids
    finally:
        split.close()
        single.close()


def test_eval_scores_equal_one_device(tiny_model, ceval_dir):
    bench = ev.BENCHMARKS["ceval"]
    rows = ev.read_csv(bench.path(ceval_dir, "computer_network", "val"), bench, True)[:9]
    dev = ev.read_csv(bench.path(ceval_dir, "computer_network", "dev"), bench, True)
    prefix = ev.few_shot_prefix("计算机网络", dev, 3)
    prompts = [ev.question_prompt(q, True) for q in rows]
    out = []
    for devices in ([0, 1], None):
        net, tok, device = load_model(tiny_model, device="cpu", devices=devices, layer_groups=GROUPS)
        out.append(ev.Scorer(net, tok, device, batch_size=4).predict(prefix, prompts))
    (split, single) = out
    assert [letter for letter, _ in split] == [letter for letter, _ in single]
    for (_, a), (_, b) in zip(split, single, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_an_adapter_merges_into_a_split_replica(tiny_model, tmp_path):
    """--adapter on a split replica: the LoRA (and the full embed_tokens / lm_head copies) merge into layers
    that sit on different devices, with the result of merging on one device."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    params = SamplingParams(temperature=0, max_new_tokens=20)
    outs = []
    for devices in ([0, 1], None):
        engine = Engine.from_pretrained(tiny_model, adapter=tmp_path / "adapter", device="cpu", devices=devices,
                                        layer_groups=GROUPS)
        try:
            outs.append([r.token_ids for r in engine.generate(PROMPTS[:3], params)])
        finally:
            engine.close()
    plain = Engine.from_pretrained(tiny_model, device="cpu")
    try:
        assert outs[0] == outs[1] != [r.token_ids for r in plain.generate(PROMPTS[:3], params)]
    finally:
        plain.close()
