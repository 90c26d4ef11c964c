"""What `cla2 finetune` and `cla2 pretrain` share: checks, LoRA set-up, the Trainer run and the outputs.

The jobs take their settings as groups (:mod:`cla2.settings`: ``Train``, ``Lora``) and build a dataset;
:func:`run` does the rest in four steps. :func:`prepare` checks, in this order, so that bad input fails
before anything is written: device and dtype, output folder (resume / overwrite), DeepSpeed config, model
weights, the plan, tokenizer size against the model's vocabulary, the dataset. Only then is --out created;
:func:`build` loads the model with its adapters, :func:`fit` trains, :func:`save` writes the outputs.

Outputs in --out: ``adapter_config.json`` + ``adapter_model.safetensors`` (a standard PEFT adapter),
the tokenizer, ``run.json`` (resolved arguments, versions, device, world size, data fingerprint, metrics,
base model), ``loss.png``, TensorBoard event files under ``runs/`` (transformers' own TensorBoardCallback;
a resumed run adds to the same folder) and ``checkpoint-*/`` folders (the last ``save_total_limit``) for
--resume. While it trains, the job's status file (:mod:`cla2.status`) follows step, loss and tokens/s.

Multi-device and multi-node runs are started by torchrun or the DeepSpeed launcher; every rank runs
this same code, rank 0 writes the files. Under ZeRO-3 the adapter's parameters are gathered from all
ranks before saving, so the adapter is complete (the seed's ZeRO-3 runs saved empty tensors).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cla2 import status
from cla2.compat import own_checkpoints_loadable as _own_checkpoints_loadable
from cla2.compat import training_arguments as _training_arguments
from cla2.device import Device, parse_dtype, pick
from cla2.io import (
    OutputExistsError,
    check_loadable,
    file_system,
    human,
    iso_time,
    jsonable,
    load_pretrained,
    output_lock,
    partial_dir,
    replace_final_files,
)
from cla2.io import versions as versions  # noqa: F401  (cla2.training.versions, as before)
from cla2.record import RUN_FILE, read, run_record, with_old_names, write
from cla2.settings import LORA_TARGETS as LORA_TARGETS  # cla2.training.LORA_TARGETS, as before
from cla2.settings import MODULES_TO_SAVE as MODULES_TO_SAVE
from cla2.settings import Lora, Train, flatten

CONFIGS = Path(__file__).parent / "configs"
TENSORBOARD_DIR = "runs"  # under --out, where the seed's HF Trainer scripts put it (logging_dir)
# Settings that must not change between an interrupted run and its --resume.
RESUME_KEYS = ("model", "data", "lora_rank", "lora_alpha", "lora_targets", "modules_to_save", "batch_size",
               "gradient_accumulation_steps", "max_seq_length", "block_size", "deepspeed")


class TrainingSetupError(ValueError):
    """Something about the inputs of a training run is wrong; the message says what to do."""


# ---------------------------------------------------------------------------------------- helpers
def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun, deepspeed), before any init."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def checkpoints(out: Path) -> list[Path]:
    """The checkpoint-N folders of ``out``, newest (highest N) first."""
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def last_checkpoint(out: Path) -> Path | None:
    """The checkpoint-N folder with the highest N that holds a trainer_state.json (a save that got to its end;
    :func:`checkpoint_problem` says whether its files are intact)."""
    return next((p for p in checkpoints(out) if (p / "trainer_state.json").exists()), None)


def _present(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    if path.stat().st_size == 0:
        return f"{path.name} is empty (0 bytes)"
    return None


def _json_problem(path: Path, key: str | None = None) -> str | None:
    if problem := _present(path):
        return problem
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{path.name} is not JSON (cut short?): {exc}"
    if not isinstance(data, dict) or (key is not None and key not in data):
        return f"{path.name} is not a {'JSON object' if key is None else 'record with ' + key}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """The header of a safetensors file parses and its tensors end inside the file (reads no tensor data)."""
    if problem := _present(path):
        return problem
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            return f"{path.name} is cut short or not safetensors (a header of {n} bytes, the file has {size})"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path.name}: its header is not JSON (cut short or overwritten)"
    if not isinstance(header, dict):
        return f"{path.name}: its header is not a JSON object"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return f"{path.name}: its header has a tensor without data_offsets"
    if 8 + n + end > size:
        return f"{path.name} is cut short: its tensors end at byte {8 + n + end}, the file has {size}"
    return None


def _torch_problem(path: Path) -> str | None:
    """A torch.save file: its zip central directory reads, it holds a data.pkl, and its members lie inside the
    file (reads no tensor data, runs no pickle)."""
    import zipfile

    if problem := _present(path):
        return problem
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"{path.name} is not a complete torch file (its zip directory does not read: {exc})"
    if not any(i.filename.endswith("data.pkl") for i in infos):
        return f"{path.name} is not a torch file (no data.pkl in it)"
    if any(i.header_offset + i.compress_size > size for i in infos):
        return f"{path.name} is cut short (a member ends past the file's {size} bytes)"
    return None


def checkpoint_problem(ckpt: Path, world_size: int = 1) -> str | None:
    """What is wrong with a checkpoint-N folder, or None when every file the Trainer loads to resume from it
    is there and reads at the header level: trainer_state.json parses; the adapter (adapter_config.json,
    adapter_model.safetensors or .bin), optimizer.pt, scheduler.pt and each rank's rng_state are complete (a
    safetensors header within the file; a torch zip's central directory), under DeepSpeed its global_step
    folder's files (a DeepSpeed checkpoint is told by its ``latest`` file or global_step folder). What a power
    loss leaves (an empty or cut-short file) is found here, not by torch.load."""
    ckpt = Path(ckpt)
    deepspeed = (ckpt / "latest").exists() or any(p.is_dir() for p in ckpt.glob("global_step*"))
    problems = [_json_problem(ckpt / "trainer_state.json", "global_step")]
    if problems[0] and "missing" in problems[0]:
        return f"{problems[0]} (a save cut short)"
    adapter_here = any((ckpt / f).exists() for f in ("adapter_config.json", "adapter_model.safetensors",
                                                     "adapter_model.bin"))
    if not deepspeed or adapter_here:  # DeepSpeed resumes the module from its own files
        problems.append(_json_problem(ckpt / "adapter_config.json"))
        bin_weights = ckpt / "adapter_model.bin"
        problems.append(_torch_problem(bin_weights) if bin_weights.exists() and
                        not (ckpt / "adapter_model.safetensors").exists()
                        else _safetensors_problem(ckpt / "adapter_model.safetensors"))
    if deepspeed:
        latest = ckpt / "latest"
        problems.append(_present(latest))
        if latest.is_file() and latest.stat().st_size:
            tag = ckpt / latest.read_text(errors="replace").strip()
            files = sorted(tag.glob("*.pt")) if tag.is_dir() else []
            problems.append(None if files else f"{tag.name}/ (named by latest) holds no .pt files")
            problems += [_torch_problem(f) and f"{tag.name}/{_torch_problem(f)}" for f in files]
        if (ckpt / "scheduler.pt").exists():
            problems.append(_torch_problem(ckpt / "scheduler.pt"))
    else:
        problems += [_torch_problem(ckpt / "optimizer.pt"), _torch_problem(ckpt / "scheduler.pt")]
    rng = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{i}.pth" for i in range(world_size)]
    problems += [_torch_problem(ckpt / f) for f in rng]
    if (ckpt / "scaler.pt").exists():
        problems.append(_torch_problem(ckpt / "scaler.pt"))
    found = [p for p in problems if p]
    return "; ".join(found) if found else None


def resume_checkpoint(out: Path, world_size: int = 1) -> tuple[Path | None, list[dict]]:
    """The newest intact checkpoint of ``out`` (:func:`checkpoint_problem`), and the newer ones passed over
    ({"checkpoint", "problem"}). Refuses when checkpoints were saved (they have a trainer_state.json) but none is
    intact: starting afresh would throw their training away unasked."""
    skipped = []
    for ckpt in checkpoints(out):
        problem = checkpoint_problem(ckpt, world_size)
        if problem is None:
            return ckpt, skipped
        skipped.append({"checkpoint": str(ckpt), "problem": problem})
    if last_checkpoint(out) is not None:
        listed = "; ".join(f"{Path(s['checkpoint']).name}: {s['problem']}" for s in skipped)
        raise TrainingSetupError(
            f"--resume in {out}: no intact checkpoint to resume from ({listed}). A power loss or a full disk "
            "during a save leaves files like these: remove the checkpoint-* folders to start afresh with "
            "--resume (their training is lost), or choose another --out")
    return None, skipped


def resolve_deepspeed(deepspeed: str | None) -> dict | None:
    """'zero2' / 'zero3' -> the bundled config; a path -> that JSON file; None, 'none' (or 'auto', which the
    plan resolves first) -> no DeepSpeed."""
    if not deepspeed or deepspeed in ("none", "auto"):
        return None
    if deepspeed in ("zero2", "zero3"):
        path = CONFIGS / f"ds_{deepspeed}.json"
    else:
        path = Path(deepspeed)
        if not path.is_file():
            raise TrainingSetupError(f"--deepspeed {deepspeed}: no such file; use zero2, zero3 or a JSON config file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainingSetupError(f"--deepspeed {path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    try:
        import deepspeed as _  # noqa: F401
    except ImportError:
        raise TrainingSetupError("--deepspeed needs the deepspeed package: pip install 'cla2[deepspeed]'") from None
    return config


def check_vocab(tokenizer, tokenizer_dir: Path, model_dir: Path) -> int:
    """The seed's 55296 check, generalised: the tokenizer must have exactly the model's vocabulary size."""
    config = json.loads((model_dir / "config.json").read_text())
    vocab = config.get("vocab_size")
    if vocab is None and isinstance(config.get("text_config"), dict):
        vocab = config["text_config"].get("vocab_size")
    if vocab != len(tokenizer):
        raise TrainingSetupError(
            f"tokenizer {tokenizer_dir} has {len(tokenizer)} pieces but model {model_dir} has a vocabulary of "
            f"{vocab} (config.json vocab_size): use the tokenizer the model was trained with "
            "(Chinese-LLaMA-2 / Alpaca-2 use 55296), or pass --tokenizer pointing at it"
        )
    return vocab


def check_out(out: Path, job: str, resume: bool, overwrite: bool, settings: dict,
              world_size: int = 1, skipped: list | None = None) -> Path | None:
    """Apply the resume / overwrite rules; returns the checkpoint to resume from (the newest intact one), or
    None. The newer checkpoints passed over are added to ``skipped`` ({"checkpoint", "problem"})."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder: choose another --out")
    busy = out.is_dir() and any(out.iterdir())
    ckpt = last_checkpoint(out) if resume else None  # a saved one (intact or not), for the checks below
    previous = read(out / RUN_FILE) if busy else None
    if resume and previous is not None:
        if previous.get("job") != job:
            raise TrainingSetupError(f"--out {out} holds a {previous.get('job')} run, not {job}: choose another --out")
        before = previous.get("args", {})
        changed = [k for k in RESUME_KEYS if k in settings and k in before and before[k] != settings[k]]
        if changed:
            diff = "; ".join(f"{k}: {before[k]!r} then, {settings[k]!r} now" for k in changed)
            raise TrainingSetupError(f"--resume in {out}: the run there was started with other settings ({diff}): "
                                     "repeat the original flags, or choose another --out")
        if ckpt is not None and previous.get("world_size", world_size) != world_size:
            # A checkpoint holds each rank's optimizer (ZeRO: its partition of everything) and data order.
            raise TrainingSetupError(
                f"--resume in {out}: its checkpoints were written by {previous['world_size']} rank(s), this launch "
                f"has {world_size}: resume with {previous['world_size']} ranks (devices x nodes), or choose another --out")
    if resume:
        ckpt, passed = resume_checkpoint(out, world_size)
        if skipped is not None:
            skipped += passed
    if resume and (ckpt is not None or previous is not None):
        return ckpt  # continue (or start afresh in our own folder when no checkpoint was saved yet)
    if busy and not overwrite:
        hint = "pass --resume to continue it, " if last_checkpoint(out) else ""
        raise OutputExistsError(f"output folder {out} exists and is not empty: {hint}choose another --out, "
                                "or pass --overwrite to write into it")
    return None


