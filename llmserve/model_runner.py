"""Turns a scheduled step into one packed forward pass over the paged KV cache.

The runner owns the model weights and the KV pool (one K and one V tensor per layer of shape
[num_blocks, Hkv, block_size, D]); the block manager, which is pure Python, decides which block
ids each sequence may use.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from llmserve import cuda_graphs
from llmserve.attention import (
    AttentionMetadata,
    DecodeBatch,
    DecodeGroup,
    DecodeKernel,
    PrefillBatch,
    PrefillChunk,
    PrefillKernel,
)
from llmserve.models import build_model
from llmserve.models.layer_loop import build_layer_loop
from llmserve.models.layer_ops import FusedCpuLayerOps, LayerOps, TorchLayerOps
from llmserve.models.llama import LlamaArch
from llmserve.models.mkl_linear import MklPackedLinear, can_pack_fp32, pack_fp32_linears
from llmserve.models.packed_linear import AmxLinear, bf16_head, can_pack, native_bf16, pack_linears
from llmserve.quantization import get_quantizer, quantize_model
from llmserve.scheduler import ScheduledSeq
from llmserve_kernels.paged_attention_ref import KV_SCALE_BYTES, decode_mask, gather_index

DECODE_GROUPS = 4  # most batched attention calls for the one-token seqs of a step
MIN_DECODE_GROUP = 8  # fewer rows than this per group is not worth a separate call


logger = logging.getLogger("llmserve.model_runner")

@dataclass(slots=True)
class PromptLogits:
    logits: torch.Tensor  # [n, V] model dtype: row i predicts prompt token first_position + i + 1
    first_position: int


@dataclass(slots=True)
class StepResult:
    sampling_seqs: list[ScheduledSeq]  # the seqs that sample this step, in logits row order
    logits: torch.Tensor | None  # [len(sampling_seqs), V] model dtype
    prompt_logits: dict[tuple[str, int], PromptLogits] = field(default_factory=dict)


def kv_cache_row(arch: LlamaArch, kv_cache_dtype: str, dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """(elements, dtype) of one cache row, one token of one KV head: D of the model dtype, or for
    the int8 cache D codes and a float32 scale's 4 bytes (kernels/csrc/kv_int8.h)."""
    if kv_cache_dtype == "int8":
        return arch.head_dim + KV_SCALE_BYTES, torch.int8
    return arch.head_dim, dtype


