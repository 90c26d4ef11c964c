"""Settings that several jobs share, as typed groups (litgpt's ``TrainArgs`` / ``EvalArgs``).

A job's ``main`` takes a group as one parameter (``train: Train = Train()``); the command line flattens its
fields into flags of their own names (``--lr``, ``--lora-rank``), with the help written here, once, in each
field's ``help``. So every flag keeps the name, default and help it had when it was a parameter of each job,
and the run records keep their flat ``args`` (``flatten``).

A job's own defaults are the group's default instance: ``pretrain`` takes ``train: Train = Train(lr=2e-4,
warmup_ratio=0.05)``, and ``cla2 pretrain --help`` shows 2e-4.

From Python a job can be called either way: with the groups (``finetune.main(m, d, o, train=Train(lr=1e-2))``)
or with the flat names the command line uses (``finetune.main(m, d, o, lr=1e-2)``); ``grouped`` folds the
latter into the groups (``fold``), as ``cla2.cli`` does with the parsed flags.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cla2.prompts import DEFAULT_SYSTEM_PROMPT

# Defaults of the engine's sampling (cla2.engine.SamplingParams), repeated here so that reading a job's flags
# does not import torch; tests/test_settings.py checks the two agree.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9
DEFAULT_REPETITION_PENALTY = 1.1
DEFAULT_MAX_NEW_TOKENS = 512

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES_TO_SAVE = ("embed_tokens", "lm_head")


def setting(default, help: str):  # noqa: A002  (the flag's --help, as argparse calls it)
    """A group field: its default and the help of its flag."""
    return field(default=default, metadata={"help": " ".join(help.split())})


# ------------------------------------------------------------------------------------------ the groups
# One type for the device and dtype flags of every job (a training job's default is "auto", an inference
# job's None: the plan decides, which also means auto).
DeviceKind = Literal["auto", "mlu", "cuda", "cpu"]
DtypeName = Literal["auto", "fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class Train:
    """How a LoRA training job trains: steps, batch, optimizer, precision, DeepSpeed, checkpoints, device."""

    max_steps: int = setting(-1, "Optimizer steps to train; overrides --epochs when > 0.")
    epochs: float = setting(1.0, "Passes over the data (used when --max-steps is not given).")
    batch_size: int = setting(1, "Examples (finetune) or blocks (pretrain) per device per step (halved, and the "
                                 "accumulation doubled, until the plan fits it).")
    gradient_accumulation_steps: int = setting(8, "Micro-batches accumulated per optimizer step.")
    lr: float = setting(1e-4, "Peak learning rate (cosine schedule after warm-up).")
    warmup_ratio: float = setting(0.03, "Fraction of the steps spent warming the learning rate up.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    deepspeed: str | None = setting("auto", "DeepSpeed ZeRO: auto (the stage the plan picks: none, zero2 or zero3; "
                                            "see `cla2 plan`), none, zero2 or zero3 (bundled configs with \"auto\" "
                                            "fields) or a JSON config file.")
    dtype: DtypeName = setting(
        "auto", "Training precision: auto (bf16 if the device supports it, else fp16; fp32 on CPU), fp32, fp16, bf16.")
    gradient_checkpointing: bool | None = setting(
        None, "Recompute activations in the backward pass (less memory, ~30% slower; default: on when the plan "
              "needs it to fit).")
    save_steps: int = setting(200, "Save a checkpoint every N steps (and at the last step).")
    save_total_limit: int = setting(3, "Keep at most this many checkpoint-* folders.")
    logging_steps: int = setting(10, "Log the loss every N steps.")
    resume: bool = setting(False, "Continue from the last checkpoint-* in OUT; a fresh start when there is none.")
    overwrite: bool = setting(False, "Write into a non-empty OUT.")
    device: DeviceKind = setting(
        "auto", "Device kind: auto (mlu, then cuda, then cpu), mlu, cuda or cpu.")
    seed: int = setting(42, "Random seed (LoRA init, data order, dropout).")


@dataclass(frozen=True)
class Lora:
    """Which modules get LoRA adapters, of what size, and which are trained in full beside them."""

    lora_rank: int = setting(64, "LoRA rank r.")
    lora_alpha: float = setting(128.0, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = setting(0.05, "Dropout on the LoRA input.")
    lora_targets: tuple[str, ...] = setting(LORA_TARGETS, "Module names that get LoRA adapters.")
    modules_to_save: tuple[str, ...] = setting(
        MODULES_TO_SAVE, "Modules trained and saved in full (the extended vocabulary's embed_tokens, lm_head). "
                         "Give an empty value to train LoRA only.")


@dataclass(frozen=True)
class InstructionData:
    """How `cla2 finetune` turns Alpaca-format records into training examples."""

    max_seq_length: int = setting(1024, "Examples are cut to this many tokens.")
    system_prompt: str = setting(DEFAULT_SYSTEM_PROMPT, "System prompt put into the template.")
    group_by_length: bool = setting(True, "Batch examples of similar length together (far less padding); "
                                          "--no-group-by-length draws random batches.")


@dataclass(frozen=True)
class TextData:
    """How `cla2 pretrain` turns raw text into training blocks."""

    block_size: int = setting(1024, "Tokens per training block.")
    cache_dir: Path | None = setting(None, "Where tokenized blocks are cached (default $CLA2_CACHE or ~/.cache/cla2).")


@dataclass(frozen=True)
class Placement:
    """Where an inference job (chat, generate, serve, eval) loads the model: the device kind, the devices of
    its replica and the dtype. Unset, each is decided by the plan (`cla2 plan`)."""

    device: DeviceKind | None = setting(None, "mlu, cuda or cpu (default: the best available).")
    devices: list[int] | None = setting(
        None, "Device indices of this replica, e.g. 0,1: the layers are spread over them (default: the plan's "
              "first group, as few devices as the model fits on; see `cla2 plan`).")
    dtype: DtypeName | None = setting(None, "fp32, fp16, bf16 or auto.")


@dataclass(frozen=True)
class Sampling:
    """How the engine picks the next token, for the answers of `cla2 chat` and `cla2 generate`."""

    temperature: float = setting(DEFAULT_TEMPERATURE, "Sampling temperature; 0 is greedy.")
    top_k: int = setting(DEFAULT_TOP_K, "Sample among the k most likely tokens (0: all).")
    top_p: float = setting(DEFAULT_TOP_P, "Nucleus sampling threshold.")
    repetition_penalty: float = setting(DEFAULT_REPETITION_PENALTY, "Penalty for tokens already seen (1: none).")
    max_new_tokens: int = setting(DEFAULT_MAX_NEW_TOKENS, "Most tokens generated per answer.")
    seed: int | None = setting(None, "Random seed; answer i (the i-th line of a file, the i-th turn of a chat) "
                                     "uses seed + i, so a rerun gives the same outputs.")

    def params(self, i: int = 0):
        """The engine's SamplingParams of answer ``i``."""
        from cla2.engine import SamplingParams

        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
                              seed=None if self.seed is None else self.seed + i)