def plot_loss(log_history: Sequence[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def adapter_state(model, zero3: bool) -> dict[str, torch.Tensor]:
    """The trainable tensors (LoRA + modules_to_save) as full CPU tensors, gathered from all ranks under ZeRO-3.

    Collective under ZeRO-3: every rank must call it.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in named}
    return {n: p.detach().to("cpu", copy=True) for n, p in named}


def check_ranks(dev: Device) -> None:
    """One rank per device: the launcher must start as many ranks on this host as it has devices (to use
    fewer devices, make fewer visible), or ranks would share a device or leave some idle unplanned."""
    if "LOCAL_WORLD_SIZE" not in os.environ or dev.kind == "cpu":
        return
    ranks = int(os.environ["LOCAL_WORLD_SIZE"])
    if ranks != dev.count:
        env = dev.visible_devices_env
        raise TrainingSetupError(
            f"the launcher started {ranks} rank(s) on this host, but it has {dev.count} {dev.kind} device(s) "
            f"({env}={os.environ.get(env, '(unset)')}): start one rank per device (--nproc-per-node {dev.count}), "
            f"or set {env} to the {ranks} device(s) to train on")


def plan_run(job: str, model: Path, dev: Device, base_dtype: torch.dtype, world_size: int, deepspeed: str | None,
             ds_config: dict | None, gradient_checkpointing: bool | None, batch_size: int,
             gradient_accumulation_steps: int, seq_len: int, lora_rank: int, lora_targets: Sequence[str],
             modules_to_save: Sequence[str], tokens_from: str | None = None):
    """The placement plan of this rank (``cla2 plan``): the ZeRO stage when --deepspeed is auto, gradient
    checkpointing when not given, and the micro-batch that fits; refuses, with the numbers, a run that
    does not fit one device. Each rank plans alike from the same inputs, so they agree."""
    from cla2 import plan

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    memory = dev.memory()
    if dev.kind == "cpu":  # the ranks of one host share its memory
        device_memory = memory[0]["total"] // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    else:
        device_memory = memory[min(local_rank, len(memory) - 1)]["total"]
    if deepspeed == "auto":
        stage = None
    elif ds_config is None:
        stage = 0
    else:  # ZeRO-1 partitions less than ZeRO-2: plan it as 2, the nearest the plan knows
        stage = {0: 0, 1: 2, 2: 2, 3: 3}.get(int(ds_config.get("zero_optimization", {}).get("stage", 0)), 3)
    name, size = plan.dtype_name(base_dtype)
    try:
        return plan.plan_training(
            job, plan.read_shape(model), device_memory, world_size, size, name, dev.kind, seq_len=seq_len,
            batch=batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps, lora_rank=lora_rank,
            lora_targets=tuple(lora_targets), modules_to_save=tuple(modules_to_save), zero_stage=stage,
            gradient_checkpointing=gradient_checkpointing, tokens_from=tokens_from)
    except plan.PlanError as exc:
        raise TrainingSetupError(str(exc)) from None


# --------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Prepared:
    """What :func:`prepare` checked and resolved, before anything is written: all that build, fit and save
    need. ``train`` is the job's Train settings with the plan's decisions in (micro-batch, accumulation,
    gradient checkpointing)."""

    job: str
    model: Path
    out: Path
    tok_dir: Path
    tokenizer: object
    train: Train
    settings: dict
    began: float
    rank: int
    world_size: int
    dev: Device
    torch_dtype: torch.dtype
    base_dtype: torch.dtype
    on_cpu: bool
    resume_from: Path | None
    ds_config: dict | None
    placement: object
    dataset: object
    data_info: dict
    pad_id: int
    resume_skipped: list[dict] = dataclasses.field(default_factory=list)

    @property
    def zero3(self) -> bool:
        return bool(self.ds_config and self.ds_config.get("zero_optimization", {}).get("stage") == 3)


def run(*, job: str, model: Path, out: Path, tokenizer: Path | None, train: Train, lora: Lora,
        make_dataset: Callable, args: dict, seq_len: int, group_by_length: bool = True,
        callbacks: Sequence | None = None) -> dict:
    """Check everything (:func:`prepare`), load the model with its adapters (:func:`build`), train (:func:`fit`)
    and write the adapter, run.json and loss.png (:func:`save`); returns run.json's content.

    ``args`` are the job's arguments as given (its groups flattened into run.json's ``args``); ``make_dataset``
    turns the tokenizer into (dataset, description for run.json); ``seq_len`` is the longest example."""
    began = time.time()
    prep = prepare(job, Path(model), Path(out), tokenizer, train, lora, make_dataset, args, seq_len, began)
    from transformers import set_seed

    # Nothing was written so far; from here on --out is ours.
    set_seed(prep.train.seed)
    training_args, logging_dir = trainer_arguments(prep)
    peft_model = build(prep, lora)
    # run.json while it runs says outcome "running" (ended and seconds null); "succeeded" once the adapter is
    # saved, "failed" (with the error) if the run raises (cla2.record; it keeps the older names too).
    record = run_record(
        job, prep.settings, began, outcome="running", base_model=str(prep.model.resolve()),
        tokenizer=str(prep.tok_dir.resolve()), vocab_size=len(prep.tokenizer), device=prep.dev.kind,
        dtype=str(prep.torch_dtype).replace("torch.", ""), world_size=prep.world_size, deepspeed=prep.ds_config,
        data=prep.data_info, resumed_from=str(prep.resume_from) if prep.resume_from else None,
        plan=prep.placement.to_json(), tensorboard=str(logging_dir.resolve()) if "tensorboard" in training_args.report_to else None)
    record["resume_skipped"] = prep.resume_skipped
    if prep.rank == 0:
        prep.out.mkdir(parents=True, exist_ok=True)
        set_aside(prep)
        write(prep.out / RUN_FILE, record)
    from cla2.trainer import SyncCheckpoints

    sync = SyncCheckpoints()
    try:
        trainer, result, seconds = fit(prep, training_args, peft_model, logging_dir, group_by_length,
                                       [sync, *(callbacks or [])])
        return save(prep, record, trainer, result, seconds)
    except BaseException as exc:
        if prep.rank == 0:
            error = status.error_message(exc) + _disk_hint(exc, prep.out)
            drop_half_checkpoint(prep.out, sync.step, prep.world_size)  # frees what a full disk needs for run.json
            ended = time.time()
            record.update(outcome="failed", error=error, ended=iso_time(ended), seconds=round(ended - began, 2))
            with_old_names(record)
            try:
                write(prep.out / RUN_FILE, record)
            except OSError as why:
                print(f"cla2: could not record the failure in {prep.out / RUN_FILE} ({why}): {error}",
                      file=sys.stderr, flush=True)
        raise


def set_aside(prep: Prepared) -> None:
    """Move the checkpoints --resume passed over (newer than the one it resumes from, and broken) to
    ``broken-checkpoint-N``, out of the Trainer's way (its rotation counts every checkpoint-* folder, and would
    keep a broken newest one over the good ones to come), saying what was wrong with each."""
    for s in prep.resume_skipped:
        ckpt = Path(s["checkpoint"])
        aside = ckpt.with_name(f"broken-{ckpt.name}")
        if aside.exists():
            shutil.rmtree(aside)
        ckpt.rename(aside)
        s["moved_to"] = str(aside)
        then = f"resuming from {prep.resume_from}" if prep.resume_from else "starting afresh"
        print(f"cla2: warning: --resume: {ckpt} is not intact ({s['problem']}): {then} instead; the broken one "
              f"is moved to {aside} (remove it once you have looked)", file=sys.stderr, flush=True)


def drop_half_checkpoint(out: Path, step: int | None, world_size: int) -> None:
    """Remove the checkpoint of ``step`` if a failure (a full disk, a kill) cut its save short: no --resume could
    use it, and on a full disk it holds the space that run.json needs to say "failed"."""
    if step is None:
        return
    ckpt = Path(out) / f"checkpoint-{step}"
    if ckpt.is_dir() and (problem := checkpoint_problem(ckpt, world_size)) is not None:
        shutil.rmtree(ckpt, ignore_errors=True)
        print(f"cla2: removed {ckpt}, whose save was cut short ({problem})", file=sys.stderr, flush=True)


def _disk_hint(exc: BaseException, out: Path) -> str:
    """For a failure to write (ENOSPC; torch.save's "unexpected pos" on a full disk): the free space of --out."""
    text = str(exc)
    if not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) and \
            "unexpected pos" not in text and "PytorchStreamWriter failed" not in text:
        return ""
    try:
        where, fs = file_system(out)
        free = shutil.disk_usage(where).free
    except OSError:
        return ""
    return f" ({out} is on {fs}, which had {human(free)} free: free space there, then run again with --resume)"