def kv_cache_bytes_per_block(arch: LlamaArch, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    # K and V, every layer: 2 * L * bs * Hkv rows
    row, row_dtype = kv_cache_row(arch, kv_cache_dtype, dtype)
    elem = torch.empty((), dtype=row_dtype).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * row * elem


def check_kv_cache_dtype(kv_cache_dtype: str, device: torch.device, attention_backend: str) -> None:
    """The int8 cache has CPU readers only: the C++ kernels and the torch reference."""
    if kv_cache_dtype != "int8":
        return
    if device.type != "cpu":
        raise ValueError(f"kv_cache_dtype 'int8' runs on the CPU only, not on {device}")
    if attention_backend == "triton":
        raise ValueError("kv_cache_dtype 'int8' needs attention_backend auto, cpp or torch; the Triton kernels "
                         "read a model-dtype cache")


class ModelRunner:
    def __init__(
        self,
        hf_config: object,
        weights: Iterable[tuple[str, torch.Tensor]],
        *,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        num_blocks: int,
        attention_backend: str = "auto",
        quantization: str | None = None,
        graph_plan: cuda_graphs.GraphPlan | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.device, self.dtype, self.block_size = device, dtype, block_size
        check_kv_cache_dtype(kv_cache_dtype, device, attention_backend)
        if device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16():
            logger.warning(
                "this CPU has no native bf16 matmuls (no AVX-512 or AVX-NE-CONVERT for oneDNN): torch "
                "emulates them, several times slower than float32 here; --dtype float32 is the fast choice"
            )
        # Checked before the weights load, so an unusable method fails in seconds.
        quantizer = get_quantizer(quantization, device, dtype) if quantization else None
        self.model = build_model(hf_config, dtype, device)
        self.model.load_weights(weights)
        if quantizer is not None:
            quantize_model(self.model, quantizer)
            self.model.packed_head = quantizer.quantize_head(self.model.head_weight)  # None: head unquantized
        self.arch = self.model.arch
        self.model.ops = _layer_ops(attention_backend, device, dtype)
        if quantizer is None and attention_backend != "torch":  # the torch reference keeps plain modules
            if can_pack(device, dtype):
                packed = pack_linears(self.model)
                if packed:
                    self.model.packed_head = bf16_head(self.model.head_weight)
                kernel = "AMX tiles" if isinstance(self.model.packed_head, AmxLinear) else "oneDNN"
                logger.info("packed %d bf16 linear weights and the LM head for %s", len(packed), kernel)
            elif can_pack_fp32(device, dtype):
                packed = pack_fp32_linears(self.model)
                if packed:
                    self.model.packed_head = MklPackedLinear(self.model.head_weight)
                    logger.info("packed %d float32 linear weights and the LM head for MKL's sgemm", len(packed))
        self.decode_kernel = _decode_kernel(attention_backend, device, self.arch.head_dim)
        self.prefill_kernel = _prefill_kernel(attention_backend, device, self.arch.head_dim)
        # CUDA graphs (llmserve/cuda_graphs.py): padded rows need one scratch block past the pool's
        # num_blocks, which the block manager never hands out.
        graph_plan = cuda_graphs.usable_plan(graph_plan, self.decode_kernel)
        extra = 0 if graph_plan is None else 1
        row, row_dtype = kv_cache_row(self.arch, kv_cache_dtype, dtype)
        shape = (num_blocks + extra, self.arch.num_kv_heads, block_size, row)
        self.kv_caches = [
            (torch.zeros(shape, dtype=row_dtype, device=device), torch.zeros(shape, dtype=row_dtype, device=device))
            for _ in range(self.arch.num_layers)
        ]
        if device.type == "cpu" and attention_backend != "torch":
            self.model.layer_loop = build_layer_loop(self.model, self.kv_caches, self.decode_kernel, self.prefill_kernel)
        self.graphs: cuda_graphs.DecodeGraphRunner | None = None
        if graph_plan is not None and self.decode_kernel is not None:
            self.graphs = cuda_graphs.DecodeGraphRunner(
                graph_plan, self.model, self.kv_caches, self.decode_kernel, block_size=block_size,
                scratch_block=num_blocks,
            )  # fmt: skip

    @torch.inference_mode()
    def execute(self, seqs: list[ScheduledSeq], block_tables: dict[tuple[str, int], list[int]]) -> StepResult:
        if self.graphs is not None and (graphed := self.graphs.run(seqs, block_tables)) is not None:
            return StepResult(*graphed)  # a pure-decode step, replayed (see llmserve/cuda_graphs.py)
        # Single-token seqs first, shortest context first: they are attended to in batched groups.
        singles = sorted((s for s in seqs if s.num_new_tokens == 1), key=lambda s: s.start)
        ordered = singles + [s for s in seqs if s.num_new_tokens > 1]
        input_ids, positions, meta = self._prepare(ordered, block_tables)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [T, hidden]

        rows: list[int] = []
        sampling: list[ScheduledSeq] = []
        prompt_rows: dict[tuple[str, int], tuple[int, int, int]] = {}  # key -> (row, count, first pos)
        offset = 0
        for seq in ordered:
            if seq.samples:
                rows.append(offset + seq.num_new_tokens - 1)
                sampling.append(seq)
            request = seq.request
            if request.sampling_params.prompt_logprobs is not None and seq.start < request.num_prompt_tokens - 1:
                # positions p with p + 1 still inside the prompt predict a prompt token
                count = min(seq.num_new_tokens, request.num_prompt_tokens - 1 - seq.start)
                prompt_rows[request.key] = (offset, count, seq.start)
            offset += seq.num_new_tokens

        logits = None
        if rows:
            index = torch.tensor(rows, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, index))  # [N, V]
        prompt_logits = {
            key: PromptLogits(self.model.compute_logits(hidden[row : row + count]), first)
            for key, (row, count, first) in prompt_rows.items()
        }
        return StepResult(sampling, logits, prompt_logits)

    def _prepare(
        self, ordered: list[ScheduledSeq], block_tables: dict[tuple[str, int], list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs, device = self.block_size, self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        single_tables: list[list[int]] = []
        single_lens: list[int] = []
        chunks: list[PrefillChunk] = []
        prefill_tables: list[list[int]] = []
        prefill_lens: list[tuple[int, int]] = []  # (new tokens, context length) per chunk
        for seq in ordered:
            request, start, n = seq.request, seq.start, seq.num_new_tokens
            table = block_tables[request.key]
            input_ids.extend(request.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1:
                single_tables.append(table)
                single_lens.append(start + 1)
            elif self.prefill_kernel is not None:
                prefill_tables.append(table[: -(-(start + n) // bs)])
                prefill_lens.append((n, start + n))
            else:
                num_blocks = -(-(start + n) // bs)
                blocks = torch.tensor([table[:num_blocks]], device=device)  # [1, nblk]
                chunks.append(PrefillChunk(len(input_ids) - n, n, start, gather_index(blocks, self.arch.num_kv_heads)))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, device=device),
            decode_groups=[] if self.decode_kernel else self._decode_groups(single_tables, single_lens),
            chunks=chunks,
            decode_batch=self._decode_batch(single_tables, single_lens),
            prefill_batch=self._prefill_batch(len(single_tables), prefill_tables, prefill_lens),
        )
        ids = torch.tensor(input_ids, device=device)
        pos = torch.tensor(positions, device=device)
        return ids, pos, meta

    def _decode_batch(self, tables: list[list[int]], lens: list[int]) -> DecodeBatch | None:
        if self.decode_kernel is None or not tables:
            return None
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=self.device)
        context_lens = torch.tensor(lens, dtype=torch.int64, device=self.device)
        return DecodeBatch(self.decode_kernel, len(tables), padded, context_lens)

    def _prefill_batch(
        self, row_start: int, tables: list[list[int]], lens: list[tuple[int, int]]
    ) -> PrefillBatch | None:
        if self.prefill_kernel is None or not tables:
            return None
        width = max(len(t) for t in tables)
        padded = torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=self.device
        )  # [S, width]
        cu_seqlens = torch.tensor(
            [0, *itertools.accumulate(n for n, _ in lens)], dtype=torch.int32, device=self.device
        )  # [S + 1]
        context_lens = torch.tensor([c for _, c in lens], dtype=torch.int32, device=self.device)
        max_query_len = max(n for n, _ in lens)
        return PrefillBatch(self.prefill_kernel, row_start, padded, cu_seqlens, context_lens, max_query_len)

    def _decode_groups(self, tables: list[list[int]], lens: list[int]) -> list[DecodeGroup]:
        """Cut the one-token seqs (sorted by context length) into up to DECODE_GROUPS groups.

        Each group is padded to its longest context, and the padding is gathered and multiplied
        like real context: with lengths spread evenly, one group wastes about half its work,
        four groups about an eighth, for 3 more small calls per layer."""
        bs, groups = self.block_size, []
        if not tables:
            return groups
        num_groups = min(DECODE_GROUPS, -(-len(tables) // MIN_DECODE_GROUP))
        bounds = [round(i * len(tables) / num_groups) for i in range(num_groups + 1)]
        for lo, hi in itertools.pairwise(bounds):
            width = -(-lens[hi - 1] // bs)  # blocks of the longest context in the group
            # Tables are padded with block 0 up to that width; the mask hides it.
            padded = torch.tensor([t[:width] + [0] * (width - len(t)) for t in tables[lo:hi]], device=self.device)
            context_lens = torch.tensor(lens[lo:hi], device=self.device)
            groups.append(DecodeGroup(
                row_start=lo, num_rows=hi - lo,
                index=gather_index(padded, self.arch.num_kv_heads),  # [rows, Hkv, width]
                mask=decode_mask(context_lens, width * bs, torch.float32),  # [rows, 1, 1, width * bs]
            ))  # fmt: skip
        return groups


def _use_triton(backend: str, device: torch.device) -> bool:
    """triton: the Triton kernels, on CUDA (or on CPU when they were built for Triton's interpreter,
    TRITON_INTERPRET=1, for tests); auto: them on CUDA when triton imports."""
    if backend not in ("triton", "auto") or (backend == "auto" and device.type != "cuda"):
        return False
    from llmserve_kernels import triton_paged_attention  # imports triton: only on this path

    if not triton_paged_attention.available():
        if backend == "auto":
            return False
        raise ValueError("attention_backend 'triton' needs the triton package (pip install triton)")
    if device.type != "cuda" and not triton_paged_attention.interpreted():
        raise ValueError(
            f"attention_backend 'triton' runs on CUDA, not on {device}; set TRITON_INTERPRET=1 to run its kernels "
            "on the CPU through Triton's interpreter (slow: for tests)"
        )
    return True


def _prefill_kernel(backend: str, device: torch.device, head_dim: int) -> PrefillKernel | None:
    """The varlen prefill kernel for this backend, or None for the torch reference (SDPA per chunk):
    Triton where it is in use, else on CPU (auto, cpp) the C++ kernel when it has this head size and
    builds (the loader logs why when it does not)."""
    if _use_triton(backend, device):
        from llmserve_kernels import triton_paged_attention

        return triton_paged_attention.paged_attention_prefill_varlen
    from llmserve_kernels import cpu_ops

    if backend not in ("auto", "cpp") or device.type != "cpu" or head_dim not in cpu_ops.PREFILL_HEAD_DIMS:
        return None
    module = cpu_ops.load_prefill()
    return None if module is None else module.paged_attention_prefill_varlen


def _layer_ops(backend: str, device: torch.device, dtype: torch.dtype) -> LayerOps:
    """Fused C++ layer ops on CPU, unless the torch reference is asked for (or they cannot build)."""
    if device.type == "cpu" and backend != "torch":
        from llmserve_kernels import cpu_ops

        module = cpu_ops.load_layer_ops()
        if module is not None:
            return FusedCpuLayerOps(module, dtype)
    return TorchLayerOps()


def _decode_kernel(backend: str, device: torch.device, head_dim: int) -> DecodeKernel | None:
    """The decode-attention kernel for this backend, or None for the torch reference."""
    from llmserve_kernels import cpu_ops

    if _use_triton(backend, device):
        from llmserve_kernels import triton_paged_attention

        return triton_paged_attention.paged_attention_decode
    if backend == "torch" or (backend == "auto" and (device.type != "cpu" or head_dim not in cpu_ops.HEAD_DIMS)):
        return None
    if device.type != "cpu":
        raise ValueError(f"attention_backend 'cpp' runs on the CPU only, not on {device}")
    if head_dim not in cpu_ops.HEAD_DIMS:
        raise ValueError(f"attention_backend 'cpp' has no build for head_dim {head_dim}; it has {cpu_ops.HEAD_DIMS}")

    module = cpu_ops.load()
    if module is None and backend == "cpp":
        raise ValueError("attention_backend 'cpp' asked for, but the C++ kernel could not be built (see the log)")
    return None if module is None else module.paged_attention_decode
