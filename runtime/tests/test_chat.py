"""`cla2 chat`: the REPL keeps history, /clear forgets it, /exit quits."""

from __future__ import annotations

import subprocess
import sys

from cla2.engine import Engine, SamplingParams
from cla2.prompts import DEFAULT_SYSTEM_PROMPT, build_chat_prompt


def test_chat_repl(tiny_model):
    script = "你好\n再说一遍\n/clear\n你好\n/exit\n这一行不会被读到\n"
    p = subprocess.run([sys.executable, "-m", "cla2", "chat", "--model", str(tiny_model), "--temperature", "0",
                        "--max-new-tokens", "8"], input=script, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "(conversation cleared)" in lines
    answers = [x for x in lines if x != "(conversation cleared)"]
    assert len(answers) == 3
    # greedy: the first and the third answer (after /clear, same question, empty history) are the same,
    # and each equals what the engine answers to that conversation
    assert answers[0] == answers[2]
    e = Engine.from_pretrained(tiny_model)
    try:
        p0 = SamplingParams(temperature=0, max_new_tokens=8)
        first = e.generate([build_chat_prompt([{"role": "user", "content": "你好"}], DEFAULT_SYSTEM_PROMPT)], p0)[0]
        second = e.generate([build_chat_prompt([{"role": "user", "content": "你好"},
                                                {"role": "assistant", "content": first.text},
                                                {"role": "user", "content": "再说一遍"}])], p0)[0]
    finally:
        e.close()
    assert answers[0] == first.text.strip("\n") or answers[0] == first.text
    assert answers[1] == second.text or answers[1] == second.text.strip("\n")
