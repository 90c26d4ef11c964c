"""Power loss and full disks: --resume takes the newest intact checkpoint, checkpoints are fsynced, a failed save
is recorded as failed (no stray temporary file), merge and convert check the free space before writing."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from test_convert import hfl_folder
from test_merge import make_adapter

from cla2 import convert, finetune, io, merge, record, training
from cla2.training import TrainingSetupError

RECORDS = [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}。"} for i in range(4)]
FAST = dict(batch_size=2, gradient_accumulation_steps=1, lora_rank=4, lora_alpha=8, logging_steps=1, lr=1e-3,
            device="cpu")
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_small_tok, sft_data) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "sft"
    finetune.main(tiny_model_small_tok, sft_data, out, max_steps=4, save_steps=2, **FAST)
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "sft"
    shutil.copytree(finished, out)
    return out


# ------------------------------------------------------------------------------ row 10: --resume
def _truncate(path: Path, size: int = 0) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


BREAKAGES = {
    "empty optimizer.pt": (lambda c: _truncate(c / "optimizer.pt"), r"optimizer\.pt.*empty"),
    "optimizer.pt cut short": (lambda c: _truncate(c / "optimizer.pt", 1000), r"optimizer\.pt.*not a complete"),
    "no scheduler.pt": (lambda c: (c / "scheduler.pt").unlink(), r"scheduler\.pt.*missing"),
    "rng_state.pth garbage": (lambda c: (c / "rng_state.pth").write_bytes(b"x" * 100), r"rng_state\.pth"),
    "adapter cut short": (lambda c: _truncate(c / "adapter_model.safetensors", 4000),
                          r"adapter_model\.safetensors.*cut short"),
    "adapter empty": (lambda c: _truncate(c / "adapter_model.safetensors"), r"adapter_model\.safetensors.*empty"),
    "trainer_state.json half-written": (lambda c: _truncate(c / "trainer_state.json", 10),
                                        r"trainer_state\.json.*not JSON"),
    "no adapter_config.json": (lambda c: (c / "adapter_config.json").unlink(), r"adapter_config\.json.*missing"),
}


def test_an_intact_checkpoint_passes(finished):
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        assert training.checkpoint_problem(finished / ckpt) is None


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_breakage_is_named(breakage, finished, tmp_path):
    out = _copy(finished, tmp_path)
    damage, expected = BREAKAGES[breakage]
    damage(out / "checkpoint-4")
    problem = training.checkpoint_problem(out / "checkpoint-4")
    assert problem is not None
    assert re.search(expected, problem), problem
    assert training.checkpoint_problem(out / "checkpoint-2") is None


def test_resume_takes_the_intact_checkpoint_before_an_empty_optimizer(finished, tmp_path, tiny_model_small_tok,
                                                                      sft_data, capsys):
    """What a power loss leaves: checkpoint-4 has its trainer_state.json but an empty optimizer.pt. Resuming
    used to fail with a bare EOFError; now it takes checkpoint-2, says why, and trains on to step 4."""
    out = _copy(finished, tmp_path)
    _truncate(out / "checkpoint-4" / "optimizer.pt")
    capsys.readouterr()
    r = finetune.main(tiny_model_small_tok, sft_data, out, max_steps=4, save_steps=2, resume=True, **FAST)
    assert r["resumed_from"].endswith("checkpoint-2")
    assert r["metrics"]["global_step"] == 4
    err = capsys.readouterr().err
    assert "checkpoint-4" in err and "optimizer.pt" in err and "empty" in err and "checkpoint-2" in err
    assert r["resume_skipped"] and r["resume_skipped"][0]["checkpoint"].endswith("checkpoint-4")
    assert "optimizer.pt" in r["resume_skipped"][0]["problem"]
    # the broken one is moved out of the Trainer's way (its rotation counts every checkpoint-* folder), and the
    # resumed run wrote a good checkpoint-4 in its place
    moved = Path(r["resume_skipped"][0]["moved_to"])
    assert moved.parent == out and not moved.name.startswith("checkpoint-") and moved.is_dir()
    assert training.checkpoint_problem(out / "checkpoint-4") is None
    assert json.loads((out / "run.json").read_text())["outcome"] == "succeeded"


def test_resume_refuses_when_no_checkpoint_is_intact(finished, tmp_path, tiny_model_small_tok, sft_data):
    out = _copy(finished, tmp_path)
    _truncate(out / "checkpoint-4" / "optimizer.pt")
    (out / "checkpoint-2" / "scheduler.pt").unlink()
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(TrainingSetupError) as exc:
        finetune.main(tiny_model_small_tok, sft_data, out, max_steps=4, save_steps=2, resume=True, **FAST)
    msg = str(exc.value)
    assert "no intact checkpoint" in msg and "checkpoint-4" in msg and "checkpoint-2" in msg
    assert "optimizer.pt" in msg and "scheduler.pt" in msg
    assert sorted(p.name for p in out.iterdir()) == before  # refused before anything was written


def test_checkpoints_are_fsynced_once_saved(tmp_path, tiny_model_small_tok, sft_data, monkeypatch):
    synced: list[Path] = []
    real = io.fsync_path
    monkeypatch.setattr(io, "fsync_path", lambda p: (synced.append(Path(p)), real(p))[1])
    out = tmp_path / "sft"
    finetune.main(tiny_model_small_tok, sft_data, out, max_steps=2, save_steps=1, **FAST)
    for ckpt in ("checkpoint-1", "checkpoint-2"):
        files = [p for p in (out / ckpt).rglob("*") if p.is_file()]
        assert {"optimizer.pt", "adapter_model.safetensors", "trainer_state.json"} <= {p.name for p in files}
        missing = [p.name for p in files if p not in synced]
        assert not missing, f"{ckpt}: not fsynced: {missing}"
        assert out / ckpt in synced  # the folder's entries
    assert out in synced  # the checkpoint-N entries themselves


# --------------------------------------------------------------------------- row 11: a full disk
def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    path.write_text('{"outcome": "running"}')

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as exc:
        record.write(path, {"outcome": "failed"})
    assert exc.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    assert json.loads(path.read_text()) == {"outcome": "running"}


def _strays(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out.parent)) for p in out.parent.rglob(".*tmp*"))


def test_a_full_disk_while_a_checkpoint_is_saved_leaves_a_failed_record(tmp_path, tiny_model_small_tok, sft_data,
                                                                        monkeypatch):
    """The disk fills while the Trainer writes checkpoint-2's optimizer.pt: torch.save fails half-way, and so does
    any write until that half checkpoint is gone. run.json used to stay "running", beside a .run.json.tmp-PID."""
    import torch
    import transformers.trainer as hf_trainer

    out = tmp_path / "sft"
    real_save, real_fsync = torch.save, os.fsync

    def save(obj, f, *a, **kw):
        if str(f).endswith(os.path.join("checkpoint-2", "optimizer.pt")):
            Path(f).write_bytes(b"PK\x03\x04 half")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1234 vs 1200")
        return real_save(obj, f, *a, **kw)

    def fsync(fd):
        if (out / "checkpoint-2").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(hf_trainer.torch, "save", save)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        finetune.main(tiny_model_small_tok, sft_data, out, max_steps=3, save_steps=1, **FAST)
    run = json.loads((out / "run.json").read_text())
    assert run["outcome"] == "failed" and run["status"] == "failed" and run["ended"]
    assert "unexpected pos" in run["error"]
    assert _strays(out) == []
    # the half checkpoint (which no --resume could use) is removed; the complete one before it stays
    assert not (out / "checkpoint-2").exists()
    assert training.checkpoint_problem(out / "checkpoint-1") is None


def test_a_full_disk_while_the_adapter_is_saved_leaves_a_failed_record(tmp_path, tiny_model_small_tok, sft_data,
                                                                       monkeypatch):
    import peft

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", full)
    out = tmp_path / "sft"
    with pytest.raises(OSError, match="No space left"):
        finetune.main(tiny_model_small_tok, sft_data, out, max_steps=2, save_steps=10, **FAST)
    run = json.loads((out / "run.json").read_text())
    assert run["outcome"] == "failed" and "No space left on device" in run["error"]
    assert _strays(out) == [] and not (tmp_path / ".sft.partial").exists()


def _disk(free: int):
    def usage(path):
        return Usage(10 * free + (1 << 30), 0, free)

    return usage


def test_merge_refuses_up_front_when_the_output_does_not_fit(tmp_path, tiny_model, monkeypatch):
    adapter = make_adapter(tiny_model, tmp_path / "lora")
    monkeypatch.setattr(shutil, "disk_usage", _disk(100_000))
    out = tmp_path / "merged"
    with pytest.raises(OSError) as exc:
        merge.main(adapter, out, model=tiny_model)
    msg = str(exc.value)
    assert exc.value.errno == errno.ENOSPC
    assert "not enough free space" in msg and str(tmp_path) in msg and "100.0 kB" in msg and "needs" in msg
    assert not out.exists() and not any(p.name.startswith(".merged") for p in tmp_path.iterdir())
    monkeypatch.setattr(shutil, "disk_usage", _disk(1 << 40))
    assert merge.main(adapter, out, model=tiny_model) == out


def test_convert_refuses_up_front_when_the_output_does_not_fit(tmp_path, tiny_model, monkeypatch):
    model, _ = hfl_folder(tiny_model, tmp_path / "hfl", "fp16")
    monkeypatch.setattr(shutil, "disk_usage", _disk(100_000))
    out = tmp_path / "st"
    before = sorted(p.name for p in model.iterdir())
    with pytest.raises(OSError) as exc:
        convert.main(model, out)
    msg = str(exc.value)
    assert exc.value.errno == errno.ENOSPC and "not enough free space" in msg and "100.0 kB" in msg
    assert not out.exists()
    with pytest.raises(OSError, match="not enough free space"):
        convert.main(model)  # in place, beside the .bin files
    assert sorted(p.name for p in model.iterdir()) == before
    monkeypatch.setattr(shutil, "disk_usage", _disk(1 << 40))
    assert convert.main(model, out)["changed"]
