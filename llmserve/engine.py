"""The step-level engine: add requests, call `step()` until done, abort at any time.

    step = schedule (who runs, how many tokens) -> one packed forward -> sample -> update
           (append tokens, detokenize, check stops, free finished blocks)

Single-threaded by design: the HTTP server drives it from one dedicated thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from llmserve.block_manager import BlockManager
from llmserve.config import EngineConfig
from llmserve.cuda_graphs import plan_decode_graphs
from llmserve.detokenizer import IncrementalDetokenizer
from llmserve.model_loader import load_hf_config, load_state_dict, load_tokenizer, resolve_model
from llmserve.model_runner import ModelRunner, StepResult, check_kv_cache_dtype, kv_cache_bytes_per_block
from llmserve.models import check_supported
from llmserve.models.llama import LlamaArch
from llmserve.outputs import RequestOutput, TokenLogprob
from llmserve.request import Request, RequestStatus
from llmserve.sampler import Sampler
from llmserve.sampling_params import SamplingParams
from llmserve.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger("llmserve.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1 of the block pool held by live sequences
    num_blocks: int
    prefix_cache_queries: int  # cumulative, tokens
    prefix_cache_hits: int  # cumulative, tokens
    num_preemptions: int  # cumulative
    prompt_tokens: int  # cumulative, tokens run through prefill (cache hits excluded)
    generation_tokens: int  # cumulative


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        mc = config.model
        if mc.num_threads is not None:
            torch.set_num_threads(mc.num_threads)
        self.device = _resolve_device(mc.device)
        self.dtype = _resolve_dtype(mc.dtype, self.device)
        files = resolve_model(mc.model)
        self.model_name = files.name
        hf_config = load_hf_config(files)
        check_supported(hf_config)
        arch = LlamaArch.from_hf(hf_config)
        self.tokenizer = load_tokenizer(files)
        self.vocab_size = arch.vocab_size
        self.eos_token_ids = _eos_token_ids(hf_config, self.tokenizer, files.path)

        cc = config.cache
        check_kv_cache_dtype(cc.kv_cache_dtype, self.device, mc.attention_backend)  # before the weights load
        per_block = kv_cache_bytes_per_block(arch, cc.block_size, self.dtype, cc.kv_cache_dtype)
        num_blocks = cc.num_blocks or max(1, int(cc.kv_cache_memory_gb * 2**30) // per_block)
        self.max_model_len = _max_model_len(mc.max_model_len, hf_config, arch, num_blocks * cc.block_size)
        logger.info(
            "model %s (%s, %s on %s): %d KV blocks of %d tokens (%.2f GB, %s), context %d",
            files.name, arch.architecture, self.dtype, self.device, num_blocks, cc.block_size,
            num_blocks * per_block / 2**30, "int8" if cc.kv_cache_dtype == "int8" else "model dtype",
            self.max_model_len,
        )  # fmt: skip
        graph_plan = plan_decode_graphs(
            device=self.device, enforce_eager=mc.enforce_eager, max_num_seqs=config.scheduler.max_num_seqs,
            cuda_graph_max_batch=mc.cuda_graph_max_batch, max_model_len=self.max_model_len,
            block_size=cc.block_size, quantization=mc.quantization,
        )  # fmt: skip
        self.runner = ModelRunner(
            hf_config, load_state_dict(files), dtype=self.dtype, device=self.device,
            block_size=cc.block_size, num_blocks=num_blocks, attention_backend=mc.attention_backend,
            quantization=mc.quantization, graph_plan=graph_plan, kv_cache_dtype=cc.kv_cache_dtype,
        )  # fmt: skip
        self.block_manager = BlockManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        ops = self.runner.model.ops
        self.sampler = Sampler(
            self.vocab_size, seed=mc.seed, argmax=ops.argmax, top_p_cut=ops.top_p_cut, sample_rows=ops.sample_rows
        )

        self.requests: dict[str, list[Request]] = {}
        self._detokenizers: dict[tuple[str, int], IncrementalDetokenizer] = {}
        self._prompt_logprobs: dict[tuple[str, int], list[TokenLogprob | None]] = {}
        self._pending: list[RequestOutput] = []  # aborts, reported by the next step
        self.prompt_tokens = 0
        self.generation_tokens = 0

    # ---- requests -----------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        max_tokens = self._validate(prompt_token_ids, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        choices: list[Request] = []
        for index in range(params.n):
            request = Request(
                request_id=request_id,
                prompt_token_ids=list(prompt_token_ids),
                sampling_params=params,
                eos_token_ids=self.eos_token_ids,
                index=index,
                max_tokens=max_tokens,
                arrival_time=arrival,
                leader=choices[0] if choices else None,
            )
            choices.append(request)
            self._detokenizers[request.key] = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
            )  # fmt: skip
            self.scheduler.add(request)
        self.requests[request_id] = choices

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Checks what SamplingParams cannot check alone; returns the resolved max_tokens."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("prompt must contain at least one token")
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        bad_bias = [t for t in params.logit_bias if t >= self.vocab_size]
        if bad_bias:
            raise ValueError(f"logit_bias token ids must be < vocab size {self.vocab_size}, got {bad_bias[:5]}")
        if num_prompt >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt} tokens, but the context window is {self.max_model_len} tokens "
                "and at least one must be left for the completion"
            )
        if params.max_tokens is None:
            return self.max_model_len - num_prompt
        if num_prompt + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens too large: the context window is {self.max_model_len} tokens, but the request "
                f"asks for {num_prompt + params.max_tokens} ({num_prompt} prompt + {params.max_tokens} max_tokens)"
            )
        return params.max_tokens

    def abort(self, request_id: str) -> None:
        """Stop every choice of the request; its blocks are free before the next forward."""
        for request in self.requests.pop(request_id, []):
            if request.is_finished:
                continue
            self.scheduler.abort(request)
            self._pending.append(self._finished_output(request, "", []))
            self._release(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=bm.usage,
            num_blocks=bm.num_blocks,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
        )

    # ---- the step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        try:
            result = self.runner.execute(sched.seqs, self.block_manager.block_tables)
            self.scheduler.update_after_step(sched)
            sampled = None
            if result.logits is not None:
                sampled = self.sampler.sample(result.logits, [s.request for s in result.sampling_seqs])
        except Exception as exc:  # a broken batch must not take the engine down with it
            logger.exception("step failed; failing its %d sequences", len(sched.seqs))
            outputs.extend(self._fail(sched, f"{type(exc).__name__}: {exc}"))
            return outputs
        self.prompt_tokens += sum(
            max(0, min(s.start + s.num_new_tokens, s.request.num_prompt_tokens) - s.start) for s in sched.seqs
        )
        self._collect_prompt_logprobs(result)
        if sampled is None:
            return outputs
        now = time.monotonic()
        for seq, token_id, logprob in zip(result.sampling_seqs, sampled.token_ids, sampled.logprobs, strict=True):
            outputs.append(self._append(seq.request, token_id, logprob, now))
        return outputs

    def _append(self, request: Request, token_id: int, logprob: TokenLogprob | None, now: float) -> RequestOutput:
        request.append_token(token_id)
        self.generation_tokens += 1
        first = request.first_token_time is None
        if first:
            request.first_token_time = now
        detok = self._detokenizers[request.key]
        stopped = request.check_token_stop()
        # The token that stopped generation (EOS, a stop token id) is not shown as text.
        update = detok.update([] if stopped and request.status == RequestStatus.FINISHED_STOPPED else [token_id])
        text = update.text
        if update.stop is not None and not stopped:
            request.status, request.stop_reason, stopped = RequestStatus.FINISHED_STOPPED, update.stop, True
        elif stopped:
            text += detok.flush()
        out = RequestOutput(
            request_id=request.request_id,
            index=request.index,
            new_token_ids=[token_id],
            new_text=text,
            new_logprobs=[logprob] if logprob is not None else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=request.num_output_tokens,
            prompt_logprobs=self._prompt_logprobs.pop(request.key, None) if first else None,
        )
        if stopped:
            out.finished, out.finish_reason, out.stop_reason = True, request.status.finish_reason, request.stop_reason  # type: ignore[assignment]
            self.scheduler.finish(request, request.status)
            self._release(request)
        return out

    def _collect_prompt_logprobs(self, result: StepResult) -> None:
        for key, chunk in result.prompt_logits.items():
            request = next(r for r in self.requests[key[0]] if r.index == key[1])
            collected = self._prompt_logprobs.setdefault(key, [None])
            if len(collected) >= request.num_prompt_tokens:
                continue  # recomputed after a preemption: already have them
            first = chunk.first_position
            targets = request.prompt_token_ids[first + 1 : first + 1 + chunk.logits.shape[0]]
            k = request.sampling_params.prompt_logprobs or 0
            collected.extend(Sampler.prompt_logprobs(chunk.logits, targets, k))

    def _fail(self, sched: SchedulerOutput, message: str) -> list[RequestOutput]:
        outputs = []
        for seq in sched.seqs:
            request = seq.request
            if request.is_finished:
                continue
            self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
            out = self._finished_output(request, "", [])
            out.error = message
            outputs.append(out)
            self._release(request)
        return outputs

    def _finished_output(self, request: Request, text: str, token_ids: list[int]) -> RequestOutput:
        assert request.is_finished
        return RequestOutput(
            request_id=request.request_id, index=request.index, new_token_ids=token_ids, new_text=text,
            finished=True, finish_reason=request.status.finish_reason,  # type: ignore[arg-type]
            num_prompt_tokens=request.num_prompt_tokens, num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=request.num_output_tokens,
        )  # fmt: skip

    def _release(self, request: Request) -> None:
        """Forget per-sequence state once a choice is finished; the id once all its choices are."""
        self._detokenizers.pop(request.key, None)
        self._prompt_logprobs.pop(request.key, None)
        self.sampler.free(request.key)
        choices = self.requests.get(request.request_id)
        if choices is not None and all(r.is_finished for r in choices):
            del self.requests[request.request_id]

    # ---- convenience --------------------------------------------------------------------

    def run_to_completion(self) -> list[RequestOutput]:
        """Step until nothing is left (offline use); returns every output in order."""
        outputs: list[RequestOutput] = []
        while self.has_unfinished_requests():
            outputs.extend(self.step())
        return outputs


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _max_model_len(asked: int | None, hf_config: object, arch: LlamaArch, pool_tokens: int) -> int:
    limit = arch.max_position_embeddings
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        limit = min(limit, window)  # no sliding-window attention here: stay inside one window
    if asked is not None and asked > limit:
        raise ValueError(f"max_model_len {asked} exceeds the model's context of {limit} tokens")
    # One sequence must fit in the pool on its own, or it could never finish.
    return min(asked or limit, pool_tokens)


def _eos_token_ids(hf_config: object, tokenizer: object, path: object) -> frozenset[int]:
    ids: set[int] = set()
    from pathlib import Path

    gen_path = Path(str(path)) / "generation_config.json"
    if gen_path.exists():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    eos = getattr(hf_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(tok_eos)
    return frozenset(ids)
