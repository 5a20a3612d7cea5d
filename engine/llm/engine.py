"""The LLM engine: continuous batching over a paged KV cache, with per-request sampling.

`generate()` is an async generator on the caller's event loop; the step loop runs in one
background thread. They talk through two channels only: the inbox (new requests and aborts, a
deque plus an Event to wake the loop) and, per request, an asyncio queue filled through
`loop.call_soon_threadsafe` once per step. All scheduler, block and sequence state is touched by
the loop thread alone.

One step: schedule -> runner (one forward pass) -> sampler -> per-sequence bookkeeping (stop
checks, detokenization, forking n > 1 choices) -> deliver deltas. An exception in the forward pass
or the sampler fails the requests in that step and nothing else.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from engine.errors import InvalidInput, ModelUnavailable, PromptTooLong, QueueFull
from engine.llm.detokenizer import IncrementalDetokenizer
from engine.llm.kv_cache import BlockManager
from engine.llm.runner import ModelRunner, kv_bytes_per_token
from engine.llm.sampler import sample
from engine.llm.scheduler import Scheduler
from engine.llm.sequence import Sequence
from engine.llm.types import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    TokenLogprob,
)

logger = logging.getLogger("ember.llm")

CPU_KV_CACHE_BYTES = 256 * 2**20
MAX_LOGPROBS = 20


@dataclass
class LLMEngineConfig:
    block_size: int = 16
    kv_cache_bytes: int | None = None  # explicit budget; None: 256 MiB on CPU, a share of free memory on CUDA
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    max_queue: int = 1024  # generate() raises QueueFull beyond this many waiting
    cuda_graphs: bool = True  # only on CUDA


@dataclass(eq=False)
class _Request:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: int = 0
    seqs: list[Sequence] = field(default_factory=list)
    done: set[int] = field(default_factory=set)  # choice indices that got their final delta
    forked: bool = False

    @property
    def n(self) -> int:
        return self.request.params.n


class LLMEngine:
    def __init__(self, model, tokenizer, config: LLMEngineConfig | None = None):
        self.config = config or LLMEngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = self.config
        device = next(model.parameters()).device
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        num_blocks = self._num_blocks(model, device, dtype)
        text_config = model.config.get_text_config()
        model_len = cfg.max_model_len or getattr(text_config, "max_position_embeddings", None) or 2048
        self.max_model_len: int = min(model_len, num_blocks * cfg.block_size)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]

        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   admission_reserve_blocks=max(1, num_blocks // 100))
        self.runner = ModelRunner(model, num_blocks, cfg.block_size, cuda_graphs=cfg.cuda_graphs,
                                  max_num_seqs=cfg.max_num_seqs, max_model_len=self.max_model_len)
        self.eos_token_ids = self._eos_ids(model, tokenizer)
        # The loop thread decodes with its own copy: a fast tokenizer shared across threads raises
        # "Already borrowed" when one thread encodes with truncation/padding while another decodes.
        self._detok_tokenizer = _private_copy(tokenizer)
        self._generator = torch.Generator(device=device)
        self._generator.seed()
        self._token_text: dict[int, str] = {}

        self._lock = threading.Lock()  # guards _active (touched by generate() and the loop)
        self._active: dict[str, _Request] = {}
        self._inbox: deque[tuple[str, _Request]] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._next_seq_id = 0
        self._next_arrival = 0
        self._counters: defaultdict[str, int] = defaultdict(int)
        self._pending: dict[_Request, list[GenerationDelta]] = {}  # this step's deltas
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="ember-llm-engine", daemon=True)
        self._thread.start()

    # -- setup ---------------------------------------------------------------------------------

    def _num_blocks(self, model, device: torch.device, dtype: torch.dtype) -> int:
        per_block = kv_bytes_per_token(model, dtype) * self.config.block_size
        budget = self.config.kv_cache_bytes
        if budget is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * self.config.gpu_memory_utilization)
            else:
                budget = CPU_KV_CACHE_BYTES
        return max(1, budget // per_block)

    @staticmethod
    def _eos_ids(model, tokenizer) -> frozenset[int]:
        ids: set[int] = set()
        gen_config = getattr(model, "generation_config", None)
        eos = getattr(gen_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.add(tokenizer.eos_token_id)
        return frozenset(ids)

    # -- public API ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream the request's deltas. Ends after one final delta per choice. Leaving the loop
        early (client gone, task cancelled) aborts the request and frees its blocks."""
        self._validate(request)
        if self._closing:
            raise ModelUnavailable("the LLM engine is shut down")
        if len(self._inbox) + self.scheduler.num_waiting >= self.config.max_queue:
            raise QueueFull(f"more than {self.config.max_queue} requests are waiting")
        state = _Request(request, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request.request_id in self._active:
                raise InvalidInput(f"request id {request.request_id!r} is already running", param="request_id")
            self._active[request.request_id] = state
        self._inbox.append(("add", state))
        self._wake.set()
        finished = 0
        try:
            while finished < state.n:
                for delta in await state.queue.get():
                    if delta.finish_reason is not None:
                        finished += 1
                    yield delta
        finally:
            if finished < state.n:
                self._inbox.append(("abort", state))
                self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed at the next step and its stream ends with "abort"."""
        with self._lock:
            state = self._active.get(request_id)
        if state is not None:
            self._inbox.append(("abort", state))
            self._wake.set()

    def stats(self) -> dict:
        c = self._counters
        return {
            "num_free_blocks": self.block_manager.num_free_blocks,
            "num_total_blocks": self.block_manager.num_blocks,
            "block_size": self.config.block_size,
            "max_model_len": self.max_model_len,
            "running": len(self.scheduler.running),
            "waiting": self.scheduler.num_waiting + len(self._inbox),
            "active_requests": len(self._active),
            "steps": c["steps"],
            "prompt_tokens": c["prompt_tokens"],
            "generation_tokens": c["generation_tokens"],
            "prefix_cache_hit_tokens": self.block_manager.prefix_hit_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "failed_steps": c["failed_steps"],
            "uptime_s": time.monotonic() - self._started,
        }

    def close(self) -> None:
        """Stop the loop thread; requests still in flight end with "abort"."""
        self._closing = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    # -- validation ----------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> None:
        p = request.params
        prompt = request.prompt_token_ids
        checks = [
            (len(prompt) > 0, "prompt_token_ids", "the prompt is empty"),
            (all(0 <= t < self.vocab_size for t in prompt), "prompt_token_ids", "a prompt token id is out of range"),
            (p.n >= 1, "n", "n must be at least 1"),
            (p.max_new_tokens >= 1, "max_new_tokens", "max_new_tokens must be at least 1"),
            (0 <= p.min_new_tokens, "min_new_tokens", "min_new_tokens must be >= 0"),
            (p.temperature >= 0, "temperature", "temperature must be >= 0"),
            (0 < p.top_p <= 1, "top_p", "top_p must be in (0, 1]"),
            (p.top_k >= 0, "top_k", "top_k must be >= 0"),
            (0 <= p.min_p <= 1, "min_p", "min_p must be in [0, 1]"),
            (p.repetition_penalty > 0, "repetition_penalty", "repetition_penalty must be > 0"),
            (p.logprobs is None or 0 <= p.logprobs <= MAX_LOGPROBS, "logprobs",
             f"logprobs must be between 0 and {MAX_LOGPROBS}"),
            (all(0 <= t < self.vocab_size for t in p.logit_bias), "logit_bias", "a logit_bias token id is out of range"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidInput(message, param=param)
        if len(prompt) + p.max_new_tokens > self.max_model_len:
            raise PromptTooLong(len(prompt), p.max_new_tokens, self.max_model_len)

    # -- the loop thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._closing:
            self._drain_inbox()
            if not self.scheduler.has_work():
                self._flush()  # aborts handled in the inbox still owe their final deltas
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception:  # a bug in bookkeeping: fail what is in flight, keep serving
                logger.exception("LLM engine step failed")
                for state in self._active_states():
                    self._fail(state, "internal error in the engine step")
            self._flush()
        self._drain_inbox()
        for state in self._active_states():
            self._end_request(state, "abort")
        self._flush()

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, state = self._inbox.popleft()
            if kind == "abort":
                self._end_request(state, "abort")
                continue
            try:
                self._add(state)
            except Exception as exc:  # e.g. a constraint factory that raises
                logger.exception("could not start request %s", state.request.request_id)
                self._fail(state, f"{type(exc).__name__}: {exc}")

    def _add(self, state: _Request) -> None:
        state.arrival = self._next_arrival
        self._next_arrival += 1
        self.scheduler.add(self._new_seq(state, 0))

    def _new_seq(self, state: _Request, index: int) -> Sequence:
        req, p = state.request, state.request.params
        seq = Sequence(
            seq_id=self._next_seq_id, request_id=req.request_id, index=index,
            token_ids=list(req.prompt_token_ids), num_prompt_tokens=len(req.prompt_token_ids),
            params=p, priority=req.priority, arrival=state.arrival,
            stop_token_ids=frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids),
        )
        self._next_seq_id += 1
        if p.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(p.seed + index)
        if req.constraint_factory is not None:
            seq.constraint = req.constraint_factory(index)
        seq.detokenizer = IncrementalDetokenizer(self._detok_tokenizer, req.prompt_token_ids, p.stop)
        state.seqs.append(seq)
        return seq

    def _step(self) -> None:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return
        self._counters["steps"] += 1
        try:
            logits, sampled, _ = self.runner.execute(batch.seqs, batch.num_tokens)
            result = sample(logits, sampled, self._generator) if sampled else None
        except Exception as exc:
            logger.exception("LLM engine forward/sampling failed")
            self._counters["failed_steps"] += 1
            message = f"{type(exc).__name__}: {exc}"
            for state in {self._active_state(s) for s in batch.seqs} - {None}:
                self._fail(state, message)
            return
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
            if seq.num_computed_tokens <= seq.num_prompt_tokens:
                self._counters["prompt_tokens"] += n
        for i, seq in enumerate(sampled):
            state = self._active_state(seq)
            if state is None or seq.is_finished:
                continue
            try:
                self._append_token(state, seq, result.token_ids[i], result.logprobs[i])
            except Exception as exc:
                logger.exception("LLM engine post-processing failed for %s", seq.request_id)
                self._fail(state, f"{type(exc).__name__}: {exc}")

    def _active_state(self, seq: Sequence) -> _Request | None:
        return self._active.get(seq.request_id)

    def _active_states(self) -> list[_Request]:
        with self._lock:
            return list(self._active.values())

    def _append_token(self, state: _Request, seq: Sequence, token: int, logprob) -> None:
        p = seq.params
        if state.n > 1 and not state.forked:
            self._fork(state, seq)
        seq.token_ids.append(token)
        self._counters["generation_tokens"] += 1
        finish: FinishReason | None = None
        if seq.constraint is not None:
            seq.constraint.accept(token)
        if token in seq.stop_token_ids:
            finish = "stop"
        else:
            seq.detokenizer.add_token(token, check_stop=seq.num_output_tokens >= p.min_new_tokens)
            if seq.detokenizer.stopped or (seq.constraint is not None and seq.constraint.is_done()):
                finish = "stop"
        if finish is None and (seq.num_output_tokens >= p.max_new_tokens or seq.num_tokens >= self.max_model_len):
            finish = "length"
        delta = GenerationDelta(
            request_id=seq.request_id, index=seq.index,
            text=seq.detokenizer.pop_text(final=finish is not None), token_ids=[token],
            logprobs=[self._logprob(token, logprob)] if logprob is not None else [],
            finish_reason=finish, prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
        )
        self._emit(state, delta)
        if finish is not None:
            self.scheduler.finish(seq)
            seq.finish_reason = finish
            self._mark_done(state, seq.index)

    def _fork(self, state: _Request, parent: Sequence) -> None:
        """Start the other n-1 choices once the prompt is in the cache: they share its full blocks
        and recompute only the partial last block (always at least one token, for its logits)."""
        state.forked = True
        shared = min((parent.num_prompt_tokens - 1) // self.config.block_size, len(parent.block_table))
        for index in range(1, state.n):
            child = self._new_seq(state, index)
            self.block_manager.fork(parent, child, shared)
            self.scheduler.add(child)

    def _logprob(self, token: int, logprob: tuple[float, list[tuple[int, float]]]) -> TokenLogprob:
        chosen, top = logprob
        return TokenLogprob(token, self._text_of(token), chosen,
                            [(t, self._text_of(t), lp) for t, lp in top])

    def _text_of(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self._detok_tokenizer.decode([token])
        return text

    # -- ending requests -----------------------------------------------------------------------

    def _fail(self, state: _Request, message: str) -> None:
        self._end_request(state, "error", message)

    def _end_request(self, state: _Request, reason: FinishReason, error: str | None = None) -> None:
        """Finish every choice that has not finished yet (abort, error, shutdown)."""
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = reason
        for index in range(state.n):
            if index in state.done:
                continue
            seq = next((s for s in state.seqs if s.index == index), None)
            self._emit(state, GenerationDelta(
                request_id=state.request.request_id, index=index, text="", token_ids=[],
                finish_reason=reason, error=error, prompt_tokens=len(state.request.prompt_token_ids),
                completion_tokens=seq.num_output_tokens if seq else 0,
            ))
            self._mark_done(state, index)

    def _mark_done(self, state: _Request, index: int) -> None:
        state.done.add(index)
        if len(state.done) == state.n:
            with self._lock:
                if self._active.get(state.request.request_id) is state:
                    del self._active[state.request.request_id]

    # -- delivery ------------------------------------------------------------------------------

    def _emit(self, state: _Request, delta: GenerationDelta) -> None:
        self._pending.setdefault(state, []).append(delta)

    def _flush(self) -> None:
        """Hand this step's deltas to their event loops: one wake-up per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for state, deltas in self._pending.items():
            by_loop[state.loop].append((state.queue, deltas))
        self._pending = {}
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                for queue, _ in items:
                    for state in [s for s in self._active_states() if s.queue is queue]:
                        self._end_request(state, "abort")
                self._pending = {}



def _private_copy(tokenizer):
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # noqa: BLE001 - an uncopyable tokenizer is shared, as before
        return tokenizer


def _deliver(items: list[tuple[asyncio.Queue, list[GenerationDelta]]]) -> None:
    for queue, deltas in items:
        queue.put_nowait(deltas)
