"""The Alpaca-2 chat template, shared by training, inference and evaluation.

Single turn (what the seed's build_dataset.py trains on)::

    [INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{instruction} [/INST]

An instruction with a non-empty ``input`` becomes ``instruction + "\n" + input``. A conversation puts the
previous answers after each ``[/INST]`` followed by ``</s>``, and each later question in
``<s>[INST] {question} [/INST]`` as the seed's gradio demo does.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. 你是一个乐于助人的助手。"

TEMPLATE = "[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{instruction} [/INST]"
TEMPLATE_NO_SYSTEM = "[INST] {instruction} [/INST]"


def join_instruction(instruction: str, input: str | None = None) -> str:
    """Alpaca records: the optional input goes on a new line after the instruction."""
    return f"{instruction}\n{input}" if input else instruction


def build_prompt(instruction: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """One user turn wrapped in the template (no answer). ``system_prompt=None`` leaves the block out."""
    if system_prompt is None:
        return TEMPLATE_NO_SYSTEM.format(instruction=instruction)
    return TEMPLATE.format(system_prompt=system_prompt, instruction=instruction)


def build_chat_prompt(messages: Sequence[dict], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """OpenAI-style messages (role system/user/assistant) to the Alpaca-2 conversation text.

    A ``system`` message replaces the default system prompt. The text ends after the last user turn's
    ``[/INST]``, ready for the model to answer. The leading ``<s>`` is left to the tokenizer; the
    ``</s><s>`` between turns are written out as the seed's demo does.
    """
    turns: list[tuple[str, str | None]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message content must be a string, got {type(content).__name__}")
        if role == "system":
            system_prompt = content
        elif role == "user":
            turns.append((content, None))
        elif role == "assistant":
            if not turns or turns[-1][1] is not None:
                raise ValueError("an assistant message must follow a user message")
            turns[-1] = (turns[-1][0], content)
        else:
            raise ValueError(f"unknown message role {role!r}: use system, user or assistant")
    if not turns or turns[-1][1] is not None:
        raise ValueError("the conversation must end with a user message")
    text = ""
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            text += build_prompt(question, system_prompt)
        else:
            text += "</s><s>" + TEMPLATE_NO_SYSTEM.format(instruction=question)
        if answer is not None:
            text += " " + answer
    return text
