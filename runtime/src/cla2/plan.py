"""`cla2 plan`: where a job fits. One plan decides placement for every job, from the model's config.json
(and weight index), the dtype and the devices (how many, how much memory each).

Inference (serve, chat, generate, eval) runs as replicas of k devices: the decoder layers are split
over a replica's devices (the seed's web demo spread them over ``--gpus 0,1`` the same way, with
accelerate's ``device_map``), and each layer's KV cache lives on its layer's device. The plan takes the
smallest k (1, 2, 4, ... devices: whole cards, then MLU-Link groups) whose tightest device holds its
share of the weights, the KV cache of at least one full-context sequence and one prefill's activations;
then as many replicas as the host holds, and the largest batch whose KV cache fits.

Training (finetune, pretrain) runs one rank per device. The plan takes the cheapest setting that fits a
rank, trying in order: no DeepSpeed (plain DDP), ZeRO-2, ZeRO-3, each first without and then with
gradient checkpointing, at the requested micro-batch first and then at smaller ones (the gradient
accumulation grows so that the effective batch stays the same). A micro-batch is budgeted at the longest
batch the training data can form (``tokens_per_micro_batch``): instruction data is padded per batch to its
longest example, so with --data (and in every finetune job) that is the micro-batch times the data's longest
example after the template, cut at --max-seq-length and padded as the collator pads; pre-training's blocks
are all --block-size long. Without the data every sequence is budgeted at full length.

Everything here is arithmetic on the model's shape; the estimate is checked against measured peaks by
``bench/plan_memory.py``. Every decision can be overridden by the jobs' own flags (``--devices``,
``--batch-size``, ``--deepspeed``, ``--gradient-checkpointing``).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from cla2.prompts import DEFAULT_SYSTEM_PROMPT

INFERENCE_JOBS = ("serve", "chat", "generate", "eval")
TRAINING_JOBS = ("finetune", "pretrain")
JOBS = INFERENCE_JOBS + TRAINING_JOBS

GiB = 1024**3
# Only this share of a device is planned for: the allocator's caching and fragmentation take the rest.
USABLE_FRACTION = 0.9
# What a process holds on an accelerator before the model: the runtime's context, kernels, the
# collectives' buffers (training). On the CPU the plan counts what the job adds to the process.
INFERENCE_RESERVE = {"cpu": 0, "cuda": GiB, "mlu": GiB}
TRAINING_RESERVE = {"cpu": 0, "cuda": 3 * GiB // 2, "mlu": 3 * GiB // 2}
# The batch each inference job runs by default (its --batch-size / --max-batch-size).
DEFAULT_BATCH = {"serve": 8, "chat": 1, "generate": 8, "eval": 16}
DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """The job does not fit, or the plan's inputs are wrong; the message gives the numbers."""


# ------------------------------------------------------------------------------------------ sizes
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "KI": 1024, "M": 1000**2, "MB": 1000**2,
          "MIB": 1024**2, "MI": 1024**2, "G": 1000**3, "GB": 1000**3, "GIB": GiB, "GI": GiB,
          "T": 1000**4, "TB": 1000**4, "TIB": 1024**4, "TI": 1024**4}


def parse_size(text: str) -> int:
    """'24GiB' -> 25769803776, '80GB' -> 80000000000, '1024' -> 1024 bytes."""
    m = _SIZE.match(str(text))
    if not m or (m.group(2) or "").upper() not in _UNITS:
        raise PlanError(f"device memory {text!r} is not a size: write it like 24GiB, 80GB or 16384MiB")
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size <= 0:
        raise PlanError(f"device memory {text!r} must be more than 0")
    return size


def human(n: float) -> str:
    """Bytes as GiB (or MiB below 1 GiB), for the plan's messages."""
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / 1024**2:.0f} MiB"


