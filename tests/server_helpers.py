"""Helpers for the HTTP server tests: a real `llmserve serve` process on a loopback port of its choosing,
a Prometheus text parser, and raw SSE reading."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

MODEL = "SmolLM2-135M-Instruct"
API_KEY = "test-key"
STARTUP_TIMEOUT_S = 600.0  # the very first run converts the built-in GGUF
REPO = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


class ServerProcess:
    """`python -m llmserve.cli serve` in a subprocess, its log in a file (a pipe could fill and block it)."""

    def __init__(self, log_path: Path, *args: str) -> None:
        # Port 0: the server binds a free port itself and logs it, so no other process can take
        # the port between our choosing it and the server binding it.
        self.url = ""
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
        command = [
            sys.executable,
            "-m",
            "llmserve.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--api-key",
            API_KEY,
            *args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if not self.url:
                bound = _LISTENING.search(self.log_path.read_text(errors="replace"))
                if bound is None:
                    time.sleep(0.25)
                    continue
                self.url = f"http://127.0.0.1:{bound.group(1)}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not healthy after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def terminate(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value, for every sample line of a Prometheus text page."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def wait_for(predicate: Any, timeout_s: float = 30.0, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


def sse_data(lines: list[str]) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [line[len("data:") :].strip() for line in lines if line.startswith("data:")]


def sse_events(text: str) -> list[Any]:
    """Decoded JSON events of an SSE body; `[DONE]` kept as the string."""
    return [d if d == "[DONE]" else json.loads(d) for d in sse_data(text.splitlines())]


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def chat_body(content: str = "Say hello.", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }
