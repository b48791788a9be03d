"""The bridge between the asyncio HTTP server and the single-threaded `LLMEngine`.

    HTTP handlers --(commands: add / abort)--> engine thread: apply commands, step(), repeat
    HTTP handlers <--(per-request asyncio.Queue)-- outputs, one call_soon_threadsafe per step

Only the engine thread touches the engine. The event loop never waits on a forward pass: an
add is acknowledged by the engine thread between two steps, and outputs arrive on the loop as
one callback per step. The thread sleeps on a condition when there is nothing to do, waking once
a second to refresh the heartbeat that `/health` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmserve.openmp import release_thread_workers
from llmserve.outputs import FinishReason, RequestOutput
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger("llmserve.server")

_IDLE_WAKE_S = 1.0  # heartbeat period while idle
_MAX_CONSECUTIVE_FAILURES = 5  # engine steps that raise in a row before the engine is declared dead


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; nothing more can be served."""


class EngineDrainingError(RuntimeError):
    """The server is shutting down and takes no new requests."""


class RequestObserver(Protocol):
    """What the bridge reports for metrics. Called on the event loop thread."""

    def on_first_token(self, ttft_s: float) -> None: ...
    def on_inter_token(self, itl_s: float) -> None: ...
    def on_queue_time(self, queue_s: float) -> None: ...
    def on_finished(self, reason: FinishReason, e2e_s: float) -> None: ...


class _NullObserver:
    def on_first_token(self, ttft_s: float) -> None: ...
    def on_inter_token(self, itl_s: float) -> None: ...
    def on_queue_time(self, queue_s: float) -> None: ...
    def on_finished(self, reason: FinishReason, e2e_s: float) -> None: ...


class OutputStream:
    """The outputs of one HTTP request: one or more engine requests (a completions `prompt` list)
    sharing one queue. Iterate it until every sequence has finished; `abort()` when leaving early."""

    def __init__(self, client: AsyncEngine, arrival_time: float) -> None:
        self._client = client
        self.arrival_time = arrival_time
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.request_ids: list[str] = []
        self.num_sequences = 0  # n summed over request_ids
        self._num_finished = 0

    @property
    def finished(self) -> bool:
        return self._num_finished >= self.num_sequences

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            out = await self.queue.get()
            if out.finished:
                self._num_finished += 1
            yield out

    def abort(self, reason: str = "client disconnected") -> None:
        """Abort every engine request of this stream that is still running (idempotent)."""
        for request_id in self.request_ids:
            self._client.abort(request_id, reason)


