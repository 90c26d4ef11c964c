"""`cla2 eval ceval|cmmlu`: multiple-choice accuracy, zero- or few-shot, in the seed's report layout.

The prompt is the seed evaluator's, character for character (upstream scripts/ceval/llama_evaluator.py at
84b4c3e, the commit the seed builds on): the question, ``\\nA. …\\nB. …\\nC. …\\nD. …``, then ``\\n答案：``.
Few-shot puts ``以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n`` (the subject's Chinese
name) and the first k dev rows, each ending ``\\n答案：X\\n\\n``, before the question. With --with-prompt (the
seed's --with_prompt True, for Alpaca models) the question ends ``\\n答案是什么？ `` instead, and the few-shot
rows and the question together are the instruction of the Alpaca-2 template
(``[INST] <<SYS>>\\n…\\n<</SYS>>\\n\\n{rows}{question} [/INST]``).

The answer is read from the next-token logits at the end of the prompt: for each letter, the logit of the
letter as it follows ``答案：`` plus the logit of the letter on its own (two different tokens in the
Chinese-LLaMA-2 vocabulary), and the largest sum wins. The few-shot prefix of a subject is run through
the model once; its KV cache is shared by every question of the subject, and the questions go through in
right-padded batches (the padding sits after each question, where causal attention never looks).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch

from cla2 import settings, status
from cla2.compat import filled_cache, output_cache
from cla2.prompts import build_prompt
from cla2.settings import Placement

CHOICES = "ABCD"
FEW_SHOT_HEADER = "以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n\n"


@dataclass(frozen=True)
class Benchmark:
    name: str
    eval_split: str  # the split with answers that is scored
    file_pattern: str  # {split}/{subject}... relative to --data
    question_col: str
    answer_col: str

    def path(self, data: Path, subject: str, split: str) -> Path:
        return Path(data) / self.file_pattern.format(split=split, subject=subject)


BENCHMARKS = {
    "ceval": Benchmark("ceval", "val", "{split}/{subject}_{split}.csv", "question", "answer"),
    "cmmlu": Benchmark("cmmlu", "test", "{split}/{subject}.csv", "Question", "Answer"),
}


def subjects_of(benchmark: str) -> dict[str, tuple[str, str, list[str]]]:
    """subject -> (English name, Chinese name, categories), shipped in the package."""
    text = resources.files("cla2").joinpath(f"assets/{benchmark}_subjects.json").read_text(encoding="utf-8")
    out = {}
    for key, (en, zh, cat) in json.loads(text).items():
        out[key] = (en, zh, cat if isinstance(cat, list) else [cat])
    return out


@dataclass
class Question:
    id: str
    question: str
    options: dict[str, str]
    answer: str | None


def read_csv(path: Path, bench: Benchmark, need_answer: bool) -> list[Question]:
    """Rows of one subject file; a missing file or a malformed row is an error naming file and row."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the {bench.name} data folder needs it for this subject "
                                "(choose the subjects that exist with --subjects)")
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        need = [bench.question_col, *CHOICES] + ([bench.answer_col] if need_answer else [])
        missing = [c for c in need if c not in cols]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(cols) or 'none'})")
        for n, rec in enumerate(reader, 1):
            where = f"{path}, row {n} (line {reader.line_num})"
            if None in rec or any(rec.get(c) is None for c in need):
                raise ValueError(f"{where}: wrong number of fields")
            answer = (rec.get(bench.answer_col) or "").strip() or None
            if need_answer and answer not in CHOICES:
                raise ValueError(f"{where}: answer {answer!r} is not one of A, B, C, D")
            if not rec[bench.question_col].strip():
                raise ValueError(f"{where}: empty question")
            qid = rec.get("id") if rec.get("id") not in (None, "") else rec.get("", str(n - 1))
            rows.append(Question(str(qid), rec[bench.question_col], {c: rec[c] for c in CHOICES}, answer))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def format_question(q: Question) -> str:
    """The question and its four options, each on a line of its own."""
    return q.question + "".join(f"\n{c}. {q.options[c]}" for c in CHOICES)


