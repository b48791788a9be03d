"""Pure-decode steps replayed as CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is mostly kernel-launch overhead: ~10 launches per layer, each
a few microseconds of host time against a few microseconds of GPU work. A CUDA graph records
the whole forward (embedding, every layer, final norm, LM head) once and replays it with one
launch. A graph has fixed shapes and fixed addresses, so:

- the step is padded up to the smallest bucket >= its batch size (1, 2, 4, then multiples of
  8 up to the largest), and each bucket has its own graph;
- every input lives in one static device buffer that the graph reads; a step writes its inputs
  into a pinned host buffer and copies them over with one non-blocking copy, queued in front of
  the replay on the same stream;
- padded rows must be harmless: they feed token 0 at position 0 with a context of 1 token in a
  scratch KV block, one block past those the block manager hands out (the runner allocates the
  pool with one more block), so they never write or read any real sequence's cache. Their
  logits are computed and dropped.

Only steps where every scheduled sequence feeds one token and samples go through here; the
runner runs everything else (prefill chunks, a batch above the largest bucket) eagerly.

Without capture (`GraphPlan.capture = False`), "replay" runs the same step function eagerly over
the same static buffers: the padded, bucketed path then runs on CPU, which is how the tests check
it against the eager path on a machine without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmserve.attention import AttentionMetadata, DecodeBatch, DecodeKernel
from llmserve.scheduler import ScheduledSeq

logger = logging.getLogger("llmserve.cuda_graphs")

# Columns of one row of the input buffers [rows, NUM_SCALARS + max_blocks_per_seq] (int64): one
# row per sequence, so a step's inputs are the buffer's first rows and travel in one copy.
TOKEN, POSITION, SLOT, CONTEXT_LEN = range(4)
NUM_SCALARS = 4  # the block table follows, padded with the scratch block

# Quantization methods whose layers cannot be captured: LLM.int8() picks its outlier columns
# from the activations with a data-dependent nonzero(), which synchronizes with the host.
UNCAPTURABLE_QUANTIZATION = ("bnb-8bit",)


@dataclass(frozen=True, slots=True)
class GraphPlan:
    batch_sizes: tuple[int, ...]  # the buckets, ascending
    max_blocks_per_seq: int  # width of every block table: blocks of a max_model_len context
    capture: bool = True  # False: replay runs the step function eagerly (CPU tests)


def batch_size_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, then multiples of 8, and max_batch itself: at most 7 padded rows per step beyond 8."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return (*sizes, max_batch)


def bucket_for(batch_sizes: Sequence[int], num_seqs: int) -> int | None:
    """The smallest bucket that holds num_seqs rows; None when even the largest is too small."""
    return next((size for size in batch_sizes if size >= num_seqs), None)


def plan_decode_graphs(
    *,
    device: torch.device,
    enforce_eager: bool,
    max_num_seqs: int,
    cuda_graph_max_batch: int | None,
    max_model_len: int,
    block_size: int,
    quantization: str | None,
    emulate: bool = False,
) -> GraphPlan | None:
    """Which graphs to capture, or None for a runner that runs every step eagerly (always on CPU).

    emulate: plan as on CUDA whatever the device, with capture off (the tests' CPU path)."""
    if enforce_eager or (device.type != "cuda" and not emulate):
        return None
    if quantization in UNCAPTURABLE_QUANTIZATION:
        logger.info("CUDA graphs off: quantization %s syncs with the host inside its layers", quantization)
        return None
    # No step holds more than max_num_seqs sequences, so a larger bucket would never replay.
    max_batch = min(max_num_seqs, cuda_graph_max_batch or max_num_seqs)
    max_blocks = -(-max_model_len // block_size)
    return GraphPlan(batch_size_buckets(max_batch), max_blocks, capture=not emulate)


def usable_plan(plan: GraphPlan | None, decode_kernel: DecodeKernel | None) -> GraphPlan | None:
    """Graphs need a decode kernel that reads the paged cache through block tables (Triton on
    CUDA, C++ on CPU). The torch reference gathers the context up to the table's width, which for
    a static table is max_model_len for every row of every step."""
    if plan is not None and decode_kernel is None:
        logger.info("CUDA graphs off: attention_backend 'torch' has no paged decode kernel")
        return None
    return plan


class DecodeGraphRunner:
    """Runs pure-decode steps through per-bucket graphs over static input buffers.

    The runner owns the model and the KV pool; this class only borrows them. `scratch_block` is
    the id of the extra KV block that padded rows use (the pool's last)."""

    def __init__(
        self,
        plan: GraphPlan,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        decode_kernel: DecodeKernel,
        *,
        block_size: int,
        scratch_block: int,
    ) -> None:
        pool_blocks = kv_caches[0][0].shape[0]
        if scratch_block >= pool_blocks:
            raise ValueError(f"scratch block {scratch_block} is outside a pool of {pool_blocks} blocks")
        self.plan, self.model, self.kv_caches, self.decode_kernel = plan, model, kv_caches, decode_kernel
        self.block_size, self.scratch_block = block_size, scratch_block
        self.device = kv_caches[0][0].device
        self.max_batch = plan.batch_sizes[-1]
        shape = (self.max_batch, NUM_SCALARS + plan.max_blocks_per_seq)  # [rows, width]
        on_cuda = self.device.type == "cuda"
        # Pinned, so the copy to the device can be queued without waiting (pageable memory would
        # make torch stage it and synchronize).
        self._host = torch.empty(shape, dtype=torch.int64, pin_memory=on_cuda)
        self._host_rows = self._host.numpy()  # the same memory: numpy writes rows without a torch op per item
        self._static = torch.empty(shape, dtype=torch.int64, device=self.device)
        self._padding_row = (0, 0, scratch_block * block_size, 1)  # token 0 at position 0, context 1
        self._host_rows[:, :NUM_SCALARS] = self._padding_row
        self._host_rows[:, NUM_SCALARS:] = scratch_block
        self._static.copy_(self._host)  # capture and warm-up read padding rows only: scratch-block writes
        # Recorded after each copy: the host buffer is rewritten only once the last copy has read it.
        self._copied = torch.cuda.Event() if on_cuda else None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # bucket -> [bucket, V] logits the graph writes
        self.replays: Counter[int] = Counter()  # bucket -> steps run through it
        self.padded_rows = 0  # rows of padding run so far, over all steps
        if plan.capture:
            self._capture_all()

    @property
    def captured(self) -> tuple[int, ...]:
        """The buckets with a captured graph (none when capture is off)."""
        return tuple(sorted(self._graphs))

    # ---- the step ------------------------------------------------------------------------

    def run(
        self, seqs: list[ScheduledSeq], block_tables: dict[tuple[str, int], list[int]]
    ) -> tuple[list[ScheduledSeq], torch.Tensor] | None:
        """(the seqs in logits row order, their logits [len(seqs), V]); None: run the step eagerly.

        The logits are a view of the graph's output, valid until the next step."""
        bucket = bucket_for(self.plan.batch_sizes, len(seqs))
        # A seq that samples has start == num_tokens - 1 >= num_prompt_tokens - 1, so it never
        # needs prompt logprobs: "one token and samples" rules those steps out too.
        if bucket is None or not seqs or not all(s.num_new_tokens == 1 and s.samples for s in seqs):
            return None
        # The eager path's order (shortest context first): the sampler draws unseeded noise
        # row by row from one generator, so the same order gives the same samples.
        ordered = sorted(seqs, key=lambda s: s.start)
        if self._copied is not None and not self._copied.query():
            self._copied.synchronize()  # the previous step's copy still reads the host buffer
        self._fill_host_rows(ordered, block_tables, bucket)
        self._static[:bucket].copy_(self._host[:bucket], non_blocking=True)  # [bucket, width]
        if self._copied is not None:
            self._copied.record()
        if self.plan.capture:
            self._graphs[bucket].replay()
            logits = self._outputs[bucket]  # [bucket, V]
        else:
            logits = self._forward(bucket)  # [bucket, V]
        self.replays[bucket] += 1
        self.padded_rows += bucket - len(ordered)
        return ordered, logits[: len(ordered)]  # [B, V]: the real rows come first

    def _fill_host_rows(
        self, ordered: list[ScheduledSeq], block_tables: dict[tuple[str, int], list[int]], bucket: int
    ) -> None:
        rows, bs = self._host_rows, self.block_size
        rows[:bucket, NUM_SCALARS:] = self.scratch_block  # table tails: never read, but never a real block
        for i, seq in enumerate(ordered):
            start = seq.start
            # Only the blocks this context covers: the table may hold more (never beyond the width,
            # since start < max_model_len).
            blocks = block_tables[seq.request.key][: start // bs + 1]
            token, slot = seq.request.all_token_ids[start], blocks[-1] * bs + start % bs
            rows[i, :NUM_SCALARS] = (token, start, slot, start + 1)
            rows[i, NUM_SCALARS : NUM_SCALARS + len(blocks)] = blocks
        rows[len(ordered) : bucket, :NUM_SCALARS] = self._padding_row

    def _forward(self, bucket: int) -> torch.Tensor:
        """The step over the first `bucket` rows of the static buffers -> logits [bucket, V].

        Every tensor it reads is a view of self._static or the KV pool, so a graph captured from
        it stays valid when only their contents change."""
        rows = self._static[:bucket]  # [bucket, width]
        # Columns are strided views; the kernels want contiguous vectors (copies inside the graph).
        tables = rows[:, NUM_SCALARS:].contiguous()  # [bucket, max_blocks_per_seq]
        context_lens = rows[:, CONTEXT_LEN].contiguous()  # [bucket]
        meta = AttentionMetadata(
            slot_mapping=rows[:, SLOT].contiguous(),  # [bucket]
            decode_groups=[],
            chunks=[],
            decode_batch=DecodeBatch(self.decode_kernel, bucket, tables, context_lens),
        )
        tokens, positions = rows[:, TOKEN].contiguous(), rows[:, POSITION].contiguous()  # [bucket] each
        hidden = self.model(tokens, positions, self.kv_caches, meta)  # [bucket, hidden]
        return self.model.compute_logits(hidden)  # [bucket, V]

    # ---- capture ---------------------------------------------------------------------------

    @torch.inference_mode()
    def _capture_all(self) -> None:
        began = time.perf_counter()
        # Warm-up first, on a side stream as torch asks: it compiles the Triton kernels and sets
        # up cuBLAS, none of which may happen during capture. The buffers hold padding rows only,
        # so all of this writes to the scratch block.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for bucket in self.plan.batch_sizes:
                self._forward(bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        # One memory pool for all graphs, largest first: the smaller ones fit in what it freed.
        # Replays never overlap (one step at a time), so sharing intermediates is safe.
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.plan.batch_sizes):
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    self._outputs[bucket] = self._forward(bucket)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"capturing the decode CUDA graph for batch size {bucket} failed ({exc}); "
                    "start with --enforce-eager to run every step without graphs"
                ) from exc
            self._graphs[bucket] = graph
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s, tables of %d blocks) in %.1f s",
            len(self._graphs), ", ".join(map(str, self.plan.batch_sizes)), self.plan.max_blocks_per_seq,
            time.perf_counter() - began,
        )  # fmt: skip