@dataclass
class _Route:
    """Event-loop-side state of one engine request."""

    stream: OutputStream
    unfinished: set[int]
    first_token_seen: bool = False
    last_token_time: dict[int, float] = field(default_factory=dict)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    done: Callable[[BaseException | None], None]


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: Any, *, health_stall_s: float = 30.0) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.vocab_size
        self.observer: RequestObserver = _NullObserver()
        self.health_stall_s = health_stall_s
        self.draining = False

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._commands: deque[_Add | _Abort] = deque()
        self._stop = False
        self._dead: str | None = None
        self._heartbeat = time.monotonic()
        self._stats: Any = None
        self._routes: dict[str, _Route] = {}  # event loop only
        self._pending_adds = 0  # event loop only
        # engine thread only:
        self._live: dict[str, set[int]] = {}
        self._unscheduled: set[str] = set()
        self._failures = 0
        # The engine's live Request objects, read for their first_scheduled_time (queue-time metric).
        self._engine_requests: dict[str, list[Any]] = getattr(engine, "requests", {})

    # ---- lifecycle (event loop) ---------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stats = self.engine.stats()
        self._heartbeat = time.monotonic()
        # This thread loaded the engine; from here on only the engine thread runs torch ops, and
        # this thread's idle OpenMP workers would make libgomp stop spinning (llmserve/openmp.py).
        release_thread_workers()
        self._thread = threading.Thread(target=self._run, name="llmserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        self._fail_routes("server is shutting down", "abort")
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)

    def request_drain(self, grace_s: float) -> None:
        """`begin_drain` from any thread or a signal handler."""
        if self._loop is not None:
            self._call_loop(self.begin_drain, grace_s)

    def begin_drain(self, grace_s: float) -> None:
        """SIGTERM: take no new requests; whatever still runs after `grace_s` is aborted."""
        if self.draining:
            return
        self.draining = True
        logger.info("draining: %d request(s) in flight get %.1f s to finish", len(self._routes), grace_s)
        assert self._loop is not None
        self._loop.call_later(grace_s, self._fail_routes, "server is shutting down", "abort")

    # ---- state for /health, /metrics, admission ------------------------------------------

    def health(self) -> str | None:
        """None when healthy, else why not."""
        if self._dead is not None:
            return self._dead
        if self._thread is None or not self._thread.is_alive():
            return "the engine loop is not running"
        silent = time.monotonic() - self._heartbeat
        if silent > self.health_stall_s:
            return f"the engine loop has made no progress for {silent:.1f} s"
        return None

    def stats(self) -> Any:
        """The `EngineStats` of the latest step (a snapshot taken by the engine thread)."""
        return self._stats

    def num_waiting(self) -> int:
        stats = self._stats
        return self._pending_adds + (stats.num_waiting if stats is not None else 0)

    # ---- requests (event loop) ----------------------------------------------------------

    def open_stream(self, arrival_time: float | None = None) -> OutputStream:
        return OutputStream(self, arrival_time if arrival_time is not None else time.monotonic())

    async def add_request(
        self, stream: OutputStream, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Hand a request to the engine; returns once the engine accepted it.

        Raises ValueError (bad request, as the engine validates it), EngineDeadError or
        EngineDrainingError."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self.draining:
            raise EngineDrainingError("the server is shutting down")
        assert self._loop is not None
        loop = self._loop
        accepted: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:  # engine thread
            loop.call_soon_threadsafe(self._settle, accepted, error)

        # Route first: the engine may produce outputs the moment it has the request.
        self._routes[request_id] = _Route(stream, set(range(params.n)))
        stream.request_ids.append(request_id)
        stream.num_sequences += params.n
        self._pending_adds += 1
        self._submit(_Add(request_id, prompt_token_ids, params, stream.arrival_time, done))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id, "cancelled before it started")
            raise
        except BaseException:
            self._routes.pop(request_id, None)
            stream.request_ids.remove(request_id)
            stream.num_sequences -= params.n
            raise

    def abort(self, request_id: str, reason: str = "client disconnected") -> None:
        route = self._routes.pop(request_id, None)
        if route is None:
            return  # finished, or aborted already
        logger.info("aborting request %s (%s)", request_id, reason)
        now = time.monotonic()
        for _ in route.unfinished:
            self.observer.on_finished("abort", now - route.stream.arrival_time)
        self._submit(_Abort(request_id))

    def _settle(self, accepted: asyncio.Future[None], error: BaseException | None) -> None:
        self._pending_adds -= 1
        if accepted.done():
            return
        if error is None:
            accepted.set_result(None)
        else:
            accepted.set_exception(error)

    def _submit(self, command: _Add | _Abort) -> None:
        with self._cond:
            if self._dead is not None or self._stop:
                if isinstance(command, _Add):  # nobody would ever acknowledge it
                    command.done(EngineDeadError(self._dead or "the engine loop has stopped"))
                return
            self._commands.append(command)
            self._cond.notify()

    def _dispatch(self, outputs: list[RequestOutput], queue_times: list[float]) -> None:
        """Event loop: route one step's outputs to their streams, and record latencies."""
        now = time.monotonic()
        observer = self.observer
        for queue_s in queue_times:
            observer.on_queue_time(queue_s)
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue  # aborted here while the engine was stepping
            if out.new_token_ids:
                if not route.first_token_seen:
                    route.first_token_seen = True
                    observer.on_first_token(now - route.stream.arrival_time)
                last = route.last_token_time.get(out.index)
                if last is not None:
                    observer.on_inter_token(now - last)
                route.last_token_time[out.index] = now
            route.stream.queue.put_nowait(out)
            if out.finished:
                observer.on_finished(out.finish_reason or "error", now - route.stream.arrival_time)
                route.unfinished.discard(out.index)
                if not route.unfinished:
                    del self._routes[out.request_id]

    def _fail_routes(self, message: str, reason: FinishReason) -> None:
        """Event loop: finish every in-flight sequence with `reason` and tell the engine to drop them."""
        if self._routes:
            logger.warning("failing %d request(s): %s", len(self._routes), message)
        outputs = [
            RequestOutput(request_id, index, [], "", finished=True, finish_reason=reason, error=message)
            for request_id, route in self._routes.items()
            for index in sorted(route.unfinished)
        ]
        for request_id in list(self._routes):
            self._submit(_Abort(request_id))
        self._dispatch(outputs, [])

    # ---- the engine thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (commands := self._next_commands()) is not None:
                self._apply(commands)
                if self.engine.has_unfinished_requests():
                    self._step()
                self._heartbeat = time.monotonic()
        except BaseException as e:  # the loop itself broke: nothing can be served any more
            logger.exception("engine loop crashed")
            self._die(f"the engine loop crashed: {type(e).__name__}: {e}")
        else:
            self._die("the engine loop has stopped")

    def _next_commands(self) -> list[_Add | _Abort] | None:
        with self._cond:
            while not self._commands and not self._stop and not self.engine.has_unfinished_requests():
                self._cond.wait(_IDLE_WAKE_S)
                self._heartbeat = time.monotonic()
            if self._stop:
                return None
            commands = list(self._commands)
            self._commands.clear()
        return commands

    def _apply(self, commands: list[_Add | _Abort]) -> None:
        for command in commands:
            if isinstance(command, _Abort):
                self._live.pop(command.request_id, None)
                self._unscheduled.discard(command.request_id)
                try:
                    self.engine.abort(command.request_id)
                except Exception:
                    logger.exception("abort of %s failed", command.request_id)
                continue
            try:
                self.engine.add_request(
                    command.request_id,
                    command.prompt_token_ids,
                    command.params,
                    arrival_time=command.arrival_time,
                )
            except Exception as e:  # ValueError: the client's fault; anything else: reported the same way
                command.done(e)
                continue
            self._live[command.request_id] = set(range(command.params.n))
            self._unscheduled.add(command.request_id)
            command.done(None)
        if commands:
            self._stats = self.engine.stats()  # so admission control sees the new waiting requests

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
            self._failures = 0
        except Exception as e:
            # The engine fails a broken batch itself; this is the backstop for anything that escapes.
            self._failures += 1
            logger.exception("engine step failed (%d in a row)", self._failures)
            if self._failures >= _MAX_CONSECUTIVE_FAILURES:
                raise
            outputs = self._fail_live(f"engine step failed: {type(e).__name__}: {e}")
            time.sleep(min(1.0, 0.05 * 2**self._failures))  # let a transient fault pass
        for out in outputs:
            if out.finished and (live := self._live.get(out.request_id)) is not None:
                live.discard(out.index)
                if not live:
                    del self._live[out.request_id]
        queue_times = self._queue_times()
        self._stats = self.engine.stats()
        if outputs or queue_times:
            self._call_loop(self._dispatch, outputs, queue_times)

    def _fail_live(self, message: str) -> list[RequestOutput]:
        outputs = []
        for request_id, indices in self._live.items():
            outputs.extend(
                RequestOutput(request_id, i, [], "", finished=True, finish_reason="error", error=message)
                for i in sorted(indices)
            )
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("abort of %s failed", request_id)
        self._live.clear()
        self._unscheduled.clear()
        return outputs

    def _queue_times(self) -> list[float]:
        """Arrival -> first scheduled, for requests the scheduler picked up in this step."""
        times: list[float] = []
        for request_id in list(self._unscheduled):
            choices = self._engine_requests.get(request_id)
            first = choices[0].first_scheduled_time if choices else None
            if choices and first is None:
                continue
            self._unscheduled.discard(request_id)
            if first is not None:
                times.append(max(0.0, first - choices[0].arrival_time))
        return times

    def _die(self, reason: str) -> None:
        with self._cond:
            self._dead = reason
            pending, self._commands = list(self._commands), deque()
        for command in pending:
            if isinstance(command, _Add):
                command.done(EngineDeadError(reason))
        self._call_loop(self._fail_routes, reason, "error")

    def _call_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone, nobody listens
            self._loop.call_soon_threadsafe(fn, *args)