def format_example(q: Question, include_answer: bool) -> str:
    """The seed's format: question, the four options, then 答案： (and the answer for exemplars)."""
    text = format_question(q) + "\n答案："
    if include_answer:
        text += f"{q.answer}\n\n"
    return text


# The question's end under the seed's --with_prompt True (llama_evaluator.format_example, with_prompt=True),
# and the Alpaca-2 template around the few-shot rows and the question: its head and its tail.
WITH_PROMPT_ANSWER = "\n答案是什么？ "
TEMPLATE_HEAD, TEMPLATE_TAIL = build_prompt("\0").split("\0")


def few_shot_prefix(subject_zh: str, dev: list[Question], shots: int) -> str:
    if shots == 0:
        return ""
    return FEW_SHOT_HEADER.format(subject_zh) + "".join(format_example(q, True) for q in dev[:shots])


def prompt_prefix(few_shot: str, with_prompt: bool) -> str:
    """What every question of a subject starts with: the few-shot rows, inside the template's head with
    --with-prompt (the seed puts them in the instruction, before the question)."""
    return TEMPLATE_HEAD + few_shot if with_prompt else few_shot


def question_prompt(q: Question, with_prompt: bool) -> str:
    """A question as it follows prompt_prefix(): prefix + this is the seed's whole prompt."""
    if with_prompt:
        return format_question(q) + WITH_PROMPT_ANSWER + TEMPLATE_TAIL
    return format_example(q, False)


def letter_token_ids(tokenizer) -> list[list[int]]:
    """For each letter: [the token of the letter after 答案：, the token of the letter alone]."""
    ids = []
    for c in CHOICES:
        after = tokenizer("答案：" + c, add_special_tokens=False).input_ids[-1]
        alone = tokenizer(c, add_special_tokens=False).input_ids[-1]
        ids.append([after, alone])
    return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Scorer:
    """Batched A/B/C/D scoring with a shared prefix KV cache."""

    def __init__(self, model, tokenizer, device: torch.device, batch_size: int = 16):
        from transformers import DynamicCache

        from cla2.compat import cache_kwarg

        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.batch_size = max(1, batch_size)
        self.decoder = model.get_decoder()
        self.cache_kw = cache_kwarg(self.decoder)
        self.DynamicCache = DynamicCache
        head = model.get_output_embeddings().weight
        letters = torch.tensor(letter_token_ids(tokenizer), device=head.device)  # [4, 2]
        # Only the 8 rows of the output layer that matter: the logits of the letters, nothing else.
        self.head = head[letters.flatten()].float()  # [8, hidden]
        self.forwards = 0

    def _run(self, ids: torch.Tensor, cache, start: int) -> tuple[torch.Tensor, object]:
        positions = torch.arange(start, start + ids.shape[1], device=self.device).unsqueeze(0).expand(ids.shape[0], -1)
        # An all-ones mask changes nothing (the tails are right-padded and each is read at its own last
        # token), but without one transformers 4.55 on torch < 2.5 writes into a batch-expanded causal mask.
        mask = torch.ones(ids.shape[0], start + ids.shape[1], dtype=torch.long, device=self.device)
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           **{self.cache_kw: cache})
        self.forwards += 1
        return out.last_hidden_state, output_cache(out)

    @torch.inference_mode()
    def predict(self, prefix: str, prompts: list[str]) -> list[tuple[str, list[float]]]:
        """(letter, the four summed logits) for each prompt (prefix + prompt is what the model reads)."""
        full = [self.tokenizer(prefix + p).input_ids for p in prompts]
        prefix_ids = self.tokenizer(prefix).input_ids if prefix else full[0][:1]
        # The prefix tokens shared by every question (tokenizing the whole text, as the seed does, can
        # merge across the boundary: then the shared part is a little shorter).
        shared = min(min(_common_prefix(prefix_ids, f) for f in full), min(len(f) for f in full) - 1)
        shared = max(shared, 1)
        _, prefix_cache = self._run(torch.tensor([full[0][:shared]], device=self.device), self.DynamicCache(), 0)
        prefix_kv = [(k, v) for k, v, *_ in prefix_cache]
        order = sorted(range(len(full)), key=lambda i: len(full[i]))
        results: list[tuple[str, list[float]] | None] = [None] * len(full)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            tails = [full[i][shared:] for i in idx]
            width = max(map(len, tails))
            ids = torch.tensor([t + [0] * (width - len(t)) for t in tails], device=self.device)
            n = len(idx)
            cache = filled_cache(self.DynamicCache, [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
                                                     for k, v in prefix_kv])
            hidden, _ = self._run(ids, cache, shared)
            # On a replica split over devices the hidden states leave the last layer's device.
            last = hidden[torch.arange(n, device=hidden.device),
                          torch.tensor([len(t) - 1 for t in tails], device=hidden.device)]
            scores = (last.float().to(self.head.device) @ self.head.T).view(n, 4, 2).sum(-1).cpu()
            for row, i in enumerate(idx):
                s = scores[row].tolist()
                results[i] = (CHOICES[max(range(4), key=lambda j: s[j])], s)
        return results  # type: ignore[return-value]


