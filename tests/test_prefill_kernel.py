"""The C++ varlen prefill kernel (kernels/csrc/prefill_attention_cpu.cpp) against causal attention in
float64 and against the engine's torch path, on every code path the build has (AMX, AVX-512, the
portable loops), and in the engine against the torch backend."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
import torch

from llmserve_kernels import cpu_ops
from llmserve_kernels.paged_attention_ref import gather_index, paged_attention_prefill, write_kv_cache

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# (cached prefix, new tokens) per chunk: a 1-token chunk, chunks longer than one query tile (21 tokens
# at g = 3, 64 at g = 1) and not a multiple of it, prefixes spanning several blocks, contexts longer
# than one 64-key tile.
CHUNKS = [(0, 1), (0, 45), (37, 70), (100, 5), (3, 1), (16, 33)]


@pytest.fixture(scope="module")
def kernel() -> ModuleType:
    module = cpu_ops.load_prefill()
    if module is None:
        pytest.skip("the C++ prefill kernel could not be built on this machine (the log says why)")
    return module


@dataclass
class Case:
    chunks: list[tuple[int, int]]
    q: torch.Tensor  # [n, H, D]
    k_cache: torch.Tensor  # [num_blocks, Hkv, block_size, D]
    v_cache: torch.Tensor
    tables: torch.Tensor  # [S, max_blocks] int64, shuffled blocks
    cu_seqlens: torch.Tensor  # [S + 1] int32
    context_lens: torch.Tensor  # [S] int32
    dense: list[tuple[torch.Tensor, torch.Tensor]]  # each chunk's whole context K, V: [ctx, Hkv, D]
    _expected: dict[int, torch.Tensor] = field(default_factory=dict)  # by shift

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.k_cache, self.v_cache, self.tables, self.cu_seqlens, self.context_lens

    def run(self, kernel: ModuleType, path: str | None = None) -> torch.Tensor:
        longest = max(n for _, n in self.chunks)
        if path is None:
            return kernel.paged_attention_prefill_varlen(*self.args(), self.scale, longest)
        return kernel.paged_attention_prefill_varlen_path(*self.args(), self.scale, longest, path)

    def expected(self, shift: int = 0) -> torch.Tensor:
        """Causal attention in float64, chunk by chunk; `shift` moves every query's position."""
        if shift in self._expected:
            return self._expected[shift]
        rows = [
            dense_attention(self.q[self.cu_seqlens[i] : self.cu_seqlens[i + 1]], k, v, start + shift)
            for i, ((start, _), (k, v)) in enumerate(zip(self.chunks, self.dense, strict=True))
        ]
        self._expected[shift] = torch.cat(rows)  # [n, H, D]
        return self._expected[shift]


