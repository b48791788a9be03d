"""bitsandbytes weight quantization (`ModelConfig.quantization`): config and load-time errors, the
module swap and its byte count, and the quality of the quantized built-in model against float32.

How agreement is measured, and why not "16 greedy tokens equal on most prompts": on a 135M model
two of the five prompts below meet a near-tie early (the float32 top-2 logits are within 0.25 nat),
and any perturbation flips it; from there the greedy texts share nothing, so exact agreement of
long continuations measures luck. Instead each quantized model is teacher-forced on the float32
greedy continuation (5 prompts x 16 tokens = 80 positions) and we bound
  - top-1 agreement: the share of positions where its argmax is the float32 model's token, and
  - the mean log-likelihood gap: float32's mean log-prob of those tokens minus the quantized one's,
neither of which compounds. Free-running greedy text is checked only over a short prefix.

Measured on this CPU (float32 model, one batch), with the bound each test uses:
  | mode     | top-1 agreement | gap (nat/token) | greedy prefix lengths | bounds                      |
  | bnb-8bit | 0.89            | 0.010           | 10, 12, 0, 16, 6      | >= 0.80, |gap| <= 0.05, 4 tokens on >= 3 prompts |
  | bnb-4bit | 0.78            | 0.29            | 5, 1, 3, 1, 0         | >= 0.65, |gap| <= 0.40, 1 token on >= 3 prompts  |
For scale: bfloat16 weights give a gap of 0.001, and NF4 simulated in float32 (dequantized weights,
no kernel) gives the same 0.29 as bnb-4bit, so 4-bit's loss is the format's, not the kernel's; FP4
gives 0.45 and fails the 4-bit bound. A wrong scale or layout gives gaps of nats and near-zero
agreement, far outside both.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from llmserve import LLM, SamplingParams
from llmserve.cli import build_parser
from llmserve.config import QUANTIZATIONS, ModelConfig, config_from_args
from llmserve.quantization import get_quantizer, quantize_model, registered_methods

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "Translate to French: I would like a cup of coffee, please.",
]
NUM_TOKENS = 16
BNB_METHODS = tuple(m for m in QUANTIZATIONS if m.startswith("bnb-"))  # int8 has tests/test_int8.py


@dataclass(frozen=True)
class Bounds:
    min_top1: float  # teacher-forced top-1 agreement
    max_gap: float  # |mean log-likelihood gap|, nat/token
    prefix: int  # free-running greedy tokens that must be equal ...
    min_prompts: int  # ... on at least this many of the 5 prompts


BOUNDS = {
    "bnb-8bit": Bounds(min_top1=0.80, max_gap=0.05, prefix=4, min_prompts=3),
    "bnb-4bit": Bounds(min_top1=0.65, max_gap=0.40, prefix=1, min_prompts=3),
    "w8a8": Bounds(min_top1=0.90, max_gap=0.08, prefix=5, min_prompts=3),  # against bf16: tests/test_w8a8.py
    "kv-int8": Bounds(min_top1=0.95, max_gap=0.03, prefix=8, min_prompts=4),  # the KV cache: tests/test_kv_int8.py
}


def needs_bitsandbytes() -> None:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")


# ---- config and CLI ------------------------------------------------------------------------------


def test_invalid_quantization_is_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="quantization must be one of"):
        ModelConfig(quantization="bnb-3bit")
    with pytest.raises(ValueError, match="quantization"):
        LLM(quantization="int2")
    assert ModelConfig().quantization is None


def test_quantization_flag_reaches_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["serve", "--quantization", "bnb-4bit"])
    assert config_from_args(args).model.quantization == "bnb-4bit"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    serve_help = capsys.readouterr().out
    assert "--quantization QUANTIZATION" in serve_help and "bnb-8bit" in serve_help


def test_every_configurable_method_has_a_quantizer() -> None:
    # The names live in config.py (validated with no heavy import), the code in quantization.py.
    assert set(registered_methods()) == set(QUANTIZATIONS)


def test_bitsandbytes_is_imported_only_when_asked_for() -> None:
    code = (
        "import sys, llmserve, llmserve.engine, llmserve.quantization, llmserve.cli\n"
        "print('bitsandbytes' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- load-time errors ------------------------------------------------------------------------------


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ValueError, match="'bnb-8bit' needs bitsandbytes: pip install bitsandbytes"):
        get_quantizer("bnb-8bit", torch.device("cpu"), torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "kernel"), [("bnb-8bit", "int8_vectorwise_quant"), ("bnb-4bit", "quantize_4bit")]
)
def test_a_method_that_cannot_run_on_this_device_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch, method: str, kernel: str
) -> None:
    # Both modes do run on this CPU, so stand in for a bitsandbytes build without the kernel.
    needs_bitsandbytes()
    import bitsandbytes.functional

    def missing(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(f"no {kernel} kernel for cpu")

    monkeypatch.setattr(bitsandbytes.functional, kernel, missing)
    with pytest.raises(
        ValueError, match=rf"quantization '{method}' does not run on cpu .*no {kernel} kernel"
    ):
        LLM(dtype="float32", quantization=method)


def test_4bit_refuses_at_load_a_layer_the_cpu_kernel_cannot_pack() -> None:
    needs_bitsandbytes()
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip(
            "this CPU has no AVX512-BF16, so bitsandbytes uses its generic 4-bit path, which packs any shape"
        )
    quantizer = get_quantizer("bnb-4bit", torch.device("cpu"), torch.float32)
    # The AVX512-BF16 kernel packs output rows in groups of 32.
    with pytest.raises(ValueError, match=r"'bnb-4bit' failed on layer 0 \(40x64\) on cpu"):
        quantize_model(nn.Sequential(nn.Linear(64, 40)), quantizer)


# ---- the module swap and its byte count ----------------------------------------------------------


@pytest.mark.parametrize("method", BNB_METHODS)
def test_quantize_model_swaps_every_linear_and_logs_the_bytes_saved(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    needs_bitsandbytes()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, 128, bias=False))
    x = torch.randn(3, 128)
    expected = model(x)
    fp32_bytes = (128 * 256 * 2 + 256) * 4
    with caplog.at_level(logging.INFO, logger="llmserve.quantization"):
        report = quantize_model(model, get_quantizer(method, torch.device("cpu"), torch.float32))
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert report.num_modules == 2 and report.linear_bytes_before == fp32_bytes
    if method == "bnb-8bit":
        # int8 weights, a float32 scale per output row, the float32 bias
        assert report.linear_bytes_after == 128 * 256 * 2 + (256 + 128) * 4 + 256 * 4
    else:
        # 4-bit codes, plus per-block scales and the bias: a little over an eighth
        assert 128 * 256 <= report.linear_bytes_after < fp32_bytes / 6
    assert f"quantization {method}: 2 linear layers" in caplog.text and "MiB" in caplog.text
    with torch.no_grad():
        out = model(x)
    rel = ((out - expected).norm() / expected.norm()).item()
    assert rel < (0.05 if method == "bnb-8bit" else 0.2), rel


# ---- the built-in model ------------------------------------------------------------------------------


def teacher_forced(
    llm: LLM, prompts: list[list[int]], continuations: list[list[int]]
) -> list[list[tuple[float, int]]]:
    """(log-prob, rank) of each continuation token given everything before it, under `llm`."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    results = llm.generate([p + c for p, c in zip(prompts, continuations, strict=True)], params)
    out = []
    for prompt, result in zip(prompts, results, strict=True):
        assert result.prompt_logprobs is not None
        out.append([(t.logprob, t.rank) for t in result.prompt_logprobs[len(prompt) :]])  # type: ignore[union-attr]
    return out


