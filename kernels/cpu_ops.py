"""The C++ CPU decode-attention kernel (csrc/paged_attention_cpu.cpp), compiled on first use.

torch's cpp_extension builds it with the machine's C++ compiler into ~/.cache/torch_extensions
(tens of seconds, once per machine). Where it cannot be built, `load()` returns None and the
engine keeps the torch reference, with a warning in the log.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

logger = logging.getLogger("llmserve.kernels")

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention_cpu.cpp"
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # the head sizes the kernel is instantiated for


@functools.cache
def load() -> ModuleType | None:
    try:
        from torch.utils import cpp_extension

        logger.info("loading the C++ paged-attention kernel (compiled once per machine)")
        return cpp_extension.load(
            name="llmserve_paged_attention_cpu",
            sources=[str(_SOURCE)],
            # -ffast-math lets the compiler vectorise the dot-product reductions (reassociation).
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # no compiler, no ninja, headers missing: the torch path still works
        logger.warning("C++ paged-attention kernel unavailable (%s); using the torch reference", exc)
        return None
