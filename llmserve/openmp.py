"""Handing torch's OpenMP work from one thread to another.

GNU OpenMP keeps a pool of worker threads per thread that has opened a parallel region. The server
loads the model on the main thread (its parallel regions: weight packing, kernel probes, warm-up)
and then runs every step on its engine thread, which gets a second pool. From then on libgomp
counts more OpenMP threads than cores, and in that state it spins only ~100 iterations before
putting a waiting worker to sleep (its "throttled" spin count, whatever GOMP_SPINCOUNT says), so
the workers sleep and are woken by futex at each of the hundreds of parallel regions of a step.
Measured on the 2-core AMD EPYC, 64 sequences x 128 tokens of w8a8 decode, model loaded on the
main thread (2026-12-03 08:00 UTC): run on the main thread 1,216-1,234 tok/s with ~1 voluntary
context switch; on another thread 848-938 tok/s with ~93,000; on another thread after
`release_thread_workers()` on the main thread 1,019-1,076 tok/s with 6-8 (the machine's speed
drifted by ~10% between runs).

`omp_pause_resource_all` (OpenMP 5.0) frees the calling thread's pool, so only the engine thread's
remains. A later parallel region on the releasing thread would build a new pool: the HTTP side
runs no torch ops.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger("llmserve")

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: release the threads, keep nothing else
_RUNTIMES = ("libgomp.so.1", "libiomp5.so", "libomp.so")  # GNU (torch's CPU wheels), Intel, LLVM


def release_thread_workers() -> bool:
    """Free the calling thread's OpenMP worker threads, in the OpenMP runtime torch has loaded (no
    other is loaded: RTLD_NOLOAD). False, with a log line, where there is none or it cannot."""
    for name in _RUNTIMES:
        try:
            runtime = ctypes.CDLL(name, mode=os.RTLD_NOLOAD)
        except OSError:
            continue  # not loaded in this process
        pause = getattr(runtime, "omp_pause_resource_all", None)
        if pause is None:
            logger.info("%s has no omp_pause_resource_all; its workers stay", name)
            return False
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause(_OMP_PAUSE_SOFT) == 0
    return False