def prepare(job: str, model: Path, out: Path, tokenizer: Path | None, train: Train, lora: Lora,
            make_dataset: Callable, args: dict, seq_len: int, began: float) -> Prepared:
    """Every check that can fail before anything is written, in this order: device and dtype, output folder
    (resume / overwrite), DeepSpeed config, model weights, tokenizer size against the model's vocabulary, LoRA
    rank and steps, then the plan and the dataset: pre-training plans first (its blocks are all --block-size
    long, and a large corpus takes long to read), fine-tuning reads its data first and budgets each micro-batch
    at the data's longest example (cla2.plan.sequence_budget)."""
    from transformers import AutoTokenizer

    rank, world_size = world()
    dev: Device = pick(train.device)
    torch_dtype = parse_dtype(train.dtype, dev)
    check_ranks(dev)
    # Where the tensors live: the CPU for --device cpu (and for a CPU-backed test double of a device). There
    # the frozen base stays in fp32 (and autocasts); accelerators hold it in the training dtype.
    on_cpu = dev.torch_device().type == "cpu"
    base_dtype = torch.float32 if on_cpu else torch_dtype
    settings = {k: jsonable(v) for k, v in flatten(args).items() if not k.startswith("_")}
    if rank == 0 and out.parent.is_dir():
        with output_lock(out):  # what a killed run of --out left beside it: cleaned (or its swap finished)
            pass
    ds_config = resolve_deepspeed(train.deepspeed)
    resume_skipped: list[dict] = []
    resume_from = check_out(out, job, train.resume, train.overwrite, settings, world_size, skipped=resume_skipped)
    check_loadable(model)  # a folder without weights, or weights transformers won't read, fail here
    if not (model / "config.json").exists():
        raise FileNotFoundError(f"model folder {model} has no config.json: point --model at a Hugging Face model folder")
    tok_dir = Path(tokenizer) if tokenizer else model
    tok = AutoTokenizer.from_pretrained(tok_dir)
    check_vocab(tok, tok_dir, model)
    if lora.lora_rank <= 0:
        raise TrainingSetupError(f"--lora-rank must be positive, got {lora.lora_rank}")
    if train.max_steps <= 0 and train.epochs <= 0:
        raise TrainingSetupError("give --max-steps N or --epochs F (> 0)")

    def placed(dataset=None):
        from cla2 import plan

        budget = plan.sequence_budget(job, seq_len or 1024, dataset.longest if dataset is not None else None,
                                      len(dataset) if dataset is not None else None, None if on_cpu else 8)
        return plan_run(job, model, dev, base_dtype, world_size, train.deepspeed, ds_config,
                        train.gradient_checkpointing, train.batch_size, train.gradient_accumulation_steps,
                        budget[0], lora.lora_rank, lora.lora_targets, lora.modules_to_save, tokens_from=budget[1])

    if job == "pretrain":
        placement = placed()
        dataset, data_info = make_dataset(tok)
    else:
        dataset, data_info = make_dataset(tok)
        placement = placed(dataset)
    if rank == 0:
        print(placement.summary(), flush=True)
    if train.deepspeed == "auto":
        ds_config = resolve_deepspeed(placement.deepspeed)
    train = dataclasses.replace(train, gradient_checkpointing=placement.gradient_checkpointing,
                                batch_size=placement.micro_batch,
                                gradient_accumulation_steps=placement.gradient_accumulation_steps)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.unk_token_id or 0)
    return Prepared(job=job, model=model, out=out, tok_dir=tok_dir, tokenizer=tok, train=train, settings=settings,
                    began=began, rank=rank, world_size=world_size, dev=dev, torch_dtype=torch_dtype,
                    base_dtype=base_dtype, on_cpu=on_cpu, resume_from=resume_from, ds_config=ds_config,
                    placement=placement, dataset=dataset, data_info=data_info, pad_id=pad_id,
                    resume_skipped=resume_skipped)


