"""Shared fixtures. The live server is session-scoped: one process, one model load, for every
server test that uses it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from server_helpers import API_KEY, ServerProcess
from tiny_model import make_tiny_llama


def pytest_sessionstart(session: pytest.Session) -> None:
    # On a fresh machine the seven C++ kernels compile on first use, one after another (~6 min on
    # 2 cores); two at a time up front takes about half. A kernel that cannot build is left to its
    # loader, which warns and falls back as it would without this.
    from llmserve_kernels import cpu_ops

    cpu_ops.build_all()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`llmserve serve` on the built-in model, on a 127.0.0.1 port it picks itself, with an API key."""
    log = Path(tmp_path_factory.mktemp("server")) / "server.log"
    proc = ServerProcess(log)
    try:
        proc.wait_healthy()
        yield proc
    finally:
        code = proc.terminate()
        assert code == 0, f"server exited with {code}:\n{proc.log()}"


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder (tests/tiny_model.py), made once and only read by the tests."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same for Qwen3 (q/k norms)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-qwen3"), architecture="qwen3", seed=1)
