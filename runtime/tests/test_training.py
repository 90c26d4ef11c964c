"""The training / merge commands' help, and the pieces of training.py that need no run."""

from __future__ import annotations

import inspect
import json

import docstring_parser
import pytest

from cla2 import cli, finetune, merge, pretrain, settings, training


@pytest.mark.parametrize("module", [finetune, pretrain, merge])
def test_every_flag_is_documented(module, capsys):
    """Each parameter is documented in the docstring (a settings group once, as a whole; its fields each in
    cla2.settings), and every flag shows in --help."""
    doc = docstring_parser.parse(module.main.__doc__)
    documented = {p.arg_name for p in doc.params if p.description}
    params = {n for n in inspect.signature(module.main).parameters if not n.startswith("_")}
    assert params == documented, params ^ documented
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_function_arguments(parser, module.main)
    text = parser.format_help()
    groups = settings.groups_of(module.main)
    names = [n for n in params if n not in groups]
    names += [f for g in groups.values() for f, _, _ in settings.fields_of(g)]
    for name in names:
        assert "--" + name.replace("_", "-") in text


def _flag_defaults(module) -> dict:
    """{flag: default} of a job, its groups flattened."""
    params = inspect.signature(module.main).parameters
    return settings.flatten({n: p.default for n, p in params.items()})


def test_contract_flags_exist():
    flags = _flag_defaults(finetune)
    for name in ("model", "data", "out", "max_steps", "epochs", "batch_size", "gradient_accumulation_steps", "lr",
                 "max_seq_length", "deepspeed", "dtype", "gradient_checkpointing", "save_steps", "resume",
                 "overwrite", "device", "seed", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
                 "modules_to_save"):
        assert name in flags, name
    assert {"block_size", "resume", "overwrite"} <= set(_flag_defaults(pretrain))
    assert {"adapter", "model", "out", "dtype", "shard_size", "overwrite"} <= set(inspect.signature(merge.main).parameters)
    assert flags["lora_rank"] == 64 and flags["lora_alpha"] == 128 and flags["lora_dropout"] == 0.05
    assert flags["lr"] == 1e-4 and flags["warmup_ratio"] == 0.03
    assert _flag_defaults(pretrain)["lr"] == 2e-4
    assert _flag_defaults(pretrain)["block_size"] == 1024


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_bundled_deepspeed_configs_leave_batch_and_precision_to_the_trainer(name):
    cfg = json.loads((training.CONFIGS / f"ds_{name}.json").read_text())
    assert cfg["zero_optimization"]["stage"] == int(name[-1])
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert cfg[key] == "auto"
    assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
    if name == "zero3":
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_flag_errors(tmp_path):
    with pytest.raises(training.TrainingSetupError, match="no such file"):
        training.resolve_deepspeed(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(training.TrainingSetupError, match="malformed JSON"):
        training.resolve_deepspeed(str(tmp_path / "bad.json"))
    assert training.resolve_deepspeed(None) is None


def test_last_checkpoint_ignores_incomplete_saves(tmp_path):
    for n in (2, 10, 4):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # a save cut short: no trainer_state.json
    assert training.last_checkpoint(tmp_path).name == "checkpoint-10"
