"""The chat page at `/`, driven in a real browser (the system's chromium through Playwright) against the
live server: streaming, multi-turn history, Stop aborting the engine request, and Markdown that
cannot inject HTML. Screenshots go to test-artifacts/."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from server_helpers import API_KEY, MODEL, REPO, ServerProcess, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page, Request, Route

pytestmark = pytest.mark.slow

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ABORTS = 'llmserve:request_finished_total{finished_reason="abort"}'
RUNNING = "llmserve:num_requests_running"
GENERATED = "llmserve:generation_tokens_total"
CHAT_URL = "**/v1/chat/completions"


@dataclass
class Chat:
    page: Page
    errors: list[str] = field(default_factory=list)  # uncaught exceptions in the page's scripts
    requests: list[Request] = field(default_factory=list)  # POSTs to /v1/chat/completions

    def settings(self, *, max_tokens: int, temperature: float = 0, system: str = "") -> None:
        self.page.fill("#max-tokens", str(max_tokens))
        self.page.fill("#temperature", str(temperature))
        self.page.fill("#system-prompt", system)

    def send(self, text: str) -> Locator:
        """Types `text` and presses Enter; the new assistant message."""
        count = self.page.locator(".message.assistant").count()
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")
        reply = self.page.locator(".message.assistant").nth(count)
        reply.wait_for()
        return reply

    def wait_done(self, reply: Locator, timeout_s: float = 60) -> None:
        reply.locator(".meta").wait_for(timeout=timeout_s * 1000)
        assert "streaming" not in (reply.get_attribute("class") or "")

    def reply_state(self) -> tuple[bool, int]:
        """(still streaming, length of the text shown) of the last assistant message, read at once."""
        streaming, length = self.page.evaluate(
            """() => {
                const m = [...document.querySelectorAll('.message.assistant')].pop();
                return [m.classList.contains('streaming'), m.querySelector('.content').textContent.length];
            }"""
        )
        return streaming, length


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")


def sse_reply(pieces: list[str]) -> str:
    """A chat.completion.chunk stream, as the server would send it, whose text is `pieces`."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": choices,
            "usage": usage,
        }

    def choice(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    events = [chunk([choice({"role": "assistant", "content": ""})])]
    events += [chunk([choice({"content": piece})]) for piece in pieces]
    events.append(chunk([choice({}, "stop")]))
    events.append(
        chunk([], {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)})
    )
    return "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events) + "data: [DONE]\r\n\r\n"


def fulfil_with(pieces: list[str]) -> Any:
    def handle(route: Route) -> None:
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=sse_reply(pieces))

    return handle


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); the chat page test needs one")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]'); the chat page test needs it")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_chat(browser: Browser, server: ServerProcess, *, api_key: str = API_KEY, **context: Any) -> Chat:
    ctx = browser.new_context(viewport={"width": 1280, "height": 800}, **context)
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    chat = Chat(page)
    page.on("pageerror", lambda error: chat.errors.append(str(error)))
    page.on(
        "request",
        lambda r: chat.requests.append(r) if r.url.endswith("/v1/chat/completions") else None,
    )
    page.goto(f"{server.url}/")
    page.fill("#api-key", api_key)
    page.press("#api-key", "Tab")  # the key is applied on change, as a user leaving the field does
    return chat


@pytest.fixture
def chat(browser: Browser, server: ServerProcess) -> Iterator[Chat]:
    chat = open_chat(browser, server)
    yield chat
    chat.page.context.close()
    assert chat.errors == [], f"uncaught errors in the page: {chat.errors}"


@pytest.fixture
def unsafe_chat(browser: Browser, server: ServerProcess) -> Iterator[Chat]:
    """The page with its Content-Security-Policy switched off, so a test of the renderer cannot pass
    only because the CSP blocked what the renderer let through."""
    chat = open_chat(browser, server, bypass_csp=True)
    yield chat
    chat.page.context.close()
    assert chat.errors == [], f"uncaught errors in the page: {chat.errors}"


def wait_for_model_list(chat: Chat) -> None:
    chat.page.wait_for_function(
        "model => document.querySelector('#model').value === model", arg=MODEL, timeout=10_000
    )


# ---- the routes (no browser) ------------------------------------------------------------------