# summary.json is the seed's, byte for byte: main() of ymcui/Chinese-LLaMA-Alpaca-2
#   scripts/ceval/eval.py (commit a8d643ef5a2ed27a54aec5deb49fa095e086717f) and
#   scripts/cmmlu/eval.py (commit b6ef97d61fa76e58613092c8fcd2b437da3ee275, with scripts/cmmlu/categories.py at
#   c877dbdc4922a74ae4b51110b400f641930c9dcd), with their evaluators' subject score, correct_ratio =
#   100*correct_num/len(answers) (scripts/ceval/llama_evaluator.py at 1544e60ac4f13e630d1f3bdfdae6d641743b4e05,
#   scripts/cmmlu/llama2_evaluator.py at 091095abd64e667ddee501e92bb5d8376a89483d):
#   subject: {"score": percent, "num": questions, "correct": score*num/100 (a float, as the seed computes it)}
#   grouped: {group: {"correct": float sum of the subjects' correct, "num": int, "score": correct/num (a fraction)}},
#            the groups in the seed's order, each subject summed in the order of the seed's subject mapping
#   All:     {"score": fraction, "num": int, "correct": float}, summed over the groups in that order
# written with json.dump(..., ensure_ascii=False, indent=2), no trailing newline.
# Where the seed would fail (it sums every subject of its mapping, so a subset is a KeyError, and an empty group a
# ZeroDivisionError), the kit sums the subjects evaluated and leaves out the groups that got none.
SEED_GROUPS = {"ceval": ("STEM", "Social Science", "Humanities", "Other"),
               "cmmlu": ("China specific", "STEM", "Social Science", "Humanities", "Other")}
# scripts/cmmlu/categories.py's order of categories; its eval.py lists the subjects category by category in this
# order and files a subject of two categories under the later one (always "China specific").
CMMLU_CATEGORIES = ("STEM", "Humanities", "Social Science", "Other", "China specific")


def seed_mapping(benchmark: str, meta: dict[str, tuple[str, str, list[str]]]) -> list[tuple[str, str]]:
    """(subject, group) in the order of the seed's subject mapping, for the subjects in ``meta``.

    C-Eval: subject_mapping.json's order, which is the order of the shipped ceval_subjects.json. CMMLU: the
    shipped order (that of categories.py within each category) grouped by category as the seed's eval.py does."""
    if benchmark != "cmmlu":
        return [(s, meta[s][2][0]) for s in meta]
    order = sorted(meta, key=lambda s: CMMLU_CATEGORIES.index(meta[s][2][0]))
    return [(s, "China specific" if "China specific" in meta[s][2] else meta[s][2][0]) for s in order]


def summarize(per_subject: dict[str, tuple[int, int]], meta: dict[str, tuple[str, str, list[str]]],
              benchmark: str = "ceval") -> dict:
    """The seed's summary.json from each subject's (correct, num): see the comment above."""
    summary: dict = {}
    for s, (correct, num) in per_subject.items():
        score = 100 * correct / num  # the seed's correct_ratio
        summary[s] = {"score": score, "num": num, "correct": score * num / 100}
    grouped: dict = {g: {"correct": 0.0, "num": 0} for g in SEED_GROUPS[benchmark]}
    for s, group in seed_mapping(benchmark, {s: meta[s] for s in meta if s in per_subject}):
        grouped.setdefault(group, {"correct": 0.0, "num": 0})
        grouped[group]["num"] += summary[s]["num"]
        grouped[group]["correct"] += summary[s]["correct"]
    summary["grouped"] = {g: info for g, info in grouped.items() if info["num"]}
    total_num, total_correct = 0, 0
    for info in summary["grouped"].values():
        info["score"] = info["correct"] / info["num"]
        total_num += info["num"]
        total_correct += info["correct"]
    summary["All"] = {"score": total_correct / total_num, "num": total_num, "correct": total_correct}
    return summary


