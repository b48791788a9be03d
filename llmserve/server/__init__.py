"""The OpenAI-compatible HTTP server.

    api_server    Starlette app: routes, auth, CORS, body limit, JSON errors
    serving_*     the chat and completions endpoints
    protocol      request bodies -> validated requests (SamplingParams)
    responses     OpenAI response and chunk objects, logprobs formats
    async_engine  the bridge: engine loop in its own thread, outputs into asyncio queues
    metrics       Prometheus metrics in a registry of the app's own
    launch        uvicorn, SIGTERM drain, exit codes

Importing this package is light; torch and the model load only in `launch.serve`.
"""

from __future__ import annotations
