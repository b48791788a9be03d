"""CUDA-graph decode path (llmserve/cuda_graphs.py) on tiny random models.

On CPU the graph runner is built with capture off (`plan_decode_graphs(..., emulate=True)`), so
"replay" runs the captured step function eagerly over the same static, padded, bucketed buffers,
with the C++ decode kernel the CPU uses. That checks everything except the capture itself:

- the bucketed path gives the eager path's tokens (greedy and sampled), with batches that need
  padding, sequences finishing and joining between steps, ragged contexts;
- padded rows write only the scratch block, and no row reads it (it holds NaN);
- bucket choice, the plan, the config fields and flags; which steps fall back to eager.

`test_graphs_capture_and_match_eager_on_cuda` (`gpu`) captures real graphs on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import llmserve.engine as engine_module
from llmserve import LLM, SamplingParams, cuda_graphs
from llmserve.cli import build_parser
from llmserve.config import ModelConfig, config_from_args
from llmserve.cuda_graphs import GraphPlan, batch_size_buckets, bucket_for, plan_decode_graphs
from llmserve.engine import LLMEngine
from llmserve.sampler import _to_device, apply_logits_processors
from llmserve.scheduler import ScheduledSeq

BLOCK_SIZE = 4
# Ragged prompt lengths (not multiples of the block size but one), different output lengths so
# sequences finish at different steps, and one more prompt than max_num_seqs so one joins later.
PROMPTS = [
    [5, 6, 7],
    list(range(100, 140)),
    [42] * 9,
    list(range(300, 317)),
    [7] * 4,
    list(range(1000, 1023)),
    [9, 8],
]
MAX_TOKENS = [3, 20, 9, 14, 6, 17, 11]



@contextlib.contextmanager
def emulated_graphs() -> Iterator[None]:
    """Engines built inside plan their graphs as on CUDA, with capture off (runs on CPU)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            engine_module, "plan_decode_graphs", functools.partial(plan_decode_graphs, emulate=True)
        )
        yield


def make_llm(path: Path, *, graphs: bool, **overrides: object) -> LLM:
    settings: dict[str, object] = dict(
        dtype="float32", device="cpu", block_size=BLOCK_SIZE, num_blocks=128, max_num_seqs=6,
        max_num_batched_tokens=32,
    )  # fmt: skip
    settings.update(overrides)
    if not graphs:
        return LLM(str(path), **settings)
    with emulated_graphs():
        llm = LLM(str(path), **settings)
    assert llm.engine.runner.graphs is not None, "the emulated graph runner was not built"
    return llm


def graph_runner(llm: LLM) -> cuda_graphs.DecodeGraphRunner:
    graphs = llm.engine.runner.graphs
    assert graphs is not None
    return graphs


def generate(llm: LLM, params: list[SamplingParams]) -> list[list[int]]:
    return [result.token_ids for result in llm.generate(PROMPTS, params)]


def step_until_all_decode(engine: LLMEngine) -> list[ScheduledSeq]:
    """Step until every request waits for its next token, then schedule (not run) that pure-decode step."""
    for _ in range(20):
        engine.step()
        running = engine.scheduler.running
        if (
            not engine.scheduler.waiting
            and running
            and all(r.num_computed_tokens == r.num_tokens - 1 for r in running)
        ):
            seqs = engine.scheduler.schedule().seqs
            assert all(s.num_new_tokens == 1 and s.samples for s in seqs)
            return seqs
    raise AssertionError("the engine never reached a pure-decode step")


# ---- buckets, plan, config ---------------------------------------------------------------------


def test_buckets_are_powers_of_two_then_multiples_of_eight_capped_at_the_max() -> None:
    assert batch_size_buckets(1) == (1,)
    assert batch_size_buckets(5) == (1, 2, 4, 5)
    assert batch_size_buckets(8) == (1, 2, 4, 8)
    assert batch_size_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert batch_size_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    with pytest.raises(ValueError, match="max_batch"):
        batch_size_buckets(0)