def test_page_and_assets_are_served_without_a_key_and_unknown_assets_are_json_404s(
    server: ServerProcess,
) -> None:
    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/static/chat.js">' in page.text

    for asset, kind in [("chat.js", "javascript"), ("markdown.js", "javascript"), ("chat.css", "text/css")]:
        response = httpx.get(f"{server.url}/static/{asset}", timeout=10)
        assert response.status_code == 200, asset
        assert kind in response.headers["content-type"], (asset, response.headers["content-type"])

    missing = httpx.get(f"{server.url}/static/nothing-here.js", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "Unknown route: GET /static/nothing-here.js"
    # The page is open; the API behind it is still not.
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401


# ---- against the live model -----------------------------------------------------------------


def test_reply_streams_shows_ttft_and_speed_and_second_turn_sends_the_history(
    chat: Chat, server: ServerProcess
) -> None:
    page = chat.page
    wait_for_model_list(chat)
    system = "You are a helpful assistant."
    chat.settings(max_tokens=64, temperature=0, system=system)
    generated = wait_for(lambda: (m := server.metrics())[RUNNING] == 0 and m)[GENERATED]
    first = "Describe the Moon in a few sentences."
    reply = chat.send(first)

    assert page.locator("#send").is_disabled()
    assert page.locator("#stop").is_visible()
    samples = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        streaming, length = chat.reply_state()
        if not streaming:
            break
        samples.append(length)
        time.sleep(0.05)
    shown = [n for n in samples if n > 0]
    growth = sum(b > a for a, b in itertools.pairwise(shown))
    assert len(set(shown)) >= 3 and growth >= 2, f"the reply did not grow while streaming: {samples}"
    chat.wait_done(reply)

    [request] = chat.requests
    sent = json.loads(request.post_data or "")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["model"], sent["max_tokens"], sent["temperature"]) == (MODEL, 64, 0)
    meta = reply.locator(".meta")
    assert re.fullmatch(r"TTFT \d+( ms|\.\d\d s)", meta.locator(".ttft").inner_text())
    assert re.fullmatch(r"\d+\.\d tok/s", meta.locator(".rate").inner_text())
    # The count comes from the usage chunk, not from counting chunks ("≈" would mark an estimate),
    # so it is what the server generated.
    assert meta.locator(".tokens").inner_text() == f"{server.metrics()[GENERATED] - generated:.0f} tokens"
    assert not page.locator("#stop").is_visible()
    screenshot(page, "chat_page_conversation.png")

    # Shift+Enter is a newline in the message, not a send.
    page.fill("#input", "Now say it")
    page.press("#input", "Shift+Enter")
    page.locator("#input").press_sequentially("in one sentence.")
    assert page.locator(".message.user").count() == 1
    second = page.input_value("#input")
    assert second == "Now say it\nin one sentence."
    page.press("#input", "Enter")
    reply2 = page.locator(".message.assistant").nth(1)
    chat.wait_done(reply2)

    assert len(chat.requests) == 2
    history = json.loads(chat.requests[1].post_data or "")["messages"]
    assert [(m["role"], m["content"]) for m in history if m["role"] != "assistant"] == [
        ("system", system),
        ("user", first),
        ("user", second),
    ]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    # The reply goes back as the Markdown it was, which renders to exactly the text shown.
    shown = chat.page.evaluate(
        """async (markdown) => {
            const { renderMarkdown } = await import('/static/markdown.js');
            const box = document.createElement('div');
            box.append(renderMarkdown(markdown));
            return box.textContent;
        }""",
        history[2]["content"],
    )
    assert history[2]["content"].strip() and shown == reply.locator(".content").text_content()
    assert reply2.locator(".content").inner_text().strip()

    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, "chat_page_narrow.png")