def make_case(chunks: list[tuple[int, int]], num_kv_heads: int, group: int, head_dim: int, block_size: int,
              dtype: torch.dtype, seed: int = 0, fill: float = 0.0) -> Case:  # fmt: skip
    """The chunks' contexts scattered over shuffled blocks of a cache filled with `fill` elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    lens = [start + n for start, n in chunks]
    per_seq = [math.ceil(c / block_size) for c in lens]
    num_blocks = sum(per_seq) + 2
    k_cache = torch.full((num_blocks, num_kv_heads, block_size, head_dim), fill, dtype=dtype)
    v_cache = torch.full_like(k_cache, fill)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(chunks), max(per_seq), dtype=torch.int64)
    dense = []
    for i, (ctx, nb) in enumerate(zip(lens, per_seq, strict=True)):
        table = [order.pop() for _ in range(nb)]
        tables[i, :nb] = torch.tensor(table)
        k = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)  # [ctx, Hkv, D]
        v = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        write_kv_cache(k, v, k_cache, v_cache, slots)
        dense.append((k, v))
    # x2: sharper softmaxes, whose running max moves between key tiles
    q = (2 * torch.randn(sum(n for _, n in chunks), num_kv_heads * group, head_dim, generator=gen)).to(dtype)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(n for _, n in chunks)], dtype=torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    return Case(chunks, q, k_cache, v_cache, tables, cu_seqlens, context_lens, dense)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q [n, H, D] at positions start.., k/v [ctx, Hkv, D]: causal attention in float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # [ctx, H, D]
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q.double(), k) / math.sqrt(q.shape[-1])  # [H, n, ctx]
    q_pos = torch.arange(start, start + q.shape[0])[:, None]  # [n, 1]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)  # [n, H, D]


def check(out: torch.Tensor, case: Case, what: str) -> None:
    tol = TOLERANCE[case.q.dtype]
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    torch.testing.assert_close(
        out.double(), case.expected(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}"
    )


def check_every_path(kernel: ModuleType, case: Case) -> None:
    """The default call, then each path the build has for this dtype and head size (the fastest is the
    default; the portable loops are always there)."""
    check(case.run(kernel), case, "default")
    paths = kernel.paths(case.q)
    assert paths[-1] == "scalar", paths
    for path in paths:
        check(case.run(kernel, path), case, path)


def amx_granted() -> bool:
    """Whether Linux lets this process use AMX tiles (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    flags = Path("/proc/cpuinfo").read_text().split()
    libc = ctypes.CDLL(None, use_errno=True)
    return "amx_bf16" in flags and libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl on x86-64


def test_the_fast_paths_are_built_where_the_cpu_has_them(kernel: ModuleType) -> None:
    q = torch.zeros(1, 1, 64)
    if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX"):
        assert "avx512" in kernel.paths(q)
    if amx_granted():
        assert kernel.paths(q.bfloat16())[0] == "amx"
        assert "amx" not in kernel.paths(q.bfloat16()[..., :48])  # head sizes that are a multiple of 32 only
    assert "amx" not in kernel.paths(q)  # tiles are bf16: float32 keeps its precision on the FMAs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32, 24])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_chunks_match_dense_attention(kernel: ModuleType, head_dim: int, group: int, block_size: int,
                                      dtype: torch.dtype) -> None:  # fmt: skip
    check_every_path(kernel, make_case(CHUNKS, 2, group, head_dim, block_size, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "group", "block_size"), [(16, 2, 16), (32, 8, 16), (80, 5, 5), (96, 4, 32),
                                                               (256, 1, 16), (64, 16, 7)])  # fmt: skip
def test_every_head_size_matches_dense_attention(kernel: ModuleType, head_dim: int, group: int, block_size: int,
                                                 dtype: torch.dtype) -> None:  # fmt: skip
    check_every_path(
        kernel, make_case([(0, 30), (50, 17), (9, 1)], 2, group, head_dim, block_size, dtype, seed=1)
    )


