"""A streamed chat completion: text printed as it arrives, then the token usage, which the server
sends in one last chunk when `stream_options={"include_usage": True}`.

    LLMSERVE_BASE_URL=http://127.0.0.1:8000/v1 LLMSERVE_API_KEY=... python clients/sdk_streaming.py
"""

from __future__ import annotations

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("LLMSERVE_BASE_URL", "http://127.0.0.1:8000/v1"),
    # The SDK insists on a key; a server started without --api-key accepts any.
    api_key=os.environ.get("LLMSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY") or "no-key",
)
model = os.environ.get("LLMSERVE_MODEL") or client.models.list().data[0].id
print(f"model: {model}")

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write a haiku about the sea."}],
    max_tokens=int(os.environ.get("LLMSERVE_MAX_TOKENS", "64")),
    stream=True,
    stream_options={"include_usage": True},
)
chunks = 0
usage = None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        chunks += 1
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage is not None:  # only the last chunk, whose `choices` is empty
        usage = chunk.usage
print()
print(f"content chunks: {chunks}")
if usage is not None:
    print(
        f"usage: prompt={usage.prompt_tokens} completion={usage.completion_tokens} total={usage.total_tokens}"
    )
