"""4-bit weights on CPU (`quantization="int4"`): the Q4_1 quantizer and layout, the C++ kernel
(kernels/csrc/int4_gemv_cpu.cpp) against a float64 reference, the module's two paths, and the
built-in model.

The kernel quantizes each row of x per group of 32 to int8 and sums code x code in int32, so its
reference is the same computation in float64 from the kernel's own activation codes
(`int4_quantize_activations`, checked separately against its definition): the allowed error is
then only float32 rounding (G group steps of 2 FMAs, 2^-24 each, relative to the sum of |terms|,
plus the output rounding to bf16, 2^-8). A wrong nibble, scale, offset or layout is off by the order of
the magnitude itself. Against the exact product (unquantized x) the error is the activation
quantization's, bounded by half an int8 step of each group (also tested).

Quality on the built-in model against bf16 (same method as test_int8.py: teacher-forced top-1
agreement and log-likelihood gap over bf16's greedy continuations, 5 prompts x 16 tokens):
  | measured on this CPU | top-1 agreement | gap (nat/token) | greedy prefix lengths |
  | int4 vs bf16         | 0.975           | +0.001          | 16, 5, 6, 16, 15      |
bounds: top-1 >= 0.90, |gap| <= 0.04, 8 equal greedy tokens on >= 3 prompts. The weights
themselves are the GGUF file's (tested exactly): what differs is the int8 activations of decode steps.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from test_quantization import NUM_TOKENS, agreement
from torch import nn

from llmserve import LLM, SamplingParams
from llmserve.int4_linear import (
    GROUP,
    KERNEL_MAX_ROWS,
    UNPACKED_KERNEL_MAX_ROWS,
    Int4Linear,
    dequantize_groups,
    pack_groups,
    quantize_groups,
)
from llmserve.int8_linear import Int8Linear
from llmserve.quantization import get_quantizer
from llmserve_kernels import cpu_ops

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    module = cpu_ops.load_int4_ops()
    assert module is not None, "the C++ int4 kernel did not build (see the log)"
    return module


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # rows of very different size, and one all-zero group, so scales and offsets matter per group
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 1, n)[:, None]
    w[0, :GROUP] = 0
    return w


def reference(
    ops: ModuleType,
    x: torch.Tensor,
    codes: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the kernel's computation in float64 from its own activation codes, the sum of |terms|)."""
    rows, k = x.shape
    groups = k // GROUP
    xq, xscale, xsum = ops.int4_quantize_activations(x)
    dot = torch.einsum(
        "rgk,ngk->rng", xq.double().view(rows, groups, GROUP), codes.double().view(-1, groups, GROUP)
    )  # [rows, N, G] exact integer sums
    scaled = dot * d.double()[None] * xscale.double()[:, None, :]
    offset = xsum.double()[:, None, :] * m.double()[None]
    b64 = torch.zeros(codes.shape[0], dtype=torch.float64) if bias is None else bias.double()
    magnitude = scaled.abs().sum(-1) + offset.abs().sum(-1) + b64.abs()
    return scaled.sum(-1) + offset.sum(-1) + b64, magnitude


# ---- quantizer and layout --------------------------------------------------------------------------


def test_groups_span_min_to_max_with_codes_0_to_15() -> None:
    w = random_weight(5, 96, seed=0)
    codes, d, m = quantize_groups(w)
    assert codes.dtype == torch.uint8 and d.dtype == m.dtype == torch.float16 and d.shape == (5, 3)
    groups = w.view(5, 3, GROUP)
    torch.testing.assert_close(m, groups.amin(-1).half(), rtol=0, atol=0)
    torch.testing.assert_close(d, ((groups.amax(-1) - groups.amin(-1)) / 15).half(), rtol=0, atol=0)
    assert codes.max() <= 15
    # every weight within half a step of its group's grid (plus the float16 rounding of d and m)
    err = (dequantize_groups(codes, d, m) - w).view(5, 3, GROUP).abs()
    step = d.float()[..., None]
    assert (err <= 0.5 * step + 1e-3 * groups.abs().amax(-1, keepdim=True) + 1e-12).all()
    assert not codes[0, :GROUP].any() and d[0, 0] == 0  # the all-zero group: codes 0, d 0


