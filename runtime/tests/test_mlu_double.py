"""The MLU branch of cla2, run for real through the torch_mlu TEST DOUBLE (tests/doubles/torch_mlu).

Each test runs in a subprocess that has the double on PYTHONPATH and the simulated host in its environment
(CLA2_FAKE_MLU_*, MLU_VISIBLE_DEVICES), so neither torch.mlu, the cncl backend nor the cache of
cla2.device.pick leaks into the other tests. The double keeps tensors on the CPU and says so through
torch.mlu.tensor_device, the one seam in cla2.device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DOUBLES = Path(__file__).resolve().parent / "doubles"
GIB = 1024**3
# What the parent's environment must not leak into a simulated host or a launch.
_SCRUBBED = ("MLU_VISIBLE_DEVICES", "CLA2_DEVICE", "DS_ACCELERATOR", "LOCAL_RANK", "RANK", "WORLD_SIZE",
             "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def double_env(**fake: str) -> dict:
    """This process's environment with the double first on PYTHONPATH and the given CLA2_FAKE_MLU_* etc."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith("CLA2_FAKE_MLU")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(DOUBLES), env.get("PYTHONPATH")) if p)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(fake)
    return env


def run_with_double(args: list[str], timeout: int = 120, **fake: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=double_env(**fake))


def python_json(code: str, **fake: str):
    """Run ``code`` under the double; it prints one JSON document last."""
    p = run_with_double(["-c", textwrap.dedent(code)], **fake)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("bf16, auto", [("0", "float16"), ("1", "bfloat16")])
def test_pick_chooses_mlu_through_the_double(bf16, auto):
    got = python_json("""
        import json, torch, torch_mlu
        from cla2 import device
        dev = device.pick()
        def dtype(name):
            try:
                return str(device.parse_dtype(name, dev)).replace("torch.", "")
            except device.DeviceError as e:
                return "refused: " + str(e)
        try:
            torch.zeros(1).to("mlu:0")
            stray = "moved"
        except RuntimeError as e:
            stray = str(e)
        print(json.dumps({
            "double": torch_mlu.__file__, "kind": dev.kind, "backend": dev.backend, "env": dev.visible_devices_env,
            "count": dev.count, "memory": dev.memory(), "name": dev.name(15),
            "devices": [str(dev.torch_device(i)) for i in (0, 15)], "default": str(dev.torch_device()),
            "dtypes": {n: dtype(n) for n in ("auto", "fp16", "bf16", "fp32")}, "stray": stray}))
        """, CLA2_FAKE_MLU_COUNT="16", CLA2_FAKE_MLU_MEMORY="24GiB", CLA2_FAKE_MLU_BF16=bf16, LOCAL_RANK="3")
    assert got["double"].startswith(str(DOUBLES))
    assert (got["kind"], got["backend"], got["env"], got["count"]) == ("mlu", "cncl", "MLU_VISIBLE_DEVICES", 16)
    assert got["memory"] == [{"index": i, "total": 24 * GIB, "free": 24 * GIB} for i in range(16)]
    assert got["name"] == "MLU370-X8 (test double, physical 15)"
    # The seam: the double's tensors live on the CPU, whatever the index.
    assert got["devices"] == ["cpu", "cpu"] and got["default"] == "cpu"
    assert got["dtypes"]["auto"] == auto and got["dtypes"]["fp16"] == "float16" and got["dtypes"]["fp32"] == "float32"
    if bf16 == "1":
        assert got["dtypes"]["bf16"] == "bfloat16"
    else:
        assert got["dtypes"]["bf16"] == "refused: dtype bf16 is not supported on mlu: use one of fp32, fp16"
    # Code that names "mlu" on its own, going around cla2.device, fails: no test passes by accident.
    assert "device string: mlu" in got["stray"]


