"""Sampler: processors, filters, seeded draws and logprobs, on small random logits (no model).

Every test runs twice: on the torch path, and with the fused C++ pass for the random rows
(kernels/csrc/sampler_cpu.cpp, `Sampler(sample_rows=...)`), which the engine uses on CPU."""

from __future__ import annotations

import math
from itertools import count
from typing import Any

import pytest
import torch

from llmserve.outputs import TokenLogprob
from llmserve.request import Request
from llmserve.sampler import Sampler, SamplerOutput, _apply_top_k_top_p_min_p, apply_logits_processors
from llmserve.sampling_params import SamplingParams
from llmserve_kernels import cpu_ops

TorchSampler = Sampler

VOCAB = 32
_ids = count()


def make_request(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: frozenset[int] = frozenset(),
    index: int = 0,
    request_id: str | None = None,
    **params: object,
) -> Request:
    request = Request(
        request_id=request_id or f"req-{next(_ids)}",
        prompt_token_ids=prompt or [1, 2, 3],
        sampling_params=SamplingParams(**params),  # type: ignore[arg-type]
        eos_token_ids=eos,
        index=index,
    )
    for token in output or []:
        request.num_computed_tokens = request.num_tokens
        request.append_token(token)
    return request


@pytest.fixture(params=["torch", "fused"], autouse=True)
def sampler_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """`Sampler` in this module: the torch path, or with the fused C++ pass for random rows."""
    if request.param == "fused":
        module = cpu_ops.load_sampler()
        assert module is not None, "the C++ sampler did not build (see the log)"

        class FusedSampler(TorchSampler):
            def __init__(self, vocab_size: int, seed: int = 0, **kwargs: Any) -> None:
                super().__init__(vocab_size, seed, sample_rows=module.sample_rows, **kwargs)

        monkeypatch.setitem(globals(), "Sampler", FusedSampler)
    return str(request.param)


