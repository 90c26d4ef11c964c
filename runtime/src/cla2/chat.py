"""`cla2 chat`: an interactive conversation in the terminal, streamed through the engine.

Type a message and press Enter. ``/clear`` forgets the conversation, ``/exit`` (or Ctrl-D) quits. When the
conversation outgrows the model's window, the oldest turns are dropped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cla2 import plan
from cla2.engine import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    ContextTooLong,
    Engine,
    Result,
    SamplingParams,
)
from cla2.prompts import DEFAULT_SYSTEM_PROMPT, build_chat_prompt


def main(
    *,
    model: Path,
    adapter: Path | None = None,
    device: str | None = None,
    devices: list[int] | None = None,
    dtype: str | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int | None = None,
    decode_graphs: bool | None = None,
) -> None:
    """Chat with the model in the terminal (/clear forgets the history, /exit quits).

    Args:
        model: Model folder (merged, or the base model when --adapter is given).
        adapter: LoRA adapter folder, merged at load time.
        device: mlu, cuda or cpu (default: the best available).
        devices: Device indices of this replica, e.g. 0,1: the layers are spread over them (default: the
            plan's first group, as few devices as the model fits on; see `cla2 plan`).
        dtype: fp32, fp16, bf16 or auto.
        system_prompt: System prompt of the Alpaca-2 template.
        temperature: Sampling temperature; 0 is greedy.
        top_k: Sample among the k most likely tokens (0: all).
        top_p: Nucleus sampling threshold.
        repetition_penalty: Penalty for tokens already seen (1: none).
        max_new_tokens: Most tokens per answer.
        seed: Random seed (answer i uses seed + i).
        decode_graphs: Decode a request that runs alone through a static KV cache and a CUDA graph (torch.compile;
            default: on for CUDA only; the first request of each cache size waits while it compiles).
    """
    placement, replica = plan.for_inference("chat", model, device, dtype, devices, 1)
    engine = Engine.from_pretrained(model, adapter=adapter, device=device, dtype=dtype, max_batch_size=1,
                                    decode_graphs=decode_graphs, devices=replica,
                                    layer_groups=[s.layers for s in placement.shares])
    interactive = sys.stdin.isatty()
    out = sys.stdout
    history: list[dict] = []
    turn = 0
    if interactive:
        print("cla2 chat: /clear forgets the conversation, /exit quits", file=out)
    try:
        while True:
            if interactive:
                out.write("\n>>> ")
                out.flush()
            line = sys.stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.strip() == "/exit":
                break
            if text.strip() == "/clear":
                history.clear()
                print("(conversation cleared)", file=out, flush=True)
                continue
            messages = history + [{"role": "user", "content": text}]
            params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                                    seed=None if seed is None else seed + turn)
            while True:
                try:
                    pieces = engine.stream(build_chat_prompt([{"role": "system", "content": system_prompt},
                                                              *messages]), params)
                    break
                except ContextTooLong as exc:
                    if len(messages) <= 1:
                        print(f"error: {exc}", file=sys.stderr, flush=True)
                        pieces = None
                        break
                    messages = messages[2:]  # forget the oldest question and answer
            if pieces is None:
                continue
            answer = ""
            for piece in pieces:
                if isinstance(piece, Result):
                    if piece.error:
                        print(f"\nerror: {piece.error}", file=sys.stderr, flush=True)
                    break
                answer += piece
                out.write(piece)
                out.flush()
            out.write("\n")
            out.flush()
            history = messages + [{"role": "assistant", "content": answer}]
            turn += 1
    finally:
        engine.close()
