"""Paged KV-cache bookkeeping: which physical blocks each sequence owns. Pure Python.

The pool is `num_blocks` blocks of `block_size` token slots. A sequence's block table maps its
logical block i (tokens [i*bs, (i+1)*bs)) to a physical block id. Blocks are reference counted
so sequences with a common prefix share them.

Automatic prefix caching: once a block is full *and its KV has been computed*, it is keyed by
(key of the previous block, its tokens) — a chain, so a key identifies the whole prefix — and
registered in `cached`. A block whose ref count drops to zero keeps its key and goes to the end
of the free queue; allocation takes from the front, so unreferenced cached blocks are evicted
least-recently-freed first, and only when a fresh block is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from llmserve.request import Request

# (previous block's hash, this block's tokens): comparing the tokens makes a cache hit exact; the
# parent enters only through its 64-bit hash, which is enough to tell prefixes apart.
BlockKey = tuple[int, tuple[int, ...]]
_ROOT = 0


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set while the block is in the prefix cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, in eviction order (front first). An OrderedDict gives O(1)
        # removal from the middle when a cache hit revives a free block.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[BlockKey, int] = {}
        self.block_tables: dict[tuple[str, int], list[int]] = {}
        self._keys: dict[tuple[str, int], list[BlockKey]] = {}  # chained keys of a request's full blocks
        self._num_committed: dict[tuple[str, int], int] = {}  # how many of its blocks are registered
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    # ---- queries ------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_table(self, request: Request) -> list[int]:
        return self.block_tables.get(request.key, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest run of cached blocks matching the request's prefix, and the tokens it covers.

        At most num_tokens - 1 tokens can hit: the last token must run through the model to
        produce the logits for the next one."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need every prompt position to run through the model
        keys = self._block_keys(request, (request.num_tokens - 1) // self.block_size)
        hit: list[int] = []
        for key in keys:
            block_id = self.cached.get(key)
            if block_id is None:
                break
            hit.append(block_id)
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += len(hit) * self.block_size
        return hit, len(hit) * self.block_size

    def _block_keys(self, request: Request, num_full_blocks: int) -> list[BlockKey]:
        """Chained keys of the request's first `num_full_blocks` blocks, extended lazily."""
        keys = self._keys.setdefault(request.key, [])
        tokens, bs = request.all_token_ids, self.block_size
        while len(keys) < num_full_blocks:
            i = len(keys)
            parent = hash(keys[-1]) if keys else _ROOT
            keys.append((parent, tuple(tokens[i * bs : (i + 1) * bs])))
        return keys[:num_full_blocks]

    def commit(self, request: Request) -> None:
        """Register the request's full, computed blocks in the prefix cache.

        Called after the forward pass that wrote their KV, never before: a block that was only
        scheduled could be dropped by a preemption with garbage in it."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables[request.key]
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_committed.get(request.key, 0)
        if num_full <= start:
            return
        keys = self._block_keys(request, num_full)
        for i in range(start, num_full):
            block = self.blocks[table[i]]
            if block.key is None and keys[i] not in self.cached:
                block.key = keys[i]
                self.cached[keys[i]] = block.block_id
            # else: a hit (already registered) or a twin computed concurrently; keep the first.
        self._num_committed[request.key] = num_full

    # ---- allocation ---------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens after `request.num_computed_tokens`
        (plus the tokens covered by `computed_blocks`, prefix-cache hits taken first).
        Returns False, changing nothing, when the pool cannot supply the blocks."""
        computed_blocks = computed_blocks or []
        table = self.block_tables.setdefault(request.key, [])
        assert not (computed_blocks and table), "cache hits are only taken before the first allocation"
        total_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_new_blocks = self.blocks_needed(total_tokens) - len(table) - len(computed_blocks)
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks + revived > self.num_free_blocks:
            return False
        for block_id in computed_blocks:
            self._take(self.blocks[block_id])
            table.append(block_id)
        if computed_blocks:
            self._num_committed[request.key] = len(computed_blocks)
        for _ in range(max(num_new_blocks, 0)):
            table.append(self._pop_free())
        return True

    def free(self, request: Request) -> None:
        """Drop the request's references. Tail blocks are queued first so they are evicted
        before the prefix blocks other requests are more likely to share."""
        table = self.block_tables.pop(request.key, [])
        for block_id in reversed(table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        self._num_committed.pop(request.key, None)

    def forget(self, request: Request) -> None:
        """The request is finished for good: also drop its cached chain of keys."""
        self.free(request)
        self._keys.pop(request.key, None)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.key = None
        self.cached.clear()

    def _take(self, block: Block) -> None:
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.key is not None:  # evict: this block's contents are about to be overwritten
            if self.cached.get(block.key) == block_id:
                del self.cached[block.key]
            block.key = None
        block.ref_count = 1
        return block_id
