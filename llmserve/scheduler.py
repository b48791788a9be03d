"""Continuous batching with one token budget per step. Pure Python.

Every step the scheduler hands out at most `max_num_batched_tokens` tokens: first one token to
every running sequence that is decoding, then prefill chunks (of running sequences part-way
through their prompt, then of waiting ones, FCFS) fill what is left. A prompt longer than the
budget is simply prefilled over several steps, so chunked prefill is not a special case and a
long prompt never stalls the decodes.

When the pool runs out of blocks the newest running sequence is preempted: its blocks are freed
and it goes back to the front of the waiting queue to be recomputed later (its full blocks
usually survive in the prefix cache, which makes the recompute cheap).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from llmserve.block_manager import BlockManager
from llmserve.config import SchedulerConfig
from llmserve.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    num_new_tokens: int  # tokens fed this step: all_token_ids[start : start + num_new_tokens]
    start: int  # request.num_computed_tokens when scheduled

    @property
    def samples(self) -> bool:
        """Does this step reach the end of the sequence, so a next token gets sampled?"""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefill chunks
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest first; preemption takes from the end
        self.num_preemptions = 0

    # ---- queue management ---------------------------------------------------------------

    def add(self, request: Request) -> None:
        assert request.status == RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues for good and release its blocks."""
        assert status.finished
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.forget(request)

    # ---- one step -----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[Request] = set()

        # Decodes first (one token each), then running sequences still in their prompt.
        decoding = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefilling = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for request in decoding + prefilling:
            if budget == 0:
                break
            if request not in self.running:  # preempted earlier in this loop
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(request, num_new):
                victim = self.running[-1]
                budget += self._unschedule(victim, out, scheduled)
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                self._schedule(request, num_new, out, scheduled)
                budget -= num_new

        if out.preempted:
            return out  # no room this step: admitting anyone new would only thrash
        self._admit_waiting(budget, out, scheduled)
        return out

    def _admit_waiting(self, budget: int, out: SchedulerOutput, scheduled: set[Request]) -> None:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self._waits_for_leader(request):
                skipped.append(self.waiting.popleft())
                continue
            hit_blocks, num_hit = self.block_manager.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            if not self.block_manager.allocate_slots(request, num_new, hit_blocks):
                break  # strict FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = num_hit
            request.num_computed_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._schedule(request, num_new, out, scheduled)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

    def _waits_for_leader(self, request: Request) -> bool:
        """Choices 1..n-1 of a request wait until choice 0 has prefilled the prompt, then take
        its blocks from the prefix cache instead of computing them again."""
        leader = request.leader
        if leader is None:
            return False
        if (
            not self.block_manager.enable_prefix_caching
            or leader.is_finished
            or leader.num_computed_tokens >= leader.num_prompt_tokens
        ):
            request.leader = None
            return False
        return True

    def _schedule(self, request: Request, num_new: int, out: SchedulerOutput, scheduled: set[Request]) -> None:
        assert num_new > 0
        out.seqs.append(ScheduledSeq(request, num_new, request.num_computed_tokens))
        scheduled.add(request)

    def _unschedule(self, request: Request, out: SchedulerOutput, scheduled: set[Request]) -> int:
        """Take back a seq already scheduled this step (it is about to be preempted)."""
        if request not in scheduled:
            return 0
        scheduled.discard(request)
        for i, seq in enumerate(out.seqs):
            if seq.request is request:
                del out.seqs[i]
                return seq.num_new_tokens
        raise AssertionError("scheduled request missing from the step")

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """The forward ran: advance the counters and publish newly full blocks to the cache."""
        for seq in out.seqs:
            request = seq.request
            assert request.num_computed_tokens == seq.start
            request.num_computed_tokens += seq.num_new_tokens
            assert request.num_computed_tokens <= request.num_tokens
            self.block_manager.commit(request)

    def abort(self, request: Request) -> None:
        if not request.is_finished:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
