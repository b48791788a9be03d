"""The C++ CPU kernels, compiled on first use: decode attention (csrc/paged_attention_cpu.cpp),
varlen prefill attention (csrc/prefill_attention_cpu.cpp), the fused per-layer elementwise ops
(csrc/layer_ops_cpu.cpp), the weight-only int8 and int4 matmuls (csrc/int8_gemv_cpu.cpp,
csrc/int4_gemv_cpu.cpp), and the bf16 linear layer on AMX tiles (csrc/amx_linear_cpu.cpp).

torch's cpp_extension builds it with the machine's C++ compiler into ~/.cache/torch_extensions
(tens of seconds each, once per machine). Where one cannot be built, its loader returns None and
the engine keeps the torch ops, with a warning in the log.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger("llmserve.kernels")

_CSRC = Path(__file__).parent / "csrc"
# A first build takes 1-2 minutes on 2 cores. torch waits forever on a build directory's lock, and a
# build that was killed (a server stopped during its first start) leaves its lock behind.
STALE_LOCK_S = 600.0


def clear_stale_lock(lock: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove `lock` if it is older than `max_age_s` (left by a build that never finished)."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False  # a build may be running in another process: wait for it, as torch does
    logger.warning("removing %s, left %.0f s ago by a kernel build that did not finish", lock, age)
    lock.unlink(missing_ok=True)
    return True


def _build(name: str, **kwargs: Any) -> ModuleType:
    """torch's cpp_extension.load, after clearing a stale lock in the extension's build directory."""
    from torch.utils import cpp_extension

    clear_stale_lock(Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock")
    return cpp_extension.load(name=name, **kwargs)
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # the head sizes the kernel is instantiated for


@functools.cache
def load() -> ModuleType | None:
    try:
        logger.info("loading the C++ paged-attention kernel (compiled once per machine)")
        return _build(
            name="llmserve_paged_attention_cpu",
            sources=[str(_CSRC / "paged_attention_cpu.cpp")],
            # -ffast-math lets the compiler vectorise the dot-product reductions (reassociation).
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # no compiler, no ninja, headers missing: the torch path still works
        logger.warning("C++ paged-attention kernel unavailable (%s); using the torch reference", exc)
        return None


@functools.cache
def load_layer_ops() -> ModuleType | None:
    try:
        logger.info("loading the C++ fused layer ops (compiled once per machine)")
        return _build(
            name="llmserve_layer_ops_cpu",
            sources=[str(_CSRC / "layer_ops_cpu.cpp")],
            # No -ffast-math and no FMA contraction: these ops must round exactly where torch's do.
            extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:
        logger.warning("C++ fused layer ops unavailable (%s); using torch ops", exc)
        return None


@functools.cache
def load_int8_ops() -> ModuleType | None:
    """The weight-only int8 matmul for decode steps (csrc/int8_gemv_cpu.cpp), or None."""
    try:
        logger.info("loading the C++ int8 matmul (compiled once per machine)")
        return _build(
            name="llmserve_int8_gemv_cpu",
            sources=[str(_CSRC / "int8_gemv_cpu.cpp")],
            # No -ffast-math and no FMA contraction: both paths of Int8Linear share one rounding.
            extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp",
                          "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:
        logger.warning("C++ int8 matmul unavailable (%s)", exc)
        return None


@functools.cache
def load_int4_ops() -> ModuleType | None:
    """The 4-bit group-quantized matmul for decode steps (csrc/int4_gemv_cpu.cpp), or None."""
    try:
        logger.info("loading the C++ int4 matmul (compiled once per machine)")
        return _build(
            name="llmserve_int4_gemv_cpu",
            sources=[str(_CSRC / "int4_gemv_cpu.cpp")],
            # No -ffast-math and no FMA contraction: the scalar fallback must give the vector path's bits.
            extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:
        logger.warning("C++ int4 matmul unavailable (%s)", exc)
        return None


PREFILL_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # the head sizes the prefill kernel is instantiated for


@functools.cache
def load_prefill() -> ModuleType | None:
    """The varlen prefill attention over the paged cache (csrc/prefill_attention_cpu.cpp), or None."""
    try:
        logger.info("loading the C++ prefill-attention kernel (compiled once per machine)")
        return _build(
            name="llmserve_prefill_attention_cpu",
            sources=[str(_CSRC / "prefill_attention_cpu.cpp")],
            # No -ffast-math: it lets the compiler assume no infinities, and the causal mask is -inf.
            extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:
        logger.warning("C++ prefill-attention kernel unavailable (%s); using the torch reference", exc)
        return None


@functools.cache
def load_amx_linear() -> ModuleType | None:
    """The bf16 AMX-tile linear layer (csrc/amx_linear_cpu.cpp), or None. A build on a CPU without
    AMX-BF16 loads, and its `has_amx()` says False."""
    try:
        logger.info("loading the C++ AMX bf16 linear (compiled once per machine)")
        return _build(
            name="llmserve_amx_linear_cpu",
            sources=[str(_CSRC / "amx_linear_cpu.cpp")],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:
        logger.warning("C++ AMX linear unavailable (%s); bf16 linears use oneDNN", exc)
        return None