def trainer_arguments(prep: Prepared):
    """The Trainer's TrainingArguments from the resolved settings, and the TensorBoard folder. Made before
    the model loads: under ZeRO-3 they switch on the partitioned loading (zero.Init)."""
    from transformers.integrations import is_tensorboard_available

    t = prep.train
    tensorboard = is_tensorboard_available()
    if not tensorboard and prep.rank == 0:
        print("cla2: tensorboard is not installed, so no TensorBoard event files are written "
              "(pip install 'tensorboard>=2.14'); loss.png and run.json are", flush=True)
    logging_dir = prep.out / TENSORBOARD_DIR
    if prep.ds_config is not None and prep.on_cpu:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a C++ build, minutes, needing a
        # compiler in the container) when it starts; CPU runs are tests and sandboxes, gloo alone does.
        import deepspeed.ops as ds_ops

        ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
    training_args = _training_arguments(
        output_dir=str(prep.out), overwrite_output_dir=True, max_steps=t.max_steps if t.max_steps > 0 else -1,
        num_train_epochs=t.epochs if t.epochs > 0 else 1.0, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.lr, lr_scheduler_type="cosine",
        warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay, logging_steps=t.logging_steps,
        logging_first_step=True, save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        bf16=prep.torch_dtype == torch.bfloat16, fp16=prep.torch_dtype == torch.float16,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        deepspeed=prep.ds_config, use_cpu=prep.on_cpu,
        # on the CPU accelerate takes gloo itself (and refuses any other backend)
        ddp_backend=prep.dev.backend if prep.world_size > 1 and not prep.on_cpu else None,
        ddp_find_unused_parameters=False, seed=t.seed, data_seed=t.seed,
        report_to=["tensorboard"] if tensorboard else [],
        logging_dir=str(logging_dir),  # transformers < 5; 5.x reads it from the callback (see fit)
        remove_unused_columns=False, label_names=["labels"],
        dataloader_num_workers=0, save_safetensors=True, disable_tqdm=prep.rank != 0,
    )
    return training_args, logging_dir


