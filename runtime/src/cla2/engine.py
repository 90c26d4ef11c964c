"""The one piece of code that generates text: chat, generate, serve and the web chat all call it.

A background thread runs a continuous-batching loop over one batched KV cache (transformers'
DynamicCache): new requests are prefilled (those waiting together in one left-padded forward), each
one's cache is left-padded and stacked onto the running batch, and from then on it decodes one token per
step together with every other running request. A request that finishes, or whose consumer goes away
(``Request.cancel()``), leaves the batch at the next step and frees its slot for a waiting one; a waiting
request that is cancelled leaves the queue at once (its place under ``max_waiting`` is free). An idle
loop waits on a condition (no polling).

A step is the model's forward plus as little as possible (issue 15): sampling runs once over the
batch's logits (``Sampler``), and what changes only when a request joins or leaves (per-row sampling
parameters, position ids, the attention mask, which is None when no row is padded) is built then; a
join copies the batch's cache once, a leave of the last rows keeps views of it.

When ``decode_graphs`` is on (the default on CUDA) the running batch goes through a second path: its
cache is copied into a preallocated static KV cache (transformers' StaticCache) of a fixed shape, a
bucket of 1, 2, 4 or 8 rows (up to ``max_batch_size``) by a power-of-two length, and each step runs one
``torch.compile(mode="reduce-overhead")`` forward, i.e. a replayed CUDA graph instead of some thirty
kernel launches a layer that each wait on the CPU (issue 15: a lone request first, now any batch). The
rows are right-aligned at the cache's one write column behind an attention mask; a request joins into a
free bucket row in place, a leaving one leaves a dummy row; a batch that outgrows its bucket, or shrinks
into a smaller one, passes through the dynamic cache and re-enters the bucket it then needs.

Why not ``model.generate``: it runs one fixed batch from start to end, so a request arriving while
another decodes waits for it to finish, and its sampling parameters are per batch, not per request.
Why not a paged-attention server (vLLM): it does not run on MLU or CPU. The model forward, the cache
and the tokenizer are transformers' own; only the scheduling and sampling (per-request generators,
temperature / top-k / top-p / repetition penalty per row) are written here.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import queue
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cla2.compat import (
    cache_kwarg,
    filled_cache,
    new_static_cache,
    output_cache,
    static_cache_class,
    static_layers,
)
from cla2.compat import cudagraph_thread_state as _cudagraph_thread_state
from cla2.loading import load_model

# The seed's generation defaults.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9
DEFAULT_REPETITION_PENALTY = 1.1
DEFAULT_MAX_NEW_TOKENS = 512
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class InvalidRequest(ValueError):
    """A request the engine refuses; ``param`` names the offending field, ``code`` is OpenAI-style."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (``Engine.max_waiting``): the server answers 429 with Retry-After."""


class ContextTooLong(InvalidRequest):
    def __init__(self, message: str):
        super().__init__(message, param="messages", code="context_length_exceeded")


