"""The batching engine: sampling, streaming without broken characters, stop strings, batching, limits."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch

from cla2.engine import (
    ContextTooLong,
    Engine,
    IncrementalDetokenizer,
    InvalidRequest,
    Result,
    SamplingParams,
    static_layers,
)


@pytest.fixture(scope="module")
def engine(tiny_model):
    e = Engine.from_pretrained(tiny_model, max_batch_size=4)
    yield e
    e.close()


def collect(engine, prompt, params):
    pieces = list(engine.stream(prompt, params))
    assert isinstance(pieces[-1], Result)
    return pieces[:-1], pieces[-1]


def test_seed_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.max_new_tokens) == (0.2, 40, 0.9, 1.1, 512)


def test_rare_character_is_byte_pieces_and_never_split(engine):
    tok = engine.tokenizer
    ids = tok("龘", add_special_tokens=False).input_ids
    assert len([i for i in ids if tok.convert_ids_to_tokens(i).startswith("<0x")]) == 3
    d = IncrementalDetokenizer(tok)
    deltas = [d.add(i) for i in tok("你好龘a龘", add_special_tokens=False).input_ids]
    assert "".join(deltas) + d.flush() == "你好龘a龘"
    assert all("\ufffd" not in x for x in deltas)
    # an incomplete character at the end is dropped, not sent as U+FFFD
    d = IncrementalDetokenizer(tok)
    for i in ids[:2]:
        assert d.add(i) == ""
    assert d.flush() == ""


def test_stream_never_emits_broken_utf8_and_matches_final_text(engine):
    # sampling at temperature 1 over the whole vocabulary of a random model hits byte pieces often
    for seed in range(4):
        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=60, seed=seed)
        pieces, result = collect(engine, "龘龘", params)
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == result.text
        assert result.completion_tokens == len(result.token_ids)
        full = engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        assert result.text == full.rstrip("\ufffd")


def test_same_seed_same_output_and_greedy(engine):
    p = SamplingParams(max_new_tokens=30, seed=11, temperature=0.9)
    a = engine.generate(["你好"], p)[0]
    b = engine.generate(["你好"], p)[0]
    assert a.token_ids == b.token_ids
    g1 = engine.generate(["你好"], SamplingParams(temperature=0, max_new_tokens=30, seed=1))[0]
    g2 = engine.generate(["你好"], SamplingParams(temperature=0, max_new_tokens=30, seed=2))[0]
    assert g1.token_ids == g2.token_ids
    # greedy is the argmax of the (penalized) logits: compare to transformers' generate
    import torch

    ids = engine.tokenizer("你好", return_tensors="pt").input_ids
    out = engine.model.generate(ids, do_sample=False, max_new_tokens=30, repetition_penalty=1.1)
    want = out[0, ids.shape[1]:].tolist()
    assert g1.token_ids == [t for t in want if t not in engine.eos_ids][:len(g1.token_ids)]
    assert torch.is_tensor(out)


def test_batched_equals_one_by_one(engine):
    prompts = ["你好", "龘龘龘 hello world", "[INST] 写一首诗 [/INST]", "a b c d e f g", "测试一下", "很长" * 40]
    for params in (SamplingParams(temperature=0, max_new_tokens=40),
                   SamplingParams(max_new_tokens=40, seed=5)):
        engine.max_running = 0
        batched = engine.generate(prompts, params)
        assert engine.max_running == 4  # the engine's batch limit was reached
        single = [engine.generate([p], params)[0] for p in prompts]
        assert [r.token_ids for r in batched] == [r.token_ids for r in single]
        assert [r.text for r in batched] == [r.text for r in single]


def test_requests_join_a_running_batch(engine):
    """Continuous batching: a request submitted while another decodes joins it and finishes first."""
    params = SamplingParams(temperature=0, max_new_tokens=200)
    done = {}

    def run(name, prompt, p):
        done[name] = engine.generate([prompt], p)[0]
        done[name + "_at"] = time.perf_counter()

    long = threading.Thread(target=run, args=("long", "从前", params))
    long.start()
    deadline = time.time() + 60
    while engine.num_running == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 1
    run("short", "你好", SamplingParams(temperature=0, max_new_tokens=5))
    long.join()
    assert done["short_at"] < done["long_at"]
    assert done["long"].completion_tokens == 200 and done["short"].completion_tokens == 5


def test_stop_strings(engine):
    base = engine.generate(["你好"], SamplingParams(temperature=0, max_new_tokens=40))[0]
    text = base.text
    assert len(text) > 6
    stop = text[3:5]
    pieces, r = collect(engine, "你好", SamplingParams(temperature=0, max_new_tokens=40, stop=[stop]))
    assert r.finish_reason == "stop" and r.text == text[: text.index(stop)]
    assert "".join(pieces) == r.text


def test_eos_stops(engine):
    # temperature 0 with the eos logit pushed up: make eos the only choice via a stop at the first token
    r = engine.generate(["你好"], SamplingParams(temperature=0, max_new_tokens=3))[0]
    assert r.finish_reason == "length" and r.completion_tokens == 3
    from cla2.engine import Request

    req = Request([1, 2], SamplingParams(), lambda e: None, engine.tokenizer, engine.eos_ids, 10)
    req.push(next(iter(engine.eos_ids)))
    assert req.finish_reason == "stop" and req.output_ids == []


def test_context_window(engine, tiny_model):
    long = "字" * (engine.window + 10)
    with pytest.raises(ContextTooLong, match="context window is 1024 tokens"):
        engine.submit(long, SamplingParams(max_new_tokens=4))
    truncating = Engine.from_pretrained(tiny_model, truncate=True)
    try:
        r = truncating.generate([long], SamplingParams(max_new_tokens=4, temperature=0))[0]
        assert r.completion_tokens == 4 and r.prompt_tokens < truncating.window
    finally:
        truncating.close()
    # the output never runs past the window
    near = engine.tokenizer("字" * 10).input_ids * 1
    near = near + [near[-1]] * (engine.window - 3 - len(near))
    r = engine.generate([near], SamplingParams(max_new_tokens=50, temperature=0))[0]
    assert r.finish_reason == "length" and r.prompt_tokens + r.completion_tokens == engine.window


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", 1e9), ("top_p", 0.0),
                                         ("top_k", -1), ("repetition_penalty", 0.0), ("max_new_tokens", 0),
                                         ("max_new_tokens", 10**7), ("stop", [""])])
def test_bad_params(engine, field, value):
    with pytest.raises(InvalidRequest) as err:
        engine.submit("hi", SamplingParams(**{field: value}))
    assert err.value.param == field


@pytest.mark.parametrize("seed", [2**70, 2**64, -(2**63) - 1, True, 1.5])
def test_out_of_range_seed_is_an_invalid_request(engine, seed):
    """torch's manual_seed takes 64 bits and fails with a bare RuntimeError beyond (a 500 in the server)."""
    with pytest.raises(InvalidRequest) as err:
        engine.submit("hi", SamplingParams(seed=seed))
    assert err.value.param == "seed"
    for ok in (2**64 - 1, -(2**63), 0):
        assert engine.generate(["hi"], SamplingParams(seed=ok, max_new_tokens=2))[0].finish_reason != "error"