# ------------------------------------------------------------------------------------------ shape
@dataclass(frozen=True)
class Shape:
    """What the plan needs of a LLaMA-architecture model, from its config.json (and weight index)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    tied: bool
    params: int  # all parameters

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        """One decoder layer: attention (q, k, v, o), MLP (gate, up, down), two norms."""
        q = o = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        return q + o + kv + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * dtype_bytes

    def module_params(self, name: str) -> tuple[int, int]:
        """(in, out) features of a linear module of a layer, by its name in the checkpoint."""
        h, attn, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        table = {"q_proj": (h, attn), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (attn, h),
                 "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate),
                 "down_proj": (self.intermediate, h)}
        if name not in table:
            raise PlanError(f"LoRA target {name!r} is not a linear module of a LLaMA layer: use some of "
                            f"{', '.join(table)}")
        return table[name]


# The numbers of config.json the plan reads: (required, largest allowed). The bounds are far above every
# published model (LLaMA-3.1-405B: 126 layers, hidden 16384, MLP 53248, 128 heads; vocabularies up to ~256k;
# windows up to 10M tokens) and far below what would make the plan (a list per layer) or a job exhaust memory.
CONFIG_NUMBERS = {
    "num_hidden_layers": (True, 4096),
    "hidden_size": (True, 1 << 17),
    "intermediate_size": (True, 1 << 20),
    "num_attention_heads": (True, 4096),
    "vocab_size": (True, 1 << 22),
    "num_key_value_heads": (False, 4096),
    "head_dim": (False, 1 << 14),
    "max_position_embeddings": (False, 1 << 24),
}


def _shown(value) -> str:
    """A config value as config.json writes it, and what kind it is when it is not a whole number."""
    text = json.dumps(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    kind = ("a boolean" if isinstance(value, bool) else "a floating-point number" if isinstance(value, float)
            else "a string" if isinstance(value, str) else "no value" if value is None
            else "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else None)
    return f"{text} ({kind})" if kind else text


def check_config(cfg: dict, config_file: Path) -> dict:
    """The numbers the plan reads from a config.json, checked before anything is built from them: whole
    numbers (not floats, booleans or strings), positive, within CONFIG_NUMBERS' bounds, the heads dividing
    as LLaMA's attention needs. Optional fields that are absent (or null) are left out of the result."""
    def refuse(key: str, allowed: str) -> PlanError:
        said = f"{config_file} has no {key}" if key not in cfg else f"{config_file}: {key} is {_shown(cfg[key])}"
        return PlanError(f"{said}; allowed: {allowed}. The plan reads a LLaMA-architecture config: "
                         "re-download the model or fix its config.json")

    out: dict = {}
    for key, (required, high) in CONFIG_NUMBERS.items():
        value = cfg.get(key)
        if value is None and not required:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise refuse(key, f"a whole number from 1 to {high}")
        out[key] = value
    heads = out["num_attention_heads"]
    if "head_dim" not in out and out["hidden_size"] % heads:
        raise refuse("num_attention_heads", f"a whole number that divides hidden_size ({out['hidden_size']}), "
                     "or a head_dim in the config")
    kv = out.get("num_key_value_heads")
    if kv is not None and (kv > heads or heads % kv):
        raise refuse("num_key_value_heads", f"a whole number from 1 to {heads} that divides num_attention_heads "
                     f"({heads})")
    tied = cfg.get("tie_word_embeddings")
    if tied is not None:
        if not isinstance(tied, bool):
            raise refuse("tie_word_embeddings", "true or false")
        out["tie_word_embeddings"] = tied
    return out


def read_shape(model: Path) -> Shape:
    """The model's shape from MODEL/config.json; the parameter count from the weight index's total_size
    where there is one (it counts what is really stored), else from the shape."""
    model = Path(model)
    config_file = model / "config.json"
    if not config_file.is_file():
        raise PlanError(f"model folder {model} has no config.json: point --model at a Hugging Face model folder")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{config_file} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"{config_file} is not a JSON object: re-download the model or fix its config.json")
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    num = check_config(cfg, config_file)
    heads = num["num_attention_heads"]
    shape = Shape(
        name=model.resolve().name, layers=num["num_hidden_layers"], hidden=num["hidden_size"],
        intermediate=num["intermediate_size"], heads=heads, kv_heads=num.get("num_key_value_heads", heads),
        head_dim=num.get("head_dim", num["hidden_size"] // heads), vocab=num["vocab_size"],
        context=num.get("max_position_embeddings", 4096), tied=num.get("tie_word_embeddings", False),
        params=0,
    )
    params = shape.embed_params + shape.layers * shape.layer_params + shape.hidden + shape.head_params
    stored = DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "").replace("torch.", ""))
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (model / index).is_file() and stored:
            try:
                total = int(json.loads((model / index).read_text())["metadata"]["total_size"])
            except (KeyError, ValueError, TypeError, OverflowError):
                break
            if total > 0:
                params = total // stored
            break
    return Shape(**{**asdict(shape), "params": params})


# ------------------------------------------------------------------------------------------ devices
@dataclass(frozen=True)
class Devices:
    """The devices a plan places work on: their kind and memory (bytes each)."""

    kind: str  # mlu, cuda, cpu
    memory: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.memory)


