"""The Starlette app: routes, bearer auth, CORS, the body-size limit, and JSON errors everywhere.

    build_app(AsyncEngine(LLMEngine(config)), config.server)

Every response that is not a success is an OpenAI error object, unknown routes included, and no
input can produce a 500: a 500 means a bug in the server or a failure in the engine.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmserve.config import ServerConfig
from llmserve.server.async_engine import AsyncEngine
from llmserve.server.chat_page import chat_page_routes
from llmserve.server.errors import APIError, bad_request, error_body
from llmserve.server.metrics import CONTENT_TYPE, ServerMetrics
from llmserve.server.responses import TokenText
from llmserve.server.serving import ServerState
from llmserve.server.serving_chat import create_chat_completion
from llmserve.server.serving_completion import create_completion

logger = logging.getLogger("llmserve.server")

Endpoint = Callable[[ServerState, Request], Awaitable[Response]]
Handler = Callable[[ServerState, Request, Any, float], Awaitable[Response]]


def build_app(engine_client: AsyncEngine, config: ServerConfig) -> Starlette:
    """The ASGI app. Its lifespan starts the engine thread and stops it on shutdown."""
    metrics = ServerMetrics(engine_client.stats)
    engine_client.observer = metrics
    state = ServerState(
        client=engine_client,
        config=config,
        model_id=config.served_model_name or engine_client.model_name,
        metrics=metrics,
        tokens=TokenText(engine_client.tokenizer),
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine_client.start()
        logger.info("serving model %r", state.model_id)
        yield
        await engine_client.shutdown()

    routes = [
        Route("/v1/chat/completions", _route(state, _generation(create_chat_completion)), methods=["POST"]),
        Route("/v1/completions", _route(state, _generation(create_completion)), methods=["POST"]),
        Route("/v1/models", _route(state, _list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", _route(state, _get_model), methods=["GET"]),
        # Probes and scrapers carry no key.
        Route("/health", _route(state, _health, auth=False), methods=["GET"]),
        Route("/metrics", _route(state, _metrics, auth=False), methods=["GET"]),
        *chat_page_routes(),  # the page itself needs no key; it sends the one the user types
    ]
    middleware = []
    if config.allowed_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "OpenAI-Organization", "OpenAI-Project"],
        ))  # fmt: skip
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception, Exception: _internal_error},  # type: ignore[dict-item]
    )
    app.state.llm = state
    return app


# ---- route wrappers ----------------------------------------------------------------------


def _route(
    state: ServerState, endpoint: Endpoint, *, auth: bool = True
) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            if auth:
                check_api_key(request, state.config.api_key)
            return await endpoint(state, request)
        except APIError as e:
            if e.status != 499:  # 499: the client left; nobody reads this response
                state.metrics.on_rejected(e.status)
            return e.response()

    return wrapped


def _generation(handler: Handler) -> Endpoint:
    async def endpoint(state: ServerState, request: Request) -> Response:
        arrival = time.monotonic()
        data = await read_json(request, state.config.max_request_body_bytes)
        return await handler(state, request, data, arrival)

    return endpoint


def check_api_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    headers = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "You didn't provide an API key. Provide it in an Authorization header using "
            "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="missing_api_key",
            headers=headers,
        )
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers=headers)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past `limit` bytes (before reading it, when Content-Length tells), 400 if
    it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Invalid Content-Length header.")
        if int(declared) > limit:
            raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad_request(f"We could not parse the JSON body of your request: {e}") from e
    if _SURROGATE_ESCAPE.search(body):  # rare: only then walk the body for unpaired ones
        _reject_lone_surrogates(data)
    return data


# `\ud83d\ude00` is a legal JSON escape of one emoji, but a lone `\ud800` decodes to a str that
# no tokenizer or UTF-8 encoder accepts.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _reject_lone_surrogates(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(
                "The request holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text."
            ) from e
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_lone_surrogates(key)
            _reject_lone_surrogates(item)
    elif isinstance(value, list):
        for item in value:
            _reject_lone_surrogates(item)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413, f"The request body is {size} bytes; the limit is {limit} bytes.", code="request_too_large"
    )


# ---- small endpoints ---------------------------------------------------------------------


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "llmserve",
        "max_model_len": state.client.max_model_len,
    }


async def _list_models(state: ServerState, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def _get_model(state: ServerState, request: Request) -> Response:
    model = request.path_params["model"]
    if model != state.model_id:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    return JSONResponse(_model_card(state))


async def _health(state: ServerState, request: Request) -> Response:
    if state.client.draining:
        raise APIError(503, "The server is shutting down.")
    if (problem := state.client.health()) is not None:
        raise APIError(503, f"The engine is unhealthy: {problem}")
    return JSONResponse({"status": "ok"})


async def _metrics(state: ServerState, request: Request) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


# ---- errors from outside our handlers ----------------------------------------------------


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {
        404: f"Unknown route: {request.method} {request.url.path}",
        405: f"Method {request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, exc.detail)
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(message, type_), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        error_body(f"Internal server error: {type(exc).__name__}", "server_error"), status_code=500
    )
