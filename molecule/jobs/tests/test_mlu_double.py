"""The MLU branch of cla2 in the sandbox's runtime container, through the torch_mlu TEST DOUBLE.

runtime/tests/doubles/torch_mlu is a CPU-backed test double of Cambricon's torch_mlu (its __init__.py says what
it simulates). It is a fixture of this module only: the `runtime` fixture checks that the product's image has no
torch_mlu of its own, copies the double into the running runtime container under /tmp/cla2-test-doubles and
removes it (and the scratch outputs) after; the product, the cla2_runtime role and the stand-in PyTorch image never
hold it. Every command runs with the double on PYTHONPATH and a simulated host that matches the sandbox's fake
cards (sandbox/fixtures/mlu-driver/cards.conf), on the model and data the converge placed (the
pipeline's demo assets). So device.py's mlu branch, the cncl backend, MLU_VISIBLE_DEVICES, the plan's device
query, a replica split over --devices 0,1 and a 2-rank torchrun launch run in the product's own container.
"""

import base64
import io
import json
import os
import shlex
import tarfile
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
DOUBLES = ROOT / "runtime" / "tests" / "doubles"
CARDS = ROOT / "sandbox" / "fixtures" / "mlu-driver" / "cards.conf"
FACT = "/etc/ansible/facts.d/cla2_runtime.fact"
DOUBLE_DIR = "/tmp/cla2-test-doubles"  # in the runtime container
WORK = "/tmp/cla2-mlu-double"  # scratch outputs, and TMPDIR (torchrun's), in the runtime container
MIB = 1024**2
# What the container's own environment must not add to a simulated host or a launch.
SCRUBBED = ("MLU_VISIBLE_DEVICES", "CLA2_DEVICE", "DS_ACCELERATOR", "LOCAL_RANK", "RANK", "WORLD_SIZE",
            "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
FREE_PORT = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
# A safetensors file's header (tensor names, dtypes, shapes), read without torch.
SAFETENSORS_HEADER = ("import struct, sys; f = open(sys.argv[1], 'rb'); "
                      "print(f.read(struct.unpack('<Q', f.read(8))[0]).decode())")


def sandbox_cards() -> list[int]:
    """Memory (MiB) of each card that the sandbox's test-only cnmon reports (last column of cards.conf)."""
    rows = [line.split() for line in CARDS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [int(row[-1]) for row in rows]


def payload() -> str:
    """The double (package and dist-info, no caches) as a base64 tar.gz: it travels inside one command, so it
    reaches the container through whatever connection testinfra has to the host."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(DOUBLES.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                tar.add(path, arcname=str(path.relative_to(DOUBLES)), recursive=False)
    return base64.b64encode(buf.getvalue()).decode()


class Runtime:
    """Commands in the runtime container, as is (`exec`, `output`) or under the double (`run`, `json`)."""

    def __init__(self, host, container: str, data_root: str):
        self.host, self.container, self.data_root = host, container, data_root
        self.model = f"{data_root}/models/tiny-llama"
        self.cards = sandbox_cards()

    def exec(self, *argv: str):
        return self.host.run(shlex.join(["docker", "exec", self.container, *argv]))

    def output(self, *argv: str) -> str:
        res = self.exec(*argv)
        assert res.rc == 0, f"{shlex.join(argv)} exited {res.rc}:\n{res.stderr[-3000:]}"
        return res.stdout

    def run(self, *argv: str, timeout: int = 120, **extra: str):
        """``argv`` with the double first on PYTHONPATH, the sandbox's cards as the simulated host, none of
        SCRUBBED from the container's environment, and ``extra``; fails the test with its stderr when it fails."""
        env = {"PYTHONPATH": DOUBLE_DIR, "TMPDIR": f"{WORK}/tmp", "TOKENIZERS_PARALLELISM": "false",
               "CLA2_FAKE_MLU_COUNT": str(len(self.cards)),
               "CLA2_FAKE_MLU_MEMORY": ",".join(f"{m}MiB" for m in self.cards), **extra}
        res = self.exec("env", *(a for name in SCRUBBED for a in ("-u", name)), *(f"{k}={v}" for k, v in env.items()),
                        "timeout", str(timeout), *argv)
        assert res.rc == 0, f"{shlex.join(argv)} exited {res.rc}:\n{res.stderr[-3000:]}"
        return res

    def json(self, *argv: str, **extra: str):
        return json.loads(self.run(*argv, **extra).stdout)


@pytest.fixture(scope="module")
def runtime(host):
    fact = json.loads(host.file(FACT).content_string)
    rt = Runtime(host, fact["container"], fact["data_root"])
    running = host.check_output(f"docker inspect --format '{{{{.State.Running}}}}' {shlex.quote(rt.container)}")
    assert running == "true", f"the runtime container {rt.container} is not running"
    # The product's image has no torch_mlu: the double below is the only one, and only while this module runs.
    spec = rt.output("python3", "-c", "import importlib.util as u; print(u.find_spec('torch_mlu'))")
    assert spec.strip() == "None", f"the image has a torch_mlu of its own: {spec}"
    put = (f"rm -rf {DOUBLE_DIR} {WORK} && mkdir -p {DOUBLE_DIR} {WORK}/tmp && "
           f"echo {payload()} | base64 -d | tar -xzf - --no-same-owner -C {DOUBLE_DIR}")
    try:
        rt.output("sh", "-c", put)
        yield rt
    finally:
        rt.exec("rm", "-rf", DOUBLE_DIR, WORK)
    assert rt.exec("test", "-e", DOUBLE_DIR).rc != 0, f"{DOUBLE_DIR} left in {rt.container}"


def test_the_simulated_host_is_the_sandbox(runtime):
    """As many cards as /dev/cambricon_dev* nodes passed to the container, each of 23374 MiB."""
    nodes = [n for n in runtime.output("ls", "-1", "/dev").split() if n.startswith("cambricon_dev")]
    assert len(nodes) == len(runtime.cards) == 2
    assert runtime.cards == [23374, 23374]


@pytest.mark.parametrize("visible, physical", [(None, [0, 1]), ("1", [1])])
def test_cla2_env_sees_the_cards_as_mlu_devices(runtime, visible, physical):
    extra = {} if visible is None else {"MLU_VISIBLE_DEVICES": visible}
    rep = runtime.json("cla2", "env", "--device", "mlu", "--json", **extra)
    assert rep["torch_mlu"] == "0.0.0+testdouble"  # the double is what imported
    assert (rep["device"], rep["backend"], rep["count"]) == ("mlu", "cncl", len(physical))
    assert [m["total"] for m in rep["memory"]] == [runtime.cards[i] * MIB for i in physical]
    assert [m["index"] for m in rep["memory"]] == list(range(len(physical)))  # renumbered, as the driver does
    assert rep["names"] == [f"MLU370-X8 (test double, physical {i})" for i in physical]


def test_the_plan_reads_the_simulated_devices(runtime):
    count, memory = len(runtime.cards), min(runtime.cards) * MIB
    serve = runtime.json("cla2", "plan", "serve", "--model", runtime.model, "--device", "mlu", "--json")
    assert (serve["kind"], serve["devices"], serve["device_memory"]) == ("mlu", count, memory)
    assert serve["dtype"] == "fp16"  # what an MLU runs when --dtype is auto
    assert 1 <= serve["replicas"] * serve["devices_per_replica"] <= count
    assert all(0 <= d < count for group in serve["device_groups"] for d in group)
    assert all(s["capacity"] == int(memory * 0.9) for s in serve["shares"])
    train = runtime.json("cla2", "plan", "finetune", "--model", runtime.model, "--device", "mlu", "--json")
    assert (train["kind"], train["world_size"], train["device_memory"]) == ("mlu", count, memory)
    # The tiny model fits plain DDP, the first setting the plan tries: no DeepSpeed.
    assert train["zero_stage"] == 0 and train["deepspeed"] is None


def test_generate_split_over_two_devices_answers_as_one_device(runtime):
    prompts = f"{runtime.data_root}/datasets/cla2-demo/prompts/prompts.jsonl"
    runs = {}
    for devices in ("0,1", "0"):
        out = f"{WORK}/generate-{devices.replace(',', '-')}.jsonl"
        res = runtime.run("cla2", "generate", "--model", runtime.model, "--input", prompts, "--output", out,
                          "--device", "mlu", "--devices", devices, "--dtype", "fp32", "--max-new-tokens", "8",
                          "--temperature", "0")
        runs[devices] = ([json.loads(x) for x in runtime.output("cat", out).splitlines()], res.stderr)
    (split, split_log), (one, one_log) = runs["0,1"], runs["0"]
    assert "1 replica(s) of 2 device(s) (layers 1 + 1)" in split_log
    assert "of 1 device(s) (layers 2)" in one_log
    assert len(split) == 3 and all(0 < r["completion_tokens"] <= 8 for r in split)
    assert [(r["id"], r["output"], r["completion_tokens"]) for r in split] == \
        [(r["id"], r["output"], r["completion_tokens"]) for r in one]


def test_torchrun_launches_a_rank_per_device_over_cncl(runtime):
    """finetune under torchrun, one rank per simulated device (cncl over the double's gloo), on the demo data."""
    out = f"{WORK}/finetune"
    port = runtime.output("python3", "-c", FREE_PORT).strip()
    res = runtime.run("python3", "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                      "--master-port", port, "-m", "cla2", "finetune", "--model", runtime.model, "--data",
                      f"{runtime.data_root}/datasets/cla2-demo/sft/train.jsonl", "--out", out, "--max-steps", "1",
                      "--batch-size", "1", "--gradient-accumulation-steps", "1", "--lora-rank", "4",
                      "--lora-alpha", "8", "--device", "mlu", timeout=300, OMP_NUM_THREADS="1")
    assert "on 2 rank(s), one per mlu device" in res.stdout
    run = json.loads(runtime.output("cat", f"{out}/run.json"))
    assert (run["status"], run["device"], run["world_size"]) == ("complete", "mlu", 2)
    assert run["versions"]["torch_mlu"] == "0.0.0+testdouble"
    assert run["metrics"]["global_step"] == 1
    plan = run["plan"]
    assert (plan["kind"], plan["world_size"], plan["device_memory"]) == ("mlu", 2, runtime.cards[0] * MIB)
    assert plan["zero_stage"] == 0 and run["deepspeed"] is None
    tensors = json.loads(runtime.output("python3", "-c", SAFETENSORS_HEADER, f"{out}/adapter_model.safetensors"))
    tensors.pop("__metadata__", None)
    assert any("lora_A" in k for k in tensors) and any("lora_B" in k for k in tensors)
    assert all(n > 0 for t in tensors.values() for n in t["shape"])


def test_eval_splits_its_subjects_over_two_replicas(runtime):
    """`cla2 eval` on the sandbox's two simulated devices: the plan puts a replica of the tiny model on each,
    the subjects are scored in two replica processes (one per device group), and the merged summary and
    predictions equal a one-replica run's."""
    data = f"{runtime.data_root}/datasets/cla2-demo/ceval"
    runs = {}
    for replicas in ("2", "1"):
        out = f"{WORK}/eval-{replicas}"
        res = runtime.run("cla2", "eval", "ceval", "--model", runtime.model, "--data", data, "--out", out,
                          "--device", "mlu", "--dtype", "fp32", "--replicas", replicas, timeout=300)
        runs[replicas] = ({f: runtime.output("cat", f"{out}/take0/{f}") for f in ("summary.json", "submission.json")},
                          json.loads(runtime.output("cat", f"{out}/run.json")), res.stderr)
    (two, two_run, log), (one, one_run, _) = runs["2"], runs["1"]
    assert "over 2 replicas (devices 0; 1)" in log
    assert two_run["device_groups"] == [[0], [1]] and one_run["device_groups"] == [[0]]
    assert two == one
    assert len(json.loads(two["summary.json"])) > 2  # subjects, grouped, All