def build(prep: Prepared, lora: Lora):
    """The base model in its dtype with the LoRA adapters (and the modules trained in full) on it."""
    from transformers import AutoModelForCausalLM

    if prep.ds_config is not None and prep.world_size > 1:
        # ZeRO-3 partitions the weights while they load (zero.Init), and reads the world size from
        # deepspeed.comm then: make sure it wraps the process group before (accelerate skips it on CPU).
        import deepspeed as ds

        ds.init_distributed(dist_backend=prep.dev.backend)
    base = load_pretrained(AutoModelForCausalLM, prep.model, prep.base_dtype)
    if prep.train.gradient_checkpointing:
        base.enable_input_require_grads()
    peft_model = _peft(base, lora.lora_rank, lora.lora_alpha, lora.lora_dropout, lora.lora_targets,
                       lora.modules_to_save)
    # Trainable tensors (LoRA, full embed_tokens / lm_head): in fp32 without DeepSpeed, as AdamW and the
    # fp16 grad scaler need; in the model's dtype under DeepSpeed, which keeps the fp32 master copies itself
    # and whose ZeRO-3 refuses a mix (peft leaves LoRA in fp32 beside fp16 copies of embed_tokens / lm_head).
    trainable_dtype = torch.float32 if prep.ds_config is None else base.dtype
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != trainable_dtype:
            p.data = p.data.to(trainable_dtype)
    if prep.rank == 0:
        peft_model.print_trainable_parameters()
    return peft_model


