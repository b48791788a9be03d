"""Weight quantization after load: every `nn.Linear` of the model is swapped for a quantized module.

A method is looked up by its name (`ModelConfig.quantization`) in a registry of `LinearQuantizer`s;
a new one is a subclass plus `@register("name")`, and its name added to `config.QUANTIZATIONS`.
The embedding and the LM head are raw Parameters, not `nn.Linear`, so they stay in the model
dtype, unless the method's `quantize_head` gives the runner a module for the head (int8 and int4 do).

- `int8` (CPU): per-row symmetric int8 weights, the LM head included; our C++ kernel for steps of
  up to 10 rows, a bf16 GEMM over the same codes beyond (llmserve/int8_linear.py).
- `int4` (CPU): GGUF Q4_1 groups (32 weights, a float16 scale and offset each) for the linear
  layers, the LM head int8 as above; our C++ kernel (int8 activations, VNNI) for steps of up to 8
  rows, a bf16 GEMM over the dequantized weights beyond (llmserve/int4_linear.py).
- `w8a8` (CPU with AMX-INT8 or AVX-512 VNNI, bf16): per-row int8 weights, the LM head included,
  and activations quantized to int8 per token at run time; one int8 kernel at every step size
  (AMX tiles, else VNNI), about twice bf16's speed on large steps (llmserve/w8a8_linear.py).

bitsandbytes is imported only when a `bnb-*` method is asked for:

- `bnb-8bit`: LLM.int8() (`bnb.nn.Linear8bitLt`): int8 weights with one scale per output row;
  activations are quantized per row at run time, and input columns with an outlier above
  `INT8_THRESHOLD` are multiplied in float16 instead.
- `bnb-4bit`: NF4 (`bnb.nn.Linear4bit`): 4-bit normal-float codes in blocks of 64 weights, each
  block with its own scale, dequantized to the model dtype for the matmul.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

logger = logging.getLogger("llmserve.quantization")

# LLM.int8()'s own default: activation columns with a value above 6 are kept out of the int8 GEMM.
INT8_THRESHOLD = 6.0
NF4_BLOCKSIZE = 64


class LinearQuantizer(ABC):
    """Turns one loaded `nn.Linear` into a module that computes the same function from fewer bytes."""

    name: str = ""

    def check(self, device: torch.device, dtype: torch.dtype) -> None:  # noqa: B027 (optional hook)
        """Raise ValueError when this method cannot run on `device` in `dtype`. Called before the
        weights are loaded, so a bad combination fails in seconds, not after a long load."""

    @abstractmethod
    def quantize(self, linear: nn.Linear) -> nn.Module:
        """A quantized replacement for `linear`, on its device, taking inputs of its dtype."""

    def weight_bytes(self, module: nn.Module) -> int:
        """Bytes `module` holds for its weights (parameters and buffers by default)."""
        return _tensor_bytes(module)

    def quantize_head(self, weight: torch.Tensor) -> nn.Module | None:
        """A module computing the LM head `hidden @ weight.T` ([V, hidden]), or None (the default)
        to leave the head in the model dtype."""
        return None


_REGISTRY: dict[str, Callable[[], LinearQuantizer]] = {}


def register(name: str) -> Callable[[type[LinearQuantizer]], type[LinearQuantizer]]:
    def wrap(cls: type[LinearQuantizer]) -> type[LinearQuantizer]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_methods() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_quantizer(name: str, device: torch.device, dtype: torch.dtype) -> LinearQuantizer:
    """The quantizer for `name`, checked to run on `device` in `dtype` (ValueError if not)."""
    if name not in _REGISTRY:
        raise ValueError(f"quantization must be one of {list(_REGISTRY)}, got {name!r}")
    quantizer = _REGISTRY[name]()
    quantizer.check(device, dtype)
    return quantizer


@dataclass(frozen=True, slots=True)
class QuantizationReport:
    method: str
    num_modules: int
    linear_bytes_before: int  # the replaced nn.Linear modules only
    linear_bytes_after: int
    model_bytes_before: int  # every weight of the model, embedding and norms included
    model_bytes_after: int


@torch.no_grad()
def quantize_model(model: nn.Module, quantizer: LinearQuantizer) -> QuantizationReport:
    """Replace every `nn.Linear` of `model` in place and log the weight memory saved."""
    model_before = _tensor_bytes(model)
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    before = after = 0
    for name, linear in targets:
        before += _tensor_bytes(linear)
        module = quantizer.quantize(linear).eval().requires_grad_(False)
        _warm_up(module, linear, name, quantizer.name)
        after += quantizer.weight_bytes(module)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    report = QuantizationReport(
        quantizer.name, len(targets), before, after, model_before, model_before - before + after
    )
    mib = 2**20
    logger.info(
        "quantization %s: %d linear layers, their weights %.1f MiB -> %.1f MiB (%.2fx smaller); "
        "all model weights %.1f MiB -> %.1f MiB",
        report.method, report.num_modules, before / mib, after / mib, before / max(after, 1),
        report.model_bytes_before / mib, report.model_bytes_after / mib,
    )  # fmt: skip
    return report


def _warm_up(module: nn.Module, linear: nn.Linear, name: str, method: str) -> None:
    # One forward at load: bitsandbytes finishes some layouts lazily on the first call (the CPU
    # 4-bit kernel repacks the weights), so this makes the memory count final, takes that cost off
    # the first request, and turns a shape the kernel refuses into an error now rather than mid-serve.
    x = torch.ones(1, linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
    try:
        module(x)
    except Exception as e:
        raise ValueError(
            f"quantization {method!r} failed on layer {name} ({linear.out_features}x{linear.in_features}) "
            f"on {linear.weight.device}: {e}"
        ) from e


def _tensor_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- int8 (CPU) ------------------------------------------------------------------------------------


@register("int8")
class CpuInt8(LinearQuantizer):
    """Per-row int8 weights with our own decode kernel, LM head included; llmserve/int8_linear.py."""

    ops: ModuleType | None = None  # the compiled kernels, set by check()
    pack: bool | None = None  # whether the large-step GEMM is oneDNN-packed, set by check()

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        from llmserve import int8_linear

        self.ops = int8_linear.check(device, dtype)
        self.pack = int8_linear.can_pack_codes(device, dtype)

    def quantize(self, linear: nn.Linear) -> nn.Module:
        return self.quantize_weight(linear.weight, linear.bias)

    def quantize_head(self, weight: torch.Tensor) -> nn.Module | None:
        return self.quantize_weight(weight, None)

    def quantize_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        from llmserve.int8_linear import Int8Linear

        return Int8Linear(weight, bias, ops=self.ops, pack=self.pack)

    def weight_bytes(self, module: nn.Module) -> int:
        return module.weight_bytes()  # type: ignore[operator]


@register("int4")
class CpuInt4(CpuInt8):
    """Q4_1 groups for the linear layers with our VNNI kernel, the LM head int8; llmserve/int4_linear.py."""

    ops4: ModuleType | None = None  # the compiled int4 kernel, set by check()

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        from llmserve import int4_linear

        self.ops4 = int4_linear.check(device, dtype)
        super().check(device, dtype)  # the int8 kernel, for the head

    def quantize(self, linear: nn.Linear) -> nn.Module:
        from llmserve.int4_linear import Int4Linear

        return Int4Linear(linear.weight, linear.bias, ops=self.ops4, pack=self.pack)


@register("w8a8")
class CpuW8A8(CpuInt8):
    """int8 weights and per-token int8 activations (AMX tiles or VNNI), LM head included; llmserve/w8a8_linear.py."""

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        from llmserve import w8a8_linear

        self.ops = w8a8_linear.check(device, dtype)

    def quantize_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        from llmserve.w8a8_linear import W8A8Linear

        return W8A8Linear(weight, bias, ops=self.ops)


# ---- bitsandbytes ----------------------------------------------------------------------------------


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# Module-level so that adding them again on a second load is a no-op.
_DROP_KERNELS_HINT = _DropMessages("Failed to load CPU gemm_4bit")
_DROP_FP16_CAST_NOTE = _DropMessages("MatMul8bitLt: inputs will be cast")


def _import_bitsandbytes(method: str) -> ModuleType:
    # Two bitsandbytes warnings that say nothing actionable here: at import on CPUs with
    # AVX512-BF16, that the optional `kernels` package (which downloads a faster 4-bit kernel from
    # the Hugging Face Hub at run time) is missing - its own built-in kernel is used instead and
    # works offline; and on every 8-bit matmul, that non-float16 inputs are cast to float16, which
    # is what LLM.int8() does by design. The second would otherwise log once per layer per step.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DROP_KERNELS_HINT)
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DROP_FP16_CAST_NOTE)
    try:
        import bitsandbytes
    except ImportError as e:
        raise ValueError(f"quantization {method!r} needs bitsandbytes: pip install bitsandbytes ({e})") from e
    return bitsandbytes


class _BitsAndBytes(LinearQuantizer):
    """What the two bnb methods share: the import, and a probe that runs one tiny layer."""

    def __init__(self) -> None:
        self.bnb = _import_bitsandbytes(self.name)

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        # Which kernels exist depends on the bitsandbytes build, the device and even the CPU's
        # instruction set, so the only reliable test is to run one: a 64x64 layer, well below the
        # cost of loading any model.
        probe = nn.Linear(64, 64, bias=True, device=device, dtype=dtype)
        try:
            self.quantize(probe).eval()(torch.ones(2, 64, device=device, dtype=dtype))
        except Exception as e:
            raise ValueError(
                f"quantization {self.name!r} does not run on {device} ({dtype}) with bitsandbytes "
                f"{self.bnb.__version__}: {type(e).__name__}: {e}"
            ) from e


@register("bnb-8bit")
class BnbInt8(_BitsAndBytes):
    def quantize(self, linear: nn.Linear) -> nn.Module:
        bnb = self.bnb
        weight = linear.weight.detach()
        # Built on the meta device: its own random init would be a full-precision allocation for nothing.
        module = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta",
        )  # fmt: skip
        # The same row-wise quantization Int8Params does on a move to the device, but done on the
        # device the weight is already on (Int8Params only quantizes when moving off the CPU).
        int8, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        module.weight = bnb.nn.Int8Params(
            int8, requires_grad=False, has_fp16_weights=False, CB=int8, SCB=row_scales
        )
        module.bias = linear.bias
        return module

    def weight_bytes(self, module: nn.Module) -> int:
        weight, state = module.weight, module.state  # type: ignore[union-attr]
        # The row scales sit on the weight until the first forward, then on the module's state.
        scales = weight.SCB if weight.SCB is not None else state.SCB
        return _tensor_bytes(module) + scales.numel() * scales.element_size()


@register("bnb-4bit")
class BnbNf4(_BitsAndBytes):
    def quantize(self, linear: nn.Linear) -> nn.Module:
        bnb = self.bnb
        weight = linear.weight.detach()
        module = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=weight.dtype, compress_statistics=True, quant_type="nf4", device="meta",
        )  # fmt: skip
        # Params4bit quantizes when moved to a device, whichever device the data is on.
        module.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=NF4_BLOCKSIZE, compress_statistics=True,
            quant_type="nf4", module=module,
        ).to(weight.device)  # fmt: skip
        module.bias = linear.bias
        return module

    def weight_bytes(self, module: nn.Module) -> int:
        state = module.weight.quant_state  # type: ignore[union-attr]
        extra = [state.absmax, state.code]
        if state.nested:  # double quantization: the block scales are themselves 8-bit, with their own
            extra += [state.state2.absmax, state.state2.code]
        return _tensor_bytes(module) + sum(t.numel() * t.element_size() for t in extra)
