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


def _load(what: str, source: str, cflags: list[str], fallback: str = "") -> ModuleType | None:
    """Build (once per machine) and load csrc/`source` as llmserve_<its stem>, or None with a
    warning: no compiler, no ninja, headers missing, and the caller keeps its torch path."""
    try:
        logger.info("loading the C++ %s (compiled once per machine)", what)
        return _build(
            name=f"llmserve_{Path(source).stem}",
            sources=[str(_CSRC / source)],
            extra_cflags=["-O3", "-march=native", *cflags, "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:
        logger.warning("C++ %s unavailable (%s)%s", what, exc, fallback)
        return None


@functools.cache
def load() -> ModuleType | None:
    """The paged decode attention (csrc/paged_attention_cpu.cpp), or None."""
    # -ffast-math lets the compiler vectorise the dot-product reductions (reassociation).
    return _load("paged-attention kernel", "paged_attention_cpu.cpp", ["-ffast-math"], "; using the torch reference")


# No -ffast-math and no FMA contraction in the next three: the layer ops must round exactly where
# torch's do, both paths of Int8Linear share one rounding, and int4's scalar fallback must give
# its vector path's bits.
_EXACT = ["-mprefer-vector-width=512", "-ffp-contract=off"]


@functools.cache
def load_layer_ops() -> ModuleType | None:
    """The fused per-layer elementwise ops (csrc/layer_ops_cpu.cpp), or None."""
    return _load("fused layer ops", "layer_ops_cpu.cpp", _EXACT, "; using torch ops")


@functools.cache
def load_int8_ops() -> ModuleType | None:
    """The weight-only int8 matmul for decode steps (csrc/int8_gemv_cpu.cpp), or None."""
    return _load("int8 matmul", "int8_gemv_cpu.cpp", _EXACT)


@functools.cache
def load_int4_ops() -> ModuleType | None:
    """The 4-bit group-quantized matmul for decode steps (csrc/int4_gemv_cpu.cpp), or None."""
    return _load("int4 matmul", "int4_gemv_cpu.cpp", _EXACT)


PREFILL_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # the head sizes the prefill kernel is instantiated for


@functools.cache
def load_prefill() -> ModuleType | None:
    """The varlen prefill attention over the paged cache (csrc/prefill_attention_cpu.cpp), or None."""
    # No -ffast-math: it lets the compiler assume no infinities, and the causal mask is -inf.
    return _load("prefill-attention kernel", "prefill_attention_cpu.cpp", ["-mprefer-vector-width=512"],
                 "; using the torch reference")


@functools.cache
def load_amx_linear() -> ModuleType | None:
    """The bf16 AMX-tile linear layer (csrc/amx_linear_cpu.cpp), or None. A build on a CPU without
    AMX-BF16 loads, and its `has_amx()` says False."""
    return _load("AMX bf16 linear", "amx_linear_cpu.cpp", [], "; bf16 linears use oneDNN")


@functools.cache
def load_w8a8() -> ModuleType | None:
    """The int8 x int8 linear layer, AMX tiles or VNNI (csrc/w8a8_linear_cpu.cpp), or None. A build on a CPU
    with neither AMX-INT8 nor AVX-512 VNNI loads, and its `backend()` says "none"."""
    return _load("w8a8 linear", "w8a8_linear_cpu.cpp", _EXACT)


@functools.cache
def load_sampler() -> ModuleType | None:
    """The sampler's fused pass over its random rows (csrc/sampler_cpu.cpp), or None."""
    return _load("fused sampler", "sampler_cpu.cpp", _EXACT, "; sampling uses torch ops")


@functools.cache
def load_layer_loop() -> ModuleType | None:
    """The decoder's layer loop in C++ over the kernels above (csrc/layer_loop_cpu.cpp), or None."""
    return _load("layer loop", "layer_loop_cpu.cpp", [], "; the layers run from Python")


# Every loader above, the slowest builds first (prefill attention ~70 s on 2 cores, the rest 30-50 s).
LOADERS = ("load_prefill", "load_int4_ops", "load_layer_ops", "load_int8_ops", "load", "load_amx_linear",
           "load_w8a8", "load_sampler", "load_layer_loop")  # fmt: skip


def _build_in_child(loader: str) -> bool:
    return globals()[loader]() is not None


def build_all(workers: int = 2) -> list[str]:
    """Compile every kernel not yet built, `workers` builds at a time, in child processes (each
    build is one compiler process, so one at a time leaves a core idle). Returns the loaders whose
    kernel could not be built; the caller's own loads then find the rest in the cache."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        built = list(pool.map(_build_in_child, LOADERS))
    return [name for name, ok in zip(LOADERS, built, strict=True) if not ok]
