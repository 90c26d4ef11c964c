"""Training over every device of a host, scaled to the sandbox: the converge's pipeline trained SFT and PT
as 2 ranks (torchrun --standalone, gloo on the CPU) of DeepSpeed ZeRO-3 (cla2_nproc_per_node=2,
cla2_finetune_args deepspeed: zero3) into one complete adapter each; ranks killed mid-run resume from their checkpoint
when the play is run again; a rank count that cannot be right is refused before any rank starts."""

import json
import time

from test_faults import OUT, play

RUN = f"{OUT}/molecule"
CONTAINER = "cla2-runtime"


def listening_ports(host, prefix=""):
    """The TCP ports in LISTEN state (st 0A) of a network namespace, from /proc/net/tcp and tcp6: the host's,
    or with prefix `docker exec <container>` the container's."""
    out = host.check_output(f"{prefix} cat /proc/net/tcp /proc/net/tcp6")
    return {int(f[1].rsplit(":", 1)[1], 16) for f in (line.split() for line in out.splitlines()[1:])
            if len(f) > 3 and f[3] == "0A"}


def tensors(host, path):
    """name -> number of elements of every tensor of a safetensors file, read in the runtime container."""
    code = ("import json, sys; from safetensors import safe_open; f = safe_open(sys.argv[1], 'pt'); "
            "print(json.dumps({k: f.get_tensor(k).numel() for k in f.keys()}))")
    return json.loads(host.check_output(f"docker exec {CONTAINER} python3 -c \"{code}\" {path}"))


def test_deepspeed_is_in_the_runtime_image(host):
    env = json.loads(host.check_output(f"docker exec {CONTAINER} cla2 env --json"))
    assert env["deepspeed"], env
    shown = host.check_output(f"docker exec {CONTAINER} python3 -m pip show deepspeed")
    assert f"Version: {env['deepspeed']}" in shown


def test_pipeline_trained_two_ranks_of_zero3_into_one_complete_adapter(host):
    for stage in ("sft", "pt"):
        run = json.loads(host.file(f"{RUN}/{stage}/run.json").content_string)
        assert run["world_size"] == 2, run["world_size"]
        assert run["plan"]["zero_stage"] == 3 and run["plan"]["world_size"] == 2, run["plan"]
        assert run["deepspeed"]["zero_optimization"]["stage"] == 3
        done = json.loads(host.file(f"{RUN}/.done-{stage}").content_string)
        assert done["argv"][:5] == ["env", "GLOO_SOCKET_IFNAME=lo", "torchrun", "--standalone", "--nproc-per-node"]
        assert done["argv"][5:8] == ["2", "--local-addr", "127.0.0.1"]
        # One adapter (rank 0 writes it), every tensor gathered from the ZeRO-3 shards: none is empty.
        found = host.check_output(f"find {RUN}/{stage} -name 'adapter_model*' -not -path '*/checkpoint-*'").split()
        assert found == [f"{RUN}/{stage}/adapter_model.safetensors"], found
        sizes = tensors(host, found[0])
        assert any("lora_A" in k for k in sizes) and any("lora_B" in k for k in sizes), sorted(sizes)
        assert any("embed_tokens" in k for k in sizes) and any("lm_head" in k for k in sizes), sorted(sizes)
        assert all(n > 0 for n in sizes.values()), {k: n for k, n in sizes.items() if n == 0}
        # and the merge that followed used it
        assert host.file(f"{RUN}/.done-merged-{stage}").exists


def test_killed_ranks_resume_from_their_checkpoint(host):
    args = ["cla2_run=ranks-resume", "cla2_model=tiny-llama", "cla2_data=cla2-demo/sft/train.jsonl",
            "cla2_nproc_per_node=2",
            '{"cla2_finetune_args": {"deepspeed": "zero3", "max-steps": 12, "save-steps": 2, "gradient-accumulation-steps": 1}}']
    run_dir = f"{OUT}/ranks-resume/sft"
    proc = play("finetune.yml", *args, wait=False)
    try:
        for _ in range(300):  # a complete checkpoint: the Trainer writes trainer_state.json last
            if host.run(f"ls {run_dir}/checkpoint-*/trainer_state.json 2>/dev/null").stdout.strip():
                break
            time.sleep(1)
        else:
            raise AssertionError("no checkpoint appeared")
        # issue 24 row 14: torchrun's rendezvous store listens on every interface, so the ranks run in a container
        # of their own network namespace with loopback only (cla2_runtime_network_mode: none): what they listen on
        # is not on the host's interfaces.
        assert host.check_output(f"docker inspect --format '{{{{.HostConfig.NetworkMode}}}}' {CONTAINER}") == "none"
        assert host.check_output(f"docker exec {CONTAINER} ls /sys/class/net").split() == ["lo"]
        inside = listening_ports(host, f"docker exec {CONTAINER}")
        assert inside, "torchrun's store listens on no port while the ranks run"
        assert not inside & listening_ports(host), (inside, listening_ports(host))
        # Kill the ranks (torchrun's workers: python -u -m cla2), not the container: torchrun sees them die
        # and the job fails.
        pids = host.check_output(f"docker exec {CONTAINER} pgrep -f -- '-u -m cla2 finetune .*{run_dir}'").split()
        assert len(pids) == 2, pids
        host.check_output(f"docker exec {CONTAINER} kill -9 {' '.join(pids)}")
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0, out
    assert not host.file(f"{OUT}/ranks-resume/.done-sft").exists
    res = play("finetune.yml", *args)
    assert res.returncode == 0, res.stdout[-3000:]
    run = json.loads(host.file(f"{run_dir}/run.json").content_string)
    assert run["resumed_from"] and "checkpoint-" in run["resumed_from"], run["resumed_from"]
    assert run["world_size"] == 2 and run["plan"]["zero_stage"] == 3
    state = json.loads(host.check_output(f"cat $(ls -d {run_dir}/checkpoint-* | sort -V | tail -1)/trainer_state.json"))
    assert state["global_step"] == 12
    assert host.file(f"{OUT}/ranks-resume/sft.log").content_string.count("== start") == 2
    sizes = tensors(host, f"{run_dir}/adapter_model.safetensors")
    assert sizes and all(n > 0 for n in sizes.values())


def test_a_rank_count_that_cannot_be_right_is_refused_before_any_rank_starts(host):
    res = play("finetune.yml", "cla2_run=ranks-zero", "cla2_model=tiny-llama",
               "cla2_data=cla2-demo/sft/train.jsonl", "cla2_nproc_per_node=-1")
    assert res.returncode != 0
    assert "cla2_nproc_per_node=-1 rank(s), but the runtime container sees 1 cpu device(s)" in res.stdout
    assert not host.file(f"{OUT}/ranks-zero/sft.log").exists


def test_a_job_of_several_hosts_is_refused_when_the_container_is_not_on_the_host_network(host):
    # this host's runtime container is on `none`: ranks of other hosts could not reach its rendezvous store
    res = play("finetune.yml", "cla2_run=ranks-net", "cla2_model=tiny-llama",
               "cla2_data=cla2-demo/sft/train.jsonl", "cla2_multinode=true")
    assert res.returncode != 0
    assert f"needs their runtime containers on the host network (the ranks meet there), and {CONTAINER} is on " \
           "'none'. Set cla2_runtime_network_mode: host" in res.stdout, res.stdout[-3000:]
    assert not host.file(f"{OUT}/ranks-net/sft.log").exists