def random_logits(rows: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * 3  # [rows, vocab]


# ---- seeds -----------------------------------------------------------------------------------


def _run_seeded(position: int, batch_size: int, steps: int, neighbour_seed: int) -> list[int]:
    """Sample the same seeded request for `steps` steps at `position` among random neighbours."""
    sampler = Sampler(VOCAB, seed=neighbour_seed)
    target = make_request(request_id="target", seed=1234, temperature=0.9, top_k=20, top_p=0.95,
                          repetition_penalty=1.1)
    neighbour_rng = torch.Generator().manual_seed(neighbour_seed)
    tokens: list[int] = []
    for step in range(steps):
        neighbours = [
            make_request(
                temperature=float(torch.rand(1, generator=neighbour_rng)) + 0.1 if j % 3 else 0.0,
                top_k=int(torch.randint(0, 10, (1,), generator=neighbour_rng)),
                seed=None if j % 2 else 99 + j,
                presence_penalty=0.5,
                logprobs=2,
            )
            for j in range(batch_size - 1)
        ]
        batch = [*neighbours[:position], target, *neighbours[position:]]
        logits = random_logits(batch_size, seed=10_000 + neighbour_seed * 100 + step)
        # The target's row is the same at every step whatever the batch looks like.
        logits[position] = random_logits(1, seed=step)[0]
        out = sampler.sample(logits, batch)
        token = out.token_ids[position]
        target.num_computed_tokens = target.num_tokens
        target.append_token(token)
        tokens.append(token)
    return tokens


def test_seeded_request_independent_of_batch_neighbours_and_position() -> None:
    alone = _run_seeded(position=0, batch_size=1, steps=20, neighbour_seed=1)
    assert _run_seeded(position=0, batch_size=5, steps=20, neighbour_seed=2) == alone
    assert _run_seeded(position=3, batch_size=5, steps=20, neighbour_seed=3) == alone
    assert _run_seeded(position=6, batch_size=7, steps=20, neighbour_seed=4) == alone
    assert len(set(alone)) > 1  # really sampled, not a degenerate constant


def _seeded_tokens(seed: int, index: int = 0, steps: int = 30) -> list[int]:
    sampler = Sampler(VOCAB)
    request = make_request(seed=seed, index=index, request_id="r")
    return [sampler.sample(random_logits(1, seed=step), [request]).token_ids[0] for step in range(steps)]


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    assert _seeded_tokens(7) == _seeded_tokens(7)
    assert _seeded_tokens(7) != _seeded_tokens(8)
    # The n choices of one seeded request use seed + index, so they differ too.
    assert _seeded_tokens(7, index=0) != _seeded_tokens(7, index=1)


def test_unseeded_sampling_reproducible_from_constructor_seed() -> None:
    def run(seed: int) -> list[int]:
        sampler = Sampler(VOCAB, seed=seed)
        requests = [make_request() for _ in range(4)]
        return [t for step in range(10) for t in sampler.sample(random_logits(4, step), requests).token_ids]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_free_restarts_the_seeded_stream() -> None:
    sampler = Sampler(VOCAB)
    request = make_request(seed=5, request_id="r")
    logits = torch.zeros(1, VOCAB)  # uniform: the draw is pure noise
    first = [sampler.sample(logits, [request]).token_ids[0] for _ in range(10)]
    continued = [sampler.sample(logits, [request]).token_ids[0] for _ in range(10)]
    sampler.free(request.key)
    sampler.free(("never-seen", 0))  # no error
    restarted = [sampler.sample(logits, [request]).token_ids[0] for _ in range(10)]
    assert restarted == first
    assert continued != first


@pytest.mark.parametrize("vocab", [VOCAB, 512])  # padded to the CDF's block size, and a whole number of blocks
def test_sampling_follows_the_distribution(vocab: int) -> None:
    probs = torch.zeros(vocab)
    # Mass on both sides of a block boundary (256) when the vocabulary has more than one block.
    heavy = [0, 1, 2] if vocab <= 256 else [0, 255, 256]
    probs[heavy] = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(4000, vocab)  # [4000, V]
    sampler = Sampler(vocab)
    requests = [make_request() for _ in range(4000)]
    tokens = torch.tensor(sampler.sample(logits, requests).token_ids)
    frequencies = torch.bincount(tokens, minlength=vocab).float() / len(tokens)
    assert torch.allclose(frequencies[heavy], probs[heavy], atol=0.03)
    assert frequencies.sum() - frequencies[heavy].sum() == 0


# ---- filters ---------------------------------------------------------------------------------


def _nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """Smallest most-likely-first set whose mass reaches top_p, computed the slow obvious way."""
    allowed: set[int] = set()
    mass = 0.0
    for token in probs.argsort(descending=True).tolist():
        if mass >= top_p:
            break
        allowed.add(token)
        mass += float(probs[token])
    return allowed


def _draw_many(logits_row: torch.Tensor, draws: int, **params: object) -> set[int]:
    sampler = Sampler(VOCAB, seed=3)
    requests = [make_request(**params) for _ in range(draws)]
    out = sampler.sample(logits_row.expand(draws, VOCAB), requests)
    return set(out.token_ids)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_samples_outside_top_k(k: int) -> None:
    row = random_logits(1, seed=k)[0]
    allowed = set(row.argsort(descending=True)[:k].tolist())
    seen = _draw_many(row, 2000, top_k=k, temperature=1.5)
    assert seen <= allowed
    assert len(seen) == k  # the whole allowed set is reachable (flat-ish at temperature 1.5)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9])
def test_top_p_never_samples_outside_nucleus(top_p: float) -> None:
    row = random_logits(1, seed=int(top_p * 100))[0] / 3  # flatter, so the nucleus has several tokens
    allowed = _nucleus(row.double().softmax(-1), top_p)
    seen = _draw_many(row, 3000, top_p=top_p)
    assert seen <= allowed
    assert len(seen) == len(allowed)  # and the nucleus is not cut shorter than it should be


def test_top_p_keeps_the_top_token_even_when_it_alone_exceeds_top_p() -> None:
    row = torch.full((VOCAB,), -10.0)
    row[7] = 10.0
    assert _draw_many(row, 200, top_p=0.01) == {7}


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.8])
def test_min_p_never_samples_below_threshold(min_p: float) -> None:
    row = random_logits(1, seed=int(min_p * 100))[0] / 2
    probs = row.softmax(-1)
    allowed = set(torch.nonzero(probs >= min_p * probs.max()).flatten().tolist())
    seen = _draw_many(row, 3000, min_p=min_p)
    assert seen <= allowed
    assert len(seen) == len(allowed)