def test_weights_on_the_grid_come_back_exactly() -> None:
    # Weights that are d * q + m of float16 d, m (as a Q4_1 file's): the quantizer finds q, d, m again.
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (7, 64), generator=gen, dtype=torch.uint8)
    q[:, 0], q[:, 1], q[:, 32], q[:, 33] = 0, 15, 0, 15  # each group spans the whole range, as Q4_1's do
    d = (torch.rand(7, 2, generator=gen) * 0.01 + 1e-3).half()
    m = (-torch.rand(7, 2, generator=gen) * 0.1).half()
    w = dequantize_groups(q, d, m)
    codes, d2, m2 = quantize_groups(w)
    assert torch.equal(codes, q) and torch.equal(d2, d) and torch.equal(m2, m)


def test_in_features_must_be_a_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="in_features divisible by 32, got a 4x40 weight"):
        quantize_groups(torch.randn(4, 40))


def test_pack_puts_16_rows_and_8_k_per_64_bytes() -> None:
    n, k = 20, 64
    codes = (torch.arange(n * k) % 16).to(torch.uint8).view(n, k)
    d = torch.arange(n * 2, dtype=torch.float16).view(n, 2)
    m = -d
    packed = pack_groups(codes, d, m)
    assert packed.shape == (2, 2, 320) and packed.dtype == torch.uint8
    for block, group, row, kk in [(0, 0, 0, 0), (0, 1, 5, 45), (1, 0, 3, 7), (1, 1, 3, 63), (0, 0, 15, 12)]:
        n_row, g_k = 16 * block + row, kk % GROUP
        chunk, b, high = g_k // 8, g_k % 4, (g_k % 8) >= 4
        byte = packed[block, group, 64 + chunk * 64 + row * 4 + b].item()
        assert (byte >> 4 if high else byte & 15) == codes[n_row, 32 * group + g_k].item(), (
            block,
            group,
            row,
            kk,
        )
    scales = packed[:, :, :64].contiguous().view(torch.float16).view(2, 2, 2, 16)  # [B, G, d/m, 16]
    assert scales[1, 1, 0, 3].item() == d[19, 1].item() and scales[1, 1, 1, 3].item() == m[19, 1].item()
    assert not packed[1, :, 64:][:, torch.arange(256) // 4 % 16 >= 4].any()  # rows 20..31: padding
    assert not scales[1, :, :, 4:].any()


# ---- the kernel ------------------------------------------------------------------------------------


def test_activations_are_int8_per_group_of_32(ops: ModuleType) -> None:
    x = torch.randn(3, 96) * torch.tensor([1e-3, 1.0, 100.0])[:, None]
    x[1, 32:64] = 0
    xq, xscale, xsum = ops.int4_quantize_activations(x)
    groups = x.view(3, 3, GROUP)
    amax = groups.abs().amax(-1)
    torch.testing.assert_close(xscale, amax / 127)
    expected = torch.round(groups * torch.where(amax > 0, 127 / amax, 0)[..., None]).clamp(-127, 127)
    assert torch.equal(xq.view(3, 3, GROUP).float(), expected)
    assert xq.abs().view(3, 3, GROUP).amax(-1)[amax > 0].eq(127).all()
    exact = groups.double().sum(-1)  # float32 sums in k order: within GROUP roundings of the |x| sum
    assert ((xsum.double() - exact).abs() <= GROUP * 2.0**-24 * groups.double().abs().sum(-1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "k", "bias"), [(19, 64, True), (33, 576, False), (130, 1536, True), (16, 32, True)]
)
def test_kernel_matches_float64_reference_for_1_to_9_rows(
    ops: ModuleType, n: int, k: int, bias: bool, dtype: torch.dtype
) -> None:
    w = random_weight(n, k, seed=n + k)
    codes, d, m = quantize_groups(w)
    packed = pack_groups(codes, d, m)
    b = torch.randn(n) if bias else None
    for rows in range(1, 10):  # 1-4 rows per pass, then a second pass: every tile shape
        x = torch.randn(rows, k).to(dtype)
        out = ops.int4_linear(x, packed, n, b)
        ref, magnitude = reference(ops, x, codes, d, m, b)
        rounding = 2.0**-8 if dtype == torch.bfloat16 else 0.0  # bf16 unit roundoff (8-bit significand)
        bound = ((2 * k // GROUP + 2) * 2.0**-24 + rounding) * magnitude + 1e-30
        worst = ((out.double() - ref).abs() / bound).max().item()
        assert out.dtype == dtype and out.shape == (rows, n)
        assert worst <= 1.0, f"{rows} rows: error {worst:.2f}x the bound"
        # and against the exact product: within the activations' own quantization error
        exact = x.double() @ dequantize_groups(codes, d, m).double().T + (0 if b is None else b.double())
        step = x.double().view(rows, -1, GROUP).abs().amax(-1) / 127 / 2  # half an int8 step per group
        # the int8 codes multiply d * q only (the offsets m take the exact sum of x): [n, G]
        weights = codes.double().view(n, -1, GROUP).sum(-1) * d.double()
        act_bound = step @ weights.T + 2 * rounding * magnitude + 1e-6 * magnitude + 1e-30
        assert ((out.double() - exact).abs() <= act_bound).all()


def test_kernel_refuses_wrong_shapes_with_a_clear_error(ops: ModuleType) -> None:
    codes, d, m = quantize_groups(torch.randn(20, 64))
    packed = pack_groups(codes, d, m)
    with pytest.raises(RuntimeError, match="x has K = 96 columns but w has 2 groups"):
        ops.int4_linear(torch.randn(2, 96), packed, 20, None)
    with pytest.raises(RuntimeError, match="not a multiple of 32"):
        ops.int4_linear(torch.randn(2, 40), packed, 20, None)
    with pytest.raises(RuntimeError, match="not enough or too many for N = 40"):
        ops.int4_linear(torch.randn(2, 64), packed, 40, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.int4_linear(torch.randn(2, 64).half(), packed, 20, None)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32"):
        ops.int4_linear(torch.randn(2, 64), packed, 20, torch.randn(19))
    assert ops.int4_linear(torch.empty(0, 64), packed, 20, None).shape == (0, 20)


@pytest.mark.slow
@pytest.mark.parametrize(("loop", "march"), [("portable", "x86-64-v2"), ("avx2", "x86-64-v3")])
def test_every_inner_loop_gives_the_same_bits(ops: ModuleType, loop: str, march: str) -> None:
    # The scalar fallback and the AVX2 halves (each compiled here, ~20 s once): integer sums are exact
    # in any order, and the float steps per group are the same operations in the same order, so both
    # give the machine's own build's bits (VNNI, AVX2 or portable).
    from torch.utils import cpp_extension

    build = cpp_extension.load(
        name=f"llmserve_int4_gemv_cpu_{loop}",
        sources=[str(cpu_ops._CSRC / "int4_gemv_cpu.cpp")],
        extra_cflags=["-O2", f"-march={march}", "-fopenmp", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
    )
    assert build.inner_loop() == loop and ops.inner_loop() in ("avx512", "avx2", "portable")
    codes, d, m = quantize_groups(random_weight(45, 320, seed=3))
    packed, bias = pack_groups(codes, d, m), torch.randn(45)
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 2, 3, 4, 11):  # every tile shape of either loop
            x = torch.randn(rows, 320).to(dtype)
            assert torch.equal(build.int4_linear(x, packed, 45, bias), ops.int4_linear(x, packed, 45, bias))


# ---- the module ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_takes_the_kernel_for_few_rows_and_the_gemm_beyond(
    ops: ModuleType, dtype: torch.dtype
) -> None:
    w, b = random_weight(40, 128, seed=5).to(dtype), torch.randn(40).to(dtype)
    module = Int4Linear(w, b, ops=ops)
    # The measured crossover against the large step it got: a packed bf16 GEMM, or a plain F.linear.
    limit = module.max_kernel_rows
    assert limit == (KERNEL_MAX_ROWS if module.gemm is not None else UNPACKED_KERNEL_MAX_ROWS)
    codes, d, m = quantize_groups(w)
    few = torch.randn(limit, 128).to(dtype)
    assert torch.equal(module(few), ops.int4_linear(few, module.packed, 40, b.float()))
    many = torch.randn(limit + 1, 128).to(dtype)
    dense = dequantize_groups(codes, d, m).to(dtype)
    torch.testing.assert_close(module(many), torch.nn.functional.linear(many, dense, b))
    assert module(many.view(1, limit + 1, 128)).shape == (1, limit + 1, 40)


def test_int4_is_refused_off_the_cpu_and_in_float16() -> None:
    with pytest.raises(ValueError, match="quantization 'int4' runs on the CPU only"):
        get_quantizer("int4", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="quantization 'int4' needs dtype float32 or bfloat16"):
        get_quantizer("int4", CPU, torch.float16)


# ---- the built-in model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_llm() -> LLM:
    return LLM(dtype="bfloat16")


@pytest.fixture(scope="module")
def int4_llm() -> LLM:
    # The packed-GEMM threshold on every CPU, so the prompts below straddle it as planned (where bf16
    # cannot be packed the module would take UNPACKED_KERNEL_MAX_ROWS).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Int4Linear, "unpacked_max_kernel_rows", KERNEL_MAX_ROWS)
        return LLM(dtype="bfloat16", quantization="int4", max_num_seqs=16)


@pytest.mark.slow
def test_the_built_in_models_weights_are_its_gguf_q4_1_values(int4_llm: LLM) -> None:
    # The loader caches the GGUF's dequantized float32 weights; int4 finds their exact Q4_1 codes,
    # so the kernel's weights are the file's, bit for bit (the check would catch one wrong code).
    float32 = LLM(dtype="float32", attention_backend="torch", max_num_seqs=1).engine.runner.model
    model = int4_llm.engine.runner.model
    for layer, ref in zip(model.layers, float32.layers, strict=True):
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            module, weight = getattr(layer, name), getattr(ref, name).weight
            assert isinstance(module, Int4Linear), name
            codes, d, m = quantize_groups(weight)
            assert torch.equal(dequantize_groups(codes, d, m), weight), name
            assert torch.equal(module.packed, pack_groups(codes, d, m)), name
    assert isinstance(model.packed_head, Int8Linear)  # the head stays 8-bit, as in the file (Q8_0)
    assert not any(type(m) is nn.Linear for m in model.modules())


@pytest.mark.slow
def test_int4_model_agrees_with_bfloat16(bf16_llm: LLM, int4_llm: LLM) -> None:
    result = agreement(bf16_llm, int4_llm)
    print(
        f"\nint4 vs bf16: greedy prefix lengths {result.prefix_lengths} of {NUM_TOKENS}, teacher-forced "
        f"top-1 agreement {result.top1:.3f}, mean log-likelihood gap {result.gap:+.4f} nat/token"
    )
    assert result.top1 >= 0.90
    assert abs(result.gap) <= 0.04
    assert sum(n >= 8 for n in result.prefix_lengths) >= 3


@pytest.mark.slow
def test_batching_on_the_kernel_does_not_change_tokens(int4_llm: LLM) -> None:
    # Rows never interact in the kernel (each row's activations are quantized on their own), so a
    # stream decodes the same tokens alone and next to 5 others (decode steps of 6 rows, all on the
    # kernel). A prompt of at most KERNEL_MAX_ROWS tokens would not do: alone its prefill is on the
    # kernel (int8 activations), in the batch on the GEMM, and greedy text can part there.
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    # Prompts longer than KERNEL_MAX_ROWS tokens: their prefill is on the GEMM path alone and together.
    prompts = [
        f"Name {i + 2} colours of the rainbow, and say which one you like best and why:" for i in range(6)
    ]
    alone = [int4_llm.generate([p], params)[0] for p in prompts[:2]]
    assert all(len(r.prompt_token_ids) > KERNEL_MAX_ROWS for r in alone)
    together = [r.token_ids for r in int4_llm.generate(prompts, params)]
    assert together[:2] == [r.token_ids for r in alone]
