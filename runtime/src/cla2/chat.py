"""`cla2 chat`: an interactive conversation in the terminal, streamed through the engine.

Type a message and press Enter. ``/clear`` forgets the conversation, ``/exit`` (or Ctrl-D) quits. When the
conversation outgrows the model's window, the oldest turns are dropped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cla2 import plan, settings
from cla2.engine import ContextTooLong, Engine, Result
from cla2.prompts import DEFAULT_SYSTEM_PROMPT, build_chat_prompt
from cla2.settings import Placement, Sampling


@settings.grouped
def main(
    *,
    model: Path,
    adapter: Path | None = None,
    where: Placement = Placement(),
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    sampling: Sampling = Sampling(),
    decode_graphs: bool | None = None,
) -> None:
    """Chat with the model in the terminal (/clear forgets the history, /exit quits).

    Args:
        model: Model folder (merged, or the base model when --adapter is given).
        adapter: LoRA adapter folder, merged at load time.
        where: Device kind, devices and dtype (cla2.settings.Placement: --device, --devices, --dtype).
        system_prompt: System prompt of the Alpaca-2 template.
        sampling: How answers are sampled (cla2.settings.Sampling: --temperature, --top-k, --top-p,
            --repetition-penalty, --max-new-tokens, --seed; turn i uses seed + i).
        decode_graphs: Decode through static KV caches (a batch padded to 1, 2, 4, 8... rows) and CUDA graphs
            (torch.compile; default: on for CUDA only; the first step of each batch and cache size waits while it
            compiles).
    """
    placement, replica = plan.for_inference("chat", model, where.device, where.dtype, where.devices, 1)
    engine = Engine.from_pretrained(model, adapter=adapter, device=where.device, dtype=where.dtype, max_batch_size=1,
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
            params = sampling.params(turn)
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