def test_top_k_top_p_min_p_combined_and_mixed_per_row() -> None:
    row = random_logits(1, seed=42)[0] / 2
    top5 = row.argsort(descending=True)[:5].tolist()
    sampler = Sampler(VOCAB, seed=11)
    # Alternate filtered and unfiltered rows: each row's filter must stay in its row.
    requests = [make_request(top_k=5) if i % 2 == 0 else make_request() for i in range(4000)]
    out = sampler.sample(row.expand(4000, VOCAB), requests)
    filtered = set(out.token_ids[0::2])
    unfiltered = set(out.token_ids[1::2])
    assert filtered <= set(top5)
    assert not unfiltered <= set(top5)


def test_top_p_one_masks_nothing_even_when_float_cumsum_saturates() -> None:
    # One dominant token: in float32 the cumulative mass hits 1.0 at once, so a naive
    # "mass_before >= top_p" would cut the (tiny but valid) tail of a top_p == 1 row.
    row = torch.zeros(VOCAB)
    row[0] = 25.0
    requests = [make_request(top_p=1.0), make_request(top_p=0.5)]  # the 0.5 row forces the sort path
    filtered = _apply_top_k_top_p_min_p(row.expand(2, VOCAB).clone(), requests)
    assert torch.isfinite(filtered[0]).all()
    assert torch.isfinite(filtered[1]).sum() == 1


def test_top_k_then_top_p_then_min_p_in_one_batch() -> None:
    row = random_logits(1, seed=77)[0] / 4  # flat enough that each filter bites differently
    order = row.argsort(descending=True).tolist()
    top6 = order[:6]
    # top_p after top_k works on the probabilities renormalised over the k survivors.
    renormalised = torch.full((VOCAB,), float("-inf"))
    renormalised[top6] = row[top6]
    allowed_k_p = _nucleus(renormalised.double().softmax(-1), 0.6)
    allowed_p = _nucleus(row.double().softmax(-1), 0.6)
    probs_k3 = torch.full((VOCAB,), float("-inf"))
    probs_k3[order[:3]] = row[order[:3]]
    probs_k3 = probs_k3.softmax(-1)
    allowed_k_min_p = set(torch.nonzero(probs_k3 >= 0.7 * probs_k3.max()).flatten().tolist())
    assert allowed_k_p < set(top6) and allowed_k_p != allowed_p and len(allowed_k_min_p) < 3

    kinds = [dict(top_k=6, top_p=0.6), dict(top_p=0.6), dict(top_k=3, min_p=0.7), dict()]
    expected = [allowed_k_p, allowed_p, allowed_k_min_p, set(range(VOCAB))]
    draws = 6000
    requests = [make_request(**kinds[i % 4]) for i in range(draws)]
    out = Sampler(VOCAB, seed=5).sample(row.expand(draws, VOCAB), requests)
    for kind, allowed in enumerate(expected):
        seen = set(out.token_ids[kind::4])
        assert seen <= allowed, kinds[kind]
        if kind < 3:
            assert seen == allowed, kinds[kind]