def test_stop_aborts_the_request_on_the_server_and_the_page_stays_usable(
    chat: Chat, server: ServerProcess
) -> None:
    page = chat.page
    wait_for_model_list(chat)
    before = wait_for(lambda: (m := server.metrics())[RUNNING] == 0 and m)
    chat.settings(max_tokens=1000)
    reply = chat.send("Write a long, detailed essay about the history of computers, with many sections.")
    page.wait_for_function(
        "() => document.querySelector('.message.assistant:last-child .content').textContent.length > 0"
    )
    assert server.metrics()[RUNNING] == 1
    page.click("#stop")

    chat.wait_done(reply)
    assert reply.locator(".meta .stopped").inner_text() == "stopped"
    assert page.locator("#stop").is_hidden()
    after = wait_for(lambda: (m := server.metrics())[ABORTS] > before[ABORTS] and m, timeout_s=15)
    assert after, "the server never aborted the request the page stopped"
    assert after[ABORTS] == before[ABORTS] + 1
    assert wait_for(lambda: server.metrics()[RUNNING] == 0, timeout_s=15)

    # Usable again: a new turn goes out and completes.
    chat.settings(max_tokens=8)
    assert page.locator("#send").is_disabled()  # empty input
    chat.wait_done(chat.send("Say hi."))
    assert len(chat.requests) == 2
    stopped_text = reply.locator(".content").inner_text()
    history = json.loads(chat.requests[1].post_data or "")["messages"]
    # The part of the reply that was shown before Stop is part of the conversation.
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["content"].split() == stopped_text.split()


def test_server_errors_are_shown_and_the_message_is_not_kept_in_the_history(
    browser: Browser, server: ServerProcess
) -> None:
    chat = open_chat(browser, server, api_key="wrong-key")
    page = chat.page
    try:
        status = page.locator("#status")
        status.filter(has_text="Incorrect API key provided.").wait_for()
        reply = chat.send("Hello?")
        error = reply.locator(".error")
        error.wait_for()
        assert "Incorrect API key provided. Set the API key in Settings." in error.inner_text()
        assert "unsent" in (page.locator(".message.user").last.get_attribute("class") or "")
        assert page.input_value("#input") == "Hello?"  # given back, to send again
        assert not page.locator("#send").is_disabled()
        assert chat.errors == []
    finally:
        page.context.close()


# ---- rendering, with crafted replies ------------------------------------------------------------


def test_html_in_a_reply_is_shown_as_text_and_never_runs(unsafe_chat: Chat) -> None:
    page = unsafe_chat.page
    wait_for_model_list(unsafe_chat)
    pieces = [
        "Look: <scr",
        "ipt>window.__pwned = 1</script> and ",
        '<img src=x onerror="window.__pwned = 2">',
        " and [click](javascript:window.__pwned=3)",
        ' and <a href="javascript:window.__pwned=4">y</a> <svg onload="window.__pwned=5"></svg>',
    ]
    page.route(CHAT_URL, fulfil_with(pieces))
    reply = unsafe_chat.send("Show me some HTML.")
    unsafe_chat.wait_done(reply)
    content = reply.locator(".content")

    text = content.inner_text()
    assert "<script>window.__pwned = 1</script>" in text
    assert '<img src=x onerror="window.__pwned = 2">' in text
    assert "[click](javascript:window.__pwned=3)" in text
    assert content.locator("script, img, svg, iframe, a").count() == 0
    page.wait_for_timeout(300)  # an onerror would fire after the failed image load
    assert page.evaluate("window.__pwned") is None


def test_markdown_reply_renders_code_blocks_and_inline_styles(chat: Chat) -> None:
    page = chat.page
    wait_for_model_list(chat)
    pieces = [
        "Here is code:\n\n``",
        "`python\ndef add(a, b):\n",
        "    return a + b\n```\n\nCall `add(1, 2)`",
        " for **three**, *quickly*:\n\n- one\n- two\n\n",
        "See [the docs](https://example.com/docs).",
    ]
    page.route(CHAT_URL, fulfil_with(pieces))
    reply = chat.send("Show me a Python function.")
    chat.wait_done(reply)
    content = reply.locator(".content")

    code = content.locator("pre > code")
    assert code.inner_text() == "def add(a, b):\n    return a + b"
    assert code.get_attribute("data-lang") == "python"
    assert content.locator("p > code").inner_text() == "add(1, 2)"
    assert content.locator("strong").inner_text() == "three"
    assert content.locator("em").inner_text() == "quickly"
    assert content.locator("ul > li").all_inner_texts() == ["one", "two"]
    link = content.locator("a")
    assert link.get_attribute("href") == "https://example.com/docs"
    assert link.get_attribute("rel") == "noopener noreferrer nofollow"
    assert reply.locator(".meta .tokens").inner_text() == f"{len(pieces)} tokens"
    screenshot(page, "chat_page_markdown.png")
    page.emulate_media(color_scheme="dark")
    screenshot(page, "chat_page_markdown_dark.png")


