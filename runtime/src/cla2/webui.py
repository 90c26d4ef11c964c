"""The web chat: a gradio ChatInterface that streams through the serving engine.

It is mounted into `cla2 serve` at /chat (same process, same batching engine, same API key as password)
and is never shared through gradio's public tunnel (the seed's demo shared it by default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from cla2.engine import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    Engine,
    InvalidRequest,
    Result,
    SamplingParams,
)
from cla2.prompts import DEFAULT_SYSTEM_PROMPT, build_chat_prompt


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


def build(get_engine: Callable[[], Engine | None]):
    """The gradio Blocks of the chat; ``get_engine`` returns the engine (None while it loads)."""
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
        text = ""
        for piece in pieces:  # closing this generator (the user pressed stop) cancels the request
            if isinstance(piece, Result):
                if piece.error:
                    raise gr.Error(f"generation failed: {piece.error}")
                break
            text += piece
            yield text

    with gr.Blocks(title="Chinese-Alpaca-2 chat") as demo:
        gr.ChatInterface(
            respond,
            title="Chinese-Alpaca-2",
            additional_inputs=[
                gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt"),
                gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature"),
                gr.Slider(1, 4096, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens"),
            ],
        )
    return demo
