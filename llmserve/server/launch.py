"""Run the server: load the engine, build the app, hand it to uvicorn, drain on SIGTERM, exit 0.

Shutdown, step by step:
  1. SIGTERM/SIGINT: uvicorn stops accepting connections; we start draining (new requests on
     open connections get 503, /health turns 503).
  2. In-flight requests get `shutdown_grace_s` to finish. What still runs then is aborted: a
     stream gets an error event and `[DONE]`, a non-stream request a 503.
  3. The engine thread stops; the process exits 0.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from llmserve.config import EngineConfig, ServerConfig
from llmserve.server.api_server import build_app
from llmserve.server.async_engine import AsyncEngine

logger = logging.getLogger("llmserve.server")


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling us when a shutdown signal arrives (uvicorn itself only stops
    accepting and then waits for open connections)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self._on_exit()
        super().handle_exit(sig, frame)


def uvicorn_config(app: ASGIApp, server_config: ServerConfig, log_level: str = "info") -> uvicorn.Config:
    # loop and http "auto": uvloop and httptools, both dependencies, so that the event loop takes
    # less of the CPU the engine shares with it (measured figures in the README's dependency list).
    return uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=log_level,
        loop="auto",
        http="auto",
        # A backstop only: our own drain ends every request by shutdown_grace_s.
        timeout_graceful_shutdown=int(server_config.shutdown_grace_s) + 10,
    )


def serve(config: EngineConfig, log_level: str = "info") -> int:
    from llmserve.engine import LLMEngine  # torch and the model: only once we really serve

    server_config = config.server
    engine = LLMEngine(config)
    client = AsyncEngine(engine, health_stall_s=server_config.health_stall_s)
    app = build_app(client, server_config)
    uv_config = uvicorn_config(app, server_config, log_level)
    server = _DrainingServer(uv_config, on_exit=lambda: client.request_drain(server_config.shutdown_grace_s))
    # uvicorn re-raises the signal it caught once it is done, under the handler that was there
    # before it; make that one harmless so a drained shutdown exits 0. Installed only now, so a
    # signal during the model load still ends the process at once.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    server.run()
    if not server.started:
        return 1  # e.g. the port was taken; uvicorn has logged why
    logger.info("server stopped")
    return 0