def test_a_step_takes_the_smallest_bucket_that_holds_it() -> None:
    sizes = batch_size_buckets(20)
    chosen = {n: bucket_for(sizes, n) for n in range(1, 22)}
    assert chosen[1] == 1 and chosen[2] == 2 and chosen[3] == 4 and chosen[4] == 4
    assert chosen[5] == chosen[8] == 8 and chosen[9] == chosen[16] == 16
    assert chosen[17] == chosen[20] == 20
    assert chosen[21] is None  # larger than the largest bucket: eager
    for n, bucket in chosen.items():
        if bucket is not None:  # the smallest: the next smaller bucket would not hold n
            assert bucket >= n and all(size < n for size in sizes if size < bucket)


def test_plan_only_on_cuda_and_only_when_asked() -> None:
    common = dict(
        max_num_seqs=48, cuda_graph_max_batch=None, max_model_len=100, block_size=16, quantization=None
    )
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert plan_decode_graphs(device=cpu, enforce_eager=False, **common) is None
    assert plan_decode_graphs(device=cuda, enforce_eager=True, **common) is None
    assert (
        plan_decode_graphs(device=cuda, enforce_eager=False, **{**common, "quantization": "bnb-8bit"}) is None
    )
    plan = plan_decode_graphs(device=cuda, enforce_eager=False, **common)
    assert plan == GraphPlan(batch_size_buckets(48), max_blocks_per_seq=7, capture=True)  # ceil(100 / 16)
    capped = plan_decode_graphs(device=cuda, enforce_eager=False, **{**common, "cuda_graph_max_batch": 12})
    assert capped is not None and capped.batch_sizes == (1, 2, 4, 8, 12)
    above = plan_decode_graphs(device=cuda, enforce_eager=False, **{**common, "cuda_graph_max_batch": 500})
    assert above is not None and above.batch_sizes[-1] == 48  # never more than max_num_seqs
    emulated = plan_decode_graphs(device=cpu, enforce_eager=False, emulate=True, **common)
    assert emulated == dataclasses.replace(plan, capture=False)


def test_config_fields_are_validated_and_are_flags() -> None:
    with pytest.raises(ValueError, match="enforce_eager"):
        ModelConfig(enforce_eager="false")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cuda_graph_max_batch"):
        ModelConfig(cuda_graph_max_batch=0)
    parser = build_parser()
    config = config_from_args(parser.parse_args(["serve", "--enforce-eager", "--cuda-graph-max-batch", "16"]))
    assert config.model.enforce_eager is True and config.model.cuda_graph_max_batch == 16
    defaults = config_from_args(parser.parse_args(["serve"]))
    assert defaults.model.enforce_eager is False and defaults.model.cuda_graph_max_batch is None


def test_cpu_engine_has_no_graph_runner_and_no_scratch_block(tiny_path: Path) -> None:
    llm = make_llm(tiny_path, graphs=False)
    runner = llm.engine.runner
    assert runner.graphs is None
    assert runner.kv_caches[0][0].shape[0] == llm.engine.block_manager.num_blocks == 128
    emulated = make_llm(tiny_path, graphs=True)
    assert emulated.engine.runner.kv_caches[0][0].shape[0] == 129  # one scratch block past the manager's


# ---- the padded, bucketed path against the eager path -----------------------------------------


@pytest.mark.parametrize(
    ("family", "max_batch"),
    [("llama", None), ("qwen3", None), ("llama", 4)],
    ids=["llama", "qwen3", "llama-graphs-up-to-4"],
)
def test_greedy_tokens_match_eager_with_padding_finishing_and_joining(
    family: str, max_batch: int | None, tiny_path: Path, tiny_qwen3_path: Path
) -> None:
    path = tiny_path if family == "llama" else tiny_qwen3_path
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    eager = generate(make_llm(path, graphs=False), params)
    llm = make_llm(path, graphs=True, cuda_graph_max_batch=max_batch)
    assert generate(llm, params) == eager
    graphs = graph_runner(llm)
    # Buckets 1, 2, 4, 6 (or 1, 2, 4): the batch shrank through several, some steps padded.
    assert len(graphs.replays) >= 3 and graphs.padded_rows > 0
    assert max(graphs.replays) <= (max_batch or 6)


def test_sampled_tokens_match_eager_seeded_and_unseeded(tiny_path: Path) -> None:
    # Same row order as the eager path: unseeded rows draw from one shared generator in row order.
    params = [
        SamplingParams(
            temperature=0.9, top_p=0.9, top_k=50, max_tokens=n, ignore_eos=True, seed=i if i % 2 else None
        )
        for i, n in enumerate(MAX_TOKENS)
    ]
    eager = generate(make_llm(tiny_path, graphs=False), params)
    llm = make_llm(tiny_path, graphs=True)
    assert generate(llm, params) == eager
    assert graph_runner(llm).padded_rows > 0