def visible_devices(device: str | None = None, count: int | None = None, memory: str | None = None) -> Devices:
    """The devices this process sees (``cla2.device``), or, for planning ahead, ``count`` devices of
    ``memory`` each (either may be given alone: the other is taken from what is visible)."""
    if count is not None and count < 1:
        raise PlanError(f"--devices {count}: give 1 or more devices")
    if count is not None and memory is not None:
        return Devices("mlu" if device in (None, "auto") else device, (parse_size(memory),) * count)
    from cla2.device import pick

    dev = pick(device)
    seen = tuple(int(m["total"]) for m in dev.memory())
    if memory is not None:
        seen = (parse_size(memory),) * len(seen)
    if count is not None:
        seen = (seen + (min(seen),) * count)[:count] if count > len(seen) else seen[:count]
    return Devices(dev.kind, seen)


# ------------------------------------------------------------------------------------------ inference
@dataclass
class DeviceShare:
    """One device's part of a replica, in bytes."""

    index: int
    layers: list[int]
    weights: int
    kv_cache: int
    activations: int
    reserve: int
    capacity: int  # what the plan may use of the device (USABLE_FRACTION of it)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.reserve


@dataclass
class InferencePlan:
    job: str
    model: str
    kind: str
    dtype: str
    weights_bytes: int
    devices: int
    device_memory: int  # the smallest device's memory
    devices_per_replica: int
    replicas: int
    device_groups: list[list[int]]
    context: int
    batch: int  # requests decoded together (what the job asked for, cut to what fits)
    max_batch: int  # full-context sequences whose KV cache fits
    kv_cache_bytes: int  # KV cache budget of a replica at ``batch`` x ``context``
    bytes_per_device: int  # the tightest device's estimate
    shares: list[DeviceShare]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out["shares"] = [{**asdict(s), "total": s.total} for s in self.shares]
        return out

    def summary(self) -> str:
        layers = " + ".join(str(len(s.layers)) for s in self.shares)
        tight = max(self.shares, key=lambda s: s.total / s.capacity)
        text = (f"plan: {self.job} {self.model} ({self.dtype}, {human(self.weights_bytes)} of weights) on "
                f"{self.devices} {self.kind} device(s) of {human(self.device_memory)}: {self.replicas} replica(s) of "
                f"{self.devices_per_replica} device(s) (layers {layers}), batch {self.batch} x {self.context} tokens; "
                f"{human(tight.total)} of {human(tight.capacity)} usable on the fullest device (weights "
                f"{human(tight.weights)}, KV cache {human(tight.kv_cache)}, activations {human(tight.activations)}, "
                f"reserve {human(tight.reserve)})")
        return "\n".join([text, *(f"plan: note: {n}" for n in self.notes)])


def split_layers(shape: Shape, k: int, dtype_bytes: int) -> list[list[int]]:
    """Contiguous runs of layers for k devices, balanced by bytes: the first device also holds the
    embedding, the last the final norm and the output layer, so they get fewer layers."""
    if k == 1:
        return [list(range(shape.layers))]
    layer = shape.layer_params * dtype_bytes
    extra = [shape.embed_params * dtype_bytes] + [0] * (k - 2) + [(shape.head_params + shape.hidden) * dtype_bytes]
    total = shape.layers * layer + sum(extra)
    groups: list[list[int]] = []
    i = 0
    for d in range(k):
        left_devices = k - d
        budget = (total - sum(len(g) * layer + extra[j] for j, g in enumerate(groups))) / left_devices
        n = max(0, min(round((budget - extra[d]) / layer), shape.layers - i - (left_devices - 1)))
        if d == k - 1:
            n = shape.layers - i
        groups.append(list(range(i, i + n)))
        i += n
    return groups


def _shares(shape: Shape, memory: list[int], dtype_bytes: int, kind: str, batch: int, context: int,
            scoring: bool) -> list[DeviceShare]:
    k = len(memory)
    groups = split_layers(shape, k, dtype_bytes)
    out = []
    for d, layers in enumerate(groups):
        weights = len(layers) * shape.layer_params * dtype_bytes
        if d == 0:
            weights += shape.embed_params * dtype_bytes
        if d == k - 1:
            weights += (shape.head_params + shape.hidden) * dtype_bytes
        kv = len(layers) * shape.kv_bytes_per_token(dtype_bytes) * context * batch
        # One prefill of a full-context prompt runs at a time, layer by layer: its hidden states, the
        # MLP's intermediates and (eager attention) the heads x tokens x tokens scores.
        act = (context * (4 * shape.hidden + 3 * shape.intermediate) + shape.heads * context * context) * dtype_bytes
        if scoring:  # eval reads hidden states of a whole batch of questions
            act += batch * context * shape.hidden * dtype_bytes
        if d == k - 1:  # the last position's logits of every running request, in fp32, while sampling
            act += 3 * batch * shape.vocab * 4
        out.append(DeviceShare(index=d, layers=layers, weights=weights, kv_cache=kv, activations=act,
                               reserve=INFERENCE_RESERVE.get(kind, GiB), capacity=int(memory[d] * USABLE_FRACTION)))
    return out


