"""The Triton paged-attention kernels against the torch reference (kernels/paged_attention_ref.py).

Every comparison runs in a child Python process, for two reasons. Triton fixes interpreter or
compiler mode when `@triton.jit` runs, for its own `tl.max`/`tl.sum` as much as for our kernels, so
TRITON_INTERPRET=1 must be set before `triton.language` is first imported; in a full pytest run,
an earlier test module has already imported it by then (through transformers and torch._inductor).
And a child leaves this process's environment untouched.

- On CPU, one child with TRITON_INTERPRET=1 runs every case (`interpreter_results`), and each test
  below reports its own case.
- `test_kernels_compile_for_a100_and_h100_within_shared_memory`: a child without the interpreter
  compiles every kernel to a cubin for sm_80 and sm_90 (no GPU needed) and checks its shared memory.
- `test_kernels_match_torch_reference_on_cuda` (`gpu`): the same cases, plus long contexts and the
  engine, compiled on CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

import llmserve_kernels
from llmserve_kernels import paged_attention_ref

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: the Triton kernels cannot be tested here", allow_module_level=True)

TESTS_DIR = Path(__file__).resolve().parent
KERNELS_FILE = Path(paged_attention_ref.__file__).parent / "triton_paged_attention.py"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Both sides round their output to the dtype once and accumulate in fp32 in different orders: a
# couple of ulps of the output (fp16: 2**-10, bf16: 2**-7 at magnitude 1); fp32 differs by ~1e-6.
TOLERANCE = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}
SHAPES = [(64, 1), (64, 3), (128, 4), (128, 8)]  # (head_dim, query heads per KV head)
NUM_KV_HEADS = 2

Case = dict[str, Any]


def case_id(case: Case) -> str:
    return "-".join(str(v) for v in case.values())


def grid(kind: str) -> list[Case]:
    """Every shape with every dtype, the block size alternating: each shape and each dtype meets both
    block sizes, in half the interpreter time of the full cross-product (which the gpu test runs)."""
    return [
        {"kind": kind, "head_dim": d, "group": g, "block_size": (16, 32)[(i + j) % 2], "dtype": dt}
        for i, (d, g) in enumerate(SHAPES)
        for j, dt in enumerate(DTYPES)
    ]


def full_grid(kind: str) -> list[Case]:
    return [
        {"kind": kind, "head_dim": d, "group": g, "block_size": bs, "dtype": dt}
        for d, g in SHAPES
        for bs in (16, 32)
        for dt in DTYPES
    ]


DECODE_CASES = grid("decode")
PREFILL_CASES = grid("prefill")
SIGNATURE_CASES = [{"kind": "prefill_signature", "start": s} for s in (0, 16, 21)]
ENGINE_CASE = {"kind": "engine", "device": "cpu"}
SHUFFLED_CASE = {"kind": "shuffled_table"}


# ---- what the child runs ----------------------------------------------------------------------


def decode_lens(block_size: int) -> list[int]:
    # 1 token; exactly one block; ragged; one short of three blocks (the table is 3 blocks wide)
    return [1, block_size, 2 * block_size + 5, 3 * block_size - 1]


def prefill_chunks(block_size: int) -> list[tuple[int, int]]:
    # (cached prefix, new tokens): a 1-token context; a prefix and a context of whole blocks; ragged
    return [(0, 1), (block_size, block_size), (5, 2 * block_size + 3)]


def check_decode(device: str, head_dim: int, group: int, block_size: int, dtype: str, lens: list[int],
                 **options: int) -> None:  # fmt: skip
    from test_kernels import make_paged

    from llmserve_kernels import triton_paged_attention
    from llmserve_kernels.paged_attention_ref import decode_mask, gather_index, paged_attention_decode

    k_cache, v_cache, tables, _, _ = make_paged(
        lens, NUM_KV_HEADS, head_dim, block_size, DTYPES[dtype], seed=7
    )
    q = torch.randn(len(lens), NUM_KV_HEADS * group, head_dim, generator=torch.Generator().manual_seed(1))
    q = q.to(DTYPES[dtype])
    context_lens = torch.tensor(lens)
    mask = decode_mask(context_lens, tables.shape[1] * block_size, torch.float32)  # [B, 1, 1, width * bs]
    expected = paged_attention_decode(
        q, k_cache, v_cache, gather_index(tables, NUM_KV_HEADS), mask, head_dim**-0.5
    )
    out = triton_paged_attention.paged_attention_decode(
        q.to(device), k_cache.to(device), v_cache.to(device), tables.to(device), context_lens.to(device),
        head_dim**-0.5, **options,
    )  # fmt: skip
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(
        out.cpu().float(), expected.float(), atol=tol, rtol=tol, msg=lambda m: f"{options}: {m}"
    )


def check_prefill(device: str, head_dim: int, group: int, block_size: int, dtype: str,
                  chunks: list[tuple[int, int]], **options: int) -> None:  # fmt: skip
    from test_kernels import make_paged

    from llmserve_kernels import triton_paged_attention
    from llmserve_kernels.paged_attention_ref import gather_index, paged_attention_prefill

    lens = [start + n for start, n in chunks]
    k_cache, v_cache, tables, _, _ = make_paged(
        lens, NUM_KV_HEADS, head_dim, block_size, DTYPES[dtype], seed=8
    )
    total = sum(n for _, n in chunks)
    q = torch.randn(total, NUM_KV_HEADS * group, head_dim, generator=torch.Generator().manual_seed(2))
    q = q.to(DTYPES[dtype])
    expected, row = [], 0
    for i, (start, n) in enumerate(chunks):
        index = gather_index(tables[i : i + 1, : -(-lens[i] // block_size)], NUM_KV_HEADS)  # [1, Hkv, nblk]
        expected.append(
            paged_attention_prefill(q[row : row + n], k_cache, v_cache, index, start, head_dim**-0.5)
        )
        row += n
    cu_seqlens = torch.tensor(
        [0, *torch.tensor([n for _, n in chunks]).cumsum(0).tolist()], dtype=torch.int32
    )
    out = triton_paged_attention.paged_attention_prefill_varlen(
        q.to(device), k_cache.to(device), v_cache.to(device), tables.to(device), cu_seqlens.to(device),
        torch.tensor(lens, dtype=torch.int32, device=device), head_dim**-0.5, max(n for _, n in chunks), **options,
    )  # fmt: skip
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.cpu().float(), torch.cat(expected).float(), atol=tol, rtol=tol,
                               msg=lambda m: f"{options}: {m}")  # fmt: skip


def run_decode(case: Case, device: str) -> None:
    args = (
        device,
        case["head_dim"],
        case["group"],
        case["block_size"],
        case["dtype"],
        decode_lens(case["block_size"]),
    )
    check_decode(*args)  # one split; 32- or 64-token steps over 16- or 32-token blocks
    # Three splits of one block each, then the merge: the 1-token sequence leaves two splits empty,
    # and 16-token steps are shorter than a 32-token cache block.
    check_decode(*args, num_splits=3, block_n=16)


def run_prefill(case: Case, device: str) -> None:
    args = (device, case["head_dim"], case["group"], case["block_size"], case["dtype"])
    check_prefill(*args, prefill_chunks(case["block_size"]))
    # Small tiles: several query tiles per chunk, and 16-token steps (shorter than a 32-token block).
    if case["dtype"] == "float16" and case["head_dim"] == 64:
        check_prefill(*args, prefill_chunks(case["block_size"]), block_m=16, block_n=16)


def run_prefill_signature(case: Case) -> None:
    from test_kernels import make_paged

    from llmserve_kernels import triton_paged_attention
    from llmserve_kernels.paged_attention_ref import gather_index, paged_attention_prefill

    start, n, group, head_dim, block_size = case["start"], 20, 3, 64, 16
    k_cache, v_cache, tables, _, _ = make_paged(
        [start + n], NUM_KV_HEADS, head_dim, block_size, torch.float32
    )
    q = torch.randn(n, NUM_KV_HEADS * group, head_dim)
    index = gather_index(tables, NUM_KV_HEADS)  # [1, Hkv, nblk]
    out = triton_paged_attention.paged_attention_prefill(q, k_cache, v_cache, index, start, head_dim**-0.5)
    expected = paged_attention_prefill(q, k_cache, v_cache, index, start, head_dim**-0.5)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def run_shuffled_table() -> None:
    """The comparisons can fail: the same cache read through a reordered table disagrees."""
    from test_kernels import make_paged

    from llmserve_kernels import triton_paged_attention
    from llmserve_kernels.paged_attention_ref import decode_mask, gather_index, paged_attention_decode

    head_dim, block_size, lens = 64, 16, [40, 40]
    k_cache, v_cache, tables, _, _ = make_paged(lens, NUM_KV_HEADS, head_dim, block_size, torch.float32)
    q = torch.randn(len(lens), NUM_KV_HEADS, head_dim)
    mask = decode_mask(torch.tensor(lens), tables.shape[1] * block_size, torch.float32)
    expected = paged_attention_decode(
        q, k_cache, v_cache, gather_index(tables, NUM_KV_HEADS), mask, head_dim**-0.5
    )
    flipped = tables.flip(1)  # [B, 3]: block 2 read as block 0, and so on
    out = triton_paged_attention.paged_attention_decode(
        q, k_cache, v_cache, flipped, torch.tensor(lens), head_dim**-0.5
    )
    assert not torch.allclose(out, expected, atol=1e-3), "a reordered block table gave the same answer"


def run_engine(device: str) -> None:
    from tiny_model import make_tiny_llama

    from llmserve import LLM, SamplingParams
    from llmserve_kernels import triton_paged_attention

    with tempfile.TemporaryDirectory() as folder:
        path = str(make_tiny_llama(Path(folder)))
        prompts = [[5, 6, 7], list(range(100, 140)), [42] * 9, list(range(300, 317))]
        # 16-token steps: prompts are prefilled in chunks beside other sequences' decodes, so steps mix
        # a decode batch and a varlen prefill batch; 4-token blocks spread every context over many blocks.
        options = dict(
            device=device, dtype="float32", block_size=4, max_num_batched_tokens=16, max_num_seqs=4
        )
        params = SamplingParams(temperature=0, max_tokens=10)
        llm = LLM(path, attention_backend="triton", **options)
        runner = llm.engine.runner
        assert runner.decode_kernel is triton_paged_attention.paged_attention_decode, runner.decode_kernel
        assert runner.prefill_kernel is triton_paged_attention.paged_attention_prefill_varlen, (
            runner.prefill_kernel
        )
        triton_tokens = [r.token_ids for r in llm.generate(prompts, params)]
        reference = LLM(path, attention_backend="torch", **options)
        torch_tokens = [r.token_ids for r in reference.generate(prompts, params)]
    assert triton_tokens == torch_tokens, f"triton {triton_tokens}\ntorch  {torch_tokens}"


def run_long_contexts(case: Case) -> None:
    """Contexts of thousands of tokens in few sequences: the automatic split count, many tiles."""
    dtype = case["dtype"]
    check_decode("cuda", 128, 4, 16, dtype, [1, 1000, 4096])
    check_decode("cuda", 128, 8, 32, dtype, [4096, 8191])
    check_prefill("cuda", 128, 4, 16, dtype, [(0, 700), (1500, 300), (37, 1)])


def run_compile(case: Case) -> None:
    """Compile every kernel to a cubin for a CUDA target, which needs no GPU, and check its shared memory."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget

    from llmserve_kernels import triton_paged_attention as tpa

    arch, dtype, head_dim = case["arch"], case["dtype"], case["head_dim"]
    limit = {80: 163 * 1024, 90: 227 * 1024}[arch]  # opt-in shared memory per block: A100, H100
    ty = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]

    def compile_shared(fn: Any, pointers: dict[str, str], constexprs: dict[str, Any]) -> int:
        signature = {}
        for name in inspect.signature(fn.fn).parameters:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointers.get(name, pointers["*"])
            else:
                signature[name] = "fp32" if name == "scale_log2e" else "i32"
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        return kernel.metadata.shared

    pointers = {"*": f"*{ty}", "tables_ptr": "*i64", "lens_ptr": "*i64", "cu_seqlens_ptr": "*i32",
                "m_ptr": "*fp32", "l_ptr": "*fp32"}  # fmt: skip
    block_m, block_n = tpa._tiles(head_dim, DTYPES[dtype].itemsize)
    decode = dict(NUM_HEADS=32, GROUP=8, GROUP_PAD=16, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, BLOCK_SIZE=16,
                  BLOCK_N=block_n, DOT_FP32=False)  # fmt: skip
    shared = {
        "decode": compile_shared(tpa._decode_kernel, pointers, dict(decode, SPLIT=False)),
        "decode split": compile_shared(tpa._decode_kernel, dict(pointers, out_ptr="*fp32"), dict(decode, SPLIT=True)),
        "merge": compile_shared(
            tpa._decode_merge_kernel, {"*": "*fp32", "out_ptr": f"*{ty}"},
            dict(NUM_HEADS=32, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, SPLITS_PAD=16),
        ),
        "prefill": compile_shared(
            tpa._prefill_kernel, pointers,
            dict(GROUP=4, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, BLOCK_SIZE=16, BLOCK_M=block_m, BLOCK_N=block_n,
                 DOT_FP32=False),
        ),
    }  # fmt: skip
    print(f"sm_{arch} {dtype} D={head_dim} shared memory bytes: {shared}", file=sys.stderr)
    assert all(v <= limit for v in shared.values()), f"over sm_{arch}'s {limit} bytes: {shared}"


