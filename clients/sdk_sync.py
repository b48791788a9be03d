"""The official `openai` SDK against llmserve (or any OpenAI-compatible server): one chat
completion and one plain completion, each with its token usage.

    LLMSERVE_BASE_URL=http://127.0.0.1:8000/v1 LLMSERVE_API_KEY=... python clients/sdk_sync.py
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
max_tokens = int(os.environ.get("LLMSERVE_MAX_TOKENS", "64"))
print(f"model: {model}")

chat = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name three primary colours."},
    ],
    max_tokens=max_tokens,
    temperature=0,
)
print(f"chat: {chat.choices[0].message.content!r}")
print(f"chat finish_reason: {chat.choices[0].finish_reason}")
print(f"chat usage: prompt={chat.usage.prompt_tokens} completion={chat.usage.completion_tokens}")

completion = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=max_tokens, temperature=0
)
print(f"completion: {completion.choices[0].text!r}")
print(
    f"completion usage: prompt={completion.usage.prompt_tokens} "
    f"completion={completion.usage.completion_tokens}"
)