def test_logprobs_and_prompt_logprobs_match_eager(tiny_path: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    prompts = [[5, 6, 7, 8], list(range(20, 33)), [3] * 6]
    eager = make_llm(tiny_path, graphs=False).generate(prompts, params)
    llm = make_llm(tiny_path, graphs=True)
    graphed = llm.generate(prompts, params)
    assert sum(graph_runner(llm).replays.values()) > 0
    for a, b in zip(eager, graphed, strict=True):
        assert a.token_ids == b.token_ids
        assert a.prompt_logprobs == b.prompt_logprobs  # computed on the eager prefill steps
        for x, y in zip(a.outputs[0].logprobs or [], b.outputs[0].logprobs or [], strict=True):
            assert x.token_id == y.token_id and x.rank == y.rank
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_padded_rows_touch_only_the_scratch_block_and_logits_match_eager(tiny_path: Path) -> None:
    llm = make_llm(tiny_path, graphs=True)
    engine, runner = llm.engine, llm.engine.runner
    graphs = graph_runner(llm)
    for i, prompt in enumerate(([5, 6, 7, 8, 9], list(range(40, 49)), list(range(60, 74)))):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    seqs = step_until_all_decode(engine)
    assert len(seqs) == 3 and bucket_for(graphs.plan.batch_sizes, 3) == 4  # one padded row
    tables = engine.block_manager.block_tables
    real_blocks, scratch = engine.block_manager.num_blocks, graphs.scratch_block
    assert scratch == real_blocks
    written = {tables[s.request.key][s.start // BLOCK_SIZE] * BLOCK_SIZE + s.start % BLOCK_SIZE for s in seqs}

    # NaN in the whole scratch block: a real row that read any of it would get NaN logits.
    for k, v in runner.kv_caches:
        k[scratch].fill_(float("nan"))
        v[scratch].fill_(float("nan"))
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    with torch.inference_mode():
        result = graphs.run(seqs, tables)
    assert result is not None
    ordered, logits = result
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()
    for (k, v), (k0, v0) in zip(runner.kv_caches, before, strict=True):
        for cache, old in ((k, k0), (v, v0)):
            differs = (cache[:real_blocks] != old[:real_blocks]).any(dim=3).any(dim=1)  # [blocks, bs]
            changed = differs.flatten()  # [blocks * bs]: index = block * bs + offset, a slot id
            assert set(changed.nonzero().flatten().tolist()) == written
            assert torch.isfinite(cache[scratch, :, 0]).all()  # padded rows wrote their slot 0 ...
            assert torch.isnan(cache[scratch, :, 1:]).all()  # ... and nothing else of the scratch block
    after_graph = [(k.clone(), v.clone()) for k, v in runner.kv_caches]

    # The same step eagerly, from the same cache: the same logits and the same new K/V.
    for (k, v), (k0, v0) in zip(runner.kv_caches, before, strict=True):
        k.copy_(k0)
        v.copy_(v0)
    runner.graphs = None
    try:
        eager = runner.execute(seqs, tables)
    finally:
        runner.graphs = graphs
    assert [s.request.key for s in eager.sampling_seqs] == [s.request.key for s in ordered]
    assert eager.logits is not None
    # Bitwise equal on this CPU; the tolerance is for a BLAS that blocks 3 and 4 rows differently.
    torch.testing.assert_close(logits, eager.logits, rtol=0, atol=1e-5)
    for (k, v), (kg, vg) in zip(runner.kv_caches, after_graph, strict=True):
        torch.testing.assert_close(k[:real_blocks], kg[:real_blocks], rtol=0, atol=1e-5)
        torch.testing.assert_close(v[:real_blocks], vg[:real_blocks], rtol=0, atol=1e-5)


def test_steps_that_are_not_pure_decode_fall_back_to_eager(tiny_path: Path) -> None:
    llm = make_llm(tiny_path, graphs=True, cuda_graph_max_batch=2)
    engine = llm.engine
    graphs = graph_runner(llm)
    for i, prompt in enumerate(([5, 6, 7, 8, 9], list(range(40, 49)), list(range(60, 74)))):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    seqs = step_until_all_decode(engine)
    tables = engine.block_manager.block_tables
    request = seqs[0].request
    with torch.inference_mode():
        assert len(seqs) == 3
        assert graphs.run(seqs, tables) is None  # three rows, the largest bucket is 2
        assert graphs.run([], tables) is None
        prefill = ScheduledSeq(request, num_new_tokens=4, start=0)  # a prefill chunk beside a decode
        assert graphs.run([prefill, seqs[1]], tables) is None
        # One prompt token that does not reach the end of the sequence (a 1-token chunk): no sample.
        mid_prompt = ScheduledSeq(request, num_new_tokens=1, start=request.num_prompt_tokens - 3)
        assert graphs.run([mid_prompt], tables) is None
        assert graphs.run(seqs[:2], tables) is not None  # two decodes fit the bucket of 2
    assert dict(graphs.replays) == {2: 1}


def test_runner_without_a_paged_decode_kernel_runs_eagerly(tiny_path: Path) -> None:
    # attention_backend torch: the reference would gather max_model_len of context for every row.
    with emulated_graphs():
        engine = LLM(
            str(tiny_path), dtype="float32", device="cpu", attention_backend="torch", num_blocks=32
        ).engine
    assert engine.runner.graphs is None and engine.runner.kv_caches[0][0].shape[0] == 32


def test_to_device_on_cpu_is_the_plain_tensor_call() -> None:
    cpu = torch.device("cpu")
    for data, dtype in (
        ([1, 2, 3], None),
        ([0.5, 2.0], torch.float32),
        ([True, False], None),
        ([], torch.long),
    ):
        made, plain = _to_device(data, cpu, dtype), torch.tensor(data, dtype=dtype)
        assert made.dtype == plain.dtype and made.device == plain.device and torch.equal(made, plain)


# ---- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_graphs_capture_and_match_eager_on_cuda(tiny_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip(
            "no CUDA device: capturing CUDA graphs needs one (the CPU tests above run the same path uncaptured)"
        )
    from llmserve_kernels import triton_paged_attention

    if not triton_paged_attention.available():
        pytest.skip("triton is not installed: CUDA graphs need its paged decode kernel")
    settings = dict(dtype="float32", device="cuda", block_size=16, num_blocks=256, max_num_seqs=6)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    eager_llm = LLM(str(tiny_path), enforce_eager=True, **settings)
    assert eager_llm.engine.runner.graphs is None
    eager = generate(eager_llm, params)
    llm = LLM(str(tiny_path), **settings)
    graphs = graph_runner(llm)
    assert graphs.plan.capture and graphs.captured == (1, 2, 4, 6)
    assert generate(llm, params) == eager
    assert len(graphs.replays) >= 3 and graphs.padded_rows > 0

    # A replayed step and the sampler queue their work without waiting for the GPU.
    engine = llm.engine
    for i, prompt in enumerate(([5, 6, 7, 8, 9], list(range(40, 49)), list(range(60, 74)))):
        every_processor = SamplingParams(
            temperature=0.8, top_p=0.9, top_k=20, min_p=0.01, repetition_penalty=1.1, presence_penalty=0.5,
            logit_bias={7: 1.0}, seed=i if i else None, max_tokens=8,
        )  # fmt: skip
        engine.add_request(f"sync-{i}", prompt, every_processor)
    seqs = step_until_all_decode(engine)

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = engine.runner.execute(seqs, engine.block_manager.block_tables)
        assert result.logits is not None
        requests = [s.request for s in result.sampling_seqs]
        processed = apply_logits_processors(result.logits.float(), requests)
        token_ids = engine.sampler._choose(processed, requests)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(token_ids.tolist()) == 3

    # Replayed logits against an eager step over the same cache.
    runner = engine.runner
    saved = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    with torch.inference_mode():
        graphed = runner.execute(seqs, engine.block_manager.block_tables).logits
        assert graphed is not None
        graphed = graphed.clone()
    for (k, v), (k0, v0) in zip(runner.kv_caches, saved, strict=True):
        k.copy_(k0)
        v.copy_(v0)
    runner.graphs = None
    try:
        eager_logits = runner.execute(seqs, engine.block_manager.block_tables).logits
    finally:
        runner.graphs = graphs
    assert eager_logits is not None
    torch.testing.assert_close(graphed, eager_logits, rtol=1e-4, atol=1e-4)
