"""Weight-only int8 on CPU (`quantization="int8"`): the C++ kernel (kernels/csrc/int8_gemv_cpu.cpp)
against a float64 reference, the `Int8Linear` module's two paths, and the built-in model in bf16.

The kernel computes out = T(T(sum_k x * code) * scale + bias) with float32 sums; the reference is
the same product of the dequantized weights in float64. The allowed error is the float32 summation
bound (K * 2^-24 of the sum of |terms|) plus, in bf16, the two roundings to bf16 (2^-9 each,
relative to the same magnitude). A wrong code, scale, bias or layout is off by the order of the
magnitude itself, far outside.

Quality (same method as test_quantization.py: teacher-forced top-1 agreement and mean log-likelihood
gap over the unquantized model's greedy continuations, 5 prompts x 16 tokens), against bf16:
  | measured on this CPU | top-1 agreement | gap (nat/token) | greedy prefix lengths |
  | int8 vs bf16         | 0.95            | +0.014          | 15, 16, 10, 16, 15    |
bounds: top-1 >= 0.90, |gap| <= 0.04, 8 equal greedy tokens on >= 3 prompts. (For scale: bf16 vs
float32 weights is 0.001 nat, bnb-8bit vs float32 0.010.)

Batching: rows on one path never change each other's tokens (tested exactly); crossing the
kernel's row threshold changes the order of float32 sums, which can flip a bf16 near-tie, so that
is tested as "tokens agree up to a near-tie" (see llmserve/int8_linear.py).
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from test_quantization import NUM_TOKENS, agreement
from torch import nn

from llmserve import LLM, SamplingParams
from llmserve.int8_linear import KERNEL_MAX_ROWS, UNPACKED_KERNEL_MAX_ROWS, Int8Linear, quantize_rows
from llmserve.models.packed_linear import can_pack
from llmserve.outputs import CompletionOutput
from llmserve.quantization import get_quantizer
from llmserve_kernels import cpu_ops

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    module = cpu_ops.load_int8_ops()
    assert module is not None, "the C++ int8 kernel did not build (see the log)"
    return module


def random_layer(
    n: int, k: int, bias: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes [n, k] int8 over the full range, scales [n] float32 of mixed size, bias [n] or None)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, generator=gen) * 0.02 + 1e-3
    return codes, scales, (torch.randn(n, generator=gen) if bias else None)


def check_against_float64(
    out: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> None:
    x64, w64 = x.double(), codes.double() * scales.double()[:, None]  # the dequantized weights
    b64 = torch.zeros(codes.shape[0], dtype=torch.float64) if bias is None else bias.double()
    ref = x64 @ w64.T + b64
    magnitude = x64.abs() @ w64.abs().T + b64.abs()  # the sum of |terms| of each output
    k = codes.shape[1]
    roundings = 2 * 2.0**-9 if x.dtype == torch.bfloat16 else 2 * 2.0**-24
    bound = (k * 2.0**-24 + roundings) * magnitude + 1e-30
    err = (out.double() - ref).abs()
    worst = (err / bound).max().item()
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert worst <= 1.0, f"error {worst:.2f}x the bound (max abs error {err.max().item():.3g})"


# ---- the kernel ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("k", "n", "bias"), [(37, 19, True), (100, 33, False), (576, 64, True), (1, 5, True)]
)
def test_kernel_matches_float64_reference_for_1_to_9_rows(
    ops: ModuleType, dtype: torch.dtype, k: int, n: int, bias: bool
) -> None:
    # Odd K and N: no multiple of 16 or 64 is required; rows past N in the last block are padding.
    codes, scales, b = random_layer(n, k, bias, seed=k * n)
    packed = ops.int8_pack(codes)
    for m in range(1, 10):  # 9 = one full block of 8 rows plus one
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        check_against_float64(ops.int8_linear(x, packed, scales, b), x, codes, scales, b)


def test_kernel_is_exact_where_float32_is(ops: ModuleType) -> None:
    # Small integers: every product and partial sum is exact in float32, so any misplaced code shows.
    codes = torch.randint(-127, 128, (50, 70), dtype=torch.int8)
    x = torch.randint(-3, 4, (3, 70)).float()
    out = ops.int8_linear(x, ops.int8_pack(codes), torch.ones(50), None)
    assert torch.equal(out, x @ codes.float().T)


def test_pack_puts_16_rows_side_by_side_and_pads_with_zeros(ops: ModuleType) -> None:
    codes = torch.randint(-127, 128, (21, 5), dtype=torch.int8)
    packed = ops.int8_pack(codes)
    assert packed.shape == (2, 5, 16) and packed.dtype == torch.int8
    assert torch.equal(packed[1, 3, 4], codes[20, 3])
    unpacked = packed.transpose(1, 2).reshape(32, 5)
    assert torch.equal(unpacked[:21], codes) and not unpacked[21:].any()


def test_kernel_refuses_wrong_shapes_with_a_clear_error(ops: ModuleType) -> None:
    codes, scales, _ = random_layer(20, 32, False, seed=1)
    packed, x = ops.int8_pack(codes), torch.randn(2, 32)
    with pytest.raises(RuntimeError, match="x has 31 columns but w has K = 32"):
        ops.int8_linear(torch.randn(2, 31), packed, scales, None)
    with pytest.raises(RuntimeError, match="layout from int8_pack"):
        ops.int8_linear(x, codes, scales, None)  # the unpacked [N, K] codes
    with pytest.raises(RuntimeError, match="but scales has 40 rows"):
        ops.int8_linear(x, packed, torch.ones(40), None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.int8_linear(x, packed, scales, torch.ones(19))
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        ops.int8_linear(x.half(), packed, scales, None)


def test_zero_rows_give_an_empty_result(ops: ModuleType) -> None:
    codes, scales, _ = random_layer(20, 32, False, seed=2)
    assert ops.int8_linear(torch.empty(0, 32), ops.int8_pack(codes), scales, None).shape == (0, 20)


@pytest.mark.slow
@pytest.mark.parametrize(("loop", "march"), [("portable", "x86-64-v2"), ("avx2", "x86-64-v3")])
def test_every_inner_loop_gives_the_same_bits(ops: ModuleType, loop: str, march: str) -> None:
    # The scalar fallback and the AVX2 halves (each compiled here, ~20 s once) sum each output in the
    # same k order with one fused multiply-add per step, as the AVX-512 chain does: same bits as the
    # machine's own build, whichever loop that is.
    from torch.utils import cpp_extension

    build = cpp_extension.load(
        name=f"llmserve_int8_gemv_cpu_{loop}",
        sources=[str(cpu_ops._CSRC / "int8_gemv_cpu.cpp")],
        extra_cflags=["-O2", f"-march={march}", "-fopenmp", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
    )
    assert build.inner_loop() == loop and ops.inner_loop() in ("avx512", "avx2", "portable")
    codes, scales, bias = random_layer(45, 301, True, seed=3)  # a partial block, K not a multiple of 4
    packed = build.int8_pack(codes)
    assert torch.equal(packed, ops.int8_pack(codes))
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 2, 3, 5, 8, 11):  # every tile shape of either loop
            x = torch.randn(rows, 301).to(dtype)
            assert torch.equal(build.int8_linear(x, packed, scales, bias), ops.int8_linear(x, packed, scales, bias))


# ---- quantization and the module -------------------------------------------------------------------


def test_rows_are_quantized_symmetrically_with_max_over_127() -> None:
    weight = torch.randn(6, 40) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0, 0.0])[:, None]  # last row all zero
    codes, scales = quantize_rows(weight)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    torch.testing.assert_close(scales[:5], weight[:5].abs().amax(dim=1) / 127)
    assert (codes[:5].abs().amax(dim=1) == 127).all() and not codes[5].any()
    assert ((codes.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 * (1 + 1e-6)).all()


class Spy:
    """The kernel module, counting which entry points a forward used."""

    def __init__(self, ops: ModuleType) -> None:
        self.ops, self.calls = ops, SimpleNamespace(kernel=0, epilogue=0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ops, name)

    def int8_linear(self, *args: Any) -> torch.Tensor:
        self.calls.kernel += 1
        return self.ops.int8_linear(*args)

    def int8_scale_bias_(self, *args: Any) -> torch.Tensor:
        self.calls.epilogue += 1
        return self.ops.int8_scale_bias_(*args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_module_takes_the_kernel_for_few_rows_and_the_gemm_beyond(
    ops: ModuleType, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(576, 200, bias=True).to(dtype)
    module = Int8Linear(linear.weight, linear.bias, ops=ops)
    # The measured crossover against the large step it got: a packed bf16 GEMM, or a plain F.linear.
    packed = module.gemm is not None
    assert module.max_kernel_rows == (KERNEL_MAX_ROWS if packed else UNPACKED_KERNEL_MAX_ROWS)
    assert packed == (dtype == torch.bfloat16 and can_pack(torch.device("cpu"), dtype))
    spy = Spy(ops)
    module.ops = spy  # type: ignore[assignment]
    for rows, path in [
        (1, "kernel"),
        (module.max_kernel_rows, "kernel"),
        (module.max_kernel_rows + 1, "gemm"),
        (64, "gemm"),
    ]:
        spy.calls.kernel = spy.calls.epilogue = 0
        x = torch.randn(rows, 576).to(dtype)
        out = module(x)
        assert (spy.calls.kernel, spy.calls.epilogue) == ((1, 0) if path == "kernel" else (0, 1)), rows
        codes, scales = quantize_rows(linear.weight)
        check_against_float64(out, x, codes, scales, linear.bias.detach().float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_both_paths_compute_the_same_function(ops: ModuleType, dtype: torch.dtype) -> None:
    # The same 32 rows through the kernel and through the GEMM + epilogue: only the order of the
    # float32 sums differs (each path's own error is bounded by the tests above). In bf16 that
    # order rarely moves the sum across a rounding boundary, so nearly all outputs are identical.
    torch.manual_seed(1)
    k = 1536
    linear = nn.Linear(k, 576, bias=True).to(dtype)
    x = torch.randn(32, k).to(dtype)
    by_kernel = Int8Linear(linear.weight, linear.bias, ops=ops, max_kernel_rows=32)(x)
    by_gemm = Int8Linear(linear.weight, linear.bias, ops=ops, max_kernel_rows=0)(x)
    codes, scales = quantize_rows(linear.weight)
    magnitude = (
        x.double().abs() @ (codes.double().abs() * scales.double()[:, None]).T + linear.bias.double().abs()
    )
    roundings = 2 * 2.0**-8 if dtype == torch.bfloat16 else 0.0
    bound = (2 * k * 2.0**-24 + roundings) * magnitude
    assert ((by_kernel.double() - by_gemm.double()).abs() <= bound).all()
    if dtype == torch.bfloat16:
        same = (by_kernel == by_gemm).float().mean().item()
        assert same >= 0.95, f"only {same:.1%} of outputs identical"


def test_int8_is_refused_at_load_off_the_cpu_and_in_float16() -> None:
    with pytest.raises(ValueError, match="'int8' runs on the CPU only, not on cuda"):
        get_quantizer("int8", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="'int8' needs dtype float32 or bfloat16"):
        get_quantizer("int8", CPU, torch.float16)


# ---- the built-in model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_llm() -> LLM:
    return LLM(dtype="bfloat16")


@pytest.fixture(scope="module")
def int8_llm() -> LLM:
    # The packed-GEMM threshold on every CPU, so the prompts and batches below straddle it as planned
    # (where bf16 cannot be packed the module would take UNPACKED_KERNEL_MAX_ROWS).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Int8Linear, "unpacked_max_kernel_rows", KERNEL_MAX_ROWS)
        return LLM(dtype="bfloat16", quantization="int8", max_num_seqs=16)


@pytest.mark.slow
def test_every_linear_and_the_lm_head_are_int8(int8_llm: LLM) -> None:
    model = int8_llm.engine.runner.model
    for layer in model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            module = getattr(layer, name)
            assert isinstance(module, Int8Linear) and module.packed.dtype == torch.int8, name
    assert isinstance(model.packed_head, Int8Linear)
    assert model.packed_head.out_features == model.arch.vocab_size
    assert not any(type(m) is nn.Linear for m in model.modules())


@pytest.mark.slow
def test_int8_model_agrees_with_bfloat16(bf16_llm: LLM, int8_llm: LLM) -> None:
    result = agreement(bf16_llm, int8_llm)
    print(
        f"\nint8 vs bf16: greedy prefix lengths {result.prefix_lengths} of {NUM_TOKENS}, teacher-forced "
        f"top-1 agreement {result.top1:.3f}, mean log-likelihood gap {result.gap:+.4f} nat/token"
    )
    assert result.top1 >= 0.90
    assert abs(result.gap) <= 0.04
    assert sum(n >= 8 for n in result.prefix_lengths) >= 3


# Prompts of more than KERNEL_MAX_ROWS tokens: their prefill takes the GEMM path alone or batched.
LONG_PROMPTS = [
    "The capital of France is a city with a long history, and its name is",
    "def fibonacci(n):\n    # return the n-th Fibonacci number, iteratively\n",
    "List three prime numbers greater than ten, separated by commas:",
]
FILLERS = [f"Count slowly from {i} up to {i + 5}, one number per line:" for i in range(13)]


def greedy(llm: LLM, prompts: list[str], logprobs: int | None = None) -> list[CompletionOutput]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=logprobs)
    results = llm.generate(prompts, params)
    assert all(len(r.prompt_token_ids) > KERNEL_MAX_ROWS for r in results)
    return [r.outputs[0] for r in results]


@pytest.mark.slow
def test_batching_on_one_path_does_not_change_tokens(int8_llm: LLM) -> None:
    # Each path computes every row on its own: the kernel sums each output in one float32 chain in
    # k order whatever M is, and oneDNN's bf16 GEMM gives the same rows at any M (as for the bf16
    # model). So alone vs a batch of 8 (decode steps on the kernel) and a batch of 12 vs 16 (on the
    # GEMM) must give identical tokens.
    alone = [greedy(int8_llm, [p])[0].token_ids for p in LONG_PROMPTS]
    batch_of_8 = greedy(int8_llm, LONG_PROMPTS + FILLERS[:5])
    assert [o.token_ids for o in batch_of_8[:3]] == alone
    batch_of_12 = greedy(int8_llm, LONG_PROMPTS + FILLERS[:9])
    batch_of_16 = greedy(int8_llm, LONG_PROMPTS + FILLERS[4:])
    assert [o.token_ids for o in batch_of_16[:3]] == [o.token_ids for o in batch_of_12[:3]]


@pytest.mark.slow
def test_crossing_the_kernel_threshold_changes_tokens_only_at_near_ties(int8_llm: LLM) -> None:
    # Alone, decode steps have 1 row (the kernel); in a batch of 12, 12 rows (the GEMM). The two
    # compute the same function up to the order of float32 sums, which moves ~3 in 10^5 outputs by
    # one bf16 ulp; logits are bf16, so exact top-2 ties are common, and such a tie can go either
    # way. So: the same logprobs (to a few bf16 ulps of a logit) while the tokens agree, and a
    # first difference, if any, only where the top two tokens are within 0.5 nat in both runs.
    alone = [greedy(int8_llm, [p], logprobs=2)[0] for p in LONG_PROMPTS]
    batch = greedy(int8_llm, LONG_PROMPTS + FILLERS[:9], logprobs=2)[:3]
    for a, b in zip(alone, batch, strict=True):
        assert a.logprobs is not None and b.logprobs is not None
        for step, (x, y) in enumerate(zip(a.logprobs, b.logprobs, strict=True)):
            if x.token_id != y.token_id:
                margins = [lp.top[0][1] - lp.top[1][1] for lp in (x, y)]
                print(f"\nbatch of 1 vs 12: first difference at token {step}, top-2 margins {margins}")
                assert max(margins) <= 0.5, (step, margins)
                break
            assert abs(x.logprob - y.logprob) <= 0.25, (step, x.logprob, y.logprob)