def wait_until(cond, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.01)
    return cond()


def test_waiting_queue_is_bounded_and_holds_nothing_on_the_device(engine):
    """A bounded queue refuses the next request (QueueFull, the server's 429); a waiting request holds no
    vocabulary-sized tensor: it gets one when it is admitted to the batch."""
    from cla2.engine import QueueFull

    e = Engine(engine.model, engine.tokenizer, engine.device, max_batch_size=1, max_waiting=2)
    try:
        running = e.stream("从前", SamplingParams(max_new_tokens=1000, temperature=0))
        next(running)
        assert wait_until(lambda: e.num_running == 1)
        waiting = [e.stream("你好", SamplingParams(max_new_tokens=5, repetition_penalty=1.1)) for _ in range(2)]
        assert e.num_waiting == 2
        assert all(r.seen is None for r in e._waiting), "a queued request holds a tensor on the device"
        assert e._active[0].seen is not None  # the admitted one has its mask
        with pytest.raises(QueueFull, match="2 requests are already waiting"):
            e.submit("再来", SamplingParams(max_new_tokens=5))
        running.close()  # the slot frees, the queue drains, and there is room again
        for w in waiting:
            *_, result = w
            assert result.finish_reason in ("stop", "length")
        assert e.generate(["再来"], SamplingParams(max_new_tokens=3))[0].completion_tokens > 0
        assert e.finished["cancelled"] == 1
    finally:
        e.close()


def test_idle_engine_uses_no_cpu(engine):
    """The engine's loop waits on a condition: an idle engine costs (about) no CPU. Measured as CPU
    time of the engine thread over 2 s, a resource bound, not a speed."""
    import os

    engine.generate(["hi"], SamplingParams(max_new_tokens=2))
    tid = engine._thread.native_id
    stat = f"/proc/self/task/{tid}/stat"

    def ticks() -> int:
        fields = open(stat).read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = ticks()
    time.sleep(2)
    used = (ticks() - before) / os.sysconf("SC_CLK_TCK")
    assert used < 0.05, f"the idle engine thread used {used:.2f} s of CPU in 2 s"


