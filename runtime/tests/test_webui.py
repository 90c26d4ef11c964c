"""The web chat in headless Chromium: type a message, read the streamed answer."""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
import time

import pytest

from cla2.engine import Engine, Result, SamplingParams
from cla2.serve import create_app

pytestmark = pytest.mark.browser


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.fail("the web chat test needs Debian's chromium and chromium-driver packages "
                    "(apt-get install -y chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="cla2-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_web_chat_streams_an_answer(tiny_model, browser):
    """Every wait is for a condition (the page, the engine's answer, the browser showing all of it), with a
    generous limit that only a broken chat reaches."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve import Server

    engine = Engine.from_pretrained(tiny_model, name="tiny")
    seen: dict = {"chunks": 0, "results": []}
    real_stream = engine.stream

    def recording_stream(prompt, params=None):
        seen["prompt"], seen["params"] = prompt, params
        # The chat's own settings (temperature 0.2, 512 new tokens) are recorded; the random model answers
        # greedily in 32 tokens: the same short answer on every run, instead of 512 sampled tokens that the
        # browser renders as one markdown update per token (which took longer than the old 30 s under load)
        # and whose random markup could render as other words.
        short = dataclasses.replace(params or SamplingParams(), temperature=0.0, max_new_tokens=32)
        for piece in real_stream(prompt, short):
            if isinstance(piece, Result):
                seen["results"].append(piece)
            elif piece:
                seen["chunks"] += 1
            yield piece

    engine.stream = recording_stream
    server = Server(create_app(engine, web=True))
    try:
        browser.get(server.url + "/chat/")
        wait = WebDriverWait(browser, 60)
        # the chat's input box (the system prompt is a textarea too)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "textarea[placeholder='Type a message...']"))
        box.send_keys("你好，请介绍一下你自己")
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: seen["results"])
        want = re.sub(r"[\W_]", "", seen["results"][0].text)
        assert want, "the engine produced an empty answer"

        shown = {"text": None}

        def bot_text(d):
            # the chatbot renders markdown: compare the words, not the markup and spacing
            els = d.find_elements(By.CSS_SELECTOR, "[data-testid='bot']")
            shown["text"] = re.sub(r"[\W_]", "", els[-1].text) if els else ""
            return shown["text"]

        # the browser may still be rendering the stream when the engine is done; gradio re-renders the
        # message while it streams, so an element can go stale between finding it and reading it
        try:
            WebDriverWait(browser, 120, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
                          ).until(lambda d: bot_text(d) == want)
        except TimeoutException:
            raise AssertionError(f"the page shows {shown['text']!r}, the engine answered {want!r}") from None
        assert "你好，请介绍一下你自己" in seen["prompt"] and seen["prompt"].startswith("[INST] <<SYS>>")
        assert (seen["params"].temperature, seen["params"].max_new_tokens) == (0.2, 512)  # the chat's settings
        assert seen["chunks"] > 1  # it arrived in pieces
    finally:
        server.stop()
        engine.close()


def effective_limits(demo) -> set:
    """The concurrency limit each of the Blocks' events runs under ("default": the queue's default)."""
    default = demo._queue.default_concurrency_limit
    return {default if fn.concurrency_limit == "default" else fn.concurrency_limit for fn in demo.fns.values()}


def test_web_chat_answers_users_together_and_sends_no_telemetry():
    """gradio runs one event at a time by default: one user's long answer would queue every other one."""
    import os

    from cla2.webui import build

    demo = build(lambda: None, concurrency_limit=5)
    assert effective_limits(demo) == {5}
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert demo.analytics_enabled is False
    assert all(b.analytics_enabled is False for b in demo.blocks.values() if hasattr(b, "analytics_enabled"))


def test_idle_server_with_web_chat_uses_about_no_cpu(tiny_model):
    """An idle server (API + web chat) must not poll: CPU time of this process over idle seconds, a
    resource bound. gradio's queue polled every 1 ms (about 4% of a core here); the lowest of three 1 s
    windows is taken, so a stray collection or another test's thread cannot fail it."""
    from test_serve import Server

    engine = Engine.from_pretrained(tiny_model, name="tiny")
    server = Server(create_app(engine, web=True))
    try:
        import httpx

        assert httpx.get(server.url + "/chat/", timeout=30).status_code == 200
        time.sleep(1)
        windows = []
        for _ in range(3):
            c0, t0 = time.process_time(), time.perf_counter()
            time.sleep(1)
            windows.append((time.process_time() - c0) / (time.perf_counter() - t0))
        assert min(windows) < 0.015, f"idle CPU per second: {windows}"
    finally:
        server.stop()
        engine.close()