def run_case(case: Case) -> str:
    """'' when the case passes, else why it failed."""
    device = case.get("device", "cpu")
    try:
        match case["kind"]:
            case "decode":
                run_decode(case, device)
            case "prefill":
                run_prefill(case, device)
            case "prefill_signature":
                run_prefill_signature(case)
            case "shuffled_table":
                run_shuffled_table()
            case "engine":
                run_engine(device)
            case "long_contexts":
                run_long_contexts(case)
            case "compile":
                run_compile(case)
            case kind:
                raise ValueError(f"unknown case kind {kind!r}")
    except Exception as exc:  # the parent fails the test with this text
        return f"{type(exc).__name__}: {exc}"
    return ""


def child_main() -> None:
    """Entry point of the child: cases as JSON on stdin, {case id: failure or ''} as JSON on stdout."""
    cases = json.loads(sys.stdin.read())
    results = {case_id(case): run_case(case) for case in cases}
    print(json.dumps(results))


# ---- the parent: one child per mode, one test per case ---------------------------------------------


def run_in_child(cases: list[Case], *, interpret: bool, timeout: float = 600) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset; 1 is its default
    code = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_triton_kernels; test_triton_kernels.child_main()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(cases), env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"the child process failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    cases = [*DECODE_CASES, *PREFILL_CASES, *SIGNATURE_CASES, SHUFFLED_CASE, ENGINE_CASE]
    return run_in_child(cases, interpret=True)