def test_cancel_frees_the_slot(engine):
    it = engine.stream("从前", SamplingParams(max_new_tokens=1000, temperature=0))
    next(it)
    deadline = time.time() + 60
    while engine.num_running == 0 and time.time() < deadline:  # the first token comes before it joins
        time.sleep(0.01)
    assert engine.num_running == 1
    it.close()
    deadline = time.time() + 60
    while engine.num_running and time.time() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0


def test_a_request_that_fails_to_join_the_batch_gets_an_error_not_a_hang(tiny_model):
    """A failure while a prefilled request joins the running batch (the request is then neither waiting
    nor running) must end it with an error, and the engine must go on serving."""
    from cla2.engine import load_model

    net, tok, dev = load_model(tiny_model)
    e = Engine(net, tok, dev, max_batch_size=4, decode_graphs=False)
    real = e._join

    def join(req, cache):
        if e._active:
            raise RuntimeError("join failed")
        return real(req, cache)

    e._join = join
    params = SamplingParams(temperature=0, max_new_tokens=50)
    first = e.stream("从前", SamplingParams(temperature=0, max_new_tokens=1000))
    done: list = []
    worker = threading.Thread(target=lambda: done.extend(e.generate(["你好"], params)), daemon=True)
    try:
        deadline = time.time() + 60
        while e.num_running == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert e.num_running == 1
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), "a request was lost: its consumer still waits"
        assert done[0].finish_reason == "error" and "join failed" in done[0].error
        *_, result = first  # the batch it would have joined was failed with it
        assert result.finish_reason == "error" and "join failed" in result.error
        e._join = real
        assert e.generate(["你好"], params)[0].finish_reason in ("stop", "length")
    finally:
        e.close()


# ---- the static decode path (StaticCache + CUDA graph on CUDA; here the same step without the graph) ----


@pytest.fixture(scope="module")
def engine_pair(tiny_model):
    """One model, two engines: the eager batched path only, and the static path forced on."""
    from cla2.engine import load_model

    net, tok, dev = load_model(tiny_model)
    eager = Engine(net, tok, dev, max_batch_size=4, decode_graphs=False)
    static = Engine(net, tok, dev, max_batch_size=4, decode_graphs=True)
    yield eager, static
    eager.close()
    static.close()


STATIC_PROMPTS = ["你好", "龘龘龘 hello world", "[INST] 写一首诗 [/INST]", "很长" * 40]


def test_static_path_is_off_on_cpu_by_default(engine):
    assert engine.decode_graphs is False


def test_static_decode_matches_eager(engine_pair):
    eager, static = engine_pair
    before = static.static_steps
    for params in (SamplingParams(temperature=0, max_new_tokens=40),
                   SamplingParams(max_new_tokens=40, seed=5)):
        want = [eager.generate([p], params)[0] for p in STATIC_PROMPTS]
        got = [static.generate([p], params)[0] for p in STATIC_PROMPTS]
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert [r.text for r in got] == [r.text for r in want]
        assert all(r.finish_reason == "length" and r.completion_tokens == 40 for r in got)
    # every token after each first one came from the static path, which never fell back
    assert static.static_steps - before == 2 * len(STATIC_PROMPTS) * 39
    assert static.decode_graphs is True and eager.static_steps == 0
    # a prompt that fills the window: the static cache is capped at the window, the output stops at it
    near = eager.tokenizer("字" * 10).input_ids
    near = near + [near[-1]] * (eager.window - 3 - len(near))
    params = SamplingParams(max_new_tokens=50, temperature=0)
    a, b = eager.generate([near], params)[0], static.generate([near], params)[0]
    assert b.token_ids == a.token_ids and b.finish_reason == "length"
    assert b.prompt_tokens + b.completion_tokens == static.window


def test_static_decode_stops_at_eos(engine_pair):
    eager, static = engine_pair
    params = SamplingParams(temperature=0, max_new_tokens=30)
    base = eager.generate(["从前"], params)[0].token_ids
    cut = next(i for i in range(3, len(base)) if base[i] not in base[:i])  # its first occurrence
    saved = eager.eos_ids, static.eos_ids
    eager.eos_ids = static.eos_ids = {base[cut]}
    try:
        a, b = eager.generate(["从前"], params)[0], static.generate(["从前"], params)[0]
    finally:
        eager.eos_ids, static.eos_ids = saved
    assert a.finish_reason == b.finish_reason == "stop"
    assert b.token_ids == a.token_ids == base[:cut]