@dataclass(frozen=True)
class Agreement:
    prefix_lengths: list[int]  # free-running greedy tokens equal before the first difference
    top1: float
    gap: float


def agreement(reference: LLM, quantized: LLM) -> Agreement:
    greedy = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    ref = reference.generate(PROMPTS, greedy)
    quant = quantized.generate(PROMPTS, greedy)
    prefixes = []
    for r, q in zip(ref, quant, strict=True):
        same = [a == b for a, b in zip(r.token_ids, q.token_ids, strict=True)]
        prefixes.append(same.index(False) if False in same else NUM_TOKENS)
    prompts = [r.prompt_token_ids for r in ref]
    continuations = [r.token_ids for r in ref]
    ref_lp = [lp for row in teacher_forced(reference, prompts, continuations) for lp, _ in row]
    quant_tf = [x for row in teacher_forced(quantized, prompts, continuations) for x in row]
    top1 = sum(rank == 1 for _, rank in quant_tf) / len(quant_tf)
    gap = (sum(ref_lp) - sum(lp for lp, _ in quant_tf)) / len(ref_lp)
    return Agreement(prefixes, top1, gap)


def check_agreement(method: str, result: Agreement) -> None:
    bounds = BOUNDS[method]
    print(
        f"\n{method}: greedy prefix lengths {result.prefix_lengths} of {NUM_TOKENS}, teacher-forced top-1 "
        f"agreement {result.top1:.3f}, mean log-likelihood gap {result.gap:+.4f} nat/token"
    )
    assert result.top1 >= bounds.min_top1
    assert abs(result.gap) <= bounds.max_gap
    assert sum(n >= bounds.prefix for n in result.prefix_lengths) >= bounds.min_prompts


@pytest.fixture(scope="module")
def float32_llm() -> LLM:
    return LLM(dtype="float32")


@pytest.fixture(scope="module", params=BNB_METHODS)
def quantized(request: pytest.FixtureRequest) -> Iterator[tuple[str, LLM]]:
    needs_bitsandbytes()
    yield request.param, LLM(dtype="float32", quantization=request.param)


@pytest.mark.slow
def test_linear_layers_are_bitsandbytes_modules_holding_low_bit_weights(quantized: tuple[str, LLM]) -> None:
    import bitsandbytes as bnb

    method, llm = quantized
    model = llm.engine.runner.model
    cls = bnb.nn.Linear8bitLt if method == "bnb-8bit" else bnb.nn.Linear4bit
    for layer in model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            module = getattr(layer, name)
            assert isinstance(module, cls), f"{name} is {type(module).__name__}"
            weight = module.weight
            if method == "bnb-8bit":
                assert weight.dtype == torch.int8
                assert weight.shape == (module.out_features, module.in_features)
            else:  # two 4-bit codes per byte
                assert weight.dtype == torch.uint8
                assert weight.numel() == module.out_features * module.in_features // 2
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model.embed.dtype == torch.float32  # embedding / tied LM head stay unquantized


@pytest.mark.slow
def test_quantized_model_agrees_with_float32(float32_llm: LLM, quantized: tuple[str, LLM]) -> None:
    method, llm = quantized
    check_agreement(method, agreement(float32_llm, llm))


@pytest.mark.gpu
@pytest.mark.parametrize("method", BNB_METHODS)
def test_quantized_model_on_cuda_agrees_with_unquantized(method: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    needs_bitsandbytes()
    # The model dtype is the CUDA default (bfloat16), for both models.
    reference = LLM(device="cuda")
    llm = LLM(device="cuda", quantization=method)
    for layer in llm.engine.runner.model.layers:
        assert layer.down_proj.weight.device.type == "cuda"
        assert layer.down_proj.weight.dtype == (torch.int8 if method == "bnb-8bit" else torch.uint8)
    check_agreement(method, agreement(reference, llm))
