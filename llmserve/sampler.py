"""Batched token sampling: logits processors, temperature / top-k / top-p / min-p, seeded draws, logprobs.

The engine calls `Sampler.sample` once per step with one row of logits per sequence that is due a
token. Everything is vectorised across the batch except the random draws of seeded requests, which
come row by row from each request's own generator so that a seeded request's tokens never depend
on what else happens to be in the batch. On CUDA the small index and parameter tensors travel
through pinned memory (`_to_device`), so the host first waits for the GPU at the `.tolist()` that
reads the token ids (and the logprobs), not at every tensor it sends.

Order of operations per row (the same as vLLM's):
    raw logits -> logprobs (reported, "raw": before any processing)
    raw logits -> min_tokens mask -> logit_bias -> repetition penalty -> presence/frequency penalty
               -> greedy argmax, or: / temperature -> top_k -> top_p -> min_p -> draw
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn.functional as F

from llmserve.outputs import TokenLogprob
from llmserve.request import Request

# Seeds are unbounded Python ints in SamplingParams; torch only takes 64-bit ones.
_SEED_MODULUS = 2**64
# Tokens per block of the two-level CDF in Sampler._draw.
_CDF_BLOCK = 256


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None where the request did not ask for logprobs


class Sampler:
    def __init__(
        self,
        vocab_size: int,
        seed: int = 0,
        argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
        top_p_cut: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        sample_rows: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.seed = seed
        # [B, V] -> [B] long, first maximum on ties, and the nucleus threshold (`top_p_cut`): the
        # model's layer ops bring faster ones on CPU (LayerOps.argmax, LayerOps.top_p_cut).
        self._argmax = argmax or _argmax
        self._top_p_cut = top_p_cut or sorted_top_p_cut
        # The random rows' filters and draw in one fused pass on CPU (LayerOps.sample_rows):
        # (logits [R, V], temperature [R], top_k [R] (0: off), top_p [R], min_p [R], uniforms [R])
        # -> [R] long, with the semantics of the torch path below (_apply_*, then _draw).
        self._sample_rows = sample_rows
        # Generators are device-bound, and the device is only known once logits arrive.
        self._shared_generators: dict[torch.device, torch.Generator] = {}
        self._request_generators: dict[tuple[str, int], torch.Generator] = {}

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: [B, V'] (V' >= vocab_size), one row per request in `requests`, same order."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"expected logits of shape [{len(requests)}, V], got {tuple(logits.shape)}")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, fewer than vocab_size {self.vocab_size}")
        # Columns past vocab_size are lm_head padding, not tokens: they must never be sampled.
        logits = logits[:, : self.vocab_size]  # [B, V]
        if _plain_greedy(requests, self.vocab_size):
            # The argmax of bf16 logits is the argmax of their exact float32 widening: skip the
            # [B, V] copy (12.6 MB at B = 64 for this vocabulary, ~2 ms a step on this CPU).
            return SamplerOutput(token_ids=self._argmax(logits).tolist(), logprobs=[None] * len(requests))
        logits = logits.float()

        processed = apply_logits_processors(logits, requests)  # [B, V]; `logits` stays raw
        token_ids = self._choose(processed, requests)  # [B]
        logprobs = _sampled_logprobs(logits, token_ids, requests)
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    def free(self, key: tuple[str, int]) -> None:
        """Forget per-request state once a request finishes (safe for keys never seen)."""
        self._request_generators.pop(key, None)

    @staticmethod
    def prompt_logprobs(logits: torch.Tensor, target_ids: list[int], k: int) -> list[TokenLogprob]:
        """logits: [N, V] for N prompt positions; target_ids[i] is the prompt token that follows position i."""
        if logits.dim() != 2 or logits.shape[0] != len(target_ids):
            raise ValueError(f"expected logits of shape [{len(target_ids)}, V], got {tuple(logits.shape)}")
        if not target_ids:
            return []
        logprobs = logits.float().log_softmax(dim=-1)  # [N, V]
        targets = _to_device(target_ids, logits.device, torch.long)  # [N]
        return _token_logprobs(logprobs, targets, [k] * len(target_ids))

    # ---- choosing the token ------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """One token id per row of the processed logits [B, V] -> [B] long."""
        greedy = [r.sampling_params.greedy for r in requests]
        if all(greedy):
            return self._argmax(logits)
        random_rows = [i for i, g in enumerate(greedy) if not g]
        random_requests = [requests[i] for i in random_rows]
        mixed = len(random_rows) < len(requests)
        random_rows_t = _to_device(random_rows, logits.device) if mixed else None
        # [R, V]; the filters below never write in place, so an all-random batch needs no copy
        random_logits = logits if random_rows_t is None else logits[random_rows_t]
        if self._sample_rows is not None and logits.device.type == "cpu":
            drawn = self._fused(random_logits, random_requests)  # [R]
        else:
            random_logits = _apply_temperature(random_logits, random_requests)
            random_logits = _apply_top_k_top_p_min_p(random_logits, random_requests, self._top_p_cut)
            drawn = self._draw(random_logits.softmax(dim=-1), random_requests)  # [R]
        if random_rows_t is None:
            return drawn
        token_ids = torch.empty(len(requests), dtype=torch.long, device=logits.device)  # [B]
        greedy_rows = _to_device([i for i, g in enumerate(greedy) if g], logits.device)
        token_ids[greedy_rows] = self._argmax(logits[greedy_rows])
        token_ids[random_rows_t] = drawn
        return token_ids

    def _draw(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Sample one token per row of probs [R, V] -> [R], by inverting each row's CDF.

        One uniform u per row, from the request's own generator when it is seeded (so a seeded row
        consumes one draw from its own stream per step, whatever its neighbours do); the token is
        the first whose cumulative mass exceeds u times the row's total. One random number a row,
        where an exponential race (argmax p / E) needs V: at 64 rows of this 49152-token
        vocabulary those draws took ~0.1 s a step on this CPU, twice the forward.

        The CDF is two-level: float32 sums of blocks of `_CDF_BLOCK` tokens, a float64 running sum
        over the blocks to find the target's block, then a float64 running sum inside that block
        alone. A flat float32 cumsum over V would lose tokens below its resolution of the running
        sum (~6e-8); this costs a pass over the block sums instead of a float64 copy of [R, V]."""
        device, (num_rows, vocab) = probs.device, probs.shape
        uniforms = self._uniforms(requests, device)  # [R, 1]
        padded = probs if vocab % _CDF_BLOCK == 0 else F.pad(probs, (0, -vocab % _CDF_BLOCK))  # a copy only if needed
        blocks = padded.view(num_rows, -1, _CDF_BLOCK)  # [R, nb, block], zero-padded
        block_mass = blocks.sum(dim=-1)  # [R, nb]
        block_cdf = block_mass.double().cumsum(dim=-1)  # [R, nb]
        targets = uniforms * block_cdf[:, -1:]  # [R, 1], below each row's total mass
        # right=True: the first index whose running sum is strictly above the target, so a token
        # with no mass (the sum flat across it) is never picked. Rounding (u * total reaching the
        # total, or the two levels' sums differing in the last bit) can put the target just past
        # the end: each search is clamped to the last block, then the last token, that has mass.
        block = torch.minimum(torch.searchsorted(block_cdf, targets, right=True), _last_positive(block_mass))
        before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_(min=0)), 0.0)  # [R, 1]
        inside = blocks[torch.arange(num_rows, device=device), block.squeeze(1)]  # [R, block]
        offset = torch.searchsorted(inside.double().cumsum(dim=-1) + before, targets, right=True)  # [R, 1]
        return (block * _CDF_BLOCK + torch.minimum(offset, _last_positive(inside))).squeeze(1)  # [R]

    def _fused(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """The random rows through `sample_rows` ([R, V] processed logits -> [R] long)."""
        assert self._sample_rows is not None
        params = [r.sampling_params for r in requests]
        device = logits.device
        return self._sample_rows(
            logits,
            _to_device([p.temperature for p in params], device, torch.float32),
            _to_device([p.top_k for p in params], device, torch.long),
            _to_device([p.top_p for p in params], device, torch.float64),
            _to_device([p.min_p for p in params], device, torch.float32),
            self._uniforms(requests, device).view(-1),
        )

    def _uniforms(self, requests: list[Request], device: torch.device) -> torch.Tensor:
        """One uniform in [0, 1) per row -> [R, 1] float64: from the request's own generator when
        it is seeded (one draw from its stream per step, whatever its neighbours do), else from the
        sampler's shared one."""
        num_rows = len(requests)
        uniforms = torch.empty(num_rows, 1, dtype=torch.float64, device=device)  # [R, 1]
        unseeded = [i for i, r in enumerate(requests) if r.sampling_params.seed is None]
        shared = self._shared_generator(device)
        if len(unseeded) == num_rows:
            uniforms.uniform_(generator=shared)
        else:
            if unseeded:
                rows = _to_device(unseeded, device)
                uniforms[rows] = torch.rand(len(unseeded), 1, dtype=torch.float64, device=device, generator=shared)
            for i, request in enumerate(requests):
                if request.sampling_params.seed is not None:
                    uniforms[i] = torch.rand(
                        1, dtype=torch.float64, device=device, generator=self._request_generator(request, device)
                    )
        return uniforms

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared_generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed % _SEED_MODULUS)
            self._shared_generators[device] = generator
        return generator

    def _request_generator(self, request: Request, device: torch.device) -> torch.Generator:
        generator = self._request_generators.get(request.key)
        if generator is None:
            seed = request.sampling_params.seed
            assert seed is not None
            generator = torch.Generator(device=device)
            # + index: the n choices of one request must not all draw the same tokens.
            generator.manual_seed((seed + request.index) % _SEED_MODULUS)
            self._request_generators[request.key] = generator
        return generator


