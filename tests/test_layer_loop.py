"""The C++ layer loop (llmserve/models/layer_loop.py) gives the Python loop's hidden states bit for
bit, on every kind of step: prefill chunks alone, chunks beside decodes, decodes alone, with the
quantized linears (int8 and int4 on both sides of their row threshold, w8a8), with and without biases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmserve import LLM, SamplingParams
from llmserve.attention import AttentionMetadata, PrefillChunk
from llmserve.int4_linear import KERNEL_MAX_ROWS as INT4_ROWS
from llmserve.int8_linear import KERNEL_MAX_ROWS as INT8_ROWS
from llmserve.models.layer_loop import LayerLoop
from llmserve.models.packed_linear import amx_ops
from llmserve_kernels import cpu_ops
from tests.tiny_model import make_tiny_llama

# The loop runs where every linear is one of our kernels: bf16 (plain, int8, int4) on AMX tiles, or
# w8a8 on AMX tiles or AVX-512 VNNI.
needs_amx = pytest.mark.skipif(amx_ops() is None, reason="bf16 linears are oneDNN calls without AMX tiles")
_w8a8 = cpu_ops.load_w8a8()
W8A8_RUNS = _w8a8 is not None and _w8a8.backend() != "none"
needs_w8a8 = pytest.mark.skipif(not W8A8_RUNS, reason="w8a8 needs AMX-INT8 tiles or AVX-512 VNNI")


class Compared:
    """Stands in for the model's layer loop: runs it, then the Python loop on a copy of the same
    inputs, and checks the two agree exactly."""

    def __init__(self, model: torch.nn.Module, loop: LayerLoop) -> None:
        self.model, self.loop = model, loop
        self.steps: list[tuple[int, int]] = []  # (one-token rows, multi-token rows) per compared step

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor | None:
        # Both write the step's K/V (the same values) before reading them; x is summed into in place.
        out = self.loop(x.clone(), cos, sin, kv_caches, meta)
        assert out is not None, "every step of a C++-kernel model goes through the loop"
        expected = self.model.run_layers(x.clone(), cos, sin, kv_caches, meta)
        assert torch.equal(out, expected), f"max diff {(out.float() - expected.float()).abs().max()}"
        decodes = 0 if meta.decode_batch is None else meta.decode_batch.num_rows
        self.steps.append((decodes, x.shape[0] - decodes))
        return out


@pytest.fixture(scope="module")
def tiny_bias_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-bias"), bias=True, seed=2)


@pytest.mark.parametrize(
    "quantization",
    [pytest.param(q, marks=needs_amx) for q in (None, "int8", "int4")] + [pytest.param("w8a8", marks=needs_w8a8)],
)
@pytest.mark.parametrize("biased", [False, True], ids=["no-bias", "bias"])
def test_layer_loop_matches_python_loop(
    quantization: str | None, biased: bool, tiny_path: Path, tiny_bias_path: Path
) -> None:
    # A small token budget: long prompts prefill in chunks beside running decodes.
    llm = LLM(
        model=str(tiny_bias_path if biased else tiny_path), dtype="bfloat16", quantization=quantization,
        max_num_batched_tokens=64, max_num_seqs=16,
    )  # fmt: skip
    model = llm.engine.runner.model
    assert isinstance(model.layer_loop, LayerLoop), "every linear is one of our kernels"
    compared = Compared(model, model.layer_loop)
    model.layer_loop = compared
    lengths = [5, 90, 17, 3, 150, 40, 8, 66, 2, 120, 31, 12, 77, 9]
    prompts = [[(7 * i + 13 * j) % 40000 + 100 for j in range(n)] for i, n in enumerate(lengths)]
    # Answers of different lengths, so the decode batch shrinks through both row thresholds.
    params = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    results = llm.generate(prompts, params)
    assert [len(r.outputs[0].token_ids) for r in results] == [p.max_tokens for p in params]
    kinds = {(d > 0, p > 0) for d, p in compared.steps}
    assert kinds == {(False, True), (True, True), (True, False)}, compared.steps
    decode_rows = {d for d, p in compared.steps if p == 0}
    assert min(decode_rows) <= min(INT4_ROWS, INT8_ROWS) and max(decode_rows) > max(INT4_ROWS, INT8_ROWS)


def test_float32_keeps_the_python_loop(tiny_path: Path) -> None:
    # float32 linears are MKL sgemm calls (llmserve/models/mkl_linear.py), not one of our kernels.
    llm = LLM(model=str(tiny_path), dtype="float32")
    assert llm.engine.runner.model.layer_loop is None


@pytest.mark.skipif(amx_ops() is None and not W8A8_RUNS, reason="no linear kernel for the loop here")
def test_loop_declines_torch_attention_steps(tiny_path: Path) -> None:
    # bf16 where AMX tiles run its linears, else w8a8: either way the loop is built
    llm = LLM(model=str(tiny_path), dtype="bfloat16", quantization=None if amx_ops() is not None else "w8a8")
    loop = llm.engine.runner.model.layer_loop
    assert isinstance(loop, LayerLoop)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    meta = AttentionMetadata(slot_mapping=torch.zeros(2, dtype=torch.int64), decode_groups=[], chunks=[])
    other_caches = [(c[0].clone(), c[1].clone()) for c in llm.engine.runner.kv_caches]
    # Caches it does not hold, or chunks for the torch prefill reference: the Python loop's job.
    assert loop(x, x[:, :16], x[:, :16], other_caches, meta) is None
    chunk = PrefillChunk(token_start=0, num_tokens=2, start=0, index=torch.zeros(1, 2, 1, dtype=torch.int64))
    with_chunks = AttentionMetadata(slot_mapping=meta.slot_mapping, decode_groups=[], chunks=[chunk])
    assert loop(x, x[:, :16], x[:, :16], llm.engine.runner.kv_caches, with_chunks) is None
