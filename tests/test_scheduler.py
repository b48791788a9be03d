"""Scheduler: token budget, decodes before prefills, chunking, preemption and abort. No torch."""

from __future__ import annotations

from llmserve.block_manager import BlockManager
from llmserve.config import SchedulerConfig
from llmserve.request import Request, RequestStatus
from llmserve.sampling_params import SamplingParams
from llmserve.scheduler import Scheduler, SchedulerOutput


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_seqs: int = 8, budget: int = 32,
                   caching: bool = True) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), bm)


def make_request(rid: str, prompt_len: int, max_tokens: int = 4, first_token: int = 0) -> Request:
    prompt = [first_token + i for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens)


def finish_step(sched: Scheduler, out: SchedulerOutput, token: int = 7) -> list[Request]:
    """What the engine does after the forward: advance, sample a fake token, stop at max_tokens."""
    sched.update_after_step(out)
    finished = []
    for seq in out.seqs:
        if seq.samples:
            seq.request.append_token(token)
            if seq.request.check_token_stop():
                sched.finish(seq.request, seq.request.status)
                finished.append(seq.request)
    return finished


def test_budget_is_respected_and_long_prompt_is_chunked() -> None:
    sched = make_scheduler(budget=16)
    req = make_request("a", 40)
    sched.add(req)
    chunks = []
    while req.num_output_tokens == 0:
        out = sched.schedule()
        assert out.num_tokens <= 16
        chunks.append([(s.start, s.num_new_tokens) for s in out.seqs])
        finish_step(sched, out)
    assert chunks == [[(0, 16)], [(16, 16)], [(32, 8)]]


def test_decodes_are_scheduled_before_prefill_chunks_and_never_starved() -> None:
    sched = make_scheduler(budget=8)
    decoders = [make_request(f"d{i}", 3, max_tokens=50, first_token=100 * i) for i in range(3)]
    for r in decoders:
        sched.add(r)
    finish_step(sched, sched.schedule())  # all three prefill (9 tokens > 8: third chunked)
    finish_step(sched, sched.schedule())
    long = make_request("long", 100)
    sched.add(long)
    for _ in range(10):
        out = sched.schedule()
        decode_seqs = [s for s in out.seqs if s.request in decoders]
        assert len(decode_seqs) == 3, "every running decode gets its token every step"
        assert out.seqs[:3] == decode_seqs, "decodes come first"
        assert all(s.num_new_tokens == 1 for s in decode_seqs)
        assert out.num_tokens <= 8
        finish_step(sched, out)
    assert 0 < long.num_computed_tokens < 100  # the long prompt advanced in chunks meanwhile


def test_max_num_seqs_caps_running_requests() -> None:
    sched = make_scheduler(max_seqs=2, budget=64)
    for i in range(4):
        sched.add(make_request(f"r{i}", 4))
    out = sched.schedule()
    assert [s.request.request_id for s in out.seqs] == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 2


def test_fcfs_head_of_queue_is_not_overtaken() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)
    sched.add(make_request("big", 20))  # needs 5 blocks: never fits right now
    sched.add(make_request("small", 2))
    out = sched.schedule()
    assert out.is_empty
    assert [r.request_id for r in sched.waiting] == ["big", "small"]


def test_out_of_blocks_preempts_newest_and_it_resumes_by_recompute() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64, caching=False)
    old = make_request("old", 8, max_tokens=7)  # 2 blocks now, 4 blocks by the end (8 + 7 = 15 tokens)
    new = make_request("new", 8, max_tokens=7, first_token=50)
    sched.add(old)
    sched.add(new)
    finish_step(sched, sched.schedule())  # both prefilled: 4 blocks used
    assert sched.block_manager.num_free_blocks == 0
    out = sched.schedule()  # both cross into a new block: no room -> newest preempted
    assert out.preempted == [new]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert [s.request for s in out.seqs] == [old]
    assert sched.waiting[0] is new
    finish_step(sched, out)
    while not old.is_finished:
        finish_step(sched, sched.schedule())
    # old is done; new is recomputed from scratch (prompt + its 1 output token) and finishes
    out = sched.schedule()
    assert [(s.request.request_id, s.start, s.num_new_tokens) for s in out.seqs] == [("new", 0, 9)]
    finish_step(sched, out)
    while not new.is_finished:
        finish_step(sched, sched.schedule())
    assert new.num_output_tokens == 7 and new.num_preemptions == 1
    assert sched.block_manager.num_free_blocks == 4


def test_preempted_request_reuses_its_cached_blocks() -> None:
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    old = make_request("old", 8, max_tokens=12)  # 20 tokens: 5 of the 6 blocks by the end
    new = make_request("new", 8, max_tokens=12, first_token=50)
    sched.add(old)
    sched.add(new)
    finish_step(sched, sched.schedule())
    while new.status != RequestStatus.PREEMPTED:
        finish_step(sched, sched.schedule())
    while not old.is_finished:
        finish_step(sched, sched.schedule())
    out = sched.schedule()
    # new's blocks were freed tail first; old's growth evicted those, its first block survived
    assert out.seqs[0].request is new and out.seqs[0].start == 4
    assert sched.block_manager.prefix_cache_hits >= 4


def test_abort_frees_blocks_and_removes_from_queues() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4)
    a, b = make_request("a", 10), make_request("b", 10)
    sched.add(a)
    sched.add(b)
    finish_step(sched, sched.schedule())
    used = sched.block_manager.num_free_blocks
    sched.abort(a)
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert sched.block_manager.num_free_blocks == used + 3
    assert [s.request for s in sched.schedule().seqs] == [b]
    waiting = make_request("w", 4)
    sched.add(waiting)
    sched.abort(waiting)
    assert waiting not in sched.waiting


def test_n_siblings_wait_for_leader_prefill_and_share_its_blocks() -> None:
    sched = make_scheduler(num_blocks=32, block_size=4, budget=64)
    leader = make_request("r", 13)
    sibling = Request("r", leader.prompt_token_ids, leader.sampling_params, index=1, max_tokens=4, leader=leader)
    sched.add(leader)
    sched.add(sibling)
    out = sched.schedule()
    assert [s.request for s in out.seqs] == [leader]
    finish_step(sched, out)
    out = sched.schedule()
    sib = next(s for s in out.seqs if s.request is sibling)
    assert sib.start == 12 and sib.num_new_tokens == 1  # 3 full prompt blocks shared
    bm = sched.block_manager
    assert bm.block_table(sibling)[:3] == bm.block_table(leader)[:3]
