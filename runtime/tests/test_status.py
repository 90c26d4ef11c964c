"""The status file every job keeps, the run.json every job leaves, and training's TensorBoard files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import TrainerCallback

from cla2 import eval as ev
from cla2 import finetune, generate, merge, status

COMMON = {"job", "args", "versions", "started", "ended", "seconds", "outcome"}
STATUS_KEYS = {"job", "phase", "step", "total", "unit", "loss", "tokens_per_s", "eta_s", "elapsed_s", "updated",
               "pid", "error"}
SFT = [{"instruction": "中国的首都是哪里？", "output": "北京是中国的首都。"},
       {"instruction": "一加一等于几？", "output": "一加一等于二。"}]
FAST = dict(batch_size=2, gradient_accumulation_steps=1, lora_rank=4, lora_alpha=8, logging_steps=1,
            device="cpu", lr=5e-3)


@pytest.fixture
def status_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "job.status.json"
    monkeypatch.setenv(status.ENV, str(path))
    monkeypatch.delenv("RANK", raising=False)
    return path


@pytest.fixture
def every_update(monkeypatch):
    """No throttling: each update reaches the file (the tests read what a step wrote)."""
    monkeypatch.setattr(status, "INTERVAL_S", 0.0)


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def check_common(run: dict, job: str) -> None:
    assert COMMON <= set(run), COMMON - set(run)
    assert run["job"] == job and run["outcome"] == "succeeded"
    assert {"cla2", "torch", "transformers", "peft", "python"} <= set(run["versions"])
    assert all(run["versions"][k] for k in ("cla2", "torch", "transformers", "peft", "python"))
    assert run["started"].endswith("Z") and run["ended"] >= run["started"] and run["seconds"] >= 0


# ------------------------------------------------------------------------------------ status.py alone
def test_nothing_is_written_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(status.ENV, raising=False)
    st = status.Status("eval")
    st.update("evaluating", step=1, total=2, force=True)
    assert not st.enabled and list(tmp_path.iterdir()) == []


def test_only_rank_zero_writes(status_file, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    status.Status("finetune").update("training", step=1, force=True)
    assert not status_file.exists()
    monkeypatch.setenv("RANK", "0")
    status.Status("finetune").update("training", step=1, force=True)
    assert read(status_file)["phase"] == "training"


def test_writes_are_throttled_but_phase_changes_and_the_end_are_not(status_file):
    st = status.Status("generate", interval_s=3600)
    st.update("generating", step=0, total=10, unit="prompt")  # a phase change: written
    assert read(status_file)["step"] == 0
    for i in range(1, 8):
        st.update(step=i)  # within the interval: not written
    assert read(status_file)["step"] == 0
    st.update(step=9, force=True)
    assert read(status_file)["step"] == 9
    st.done()
    got = read(status_file)
    assert set(got) == STATUS_KEYS and got["phase"] == "done" and got["unit"] == "prompt" and got["total"] == 10
    assert not list(status_file.parent.glob(".*tmp*"))  # the temporary file was renamed into place


def test_eta_is_the_rate_of_the_phase_so_far(status_file):
    st = status.Status("finetune")
    st.update("training", step=100, total=400, unit="step")  # resumed at step 100: the rate starts here
    st._base = (st._base[0] - 50, 100)  # 50 s ago
    st.update(step=150, force=True)  # 50 steps in 50 s, 250 to go
    got = read(status_file)
    assert got["eta_s"] == pytest.approx(250, rel=0.05) and got["step"] == 150
    with pytest.raises(ValueError, match="phase 'sleeping'"):
        st.update("sleeping")


def test_a_job_that_raises_leaves_failed_with_its_message(status_file):
    @status.tracked("merge")
    def job(fail: bool):
        status.current().update("merging", step=1, total=3, unit="tensor")
        if fail:
            raise ValueError("adapter does not fit the base")
        return 7

    assert job(False) == 7 and read(status_file)["phase"] == "done"
    with pytest.raises(ValueError):
        job(True)
    got = read(status_file)
    assert got["phase"] == "failed" and got["error"] == "adapter does not fit the base" and got["step"] == 1
    assert status.current().enabled is False  # the job is over: nothing more is written for it


# ------------------------------------------------------------------------------------------- the jobs
@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in SFT), encoding="utf-8")
    return path


class Watch(TrainerCallback):
    """Reads the status file as each step ends (after the job's own callback has written it)."""

    def __init__(self, path: Path, crash_at: int | None = None):
        self.path, self.crash_at, self.seen = path, crash_at, []

    def on_train_begin(self, args, state, control, **kw):
        self.seen.append(read(self.path))

    def on_step_end(self, args, state, control, **kw):
        self.seen.append(read(self.path))
        if state.global_step == self.crash_at:
            raise KeyboardInterrupt("simulated crash")


def tensorboard_losses(out: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for events in sorted((out / "runs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            losses.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return losses


def test_training_reports_steps_loss_and_tokens_and_writes_tensorboard(tmp_path, tiny_model_small_tok, sft_data,
                                                                       status_file, every_update):
    out = tmp_path / "sft"
    watch = Watch(status_file)
    finetune.main(tiny_model_small_tok, sft_data, out, max_steps=4, save_steps=100, _callbacks=[watch], **FAST)
    assert watch.seen[0]["phase"] == "training" and watch.seen[0]["step"] == 0 and watch.seen[0]["total"] == 4
    steps = [s for s in watch.seen[1:]]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["unit"] == "step" for s in steps)
    assert all(s["tokens_per_s"] > 0 for s in steps) and steps[-1]["eta_s"] == 0
    assert steps[-1]["loss"] > 0 and steps[-1]["job"] == "finetune" and steps[-1]["error"] is None
    final = read(status_file)
    assert final["phase"] == "done" and final["step"] == 4 and final["eta_s"] is None
    # TensorBoard: transformers' callback, under OUT/runs, with the loss of every logged step
    losses = tensorboard_losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and all(v > 0 for v in losses.values())
    run = json.loads((out / "run.json").read_text())
    check_common(run, "finetune")
    assert run["status"] == "complete" and run["args"]["max_steps"] == 4
    assert run["tensorboard"] == str((out / "runs").resolve())
    assert (out / "loss.png").exists()


def test_a_resumed_training_counts_on_from_its_checkpoint(tmp_path, tiny_model_small_tok, sft_data, status_file,
                                                          every_update):
    out = tmp_path / "sft"
    kw = dict(max_steps=6, save_steps=3, **FAST)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(tiny_model_small_tok, sft_data, out, _callbacks=[Watch(status_file, crash_at=4)], **kw)
    crashed = read(status_file)
    assert crashed["phase"] == "failed" and crashed["error"] == "interrupted" and crashed["step"] == 4
    run = json.loads((out / "run.json").read_text())
    assert run["outcome"] == "failed" and run["error"] == "interrupted" and run["ended"]
    assert run["args"]["max_steps"] == 6
    watch = Watch(status_file)
    finetune.main(tiny_model_small_tok, sft_data, out, resume=True, _callbacks=[watch], **kw)
    assert watch.seen[0]["step"] == 3 and watch.seen[0]["total"] == 6  # checkpoint-3
    assert [s["step"] for s in watch.seen[1:]] == [4, 5, 6]
    assert read(status_file)["phase"] == "done"
    # the resumed run wrote into the same TensorBoard folder: steps 1-4 from the first run, 4-6 from this one
    assert sorted(tensorboard_losses(out)) == [1, 2, 3, 4, 5, 6]
    assert len(list((out / "runs").glob("events.out.tfevents.*"))) == 2
    run = json.loads((out / "run.json").read_text())
    check_common(run, "finetune")
    assert run["resumed_from"].endswith("checkpoint-3")


def test_eval_reports_questions_and_writes_the_common_run_json(tmp_path, tiny_model, ceval_dir, status_file,
                                                              every_update):
    out = tmp_path / "eval"
    ev.main("ceval", model=tiny_model, data=ceval_dir, out=out, subjects=["computer_network", "law"],
            batch_size=8, replicas=1)
    final = read(status_file)
    total = 19 + 24  # the val questions of the two subjects
    assert final["phase"] == "done" and final["unit"] == "question" and final["step"] == final["total"] == total
    run = json.loads((out / "run.json").read_text())
    check_common(run, "eval")
    assert run["command"] == "eval" and run["metrics"]["questions"] == total and run["args"]["shots"] == 0


def test_generate_writes_its_run_json_beside_the_output(tmp_path, tiny_model, status_file, every_update):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"第{i}个"}, ensure_ascii=False) + "\n" for i in range(3)),
                   encoding="utf-8")
    for name in ("a.jsonl", "b.jsonl"):  # two outputs in one folder: two records
        generate.main(model=tiny_model, input=src, output=tmp_path / name, max_new_tokens=4, replicas=1)
    final = read(status_file)
    assert final["phase"] == "done" and final["unit"] == "prompt" and final["step"] == final["total"] == 3
    for name in ("a.jsonl", "b.jsonl"):
        run = json.loads((tmp_path / f"{name}.run.json").read_text())
        check_common(run, "generate")
        assert run["output"] == str((tmp_path / name).resolve()) and run["prompts"] == 3
        assert run["args"]["max_new_tokens"] == 4 and run["generated_tokens"] >= 3
    assert generate.run_file(tmp_path / "a.jsonl") == tmp_path / "a.jsonl.run.json"