def report(results: dict[str, str], case: Case) -> None:
    failure = results[case_id(case)]
    if failure:
        pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize("case", DECODE_CASES, ids=case_id)
def test_decode_kernel_matches_torch_reference(interpreter_results: dict[str, str], case: Case) -> None:
    report(interpreter_results, case)


@pytest.mark.parametrize("case", PREFILL_CASES, ids=case_id)
def test_prefill_varlen_kernel_matches_torch_reference(
    interpreter_results: dict[str, str], case: Case
) -> None:
    report(interpreter_results, case)


@pytest.mark.parametrize("case", SIGNATURE_CASES, ids=case_id)
def test_prefill_with_the_reference_signature_matches_it(
    interpreter_results: dict[str, str], case: Case
) -> None:
    report(interpreter_results, case)


def test_decode_reads_the_blocks_its_table_names(interpreter_results: dict[str, str]) -> None:
    report(interpreter_results, SHUFFLED_CASE)


def test_engine_with_triton_backend_generates_the_torch_backends_greedy_tokens(
    interpreter_results: dict[str, str],
) -> None:
    report(interpreter_results, ENGINE_CASE)


def test_triton_backend_on_cpu_without_the_interpreter_is_refused() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: the triton backend is allowed on CPU here")
    from llmserve.model_runner import _decode_kernel

    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _decode_kernel("triton", torch.device("cpu"), 64)


