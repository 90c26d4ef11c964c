"""The kit's presets are the seed's 13B training scripts, flag for flag (roles/cla2/files/presets/).

The seed runs Cambricon's CambriconKnight/dev-env-ubuntu pytorch1.9/chinese-llama-alpaca-2/tools/
run_finetuning_13b.sh and run_pretraining_13b.sh. CI cannot reach GitHub, and that repository carries no
licence, so the kit does not copy the scripts: tests/fixtures/seed/<script>.yml transcribes each one's shell
variables and its launch (launcher, script, arguments), token for token as written, with the repository,
path, commit and sha256 of the file it was read from (tests/fixtures/seed/README.md).

This test reads a transcription, resolves the ${vars} of its arguments, parses them into the seed's flags
and checks the preset against them:

- every seed flag is exactly one of: mapped to a cla2 flag (MAPPED), cla2's fixed behaviour with the
  seed's value (FIXED), a path or launch setting the job layer makes (PLAYBOOK), or not expressible with a
  cla2 flag (NOT_EXPRESSIBLE, each listed in the preset's comment);
- every mapped seed value equals the preset's;
- every preset key comes from a mapped seed flag, or from CLA2_ONLY (a cla2 default that departs from what
  the seed's Trainer does when the script passes nothing).

With CLA2_SEED_SCRIPTS=<folder holding the two .sh files> (from a clone of the repository at the commit
named), the transcriptions are checked against the scripts themselves: same sha256, and the parser below
reads the same variables and launch out of them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "seed"
PRESETS = ROOT / "roles" / "cla2" / "files" / "presets"

SCRIPTS = {  # script -> (preset, cla2 job)
    "run_finetuning_13b.sh": ("seed-13b-sft", "finetune"),
    "run_pretraining_13b.sh": ("seed-13b-pt", "pretrain"),
}


# --- reading a script ------------------------------------------------------------------------------

def parse_script(text: str) -> dict:
    """The shell variables a script assigns (in order, the value's words unquoted, `$(...)` kept as written)
    and its launch: the tokens before the training script (launcher), the script, and its arguments."""
    text = text.replace("\\\n", " ")
    variables: dict[str, str] = {}
    launch = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(?:export\s+)?([A-Za-z_]\w*)=(.*)$", line)
        if m:
            value = m.group(2).strip()
            variables[m.group(1)] = value if value.startswith("$(") else " ".join(shlex.split(value))
            continue
        tokens = shlex.split(line)
        if tokens and tokens[0] in ("python", "python3", "torchrun") and any(t.endswith(".py") for t in tokens):
            assert launch is None, "two launches in one script"
            i = next(i for i, t in enumerate(tokens) if t.endswith(".py"))
            launch = {"launcher": tokens[:i], "script": tokens[i], "arguments": tokens[i + 1:]}
    assert launch, "no python/torchrun launch of a training script found"
    return {"variables": variables, **launch}


def resolve(token: str, variables: dict[str, str]) -> str:
    """${name}, ${name:-default} and $name from the script's variables; a name the script does not set
    (env.sh's paths, $RANDOM) stays as written. In `PORT=${PORT:-29501}` the PORT on the right is the
    environment's (unset here: the default)."""
    def sub(m: re.Match) -> str:
        name, default = m.group(1) or m.group(3), m.group(2)
        if name in variables:
            return resolve(variables[name], {k: v for k, v in variables.items() if k != name})
        return default if default is not None else m.group(0)
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", sub, token)


def flags(arguments: list[str], variables: dict[str, str]) -> dict[str, object]:
    """--name value / --name=value / --name (a switch: True), in order, values resolved."""
    out: dict[str, object] = {}
    i = 0
    while i < len(arguments):
        token = arguments[i]
        assert token.startswith("--"), f"a value without its flag: {token!r}"
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(arguments) and not arguments[i + 1].startswith("--"):
                value = arguments[i + 1]
                i += 1
            else:
                value = True
        assert name not in out, f"--{name} given twice"
        out[name] = resolve(value, variables) if isinstance(value, str) else value
        i += 1
    return out


def transcription(script: str) -> dict:
    return yaml.safe_load((FIXTURES / script.replace(".sh", ".yml")).read_text(encoding="utf-8"))


# --- the seed's flags and cla2's ---------------------------------------------------------------------

def _bool(value) -> bool:
    assert value is True or value in ("True", "False"), value
    return value is True or value == "True"


def _words(value: str) -> list[str]:
    return value.split(",")


TORCH_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
DEEPSPEED = {"ds_zero3_no_offload.json": "zero3", "ds_zero2_no_offload.json": "zero2"}

# seed flag -> (cla2 flag, the seed's value as cla2's). Two seed flags may give one cla2 flag (--fp16 and
# --torch_dtype float16 are both dtype: fp16): both must agree with the preset.
MAPPED = {
    "learning_rate": ("lr", float),
    "lora_rank": ("lora-rank", int),
    "lora_alpha": ("lora-alpha", float),
    "lora_dropout": ("lora-dropout", float),
    "trainable": ("lora-targets", _words),
    "modules_to_save": ("modules-to-save", _words),
    "per_device_train_batch_size": ("batch-size", int),
    "gradient_accumulation_steps": ("gradient-accumulation-steps", int),
    "num_train_epochs": ("epochs", float),
    "max_seq_length": ("max-seq-length", int),
    "block_size": ("block-size", int),
    "fp16": ("dtype", lambda v: "fp16" if _bool(v) else None),
    "torch_dtype": ("dtype", TORCH_DTYPE.__getitem__),
    "warmup_ratio": ("warmup-ratio", float),
    "weight_decay": ("weight-decay", float),
    "logging_steps": ("logging-steps", int),
    "save_total_limit": ("save-total-limit", int),
    "deepspeed": ("deepspeed", DEEPSPEED.__getitem__),
    "gradient_checkpointing": ("gradient-checkpointing", _bool),
}

# cla2 has no flag for these; what it always does is the seed's value.
FIXED = {
    "do_train": True,  # cla2 finetune / pretrain train
    "lr_scheduler_type": "cosine",  # cla2's schedule: cosine after warm-up (training.py)
    "zero3_enabled": "True",  # the fork's switch for ZeRO-3, which --deepspeed zero3 is in cla2
    "evaluation_strategy": "no",  # cla2 evaluates nothing while training
    "logging_strategy": "steps",  # cla2 logs every logging-steps (only where the seed does too)
}

# Paths and the launch: the job layer sets them (cla2_model, cla2_data, cla2_run, --resume, torchrun with one
# rank per device), never a preset.
PLAYBOOK = {"model_name_or_path", "tokenizer_name_or_path", "dataset_dir", "output_dir", "overwrite_output_dir",
            "data_cache_dir"}

# No cla2 flag says these; each preset's comment names every one of its script's (checked below).
NOT_EXPRESSIBLE = {
    "finetune": {
        "save_strategy",  # epoch: a checkpoint per epoch; cla2 saves every save-steps
        "save_steps",  # ignored by the seed's Trainer under --save_strategy epoch
        "do_eval",  # a final evaluation on the validation file; cla2 finetune has none
        "validation_file", "validation_split_percentage", "per_device_eval_batch_size",  # ... its data
        "eval_steps",  # ignored under --evaluation_strategy no
        "seed",  # $RANDOM; cla2's is fixed (42), so that a run can be repeated
        "preprocessing_num_workers", "ddp_timeout", "logging_first_step", "ddp_find_unused_parameters",
    },
    "pretrain": {
        "save_strategy", "save_steps",
        "logging_strategy",  # epoch: a log entry per epoch; cla2 logs every logging-steps
        "logging_steps",  # ignored under --logging_strategy epoch
        "validation_split_percentage", "per_device_eval_batch_size",  # no --do_eval: unused
        "seed", "preprocessing_num_workers", "ddp_timeout", "logging_first_step", "ddp_find_unused_parameters",
    },
}

# Preset keys that no seed flag gives: where cla2's default departs from what the seed's Hugging Face
# Trainer does when the script passes nothing, the preset sets the seed's behaviour.
CLA2_ONLY = {
    "finetune": {
        "group-by-length": False,  # TrainingArguments.group_by_length defaults to False; cla2's to True
    },
    "pretrain": {},
}


def classify(job: str, seed: dict[str, object]) -> dict[str, set[str]]:
    not_expressible = NOT_EXPRESSIBLE[job]
    kinds = {"mapped": set(), "fixed": set(), "playbook": set(), "not expressible": set(), "unknown": set()}
    for name in seed:
        if name in not_expressible:
            kinds["not expressible"].add(name)
        elif name in MAPPED:
            kinds["mapped"].add(name)
        elif name in FIXED:
            kinds["fixed"].add(name)
        elif name in PLAYBOOK:
            kinds["playbook"].add(name)
        else:
            kinds["unknown"].add(name)
    return kinds


@pytest.fixture(params=sorted(SCRIPTS))
def seed(request):
    script = request.param
    preset_name, job = SCRIPTS[script]
    t = transcription(script)
    preset_file = PRESETS / f"{preset_name}.yml"
    preset = yaml.safe_load(preset_file.read_text(encoding="utf-8"))
    assert list(preset) == [job], f"{preset_name} holds flags of {job} only"
    return {"script": script, "job": job, "transcription": t, "flags": flags(t["arguments"], t["variables"]),
            "preset": preset[job], "preset_text": preset_file.read_text(encoding="utf-8")}


def test_every_seed_flag_is_mapped_fixed_set_by_the_playbook_or_documented(seed):
    kinds = classify(seed["job"], seed["flags"])
    assert not kinds["unknown"], f"{seed['script']}: flags this test does not place: {sorted(kinds['unknown'])}"
    # the documented list is exact: nothing in it the script does not pass
    assert NOT_EXPRESSIBLE[seed["job"]] == kinds["not expressible"]


def test_every_mapped_seed_value_is_the_preset_s(seed):
    expected: dict[str, object] = {}
    for name in classify(seed["job"], seed["flags"])["mapped"]:
        key, convert = MAPPED[name]
        value = convert(seed["flags"][name])
        assert expected.setdefault(key, value) == value, f"--{name} disagrees with another seed flag on {key}"
        assert key in seed["preset"], f"{seed['script']} --{name} {seed['flags'][name]}: the preset has no {key}"
        got = seed["preset"][key]
        assert type(got) is type(value) or isinstance(value, float) and isinstance(got, int), (key, got, value)
        assert got == value, f"{seed['script']} --{name} {seed['flags'][name]} is {key}: {value!r}, preset: {got!r}"


def test_every_preset_key_comes_from_the_seed(seed):
    from_seed = {MAPPED[n][0] for n in classify(seed["job"], seed["flags"])["mapped"]}
    extra = set(seed["preset"]) - from_seed
    assert extra == set(CLA2_ONLY[seed["job"]]), f"preset keys no seed flag gives: {sorted(extra)}"
    for key, value in CLA2_ONLY[seed["job"]].items():
        assert seed["preset"][key] == value


def test_cla2_s_fixed_behaviour_is_the_seed_s_value(seed):
    for name in classify(seed["job"], seed["flags"])["fixed"]:
        assert seed["flags"][name] == FIXED[name], f"--{name} {seed['flags'][name]}: cla2 always does {FIXED[name]}"
    # ZeRO-3 in both of the seed's switches, and in the preset
    assert seed["flags"]["zero3_enabled"] == "True" and seed["preset"]["deepspeed"] == "zero3"


def test_the_paths_and_the_launch_are_the_job_layer_s(seed):
    f, v = seed["flags"], seed["transcription"]["variables"]
    # the tokenizer is the model's (cla2's default when --tokenizer is not given)
    assert f["tokenizer_name_or_path"] == f["model_name_or_path"]
    # the model trained is the stock model (env.sh: chinese_alpaca_2_model_to_train_13b, a copy of
    # chinese-alpaca-2-13b), for PT too: the pipeline's default cla2_pt_base is stock
    assert f["model_name_or_path"] == "${chinese_alpaca_2_model_to_train_13b}"
    defaults = yaml.safe_load((ROOT / "roles" / "cla2" / "defaults" / "main.yml").read_text())
    assert defaults["cla2_pt_base"] == "stock"
    # one rank per device of the 16 the script makes visible: the job layer's default (cla2_nproc_per_node: 0)
    launcher = seed["transcription"]["launcher"]
    assert launcher[:3] == ["python", "-m", "torch.distributed.launch"]
    assert "--nproc_per_node=$DEVICES_NUMS" in launcher
    assert v["DEVICES_NUMS"].startswith("$(echo $MLU_VISIBLE_DEVICES")  # counts the devices
    assert len(v["MLU_VISIBLE_DEVICES"].split(",")) == 16
    assert defaults["cla2_nproc_per_node"] == 0


def test_the_preset_s_comment_names_what_cannot_be_expressed(seed):
    comment = "\n".join(line for line in seed["preset_text"].splitlines() if line.startswith("#"))
    for name in NOT_EXPRESSIBLE[seed["job"]]:
        assert f"--{name}" in comment, f"{seed['script']}: --{name} is not expressible; say so in the preset"
    t = seed["transcription"]["source"]
    assert t["path"].endswith(seed["script"]) and t["commit"][:7] in comment


# --- the parser, and the transcriptions against the scripts ----------------------------------------

def test_the_parser_reads_a_launch_and_resolves_variables():
    text = ('lr=1e-4\nmods="a,b"\nexport N=$(echo $X | wc -l)\nPORT=${PORT:-29501}\n# x=1\n'
            'python -m torch.distributed.launch --nproc_per_node=$N \\\n    run.py \\\n        --lr ${lr} \\\n'
            '        --fp16 \\\n        --mods ${mods} --port $PORT --out ${elsewhere} --seed $RANDOM\n')
    parsed = parse_script(text)
    assert parsed["variables"] == {"lr": "1e-4", "mods": "a,b", "N": "$(echo $X | wc -l)", "PORT": "${PORT:-29501}"}
    assert parsed["launcher"] == ["python", "-m", "torch.distributed.launch", "--nproc_per_node=$N"]
    assert flags(parsed["arguments"], parsed["variables"]) == {
        "lr": "1e-4", "fp16": True, "mods": "a,b", "port": "29501", "out": "${elsewhere}", "seed": "$RANDOM"}


@pytest.mark.skipif(not os.environ.get("CLA2_SEED_SCRIPTS"),
                    reason="CLA2_SEED_SCRIPTS=<folder with the seed's scripts> checks the transcriptions")
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_the_transcription_is_the_script(script):
    path = Path(os.environ["CLA2_SEED_SCRIPTS"]) / script
    t = transcription(script)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == t["source"]["sha256"], (
        f"{path} is not {t['source']['repo']} {t['source']['path']} at {t['source']['commit']}")
    assert parse_script(path.read_text(encoding="utf-8")) == {k: t[k] for k in ("variables", "launcher", "script",
                                                                                  "arguments")}
