"""Block manager: exact block ids, ref counts, prefix-cache hits and eviction order. No torch."""

from __future__ import annotations

from llmserve.block_manager import BlockManager
from llmserve.request import Request
from llmserve.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int], index: int = 0) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8), index=index)


def run_prefill(bm: BlockManager, req: Request) -> list[int]:
    """Allocate the whole prompt (after cache hits) and mark it computed, as the engine would."""
    hit, num_hit = bm.get_computed_blocks(req)
    assert bm.allocate_slots(req, req.num_tokens - num_hit, hit)
    req.num_computed_tokens = req.num_tokens
    bm.commit(req)
    return bm.block_table(req)


def test_allocation_takes_lowest_free_blocks_in_order() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(10)))  # 10 tokens -> 3 blocks
    assert run_prefill(bm, a) == [0, 1, 2]
    b = make_request("b", list(range(100, 105)))  # 5 tokens -> 2 blocks
    assert run_prefill(bm, b) == [3, 4]
    assert bm.num_free_blocks == 3
    assert [bm.blocks[i].ref_count for i in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]


def test_decode_allocates_a_new_block_only_at_block_boundary() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_request("a", [1, 2, 3])
    run_prefill(bm, req)
    assert bm.block_table(req) == [0]
    req.num_computed_tokens = 3
    req.all_token_ids.append(9)  # 4 tokens: still one block
    assert bm.allocate_slots(req, 1)
    assert bm.block_table(req) == [0]
    req.num_computed_tokens = 4
    req.all_token_ids.append(9)  # 5th token needs block 1
    assert bm.allocate_slots(req, 1)
    assert bm.block_table(req) == [0, 1]


def test_prefix_hit_shares_blocks_and_counts_references() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    prompt = list(range(12))
    a = make_request("a", [*prompt, 50])  # 13 tokens: 3 full blocks + 1
    assert run_prefill(bm, a) == [0, 1, 2, 3]
    b = make_request("b", [*prompt, 60, 61])
    hit, num_hit = bm.get_computed_blocks(b)
    assert hit == [0, 1, 2] and num_hit == 12
    assert bm.allocate_slots(b, b.num_tokens - num_hit, hit)
    assert bm.block_table(b) == [0, 1, 2, 4]
    assert [bm.blocks[i].ref_count for i in range(5)] == [2, 2, 2, 1, 1]
    assert bm.prefix_cache_hits == 12


def test_whole_prompt_cached_still_recomputes_last_token() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(8)))
    run_prefill(bm, a)
    b = make_request("b", list(range(8)))
    hit, num_hit = bm.get_computed_blocks(b)
    # 8 tokens, 2 full blocks, but the last token must run to produce logits: only block 0 hits.
    assert hit == [0] and num_hit == 4


def test_chain_hash_distinguishes_same_block_after_different_prefix() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    run_prefill(bm, make_request("a", [1, 1, 1, 1, 7, 7, 7, 7, 0]))
    other = make_request("b", [2, 2, 2, 2, 7, 7, 7, 7, 0])
    hit, num_hit = bm.get_computed_blocks(other)
    assert hit == [] and num_hit == 0


def test_freed_blocks_stay_cached_until_evicted_lru_tail_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])  # blocks 0,1 full; 2 partial
    assert run_prefill(bm, a) == [0, 1, 2]
    bm.forget(a)
    # Free queue: never-used 3,4,5, then a's blocks in reverse (tail first): 2, 1, 0.
    assert list(bm.free_queue) == [3, 4, 5, 2, 1, 0]
    assert len(bm.cached) == 2
    # A new unrelated request takes fresh blocks first, then evicts a's tail before its head.
    c = make_request("c", list(range(100, 109)))  # 9 tokens -> 5 blocks
    assert run_prefill(bm, c) == [3, 4, 5, 2, 1]
    assert bm.blocks[1].key is None  # evicted
    assert bm.blocks[0].key is not None  # still cached, still free
    again = make_request("d", [1, 2, 3, 4, 5])
    hit, num_hit = bm.get_computed_blocks(again)
    assert hit == [0] and num_hit == 2


def test_cache_hit_revives_a_free_block_out_of_the_free_queue() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3])
    run_prefill(bm, a)
    bm.forget(a)
    b = make_request("b", [1, 2, 9])
    hit, _ = bm.get_computed_blocks(b)
    assert hit == [0]
    assert bm.allocate_slots(b, 1, hit)
    assert 0 not in bm.free_queue and bm.blocks[0].ref_count == 1
    # free queue was [2, 3, 1, 0]; 0 revived, the new block comes from the front
    assert bm.block_table(b) == [0, 2]
    assert list(bm.free_queue) == [3, 1]

def test_allocation_fails_without_side_effects_when_pool_is_short() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 2, 3, 4])
    run_prefill(bm, a)
    b = make_request("b", [5, 6, 7])
    assert not bm.allocate_slots(b, 3)
    assert bm.block_table(b) == [] and bm.num_free_blocks == 1


def test_uncommitted_blocks_are_not_offered_as_hits() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert bm.allocate_slots(a, 5)  # scheduled but its forward has not run yet
    b = make_request("b", [1, 2, 3, 4, 5])
    assert bm.get_computed_blocks(b) == ([], 0)


def test_prefix_caching_disabled_never_hits() -> None:
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=False)
    run_prefill(bm, make_request("a", [1, 2, 3, 4, 5]))
    assert bm.get_computed_blocks(make_request("b", [1, 2, 3, 4, 5])) == ([], 0)
    assert bm.cached == {}
