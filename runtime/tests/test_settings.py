"""Settings as typed groups (cla2.settings): the command line flattens them into the same flags as before, each
job keeps its defaults, and Python callers may pass either the groups or their flat names."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest

from cla2 import finetune, flags, pretrain, settings
from cla2.settings import Lora, Train

SNAPSHOT = Path(__file__).with_name("flags_snapshot.json")


@pytest.mark.parametrize("job", flags.jobs())
def test_every_job_keeps_its_flags(job):
    """Name, type, default, choices, required and position of every flag, as they were before the settings
    became groups (the Ansible roles and presets build argvs from them); each still has its help."""
    before = json.loads(SNAPSHOT.read_text())[job]
    now = flags.describe(job)
    assert set(now) == set(before), set(now) ^ set(before)
    for name, f in now.items():
        assert f.pop("help"), f"--{name} of {job} lost its help"
        assert f == before[name], name


def test_each_group_field_has_help():
    for group in (settings.Train, settings.Lora, settings.InstructionData, settings.TextData, settings.Sampling):
        for name, _, help_text in settings.fields_of(group):
            assert help_text, f"{group.__name__}.{name} has no help"


def test_jobs_keep_their_own_defaults():
    assert flags.describe("finetune")["lr"]["default"] == 1e-4
    assert flags.describe("pretrain")["lr"]["default"] == 2e-4
    assert flags.describe("pretrain")["warmup-ratio"]["default"] == 0.05
    assert "group-by-length" not in flags.describe("pretrain")


def test_fold_takes_flat_names_over_the_default_or_given_group():
    folded = settings.fold(pretrain.main, {"lr": 1.0, "lora_rank": 4, "block_size": 32})
    assert folded["train"] == Train(lr=1.0, warmup_ratio=0.05)  # over pretrain's own default
    assert folded["lora"] == Lora(lora_rank=4) and folded["blocks"].block_size == 32
    folded = settings.fold(finetune.main, {"train": Train(seed=1), "max_steps": 3})
    assert folded["train"] == Train(seed=1, max_steps=3)
    assert settings.fold(finetune.main, {"model": "m"}) == {"model": "m"}


def test_flatten_gives_the_flat_args_of_run_json():
    flat = settings.flatten({"model": "m", "train": Train(), "lora": Lora()})
    assert flat["model"] == "m" and flat["lr"] == 1e-4 and flat["lora_rank"] == 64
    assert "train" not in flat and len(flat) == 1 + len(dataclasses.fields(Train)) + len(dataclasses.fields(Lora))


def test_an_unknown_flat_name_is_still_refused():
    with pytest.raises(TypeError):
        finetune.main("m", "d", "o", learning_rate=1.0)


def test_sampling_defaults_are_the_engines():
    from cla2 import engine

    assert settings.Sampling().params(0) == engine.SamplingParams()
    assert settings.Sampling(seed=5).params(3).seed == 8


def test_signature_shows_the_groups():
    params = inspect.signature(finetune.main).parameters
    assert isinstance(params["train"].default, Train) and isinstance(params["lora"].default, Lora)