def test_new_chat_starts_from_an_empty_history(chat: Chat) -> None:
    page = chat.page
    wait_for_model_list(chat)
    page.route(CHAT_URL, fulfil_with(["Hello", " there."]))
    chat.wait_done(chat.send("First conversation."))
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    assert page.locator("#empty").is_visible()
    chat.wait_done(chat.send("Second conversation."))
    messages = json.loads(chat.requests[1].post_data or "")["messages"]
    assert messages == [{"role": "user", "content": "Second conversation."}]


# Markdown in, HTML out (the copy button's bar left out). Each case pins one rule of the renderer.
MARKDOWN_CASES = [
    (
        "a *b* **c** ***d*** ~~e~~ `f`",
        "<p>a <em>b</em> <strong>c</strong> <strong><em>d</em></strong> <del>e</del> <code>f</code></p>",
    ),
    ("*a **b** c*", "<p><em>a <strong>b</strong> c</em></p>"),
    ("snake_case_name, 2 * 3 * 4 and **open", "<p>snake_case_name, 2 * 3 * 4 and **open</p>"),
    ("\\*not em\\* and \\`not code\\`", "<p>*not em* and `not code`</p>"),
    ("line one\nline two\n\nnext", "<p>line one<br>line two</p><p>next</p>"),
    ("<b>x</b> & <script>", "<p>&lt;b&gt;x&lt;/b&gt; &amp; &lt;script&gt;</p>"),
    ("# Title\n> quoted\n\n---", "<h1>Title</h1><blockquote><p>quoted</p></blockquote><hr>"),
    (
        "- a\n- b\n  - c\n\n1. x\n2. y",
        '<ul class="tight"><li><p>a</p></li><li><p>b</p><ul class="tight"><li><p>c</p></li></ul></li></ul>'
        '<ol class="tight"><li><p>x</p></li><li><p>y</p></li></ol>',
    ),
    ("3. three\n4. four", '<ol start="3" class="tight"><li><p>three</p></li><li><p>four</p></li></ol>'),
    (
        "```js\nlet a = '<b>';\n```\nafter",
        '<div class="code-block"><pre><code data-lang="js">let a = \'&lt;b&gt;\';</code></pre></div><p>after</p>',
    ),
    ("~~~\nstill streaming", '<div class="code-block"><pre><code>still streaming</code></pre></div>'),
    (
        "[ok](https://example.com/a) [bad](javascript:alert(1)) [rel](/x)",
        '<p><a href="https://example.com/a" rel="noopener noreferrer nofollow" target="_blank">ok</a>'
        " [bad](javascript:alert(1)) [rel](/x)</p>",
    ),
    (
        "see https://example.com/b). or <http://x.org>",
        '<p>see <a href="https://example.com/b" rel="noopener noreferrer nofollow" target="_blank">'
        'https://example.com/b</a>). or <a href="http://x.org/" rel="noopener noreferrer nofollow" '
        'target="_blank">http://x.org</a></p>',
    ),
]


def test_markdown_renderer_cases(chat: Chat) -> None:
    rendered = chat.page.evaluate(
        """async (cases) => {
            const { renderMarkdown } = await import('/static/markdown.js');
            return cases.map((text) => {
                const box = document.createElement('div');
                box.append(renderMarkdown(text));
                box.querySelectorAll('.code-bar').forEach((bar) => bar.remove());
                return box.innerHTML;
            });
        }""",
        [text for text, _ in MARKDOWN_CASES],
    )
    for (text, expected), got in zip(MARKDOWN_CASES, rendered, strict=True):
        assert got == expected, f"{text!r}:\n got      {got}\n expected {expected}"


def test_deeply_nested_quotes_are_capped_not_a_stack_overflow(chat: Chat) -> None:
    depth, text = chat.page.evaluate(
        """async () => {
            const { renderMarkdown } = await import('/static/markdown.js');
            const box = document.createElement('div');
            box.append(renderMarkdown('>'.repeat(20000) + ' deep'));
            return [box.querySelectorAll('blockquote').length, box.textContent];
        }"""
    )
    assert 1 <= depth <= 20
    assert text.endswith("deep")