def _fits(shares: list[DeviceShare]) -> bool:
    return all(s.total <= s.capacity for s in shares)


def _max_batch(shape: Shape, group: list[int], dtype_bytes: int, kind: str, context: int, scoring: bool) -> int:
    """The largest batch (up to 4096) whose KV cache and logits fit beside the weights on every device of
    ``group`` (their memory): each device's need is its need at batch 0 plus a fixed amount per sequence."""
    empty = _shares(shape, group, dtype_bytes, kind, 0, context, scoring)
    one = _shares(shape, group, dtype_bytes, kind, 1, context, scoring)
    fits = [(e.capacity - e.total) // (o.total - e.total) for e, o in zip(empty, one, strict=True)
            if o.total > e.total]
    return max(0, min([4096, *fits]))


def plan_inference(job: str, shape: Shape, devices: Devices, dtype_bytes: int, dtype: str = "fp16",
                   devices_per_replica: int | None = None, batch: int | None = None,
                   context: int | None = None, group: list[int] | None = None,
                   keep_batch: bool = False) -> InferencePlan:
    """Devices per replica, replicas and the KV cache budget of an inference job (see the module doc).
    ``batch``: the batch the job asked for (None: its default), cut to what fits, or, with ``keep_batch``
    (the operator gave it), kept with a warning. ``group``: the device indices of the one replica to plan
    (``--devices``) instead of the host's replicas."""
    if group is not None:
        plan = plan_inference(job, shape, Devices(devices.kind, tuple(devices.memory[d] for d in group)), dtype_bytes,
                              dtype, devices_per_replica=len(group), batch=batch, context=context,
                              keep_batch=keep_batch)
        plan.devices, plan.replicas, plan.device_groups = devices.count, 1, [list(group)]
        return plan
    if job not in INFERENCE_JOBS:
        raise PlanError(f"{job} is not an inference job ({', '.join(INFERENCE_JOBS)})")
    context = context or shape.context
    if context < 1:
        raise PlanError(f"context {context}: give 1 token or more")
    want = batch or DEFAULT_BATCH[job]
    if want < 1:
        raise PlanError(f"batch {want}: give 1 or more")
    weights = shape.params * dtype_bytes
    memory = list(devices.memory)
    if devices_per_replica is not None:
        if not 1 <= devices_per_replica <= devices.count:
            raise PlanError(f"{devices_per_replica} devices per replica asked for, but {devices.count} device(s) "
                            "are there")
        candidates = [devices_per_replica]
    else:
        candidates = [k for k in (2**i for i in range(8)) if k <= devices.count]
    tried = []
    for k in candidates:
        group = sorted(memory)[:k]  # plan for the smallest devices: every replica must fit
        one = _shares(shape, group, dtype_bytes, devices.kind, 1, context, job == "eval")
        tried.append((k, one))
        if not _fits(one):
            continue
        # The largest batch whose KV cache (and logits) fit beside the weights, at full context.
        max_batch = _max_batch(shape, group, dtype_bytes, devices.kind, context, job == "eval")
        use = want if keep_batch else min(want, max_batch)
        shares = _shares(shape, group, dtype_bytes, devices.kind, use, context, job == "eval")
        replicas = devices.count // k
        notes = []
        if use < want:
            notes.append(f"batch cut from {want} to {use}: the KV cache of {want} sequences of {context} tokens "
                         "does not fit beside the weights (give fewer tokens of context, or more devices per replica)")
        elif use > max_batch:
            # The operator's batch overrides the plan's cut: it fits while the requests are shorter than the
            # window, and the engine fails a request cleanly when the device runs out.
            notes.append(f"batch {use} kept as given, above the {max_batch} full-context sequences whose KV "
                         "cache the plan finds room for: long requests together may run out of device memory")
        if devices.count % k:
            notes.append(f"{devices.count % k} device(s) left idle: {devices.count} is not a multiple of {k}")
        return InferencePlan(
            job=job, model=shape.name, kind=devices.kind, dtype=dtype, weights_bytes=weights, devices=devices.count,
            device_memory=min(memory), devices_per_replica=k, replicas=replicas,
            device_groups=[list(range(r * k, (r + 1) * k)) for r in range(replicas)], context=context, batch=use,
            max_batch=max_batch, kv_cache_bytes=sum(s.kv_cache for s in shares),
            bytes_per_device=max(s.total for s in shares), shares=shares, notes=notes)
    k, shares = tried[-1]
    tight = max(shares, key=lambda s: s.total - s.capacity)
    per_device = math.ceil(weights / min(memory) / USABLE_FRACTION) if memory else 0
    hint = (f"give a replica more devices (--devices with at least {max(per_device, k + 1)} of them)"
            if k < devices.count or devices_per_replica is not None else
            f"use a host with more or larger devices (this model's weights alone need {per_device} of these)")
    raise PlanError(
        f"{job} of {shape.name} does not fit: {human(weights)} of {dtype} weights, {shape.layers} layers; "
        f"with {k} device(s) per replica the fullest device needs {human(tight.total)} (weights {human(tight.weights)}, "
        f"KV cache of one {context}-token sequence {human(tight.kv_cache)}, activations {human(tight.activations)}, "
        f"reserve {human(tight.reserve)}) but has {human(tight.capacity)} usable ({USABLE_FRACTION:.0%} of "
        f"{human(min(memory))}). To fix: {hint}, a shorter context, or a 2-byte dtype (fp16/bf16) if it is fp32")


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainingPlan:
    job: str
    model: str
    kind: str
    dtype: str
    weights_bytes: int
    trainable_params: int
    world_size: int
    device_memory: int
    zero_stage: int  # 0: no DeepSpeed (DDP when world_size > 1)
    gradient_checkpointing: bool
    micro_batch: int
    gradient_accumulation_steps: int
    seq_len: int  # the longest sequence a micro-batch holds (its padded length)
    tokens_per_micro_batch: int  # micro_batch x seq_len: what the activations are budgeted for
    tokens_from: str  # where seq_len comes from: the data, --max-seq-length or --block-size
    bytes_per_device: int
    breakdown: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def deepspeed(self) -> str | None:
        """The bundled DeepSpeed config the stage means (None: no DeepSpeed)."""
        return {0: None, 2: "zero2", 3: "zero3"}[self.zero_stage]

    def to_json(self) -> dict:
        return {**asdict(self), "deepspeed": self.deepspeed}

    def summary(self) -> str:
        parts = ", ".join(f"{k} {human(v)}" for k, v in self.breakdown.items())
        how = f"ZeRO-{self.zero_stage}" if self.zero_stage else ("DDP" if self.world_size > 1 else "one process")
        text = (f"plan: {self.job} {self.model} ({self.dtype}, {human(self.weights_bytes)} of weights, "
                f"{self.trainable_params / 1e6:.1f}M trainable) on {self.world_size} rank(s), one per {self.kind} "
                f"device of {human(self.device_memory)}: {how}, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}, micro-batch {self.micro_batch} x {self.seq_len} tokens "
                f"x {self.gradient_accumulation_steps} accumulated; {human(self.bytes_per_device)} of "
                f"{human(int(self.device_memory * USABLE_FRACTION))} usable per device ({parts}); sequences of "
                f"{self.seq_len} tokens: {self.tokens_from}")
        return "\n".join([text, *(f"plan: note: {n}" for n in self.notes)])