@dataclass
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` switch
    those filters off; ``repetition_penalty == 1`` switches the penalty off (HF's definition: logits of
    tokens already in the prompt or the output are divided by it when positive, multiplied when negative)."""

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self, window: int | None = None) -> SamplingParams:
        def bad(name: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{name}={getattr(self, name)!r} is invalid: {why}", param=name)

        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", "use a value from 0 (greedy) to 2")
        if not 0 <= self.top_k <= 1_000_000:
            raise bad("top_k", "use 0 (off) or a positive number of candidates")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "use a value in (0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "use a value in (0, 10]; 1 switches it off")
        limit = window or 1_000_000
        if not 1 <= self.max_new_tokens <= limit:
            raise bad("max_new_tokens", f"use 1 to {limit} (the model's context window)")
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "use at most 16 non-empty strings")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            # torch.Generator.manual_seed takes a signed or unsigned 64-bit number and raises a bare
            # RuntimeError ("Overflow when unpacking long") beyond that.
            raise bad("seed", f"use an integer from {SEED_MIN} to {SEED_MAX}")
        return self


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (eos or stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    time_to_first_token: float | None  # seconds from submission to the first token
    elapsed: float  # seconds from submission to the end
    error: str | None = None


@dataclass
class Event:
    """What a request's consumer receives: text deltas, then one event with ``result`` set."""

    text: str = ""
    result: Result | None = None


class IncrementalDetokenizer:
    """Turns token ids into text deltas that never end inside a character.

    SentencePiece pieces decode differently alone than in context (the leading ``▁``), and a character
    outside the vocabulary arrives as several byte pieces (龘 is three), so the text of the last tokens is
    decoded together with the few before them and only the new part is released, and only when it does
    not end in an incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """What is left at the end, minus an incomplete trailing character (never U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):].rstrip("\ufffd") if len(text) > len(prefix) else ""


class Request:
    """One generation in flight. Consumers get ``Event``s through ``sink`` (called on the engine thread).

    A waiting request holds host memory only (its prompt ids); what it needs on the device (the ids of
    the prompt's tokens, which the repetition penalty changes) is made by ``start``, when the engine admits
    it to the batch, so a long queue costs no device memory. From then on the batch's ``Sampler`` keeps
    the ids it has seen, for all its rows at once."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None],
                 tokenizer, eos_ids: set[int], max_new_tokens: int):
        self.id = uuid.uuid4().hex
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.output_ids: list[int] = []
        self.detok = IncrementalDetokenizer(tokenizer)
        self.text = ""  # decoded so far (stop strings cut off)
        self.emitted = 0  # characters of self.text already sent
        self.finish_reason: str | None = None
        self.cancelled = False
        self.done = False  # its Result is sent
        # set by the engine that queues it: takes a cancelled request out of the waiting queue
        self.withdraw: Callable[[Request], None] | None = None
        self.next_token: int | None = None
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.seen: torch.Tensor | None = None

    def start(self, vocab_size: int, device: torch.device) -> None:
        """Admitted to the batch: put what sampling needs on the device (the prompt's token ids, for the
        repetition penalty; at least one, as the sampler's rows need one)."""
        if self.params.repetition_penalty != 1.0 and self.seen is None:
            ids = [i for i in self.prompt_ids if 0 <= i < vocab_size] or [0]
            self.seen = torch.tensor(ids, dtype=torch.long).to(device)

    def cancel(self) -> None:
        """The consumer went away. A waiting request leaves the queue at once (its place there is free for
        the next request, and its consumer gets the cancelled Result now); a running one leaves the batch
        at the engine's next step."""
        first = not (self.cancelled or self.done)
        self.cancelled = True
        if first and self.withdraw is not None:
            self.withdraw(self)

    @property
    def position(self) -> int:
        """Tokens in the cache for this request (the position of the next input token)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def _send(self, final: bool = False) -> None:
        end = len(self.text)
        if not final and self.params.stop:
            # Hold back a tail that could still become a stop string.
            for k in range(min(max(map(len, self.params.stop)) - 1, end - self.emitted), 0, -1):
                if any(s.startswith(self.text[end - k:]) for s in self.params.stop):
                    end -= k
                    break
        if end > self.emitted:
            delta, self.emitted = self.text[self.emitted:end], end
            self.sink(Event(text=delta))

    def push(self, token_id: int) -> None:
        """Account one sampled token; sets ``finish_reason`` when the request is done."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token_id in self.eos_ids:
            self.finish_reason = "stop"
            self.text += self.detok.flush()
            return
        self.output_ids.append(token_id)
        delta = self.detok.add(token_id)
        if len(self.output_ids) >= self.max_new_tokens:
            delta += self.detok.flush()
            self.finish_reason = "length"
        if delta:
            start = max(0, len(self.text) - max(map(len, self.params.stop), default=0))
            self.text += delta
            for s in self.params.stop:
                i = self.text.find(s, start)
                if i >= 0:
                    self.text = self.text[:i]
                    self.finish_reason = "stop"
        if self.finish_reason is None:
            self._send()
        self.next_token = token_id

    def finish(self, reason: str | None = None, error: str | None = None) -> Result:
        self.done = True
        self.finish_reason = reason or self.finish_reason or "stop"
        if error is None and self.finish_reason != "cancelled":
            self._send(final=True)
        now = time.perf_counter()
        result = Result(
            text=self.text[:self.emitted] if error is None else self.text,
            finish_reason=self.finish_reason, prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids), token_ids=list(self.output_ids),
            time_to_first_token=None if self.first_token_at is None else self.first_token_at - self.submitted,
            elapsed=now - self.submitted, error=error,
        )
        self.seen = None  # the device memory goes with the request, not with whoever still holds it
        self.sink(Event(result=result))
        return result


class Sampler:
    """Sampling for a batch's rows: one pass over the batch's logits per step, not one per request.

    What only changes when a request joins or leaves (each row's temperature, top-p and penalty as
    tensors, which rows are greedy, the rows grouped by top-k) is built then, not at every step. The
    repetition penalty changes only the logits of the tokens a row has seen (HF's definition: divided by
    it when positive, multiplied when negative), so it is a gather and a scatter over ``seen``, a
    [rows, tokens seen] matrix of ids (a shorter row is padded with a repeat of one of its own ids),
    instead of a pass over the whole vocabulary. Each row draws from its own request's generator, so a
    request samples the same tokens in any batch as alone."""

    def __init__(self, rows: Sequence[Request] = (), vocab_size: int = 0, device: torch.device | None = None):
        self.rows: list[Request] = []
        self.vocab_size = vocab_size
        self.device = device or torch.device("cpu")  # where the logits come out
        self.seen: torch.Tensor | None = None  # [rows, n] ids whose logits the penalty changes
        for r in rows:
            self.join(r)

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, req: Request, seen: torch.Tensor | None = None) -> None:
        """Add a row (last); ``seen``: its [1, n] ids when it carries more than its prompt's."""
        if seen is None and req.seen is not None:
            seen = req.seen[None]
        if self.seen is not None or seen is not None:
            device = self.device
            if seen is None:  # a row without a penalty: any id will do, the factor is 1
                seen = torch.zeros(1, 1, dtype=torch.long, device=device)
            if self.seen is None:
                self.seen = torch.zeros(len(self.rows), 1, dtype=torch.long, device=device)
            n, m = self.seen.shape[1], seen.shape[1]
            if n < m:
                self.seen = torch.cat([self.seen, self.seen[:, :1].expand(-1, m - n)], dim=1)
            elif m < n:
                seen = torch.cat([seen, seen[:, :1].expand(-1, n - m)], dim=1)
            self.seen = torch.cat([self.seen, seen.to(device)])
        self.rows.append(req)
        self._prepare()

    def keep(self, keep: list[int]) -> None:
        """Only these rows stay (in this order)."""
        self.rows = [self.rows[i] for i in keep]
        if self.seen is not None:
            self.seen = self.seen[torch.tensor(keep, device=self.seen.device)] if self.rows else None
        self._prepare()

    def _prepare(self) -> None:
        rows, dev = self.rows, self.device
        ps = [r.params for r in rows]
        self.penalty = None
        if self.seen is not None and any(p.repetition_penalty != 1.0 for p in ps):
            self.penalty = torch.tensor([[p.repetition_penalty] for p in ps], device=dev)
        self.greedy = [i for i, p in enumerate(ps) if p.temperature == 0]
        # rows that sample, grouped by top_k (one top-k per group): (k, rows, temperatures, top-p or None)
        groups: dict[int, list[int]] = collections.defaultdict(list)
        for i, p in enumerate(ps):
            if p.temperature != 0:
                groups[p.top_k if 0 < p.top_k < self.vocab_size else 0].append(i)
        self.groups = []
        for k, idx in groups.items():
            top_p = [ps[i].top_p if ps[i].top_p < 1.0 else float("inf") for i in idx]
            self.groups.append((k, idx, torch.tensor(idx, device=dev),
                                torch.tensor([[ps[i].temperature] for i in idx], device=dev),
                                None if all(t == float("inf") for t in top_p) else torch.tensor([[t] for t in top_p],
                                                                                                 device=dev)))

    def sample(self, logits: torch.Tensor, inplace: bool = False) -> list[int]:
        """One token per row from ``logits`` [rows, vocab]. ``inplace``: the logits may be overwritten."""
        logits = logits.float()
        if self.penalty is not None:
            seen = self.seen.to(logits.device)
            g = logits.gather(1, seen)
            g = torch.where(g < 0, g * self.penalty.to(logits.device), g / self.penalty.to(logits.device))
            logits = logits.scatter_(1, seen, g) if inplace else logits.scatter(1, seen, g)
        greedy = torch.argmax(logits, dim=-1) if self.greedy else None
        drawn = []
        for k, idx, index, temperature, top_p in self.groups:
            rows = logits if len(idx) == len(self.rows) else logits.index_select(0, index.to(logits.device))
            rows = rows / temperature.to(logits.device)
            values, indices = torch.topk(rows, k) if k else torch.sort(rows, dim=-1, descending=True)
            probs = torch.softmax(values, dim=-1)
            if top_p is not None:
                before = torch.cumsum(probs, dim=-1) - probs
                probs = probs.masked_fill(before >= top_p.to(probs.device), 0.0)
            # One wait on the device per step (the host needs the tokens to stream them): the candidates'
            # ids are queued for copying first, the blocking copy of their probabilities then covers both.
            drawn.append((idx, indices.to("cpu", non_blocking=True), probs))
        tokens = greedy.tolist() if greedy is not None else [0] * len(self.rows)
        for idx, indices, probs in drawn:
            probs = probs.cpu()
            for j, i in enumerate(idx):
                choice = torch.multinomial(probs[j], 1, generator=self.rows[i].generator)
                tokens[i] = int(indices[j, int(choice)])
        return tokens

    def add(self, tokens: list[int]) -> None:
        """Each row's new token is seen from now on."""
        if self.penalty is not None:
            self.seen = torch.cat([self.seen, torch.tensor(tokens, device=self.seen.device)[:, None]], dim=1)


def _stacked(old: torch.Tensor, new: torch.Tensor, total: int) -> torch.Tensor:
    """[B, H, T, D] cache tensors ``old`` and ``new`` as one of B + B' rows and ``total`` positions, each
    left-padded with zeros: one allocation, each value copied once."""
    b, n, m = old.shape[0], old.shape[2], new.shape[2]
    out = old.new_empty(b + new.shape[0], old.shape[1], total, old.shape[3])
    out[:b, :, :total - n].zero_()
    out[:b, :, total - n:] = old
    out[b:, :, :total - m].zero_()
    out[b:, :, total - m:] = new.to(out.device)
    return out


# Padded prompt tokens that one prefill forward of several requests may hold (one prompt alone may be longer).
PREFILL_TOKENS = 2048

# Columns the attention mask buffer gets beyond the cache's length when a request joins or leaves (it
# doubles when the batch outgrows it).
MASK_HEADROOM = 256


# The static cache is sized to what the batch's rows may still need, rounded up to a power of two: a few
# sizes (one compiled graph each) serve every request, and attention reads little beyond the used part
# (it reads the whole static cache, masked, at every step).
STATIC_MIN_LEN = 256


def static_len(needed: int, window: int) -> int:
    n = STATIC_MIN_LEN
    while n < needed:
        n *= 2
    return min(n, window)


def static_batch(rows: int, max_batch: int) -> int:
    """The batch bucket of ``rows`` running requests: the next power of two (at most ``max_batch``), as
    serving engines pad their graphed batches, so that a few graphs serve every batch size."""
    n = 1
    while n < rows:
        n *= 2
    return min(n, max_batch)


def fit_prompt(prompt_ids: list[int], params: SamplingParams, window: int, truncate: bool,
               bos_id: int | None) -> tuple[list[int], int]:
    """``Engine.check_prompt`` without an engine (a job checks its prompts before any model loads)."""
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if len(prompt_ids) >= window:
        if not truncate:
            raise ContextTooLong(
                f"the prompt is {len(prompt_ids)} tokens, but the model's context window is {window} "
                "tokens: shorten it (or start the server with truncation on)")
        keep = max(1, window - min(params.max_new_tokens, window // 2))
        head = prompt_ids[:1] if prompt_ids[0] == bos_id else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - keep + len(head):]
    return prompt_ids, min(params.max_new_tokens, window - len(prompt_ids))


class Engine:
    """Continuous-batching text generation over one model.

    ``submit`` is thread-safe; ``stream``/``astream`` yield text deltas; ``generate`` runs many prompts
    batched and returns their results in order.

    ``decode_graphs``: decode the running batch through a static KV cache (a bucket by batch size and
    length) and, on CUDA, a CUDA graph (``torch.compile(mode="reduce-overhead")``; the first steps at each
    bucket compile and capture, which takes a while). None: on for CUDA only. On CPU and MLU it runs the same static-cache
    step without a graph (no faster; it is what the CPU tests check). If the step fails (a transformers
    without a usable StaticCache, a compile error), the engine warns once and decodes eagerly.
    """

    def __init__(self, model, tokenizer, device: torch.device | None = None, max_batch_size: int = 8,
                 name: str = "model", truncate: bool = False, decode_graphs: bool | None = None,
                 max_waiting: int | None = None):
        from transformers import DynamicCache

        self._DynamicCache = DynamicCache
        self._cache_kw = cache_kwarg(model)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device
        # A replica split over devices (accelerate's device_map): each layer's KV cache lives on its
        # layer's device; inputs go in and logits come out on self.device.
        split = getattr(model, "hf_device_map", None) or {}
        self.devices = sorted({str(d) for d in split.values()}) or [str(self.device)]
        self.max_batch_size = max(1, int(max_batch_size))
        # Requests allowed to wait for a batch slot (once the batch is full); beyond it submit raises
        # QueueFull (the server's 429). None: no bound (a batch job submits its whole file at once).
        self.max_waiting = None if max_waiting is None else max(0, int(max_waiting))
        self.finished: collections.Counter[str] = collections.Counter()  # results by finish_reason
        self._finished_lock = threading.Lock()  # a withdrawn request is counted on its canceller's thread
        self.name = name
        self.truncate = truncate
        self.window = int(getattr(model.config, "max_position_embeddings", 4096))
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._waiting: collections.deque[Request] = collections.deque()
        self._clear()
        self._cv = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps run (tests read it to see batching happen)
        self.prefills = 0  # prefill forwards run (several waiting requests share one)
        self.max_running = 0  # the largest batch seen
        self.decode_graphs = self._static_wanted(decode_graphs)
        # torch.compile options of the static step: CUDA graphs on CUDA; elsewhere the step runs eagerly.
        self._compile_options: dict | None = (
            {"mode": "reduce-overhead", "dynamic": False} if self.device.type == "cuda" else None)
        self._static = None  # the StaticCache the running batch decodes in, while it does
        # by (batch bucket, length), least recently used first; reused: a graph replays on fixed addresses
        self._static_caches: collections.OrderedDict[tuple[int, int], object] = collections.OrderedDict()
        self._static_forward = None
        self._cache_position = "cache_position" in inspect.signature(model.forward).parameters  # < 5.0
        self._dtype = next(model.parameters()).dtype
        self.static_steps = 0  # decode steps run on the static path
        self.static_entries = 0  # times the running batch moved onto it
        self.static_joins = 0  # requests that joined it in a free bucket row (no other row copied)
        self.static_allocations = 0  # static caches allocated (a (bucket, length) seen again reuses its own)
        self._thread = threading.Thread(target=self._loop, name="cla2-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model: Path, adapter: Path | None = None, device: str | None = None,
                        dtype: str | None = None, max_batch_size: int = 8, name: str | None = None,
                        truncate: bool = False, decode_graphs: bool | None = None, devices: list[int] | None = None,
                        layer_groups: list[list[int]] | None = None, max_waiting: int | None = None) -> Engine:
        net, tokenizer, torch_device = load_model(model, adapter, device, dtype, devices, layer_groups)
        return cls(net, tokenizer, torch_device, max_batch_size=max_batch_size,
                   name=name or Path(model).resolve().name, truncate=truncate, decode_graphs=decode_graphs,
                   max_waiting=max_waiting)

    def _static_wanted(self, wanted: bool | None) -> bool:
        # By default only on one CUDA device: a graph cannot span a replica's devices.
        on = self.device.type == "cuda" and len(self.devices) == 1 if wanted is None else bool(wanted)
        if on and static_cache_class() is None:
            if wanted:
                warnings.warn("decode_graphs: this transformers has no StaticCache; decoding eagerly",
                              RuntimeWarning, stacklevel=3)
            return False
        return on

    # ---- requests -------------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._active)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True).input_ids)
        return [int(i) for i in prompt]

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], int]:
        """Refuse (or, with truncate, cut from the left) a prompt that leaves no room in the window.
        Returns the prompt ids and the number of tokens that may be generated."""
        return fit_prompt(prompt_ids, params, self.window, self.truncate, self.tokenizer.bos_token_id)

    @property
    def queue_full(self) -> bool:
        """``max_waiting`` requests wait beyond the batch's free slots (a request that has a free slot
        waits only until the loop's next turn, so a burst on an idle engine is not refused)."""
        if self.max_waiting is None:
            return False
        free = max(0, self.max_batch_size - len(self._active))
        return len(self._waiting) >= self.max_waiting + free

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               sink: Callable[[Event], None] | None = None) -> Request:
        """Queue a request (thread-safe). Raises InvalidRequest for a bad one, QueueFull when
        ``max_waiting`` requests already wait. A string prompt is tokenised here, on the caller's thread:
        the server passes token ids it tokenised off its event loop."""
        params = (params or SamplingParams()).validate(self.window)
        if self.queue_full:  # before tokenising: a refused request costs nothing
            raise QueueFull(f"{len(self._waiting)} requests are already waiting (the bound is {self.max_waiting})")
        prompt_ids, max_new = self.check_prompt(self.encode(prompt), params)
        user_sink = sink or (lambda e: None)

        def counted(ev: Event) -> None:
            if ev.result is not None:
                with self._finished_lock:
                    self.finished[ev.result.finish_reason] += 1
            user_sink(ev)

        req = Request(prompt_ids, params, counted, self.tokenizer, self.eos_ids, max_new)
        req.withdraw = self._withdraw
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self.queue_full:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the bound is "
                                f"{self.max_waiting})")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def _withdraw(self, req: Request) -> None:
        """A cancelled request that still waits leaves the queue now, not when a batch slot opens: its place
        under ``max_waiting`` (and the queue-length gauge) is free at once. One the loop has taken already
        is dropped by the loop (before its prefill, or at the next step)."""
        with self._cv:
            try:
                self._waiting.remove(req)
            except ValueError:
                return
        req.finish("cancelled")

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None
               ) -> Iterator[str | Result]:
        """Submit now (a bad request raises here), then yield text deltas and finally the Result.
        Closing the iterator cancels the request."""
        q: queue.Queue[Event] = queue.Queue()
        req = self.submit(prompt, params, q.put)
        return self._drain(req, q)

    @staticmethod
    def _drain(req: Request, q: queue.Queue) -> Iterator[str | Result]:
        try:
            while True:
                ev = q.get()
                if ev.result is not None:
                    yield ev.result
                    return
                yield ev.text
        finally:
            req.cancel()

    def astream(self, prompt: str | Sequence[int], params: SamplingParams | None = None
                ) -> AsyncIterator[str | Result]:
        """``stream`` for asyncio (call it inside the event loop): a disconnecting client closes the
        iterator, which frees the batch slot."""
        return self.open_async(prompt, params)[1]

    def open_async(self, prompt: str | Sequence[int], params: SamplingParams | None = None
                   ) -> tuple[Request, AsyncIterator[str | Result]]:
        """``astream``, plus the Request, so that another task (the server's disconnect watcher) can
        ``cancel()`` it while this one waits on the iterator."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        req: Request | None = None

        def sink(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:  # the loop is closed: nobody listens any more (and the step goes on)
                if req is not None:
                    req.cancel()

        req = self.submit(prompt, params, sink)
        return req, self._adrain(req, q)

    @staticmethod
    async def _adrain(req: Request, q: asyncio.Queue) -> AsyncIterator[str | Result]:
        try:
            while True:
                ev = await q.get()
                if ev.result is not None:
                    yield ev.result
                    return
                yield ev.text
        finally:
            req.cancel()

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 | None = None) -> list[Result]:
        """Run all prompts (batched by the engine) and return their results in order."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        done = threading.Semaphore(0)
        results: list[Result | None] = [None] * len(prompts)

        def sink_for(i: int) -> Callable[[Event], None]:
            def sink(ev: Event) -> None:
                if ev.result is not None:
                    results[i] = ev.result
                    done.release()
            return sink

        for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
            self.submit(p, sp, sink_for(i))
        for _ in prompts:
            done.acquire()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # ---- the loop -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._active:
                    self._cv.wait()
                if self._closed:
                    waiting, self._waiting = list(self._waiting), collections.deque()
                    for r in [*self._active, *waiting]:
                        r.finish("cancelled")
                    return
            try:
                self._admit()
                if self._active:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a failed step must not kill the server
                for r in self._active:
                    r.finish("error", error=f"{type(exc).__name__}: {exc}")
                self._clear()

    def _clear(self) -> None:
        """No running batch (nothing of one kept)."""
        self._active, self._cache, self._static = [], None, None
        self._sampler = Sampler(vocab_size=self.vocab_size, device=self.device)
        self._pads: list[int] = []  # padding columns at the left of each row of the cache
        self._len = 0  # columns in the cache
        self._mask_buf: torch.Tensor | None = None  # [rows, capacity]: the attention mask, None when no padding
        self._positions: torch.Tensor | None = None  # [rows, 1]: the position of each row's next input token
        self._static_declined = False  # the running batch does not fit the static path (until it changes)
        # the static path's state (see _enter_static): the bucket row of each request, the masked columns at
        # the left of each bucket row, the write column, the mask, the position ids, the bucket rows to read
        self._slots: list[int] = []
        self._slot_pads: list[int] = []
        self._col = 0
        self._static_len = 0
        self._static_mask: torch.Tensor | None = None
        self._static_positions: torch.Tensor | None = None
        self._slot_index: torch.Tensor | None = None

    @torch.inference_mode()
    def _admit(self) -> None:
        """Prefill the waiting requests the batch has room for, all in one forward, and join them."""
        while len(self._active) < self.max_batch_size:
            with self._cv:
                batch, longest = [], 0
                while self._waiting and len(batch) < self.max_batch_size - len(self._active):
                    n = max(longest, len(self._waiting[0].prompt_ids))
                    if batch and (len(batch) + 1) * n > PREFILL_TOKENS:
                        break  # the rest in the next forward: one prefill's activations stay bounded
                    batch.append(self._waiting.popleft())
                    longest = n
            if not batch:
                return
            joining = self._prefill(batch)
            for i, (req, cache) in enumerate(joining):
                try:
                    self._join(req, cache)
                except Exception as exc:
                    # Neither waiting nor running: without this their consumers would wait forever. The
                    # batch may be half-joined, so the loop fails it too and starts over.
                    for r, _ in joining[i:]:
                        r.finish("error", error=f"{type(exc).__name__}: {exc}")
                    raise

    def _prefill(self, batch: list[Request]) -> list[tuple[Request, object]]:
        """Run the prompts, sample each request's first token, and return those that go on, each with its
        own cache. Several prompts run as one left-padded forward; if that fails, each runs alone, so
        that only a request that fails alone fails."""
        ready = []
        for req in batch:
            if req.cancelled:
                req.finish("cancelled")
                continue
            try:
                req.start(self.vocab_size, self.device)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                req.finish("error", error=f"{type(exc).__name__}: {exc}")
                continue
            ready.append(req)
        runs = []
        if len(ready) > 1:
            try:
                runs.append((ready, *self._prefilled(ready)))
            except Exception:  # noqa: BLE001 - find out which one fails, alone
                pass
        if not runs:
            for req in ready:
                try:
                    runs.append(([req], *self._prefilled([req])))
                except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                    req.finish("error", error=f"{type(exc).__name__}: {exc}")
        joining = []
        for reqs, tokens, caches in runs:
            for req, token, cache in zip(reqs, tokens, caches, strict=True):
                try:
                    req.push(token)
                    if req.finish_reason is None and req.seen is not None:  # the batch's sampler takes it over
                        req.seen = torch.cat([req.seen, req.seen.new_tensor([token])])
                except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                    req.finish("error", error=f"{type(exc).__name__}: {exc}")
                    continue
                if req.finish_reason is not None:
                    req.finish()
                else:
                    joining.append((req, cache))
        return joining

    def _prefilled(self, reqs: list[Request]) -> tuple[list[int], list]:
        """One forward over the prompts (left-padded): each request's first token, and its own cache."""
        lengths = [len(r.prompt_ids) for r in reqs]
        total = max(lengths)
        ids = torch.tensor([r.prompt_ids[:1] * (total - n) + r.prompt_ids for r, n in zip(reqs, lengths, strict=True)],
                           device=self.device)
        extra: dict = {}
        if min(lengths) < total:
            mask = torch.tensor([[0] * (total - n) + [1] * n for n in lengths], device=self.device)
            extra = {"attention_mask": mask, "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0)}
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: self._DynamicCache()},
                         **extra)
        self.prefills += 1
        caches = [output_cache(out)]
        if len(reqs) > 1:
            layers = [(k, v) for k, v, *_ in caches[0]]
            caches = [filled_cache(self._DynamicCache, [(k[i:i + 1, :, total - n:], v[i:i + 1, :, total - n:])
                                                        for k, v in layers]) for i, n in enumerate(lengths)]
        # last: nothing after it fails, so no generator has drawn for a prefill that is then run again alone
        return Sampler(reqs, self.vocab_size, self.device).sample(out.logits[:, -1], inplace=True), caches

    def _join(self, req: Request, cache) -> None:
        """Stack a prefilled request's cache onto the running batch (left padding, masked out): one copy of
        the batch's cache, into tensors made once at their new size."""
        new_len = len(req.prompt_ids)
        if not self._active:
            self._cache, self._pads, self._len = cache, [0], new_len
        elif self._static is not None and self._try_static(self._static_join, req, cache):
            pass  # into a free row of the static bucket
        else:
            if self._static is not None:  # no free row fits it: the next step re-enters a bucket that fits
                self._leave_static()
            joining = [(nk, nv) for nk, nv, *_ in cache]
            old_len = self._len
            total = max(old_len, new_len)
            self._cache = self._rebuilt(lambda i, k, v: (_stacked(k, joining[i][0], total),
                                                         _stacked(v, joining[i][1], total)))
            self._pads = [p + total - old_len for p in self._pads] + [total - new_len]
            self._len = total
        self._active.append(req)
        self._sampler.join(req)
        if self._static is None:
            self._batch_changed()
        self.max_running = max(self.max_running, len(self._active))

    def _batch_changed(self) -> None:
        """What the decode step takes from the batch's rows and only changes when one joins or leaves:
        the position ids (then advanced in place by each step) and the attention mask (None when no row is
        padded; otherwise a buffer with room to grow, of which each step passes a view). A batch that
        declined the static path tries it again."""
        self._static_declined = False
        self._positions = torch.tensor([[r.position] for r in self._active], device=self.device)
        self._mask_buf = None
        if any(self._pads):
            capacity = self._len + 1 + MASK_HEADROOM
            columns = torch.arange(capacity, device=self.device)[None]
            self._mask_buf = (columns >= torch.tensor(self._pads, device=self.device)[:, None]).long()

    def _rebuilt(self, change: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        """The batch's cache with ``change(layer, keys, values)`` applied to every layer, letting go of each
        old layer as soon as its new one exists: a join or a leave then needs one layer's worth of memory
        beyond the cache, not a second copy of all of it (the plan budgets the KV cache once)."""
        old = [(k, v) for k, v, *_ in self._cache]
        self._cache = None
        layers = []
        for i in range(len(old)):
            (k, v), old[i] = old[i], None
            layers.append(change(i, k, v))
            del k, v
        return filled_cache(self._DynamicCache, layers)

    # ---- the static path: the running batch in a fixed-shape step ---------------------------------------
    #
    # The batch's rows sit in a StaticCache of B rows (B: the batch bucket, ``static_batch``) and L columns
    # (``static_len``). A StaticCache writes every row's new keys at one column (its write column, ``_col``),
    # so the rows are right-aligned at it: a row of n tokens holds columns [_col - n, _col), the columns
    # before them are masked out (``_slot_pads``), and each row keeps its own position ids. Bucket rows no
    # request holds are dummy rows: they decode token 0 at every step, attend only to what they write
    # themselves (so no row is ever wholly masked) and their logits are not read. A join takes a free row in
    # place when the newcomer's prompt fits before the write column; otherwise, and when the batch shrinks
    # into a smaller bucket, the batch goes back to the dynamic cache (compacted there) and re-enters the
    # static path at the next step, in the bucket its new size and lengths need.

    def _static_need(self, rows: Sequence[Request], col: int) -> int:
        """Cache columns ``rows`` need when their next tokens go to column ``col``: each row writes one column
        a step until it has its max_new_tokens (an eos or a stop string may end it sooner)."""
        return col + max(r.max_new_tokens - len(r.output_ids) for r in rows)

    def _bucket_cache(self, batch: int, length: int, layer_devices: list[torch.device]):
        """The static cache of this (batch bucket, length), reused, so that its compiled graph replays over
        the same addresses; a new one when there is none. The caches kept hold at most what one full batch's
        KV cache holds (max_batch_size x window positions): the least recently used go first."""
        key = (batch, length)
        cache = self._static_caches.pop(key, None)
        if cache is None:
            budget = self.max_batch_size * self.window
            while self._static_caches and sum(b * n for b, n in self._static_caches) + batch * length > budget:
                self._static_caches.popitem(last=False)
            cache = new_static_cache(self.model.config, length, self.device, self._dtype, layer_devices, batch)
            self.static_allocations += 1
        else:
            cache.reset()
        self._static_caches[key] = cache
        return cache

    def _enter_static(self) -> None:
        """Move the running batch from the dynamic cache into the static cache of its bucket, or decline
        (until the batch changes) when its rows would need more columns than the window."""
        active = self._active
        col = max(r.position for r in active)  # the longest row's tokens: no column is padding for all rows
        need = self._static_need(active, col)
        length = static_len(need, self.window)
        if need > length:  # left-aligned rows of very different lengths near the window: stay dynamic
            self._static_declined = True
            return
        n, batch = len(active), static_batch(len(active), self.max_batch_size)
        layers = [(k, v) for k, v, *_ in self._cache]
        cache = self._bucket_cache(batch, length, [k.device for k, _ in layers])
        for i, (k, v) in enumerate(layers):
            k, v = k[:, :, k.shape[2] - col:], v[:, :, v.shape[2] - col:]
            if batch > n:  # the dummy rows
                k = torch.cat([k, k.new_zeros(batch - n, *k.shape[1:])])
                v = torch.cat([v, v.new_zeros(batch - n, *v.shape[1:])])
            cache.update(k, v, i, {"cache_position": torch.arange(col, device=k.device)})
        self._static, self._static_len, self._col = cache, length, col
        self._slots = list(range(n))
        self._slot_pads = [col - r.position for r in active] + [col] * (batch - n)
        self._static_positions = torch.tensor([[r.position] for r in active] + [[0]] * (batch - n),
                                              device=self.device)
        self._cache, self._mask_buf, self._positions = None, None, None
        self._static_rows_changed()
        self.static_entries += 1

    def _static_rows_changed(self) -> None:
        """The attention mask over the whole static cache (None for a bucket of one row, which has no padding:
        one graph per bucket either way) and which bucket rows hold the batch's requests, in its order."""
        batch = len(self._slot_pads)
        self._static_mask = None
        if batch > 1:
            columns = torch.arange(self._static_len, device=self.device)[None]
            self._static_mask = (columns >= torch.tensor(self._slot_pads, device=self.device)[:, None]).long()
        self._slot_index = (None if self._slots == list(range(batch))
                            else torch.tensor(self._slots, device=self.device))

    def _static_join(self, req: Request, cache) -> bool:
        """Put a prefilled request into a free row of the static bucket, right-aligned at the write column:
        its own cache is the only one copied. False when it does not fit there."""
        n, col = req.position, self._col
        free = [s for s in range(len(self._slot_pads)) if s not in self._slots]
        if not free or n > col or self._static_need([*self._active, req], col) > self._static_len:
            return False
        slot = free[0]
        for (keys, values), (k, v, *_) in zip(static_layers(self._static), cache, strict=True):
            keys[slot, :, col - n:col] = k[0, :, k.shape[2] - n:].to(keys.device)
            values[slot, :, col - n:col] = v[0, :, v.shape[2] - n:].to(values.device)
        self._slots.append(slot)
        self._slot_pads[slot] = col - n
        self._static_positions[slot, 0] = n
        self._static_rows_changed()
        self.static_joins += 1
        return True

    def _static_keep(self, keep: list[int]) -> None:
        """Only these rows of the batch stay: the others' bucket rows become dummy rows (nothing is copied),
        unless the batch now fits a smaller bucket, which the next step enters from the dynamic cache."""
        kept = [self._slots[i] for i in keep]
        for s in self._slots:
            if s not in kept:
                self._slot_pads[s] = self._col
        self._slots = kept
        if static_batch(len(kept), self.max_batch_size) < len(self._slot_pads):
            self._leave_static()
        else:
            self._static_rows_changed()

    def _leave_static(self) -> None:
        """Back to the dynamic path: the batch's rows copied out of the static cache (left-padded, as the
        dynamic path keeps them), without the columns that are padding for all of them."""
        col = self._col
        pads = [self._slot_pads[s] for s in self._slots]
        lead = min(pads)
        index = torch.tensor(self._slots)
        self._cache = filled_cache(self._DynamicCache, [
            (k[:, :, lead:col].index_select(0, index.to(k.device)), v[:, :, lead:col].index_select(0, index.to(v.device)))
            for k, v in static_layers(self._static)])
        self._pads, self._len, self._static = [p - lead for p in pads], col - lead, None
        self._static_mask = self._static_positions = self._slot_index = None
        self._batch_changed()

    def _static_logits(self) -> torch.Tensor:
        """One fixed-shape forward over the bucket; the logits of the batch's rows, in its order."""
        if self._static_forward is None:
            if self._compile_options is not None:
                _cudagraph_thread_state()
                # One graph per (batch bucket, length): more than dynamo's default of 8 recompiles of a
                # frame (torch 2.2+; 2.1's default is 64), beyond which it would run the rest uncompiled.
                lengths, n = 1, STATIC_MIN_LEN
                while n < self.window:
                    lengths, n = lengths + 1, 2 * n
                batches = len({static_batch(n, self.max_batch_size) for n in range(1, self.max_batch_size + 1)})
                dynamo = torch._dynamo.config
                dynamo.cache_size_limit = max(dynamo.cache_size_limit, 2 * batches * lengths)
                self._static_forward = torch.compile(self.model, **self._compile_options)
            else:
                self._static_forward = self.model
        ids = [0] * len(self._slot_pads)
        for r, s in zip(self._active, self._slots, strict=True):
            ids[s] = r.next_token
        extra: dict = {}
        if self._cache_position:  # transformers < 5.0 writes the static cache at the columns it is given
            extra["cache_position"] = torch.tensor([self._col], device=self.device)
        if self._static_mask is not None:
            extra["attention_mask"] = self._static_mask
        if self._compile_options is not None and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are dead: replay over them
        out = self._static_forward(input_ids=torch.tensor(ids, device=self.device)[:, None],
                                   position_ids=self._static_positions, use_cache=True,
                                   **{self._cache_kw: self._static}, **extra)
        self._col += 1
        self._static_positions += 1  # queued after the forward that reads it
        self.static_steps += 1
        logits = out.logits[:, -1]
        return logits if self._slot_index is None else logits.index_select(0, self._slot_index)

    def _try_static(self, fn: Callable, *args):
        # Outside inference mode, as transformers' own generate runs static caches and compiled steps
        # (under no_grad): CUDA graph capture refuses in-place updates of inference tensors.
        with torch.inference_mode(False), torch.no_grad():
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - fall back to the eager path, which works everywhere
                warnings.warn(f"decode_graphs: the static-cache decode step failed ({type(exc).__name__}: "
                              f"{exc}); decoding eagerly from now on", RuntimeWarning, stacklevel=2)
                self.decode_graphs = False
                if self._static is not None:
                    self._leave_static()
                return None

    # ---- a decode step ----------------------------------------------------------------------------------

    def _dynamic_logits(self, active: list[Request]) -> torch.Tensor:
        input_ids = torch.tensor([[r.next_token] for r in active], device=self.device)
        mask = None
        if self._mask_buf is not None:
            if self._mask_buf.shape[1] < self._len + 1:  # out of room: twice the size, the new columns ones
                grown = self._mask_buf.new_ones(len(active), 2 * self._mask_buf.shape[1])
                grown[:, :self._mask_buf.shape[1]] = self._mask_buf
                self._mask_buf = grown
            mask = self._mask_buf[:, :self._len + 1]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=self._positions, use_cache=True,
                         **{self._cache_kw: self._cache})
        self._cache = output_cache(out)
        self._len += 1
        self._positions += 1  # queued after the forward that reads it
        return out.logits[:, -1]

    @torch.inference_mode()
    def _step(self) -> None:
        active = self._active
        if self.decode_graphs and self._static is None and not self._static_declined:
            self._try_static(self._enter_static)
        logits = self._try_static(self._static_logits) if self._static is not None else None
        if logits is not None:  # the static step's logits: its graph's output, read only
            tokens = self._sampler.sample(logits)
        else:
            tokens = self._sampler.sample(self._dynamic_logits(active), inplace=True)
        self.steps += 1
        keep = []
        for i, r in enumerate(active):
            if not r.cancelled:
                r.push(tokens[i])
            if r.cancelled:
                r.finish("cancelled")
            elif r.finish_reason is not None:
                r.finish()
            else:
                keep.append(i)
        self._sampler.add(tokens)
        if len(keep) == len(active):
            return
        if not keep:
            self._clear()
            return
        self._active = [active[i] for i in keep]
        self._sampler.keep(keep)
        if self._static is not None:
            self._try_static(self._static_keep, keep)
            return
        # Drop the columns that are padding for every remaining row. Rows that stay in front keep their
        # tensors' storage (a view, no copy); otherwise the remaining rows are copied once.
        lead = min(self._pads[i] for i in keep)
        self._pads = [self._pads[i] - lead for i in keep]
        self._len -= lead
        if keep == list(range(len(keep))):
            n = len(keep)
            self._cache = self._rebuilt(lambda i, k, v: (k[:n, :, lead:], v[:n, :, lead:]))
        else:
            index = torch.tensor(keep)
            self._cache = self._rebuilt(lambda i, k, v: (k[index.to(k.device), :, lead:],
                                                         v[index.to(v.device), :, lead:]))
        self._batch_changed()
