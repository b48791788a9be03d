"""Attention kernels against plain-math references: the torch paged path against dense attention,
and the C++ CPU decode kernel against the torch path, across shapes and dtypes."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmserve_kernels import cpu_ops
from llmserve_kernels.paged_attention_ref import (
    decode_mask,
    gather_index,
    paged_attention_decode,
    paged_attention_prefill,
    write_kv_cache,
)

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
REPO = Path(__file__).resolve().parents[1]


def test_the_kernels_folder_does_not_shadow_the_pypi_kernels_package() -> None:
    # `python -m pytest` (the README's test command) and `python -m llmserve` put the working directory
    # first on sys.path; transformers imports the PyPI `kernels` when it is installed, and found our
    # folder instead once (ImportError: cannot import name 'CUDAProperties').
    code = "import kernels, llmserve_kernels.cpu_ops as c; print(kernels.__file__); print(c.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    pypi_file, ours = out.stdout.split("\n")[:2]
    assert Path(ours).resolve() == REPO / "kernels" / "cpu_ops.py"
    if importlib.util.find_spec("kernels") is None or pypi_file == "None":
        assert not (REPO / "kernels" / "__init__.py").exists()  # at most an empty namespace package
    else:
        assert not Path(pypi_file).resolve().is_relative_to(REPO), pypi_file


def make_paged(lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A cache with the sequences' K/V scattered over shuffled blocks, and the dense K/V."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.zeros(num_blocks, num_kv_heads, block_size, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_per_seq)
    tables = torch.zeros(len(lens), width, dtype=torch.int64)
    dense_k, dense_v = [], []
    for i, (n, nb) in enumerate(zip(lens, blocks_per_seq, strict=True)):
        table = [order.pop() for _ in range(nb)]
        tables[i, :nb] = torch.tensor(table)
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        write_kv_cache(k, v, k_cache, v_cache, slots)
        dense_k.append(k)
        dense_v.append(v)
    return k_cache, v_cache, tables, dense_k, dense_v


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q [n, H, D] at positions start.., k/v [ctx, Hkv, D]: causal attention in float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # [ctx, H, D]
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q.double(), k) / math.sqrt(q.shape[-1])
    pos_q = torch.arange(start, start + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > pos_q, float("-inf"))
    return torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)


SHAPES = [(64, 1), (64, 3), (128, 4), (64, 8), (16, 2)]  # (head_dim, query heads per KV head)
LENS = [1, 16, 17, 33, 64, 100]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("head_dim", "group"), SHAPES)
def test_torch_decode_matches_dense(head_dim: int, group: int, block_size: int, dtype: torch.dtype) -> None:
    num_kv_heads = 2
    k_cache, v_cache, tables, dense_k, dense_v = make_paged(LENS, num_kv_heads, head_dim, block_size, dtype)
    q = torch.randn(len(LENS), num_kv_heads * group, head_dim).to(dtype)
    lens = torch.tensor(LENS)
    out = paged_attention_decode(q, k_cache, v_cache, gather_index(tables, num_kv_heads),
                                 decode_mask(lens, tables.shape[1] * block_size, torch.float32), head_dim**-0.5)
    for i, n in enumerate(LENS):
        expected = dense_attention(q[i : i + 1], dense_k[i], dense_v[i], n - 1)[0]
        torch.testing.assert_close(out[i].double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 5, 16])
def test_torch_prefill_with_cached_prefix_matches_dense(start: int, dtype: torch.dtype) -> None:
    n, num_kv_heads, group, head_dim, block_size = 20, 2, 3, 64, 16
    k_cache, v_cache, tables, dense_k, dense_v = make_paged([start + n], num_kv_heads, head_dim, block_size, dtype)
    q = torch.randn(n, num_kv_heads * group, head_dim).to(dtype)
    out = paged_attention_prefill(q, k_cache, v_cache, gather_index(tables, num_kv_heads), start, head_dim**-0.5)
    expected = dense_attention(q, dense_k[0], dense_v[0], start)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.fixture(scope="module")
def cpu_kernel():  # type: ignore[no-untyped-def]
    module = cpu_ops.load()
    assert module is not None, "the C++ kernel must build on this machine (see the log for why it did not)"
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("head_dim", "group"), SHAPES)
def test_cpp_decode_kernel_matches_dense(cpu_kernel, head_dim: int, group: int, block_size: int,  # type: ignore[no-untyped-def]
                                         dtype: torch.dtype) -> None:
    num_kv_heads = 2
    k_cache, v_cache, tables, dense_k, dense_v = make_paged(LENS, num_kv_heads, head_dim, block_size, dtype, seed=3)
    q = torch.randn(len(LENS), num_kv_heads * group, head_dim).to(dtype)
    out = cpu_kernel.paged_attention_decode(q, k_cache, v_cache, tables, torch.tensor(LENS), head_dim**-0.5)
    for i, n in enumerate(LENS):
        expected = dense_attention(q[i : i + 1], dense_k[i], dense_v[i], n - 1)[0]
        torch.testing.assert_close(out[i].double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
