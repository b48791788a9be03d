"""Several requests at once with `AsyncOpenAI`: the server batches them together (continuous
batching), so they take little longer than one.

    LLMSERVE_BASE_URL=http://127.0.0.1:8000/v1 LLMSERVE_API_KEY=... python clients/sdk_async.py
"""

from __future__ import annotations

import asyncio
import os
import time

from openai import AsyncOpenAI

QUESTIONS = [
    "What is the boiling point of water?",
    "Name a planet of the solar system.",
    "What colour is the sky on a clear day?",
    "How many legs does a spider have?",
]


async def ask(client: AsyncOpenAI, model: str, question: str, max_tokens: int) -> str:
    reply = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


async def main() -> None:
    client = AsyncOpenAI(
        base_url=os.environ.get("LLMSERVE_BASE_URL", "http://127.0.0.1:8000/v1"),
        # The SDK insists on a key; a server started without --api-key accepts any.
        api_key=os.environ.get("LLMSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY") or "no-key",
    )
    model = os.environ.get("LLMSERVE_MODEL") or (await client.models.list()).data[0].id
    max_tokens = int(os.environ.get("LLMSERVE_MAX_TOKENS", "64"))
    print(f"model: {model}")
    start = time.perf_counter()
    answers = await asyncio.gather(*(ask(client, model, q, max_tokens) for q in QUESTIONS))
    elapsed = time.perf_counter() - start
    for question, answer in zip(QUESTIONS, answers, strict=True):
        print(f"Q: {question}\nA: {answer!r}")
    print(f"{len(QUESTIONS)} concurrent requests in {elapsed:.2f} s")
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
