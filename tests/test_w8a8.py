"""int8 weights and activations on AMX tiles (`quantization="w8a8"`): the C++ kernel
(kernels/csrc/w8a8_linear_cpu.cpp) against a torch reference bit for bit, the module, and the
built-in model against bf16.

The reference quantizes each row as the kernel does (float32: 127 / max|x|, round half to even),
sums the int8 products exactly (float64 holds every such sum), and applies the float32 epilogue in
the kernel's order, so the kernel must equal it exactly: a misplaced code, scale or tile shows.

Quality (same method as test_int8.py: teacher-forced top-1 agreement and mean log-likelihood gap
over bf16's greedy continuations, 5 prompts x 16 tokens):
  | measured on this CPU | top-1 agreement | gap (nat/token) | greedy prefix lengths |
  | w8a8 vs bf16         | 0.95            | +0.044          | 5, 16, 7, 16, 7       |
  | int8 vs bf16         | 0.96            | +0.011          | 16, 16, 6, 16, 16     |
bounds (test_quantization.BOUNDS): top-1 >= 0.90, |gap| <= 0.08, 5 equal greedy tokens on >= 3
prompts: LLM.int8()'s league
(bnb-8bit vs float32: 0.010 nat, bounds in test_quantization.py 0.05). The per-token activation
scale is what costs: int8 weights alone lose a quarter of it.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from test_quantization import agreement, check_agreement
from torch import nn

from llmserve import LLM, SamplingParams
from llmserve.int8_linear import quantize_rows
from llmserve.quantization import get_quantizer
from llmserve.w8a8_linear import W8A8Linear
from llmserve_kernels import cpu_ops

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    module = cpu_ops.load_w8a8()
    assert module is not None, "the C++ w8a8 kernel did not build (see the log)"
    if module.backend() == "none":
        pytest.skip("this CPU has neither AMX-INT8 tiles nor AVX-512 VNNI (the w8a8 kernel needs one)")
    return module


def reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    xf = x.float()
    amax = xf.abs().amax(dim=1)  # [M]
    c127 = torch.full_like(amax, 127.0)  # tensor / tensor: `127 / t` is 127 * (1 / t) in torch
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv[:, None]).clamp(-127, 127)  # round half to even, as the kernel
    sums = (q.double() @ codes.double().T).float()  # exact in float64, then one rounding to float32
    y = (sums * (amax / c127)[:, None]) * scales[None, :]
    return (y if bias is None else y + bias).bfloat16()


def random_layer(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes, scales = quantize_rows(torch.randn(n, k, generator=gen))
    return codes, scales, torch.randn(n, generator=gen)


# ---- the kernel ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(16, 64), (48, 128), (960, 576), (576, 1536)])
@pytest.mark.parametrize("biased", [False, True], ids=["no-bias", "bias"])
def test_kernel_equals_the_reference_bit_for_bit(ops: ModuleType, n: int, k: int, biased: bool) -> None:
    # 1..33 rows: one row block, one pair, a pair plus one; 100 rows: several pairs and a rest.
    codes, scales, bias = random_layer(n, k, seed=n + k)
    packed = ops.w8a8_pack(codes)
    for m in (1, 5, 16, 17, 32, 33, 100):
        gen = torch.Generator().manual_seed(m)
        # rows of very different sizes, so each row's own scale matters
        x = (torch.randn(m, k, generator=gen) * torch.logspace(-3, 2, m)[:, None]).bfloat16()
        out = ops.w8a8_linear(x, packed, scales, bias if biased else None)
        assert torch.equal(out, reference(x, codes, scales, bias if biased else None)), (n, k, m)


def test_a_row_does_not_depend_on_its_batch_neighbours(ops: ModuleType) -> None:
    codes, scales, bias = random_layer(64, 128, seed=5)
    packed = ops.w8a8_pack(codes)
    x = torch.randn(40, 128).bfloat16()
    batch = ops.w8a8_linear(x, packed, scales, bias)
    for i in (0, 17, 39):
        assert torch.equal(ops.w8a8_linear(x[i : i + 1].contiguous(), packed, scales, bias), batch[i : i + 1])


def test_zero_rows_give_zeros_and_non_finite_rows_give_nan_alone(ops: ModuleType) -> None:
    codes, scales, bias = random_layer(32, 64, seed=6)
    x = torch.randn(4, 64).bfloat16()
    x[1] = 0
    x[2, 7] = float("inf")
    x[3, 9] = float("nan")
    out = ops.w8a8_linear(x, ops.w8a8_pack(codes), scales, bias)
    assert torch.equal(out[1], bias.bfloat16())  # codes 0: the bias alone
    assert out[2].isnan().all() and out[3].isnan().all()
    assert torch.equal(out[:1], reference(x[:1], codes, scales, bias))


def test_pack_puts_4_k_of_16_columns_in_each_tile_row(ops: ModuleType) -> None:
    codes = torch.randint(-127, 128, (32, 128), dtype=torch.int8)
    tiles = ops.w8a8_pack(codes).view(2, 2, 16, 16, 4)  # [N/16, K/64, quad, n, 4]
    n, k = 21, 70  # column block 1, k tile 1, quad 1, lane 2
    assert torch.equal(tiles[n // 16, k // 64, (k % 64) // 4, n % 16, k % 4], codes[n, k])
    assert torch.equal(tiles.permute(0, 3, 1, 2, 4).reshape(32, 128), codes)


def test_kernel_refuses_wrong_shapes_with_a_clear_error(ops: ModuleType) -> None:
    codes, scales, _ = random_layer(32, 64, seed=7)
    packed, x = ops.w8a8_pack(codes), torch.randn(2, 64).bfloat16()
    with pytest.raises(RuntimeError, match="N must be a multiple of 16 and K of 64"):
        ops.w8a8_pack(codes[:, :48])
    with pytest.raises(RuntimeError, match="K matching x"):
        ops.w8a8_linear(torch.randn(2, 128).bfloat16(), packed, scales, None)
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-D bfloat16"):
        ops.w8a8_linear(x.float(), packed, scales, None)
    with pytest.raises(RuntimeError, match="scales must be N"):
        ops.w8a8_linear(x, packed, torch.ones(31), None)
    with pytest.raises(RuntimeError, match="bias must be N"):
        ops.w8a8_linear(x, packed, scales, torch.ones(32).bfloat16())
    assert ops.w8a8_linear(torch.empty(0, 64).bfloat16(), packed, scales, None).shape == (0, 32)


# ---- the module and the quantizer ------------------------------------------------------------------


def test_module_computes_the_kernel_over_its_quantized_weight(ops: ModuleType) -> None:
    linear = nn.Linear(128, 48, bias=True).bfloat16()
    module = W8A8Linear(linear.weight, linear.bias, ops=ops)
    x = torch.randn(2, 3, 128).bfloat16()  # leading dimensions are kept
    codes, scales = quantize_rows(linear.weight)
    expected = reference(x.view(6, 128), codes, scales, linear.bias.detach().float()).view(2, 3, 48)
    assert torch.equal(module(x), expected)
    assert module.weight_bytes() == 48 * 128 + 4 * 48 + 4 * 48  # int8 codes, float32 scales and bias
    with torch.no_grad():  # and it tracks the layer: within w8a8's error of the bf16 product
        torch.testing.assert_close(module(x).float(), linear(x).float(), atol=0.05, rtol=0.05)


def test_w8a8_is_refused_with_the_reason(ops: ModuleType) -> None:
    with pytest.raises(ValueError, match="'w8a8' needs dtype bfloat16"):
        get_quantizer("w8a8", CPU, torch.float32)
    with pytest.raises(ValueError, match="'w8a8' runs on the CPU only, not on cuda"):
        get_quantizer("w8a8", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="in_features by 64, got a 32x96 weight"):
        W8A8Linear(torch.randn(32, 96).bfloat16(), ops=ops)


# ---- the built-in model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w8a8_llm(ops: ModuleType) -> LLM:
    return LLM(dtype="bfloat16", quantization="w8a8", max_num_seqs=16)


@pytest.mark.slow
def test_every_linear_and_the_lm_head_are_w8a8_in_the_cpp_layer_loop(w8a8_llm: LLM) -> None:
    from llmserve.models.layer_loop import LINEARS, LayerLoop

    model = w8a8_llm.engine.runner.model
    for layer in model.layers:
        for name in LINEARS:
            module = getattr(layer, name)
            assert isinstance(module, W8A8Linear) and module.packed.dtype == torch.int8, name
    assert isinstance(model.packed_head, W8A8Linear) and model.packed_head.out_features == model.arch.vocab_size
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.layer_loop, LayerLoop)


@pytest.mark.slow
def test_w8a8_model_agrees_with_bfloat16(w8a8_llm: LLM) -> None:
    check_agreement("w8a8", agreement(LLM(dtype="bfloat16"), w8a8_llm))


@pytest.mark.slow
def test_batching_does_not_change_tokens(w8a8_llm: LLM) -> None:
    # One kernel at every step size, each row quantized and summed on its own: alone, in a batch
    # of 16 decodes, or prefilled beside other prompts, a prompt's greedy tokens are the same.
    prompts = [f"Write a short poem about the number {i}." for i in range(16)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    batch = [r.outputs[0].token_ids for r in w8a8_llm.generate(prompts, params)]
    for i in (0, 7, 15):
        assert w8a8_llm.generate([prompts[i]], params)[0].outputs[0].token_ids == batch[i]