def test_static_decode_hands_over_to_the_batch_and_back(engine_pair):
    """A request decoding alone on the static path; a second, with a longer prompt than the first has
    decoded, joins (through the dynamic cache, the first left-padded to it, into a bucket of two), leaves,
    and the first goes on alone in a bucket of one again."""
    eager, static = engine_pair
    long_p, short_p = SamplingParams(temperature=0, max_new_tokens=150), SamplingParams(temperature=0,
                                                                                         max_new_tokens=10)
    want_long = eager.generate(["从前"], long_p)[0]
    want_short = eager.generate(["很长" * 20], short_p)[0]
    static.max_running, entries = 0, static.static_entries
    done = threading.Event()
    results = {}

    def sink(ev):
        if ev.result is not None:
            results["long"] = ev.result
            done.set()

    req = static.submit("从前", long_p, sink)
    deadline = time.time() + 60
    while len(req.output_ids) < 5 and time.time() < deadline:
        time.sleep(0.002)
    assert static._static is not None  # decoding alone, on the static path
    short = static.generate(["很长" * 20], short_p)[0]
    assert done.wait(30)
    assert static.max_running == 2
    # entered alone, again as a batch of two, and again alone once the short one left
    assert static.static_entries - entries >= 3
    assert short.token_ids == want_short.token_ids
    assert results["long"].token_ids == want_long.token_ids and results["long"].completion_tokens == 150


def test_static_decode_falls_back_to_eager(engine_pair, monkeypatch):
    eager, static = engine_pair
    from cla2 import engine as engine_mod

    params = SamplingParams(temperature=0, max_new_tokens=30)
    want = eager.generate(["你好"], params)[0].token_ids
    # no usable StaticCache (an old transformers): the first step already goes eager
    e = Engine(static.model, static.tokenizer, static.device, decode_graphs=True)
    try:
        monkeypatch.setattr(engine_mod, "new_static_cache", lambda *a, **k: 1 / 0)
        with pytest.warns(RuntimeWarning, match="static-cache decode step failed"):
            assert e.generate(["你好"], params)[0].token_ids == want
        assert e.decode_graphs is False and e.static_steps == 0
    finally:
        e.close()
    monkeypatch.undo()
    # a step that fails mid-decode (a compile error): the static cache goes back to the batch, no token lost
    e = Engine(static.model, static.tokenizer, static.device, decode_graphs=True)
    real, calls = e._static_logits, []

    def flaky():
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("compile failed")
        return real()

    e._static_logits = flaky
    try:
        with pytest.warns(RuntimeWarning, match="compile failed"):
            assert e.generate(["你好"], params)[0].token_ids == want
        assert e.decode_graphs is False and e.static_steps == 4
    finally:
        e.close()


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 2),
                    reason="torch 2.1's dynamo cannot trace transformers' forward (a dict copy): there the engine "
                    "falls back to eager decoding, which test_static_decode_falls_back_to_eager covers")
def test_static_step_traces_as_one_graph(engine_pair):
    """The step that CUDA runs through torch.compile traces with no graph break on this transformers
    (dynamo's eager backend: the tracing without inductor's code generation, which is slow on a CPU), for
    a lone request and for a padded batch in a bucket with a dummy row."""
    eager, static = engine_pair
    e = Engine(static.model, static.tokenizer, static.device, decode_graphs=True)
    e._compile_options = {"backend": "eager", "fullgraph": True, "dynamic": False}
    params = SamplingParams(temperature=0, max_new_tokens=20)
    try:
        for p in STATIC_PROMPTS[:2]:
            assert e.generate([p], params)[0].token_ids == eager.generate([p], params)[0].token_ids
        assert e.decode_graphs is True and e.static_steps == 2 * 19
        batch = e.generate(STATIC_PROMPTS[:3], params)
        assert [r.token_ids for r in batch] == [eager.generate([p], params)[0].token_ids for p in STATIC_PROMPTS[:3]]
        assert e.decode_graphs is True and e.static_steps == 3 * 19
    finally:
        e.close()


# ---- the static path for a batch (issue 15): buckets by batch size, rows joining and leaving ----------

