"""llmserve/openmp.py: the thread that loaded the engine gives its OpenMP workers back before the
engine thread takes over, so libgomp keeps spinning instead of sleeping at every parallel region."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmserve.openmp import release_thread_workers

# Run in a fresh interpreter: threads that other tests leave behind (servers shutting down) would
# change the process's thread count while it is read.
_PROBE = """
import os, threading, torch
from llmserve.openmp import release_thread_workers
def threads(): return len(os.listdir("/proc/self/task"))
def on_a_fresh_thread():
    torch.set_num_threads(2)  # one worker beside this thread
    (torch.randn(256, 4096) * 2).sum()  # an elementwise op over 1M floats: a parallel region
    before = threads()
    released = release_thread_workers()
    print(before, released, threads())
t = threading.Thread(target=on_a_fresh_thread); t.start(); t.join()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_release_frees_the_calling_threads_workers() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
    before, released, after = out.stdout.split()
    assert released == "True", "torch's CPU wheels load GNU OpenMP, which has omp_pause_resource_all"
    assert int(after) == int(before) - 1, out.stdout


def test_torch_runs_in_parallel_again_after_a_release() -> None:
    torch.set_num_threads(2)
    x = torch.arange(1 << 20, dtype=torch.float64)
    release_thread_workers()
    assert (x * 2).sum().item() == float((1 << 20) * ((1 << 20) - 1))  # a new pool is made on demand
