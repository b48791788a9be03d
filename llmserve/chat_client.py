"""`llmserve chat`: a terminal chat client for any OpenAI-compatible server.

    llmserve chat [--url URL] [--api-key KEY] [--model ID] [--system TEXT] [--temperature T]
                  [--max-tokens N]

Replies stream to stdout as they arrive; everything else (banner, command answers, errors) goes
to stderr, so `echo hi | llmserve chat > reply.txt` captures only the model's words.

It speaks through the official `openai` SDK rather than raw httpx: the SDK is what users of any
OpenAI-compatible server already trust, it turns error objects into typed exceptions with the
status and message, and using it here keeps our own server honest about SDK compatibility.

History policy: Ctrl-C during a reply closes the stream (the server sees the disconnect and
frees the request) and keeps the part already shown, so the conversation sent next is the one
the user saw. If nothing had arrived, or the turn failed with an error, the user's message is
dropped too, so that a retry does not send it twice.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import openai

DEFAULT_URL = "http://127.0.0.1:8000"
# Without a key the SDK refuses to build a client; a server started without --api-key ignores
# whatever bearer token arrives, so any placeholder works there.
_NO_KEY = "no-key"

HELP = """commands:
  /reset         clear the conversation (the system prompt stays)
  /system TEXT   set the system prompt (the conversation stays); /system alone clears it
  /help          this list
  /quit          leave (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while a reply streams stops that reply."""


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    chat = commands.add_parser(
        "chat",
        help="chat in the terminal with an OpenAI-compatible server",
        description="Chat with an OpenAI-compatible server (llmserve or any other), replies streamed "
        "as they arrive. Commands: /reset, /system TEXT, /help, /quit.",
    )
    chat.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"the server, with or without a trailing /v1 (default: {DEFAULT_URL})",
    )
    chat.add_argument(
        "--api-key",
        default=os.environ.get("LLMSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        metavar="KEY",
        help="bearer key (default: $LLMSERVE_API_KEY, else $OPENAI_API_KEY, else none)",
    )
    chat.add_argument(
        "--model", metavar="ID", help="model id (default: the first id the server's /v1/models lists)"
    )
    chat.add_argument("--system", default="", metavar="TEXT", help="system prompt")
    chat.add_argument(
        "--temperature", type=float, metavar="T", help="sampling temperature (default: the server's)"
    )
    chat.add_argument(
        "--max-tokens", type=int, metavar="N", help="reply length limit (default: the server's)"
    )
    chat.set_defaults(run=run)


def base_url_of(url: str) -> str:
    """The SDK's base URL: the server's root with `/v1` appended unless it is already there."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def describe_error(error: Exception, base_url: str) -> str:
    """One line for a failed request: what the server said, or why it could not be reached."""
    return " ".join(_error_text(error, base_url).split())  # a server's message may hold newlines


def _error_text(error: Exception, base_url: str) -> str:
    import openai

    if isinstance(error, openai.APIStatusError):
        # The SDK's own message prefixes "Error code: N - "; the server's words alone read better.
        body = error.body
        detail = body.get("message") if isinstance(body, dict) else None
        code = f" ({error.code})" if error.code else ""
        return f"error: {error.status_code}{code}: {detail or error.message}"
    if isinstance(error, openai.APITimeoutError):
        return f"error: {base_url} did not answer in time"
    if isinstance(error, openai.APIConnectionError):
        return f"error: cannot reach {base_url}: {error.__cause__ or error}"
    if isinstance(error, openai.APIError):  # an error event inside a stream
        return f"error: {error.message}"
    return f"error: {type(error).__name__}: {error}"


@dataclass
class ChatSession:
    client: openai.OpenAI
    base_url: str
    model: str
    system: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    # Looked up when the session is made, so a redirected sys.stdout is honoured.
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    def handle(self, line: str) -> bool:
        """Acts on one input line; False when the user asked to leave."""
        text = line.strip()
        if not text:
            return True
        if not text.startswith("/"):
            self.send(text)
            return True
        command, _, argument = text.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/reset":
            self.history.clear()
            self.note("(conversation cleared)")
        elif command == "/system":
            self.system = argument.strip()
            self.note("(system prompt set)" if self.system else "(system prompt cleared)")
        elif command == "/help":
            self.note(HELP)
        else:
            self.note(f"unknown command {command}; /help lists them")
        return True

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def send(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            interrupted = self._stream_reply(pieces)
        except Exception as e:  # any failed turn is one line; the session goes on
            if pieces:
                self.out.write("\n")
                self.out.flush()
            self.history.pop()
            self.note(describe_error(e, self.base_url))
            return
        self.out.write("\n")
        self.out.flush()
        if interrupted:
            self.note("(reply stopped)")
        if pieces or not interrupted:
            self.history.append({"role": "assistant", "content": "".join(pieces)})
        else:
            self.history.pop()

    def _stream_reply(self, pieces: list[str]) -> bool:
        """Streams one reply to `out`, collecting it in `pieces`; True when Ctrl-C cut it short."""
        extra: dict[str, Any] = {}
        if self.temperature is not None:
            extra["temperature"] = self.temperature
        if self.max_tokens is not None:
            extra["max_tokens"] = self.max_tokens
        stream = None
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=self.messages(), stream=True, **extra
            )
            for chunk in stream:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    pieces.append(delta)
                    self.out.write(delta)
                    self.out.flush()
        except KeyboardInterrupt:
            return True
        finally:
            # Closing drops the connection mid-body, which is how the server learns to abort.
            if stream is not None:
                stream.close()
        return False

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()


def _first_model(client: openai.OpenAI) -> str | None:
    models = client.models.list().data
    return models[0].id if models else None


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import openai

    # Ctrl-C is how a reply is stopped, so it must raise KeyboardInterrupt even when a shell
    # started us with SIGINT ignored (as non-interactive shells do for background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # absent on some platforms; input() still works
            import readline  # noqa: F401 - importing it gives input() line editing and history

    base_url = base_url_of(args.url)
    # No retries: a person is waiting, and a failure should show at once rather than after backoff.
    client = openai.OpenAI(
        base_url=base_url,
        api_key=args.api_key or _NO_KEY,
        max_retries=0,
        timeout=openai.Timeout(600.0, connect=10.0),
    )
    try:
        model = args.model or _first_model(client)
    except KeyboardInterrupt:
        return 0
    except Exception as e:  # without a model there is no session; say why in one line
        print(describe_error(e, base_url), file=sys.stderr)
        return 1
    if model is None:
        print(f"error: {base_url}/models lists no models; pass --model", file=sys.stderr)
        return 1
    session = ChatSession(
        client, base_url, model, system=args.system, temperature=args.temperature, max_tokens=args.max_tokens
    )
    if interactive:
        session.note(f"{model} at {base_url}. /help lists the commands.")
    prompt = "> " if interactive else ""
    while True:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print()
            return 0
        if not session.handle(line):
            return 0
