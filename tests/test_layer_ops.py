"""The CPU fast paths against the torch reference they replace: the fused C++ layer ops
(kernels/csrc/layer_ops_cpu.cpp, with the sampler's top_p threshold), oneDNN-packed bf16 linears and the
bf16 LM head."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmserve import LLM
from llmserve.models import packed_linear
from llmserve.models.layer_ops import FusedCpuLayerOps, TorchLayerOps
from llmserve.models.packed_linear import PackedHead, PackedLinear, can_pack, pack_linears
from llmserve.request import Request
from llmserve.sampler import Sampler, sorted_top_p_cut
from llmserve.sampling_params import SamplingParams
from llmserve_kernels import cpu_ops

H, HKV, D, BLOCK = 9, 3, 64, 16


@pytest.fixture(scope="module")
def fused_module():  # type: ignore[no-untyped-def]
    module = cpu_ops.load_layer_ops()
    if module is None:
        pytest.skip("the C++ layer ops could not be built here (see the log)")
    return module


def rope_tables(positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_and_kv_write_are_exact(fused_module, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    num_tokens = 37
    qkv = torch.randn(num_tokens, (H + 2 * HKV) * D).to(dtype)
    cos, sin = rope_tables(torch.arange(num_tokens) * 7, dtype)
    slots = torch.randperm(8 * BLOCK)[:num_tokens]
    caches = [torch.zeros(8, HKV, BLOCK, D, dtype=dtype) for _ in range(4)]
    q_ref = TorchLayerOps().rope_write_kv(qkv.clone(), cos, sin, slots, caches[0], caches[1], H, HKV)
    qkv_before = qkv.clone()
    q_fused = FusedCpuLayerOps(fused_module, dtype).rope_write_kv(qkv, cos, sin, slots, caches[2], caches[3], H, HKV)
    assert torch.equal(qkv, qkv_before), "the fused op reads qkv and writes q, k and v elsewhere"
    assert q_fused.is_contiguous() and q_fused.shape == (num_tokens, H, D)
    assert torch.equal(q_fused, q_ref)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    assert caches[0].abs().sum() > 0  # the reference did write


@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_bf16_norms_match_transformers_arithmetic(fused_module, num_tokens: int) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(num_tokens)
    x = (torch.randn(num_tokens, 576) * 3).bfloat16()
    residual = torch.randn(num_tokens, 576).bfloat16()
    weight = (torch.rand(576) + 0.5).bfloat16()
    ref, fused = TorchLayerOps(), FusedCpuLayerOps(fused_module, torch.bfloat16)
    assert torch.equal(fused.norm(x, weight, 1e-5), ref.norm(x, weight, 1e-5))
    res_ref, res_fused = residual.clone(), residual.clone()
    out_ref = ref.add_norm(x, res_ref, weight, 1e-5)
    out_fused = fused.add_norm(x, res_fused, weight, 1e-5)
    assert torch.equal(res_fused, res_ref), "the residual stream must hold residual + x"
    # One float ulp of difference in the sum of squares may flip a bf16 rounding: allow a few.
    assert (out_fused != out_ref).float().mean() < 0.01
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_tokens", "width"), [(1, 1536), (64, 1536), (300, 1536), (5, 37), (3, 100)])
def test_silu_mul_is_bit_exact(fused_module, dtype: torch.dtype, num_tokens: int, width: int) -> None:  # type: ignore[no-untyped-def]
    if not fused_module.exact_silu() or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        pytest.skip("the fused SiLU is exact (and used) only where torch runs its AVX-512 kernels")
    torch.manual_seed(num_tokens * width)
    gate_up = (torch.randn(num_tokens, 2 * width) * 4).to(dtype)  # [T, 2I]
    gate_up[0, :5] = torch.tensor([0.0, -0.0, 80.0, -80.0, -300.0]).to(dtype)  # exp at its edges
    ops = FusedCpuLayerOps(fused_module, dtype)
    assert ops._fused_silu
    out = ops.silu_mul(gate_up)
    assert out.shape == (num_tokens, width) and out.is_contiguous()
    # the widths not a multiple of the vector step exercise the scalar tail of each row
    assert torch.equal(out, TorchLayerOps().silu_mul(gate_up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_argmax_rows_matches_torch_with_ties_and_nan(fused_module, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    x = torch.randn(16, 49157).to(dtype)
    x[1, 100] = x[1, 3000] = 1e3  # a tie: the first one wins
    x[2, 49156] = 1e3  # the maximum in the scalar tail
    x[3, 70] = float("nan")  # NaN counts as the maximum, as in torch
    x[4] = 0.5  # all equal
    x[5, 9] = x[5, 40000] = float("nan")
    argmax = FusedCpuLayerOps(fused_module, dtype).argmax
    assert argmax is not None and TorchLayerOps().argmax is None
    # and the sampler's fused pass for random rows comes with the C++ ops (tests/test_sampler.py runs it)
    assert FusedCpuLayerOps(fused_module, dtype).sample_rows is not None and TorchLayerOps().sample_rows is None
    for rows in (x, x[:, :49152], x[7:9]):  # strided rows too
        assert torch.equal(argmax(rows), rows.max(dim=-1).indices)
    assert argmax(x)[:6].tolist() == [int(x[0].float().argmax()), 100, 49156, 70, 0, 9]


def test_float32_keeps_torch_norm(fused_module) -> None:  # type: ignore[no-untyped-def]
    x, weight = torch.randn(16, 576), torch.rand(576) + 0.5
    assert torch.equal(FusedCpuLayerOps(fused_module, torch.float32).norm(x, weight, 1e-6),
                       TorchLayerOps().norm(x, weight, 1e-6))  # fmt: skip


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16 packing here (needs oneDNN and AVX-512 or AVX-NE-CONVERT)")
@pytest.mark.parametrize("rows", [1, 7, 64, 200])
def test_packed_linear_matches_f_linear(rows: int) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(576, 1536, bias=True).bfloat16()
    packed = PackedLinear(linear.weight, linear.bias)
    x = torch.randn(rows, 576).bfloat16()
    torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16 packing here (needs oneDNN and AVX-512 or AVX-NE-CONVERT)")
@pytest.mark.parametrize("rows", [1, 7, 8, 64])  # both sides of MIN_ROWS_PLAIN
def test_packed_head_matches_f_linear(rows: int) -> None:
    torch.manual_seed(rows)
    weight = torch.randn(1000, 576).bfloat16() * 0.05
    x = torch.randn(rows, 576).bfloat16()
    torch.testing.assert_close(PackedHead(weight)(x), F.linear(x, weight), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16 packing here (needs oneDNN and AVX-512 or AVX-NE-CONVERT)")
def test_pack_linears_replaces_every_linear() -> None:
    model = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Sequential(nn.Linear(128, 32, bias=False))).bfloat16()
    x = torch.randn(4, 64).bfloat16()
    expected = model(x)
    assert len(pack_linears(model)) == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=2e-2, atol=2e-2)


def nucleus_cut_float64(probs: torch.Tensor, top_p: float) -> float:
    """The nucleus threshold the slow exact way: float64 sums in probability order."""
    ordered = probs.double().sort(descending=True).values
    mass_before = ordered.cumsum(0) - ordered
    return float(ordered[max(1, int((mass_before < top_p).sum())) - 1])


@pytest.mark.parametrize("vocab", [7, 1000, 49152])
def test_top_p_cut_matches_float64_nucleus(fused_module, vocab: int) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(vocab)
    sharpness = torch.tensor([0.3, 1.0, 3.0, 8.0]).repeat(4)[:, None]  # flat to peaked rows
    probs = (torch.randn(16, vocab, generator=gen) * sharpness).softmax(-1)  # [16, V]
    top_p = torch.rand(16, 1, generator=gen) * 0.98 + 0.01
    cut = fused_module.top_p_cut(probs, top_p)
    expected = [nucleus_cut_float64(probs[r], float(top_p[r])) for r in range(16)]
    assert cut.squeeze(1).tolist() == pytest.approx(expected, rel=0, abs=0)
    assert (cut <= probs.amax(-1, keepdim=True)).all()  # the top token is always in


def test_top_p_cut_keeps_ties_whole_and_agrees_with_the_sorted_reference(fused_module) -> None:  # type: ignore[no-untyped-def]
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2], [0.2] * 5, [1.0, 0.0, 0.0, 0.0, 0.0]])
    top_p = torch.tensor([[0.4], [0.5], [0.9]])
    # Row 0: 0.3 alone is below 0.4, so every 0.2 is in; row 1: all tied; row 2: one token.
    expected = torch.tensor([[0.2], [0.2], [1.0]])
    assert torch.equal(fused_module.top_p_cut(probs, top_p), expected)
    assert torch.equal(sorted_top_p_cut(probs, top_p), expected)
    # A top_p the row's mass never reaches (here it sums to 0.75): nothing is cut.
    assert fused_module.top_p_cut(torch.full((1, 3), 0.25), torch.tensor([[0.9]])).item() == 0.0


def test_sampler_with_the_cpp_cut_stays_in_the_nucleus(fused_module) -> None:  # type: ignore[no-untyped-def]
    vocab, draws = 64, 3000
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(5))
    probs = row.softmax(-1)
    allowed = set(torch.nonzero(probs >= nucleus_cut_float64(probs, 0.7)).flatten().tolist())
    sampler = Sampler(vocab, seed=1, top_p_cut=fused_module.top_p_cut)
    requests = [
        Request(request_id=f"r{i}", prompt_token_ids=[1], sampling_params=SamplingParams(top_p=0.7))
        for i in range(draws)
    ]
    seen = set(sampler.sample(row.expand(draws, vocab), requests).token_ids)
    assert seen == allowed


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns_and_leaves_linears_unpacked(
    tiny_path: Path, native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if native and not packed_linear.native_bf16():
        pytest.skip("this CPU has no native bf16: only the emulated case can run here")
    monkeypatch.setattr(packed_linear, "native_bf16", lambda: native)
    monkeypatch.setattr("llmserve.model_runner.native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="llmserve.model_runner"):
        llm = LLM(str(tiny_path), dtype="bfloat16", block_size=4, num_blocks=64)
    assert ("--dtype float32 is the fast choice" in caplog.text) is not native
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert bool(linears) is native