# ---- logits processors (everything that also applies to greedy) ------------------------------


def apply_logits_processors(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """min_tokens, logit_bias, repetition penalty, presence/frequency penalty on logits [B, V].

    Never modifies `logits`; returns it unchanged (the same object) when no request needs any of it.
    """
    needs_min_tokens = any(_blocked_tokens(r, logits.shape[1]) for r in requests)
    needs_bias = any(r.sampling_params.logit_bias for r in requests)
    needs_repetition = any(r.sampling_params.repetition_penalty != 1.0 for r in requests)
    needs_presence_frequency = any(
        r.sampling_params.presence_penalty != 0.0 or r.sampling_params.frequency_penalty != 0.0 for r in requests
    )
    if not (needs_min_tokens or needs_bias or needs_repetition or needs_presence_frequency):
        return logits
    logits = logits.clone()  # [B, V]; the processors below work in place on this copy
    if needs_min_tokens:
        _apply_min_tokens(logits, requests)
    if needs_bias:
        _apply_logit_bias(logits, requests)
    if needs_repetition:
        _apply_repetition_penalty(logits, requests)
    if needs_presence_frequency:
        _apply_presence_frequency_penalty(logits, requests)
    return logits


def _blocked_tokens(request: Request, vocab_size: int) -> list[int]:
    """Tokens that would end the sequence before it reached min_tokens."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        return []
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids |= request.eos_token_ids
    # An id the model cannot emit needs no blocking (and would be out of range for indexing).
    return sorted(t for t in ids if t < vocab_size)


def _apply_min_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i, request in enumerate(requests):
        blocked = _blocked_tokens(request, logits.shape[1])
        row_ids += [i] * len(blocked)
        token_ids += blocked
    rows, tokens = _index_tensors(row_ids, token_ids, logits.device)
    logits[rows, tokens] = float("-inf")


def _apply_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    row_ids: list[int] = []
    token_ids: list[int] = []
    biases: list[float] = []
    for i, request in enumerate(requests):
        bias = request.sampling_params.logit_bias
        row_ids += [i] * len(bias)
        token_ids += bias.keys()
        biases += bias.values()
    rows, tokens = _index_tensors(row_ids, token_ids, logits.device)
    # Keys of one dict are distinct, so no (row, token) pair repeats and += is a plain add.
    logits[rows, tokens] += _to_device(biases, logits.device, logits.dtype)


def _apply_repetition_penalty(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """HF/CTRL: every token seen in prompt or output moves towards "less likely" by a factor p."""
    penalised = [i for i, r in enumerate(requests) if r.sampling_params.repetition_penalty != 1.0]
    device = logits.device
    occurred = torch.zeros(len(penalised), logits.shape[1], dtype=torch.bool, device=device)  # [P, V]
    # Reads prompt and output separately: a Request built with output_token_ids=... (as tests and
    # restored requests do) does not have them in all_token_ids.
    seen = [chain(requests[i].prompt_token_ids, requests[i].output_token_ids) for i in penalised]
    row_ids, token_ids = _flatten(seen)
    occurred[_index_tensors(row_ids, token_ids, device)] = True
    penalty = _to_device(
        [requests[i].sampling_params.repetition_penalty for i in penalised], device, logits.dtype
    ).unsqueeze(1)  # [P, 1]
    rows = _to_device(penalised, device)
    sub = logits[rows]  # [P, V]
    # Dividing a negative logit would make it *more* likely; hence the sign split.
    moved = torch.where(sub > 0, sub / penalty, sub * penalty)
    logits[rows] = torch.where(occurred, moved, sub)


def _apply_presence_frequency_penalty(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """OpenAI: logit -= presence * (count > 0) + frequency * count, counting output tokens only."""
    penalised = [
        i
        for i, r in enumerate(requests)
        if r.sampling_params.presence_penalty != 0.0 or r.sampling_params.frequency_penalty != 0.0
    ]
    device = logits.device
    row_ids, token_ids = _flatten([requests[i].output_token_ids for i in penalised])
    counts = torch.zeros(len(penalised), logits.shape[1], dtype=logits.dtype, device=device)  # [P, V]
    counts.index_put_(
        _index_tensors(row_ids, token_ids, device),
        torch.ones(len(token_ids), dtype=logits.dtype, device=device),
        accumulate=True,
    )
    presence = _to_device(
        [requests[i].sampling_params.presence_penalty for i in penalised], device, logits.dtype
    ).unsqueeze(1)  # [P, 1]
    frequency = _to_device(
        [requests[i].sampling_params.frequency_penalty for i in penalised], device, logits.dtype
    ).unsqueeze(1)  # [P, 1]
    rows = _to_device(penalised, device)
    logits[rows] -= presence * (counts > 0) + frequency * counts


def _flatten(token_lists: Sequence[Sequence[int] | chain[int]]) -> tuple[list[int], list[int]]:
    """[[a, b], [c]] -> rows [0, 0, 1], tokens [a, b, c]: coordinates for one indexed write."""
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i, tokens in enumerate(token_lists):
        before = len(token_ids)
        token_ids.extend(tokens)
        row_ids += [i] * (len(token_ids) - before)
    return row_ids, token_ids


def _index_tensors(
    row_ids: list[int], token_ids: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        _to_device(row_ids, device, torch.long),
        _to_device(token_ids, device, torch.long),
    )


# ---- sampling-only transforms (skipped for greedy rows) --------------------------------------


def _apply_temperature(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    temperatures = [r.sampling_params.temperature for r in requests]
    if all(t == 1.0 for t in temperatures):
        return logits
    return logits / _to_device(temperatures, logits.device, logits.dtype).unsqueeze(1)  # [R, 1]


def _apply_top_k_top_p_min_p(
    logits: torch.Tensor,
    requests: Sequence[Request],
    cut: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mask (to -inf) what top_k, then top_p, then min_p exclude from logits [R, V]."""
    vocab_size = logits.shape[1]
    # 0 means "off", which is the same as keeping all V tokens.
    top_k = [min(r.sampling_params.top_k, vocab_size) or vocab_size for r in requests]
    top_p = [r.sampling_params.top_p for r in requests]
    min_p = [r.sampling_params.min_p for r in requests]
    if any(k < vocab_size for k in top_k):
        logits = _apply_top_k(logits, top_k)
    if any(p < 1.0 for p in top_p):
        logits = _apply_top_p(logits, top_p, cut or sorted_top_p_cut)
    if any(p > 0.0 for p in min_p):
        logits = _apply_min_p(logits, min_p)
    return logits


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """top_k needs only the k largest per row (torch.topk), not a sort of the whole row."""
    vocab_size = logits.shape[1]
    max_k = max(k for k in top_k if k < vocab_size)
    k = _to_device([min(k, max_k) for k in top_k], logits.device, torch.long).unsqueeze(1)  # [R, 1]
    kth_largest = logits.topk(max_k, dim=-1).values.gather(1, k - 1)  # [R, 1]
    is_off = _to_device([k == vocab_size for k in top_k], logits.device).unsqueeze(1)  # [R, 1]
    kth_largest = kth_largest.masked_fill(is_off, float("-inf"))
    # "<" rather than a positional cut keeps ties with the kth value, independent of sort order.
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def sorted_top_p_cut(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs [R, V] float32, top_p [R, 1] -> [R, 1]: the nucleus's probability threshold x*.

    Token t is in the nucleus iff the mass of the tokens strictly more likely than t is below
    top_p, i.e. iff p_t >= x*, the smallest such p_t (so the most likely token is always in, and
    tokens tied with the last one in are all in). The torch reference: a sort of every row. On CPU
    the layer ops bring a C++ one (`LayerOps.top_p_cut`) that needs no sort: a 49152-token row
    took ~2.8 ms to sort here (0.18 s for 64 rows a step)."""
    sorted_probs = probs.sort(dim=-1, descending=True).values  # [R, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [R, V]: mass of the more likely ones
    kept = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)  # [R, 1]; the top one always
    return sorted_probs.gather(1, kept - 1)  # [R, 1]


def _apply_top_p(
    logits: torch.Tensor, top_p: list[float], cut: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Mask what top_p excludes from logits [R, V] (see `sorted_top_p_cut`). Rows with top_p == 1 keep
    everything: float rounding could otherwise reach 1.0 before the tail and cut valid tokens."""
    probs = logits.softmax(dim=-1)  # [R, V], renormalised after top_k like HF's warpers
    p = _to_device(top_p, logits.device, probs.dtype).unsqueeze(1)  # [R, 1]
    threshold = cut(probs, p).masked_fill(p >= 1.0, 0.0)  # [R, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def _apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    probs = logits.softmax(dim=-1)  # [R, V]
    scale = _to_device(min_p, logits.device, logits.dtype).unsqueeze(1)  # [R, 1]
    threshold = scale * probs.amax(dim=-1, keepdim=True)  # [R, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


# ---- logprobs --------------------------------------------------------------------------------


def _sampled_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, requests: Sequence[Request]
) -> list[TokenLogprob | None]:
    asking = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(requests)
    if not asking:
        return result
    rows = _to_device(asking, raw_logits.device)
    logprobs = raw_logits[rows].log_softmax(dim=-1)  # [A, V]
    ks = [requests[i].sampling_params.logprobs or 0 for i in asking]
    for i, entry in zip(asking, _token_logprobs(logprobs, token_ids[rows], ks), strict=True):
        result[i] = entry
    return result


def _token_logprobs(logprobs: torch.Tensor, targets: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """For each row of logprobs [N, V]: the target's logprob and rank, and the top ks[row] alternatives."""
    chosen = logprobs.gather(1, targets.unsqueeze(1))  # [N, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [N]
    max_k = min(max(ks), logprobs.shape[1])
    if max_k > 0:
        top_values, top_ids = logprobs.topk(max_k, dim=-1)  # [N, max_k] each, most likely first
        top_value_rows, top_id_rows = top_values.tolist(), top_ids.tolist()
    else:
        top_value_rows = top_id_rows = [[] for _ in ks]
    return [
        TokenLogprob(
            token_id=token_id,
            logprob=logprob,
            rank=rank,
            top=tuple(zip(ids[:k], values[:k], strict=True)),
        )
        for token_id, logprob, rank, ids, values, k in zip(
            targets.tolist(), chosen.squeeze(1).tolist(), ranks.tolist(), top_id_rows, top_value_rows, ks,
            strict=True,
        )
    ]


def _to_device(data: Sequence[int] | Sequence[float] | Sequence[bool], device: torch.device,
               dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """`torch.tensor(data, dtype=dtype, device=device)`, without a host sync on CUDA.

    Made straight on a CUDA device, torch copies from pageable memory and then waits for the
    stream, i.e. for the step's forward to finish, before the sampler can queue its next op.
    Staged in pinned memory, the copy is queued behind the forward instead, and the only wait is
    the `.tolist()` that reads the token ids. Elsewhere (CPU) it is exactly the plain call."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    # The caching host allocator keeps the pinned block until the queued copy has read it.
    return torch.tensor(data, dtype=dtype).pin_memory().to(device, non_blocking=True)


def _plain_greedy(requests: Sequence[Request], vocab_size: int) -> bool:
    """Greedy with nothing that reads or changes the logits first (no processor, no logprobs)."""
    for r in requests:
        p = r.sampling_params
        if not p.greedy or p.logprobs is not None or p.logit_bias or _blocked_tokens(r, vocab_size):
            return False
        if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            return False
    return True


def _last_positive(x: torch.Tensor) -> torch.Tensor:  # [R, n] -> [R, 1] long
    """The last column of each row holding a positive value (0 for a row with none), on the
    device and without a host sync."""
    positions = torch.arange(1, x.shape[1] + 1, device=x.device)  # [n]
    return ((x > 0) * positions).argmax(dim=-1, keepdim=True)


def _argmax(x: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B] long
    # Same index as x.argmax(-1), ties to the first maximum too, and faster on CPU (see layer_ops).
    return x.max(dim=-1).indices
