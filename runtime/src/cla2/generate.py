"""`cla2 generate`: a JSONL file of prompts in, a JSONL file of outputs (with token counts and timings) out.

Each input line is a JSON object with either ``instruction`` (and optionally ``input``, Alpaca style),
``messages`` (OpenAI style) or ``prompt`` (raw text, used as it is). Every prompt goes through the same
batching engine as the server, so the file is processed ``--batch-size`` prompts at a time.

Beside the output goes ``<output>.run.json`` (e.g. ``answers.jsonl.run.json``): the job's run record, named
after its output so that several outputs in one folder never share one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from cla2 import plan, settings, status
from cla2 import replicas as replica_processes
from cla2.engine import Engine, InvalidRequest, SamplingParams
from cla2.prompts import DEFAULT_SYSTEM_PROMPT, build_chat_prompt, build_prompt, join_instruction
from cla2.settings import Placement, Sampling


def read_prompts(path: Path, with_prompt: bool, system_prompt: str) -> tuple[list[dict], list[str]]:
    """Records and their prompt texts; a bad line is an error naming the file and line."""
    records, prompts = [], []
    if not Path(path).is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object")
            try:
                if isinstance(rec.get("messages"), list):
                    text = build_chat_prompt(rec["messages"], system_prompt)
                elif isinstance(rec.get("instruction"), str):
                    text = join_instruction(rec["instruction"], rec.get("input"))
                    text = build_prompt(text, system_prompt) if with_prompt else text
                elif isinstance(rec.get("prompt"), str):
                    text = rec["prompt"]
                else:
                    raise ValueError("needs a string 'instruction', a string 'prompt' or a list 'messages'")
            except ValueError as exc:
                raise ValueError(f"{path}, line {n}: {exc}") from None
            records.append(rec)
            prompts.append(text)
    if not records:
        raise ValueError(f"input file {path} holds no prompts")
    return records, prompts


def check_prompts(path: Path, prompts: list[str], params: list[SamplingParams], model: Path, adapter: Path | None,
                  truncate: bool) -> None:
    """What the engine checks of each prompt, with only the tokenizer and the model's window."""
    from transformers import AutoTokenizer

    from cla2.engine import fit_prompt
    from cla2.loading import tokenizer_dir
    from cla2.plan import read_shape

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(model, adapter)))
    window = read_shape(model).context
    for n, (p, sp) in enumerate(zip(prompts, params, strict=True), 1):
        try:
            fit_prompt(list(tokenizer(p, add_special_tokens=True).input_ids), sp.validate(window), window, truncate,
                       tokenizer.bos_token_id)
        except InvalidRequest as exc:
            raise ValueError(f"{path}, prompt {n}: {exc}") from None


# The flags a replica process gets as they were given (the others: its share of the input, its devices).
REPLICA_FLAGS = ("model", "adapter", "device", "dtype", "batch_size", "with_prompt", "system_prompt", "temperature",
                 "top_k", "top_p", "repetition_penalty", "max_new_tokens", "truncate", "decode_graphs")


def run_file(output: Path) -> Path:
    """Where the run record of the job that wrote ``output`` goes: ``<output>.run.json`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".run.json")


def across_replicas(groups: list[list[int]], records: list[dict], output: Path, job_flags: dict,
                    seed: int | None) -> tuple[Path, int, float]:
    """Generate ``records`` split in contiguous shares over one ``cla2 generate`` process per device group,
    then join their outputs in the input's order into ``output`` (written whole or not at all). Line i keeps
    the seed it has in one process (each share starts its seeds at its first line's)."""
    import tempfile

    from cla2 import replicas

    shares = [len(records) * i // len(groups) for i in range(len(groups) + 1)]
    with tempfile.TemporaryDirectory(prefix="cla2-generate-inputs-") as inputs:
        argvs = []
        for i in range(len(groups)):
            part = Path(inputs) / f"in-{i}.jsonl"
            part.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[shares[i]:shares[i + 1]]),
                            encoding="utf-8")
            argvs.append(["--input", str(part), "--output", f"{{tmp}}/out-{i}.jsonl", *replicas.flags(
                {**job_flags, "seed": None if seed is None else seed + shares[i]})])
        sizes = [shares[i + 1] - shares[i] for i in range(len(groups))]
        with replicas.run("generate", argvs, groups, sizes, "prompt") as (tmp, seconds):
            output.parent.mkdir(parents=True, exist_ok=True)
            partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
            generated = 0
            with open(partial, "w", encoding="utf-8") as f:
                for i in range(len(groups)):
                    for line in (tmp / f"out-{i}.jsonl").read_text(encoding="utf-8").splitlines():
                        generated += json.loads(line)["completion_tokens"]
                        f.write(line + "\n")
            partial.replace(output)
    print(f"{len(records)} prompts, {generated} tokens generated in {seconds:.1f}s over {len(groups)} replicas "
          f"({generated / max(seconds, 1e-9):.1f} generated tokens/s) -> {output}", file=sys.stderr)
    return output, generated, seconds