def test_temperature_flattens_and_sharpens() -> None:
    row = torch.zeros(VOCAB)
    row[0] = 2.0
    hot = _draw_many(row, 2000, temperature=5.0)
    cold = _draw_many(row, 2000, temperature=0.05)
    assert cold == {0}
    assert len(hot) > VOCAB // 2


# ---- logits processors -----------------------------------------------------------------------


def test_no_processing_returns_logits_unchanged() -> None:
    logits = random_logits(2, seed=0)
    requests = [make_request(output=[1, 2]), make_request(temperature=0.0)]
    assert apply_logits_processors(logits, requests) is logits


def test_repetition_penalty_matches_hand_computed() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0], [2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    requests = [
        make_request(prompt=[0, 1], output=[1, 4], repetition_penalty=2.0),  # seen: 0, 1, 4
        make_request(prompt=[0], output=[1]),  # no penalty: row untouched
    ]
    original = logits.clone()
    processed = apply_logits_processors(logits, requests)
    expected_row0 = torch.tensor([1.0, -4.0, 1.0, -1.0, 0.25, 3.0])
    assert torch.equal(processed[0], expected_row0)
    assert torch.equal(processed[1], original[1])
    assert torch.equal(logits, original)  # input not modified in place


def test_presence_and_frequency_penalty_match_hand_computed() -> None:
    logits = torch.zeros(2, 6)
    requests = [
        # Prompt tokens do not count for OpenAI penalties: token 5 is only in the prompt.
        make_request(prompt=[5, 5], output=[1, 1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25),
        make_request(prompt=[5], output=[3], presence_penalty=-1.0),
    ]
    processed = apply_logits_processors(logits, requests)
    expected = torch.tensor(
        [
            [0.0, -(0.5 + 3 * 0.25), -(0.5 + 0.25), 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
        ]
    )
    assert torch.allclose(processed, expected)


def test_logit_bias_added_per_row() -> None:
    logits = torch.ones(3, 6)
    requests = [
        make_request(logit_bias={0: 5.0, 4: -100.0}),
        make_request(),
        make_request(logit_bias={5: -1.5}),
    ]
    processed = apply_logits_processors(logits, requests)
    expected = torch.ones(3, 6)
    expected[0, 0] = 6.0
    expected[0, 4] = -99.0
    expected[2, 5] = -0.5
    assert torch.equal(processed, expected)


def test_all_processors_compose_in_order() -> None:
    # bias first, then repetition (sign decided after bias), then presence/frequency.
    logits = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    request = make_request(
        prompt=[0], output=[1, 1], logit_bias={0: -3.0, 2: 4.0}, repetition_penalty=2.0,
        presence_penalty=1.0, frequency_penalty=0.5,
    )
    processed = apply_logits_processors(logits, [request])
    # token 0: 1 - 3 = -2, seen in prompt -> -4; token 1: 1 / 2 = 0.5, then -1 - 2*0.5 -> -1.5;
    # token 2: -1 + 4 = 3, not seen -> 3; token 3: untouched.
    assert torch.allclose(processed, torch.tensor([[-4.0, -1.5, 3.0, 0.0]]))


def test_bias_and_penalties_apply_to_greedy() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 1.0
    sampler = Sampler(VOCAB)
    assert sampler.sample(logits, [make_request(temperature=0.0)]).token_ids == [3]
    assert sampler.sample(logits, [make_request(temperature=0.0, logit_bias={9: 2.0})]).token_ids == [9]
    penalised = make_request(temperature=0.0, output=[3], presence_penalty=2.0, logit_bias={5: 0.5})
    assert sampler.sample(logits, [penalised]).token_ids == [5]


def test_min_tokens_blocks_eos_and_stop_token_ids() -> None:
    eos = frozenset({0, 1})
    logits = torch.zeros(4, VOCAB)
    logits[:, [0, 1, 2]] = 10.0  # EOS 0, 1 and stop token 2 would otherwise win
    requests = [
        make_request(eos=eos, output=[5], min_tokens=2, stop_token_ids=[2]),  # 1 < 2: blocked
        make_request(eos=eos, output=[5, 6], min_tokens=2, stop_token_ids=[2]),  # reached: free
        make_request(eos=eos, output=[5], min_tokens=2, stop_token_ids=[2], ignore_eos=True),
        make_request(eos=eos, min_tokens=3, stop_token_ids=[99]),  # out-of-vocab stop id ignored
    ]
    processed = apply_logits_processors(logits, requests)
    inf = float("-inf")
    assert processed[0, :3].tolist() == [inf, inf, inf]
    assert processed[1, :3].tolist() == [10.0, 10.0, 10.0]
    # ignore_eos: EOS is just a token (and never ends the request), but stop_token_ids still do.
    assert processed[2, :3].tolist() == [10.0, 10.0, inf]
    assert processed[3, :3].tolist() == [inf, inf, 10.0]
    assert torch.equal(processed[:, 3:], logits[:, 3:])


def test_min_tokens_end_to_end_never_samples_eos_early() -> None:
    eos = frozenset({0})
    logits = torch.zeros(500, VOCAB)
    logits[:, 0] = 5.0
    sampler = Sampler(VOCAB)
    early = [make_request(eos=eos, min_tokens=1) for _ in range(500)]
    assert 0 not in sampler.sample(logits, early).token_ids
    late = [make_request(eos=eos, min_tokens=1, output=[4]) for _ in range(500)]
    assert 0 in sampler.sample(logits, late).token_ids


# ---- greedy and logprobs ---------------------------------------------------------------------


def test_greedy_picks_argmax_in_mixed_batch() -> None:
    logits = random_logits(6, seed=5)
    requests = [make_request(temperature=0.0) if i % 2 == 0 else make_request() for i in range(6)]
    out = Sampler(VOCAB).sample(logits, requests)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids[0::2] == logits[0::2].argmax(-1).tolist()


def test_logprobs_are_raw_with_rank_and_sorted_top() -> None:
    logits = random_logits(4, seed=8)
    requests = [
        make_request(logprobs=3, temperature=0.7, presence_penalty=1.5, output=[1, 2, 3]),
        make_request(),  # did not ask
        make_request(logprobs=0, temperature=0.0, logit_bias={4: 50.0}),  # greedy picks biased token 4
        make_request(logprobs=5, top_k=4),
    ]
    out = Sampler(VOCAB).sample(logits, requests)
    raw = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    assert out.token_ids[2] == 4
    for row in (0, 2, 3):
        entry = out.logprobs[row]
        assert isinstance(entry, TokenLogprob)
        token = out.token_ids[row]
        assert entry.token_id == token
        # Raw: before bias, penalties and temperature.
        assert math.isclose(entry.logprob, float(raw[row, token]), rel_tol=1e-6, abs_tol=1e-6)
        assert entry.rank == 1 + int((raw[row] > raw[row, token]).sum())
        k = requests[row].sampling_params.logprobs
        assert len(entry.top) == k
        expected_ids = raw[row].argsort(descending=True)[:k].tolist()
        assert [t for t, _ in entry.top] == expected_ids
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)
        for token_id, value in entry.top:
            assert math.isclose(value, float(raw[row, token_id]), rel_tol=1e-6, abs_tol=1e-6)
    assert out.logprobs[2].rank > 1  # the biased token was not the model's favourite


def test_padded_vocab_columns_are_never_sampled() -> None:
    logits = torch.zeros(200, VOCAB + 8)
    logits[:, VOCAB:] = 100.0  # lm_head padding with huge logits
    out = Sampler(VOCAB).sample(logits, [make_request() for _ in range(200)])
    assert max(out.token_ids) < VOCAB


def test_prompt_logprobs() -> None:
    logits = random_logits(5, seed=21)
    targets = [3, 0, 31, 7, 7]
    entries = Sampler.prompt_logprobs(logits, targets, k=2)
    raw = logits.log_softmax(-1)
    assert len(entries) == 5
    for row, (entry, target) in enumerate(zip(entries, targets, strict=True)):
        assert entry.token_id == target
        assert math.isclose(entry.logprob, float(raw[row, target]), rel_tol=1e-6, abs_tol=1e-6)
        assert entry.rank == 1 + int((raw[row] > raw[row, target]).sum())
        top_ids = raw[row].argsort(descending=True)[:2].tolist()
        assert [t for t, _ in entry.top] == top_ids
    assert all(e.top == () for e in Sampler.prompt_logprobs(logits, targets, k=0))
    assert Sampler.prompt_logprobs(torch.zeros(0, VOCAB), [], k=3) == []


def test_rank_counts_only_strictly_more_likely_tokens() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[1, [4, 9]] = 2.0  # two tokens tie for first place
    entries = Sampler.prompt_logprobs(logits, [17, 9], k=1)
    assert entries[0].rank == 1  # uniform: everything ties for first
    assert entries[1].rank == 1
    assert Sampler.prompt_logprobs(logits[1:], [0], k=0)[0].rank == 3


def test_a_draw_at_the_very_end_of_the_cdf_lands_on_the_last_token_with_mass(monkeypatch: pytest.MonkeyPatch) -> None:
    # u * total can round up to the total (u = 1 here stands for that rounding): the search would
    # run past the last token with mass, into zero-probability tokens (an empty block, the padding).
    probs = torch.zeros(2, 600)
    probs[0, 10] = 1.0
    probs[1, 300], probs[1, 301] = 0.5, 0.5
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, generator=None: self.fill_(1.0))
    drawn = Sampler(600)._draw(probs, [make_request(temperature=1.0) for _ in range(2)])
    assert drawn.tolist() == [10, 301]


# ---- the fused pass against the torch path ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_pass_draws_the_torch_paths_tokens(dtype: torch.dtype) -> None:
    # The same uniforms (one per row, from the same generators) through the same filters: the two
    # paths pick the same token unless a float rounding differs right at a boundary, which these
    # rows do not hit. 64 rows of a real vocabulary size, every filter and mixes of them.
    module = cpu_ops.load_sampler()
    assert module is not None
    vocab = 49152
    logits = (torch.randn(64, vocab, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    kinds = [
        dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(top_k=50, top_p=0.95),
        dict(min_p=0.1, temperature=1.3), dict(top_k=5, min_p=0.3), dict(top_k=1), dict(top_p=0.01),
        dict(temperature=2.0, seed=7),
    ]  # fmt: skip
    requests = [make_request(**kinds[i % len(kinds)]) for i in range(64)]
    for step in range(3):
        fused = TorchSampler(vocab, seed=step, sample_rows=module.sample_rows).sample(logits, requests)
        torch_path = TorchSampler(vocab, seed=step).sample(logits, requests)
        assert fused.token_ids == torch_path.token_ids


def test_fused_pass_refuses_bad_arguments_with_a_clear_error() -> None:
    module = cpu_ops.load_sampler()
    assert module is not None
    logits, one = torch.randn(2, 10), torch.ones(2)
    with pytest.raises(RuntimeError, match="top_k: one value per row of logits"):
        module.sample_rows(logits, one, torch.zeros(3, dtype=torch.long), one, one * 0, one * 0.5)
    with pytest.raises(RuntimeError, match="logits must be float32 or bfloat16"):
        module.sample_rows(logits.half(), one, one.long() * 0, one, one * 0, one * 0.5)
    with pytest.raises(RuntimeError, match="contiguous, non-empty rows"):
        module.sample_rows(logits.t(), one.repeat(5), one.repeat(5).long() * 0, one.repeat(5), one.repeat(5) * 0,
                           one.repeat(5) * 0.5)  # fmt: skip