def trainable_params(shape: Shape, lora_rank: int, lora_targets: tuple[str, ...] | list[str],
                     modules_to_save: tuple[str, ...] | list[str]) -> int:
    """LoRA's A and B of every target in every layer, plus the modules trained in full."""
    lora = sum(lora_rank * sum(shape.module_params(t)) for t in lora_targets) * shape.layers
    full = 0
    for m in modules_to_save:
        if m == "embed_tokens":
            full += shape.embed_params
        elif m == "lm_head":
            full += shape.vocab * shape.hidden
        else:
            raise PlanError(f"module to save {m!r}: the plan knows embed_tokens and lm_head")
    return lora + full


def _training_bytes(shape: Shape, world: int, dtype_bytes: int, kind: str, stage: int, checkpointing: bool,
                    micro: int, seq: int, trainable: int, largest_module: int) -> dict[str, int]:
    weights = shape.params * dtype_bytes
    t = trainable
    if stage == 0:
        # The frozen base in the training dtype, the trainable tensors in fp32 (training.py casts them),
        # their fp32 gradients (and DDP's bucket copy of them), AdamW's two moments.
        states = {"weights": weights, "trainable": 4 * t, "gradients": 4 * t * (2 if world > 1 else 1),
                  "optimizer": 8 * t}
    elif stage == 2:
        # DeepSpeed keeps the model in the training dtype; gradients, fp32 master copies and AdamW's
        # moments are partitioned over the ranks.
        states = {"weights": weights, "trainable": dtype_bytes * t, "gradients": dtype_bytes * t // world + dtype_bytes * t // 8,
                  "optimizer": 12 * t // world}
    else:
        # ZeRO-3 partitions the weights too; a layer (and the next, prefetched) is gathered while it runs.
        states = {"weights": (weights + dtype_bytes * t) // world + 2 * largest_module * dtype_bytes,
                  "gradients": dtype_bytes * t // world, "optimizer": 12 * t // world}
    act_bytes = dtype_bytes
    tokens = micro * seq
    # Per token and layer: attention and MLP inputs/outputs, q/k/v, the MLP's four intermediates, LoRA's
    # dropped-out inputs; plus the attention scores (eager attention keeps heads x tokens per token).
    per_layer = tokens * (14 * shape.hidden + 3 * shape.kv_heads * shape.head_dim + 5 * shape.intermediate) \
        + 2 * shape.heads * tokens * seq
    if checkpointing:
        layers_act = shape.layers * tokens * shape.hidden + 2 * per_layer  # inputs kept; one layer recomputed
    else:
        layers_act = shape.layers * per_layer
    # The logits in the training dtype, their fp32 copy and log-softmax for the loss, and the gradients.
    logits = tokens * shape.vocab * (2 * act_bytes + 12)
    states["activations"] = layers_act * act_bytes + logits
    states["reserve"] = TRAINING_RESERVE.get(kind, 3 * GiB // 2)
    return states


def plan_training(job: str, shape: Shape, device_memory: int, world_size: int, dtype_bytes: int,
                  dtype: str = "fp16", kind: str = "mlu", seq_len: int = 1024, batch: int = 1,
                  gradient_accumulation_steps: int = 1, lora_rank: int = 64,
                  lora_targets: tuple[str, ...] | list[str] = LORA_TARGETS,
                  modules_to_save: tuple[str, ...] | list[str] = ("embed_tokens", "lm_head"),
                  zero_stage: int | None = None, gradient_checkpointing: bool | None = None,
                  tokens_from: str | None = None) -> TrainingPlan:
    """World size, ZeRO stage, gradient checkpointing and micro-batch of a training job (see the module doc).
    ``seq_len`` is the longest sequence of a micro-batch (:func:`sequence_budget`), ``tokens_from`` where that
    number comes from; ``zero_stage`` / ``gradient_checkpointing`` fix those decisions instead of choosing them."""
    tokens_from = tokens_from or sequence_budget(job, seq_len)[1]
    if job not in TRAINING_JOBS:
        raise PlanError(f"{job} is not a training job ({', '.join(TRAINING_JOBS)})")
    if world_size < 1 or batch < 1 or seq_len < 1:
        raise PlanError(f"world size {world_size}, batch {batch}, sequence length {seq_len}: each must be 1 or more")
    if zero_stage not in (None, 0, 2, 3):
        raise PlanError(f"ZeRO stage {zero_stage}: use 0 (none), 2 or 3")
    trainable = trainable_params(shape, lora_rank, lora_targets, modules_to_save)
    largest = max(shape.layer_params, shape.embed_params)
    capacity = int(device_memory * USABLE_FRACTION)
    stages = [zero_stage] if zero_stage is not None else ([0, 2, 3] if world_size > 1 else [0])
    checkpointing = [gradient_checkpointing] if gradient_checkpointing is not None else [False, True]
    micros = []
    m = batch
    while m >= 1:
        micros.append(m)
        m //= 2
    def best_at(micro: int) -> int:
        """The least a rank needs at this micro-batch, over the stages and checkpointing tried."""
        return min(sum(_training_bytes(shape, world_size, dtype_bytes, kind, stage, gc, micro, seq_len, trainable,
                                       largest).values()) for gc in checkpointing for stage in stages)

    best = None
    for micro in micros:
        for gc in checkpointing:
            for stage in stages:
                parts = _training_bytes(shape, world_size, dtype_bytes, kind, stage, gc, micro, seq_len, trainable, largest)
                total = sum(parts.values())
                if best is None or total < best[0]:
                    best = (total, stage, gc, micro, parts)
                if total <= capacity:
                    notes = []
                    accumulation = gradient_accumulation_steps * batch // micro
                    if micro < batch:
                        notes.append(f"micro-batch cut from {batch} to {micro} to fit: {batch} sequences of {seq_len} "
                                     f"tokens need {human(best_at(batch))} per rank, above the {human(capacity)} "
                                     f"usable; gradient accumulation "
                                     f"{gradient_accumulation_steps} -> {accumulation} keeps the effective batch")
                    return TrainingPlan(
                        job=job, model=shape.name, kind=kind, dtype=dtype, weights_bytes=shape.params * dtype_bytes,
                        trainable_params=trainable, world_size=world_size, device_memory=device_memory,
                        zero_stage=stage, gradient_checkpointing=gc, micro_batch=micro,
                        gradient_accumulation_steps=accumulation, seq_len=seq_len,
                        tokens_per_micro_batch=micro * seq_len, tokens_from=tokens_from, bytes_per_device=total,
                        breakdown=parts, notes=notes)
    total, stage, gc, micro, parts = best
    detail = ", ".join(f"{k} {human(v)}" for k, v in parts.items())
    more = "" if world_size > 1 and 3 in stages else " (ZeRO-3 over more ranks partitions the weights)"
    raise PlanError(
        f"{job} of {shape.name} does not fit: {human(shape.params * dtype_bytes)} of {dtype} weights, "
        f"{trainable / 1e6:.1f}M trainable parameters; at best (ZeRO-{stage}, gradient checkpointing "
        f"{'on' if gc else 'off'}, micro-batch {micro} x {seq_len} tokens ({tokens_from}), {world_size} rank(s)) a rank needs "
        f"{human(total)} ({detail}) but a device has {human(capacity)} usable ({USABLE_FRACTION:.0%} of "
        f"{human(device_memory)}). To fix: run more ranks (devices or nodes){more}, a shorter sequence length, "
        "a smaller LoRA rank or no modules_to_save")


def sequence_budget(job: str, limit: int, longest: int | None = None, examples: int | None = None,
                    pad_multiple: int | None = None) -> tuple[int, str]:
    """The longest sequence a micro-batch of ``job`` holds, and where that number comes from.

    Pre-training packs its text into blocks of ``limit`` (--block-size) tokens: every sequence is that long.
    Instruction data is padded per batch to the batch's longest example (cla2.data.PadCollator): the longest
    batch is then the one holding the data's longest example after the template, ``longest`` (already cut at
    --max-seq-length, ``limit``), rounded up to ``pad_multiple`` as the collator rounds. Random batches and
    batches grouped by length share that worst batch (the grouped sampler even puts it first), so one bound
    serves both. Without the data (``longest`` None) every sequence is budgeted at ``limit``."""
    if job == "pretrain":
        return limit, f"--block-size {limit}: pre-training's blocks are all full"
    if longest is None:
        return limit, f"--max-seq-length {limit}, every sequence at full length (no data read)"
    padded = -(-longest // pad_multiple) * pad_multiple if pad_multiple else longest
    cut = " (cut at --max-seq-length)" if longest >= limit else ""
    pad = f", padded to {padded} (a multiple of {pad_multiple})" if padded != longest else ""
    return padded, f"the data's longest example after the template, {longest} tokens{cut}{pad}, of {examples} examples"


# ------------------------------------------------------------------------------------------ the jobs' entry
def dtype_name(torch_dtype) -> tuple[str, int]:
    """A torch dtype as the plan names it (fp32, fp16, bf16), and its size in bytes."""
    import torch

    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    return (names.get(torch_dtype, str(torch_dtype).replace("torch.", "")),
            torch.tensor([], dtype=torch_dtype).element_size())


def check_devices(devices: list[int] | None, count: int) -> list[int] | None:
    """A replica's ``--devices``: each must exist and be named once."""
    if devices is None:
        return None
    if not devices:
        raise PlanError("--devices is empty: name the device indices of the replica, e.g. --devices 0,1")
    twice = sorted({d for d in devices if devices.count(d) > 1})
    if twice:
        raise PlanError(f"--devices {','.join(map(str, devices))} names device {twice[0]} twice: name each once")
    absent = [d for d in devices if not 0 <= d < count]
    if absent:
        raise PlanError(f"--devices {','.join(map(str, devices))}: device {absent[0]} does not exist; this process "
                        f"sees {count} device(s), 0 to {count - 1} (check the visible-devices variable)")
    return list(devices)


def for_inference(job: str, model: Path, device: str | None, dtype: str | None, devices: list[int] | None,
                  batch: int | None, context: int | None = None, quiet: bool = False):
    """The plan an inference job runs by, and the devices of its replica (``--devices``, else the plan's
    first group). Raises PlanError, with the numbers, before anything is loaded."""
    from cla2.device import parse_dtype, pick

    name, size = dtype_name(parse_dtype(dtype, pick(device)))
    seen = visible_devices(device)
    plan = plan_inference(job, read_shape(model), seen, size, name, batch=batch, context=context,
                          group=check_devices(devices, seen.count), keep_batch=batch is not None)
    chosen = plan.device_groups[0]
    if not quiet:
        print(plan.summary(), file=sys.stderr)
    return plan, chosen


def data_longest(data: Path, tokenizer: Path, max_seq_length: int, system_prompt: str) -> tuple[int, int]:
    """The longest example of instruction data after the template (cut at ``max_seq_length``) and the number of
    examples, read as finetune reads them (the same checks and errors)."""
    from transformers import AutoTokenizer

    from cla2.data import instruction_dataset

    if not any((tokenizer / f).is_file() for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")):
        raise PlanError(f"--data's tokens are counted with a tokenizer, and {tokenizer} has none (no tokenizer.model, "
                        "tokenizer.json or tokenizer_config.json): pass --tokenizer DIR")
    dataset, _ = instruction_dataset(data, AutoTokenizer.from_pretrained(tokenizer), max_seq_length, system_prompt,
                                     progress=False)
    return dataset.longest, len(dataset)


# ------------------------------------------------------------------------------------------ the command
def main(
    job: Literal["serve", "chat", "generate", "eval", "finetune", "pretrain"],
    /,
    *,
    model: Path,
    devices: int | None = None,
    device_memory: str | None = None,
    device: str | None = None,
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto",
    batch_size: int | None = None,
    context: int | None = None,
    nodes: int = 1,
    lora_rank: int = 64,
    data: Path | None = None,
    tokenizer: Path | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    json: bool = False,
) -> dict:
    """Plan where JOB fits: devices per replica, replicas and KV cache (inference), or world size, ZeRO stage,
    gradient checkpointing and micro-batch (training). Exits non-zero, with the numbers, when it cannot fit.

    Args:
        job: serve, chat, generate, eval, finetune or pretrain.
        model: Model folder (config.json, and the weight index when sharded).
        devices: Devices per host to plan for (default: those visible to this process).
        device_memory: Memory of each device, e.g. 24GiB or 80GB (default: what the devices report).
        device: mlu, cuda or cpu (default: the best available; only its devices are counted).
        dtype: Weights' dtype: fp16, bf16, fp32, or auto (fp16 when planning ahead for given devices, else
            what the device would run).
        batch_size: Inference: requests decoded together (default: the job's default). Training: examples per
            device per step.
        context: Tokens per sequence (default: the model's window for inference, 1024 for training: finetune's
            --max-seq-length, pretrain's --block-size).
        nodes: Training: hosts in the run (ranks = nodes x devices).
        lora_rank: Training: LoRA rank r.
        data: Finetune: the training data (as finetune's --data). Its examples are tokenized after the template
            and each micro-batch budgeted at its longest one, as the job itself plans; without it every sequence
            is budgeted at --context tokens. Pretrain's blocks are all --context long: its data folder is
            checked as the job checks it, and not read.
        tokenizer: Tokenizer folder that counts --data's tokens (default: the model folder's).
        system_prompt: The system prompt of finetune's template (as finetune's --system-prompt).
        json: Print one JSON object instead of the summary.
    """
    import json as jsonlib

    if job not in JOBS:
        raise PlanError(f"unknown job {job!r}: use one of {', '.join(JOBS)}")
    seen = visible_devices(device, devices, device_memory)
    if dtype == "auto":
        if devices is not None and device_memory is not None or seen.kind != "cpu":
            dtype = "fp16"
        else:
            dtype = "fp32"
    shape = read_shape(model)
    size = DTYPE_BYTES[dtype]
    plan: InferencePlan | TrainingPlan
    if job in INFERENCE_JOBS:
        plan = plan_inference(job, shape, seen, size, dtype, batch=batch_size, context=context)
    else:
        if nodes < 1:
            raise PlanError(f"--nodes {nodes}: give 1 or more")
        limit = context or 1024
        longest = examples = None
        if data is not None and job == "finetune":
            longest, examples = data_longest(Path(data), Path(tokenizer or model), limit, system_prompt)
        elif data is not None:  # its blocks are all --context long: checked as the job checks it, not read
            from cla2.data import text_files

            text_files(Path(data))
        seq_len, tokens_from = sequence_budget(job, limit, longest, examples, None if seen.kind == "cpu" else 8)
        plan = plan_training(job, shape, min(seen.memory), seen.count * nodes, size, dtype, seen.kind,
                             seq_len=seq_len, batch=batch_size or 1, lora_rank=lora_rank, tokens_from=tokens_from)
    out = plan.to_json()
    print(jsonlib.dumps(out, indent=2) if json else plan.summary())
    return out
