"""Seeded, offline workloads: the same seed and token counter give the same prompts on every run and
against every server.

- `random`: prompts of random real words, each a single token of the counter, so a prompt of n words
  is n tokens long (checked, and trimmed or extended when it is not).
- `prefix`: groups of requests that share a long prefix (a system prompt, a document), followed by a
  per-request random suffix: what prefix caching is for.
- `chat`: multi-turn conversations built from templates, ending in a user question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from serving.tokenizer import TokenCounter


@dataclass(frozen=True)
class SampleRequest:
    prompt: str  # the completions prompt (a chat conversation flattened to "User: ..." lines)
    prompt_len: int  # tokens of `prompt` by the counter, before any chat template a server adds
    output_len: int  # max_tokens of the request
    messages: list[dict[str, str]] = field(default_factory=list)  # chat messages; empty: one user turn


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "random"
    num_prompts: int = 100
    seed: int = 0
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0  # lengths are uniform in [len * (1 - r), len * (1 + r)]
    prefix_len: int = 256
    num_prefix_groups: int = 4
    chat_max_turns: int = 4  # earlier user/assistant exchanges before the final question

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; choose from {sorted(DATASETS)}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError("--random-range-ratio must be in [0, 1)")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("--num-prompts, --random-input-len and --random-output-len must be >= 1")
        if self.name == "prefix" and (self.prefix_len < 1 or self.num_prefix_groups < 1):
            raise ValueError("--prefix-len and --num-prefix-groups must be >= 1")


def sample_requests(cfg: DatasetConfig, counter: TokenCounter) -> list[SampleRequest]:
    rng = random.Random(cfg.seed)
    words = counter.word_pool()
    return DATASETS[cfg.name](cfg, counter, words, rng)


def _length(rng: random.Random, length: int, ratio: float) -> int:
    low, high = max(1, round(length * (1 - ratio))), max(1, round(length * (1 + ratio)))
    return rng.randint(low, high)


def word_text(rng: random.Random, words: list[str], num_tokens: int, counter: TokenCounter) -> str:
    """Random words that tokenize to exactly `num_tokens` (the leading space is kept: without it the
    first word could split into two tokens)."""
    picked = [rng.choice(words) for _ in range(num_tokens)]
    # One word is one token by construction; this guards against tokenizers that merge across words.
    for _ in range(8):
        excess = counter.count("".join(picked)) - num_tokens
        if excess == 0:
            break
        if excess > 0:
            del picked[-excess:]
        else:
            picked.extend(rng.choice(words) for _ in range(-excess))
    return "".join(picked)


def _random(
    cfg: DatasetConfig, counter: TokenCounter, words: list[str], rng: random.Random
) -> list[SampleRequest]:
    requests = []
    for _ in range(cfg.num_prompts):
        in_len, out_len = (
            _length(rng, cfg.input_len, cfg.range_ratio),
            _length(rng, cfg.output_len, cfg.range_ratio),
        )
        prompt = word_text(rng, words, in_len, counter)
        requests.append(SampleRequest(prompt, counter.count(prompt), out_len))
    return requests


def _prefix(
    cfg: DatasetConfig, counter: TokenCounter, words: list[str], rng: random.Random
) -> list[SampleRequest]:
    prefixes = [word_text(rng, words, cfg.prefix_len, counter) for _ in range(cfg.num_prefix_groups)]
    requests = []
    for i in range(cfg.num_prompts):
        # Round-robin, so consecutive requests hit different groups and each group's first request
        # is a cold prefill: the cache earns its hits from the later ones.
        suffix = word_text(rng, words, _length(rng, cfg.input_len, cfg.range_ratio), counter)
        prompt = prefixes[i % cfg.num_prefix_groups] + suffix
        out_len = _length(rng, cfg.output_len, cfg.range_ratio)
        requests.append(SampleRequest(prompt, counter.count(prompt), out_len))
    return requests


_SYSTEM = [
    "You are a helpful assistant. Answer clearly and briefly.",
    "You are a patient tutor who explains things step by step.",
    "You are a friendly assistant for a small {noun} shop.",
]
_TOPICS = [
    "the history of tea", "how volcanoes form", "planting tomatoes", "learning to swim", "the water cycle",
    "baking sourdough bread", "saving money each month", "training a puppy", "how trains work",
    "the phases of the moon", "writing a cover letter", "fixing a flat bicycle tyre", "the rules of chess",
    "making a budget for a trip", "why the sky is blue", "keeping houseplants alive",
]  # fmt: skip
_NOUNS = ["book", "garden", "bicycle", "coffee", "music", "toy", "bakery", "camera", "shoe", "map"]
_ADJECTIVES = ["simple", "careful", "quick", "cheap", "safe", "common", "useful", "gentle", "clear", "old"]
_QUESTIONS = [
    "Can you tell me about {topic}?",
    "I'm curious about {topic}. Where should I start?",
    "What is the most {adj} thing to know about {topic}?",
    "My friend asked me about {topic} and I did not know what to say. Can you help?",
    "Explain {topic} as if I were ten years old.",
]
_FOLLOW_UPS = [
    "Thanks. What about the {adj} part you mentioned?",
    "Could you give me {num} more examples?",
    "How does that relate to a {noun}?",
    "Is there a {adj} mistake people often make here?",
    "Can you say that again in fewer words?",
]
_ANSWER_SENTENCES = [
    "{topic_cap} is easier to understand once you see the {adj} idea behind it.",
    "Most people start with {num} basic steps and add detail later.",
    "A {adj} example is to compare it with a {noun}.",
    "The key point is to be {adj} and patient.",
    "Many guides list {num} rules, but only a few really matter.",
    "If you remember one thing, remember that it takes practice.",
    "You can read more about it in any {adj} book on the subject.",
]


def _fill(template: str, rng: random.Random, topic: str) -> str:
    return template.format(
        topic=topic, topic_cap=topic[0].upper() + topic[1:], noun=rng.choice(_NOUNS),
        adj=rng.choice(_ADJECTIVES), num=rng.randint(2, 9),
    )  # fmt: skip


def _chat(
    cfg: DatasetConfig, counter: TokenCounter, words: list[str], rng: random.Random
) -> list[SampleRequest]:
    del words  # conversations come from the templates
    requests = []
    for _ in range(cfg.num_prompts):
        topic = rng.choice(_TOPICS)
        messages = [{"role": "system", "content": _fill(rng.choice(_SYSTEM), rng, topic)}]
        messages.append({"role": "user", "content": _fill(rng.choice(_QUESTIONS), rng, topic)})
        for _turn in range(rng.randint(0, cfg.chat_max_turns)):
            answer = " ".join(_fill(s, rng, topic) for s in rng.sample(_ANSWER_SENTENCES, rng.randint(2, 5)))
            messages.append({"role": "assistant", "content": answer})
            messages.append({"role": "user", "content": _fill(rng.choice(_FOLLOW_UPS), rng, topic)})
        prompt = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\nAssistant:"
        out_len = _length(rng, cfg.output_len, cfg.range_ratio)
        requests.append(SampleRequest(prompt, counter.count(prompt), out_len, messages))
    return requests


DATASETS = {"random": _random, "prefix": _prefix, "chat": _chat}