def test_merge_reports_tensors_and_writes_run_json_and_merge_json(tmp_path, tiny_model, status_file,
                                                                 every_update):
    from test_merge import make_adapter

    adapter = make_adapter(tiny_model, tmp_path / "lora")
    out = tmp_path / "merged"
    merge.main(adapter, out, shard_size="10MB")
    final = read(status_file)
    assert final["phase"] == "done" and final["unit"] == "tensor" and final["step"] == final["total"] > 10
    run = json.loads((out / "run.json").read_text())
    check_common(run, "merge")
    assert set(run["args"]) == {"adapter", "out", "model", "dtype", "shard_size", "overwrite"}
    assert run["base_model"] == str(Path(tiny_model).resolve()) and run["lora_tensors_merged"] == 14
    assert json.loads((out / "merge.json").read_text())["job"] == "merge"


def test_a_failing_job_leaves_failed_in_its_status(tmp_path, tiny_model, status_file):
    with pytest.raises(FileNotFoundError):
        generate.main(model=tiny_model, input=tmp_path / "missing.jsonl", output=tmp_path / "o.jsonl")
    got = read(status_file)
    assert got["job"] == "generate" and got["phase"] == "failed" and "does not exist" in got["error"]
    assert not (tmp_path / "o.jsonl.run.json").exists()