# ----------------------------------------------------------------------------- groups <-> flat names
def is_group(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def groups_of(fn) -> dict[str, type]:
    """{parameter name: group class} of ``fn``'s parameters that are groups."""
    hints = typing.get_type_hints(inspect.unwrap(fn))
    return {n: hints[n] for n in inspect.signature(fn).parameters if is_group(hints.get(n))}


def fields_of(group: type) -> list[tuple[str, object, str]]:
    """(name, type, help) of each field of a group class, in order."""
    hints = typing.get_type_hints(group)
    return [(f.name, hints[f.name], f.metadata.get("help", "")) for f in dataclasses.fields(group)]


def fold(fn, kwargs: dict) -> dict:
    """``kwargs`` with the flat names of ``fn``'s group fields (lr=..., lora_rank=...) folded into the groups
    (train=Train(lr=...)): over the group given in ``kwargs``, else over the parameter's default."""
    kwargs = dict(kwargs)
    params = inspect.signature(fn).parameters
    for name, group in groups_of(fn).items():
        picked = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(group) if f.name in kwargs}
        if picked:
            base = kwargs.get(name, params[name].default)
            if base is inspect.Parameter.empty:
                base = group()
            kwargs[name] = dataclasses.replace(base, **picked)
    return kwargs


def flatten(args: dict) -> dict:
    """A job's arguments with each group replaced by its fields: the flat {flag name: value} of run.json."""
    flat: dict = {}
    for k, v in args.items():
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            flat.update({f.name: getattr(v, f.name) for f in dataclasses.fields(v)})
        else:
            flat[k] = v
    return flat


def grouped(fn):
    """Decorate a job's ``main`` whose settings come in groups: it also accepts the groups' fields by their
    flat names, as keyword arguments (see ``fold``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **fold(wrapper, kwargs))

    return wrapper
