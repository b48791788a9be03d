"""float32 linears on MKL's packed sgemm (llmserve/models/mkl_linear.py) against F.linear, the
product transformers computes; and the runner using them for float32 models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmserve import LLM, SamplingParams
from llmserve.models.mkl_linear import MklPackedLinear, can_pack_fp32, mkl_packing_works

pytestmark = pytest.mark.skipif(
    not can_pack_fp32(torch.device("cpu"), torch.float32) or not mkl_packing_works(),
    reason="this torch build has no MKL packed sgemm",
)

SHAPES = [(960, 576), (576, 1536), (100, 37)]  # the built-in model's qkv and down, and an odd one


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("biased", [False, True], ids=["no-bias", "bias"])
def test_packed_product_matches_f_linear(out_features: int, in_features: int, biased: bool) -> None:
    gen = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    bias = torch.randn(out_features, generator=gen) if biased else None
    linear = MklPackedLinear(weight, bias)
    same_bits = 0
    rows_tried = (1, 2, 7, 40, 64, 100, 600)  # below, at and above the pack's 64 rows
    for rows in rows_tried:
        x = torch.randn(rows, in_features, generator=gen)
        out, ref = linear(x), F.linear(x, weight, bias)
        assert out.shape == (rows, out_features) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        same_bits += int(torch.equal(out, ref))
    assert same_bits > 0, "MKL's kernels on the same panels: most calls should give F.linear's bits"
    x = torch.randn(3, 5, in_features, generator=gen)  # leading dimensions are kept
    torch.testing.assert_close(linear(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 576), (3072, 576), (576, 1536)])
def test_a_row_does_not_depend_on_the_other_rows(out_features: int, in_features: int) -> None:
    # What batching must not change: at the built-in model's shapes a sequence's row gives the same
    # bits whatever shares the call (plain sgemm does not: its rows at M <= 7 differ from M = 600;
    # on Zen 4 also at M < 12 not a multiple of 4, which the padding of small calls covers).
    gen = torch.Generator().manual_seed(7)
    linear = MklPackedLinear(torch.randn(out_features, in_features, generator=gen))
    x = torch.randn(600, in_features, generator=gen)
    full = linear(x)
    for rows in (*range(1, 17), 40, 64, 100):
        assert torch.equal(linear(x[:rows]), full[:rows]), rows


def test_float32_models_run_packed(tiny_path: Path) -> None:
    llm = LLM(model=str(tiny_path), dtype="float32")
    model = llm.engine.runner.model
    for layer in model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            assert isinstance(getattr(layer, name), MklPackedLinear)
    assert isinstance(model.packed_head, MklPackedLinear)
    # and the torch attention backend keeps the plain modules: it is the reference configuration
    plain = LLM(model=str(tiny_path), dtype="float32", attention_backend="torch")
    assert isinstance(plain.engine.runner.model.layers[0].qkv_proj, torch.nn.Linear)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["The capital of France is", "1, 2, 3,"]
    packed_ids = [r.token_ids for r in llm.generate(prompts, params)]
    plain_ids = [r.token_ids for r in plain.generate(prompts, params)]
    assert packed_ids == plain_ids and all(len(ids) == 12 for ids in packed_ids)