@status.tracked("generate")
@settings.grouped
def main(
    *,
    model: Path,
    input: Path,
    output: Path,
    adapter: Path | None = None,
    where: Placement = Placement(),
    replicas: int | None = None,
    batch_size: int | None = None,
    with_prompt: bool = True,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    sampling: Sampling = Sampling(),
    truncate: bool = False,
    decode_graphs: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Generate an answer for every prompt of a JSONL file, batched.

    Output lines are the input records plus output, finish_reason, prompt_tokens, completion_tokens,
    time_to_first_token and seconds. The tokens/s printed at the end counts generated tokens only.
    OUTPUT.run.json beside it records the run (arguments, versions, timings).

    Args:
        model: Model folder (merged, or the base model when --adapter is given).
        input: JSONL file; each line has 'instruction' (+ 'input'), 'messages' or 'prompt'.
        output: JSONL file to write (refused if it exists, unless --overwrite).
        adapter: LoRA adapter folder, merged at load time.
        where: Device kind, devices and dtype (cla2.settings.Placement: --device, --devices, --dtype).
        replicas: Replica processes to split the prompts over, one per device group of the plan (default: as many
            as the host holds; 1 generates in this process). Not with --devices, which names one replica.
        batch_size: Prompts decoded together (default: 8, or fewer when the plan finds room for fewer; a number
            given here stands).
        with_prompt: Wrap 'instruction' records in the Alpaca-2 chat template.
        system_prompt: System prompt of the template.
        sampling: How answers are sampled (cla2.settings.Sampling: --temperature, --top-k, --top-p,
            --repetition-penalty, --max-new-tokens, --seed; line i uses seed + i, so a rerun gives the same
            outputs).
        truncate: Cut over-long prompts from the left instead of failing.
        decode_graphs: Decode through static KV caches (a batch padded to 1, 2, 4, 8... rows) and CUDA graphs
            (torch.compile; default: on for CUDA only; the first step of each batch and cache size waits while it
            compiles).
        overwrite: Replace an existing output file.
    """
    from cla2.record import run_record, write

    began = time.time()
    args = settings.flatten({k: v for k, v in locals().items() if k not in ("began", "run_record", "write")})
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"output file {output} exists: choose another --output or pass --overwrite")
    records, prompts = read_prompts(input, with_prompt, system_prompt)
    placement, replica = plan.for_inference("generate", model, where.device, where.dtype, where.devices, batch_size)
    batch_size = placement.batch
    groups = replica_processes.groups(placement, replica, where.devices, replicas, len(prompts), "prompts")
    params = [sampling.params(i) for i in range(len(prompts))]
    check_prompts(input, prompts, params, model, adapter, truncate)  # before any model loads or replica starts
    st = status.current()

    def record(generated: int, seconds: float) -> Path:
        write(run_file(output), run_record(
            "generate", args, began, time.time(), input=str(Path(input).resolve()), output=str(output.resolve()),
            prompts=len(records), generated_tokens=generated, generate_seconds=round(seconds, 3),
            generated_tokens_per_s=round(generated / max(seconds, 1e-9), 1), plan=placement.to_json(),
            device_groups=groups))
        return output

    if len(groups) > 1:
        given = {**args, "batch_size": batch_size}
        _, generated, seconds = across_replicas(groups, records, output,
                                                {k: v for k, v in given.items() if k in REPLICA_FLAGS}, sampling.seed)
        return record(generated, seconds)
    engine = Engine.from_pretrained(model, adapter=adapter, device=where.device, dtype=where.dtype,
                                    max_batch_size=batch_size, truncate=truncate,
                                    decode_graphs=decode_graphs, devices=replica,
                                    layer_groups=[s.layers for s in placement.shares])
    try:
        from tqdm import tqdm

        started = time.perf_counter()
        results = []
        st.update("generating", step=0, total=len(prompts), unit="prompt", force=True)
        with tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr) as bar:
            for i in range(0, len(prompts), 4 * batch_size):  # bounded chunks keep the bar moving
                results += engine.generate(prompts[i:i + 4 * batch_size], params[i:i + 4 * batch_size])
                bar.update(len(prompts[i:i + 4 * batch_size]))
                st.update(step=len(results))
        seconds = time.perf_counter() - started
    finally:
        engine.close()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec, r in zip(records, results, strict=True):
            if r.error:
                tmp.unlink()
                raise RuntimeError(f"generation failed: {r.error}")
            out = {**rec, "output": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                   "completion_tokens": r.completion_tokens,
                   "time_to_first_token": round(r.time_to_first_token or 0.0, 4), "seconds": round(r.elapsed, 4)}
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    tmp.replace(output)
    generated = sum(r.completion_tokens for r in results)
    print(f"{len(results)} prompts, {generated} tokens generated in {seconds:.1f}s "
          f"({generated / max(seconds, 1e-9):.1f} generated tokens/s) -> {output}", file=sys.stderr)
    return record(generated, seconds)