def test_long_chunk_after_a_long_prefix(kernel: ModuleType) -> None:
    # many query tiles and key tiles, three KV heads as in SmolLM2
    for dtype in (torch.float32, torch.bfloat16):
        check_every_path(kernel, make_case([(300, 150), (0, 200)], 3, 3, 64, 16, dtype, seed=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_engine_torch_path(kernel: ModuleType, dtype: torch.dtype) -> None:
    """Chunk by chunk, the reference the engine uses without the kernel (gather + SDPA)."""
    case = make_case(CHUNKS, 3, 3, 64, 16, dtype, seed=3)
    cu = case.cu_seqlens.tolist()
    reference = torch.cat([
        paged_attention_prefill(
            case.q[cu[i] : cu[i + 1]], case.k_cache, case.v_cache,
            gather_index(case.tables[i : i + 1, : math.ceil((start + n) / 16)], 3), start, case.scale,
        )
        for i, (start, n) in enumerate(case.chunks)
    ])  # fmt: skip
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(case.run(kernel).float(), reference.float(), atol=tol, rtol=tol)


def test_the_data_catch_an_off_by_one_causal_mask(kernel: ModuleType) -> None:
    """A kernel that let each query see one key more, or one fewer, must fail `check`: shifting every
    query's position by one moves the float32 outputs by far more than the tolerance."""
    case = make_case(CHUNKS, 2, 3, 64, 16, torch.float32)
    out = case.run(kernel).double()
    for shift in (-1, 1):
        wrong = case.expected(shift)
        wrong = torch.where(wrong.isnan(), 0.0, wrong)  # a query at -1 sees nothing
        assert (out - wrong).abs().max() > 100 * TOLERANCE[torch.float32], shift
    assert (out - case.expected()).abs().max() < TOLERANCE[torch.float32]


def test_cache_rows_past_each_context_are_never_read(kernel: ModuleType) -> None:
    """The unused rows of each context's last block, and every other block, hold NaN."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        case = make_case(CHUNKS, 2, 3, 64, 16, dtype, fill=float("nan"))
        case.tables[0, 1:] = 10**9  # padding of the table past a context: never looked at either
        for path in kernel.paths(case.q):
            check(case.run(kernel, path), case, f"{dtype} {path}")


def test_strided_q_and_int64_metadata(kernel: ModuleType) -> None:
    case = make_case(CHUNKS, 2, 3, 64, 16, torch.float32)
    wide = torch.zeros(case.q.shape[0], case.q.shape[1] + 2, case.q.shape[2])  # [n, H + 2, D]
    wide[:, 1:-1] = case.q
    case.q = wide[:, 1:-1]  # [n, H, D] view, not contiguous
    case.cu_seqlens, case.context_lens = case.cu_seqlens.long(), case.context_lens.long()
    check(case.run(kernel), case, "strided q")


def test_results_do_not_depend_on_the_thread_count(kernel: ModuleType) -> None:
    case = make_case(CHUNKS, 2, 3, 64, 16, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = case.run(kernel)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(case.run(kernel), one)
    finally:
        torch.set_num_threads(threads)


def test_torch_own_amx_users_keep_working_around_it(kernel: ModuleType) -> None:
    """bf16 SDPA and matmul (oneDNN / ATen brgemm: AMX tiles where the CPU has them) interleaved with
    the kernel on the same threads: the kernel leaves each thread's tile configuration as it was."""
    import torch.nn.functional as F

    case = make_case([(0, 100), (30, 40)], 3, 3, 64, 16, torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 9, 200, 64, generator=gen).bfloat16() for _ in range(2))  # [1, H, L, D]
    x, w = torch.randn(200, 576, generator=gen).bfloat16(), torch.randn(576, 576, generator=gen).bfloat16()
    sdpa, matmul, ours = F.scaled_dot_product_attention(q, k, k, is_causal=True), x @ w, case.run(kernel)
    for _ in range(20):
        assert torch.equal(F.scaled_dot_product_attention(q, k, k, is_causal=True), sdpa)
        assert torch.equal(case.run(kernel), ours)
        assert torch.equal(x @ w, matmul)
    check(ours, case, "interleaved")


def test_no_tokens(kernel: ModuleType) -> None:
    case = make_case([(4, 1)], 2, 3, 64, 16, torch.float32)
    q = case.q[:0]
    cu, lens = torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    out = kernel.paged_attention_prefill_varlen(
        q, case.k_cache, case.v_cache, case.tables[:0], cu, lens, 1.0, 0
    )
    assert out.shape == (0, 6, 64)


def test_bad_inputs_say_what_is_wrong(kernel: ModuleType) -> None:
    case = make_case([(20, 10), (0, 3)], 2, 3, 64, 16, torch.float32)
    q, k, v, tables, cu, lens = case.args()

    def call(*args: object, max_len: int = 10) -> None:
        kernel.paged_attention_prefill_varlen(*args, 0.125, max_len)

    with pytest.raises(RuntimeError, match="share a dtype"):
        call(q.bfloat16(), k, v, tables, cu, lens)
    with pytest.raises(RuntimeError, match="dtype must be float32, bfloat16 or float16"):
        call(q.double(), k.double(), v.double(), tables, cu, lens)
    with pytest.raises(RuntimeError, match=r"q must be \[tokens, heads, head_dim\]"):
        call(q[0], k, v, tables, cu, lens)
    with pytest.raises(RuntimeError, match="must match k_cache"):
        call(q, k, v[:, :1], tables, cu, lens)
    with pytest.raises(RuntimeError, match="head_dim 64 != the cache's 32"):
        call(q, k[..., :32].contiguous(), v[..., :32].contiguous(), tables, cu, lens)
    with pytest.raises(RuntimeError, match="must be a multiple of kv heads"):
        call(q[:, :5], k, v, tables, cu, lens)
    with pytest.raises(RuntimeError, match="head_dim 48 not compiled in"):
        call(q[..., :48].contiguous(), k[..., :48].contiguous(), v[..., :48].contiguous(), tables, cu, lens)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        call(q, k.transpose(0, 1).contiguous().transpose(0, 1), v, tables, cu, lens)  # same shape, strided
    with pytest.raises(RuntimeError, match="num_seqs \\+ 1 = 3 entries"):
        call(q, k, v, tables, cu[:2], lens)
    with pytest.raises(RuntimeError, match=r"cu_seqlens\[-1\] = 13 but q has 12 tokens"):
        call(q[:12], k, v, tables, cu, lens)
    with pytest.raises(RuntimeError, match="cu_seqlens\\[0\\] must be 0"):
        call(q, k, v, tables, cu + 1, lens)
    with pytest.raises(RuntimeError, match="is shorter than its chunk of 10 tokens"):
        call(q, k, v, tables, cu, torch.tensor([9, 3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="2 blocks, but block_tables has 1 columns"):
        call(q, k, v, tables[:, :1], cu, lens)
    with pytest.raises(RuntimeError, match="is outside the cache"):
        call(q, k, v, torch.where(tables == tables[0, 0], 999, tables), cu, lens)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        call(q, k, v, tables, cu.float(), lens)
    with pytest.raises(RuntimeError, match="max_query_len 4 is shorter than the longest chunk"):
        call(q, k, v, tables, cu, lens, max_len=4)
    with pytest.raises(RuntimeError, match="path 'nope' is not available"):
        kernel.paged_attention_prefill_varlen_path(q, k, v, tables, cu, lens, 0.125, 10, "nope")


def test_the_engine_picks_the_kernel_on_cpu(kernel: ModuleType) -> None:
    from llmserve.model_runner import _prefill_kernel

    cpu = torch.device("cpu")
    assert _prefill_kernel("auto", cpu, 64) is kernel.paged_attention_prefill_varlen
    assert _prefill_kernel("cpp", cpu, 128) is kernel.paged_attention_prefill_varlen
    assert _prefill_kernel("torch", cpu, 64) is None
    assert _prefill_kernel("auto", cpu, 48) is None  # not compiled in: the torch reference


def test_engine_with_the_kernel_matches_the_torch_backend(kernel: ModuleType, tiny_path: Path) -> None:
    from llmserve import LLM, SamplingParams

    # 16-token steps over 4-token blocks: prompts are prefilled in chunks beside other sequences'
    # decodes, so steps mix a decode batch and a varlen prefill batch with cached prefixes.
    prompts = [[5, 6, 7], list(range(100, 140)), [42] * 9, list(range(300, 317))]
    options = dict(dtype="float32", block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=10)
    llm = LLM(str(tiny_path), attention_backend="cpp", **options)
    assert llm.engine.runner.prefill_kernel is kernel.paged_attention_prefill_varlen
    tokens = [r.token_ids for r in llm.generate(prompts, params)]
    reference = LLM(str(tiny_path), attention_backend="torch", **options)
    assert reference.engine.runner.prefill_kernel is None
    assert tokens == [r.token_ids for r in reference.generate(prompts, params)]
