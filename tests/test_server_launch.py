"""How `llmserve serve` configures uvicorn (no server started)."""

from __future__ import annotations

from starlette.applications import Starlette

from llmserve.config import ServerConfig
from llmserve.server.launch import uvicorn_config


def test_uvicorn_runs_on_uvloop_and_httptools() -> None:
    # Both are dependencies: the event loop shares 2 cores with the engine, and the C versions
    # take less of them. Dropping either from the install falls back silently; this notices.
    config = uvicorn_config(Starlette(), ServerConfig(host="127.0.0.1", port=8123, shutdown_grace_s=5.0))
    config.load()
    assert config.http_protocol_class.__module__ == "uvicorn.protocols.http.httptools_impl"
    loop = config.get_loop_factory()()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()
    assert (config.host, config.port, config.timeout_graceful_shutdown) == ("127.0.0.1", 8123, 15)