def test_replicas_add_up_into_the_jobs_status(tiny_model, tmp_path):
    """`cla2 generate` over two simulated devices: each replica keeps a status file of its own, the parent's
    status counts the prompts of both, and the parent writes the one run record."""
    import subprocess
    import sys

    from test_mlu_double import double_env

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in ["你好", "a b", "测试", "龘"]),
                   encoding="utf-8")
    out, status_path = tmp_path / "out.jsonl", tmp_path / "gen.status.json"
    env = double_env(CLA2_FAKE_MLU_COUNT="2", CLA2_FAKE_MLU_BF16="0", **{status.ENV: str(status_path)})
    p = subprocess.run([sys.executable, "-m", "cla2", "generate", "--model", str(tiny_model), "--input", str(src),
                        "--output", str(out), "--device", "mlu", "--dtype", "fp32", "--max-new-tokens", "4",
                        "--replicas", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "4 prompts over 2 replicas" in p.stderr
    got = read(status_path)
    assert got["job"] == "generate" and got["phase"] == "done"
    assert got["unit"] == "prompt" and got["step"] == got["total"] == 4
    run = json.loads((tmp_path / "out.jsonl.run.json").read_text())
    check_common(run, "generate")
    assert run["device_groups"] == [[0], [1]] and run["prompts"] == 4
    assert sorted(q.name for q in tmp_path.iterdir()) == ["gen.status.json", "in.jsonl", "out.jsonl", "out.jsonl.run.json"]