def test_without_triton_the_module_imports_and_the_engine_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llmserve.model_runner import _decode_kernel, _prefill_kernel

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("triton_paged_attention_without_triton", KERNELS_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.available()
    with pytest.raises(RuntimeError, match="pip install triton"):
        module.paged_attention_decode(*[torch.zeros(1, 1, 1, 16)] * 3, torch.zeros(1, 1), torch.ones(1), 1.0)
    monkeypatch.setitem(sys.modules, "llmserve_kernels.triton_paged_attention", module)
    monkeypatch.setattr(llmserve_kernels, "triton_paged_attention", module, raising=False)
    with pytest.raises(ValueError, match="needs the triton package"):
        _decode_kernel("triton", torch.device("cpu"), 64)
    # auto on CUDA falls back to the torch reference (None) instead of failing
    assert _decode_kernel("auto", torch.device("cuda"), 64) is None
    assert _prefill_kernel("auto", torch.device("cuda"), 64) is None


def test_kernels_compile_for_a100_and_h100_within_shared_memory() -> None:
    cases = [
        {"kind": "compile", "arch": arch, "dtype": dtype, "head_dim": head_dim}
        for arch, dtype, head_dim in [(90, "bfloat16", 128), (90, "float32", 128), (80, "float16", 64)]
    ]
    failures = {k: v for k, v in run_in_child(cases, interpret=False).items() if v}
    if failures and all("ptxas" in v and "not found" in v.lower() for v in failures.values()):
        pytest.skip(f"triton has no ptxas here to compile for a GPU target: {next(iter(failures.values()))}")
    assert not failures, failures


@pytest.mark.gpu
def test_kernels_match_torch_reference_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the compiled Triton kernels need one")
    cases = [
        *({**c, "device": "cuda"} for c in full_grid("decode") + full_grid("prefill")),
        *({"kind": "long_contexts", "dtype": dtype} for dtype in DTYPES),
        {"kind": "engine", "device": "cuda"},
    ]
    failures = {k: v for k, v in run_in_child(cases, interpret=False).items() if v}
    assert not failures, failures
