"""A tiny stand-in for `LLMEngine` with the same interface, for server tests that need to break
the engine on purpose (exceptions, stalls, failed requests) without loading a model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from llmserve.config import ServerConfig
from llmserve.engine import EngineStats
from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.server.api_server import build_app
from llmserve.server.async_engine import AsyncEngine

FAKE_MODEL = "fake-model"


class FakeTokenizer:
    """Bytes as tokens: vocab 256, id = byte value."""

    chat_template = "role: content"

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, tokenize: bool
    ) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode(errors="replace")

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return ""


@dataclass
class _Seq:
    request_id: str
    index: int
    params: SamplingParams
    prompt_len: int
    poisoned: bool
    produced: int = 0


class FakeEngine:
    """Each step: one letter per live sequence ('a', 'b', ...). A prompt containing 'poison' fails
    with finish_reason 'error' on its first step, as the real engine fails a broken batch."""

    model_name = FAKE_MODEL
    max_model_len = 256
    vocab_size = 256

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.seqs: dict[tuple[str, int], _Seq] = {}
        self.pending: list[RequestOutput] = []
        self.step_delay_s = 0.01
        self.raise_next: BaseException | None = None
        self.always_raise = False
        self.steps = 0

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if len(prompt_token_ids) + (params.max_tokens or 0) > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)}) + max_tokens ({params.max_tokens}) exceeds the "
                f"context window of {self.max_model_len}"
            )
        poisoned = b"poison" in bytes(prompt_token_ids)
        for i in range(params.n):
            self.seqs[(request_id, i)] = _Seq(request_id, i, params, len(prompt_token_ids), poisoned)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        time.sleep(self.step_delay_s)
        if self.always_raise:
            raise RuntimeError("the engine is broken for good")
        if self.raise_next is not None:
            error, self.raise_next = self.raise_next, None
            raise error
        outputs, self.pending = self.pending, []
        for key, seq in list(self.seqs.items()):
            if seq.poisoned:
                del self.seqs[key]
                outputs.append(
                    RequestOutput(
                        seq.request_id,
                        seq.index,
                        [],
                        "",
                        finished=True,
                        finish_reason="error",
                        error="poisoned batch",
                        num_prompt_tokens=seq.prompt_len,
                    )
                )
                continue
            token = ord("a") + seq.produced % 26
            seq.produced += 1
            done = seq.produced >= (seq.params.max_tokens or 16)
            outputs.append(
                RequestOutput(
                    seq.request_id,
                    seq.index,
                    [token],
                    chr(token),
                    finished=done,
                    finish_reason="length" if done else None,
                    num_prompt_tokens=seq.prompt_len,
                    num_output_tokens=seq.produced,
                )
            )
            if done:
                del self.seqs[key]
        return outputs

    def abort(self, request_id: str) -> None:
        for key in [k for k in self.seqs if k[0] == request_id]:
            seq = self.seqs.pop(key)
            self.pending.append(
                RequestOutput(request_id, seq.index, [], "", finished=True, finish_reason="abort")
            )

    def has_unfinished_requests(self) -> bool:
        return bool(self.seqs or self.pending)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.seqs),
            num_waiting=0,
            kv_cache_usage=len(self.seqs) / 100,
            num_blocks=100,
            prefix_cache_queries=0,
            prefix_cache_hits=0,
            num_preemptions=0,
            prompt_tokens=0,
            generation_tokens=0,
        )


@dataclass
class InProcessServer:
    url: str
    engine: FakeEngine
    client: AsyncEngine


@contextmanager
def serve_fake(**server_config: Any) -> Iterator[InProcessServer]:
    """The real app on a FakeEngine, served by uvicorn in a thread on a loopback port."""
    engine = FakeEngine()
    client = AsyncEngine(engine, health_stall_s=server_config.pop("health_stall_s", 30.0))
    app = build_app(client, ServerConfig(**server_config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "in-process server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]  # port 0: the OS picked a free one
    try:
        yield InProcessServer(f"http://127.0.0.1:{port}", engine, client)
    finally:
        server.should_exit = True
        thread.join(20)
