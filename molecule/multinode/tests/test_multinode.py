"""Verify the multinode scenario: both ranks trained one model."""

import json

import testinfra

RUN = "/data/outputs/multinode/sft"


def hosts():
    return [testinfra.get_host(f"docker://{name}") for name in ("cla2-mn-1", "cla2-mn-2")]


def test_one_adapter_trained_by_two_ranks():
    first, second = hosts()
    run = json.loads(first.file(f"{RUN}/run.json").content_string)
    assert run["world_size"] == 2
    assert first.file(f"{RUN}/adapter_model.safetensors").size > 0
    assert json.loads(first.file(f"{RUN}/adapter_config.json").content_string)["r"] > 0
    # Rank 1 trained (its log shows it joined) but saved no second adapter.
    assert not second.file(f"{RUN}/adapter_model.safetensors").exists
    log2 = second.file("/data/outputs/multinode/sft.log").content_string
    assert "torchrun" in log2


def test_both_hosts_marked_the_stage_finished():
    for h in hosts():
        assert h.file("/data/outputs/multinode/.done-sft").exists
