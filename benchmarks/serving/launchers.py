"""Start and stop the servers that compare_servers.py puts side by side, one at a time, on loopback.

Each launcher returns a `ServerSpec`: the command, its environment, and what the benchmark must send
to get the same work from it (the model id, and how to make it ignore EOS).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

STARTUP_TIMEOUT_S = 600.0
TRANSFORMERS_PAGE_SIZE = 256  # ContinuousBatchingConfig.page_size's default (transformers 5.23)  # llmserve's first start converts the built-in GGUF
_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: list[str]
    description: str  # printed and saved: what runs, at which dtype, threads
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    port: int | None = None  # None: started on port 0, the port is read from its uvicorn log line
    model: str | None = None  # the id to request; None: the first of /v1/models
    ignore_eos_field: bool = True  # whether the server takes vLLM's `ignore_eos`
    extra_body: dict[str, Any] = field(default_factory=dict)  # sent with every request


class RunningServer:
    """A server subprocess whose output goes to a log file (a pipe could fill up and block it)."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{spec.port}" if spec.port else ""
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        self.proc = subprocess.Popen(spec.command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if not self.url:
                bound = _LISTENING.search(self.log_path.read_text(errors="replace"))
                if bound is None:
                    time.sleep(0.5)
                    continue
                self.url = f"http://127.0.0.1:{bound.group(1)}"
            try:
                # llama-server answers 503 while it loads the model; the others listen only once loaded.
                if httpx.get(f"{self.url}/health", timeout=5, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.spec.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def free_port() -> int:
    """A port free right now, for servers that cannot bind port 0 and report it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llmserve_spec(dtype: str, extra_args: list[str]) -> ServerSpec:
    command = [sys.executable, "-m", "llmserve.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    command += ["--dtype", dtype, *extra_args]
    return ServerSpec(
        name="llmserve",
        command=command,
        description=f"llmserve serve, built-in model, {dtype}",
    )


def transformers_spec(
    model_dir: Path, dtype: str, parallel: int, slot_tokens: int, extra_args: list[str]
) -> ServerSpec:
    """`transformers serve --continuous-batching` on the same converted folder llmserve loads.

    It refuses unknown request fields with a 422, `ignore_eos` among them; a per-request
    `generation_config` with `eos_token_id: -1` does the same job (its continuous-batching manager takes
    the EOS ids from each request, and -1 means none). It also needs FastAPI: the `benchmarks` extra.

    Its KV cache is sized to the workload (`--cb-num-blocks`, unless `extra_args` sets it): on CPU the
    default takes 60% of free RAM (13.7 GB RSS on this 24 GB machine), and decoding was slower with it
    (40 against 60-80 output tok/s at 8 concurrent requests, on a busy machine).
    """
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir)]
    command += ["--continuous-batching", "--device", "cpu", "--dtype", dtype]
    command += ["--host", "127.0.0.1", "--port", "0"]
    if "--cb-num-blocks" not in extra_args:
        # Room for `parallel` requests of `slot_tokens` each, in whole pages, and 10% slack.
        pages = math.ceil(1.1 * parallel * math.ceil(slot_tokens / TRANSFORMERS_PAGE_SIZE))
        command += ["--cb-num-blocks", str(pages)]
    command += extra_args
    # Offline: the model is a local folder, and the CLI's update check must not reach out.
    # OpenMP waiting as llmserve sets it for itself (llmserve/__init__.py: a short spin, then
    # sleep), unless the environment chooses: a server has other threads that want the cores.
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        env["GOMP_SPINCOUNT"] = "10000"
    openmp = ", ".join(f"{k}={v}" for k, v in env.items() if k.startswith(("OMP_", "GOMP_"))) or "OpenMP from the environment"
    return ServerSpec(
        name="transformers", command=command, env=env, model=str(model_dir), ignore_eos_field=False,
        extra_body={"generation_config": json.dumps({"eos_token_id": -1})},
        description=f"transformers serve --continuous-batching, {dtype}, {openmp}",
    )  # fmt: skip


def find_llama_server(given: str | None) -> tuple[str | None, str]:
    """(path, "") when llama-server can run, else (None, why not)."""
    if given:
        path = Path(given).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path), ""
        return None, f"--llama-server {given} is not an executable file"
    found = shutil.which("llama-server")
    if found:
        return found, ""
    return None, "llama-server is not on PATH (pass --llama-server PATH to include llama.cpp)"


def llama_spec(binary: str, gguf: Path, threads: int, parallel: int, slot_context: int) -> ServerSpec:
    """llama.cpp's server on the built-in GGUF as shipped (Q4_1: llama.cpp runs its quantized blocks
    directly, so it does less arithmetic per token than the others, which dequantize). One slot per
    concurrent request, each with room for a prompt and its answer."""
    port = free_port()
    command = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads)]
    command += ["-tb", str(threads), "-np", str(parallel), "-c", str(parallel * slot_context)]
    return ServerSpec(
        name="llama.cpp", command=command, port=port,
        description=f"llama-server {gguf.name} (Q4_1), {threads} threads, {parallel} slots x {slot_context} context",
    )  # fmt: skip