def test_no_visible_mlu_falls_back_and_mlu_asked_for_fails_clearly():
    got = python_json("""
        import json, torch, torch_mlu
        from cla2 import device
        try:
            device.pick("mlu")
            err = None
        except device.DeviceError as e:
            err = str(e)
        print(json.dumps({"available": torch.mlu.is_available(), "auto": device.pick().kind, "error": err}))
        """, CLA2_FAKE_MLU_COUNT="16", MLU_VISIBLE_DEVICES="")
    assert got["available"] is False
    assert got["auto"] in ("cuda", "cpu")
    assert got["error"].startswith("--device mlu asked for, but torch_mlu is not importable or sees no MLU card")


@pytest.mark.parametrize("visible, physical", [(None, list(range(16))), ("2,3", [2, 3])])
def test_cla2_env_reports_the_simulated_host(visible, physical):
    fake = {"CLA2_FAKE_MLU_COUNT": "16", "CLA2_FAKE_MLU_MEMORY": "24GiB", "CLA2_FAKE_MLU_BF16": "0"}
    if visible is not None:
        fake["MLU_VISIBLE_DEVICES"] = visible
    p = run_with_double(["-m", "cla2", "env", "--device", "mlu", "--json"], **fake)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(p.stdout)
    assert (rep["device"], rep["backend"], rep["count"]) == ("mlu", "cncl", len(physical))
    assert rep["torch_mlu"] == "0.0.0+testdouble"
    assert [m["total"] for m in rep["memory"]] == [24 * GIB] * len(physical)
    assert [m["index"] for m in rep["memory"]] == list(range(len(physical)))
    assert rep["names"] == [f"MLU370-X8 (test double, physical {i})" for i in physical]
    assert rep["dtypes"] == {"fp32": True, "fp16": True, "bf16": False}


@pytest.mark.parametrize("host_fp16", [True, False])
@pytest.mark.parametrize("bf16", ["0", "1"])
def test_deepspeed_asks_the_simulated_device_for_its_dtypes_never_the_cpu(host_fp16, bf16):
    """DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, which the double sets) asks the host CPU for fp16
    (mkldnn: some Intel CPUs yes, AMD no) and refused ZeRO-3 in fp16 on the others ("Type fp16 is not supported
    on your device"). Under the double it answers as DeepSpeed's MLU accelerator does for the simulated card,
    whatever the CPU says; here the CPU is made to say both."""
    pytest.importorskip("deepspeed", reason="deepspeed is part of the runtime's test install (cla2[deepspeed])")
    got = python_json(f"""
        import json, torch
        torch.ops.mkldnn._is_mkldnn_fp16_supported = lambda: {host_fp16}  # what this host's CPU says
        import torch_mlu
        from deepspeed.accelerator import get_accelerator
        acc = get_accelerator()
        print(json.dumps({{"name": acc.device_name(), "fp16": acc.is_fp16_supported(), "bf16": acc.is_bf16_supported(),
                          "dtypes": sorted(str(d) for d in acc.supported_dtypes())}}))
        """, CLA2_FAKE_MLU_COUNT="2", CLA2_FAKE_MLU_BF16=bf16)
    assert got["name"] == "cpu"  # where the double's tensors are
    assert got["fp16"] is True and got["bf16"] is (bf16 == "1")
    assert got["dtypes"] == sorted(["torch.float32", "torch.float16"] + (["torch.bfloat16"] if bf16 == "1" else []))


def test_the_double_reads_the_host_as_the_driver_does():
    """MLU_VISIBLE_DEVICES selects and renumbers; sizes per device; free memory; bad input is refused."""
    got = python_json("""
        import json, torch, torch_mlu
        from torch_mlu import mlu
        from cla2 import device
        dev = device.pick("mlu")
        out = {"memory": dev.memory(), "names": [dev.name(i) for i in range(dev.count)]}
        dev.set_device(1)
        out["current"] = torch.mlu.current_device()
        try:
            torch.mlu.mem_get_info(2)
        except RuntimeError as e:
            out["beyond"] = str(e)
        phys = mlu.physical_devices({"CLA2_FAKE_MLU_COUNT": "4"})
        out["visible"] = {spec: [d["physical"] for d in mlu.visible_devices(phys, {"MLU_VISIBLE_DEVICES": spec})]
                          for spec in ("1,7,0", "2,2,3", "", "x", " 3 , 0")}
        out["all"] = len(mlu.visible_devices(phys, {}))
        out["sizes"] = [mlu.parse_size(s) for s in ("512MiB", "1.5GB", "2g", "1024")]
        out["count_from_list"] = len(mlu.physical_devices({"CLA2_FAKE_MLU_MEMORY": "1GiB,2GiB,3GiB"}))
        errors = []
        for env in ({"CLA2_FAKE_MLU_MEMORY": "24 parsecs"}, {"CLA2_FAKE_MLU_COUNT": "3", "CLA2_FAKE_MLU_MEMORY": "1G,2G"}):
            try:
                mlu.physical_devices(env)
            except ValueError as e:
                errors.append(str(e))
        out["errors"] = errors
        print(json.dumps(out))
        """, CLA2_FAKE_MLU_COUNT="4", CLA2_FAKE_MLU_MEMORY="8GiB,16GiB,24GiB,32GiB",
        CLA2_FAKE_MLU_FREE="1GiB,2GiB,3GiB,40GiB", MLU_VISIBLE_DEVICES="3,1", CLA2_FAKE_MLU_NAME="MLU370-S4")
    assert got["memory"] == [{"index": 0, "total": 32 * GIB, "free": 32 * GIB},  # free is capped at the total
                             {"index": 1, "total": 16 * GIB, "free": 2 * GIB}]
    assert got["names"] == ["MLU370-S4 (test double, physical 3)", "MLU370-S4 (test double, physical 1)"]
    assert got["current"] == 1
    assert "invalid device ordinal 2: 2 visible" in got["beyond"]
    assert got["visible"] == {"1,7,0": [1], "2,2,3": [2], "": [], "x": [], " 3 , 0": [3, 0]}
    assert got["all"] == 4
    assert got["sizes"] == [512 * 1024**2, 1_500_000_000, 2 * GIB, 1024]
    assert got["count_from_list"] == 3
    assert "cannot read the size '24 parsecs'" in got["errors"][0]
    assert "lists 2 sizes for 3 devices" in got["errors"][1]


ALL_REDUCE = """
import json, os, sys
import torch
import torch.distributed as dist
from cla2 import device

dev = device.pick()
local_rank = int(os.environ["LOCAL_RANK"])
dev.set_device(local_rank)
dist.init_process_group(backend=dev.backend)
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)], device=dev.torch_device())
dist.all_reduce(value)
current = [None] * world
dist.all_gather_object(current, torch.mlu.current_device())
dist.barrier()
record = {"kind": dev.kind, "backend": dist.get_backend(), "world": world, "sum": value.item(),
          "current": current, "tensor_device": str(value.device), "count": dev.count}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
dist.destroy_process_group()
"""


def test_torchrun_two_ranks_all_reduce_over_cncl(tmp_path):
    """Two real processes under torchrun: cla2.device picks mlu, each rank sets its device from LOCAL_RANK and
    joins a cncl process group (gloo under the double), and an all_reduce adds across them."""
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE, encoding="utf-8")
    p = run_with_double(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                         "--master-port", str(free_port()), str(script), str(tmp_path)], timeout=180,
                        CLA2_FAKE_MLU_COUNT="2", CLA2_FAKE_MLU_MEMORY="24GiB", OMP_NUM_THREADS="1")
    assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rec in records:
        assert rec == {"kind": "mlu", "backend": "cncl", "world": 2, "sum": 3.0, "current": [0, 1],
                       "tensor_device": "cpu", "count": 2}


