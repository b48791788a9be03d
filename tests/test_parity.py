"""Greedy output must match transformers `generate` token for token on the built-in model
(float32), however the engine batches, chunks, preempts or caches."""

from __future__ import annotations

import pytest
import torch

from llmserve import LLM, SamplingParams
from llmserve.model_loader import resolve_model

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who had spent his whole life repairing the clocks of the townsfolk. Every morning "
    "he opened his shop at seven, and every evening he closed it at six. One winter night,",
    "Translate to French: I would like a cup of coffee, please.",
]
# Long prompts that share their first 100+ tokens: prefix-cache hits when run one after another.
SHARED = (
    "You are a careful assistant. Answer briefly and precisely. Use plain words. Avoid jargon. "
    "If you do not know, say so. Never invent facts. Keep answers under fifty words. "
    "Be kind to the user and stay on topic at all times. Question: "
)
SHARED_PROMPTS = [SHARED + q for q in ("What is rain?", "Why is the sky blue?", "What is a prime number?")]


@pytest.fixture(scope="module")
def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    """transformers generate, one prompt at a time (no padding), float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(None).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    out: dict[str, list[int]] = {}
    for prompt in PROMPTS + SHARED_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        out[prompt] = gen[0, ids.shape[1] :].tolist()
    return out


def assert_matches(results: list, prompts: list[str], reference: dict[str, list[int]]) -> None:
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == reference[prompt], f"diverged on {prompt[:40]!r}"


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_one_batch_of_mixed_lengths_matches_transformers(reference: dict, greedy: SamplingParams, backend: str) -> None:
    llm = LLM(dtype="float32", attention_backend=backend)
    assert_matches(llm.generate(PROMPTS, greedy), PROMPTS, reference)


def test_chunked_prefill_matches_transformers(reference: dict, greedy: SamplingParams) -> None:
    # 8-token budget with 6 sequences: the long prompts are prefilled 2-8 tokens at a time
    # while the others decode.
    llm = LLM(dtype="float32", max_num_batched_tokens=8, max_num_seqs=6, attention_backend="torch")
    assert_matches(llm.generate(PROMPTS, greedy), PROMPTS, reference)


def test_preemption_matches_transformers(reference: dict, greedy: SamplingParams) -> None:
    # 14 blocks of 16 tokens cannot hold all six sequences to the end: some get preempted.
    llm = LLM(dtype="float32", num_blocks=14, enable_prefix_caching=False)
    results = llm.generate(PROMPTS, greedy)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches(results, PROMPTS, reference)


def test_preemption_with_prefix_cache_matches_transformers(reference: dict, greedy: SamplingParams) -> None:
    llm = LLM(dtype="float32", num_blocks=14, block_size=16)
    results = llm.generate(PROMPTS, greedy)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches(results, PROMPTS, reference)


def test_prefix_cache_hits_match_transformers(reference: dict, greedy: SamplingParams) -> None:
    llm = LLM(dtype="float32", block_size=16)
    first = llm.generate(SHARED_PROMPTS[:1], greedy)
    rest = llm.generate(SHARED_PROMPTS[1:], greedy)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits >= 2 * 32, "the shared prefix should come from the cache"
    assert_matches(first + rest, SHARED_PROMPTS, reference)


def test_n_choices_share_prompt_blocks_and_match_transformers(reference: dict) -> None:
    llm = LLM(dtype="float32", block_size=16)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, n=3)
    [result] = llm.generate(SHARED_PROMPTS[:1], params)
    assert [c.token_ids for c in result.outputs] == [reference[SHARED_PROMPTS[0]]] * 3
    num_prompt = len(result.prompt_token_ids)
    # choices 1 and 2 reused every full prompt block of choice 0
    assert llm.engine.stats().prefix_cache_hits == 2 * (num_prompt // 16) * 16


def test_bfloat16_runs_and_mostly_agrees(reference: dict, greedy: SamplingParams) -> None:
    llm = LLM(dtype="bfloat16")
    results = llm.generate(PROMPTS, greedy)
    first_tokens_equal = sum(r.token_ids[0] == reference[p][0] for p, r in zip(PROMPTS, results, strict=True))
    assert first_tokens_equal >= len(PROMPTS) - 1
