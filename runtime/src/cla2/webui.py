"""The web chat: a gradio ChatInterface that streams through the serving engine.

It is mounted into `cla2 serve` at /chat (same process, same batching engine, same API key as password)
and is never shared through gradio's public tunnel (the seed's demo shared it by default).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from cla2.engine import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    Engine,
    InvalidRequest,
    QueueFull,
    Result,
    SamplingParams,
)
from cla2.prompts import DEFAULT_SYSTEM_PROMPT, build_chat_prompt

# No telemetry to gradio's servers from an operator's host: the variable covers what gradio reports
# outside a Blocks (its version check, its usage events), analytics_enabled=False below each Blocks.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

# gradio's queue polls while it is idle: every 1 ms for new events and every 10 ms for progress, some 4%
# of a core on the CPUs tested for a server nobody uses. These intervals (its Windows values for the
# first) bound that to a fraction of a percent; a web chat message waits at most 50 ms more to start.
QUEUE_POLL_S = 0.05
PROGRESS_POLL_S = 0.25


def _text(content) -> str:
    """gradio hands history content as a string or as a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def to_messages(message, history: list, system_prompt: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for turn in history:
        if isinstance(turn, dict):
            msgs.append({"role": turn["role"], "content": _text(turn.get("content"))})
        else:  # (user, assistant) pairs, older gradio
            msgs += [{"role": "user", "content": _text(turn[0])}, {"role": "assistant", "content": _text(turn[1])}]
    msgs.append({"role": "user", "content": _text(message)})
    return msgs


def build(get_engine: Callable[[], Engine | None], concurrency_limit: int = 8):
    """The gradio Blocks of the chat; ``get_engine`` returns the engine (None while it loads).

    ``concurrency_limit``: answers generated at once. gradio runs one at a time by default, so one
    user's long answer would hold every other user in its queue while the engine batches nobody; the
    server passes its batch size, so the web chat's users share the batch as API clients do."""
    import gradio as gr

    def respond(message, history, system_prompt: str, temperature: float, max_new_tokens: float
                ) -> Iterator[str]:
        engine = get_engine()
        if engine is None:
            raise gr.Error("the model is still loading: try again in a moment")
        prompt = build_chat_prompt(to_messages(message, history, system_prompt or DEFAULT_SYSTEM_PROMPT))
        params = SamplingParams(temperature=float(temperature), max_new_tokens=int(max_new_tokens))
        try:
            pieces = engine.stream(prompt, params)
        except InvalidRequest as exc:
            raise gr.Error(str(exc)) from None
        except QueueFull:
            raise gr.Error("the server is busy: try again in a moment") from None
        text = ""
        for piece in pieces:  # closing this generator (the user pressed stop) cancels the request
            if isinstance(piece, Result):
                if piece.error:
                    raise gr.Error(f"generation failed: {piece.error}")
                break
            text += piece
            yield text

    with gr.Blocks(title="Chinese-Alpaca-2 chat", analytics_enabled=False) as demo:
        gr.ChatInterface(
            respond,
            title="Chinese-Alpaca-2",
            analytics_enabled=False,
            concurrency_limit=concurrency_limit,
            additional_inputs=[
                gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt"),
                gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature"),
                gr.Slider(1, 4096, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens"),
            ],
        )
    demo.queue(default_concurrency_limit=concurrency_limit)
    queue = getattr(demo, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(queue.sleep_when_free, QUEUE_POLL_S)
        queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, PROGRESS_POLL_S)
    return demo