def test_generate_runs_on_mlu_through_the_double(tiny_model_small_tok, tmp_path):
    """`cla2 generate --device mlu` end to end: the model goes where cla2.device says (the seam), in the dtype
    the double's card supports (bf16 here: torch 2.1, the MLU image's, has no fp16 matmul on the CPU that holds the
    double's tensors)."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"instruction": "你好", "id": 1}\n{"prompt": "从前有座山", "id": 2}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    p = run_with_double(["-m", "cla2", "generate", "--model", str(tiny_model_small_tok), "--input", str(src),
                         "--output", str(out), "--device", "mlu", "--max-new-tokens", "6", "--temperature", "0"],
                        CLA2_FAKE_MLU_COUNT="2", CLA2_FAKE_MLU_BF16="1")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [x["id"] for x in lines] == [1, 2]
    assert all(0 < x["completion_tokens"] <= 6 and x["prompt_tokens"] > 0 for x in lines)


def test_finetune_on_mlu_through_the_double(tiny_model_small_tok, tmp_path):
    """`cla2 finetune --device mlu`: the Trainer gets cla2.device's placement (the double's tensors live on the
    CPU), and the plan it ran by (one rank, no DeepSpeed for a tiny model) is in run.json."""
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"问题{i}", "input": "", "output": f"答案{i}" * 3},
                                         ensure_ascii=False) for i in range(4)), encoding="utf-8")
    out = tmp_path / "run"
    p = run_with_double(["-m", "cla2", "finetune", "--model", str(tiny_model_small_tok), "--data", str(data),
                         "--out", str(out), "--max-steps", "1", "--batch-size", "1", "--lora-rank", "4",
                         "--lora-alpha", "8", "--device", "mlu", "--dtype", "fp32"], timeout=300,
                        CLA2_FAKE_MLU_COUNT="2", CLA2_FAKE_MLU_BF16="0")
    # fp32: the double's tensors are on the CPU, where torch 2.1 (the MLU image's) autocasts neither fp16 nor,
    # with transformers 4.55's attention, bf16
    assert p.returncode == 0, p.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["device"] == "mlu" and run["metrics"]["global_step"] == 1
    assert run["plan"]["world_size"] == 1 and run["plan"]["zero_stage"] == 0 and run["deepspeed"] is None
    assert run["plan"]["kind"] == "mlu" and run["plan"]["device_memory"] == 24 * GIB
    assert "plan: finetune" in p.stdout
    # the adapter it wrote loads on the same device (peft would read its weights to the device it infers, "mlu",
    # which the double's CPU tensors cannot be: cla2 reads them to the CPU and merges them where the layers live)
    src = tmp_path / "in.jsonl"
    src.write_text('{"instruction": "问题1", "id": 1}\n', encoding="utf-8")
    p = run_with_double(["-m", "cla2", "generate", "--model", str(tiny_model_small_tok), "--adapter", str(out),
                         "--input", str(src), "--output", str(tmp_path / "out.jsonl"), "--device", "mlu", "--dtype",
                         "fp32", "--max-new-tokens", "4", "--temperature", "0"], CLA2_FAKE_MLU_COUNT="2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))["completion_tokens"] > 0


def test_torchrun_launches_a_rank_per_mlu_with_zero3(tiny_model_small_tok, tmp_path):
    """The launch on the MLU path: torchrun starts one rank per device, each takes its device from LOCAL_RANK,
    the ranks talk over cncl, and ZeRO-3 (as the seed runs 13B) writes one complete adapter."""
    pytest.importorskip("deepspeed", reason="deepspeed is part of the runtime's test install (cla2[deepspeed])")
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"问题{i}", "input": "", "output": f"答案{i}" * 3},
                                         ensure_ascii=False) for i in range(8)), encoding="utf-8")
    out = tmp_path / "run"
    p = run_with_double(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                         "--master-port", str(free_port()), "-m", "cla2", "finetune", "--model", str(tiny_model_small_tok),
                         "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "1",
                         "--gradient-accumulation-steps", "1", "--lora-rank", "4", "--lora-alpha", "8",
                         "--deepspeed", "zero3", "--device", "mlu"], timeout=600,
                        CLA2_FAKE_MLU_COUNT="2", CLA2_FAKE_MLU_BF16="0")
    assert p.returncode == 0, p.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["device"] == "mlu"
    assert run["plan"]["world_size"] == 2 and run["plan"]["zero_stage"] == 3
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # gathered from both ranks, not empty


@pytest.fixture(scope="module")
def split_runs(tiny_model, ceval_dir, tmp_path_factory):
    """generate, eval and chat through the double, once on --devices 0,1 (the layers split over two simulated
    MLU devices) and once on --devices 1 alone."""
    tmp = tmp_path_factory.mktemp("split")
    src = tmp / "in.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p}, ensure_ascii=False)
                             for p in ["你好", "从前有座山", "a b c", "测试一下" * 5]) + "\n", encoding="utf-8")
    runs = {}
    for devices in ("0,1", "1"):
        fake = {"CLA2_FAKE_MLU_COUNT": "2", "CLA2_FAKE_MLU_BF16": "0"}
        gen = tmp / f"gen-{devices}.jsonl"
        g = run_with_double(["-m", "cla2", "generate", "--model", str(tiny_model), "--input", str(src), "--output",
                             str(gen), "--device", "mlu", "--devices", devices, "--dtype", "fp32", "--max-new-tokens",
                             "20", "--temperature", "0"], **fake)
        assert g.returncode == 0, g.stderr[-3000:]
        ev = tmp / f"eval-{devices}"
        e = run_with_double(["-m", "cla2", "eval", "ceval", "--model", str(tiny_model), "--data", str(ceval_dir),
                             "--out", str(ev), "--subjects", "computer_network,law", "--device", "mlu", "--devices",
                             devices, "--dtype", "fp32"], **fake)
        assert e.returncode == 0, e.stderr[-3000:]
        c = subprocess.run([sys.executable, "-m", "cla2", "chat", "--model", str(tiny_model), "--device", "mlu",
                            "--devices", devices, "--dtype", "fp32", "--temperature", "0", "--max-new-tokens", "15"],
                           input="你好\n讲个故事\n", capture_output=True, text=True, timeout=120, env=double_env(**fake))
        assert c.returncode == 0, c.stderr[-3000:]
        runs[devices] = {"generate": [json.loads(x) for x in gen.read_text(encoding="utf-8").splitlines()],
                         "eval": json.loads((ev / "take0" / "summary.json").read_text()),
                         "submission": json.loads((ev / "take0" / "submission.json").read_text()),
                         "eval_run": json.loads((ev / "run.json").read_text()),
                         "chat": c.stdout, "logs": g.stderr + e.stderr + c.stderr}
    return runs


def test_a_replica_split_over_two_mlu_devices_answers_as_one_device(split_runs):
    split, one = split_runs["0,1"], split_runs["1"]
    assert [r["output"] for r in split["generate"]] == [r["output"] for r in one["generate"]]
    assert [r["completion_tokens"] for r in split["generate"]] == [r["completion_tokens"] for r in one["generate"]]
    assert split["eval"] == one["eval"] and split["submission"] == one["submission"]
    assert split["chat"] == one["chat"] and split["chat"].strip()
    plan = split["eval_run"]["plan"]
    assert plan["devices_per_replica"] == 2 and [len(s["layers"]) for s in plan["shares"]] == [1, 1]
    assert one["eval_run"]["plan"]["devices_per_replica"] == 1
    assert "1 replica(s) of 2 device(s) (layers 1 + 1)" in split["logs"]


def test_devices_that_the_host_lacks_are_refused(tiny_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "你好"}\n', encoding="utf-8")
    for devices, why in (("0,2", "device 2 does not exist; this process sees 2 device(s)"),
                         ("1,1", "names device 1 twice")):
        p = run_with_double(["-m", "cla2", "generate", "--model", str(tiny_model), "--input", str(src), "--output",
                             str(tmp_path / "out.jsonl"), "--device", "mlu", "--devices", devices],
                            CLA2_FAKE_MLU_COUNT="2")
        assert p.returncode == 2 and why in p.stderr, p.stderr[-2000:]
        assert not (tmp_path / "out.jsonl").exists()


def test_a_model_too_big_for_the_devices_is_refused_before_loading(tiny_model, tmp_path):
    """The plan reads the simulated devices' memory: a model that cannot fit them fails with the numbers."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "你好"}\n', encoding="utf-8")
    p = run_with_double(["-m", "cla2", "generate", "--model", str(tiny_model), "--input", str(src), "--output",
                         str(tmp_path / "out.jsonl"), "--device", "mlu", "--dtype", "fp32"],
                        CLA2_FAKE_MLU_COUNT="2", CLA2_FAKE_MLU_MEMORY="12MiB")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "does not fit" in p.stderr and "of fp32 weights" in p.stderr and "12 MiB" in p.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_eval_splits_its_subjects_over_the_replicas_of_the_host(tiny_model, ceval_dir, tmp_path):
    """Two simulated devices hold two replicas of the tiny model: `cla2 eval` scores its subjects in one process
    per replica, and the merged summary, predictions and report equal a one-replica run's."""
    subjects = "computer_network,law,high_school_physics,art_studies,college_chemistry"
    fake = {"CLA2_FAKE_MLU_COUNT": "2", "CLA2_FAKE_MLU_BF16": "0"}
    outs = {}
    for replicas in ("2", "1"):
        out = tmp_path / f"eval-{replicas}"
        p = run_with_double(["-m", "cla2", "eval", "ceval", "--model", str(tiny_model), "--data", str(ceval_dir),
                             "--out", str(out), "--subjects", subjects, "--device", "mlu", "--dtype", "fp32",
                             "--shots", "1", "--replicas", replicas], timeout=300, **fake)
        assert p.returncode == 0, p.stderr[-3000:]
        outs[replicas] = (out, p.stderr)
    (two, log), (one, _) = outs["2"], outs["1"]
    for f in ("take0/summary.json", "take0/submission.json"):
        assert (two / f).read_text(encoding="utf-8") == (one / f).read_text(encoding="utf-8"), f
    assert "questions over 2 replicas (devices 0; 1)" in log
    run = json.loads((two / "run.json").read_text())
    assert run["device_groups"] == [[0], [1]] and run["plan"]["replicas"] == 2
    assert json.loads((one / "run.json").read_text())["device_groups"] == [[0]]
    assert (two / "report.md").read_text(encoding="utf-8").split("- questions:")[0] == \
        (one / "report.md").read_text(encoding="utf-8").split("- questions:")[0]