BATCH_PROMPTS = ["你好", "很长" * 30, "a b c d", "测试一下吧", "从前", "很长" * 50]
BATCH_PARAMS = [SamplingParams(temperature=0, max_new_tokens=7),
                SamplingParams(temperature=0, max_new_tokens=30),
                SamplingParams(max_new_tokens=12, seed=4, top_k=0, top_p=0.8),
                SamplingParams(temperature=0, max_new_tokens=25, repetition_penalty=1.3),
                SamplingParams(temperature=0, max_new_tokens=20, repetition_penalty=1.0),
                SamplingParams(temperature=0, max_new_tokens=15)]


def test_static_buckets():
    from cla2.engine import static_batch

    assert [static_batch(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert static_batch(5, 6) == 6 and static_batch(3, 3) == 3 and static_batch(1, 1) == 1


def test_batched_static_decode_matches_dynamic_and_one_at_a_time(engine_pair):
    """Six requests of different prompt lengths through a batch of four, on the static path: four start
    together (a bucket of four), the fifth joins mid-way into the row the first left (nothing else copied),
    the sixth, longer than the batch's rows, joins through the dynamic cache into a new bucket, and the
    batch shrinks into buckets of two and one as they finish. Each generates what it generates through the
    dynamic path, in the same batch and alone, and every decode step ran on the static path."""
    eager, static = engine_pair
    alone = [eager.generate([p], sp)[0] for p, sp in zip(BATCH_PROMPTS, BATCH_PARAMS, strict=True)]
    dynamic = eager.generate(BATCH_PROMPTS, BATCH_PARAMS)
    steps, static_steps, joins, entries = static.steps, static.static_steps, static.static_joins, static.static_entries
    static.max_running = 0
    got = static.generate(BATCH_PROMPTS, BATCH_PARAMS)
    assert [r.token_ids for r in got] == [r.token_ids for r in dynamic] == [r.token_ids for r in alone]
    assert [r.text for r in got] == [r.text for r in alone]
    assert [r.completion_tokens for r in got] == [sp.max_new_tokens for sp in BATCH_PARAMS]
    assert static.max_running == 4 and static.decode_graphs is True
    assert static.static_steps - static_steps == static.steps - steps  # no step on the dynamic path
    assert static.static_joins - joins >= 1  # the fifth, into a free row
    assert static.static_entries - entries >= 3  # buckets of four, then two and one as the batch shrinks


def test_batched_static_decode_streams_and_cancels(engine_pair):
    """A request that joins a running static batch while streaming, and one whose consumer goes away
    mid-way: the rest still generate what they generate alone."""
    eager, static = engine_pair
    params = SamplingParams(temperature=0, max_new_tokens=40)
    want = [eager.generate([p], params)[0] for p in BATCH_PROMPTS[:3]]
    results: dict = {}
    first = static.submit(BATCH_PROMPTS[0], params, lambda ev: ev.result and results.__setitem__(0, ev.result))
    assert wait_until(lambda: len(first.output_ids) >= 3)
    doomed = static.stream(BATCH_PROMPTS[1], params)
    pieces = [next(doomed) for _ in range(3)]
    assert all(isinstance(p, str) for p in pieces)
    streamed = list(static.stream(BATCH_PROMPTS[2], params))
    doomed.close()  # cancels it
    assert wait_until(lambda: 0 in results, timeout=30)
    assert streamed[-1].token_ids == want[2].token_ids and "".join(streamed[:-1]) == want[2].text
    assert results[0].token_ids == want[0].token_ids
    assert static.decode_graphs is True and wait_until(lambda: static.num_running == 0)


def test_batched_static_reuses_its_bucket_caches(engine_pair):
    """The same batch again: every (bucket, length) it needs already has its static cache, which is reused
    (same tensors, so a CUDA graph replays over the same addresses), not allocated again."""
    eager, static = engine_pair
    static.generate(BATCH_PROMPTS, BATCH_PARAMS)
    allocations = static.static_allocations
    caches = dict(static._static_caches)
    pointers = {key: [k.data_ptr() for k, _ in static_layers(c)] for key, c in caches.items()}
    assert {b for b, _ in caches} >= {1, 2, 4}
    static.generate(BATCH_PROMPTS, BATCH_PARAMS)
    assert static.static_allocations == allocations
    assert all(static._static_caches[key] is c for key, c in caches.items())
    assert pointers == {key: [k.data_ptr() for k, _ in static_layers(c)] for key, c in caches.items()}


def test_static_caches_kept_are_bounded_by_one_full_batch(engine_pair):
    """The static caches kept, over all (bucket, length) pairs, hold at most max_batch_size x window
    positions (the KV cache of one full batch): a new one pushes out the least recently used."""
    eager, static = engine_pair
    e = Engine(static.model, static.tokenizer, static.device, max_batch_size=2, decode_graphs=True)
    try:
        devices = [e.device] * e.model.config.num_hidden_layers
        small = e._bucket_cache(1, 256, devices)
        assert e._bucket_cache(2, 256, devices) is not small and e.static_allocations == 2
        assert e._bucket_cache(1, 256, devices) is small and e.static_allocations == 2  # reused
        e._bucket_cache(2, e.window, devices)  # the whole budget: the others go
        assert list(e._static_caches) == [(2, e.window)]
        e._bucket_cache(2, 512, devices)
        assert list(e._static_caches) == [(2, 512)] and e.static_allocations == 4
        e._bucket_cache(1, 512, devices)
        assert list(e._static_caches) == [(2, 512), (1, 512)]
        assert sum(b * n for b, n in e._static_caches) <= e.max_batch_size * e.window
    finally:
        e.close()


def test_batched_static_declines_a_batch_beyond_the_window(engine_pair):
    """Rows are right-aligned at one write column: a prompt near the window and a short one that may still
    generate many tokens would need more columns than the window. That batch decodes on the dynamic path
    (no warning, nothing lost); once the long one leaves, the other goes back to the static path."""
    eager, static = engine_pair
    long_p = eager.tokenizer("字" * 10).input_ids
    long_p = long_p + [long_p[-1]] * (eager.window - 40 - len(long_p))
    prompts, params = [long_p, "你好"], [SamplingParams(temperature=0, max_new_tokens=10),
                                          SamplingParams(temperature=0, max_new_tokens=80)]
    want = [eager.generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    steps, static_steps = static.steps, static.static_steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = static.generate(prompts, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert static.decode_graphs is True
    ran = static.steps - steps
    assert ran == 79 and static.static_steps - static_steps == ran - 9  # 9 steps of the two on the dynamic path


def test_batched_static_decode_falls_back_mid_batch(engine_pair):
    """A static step that fails with a padded batch in a bucket with dummy rows: the batch goes back to the
    dynamic path with one warning, and no token is lost."""
    eager, static = engine_pair
    prompts, params = BATCH_PROMPTS[:4], [SamplingParams(temperature=0, max_new_tokens=n) for n in (20, 9, 30, 25)]
    want = eager.generate(prompts, params)
    e = Engine(static.model, static.tokenizer, static.device, max_batch_size=4, decode_graphs=True)
    real, calls = e._static_logits, []

    def flaky():
        calls.append(1)
        if len(calls) == 12:  # the second row has left: three rows in a bucket of four, one a dummy
            assert e._static_mask is not None and e._slots == [0, 2, 3] and len(e._slot_pads) == 4
            raise RuntimeError("capture failed")
        return real()

    e._static_logits = flaky
    try:
        with pytest.warns(RuntimeWarning, match="capture failed"):
            got = e.generate(prompts, params)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert e.decode_graphs is False and e.static_steps == 11
    finally:
        e.close()


def test_cudagraph_trees_usable_from_the_engine_thread(monkeypatch):
    """torch before 2.13 finds the CUDA graph trees' state only on the importing thread (pytorch#123177);
    with that lookup standing in, the engine thread's set-up makes it found there too."""
    import torch
    from torch._inductor import cudagraph_trees as trees

    from cla2.engine import _cudagraph_thread_state

    def old_get_obj(local, attr_name):  # torch 2.1-2.12
        if hasattr(local, attr_name):
            return getattr(local, attr_name)
        assert torch._C._is_key_in_tls(attr_name)
        return torch._C._get_obj_in_tls(attr_name)

    monkeypatch.setattr(trees, "get_obj", old_get_obj)
    monkeypatch.delattr(trees, "_initialize_tls", raising=False)
    got: list = []

    def run(setup: bool) -> None:
        if setup:
            _cudagraph_thread_state()
        try:
            got.append(type(trees.get_obj(trees.local, "tree_manager_containers")))
        except AssertionError:
            got.append(AssertionError)

    for setup in (False, True):
        t = threading.Thread(target=run, args=(setup,))
        t.start()
        t.join()
    assert got == [AssertionError, dict]


def test_a_burst_on_an_idle_engine_is_not_refused(engine):
    """The bound counts requests beyond the batch's free slots: an idle engine with room for 4 and no
    waiting allowed still takes 4 at once, and refuses the fifth."""
    from cla2.engine import QueueFull

    e = Engine(engine.model, engine.tokenizer, engine.device, max_batch_size=4, max_waiting=0)
    try:
        with e._cv:  # hold the loop, so all four are still waiting when the fifth comes
            reqs = [e.submit("你好", SamplingParams(max_new_tokens=3)) for _ in range(4)]
            with pytest.raises(QueueFull):
                e.submit("你好", SamplingParams(max_new_tokens=3))
        assert wait_until(lambda: e.finished.total() == 4)
        assert all(r.finish_reason in ("stop", "length") for r in reqs)
    finally:
        e.close()


# ---- the batch's sampler and the batch's bookkeeping (issue 15) ---------------------------------------


def _sample_one(params: SamplingParams, seen: set[int], logits: torch.Tensor, generator: torch.Generator) -> int:
    """One request's token the plain way, one pass over the vocabulary per operation (what the engine
    did per request before its sampler was vectorised over the batch)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
        mask[list(seen)] = True
        penalized = torch.where(logits < 0, logits * params.repetition_penalty, logits / params.repetition_penalty)
        logits = torch.where(mask, penalized, logits)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        values, indices = torch.topk(logits, params.top_k)
    else:
        values, indices = torch.sort(logits, descending=True)
    probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(before >= params.top_p, 0.0)
    return int(indices[int(torch.multinomial(probs, 1, generator=generator))])


def test_the_batch_sampler_draws_what_each_request_would_alone(engine):
    """Rows with different parameters, sampled together for 30 steps (rows leaving and joining on the
    way), draw exactly the tokens each request draws alone from the same logits and its own generator."""
    from cla2.engine import Request, Sampler

    vocab = 3000
    params = [SamplingParams(temperature=0, seed=1),
              SamplingParams(temperature=0, repetition_penalty=1.0, seed=2),
              SamplingParams(temperature=0.8, top_k=0, top_p=0.7, seed=3),
              SamplingParams(temperature=1.3, top_k=5, top_p=1.0, repetition_penalty=1.5, seed=4),
              SamplingParams(temperature=0.5, top_k=40, top_p=0.9, repetition_penalty=0.8, seed=5),
              SamplingParams(temperature=1.0, top_k=vocab + 10, top_p=1.0, repetition_penalty=1.0, seed=6)]
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 14, 15], [1, 2], [3, 4, 5, 6]]

    def request(i: int) -> Request:
        r = Request(prompts[i], params[i], lambda e: None, engine.tokenizer, set(), 100)
        r.start(vocab, torch.device("cpu"))
        return r

    torch.manual_seed(0)
    logits = torch.randn(30, len(params), vocab) * 4
    ref_gens = [torch.Generator().manual_seed(p.seed) for p in params]
    seen = [set(p) for p in prompts]
    rows = [request(i) for i in range(4)]
    which = list(range(4))  # the request (index into params) each row holds
    sampler = Sampler(rows, vocab)
    for step in range(30):
        batch = logits[step, which]
        got = sampler.sample(batch.clone(), inplace=step % 2 == 0)
        want = [_sample_one(params[i], seen[i], logits[step, i], ref_gens[i]) for i in which]
        assert got == want, f"step {step}"
        for i, t in zip(which, got, strict=True):
            seen[i].add(t)
        sampler.add(got)
        if step == 9:  # rows 0 and 2 leave (from the front and the middle), a newcomer joins
            sampler.keep([1, 3])
            which = [which[1], which[3]]
            sampler.join(request(4))
            which.append(4)
        if step == 19:
            sampler.keep([2, 0])
            which = [which[2], which[0]]
            sampler.join(request(5))
            which.append(5)


def test_rows_leaving_from_the_middle_and_a_growing_mask_keep_outputs_equal(engine, monkeypatch):
    """Requests of different lengths and parameters: rows leave from the front and the middle of a padded
    batch, and the attention mask's buffer outgrows its headroom; each still generates what it generates
    alone."""
    from cla2 import engine as engine_mod

    monkeypatch.setattr(engine_mod, "MASK_HEADROOM", 3)
    prompts = ["你好", "很长" * 30, "a b c d", "测试一下吧", "从前"]
    params = [SamplingParams(temperature=0, max_new_tokens=7),
              SamplingParams(max_new_tokens=30, seed=3, top_k=0, top_p=0.8),
              SamplingParams(temperature=0, max_new_tokens=12, repetition_penalty=1.0),
              SamplingParams(temperature=0.7, max_new_tokens=25, seed=9, repetition_penalty=1.3, top_p=1.0),
              SamplingParams(temperature=0, max_new_tokens=20, repetition_penalty=1.2)]
    engine.max_running = 0
    batched = engine.generate(prompts, params)
    assert engine.max_running == 4
    single = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.completion_tokens for r in batched] == [7, 30, 12, 25, 20]


def test_waiting_requests_are_prefilled_together_and_generate_what_they_generate_alone(engine):
    """Requests that wait together are prefilled in one (left-padded) forward; each generates what it
    generates alone. A prompt that fails in that forward fails alone: the others are prefilled one by one."""
    prompts = ["你好", "很长" * 25, "a b c d", "测试"]
    params = [SamplingParams(temperature=0, max_new_tokens=15), SamplingParams(max_new_tokens=15, seed=7),
              SamplingParams(temperature=0, max_new_tokens=15, repetition_penalty=1.0),
              SamplingParams(temperature=0.9, max_new_tokens=15, seed=8, repetition_penalty=1.3)]
    single = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    results: list = [None] * 4
    before = engine.prefills
    with engine._cv:  # hold the loop: all four wait when it next looks
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            engine.submit(p, sp, lambda ev, i=i: ev.result is not None and results.__setitem__(i, ev.result))
    assert wait_until(lambda: all(results), timeout=60)
    assert engine.prefills - before == 1
    assert [r.token_ids for r in results] == [r.token_ids for r in single]
    bad = [1, engine.vocab_size + 5, 3]  # an id beyond the embedding: its forward fails
    results = [None] * 3
    before = engine.prefills
    with engine._cv:
        for i, p in enumerate([prompts[0], bad, prompts[2]]):
            engine.submit(p, params[i], lambda ev, i=i: ev.result is not None and results.__setitem__(i, ev.result))
    assert wait_until(lambda: all(results), timeout=60)
    assert results[1].finish_reason == "error" and results[0].error is None and results[2].error is None
    assert results[0].token_ids == single[0].token_ids and results[2].token_ids == single[2].token_ids
    assert engine.prefills - before == 2  # the shared forward failed; the two good ones ran alone


# ---- hardening, second round (issue 24) ---------------------------------------------------------------

def held(e: Engine) -> tuple[threading.Event, threading.Event]:
    """Hold the engine's decode steps until ``release`` is set: a running request keeps its batch slot
    however fast the machine is. ``stepping`` is set once a step waits."""
    stepping, release = threading.Event(), threading.Event()
    real_step = e._step

    def held_step():
        stepping.set()
        release.wait(60)
        real_step()

    e._step = held_step
    return stepping, release


def test_a_cancelled_waiting_request_leaves_the_queue_at_once(engine):
    """A waiting request whose consumer went away frees its place in the bounded queue at once (not when
    a batch slot opens), and gets its cancelled Result: the next request is queued, not refused. The
    running request's steps are held, so the slot stays taken however fast the machine is."""
    from cla2.engine import QueueFull

    e = Engine(engine.model, engine.tokenizer, engine.device, max_batch_size=1, max_waiting=2)
    stepping, release = held(e)
    results: dict[str, list[Result]] = {"running": [], "w0": [], "w1": [], "late": []}

    def sink(name):
        return lambda ev: ev.result is not None and results[name].append(ev.result)

    try:
        e.submit("从前", SamplingParams(max_new_tokens=3, temperature=0), sink("running"))
        assert stepping.wait(60), "the first request did not reach the batch"
        assert e.num_running == 1
        waiting = [e.submit("你好", SamplingParams(max_new_tokens=3), sink(f"w{i}")) for i in range(2)]
        assert e.num_waiting == 2 and e.queue_full
        with pytest.raises(QueueFull):
            e.submit("再来", SamplingParams(max_new_tokens=3))
        for w in waiting:
            w.cancel()
        assert e.num_waiting == 0, "cancelled requests still hold their places in the queue"
        assert not e.queue_full
        assert [r.finish_reason for r in results["w0"] + results["w1"]] == ["cancelled", "cancelled"]
        assert e.finished["cancelled"] == 2
        e.submit("再来", SamplingParams(max_new_tokens=3, temperature=0), sink("late"))  # not refused
        assert e.num_waiting == 1
        release.set()
        assert wait_until(lambda: results["late"] and results["running"], 60)
        assert results["late"][0].finish_reason in ("stop", "length")
        assert results["running"][0].finish_reason in ("stop", "length")
        assert len(results["w0"]) == len(results["w1"]) == 1, "a cancelled request got a second Result"
        assert e.finished["cancelled"] == 2
    finally:
        release.set()
        e.close()