def summary_text(summary: dict) -> str:
    """summary.json's text as the seed writes it (json.dump(summary, f, ensure_ascii=False, indent=2))."""
    return json.dumps(summary, ensure_ascii=False, indent=2)


def write_report(path: Path, benchmark: str, summary: dict, meta: dict, info: dict) -> None:
    lines = [f"# {benchmark.upper()} evaluation", "",
             f"- model: `{info['model']}`" + (f" + adapter `{info['adapter']}`" if info.get("adapter") else ""),
             f"- split: {info['split']}, {info['shots']}-shot, chat template: {'yes' if info['with_prompt'] else 'no'}",
             f"- questions: {info['questions']} in {len(meta)} subjects, {info['seconds']:.1f}s "
             f"({info['questions_per_second']:.1f} questions/s)", "",
             "| category | accuracy |", "|---|---:|"]
    for g, v in summary["grouped"].items():
        lines.append(f"| {g} | {100 * v['score']:.2f} |")
    lines += [f"| **All** | **{100 * summary['All']['score']:.2f}** |", "",
              "| subject | 科目 | category | questions | correct | accuracy |", "|---|---|---|---:|---:|---:|"]
    for s in sorted(meta, key=lambda s: (meta[s][2][0], s)):
        r = summary[s]
        lines.append(f"| {s} | {meta[s][1]} | {', '.join(meta[s][2])} | {r['num']} | {round(r['correct'])} | {r['score']:.2f} |")
    lines += ["", "Accuracies are percentages. `take0/summary.json` holds the same numbers in the seed's layout "
              "(each subject's `score` in percent; each group's and `All`'s `score` as a fraction, with `num` and "
              "`correct`); `take0/submission.json` holds each question's predicted letter.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def across_replicas(benchmark: str, groups: list[list[int]], sets: dict, **job_flags):
    """Score ``sets`` (subject -> rows, dev, test) split over one ``cla2 eval`` process per device group, and
    gather what each scored: (per subject (correct, num), predictions, test predictions, forward passes).
    A subject is scored whole by one replica, as it would be alone, so the merged results are those of one
    replica; the subjects go to the replicas largest first, each to the one with the fewest questions so far."""
    from cla2 import replicas

    parts: list[list[str]] = [[] for _ in groups]
    load = [0] * len(groups)
    for s in sorted(sets, key=lambda s: -(len(sets[s][0]) + len(sets[s][2]))):
        i = load.index(min(load))
        parts[i].append(s)
        load[i] += len(sets[s][0]) + len(sets[s][2])
    argvs = [[benchmark, "--out", f"{{tmp}}/part-{i}", *replicas.flags({**job_flags, "subjects": part})]
             for i, part in enumerate(parts)]
    per_subject, predictions, test_predictions, forwards = {}, {}, {}, 0
    with replicas.run("eval", argvs, groups, load, "question") as (tmp, _):
        for i, part in enumerate(parts):
            take = tmp / f"part-{i}" / "take0"
            summary = json.loads((take / "summary.json").read_text(encoding="utf-8"))
            submission = json.loads((take / "submission.json").read_text(encoding="utf-8"))
            # "correct" is the seed's float (score * num / 100): the count is the nearest integer
            per_subject.update({s: (round(summary[s]["correct"]), summary[s]["num"]) for s in part})
            if (take / "predictions.json").exists():  # --do-test: submission.json holds the test split's
                predictions.update(json.loads((take / "predictions.json").read_text(encoding="utf-8")))
                test_predictions.update(submission)
            else:
                predictions.update(submission)
            forwards += json.loads((take.parent / "run.json").read_text(encoding="utf-8"))["metrics"]["forward_passes"]
    order = list(sets)  # the subjects in the order one replica would have scored them
    return ({s: per_subject[s] for s in order}, {s: predictions[s] for s in order},
            {s: test_predictions[s] for s in order if s in test_predictions}, forwards)


@status.tracked("eval")
@settings.grouped
def main(
    benchmark: Literal["ceval", "cmmlu"],
    /,
    *,
    model: Path,
    data: Path,
    out: Path,
    adapter: Path | None = None,
    shots: int = 0,
    with_prompt: bool = False,
    subjects: list[str] | None = None,
    do_test: bool = False,
    batch_size: int | None = None,
    where: Placement = Placement(),
    replicas: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Evaluate on C-Eval or CMMLU; writes OUT/take0/summary.json, OUT/take0/submission.json, OUT/report.md, OUT/run.json.

    C-Eval is scored on its val split (val/<subject>_val.csv), CMMLU on its test split (test/<subject>.csv);
    few-shot exemplars are the first K rows of dev/.

    Args:
        benchmark: ceval or cmmlu.
        model: Model folder (merged, or the base model when --adapter is given).
        data: Benchmark folder in the official layout (C-Eval: val/ dev/ [test/]; CMMLU: dev/ test/).
        out: Output folder (refused if not empty, unless --overwrite).
        adapter: LoRA adapter folder, merged at load time.
        shots: Few-shot exemplars per question (0 to the number of dev rows, 5 in C-Eval).
        with_prompt: Wrap each question in the Alpaca-2 chat template (for Alpaca models).
        subjects: Evaluate only these subjects (comma-separated file keys, e.g. computer_network,law).
        do_test: C-Eval: also predict the test split (no answers) and put those predictions in submission.json.
        batch_size: Questions scored together (default: 16, or fewer when the plan finds room for fewer; a number
            given here stands).
        where: Device kind, devices and dtype (cla2.settings.Placement: --device, --devices, --dtype).
        replicas: Replica processes to split the subjects over, one per device group of the plan (default: as
            many as the host holds; 1 scores in this process). Not with --devices, which names one replica.
        overwrite: Replace a non-empty OUT.
    """
    from tqdm import tqdm

    from cla2.io import atomic_output_dir, check_output_dir
    from cla2.loading import load_model
    from cla2.record import RUN_FILE, run_record, write

    began = time.time()
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}: use ceval or cmmlu")
    bench = BENCHMARKS[benchmark]
    check_output_dir(out, overwrite)
    known = subjects_of(benchmark)
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist")
    if subjects:
        unknown = [s for s in subjects if s not in known]
        if unknown:
            raise ValueError(f"unknown {benchmark} subject(s): {', '.join(unknown)}; known subjects are: "
                             f"{', '.join(sorted(known))}")
        chosen = list(dict.fromkeys(subjects))
    else:
        chosen = [s for s in known if bench.path(data, s, bench.eval_split).is_file()]
        if not chosen:
            raise FileNotFoundError(f"no {bench.eval_split} files of any {benchmark} subject under {data} "
                                    f"(expected e.g. {bench.path(data, next(iter(known)), bench.eval_split)})")
        absent = [s for s in known if s not in chosen]
        if absent:
            print(f"cla2 eval: {len(absent)} subject(s) have no {bench.eval_split} file and are skipped: "
                  f"{', '.join(absent)}", file=sys.stderr)
    if shots < 0:
        raise ValueError(f"--shots {shots}: use 0 or more")
    # Read and check every file before loading the model.
    tests = do_test and benchmark == "ceval"
    sets = {}
    for s in chosen:
        rows = read_csv(bench.path(data, s, bench.eval_split), bench, need_answer=True)
        dev = read_csv(bench.path(data, s, "dev"), bench, need_answer=True) if shots else []
        if shots > len(dev) and shots:
            raise ValueError(f"--shots {shots}: {bench.path(data, s, 'dev')} has only {len(dev)} rows")
        test = read_csv(bench.path(data, s, "test"), bench, need_answer=False) if tests else []
        sets[s] = (rows, dev, test)

    from cla2 import plan
    from cla2 import replicas as replica_processes

    device, devices, dtype = where.device, where.devices, where.dtype
    placement, replica = plan.for_inference("eval", model, device, dtype, devices, batch_size)
    groups = replica_processes.groups(placement, replica, devices, replicas, len(sets), "subjects")
    started = time.perf_counter()
    if len(groups) > 1:
        per_subject, predictions, test_predictions, forwards = across_replicas(
            benchmark, groups, sets, model=model, data=data, adapter=adapter, shots=shots, with_prompt=with_prompt,
            do_test=do_test, batch_size=batch_size, device=device, dtype=dtype)
    else:
        net, tokenizer, torch_device = load_model(model, adapter, device, dtype, groups[0],
                                                  [s.layers for s in placement.shares])
        scorer = Scorer(net, tokenizer, torch_device, batch_size=placement.batch)
        per_subject, predictions, test_predictions = {}, {}, {}
        total = sum(len(r) + len(t) for r, _, t in sets.values())
        st, done = status.current(), 0
        st.update("evaluating", step=0, total=total, unit="question", force=True)
        with tqdm(total=total, desc=f"{benchmark} {shots}-shot", unit="q", file=sys.stderr) as bar:
            for s, (rows, dev, test) in sets.items():
                prefix = prompt_prefix(few_shot_prefix(known[s][1], dev, shots), with_prompt)
                got = scorer.predict(prefix, [question_prompt(q, with_prompt) for q in rows])
                predictions[s] = {q.id: letter for q, (letter, _) in zip(rows, got, strict=True)}
                per_subject[s] = (sum(q.answer == letter for q, (letter, _) in zip(rows, got, strict=True)), len(rows))
                bar.update(len(rows))
                if test:
                    got = scorer.predict(prefix, [question_prompt(q, with_prompt) for q in test])
                    test_predictions[s] = {q.id: letter for q, (letter, _) in zip(test, got, strict=True)}
                    bar.update(len(test))
                done += len(rows) + len(test)
                st.update(step=done)
        forwards = scorer.forwards
    seconds = time.perf_counter() - started
    meta = {s: known[s] for s in chosen}
    summary = summarize(per_subject, meta, benchmark)
    questions = sum(n for _, n in per_subject.values())
    info = {"model": str(model), "adapter": str(adapter) if adapter else None, "split": bench.eval_split,
            "shots": shots, "with_prompt": with_prompt, "questions": questions, "seconds": seconds,
            "questions_per_second": (questions + sum(map(len, test_predictions.values()))) / max(seconds, 1e-9)}
    args = {"benchmark": benchmark, "model": str(model), "adapter": str(adapter) if adapter else None,
            "data": str(data), "out": str(out), "shots": shots, "with_prompt": with_prompt, "subjects": chosen,
            "do_test": do_test, "batch_size": batch_size, "device": device, "devices": devices,
            "replicas": replicas, "dtype": dtype, "overwrite": overwrite}
    st = status.current()
    st.update("saving", force=True)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "take0").mkdir()
        (tmp / "take0" / "summary.json").write_text(summary_text(summary), encoding="utf-8")
        (tmp / "take0" / "submission.json").write_text(
            json.dumps(test_predictions if tests else predictions, ensure_ascii=False, indent=2), encoding="utf-8")
        if tests:
            (tmp / "take0" / "predictions.json").write_text(json.dumps(predictions, ensure_ascii=False, indent=2),
                                                            encoding="utf-8")
        write_report(tmp / "report.md", benchmark, summary, meta, info)
        run = run_record(
            "eval", args, began, time.time(), benchmark=benchmark, plan=placement.to_json(),
            device=placement.kind, device_groups=groups, dtype=placement.dtype,
            metrics={"accuracy": summary["All"]["score"],
                     "grouped": {g: v["score"] for g, v in summary["grouped"].items()}, "questions": questions,
                     "seconds": round(seconds, 3), "questions_per_second": round(info["questions_per_second"], 3),
                     "forward_passes": forwards})
        write(tmp / RUN_FILE, run)
    print(f"{benchmark}: {questions} questions, accuracy {100 * summary['All']['score']:.2f}% "
          f"({info['questions_per_second']:.1f} questions/s) -> {out}", file=sys.stderr)
    return summary