def test_a_failing_replica_fails_the_eval_and_writes_nothing(tiny_model, ceval_dir, tmp_path):
    """One replica's process dies (its adapter folder is not an adapter): the eval fails with that replica's
    log, and OUT is not created."""
    bad = tmp_path / "not-an-adapter"
    bad.mkdir()
    out = tmp_path / "eval"
    p = run_with_double(["-m", "cla2", "eval", "ceval", "--model", str(tiny_model), "--data", str(ceval_dir),
                         "--out", str(out), "--subjects", "computer_network,law", "--device", "mlu", "--dtype",
                         "fp32", "--adapter", str(bad), "--replicas", "2"], timeout=300, CLA2_FAKE_MLU_COUNT="2")
    assert p.returncode == 2
    assert "the replica on devices 0 failed" in p.stderr and "has no adapter_config.json" in p.stderr
    assert not out.exists()


def test_generate_splits_its_prompts_over_the_replicas_of_the_host(tiny_model, tmp_path):
    """`cla2 generate` on a host of two simulated devices: one process per replica, the outputs joined in the
    input's order and equal to a one-replica run's, seeded sampling included (line i keeps seed + i)."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "n": i}, ensure_ascii=False) + "\n"
                           for i, p in enumerate(["你好", "从前有座山", "a b c", "测试" * 5, "hello", "龘"])), encoding="utf-8")
    fake = {"CLA2_FAKE_MLU_COUNT": "2", "CLA2_FAKE_MLU_BF16": "0"}
    outs = {}
    for replicas in ("2", "1"):
        out = tmp_path / f"out-{replicas}.jsonl"
        p = run_with_double(["-m", "cla2", "generate", "--model", str(tiny_model), "--input", str(src), "--output",
                             str(out), "--device", "mlu", "--dtype", "fp32", "--max-new-tokens", "12", "--temperature",
                             "1.0", "--seed", "7", "--replicas", replicas], timeout=300, **fake)
        assert p.returncode == 0, p.stderr[-3000:]
        outs[replicas] = ([json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()], p.stderr)
    (two, log), (one, _) = outs["2"], outs["1"]
    assert "6 prompts over 2 replicas (devices 0; 1)" in log
    assert [r["n"] for r in two] == list(range(6))
    assert [(r["output"], r["completion_tokens"]) for r in two] == [(r["output"], r["completion_tokens"]) for r in one]


def test_generate_refuses_a_bad_prompt_before_any_replica_starts(tiny_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "你好"}\n{"prompt": "' + "很长 " * 1500 + '"}\n', encoding="utf-8")
    p = run_with_double(["-m", "cla2", "generate", "--model", str(tiny_model), "--input", str(src), "--output",
                         str(tmp_path / "out.jsonl"), "--device", "mlu", "--dtype", "fp32", "--replicas", "2"],
                        CLA2_FAKE_MLU_COUNT="2")
    assert p.returncode == 2 and f"{src}, prompt 2:" in p.stderr and "context window" in p.stderr, p.stderr[-2000:]
    assert "over 2 replicas" not in p.stderr and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("ranks, devices", [(2, "4"), (3, "2")])
def test_a_launch_whose_ranks_do_not_match_the_devices_is_refused(tiny_model_small_tok, tmp_path, ranks, devices):
    """torchrun's ranks on a host must be its devices, one each: otherwise every rank refuses before loading."""
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"instruction": "问题", "output": "答案"}, ensure_ascii=False), encoding="utf-8")
    p = run_with_double(["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
                         "--master-port", str(free_port()), "-m", "cla2", "finetune", "--model", str(tiny_model_small_tok),
                         "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1", "--device", "mlu"],
                        timeout=300, CLA2_FAKE_MLU_COUNT=devices)
    assert p.returncode != 0
    assert (f"the launcher started {ranks} rank(s) on this host, but it has {devices} mlu device(s) "
            f"(MLU_VISIBLE_DEVICES=(unset)): start one rank per device (--nproc-per-node {devices})") in p.stderr
    assert not (tmp_path / "run").exists()


def test_the_plans_batch_cut_and_an_explicit_batch_that_overrides_it(tiny_model):
    """12 MiB less than the tiny model needs for 8 full-context sequences: the plan cuts the default batch; a
    batch given on the command line stands, with a warning, and the plan's bytes follow it."""
    code = """
        import json
        from cla2 import plan
        out = {}
        for batch in (None, 6):
            p, _ = plan.for_inference("generate", "MODEL", "mlu", "fp32", None, batch, quiet=True)
            out[str(batch)] = {"batch": p.batch, "max_batch": p.max_batch, "notes": p.notes, "bytes": p.bytes_per_device}
        print(json.dumps(out))
    """.replace("MODEL", str(tiny_model))
    got = python_json(code, CLA2_FAKE_MLU_COUNT="1", CLA2_FAKE_MLU_MEMORY="1200MiB")
    default, explicit = got["None"], got["6"]
    assert default["batch"] == default["max_batch"] < 6
    assert "batch cut from 8" in default["notes"][0]
    assert explicit["batch"] == 6 and "batch 6 kept as given" in explicit["notes"][-1]
    assert explicit["bytes"] > default["bytes"]