def fit(prep: Prepared, training_args, peft_model, logging_dir: Path, group_by_length: bool,
        callbacks: Sequence | None):
    """Train (from --resume's checkpoint if any); returns the trainer, its result and the seconds it took."""
    from transformers.integrations import TensorBoardCallback

    from cla2.data import PadCollator
    from cla2.trainer import GroupedTrainer, SaveAtEnd, StatusCallback, TokenCounter

    started = time.time()
    counter = TokenCounter(PadCollator(prep.pad_id, pad_to_multiple_of=8 if not prep.on_cpu else None))
    trainer = GroupedTrainer(model=peft_model, args=training_args, train_dataset=prep.dataset, data_collator=counter,
                             callbacks=[SaveAtEnd(), StatusCallback(counter, prep.world_size), *(callbacks or [])])
    trainer.group_by_length, trainer.sampler_seed = group_by_length, prep.train.seed
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and hasattr(cb, "logging_dir"):
            cb.logging_dir = str(logging_dir)  # transformers 5 has no TrainingArguments.logging_dir
    with _own_checkpoints_loadable(prep.resume_from):
        result = trainer.train(resume_from_checkpoint=str(prep.resume_from) if prep.resume_from else None)
    return trainer, result, time.time() - started


def save(prep: Prepared, record: dict, trainer, result, seconds: float) -> dict:
    """The adapter (gathered from all ranks under ZeRO-3), the tokenizer, run.json and loss.png (rank 0),
    replacing the final files of --out as one set; returns the completed run record."""
    # Under ZeRO-3 each rank holds only a slice of each large parameter (locally a zero-size tensor):
    # saving those as they are is the seed's empty-adapter bug. Count them, then gather.
    status.current().update("saving", force=True)
    partitioned = sum(1 for p in trainer.model.parameters() if p.requires_grad and p.numel() == 0)
    state = adapter_state(trainer.model, prep.zero3)  # collective under ZeRO-3
    if trainer.is_world_process_zero():
        empty = [n for n, t in state.items() if t.numel() == 0]
        if empty:
            raise RuntimeError(f"adapter tensors came out empty ({len(empty)}, e.g. {empty[0]}): "
                               "this is a bug, please report it with run.json")
        # The final files (adapter, tokenizer, run.json, loss.png) are written into .OUT.partial and replace
        # those of --out as one set (io.replace_final_files); checkpoints and logs stay.
        out = prep.out
        with output_lock(out):
            tmp = partial_dir(out)
            tmp.mkdir()
            try:
                trainer.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                copy_tokenizer(prep.tok_dir, tmp)
                _record_base(tmp, prep.model)
                losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
                ended = time.time()
                record.update(
                    outcome="succeeded", ended=iso_time(ended), seconds=round(ended - prep.began, 2),
                    metrics={
                        "train_loss": result.training_loss, "first_loss": losses[0] if losses else None,
                        "final_loss": losses[-1] if losses else None, "global_step": trainer.state.global_step,
                        "epoch": trainer.state.epoch, "train_runtime_s": round(seconds, 2),
                        "trainable_parameters": sum(t.numel() for t in state.values()),
                        "partitioned_tensors_gathered": partitioned,
                    },
                    log_history=trainer.state.log_history,
                )
                with_old_names(record)
                plot_loss(trainer.state.log_history, tmp / "loss.png", f"cla2 {prep.job}: {prep.model.name}")
                write(tmp / RUN_FILE, record)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            replace_final_files(tmp, out)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return record


def _peft(base, r: int, alpha: float, dropout: float, targets: Sequence[str], modules_to_save: Sequence[str]):
    from peft import LoraConfig, TaskType, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    missing = [t for t in (*targets, *modules_to_save) if t not in names]
    if missing:
        raise TrainingSetupError(f"--lora-targets / --modules-to-save name modules the model does not have: "
                                 f"{', '.join(missing)} (LLaMA has q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                 "up_proj, down_proj, embed_tokens, lm_head)")
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(targets), modules_to_save=list(modules_to_save) or None,
                        inference_mode=False)
    return get_peft_model(base, config)


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files as they are (tokenizer.model, configs), so the output matches the base."""
    import shutil

    for f in Path(src).iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "added_tokens.json")):
            shutil.copyfile(f, Path(dst) / f.name)


def _record_base(out: Path, model: Path) -> None:
    """Point adapter_config.json's base_model_name_or_path at the base folder (absolute)."""
    path = out / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(model.resolve())
    _write_json(path, config)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    tmp.replace(path)
