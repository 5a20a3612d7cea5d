"""The LLM engine: continuous batching over a paged KV cache, with per-request sampling.

Split as vLLM V1 splits it: the engine core (core.py) runs the step loop and deals only in token
ids; the output processor (output.py) runs in `generate()` on the caller's event loop and turns ids
into text deltas (detokenization, stop strings, logprob text). The core runs in its own process by
default on CPU (engine_process.py: its loop on that process's main thread, away from the server's
GIL) and in a thread of this process otherwise (`LLMEngineConfig.process`). This module wires them
up and keeps the public API: `generate`, `abort`, `stats`, `close`, plus `memory_bytes` and
`sleep`/`wake` for the model pool, and `alive` (False once an engine process has died).
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from engine.errors import InvalidInput, ModelUnavailable, PromptTooLong, QueueFull
from engine.llm.build import CoreSpec, kv_cache_bytes
from engine.llm.core import CoreRequest
from engine.llm.kv_cache import BlockManager
from engine.llm.output import RequestOutput, TokenTexts
from engine.llm.runner import ModelRunner, kv_bytes_per_token
from engine.llm.scheduler import Scheduler
from engine.llm.types import GenerationDelta, GenerationRequest

logger = logging.getLogger("ember.llm")

CPU_KV_CACHE_BYTES = 256 * 2**20
MAX_LOGPROBS = 20


@dataclass
class LLMEngineConfig:
    block_size: int = 16
    kv_cache_bytes: int | None = None  # explicit budget; None: 256 MiB on CPU, see kv_budget_bytes on CUDA
    gpu_memory_utilization: float = 0.85  # fraction of the device's TOTAL memory this engine may fill
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    max_queue: int = 1024  # generate() raises QueueFull beyond this many waiting
    cuda_graphs: bool = True  # only on CUDA
    # Issue each step before reading the one before it (core.py). None: on CUDA, where the device
    # then works while the host prepares the next step; on CPU there is nothing to overlap.
    async_scheduling: bool | None = None
    # Run the engine core in its own process (True) or in a thread of this one (False). None: a
    # process on CPU, a thread on CUDA (sleep must free the weights' GPU memory, which the server
    # process owns).
    process: bool | None = None
    # Intra-op threads of the loop on CPU; None: see default_cpu_threads.
    cpu_threads: int | None = None


def default_cpu_threads(in_process: bool) -> int:
    """In an engine process: every core torch would use (as vLLM's CPU backend does); the loop runs
    on that process's main thread, where OpenMP regions are cheap. Measured on 2 cores (HTTP, 256 in
    / 128 out): 2 threads there serve 1.2-1.4x the tok/s of the in-process core. On a machine other
    jobs share, a thread that loses its core stalls every OpenMP region, so set `cpu_threads` to
    leave a core free there. In a thread of the server process: 1, because OpenMP regions started
    from a thread other than the process's main thread cost far more (a decode step of 64 rows: 58
    ms from the main thread with 2 threads, 111-119 ms from a second thread with 2, 82-87 ms with 1)."""
    return 1 if in_process else torch.get_num_threads()


def kv_budget_bytes(total: int, free: int, used_by_process: int, utilization: float) -> int:
    """KV cache bytes on a device, as vLLM means `gpu_memory_utilization`: this process may fill
    `utilization` of the device's total memory; what it already holds (weights, workspaces) comes
    out of that share, and the cache never takes more than is actually free."""
    return max(0, min(int(total * utilization) - used_by_process, free))


class LLMEngine:
    def __init__(self, model, tokenizer, config: LLMEngineConfig | None = None):
        self.config = config or LLMEngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = self.config
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.num_blocks = self._num_blocks(model, self.device, self.dtype)
        text_config = model.config.get_text_config()
        model_len = cfg.max_model_len or getattr(text_config, "max_position_embeddings", None) or 2048
        self.max_model_len: int = min(model_len, self.num_blocks * cfg.block_size)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.eos_token_ids = self._eos_ids(model, tokenizer)
        self.in_process = not (cfg.process if cfg.process is not None else self.device.type == "cpu")
        threads = cfg.cpu_threads if cfg.cpu_threads is not None else default_cpu_threads(self.in_process)
        self.spec = CoreSpec(self.model, cfg, self.num_blocks, self.max_model_len, self.vocab_size,
                             self.eos_token_ids, threads)
        # The output side decodes with its own copy: a fast tokenizer shared across threads raises
        # "Already borrowed" when one thread encodes with truncation/padding while another decodes.
        self._texts = TokenTexts(_private_copy(tokenizer))
        self._asleep = False
        self._parked: dict = {}  # weights parked in host memory while asleep (see engine/residency.py)
        self._started = time.monotonic()
        if self.in_process:
            self.core = self.spec.new_core(thread=True)
        else:
            from engine.llm.engine_process import ProcessCore

            self.core = ProcessCore(self.spec, tokenizer)

    @property
    def alive(self) -> bool:
        """False once the engine process has died: the model pool then loads the version again."""
        return getattr(self.core, "alive", True)

    def _in_process_core(self):
        if not self.in_process:
            raise AttributeError("the engine core runs in its own process (LLMEngineConfig.process)")
        return self.core

    @property
    def runner(self) -> ModelRunner:
        return self._in_process_core().runner

    @property
    def scheduler(self) -> Scheduler:
        return self._in_process_core().scheduler

    @property
    def block_manager(self) -> BlockManager:
        return self._in_process_core().scheduler.bm

    # -- setup ---------------------------------------------------------------------------------

    def _num_blocks(self, model, device: torch.device, dtype: torch.dtype) -> int:
        per_block = kv_bytes_per_token(model, dtype) * self.config.block_size
        budget = self.config.kv_cache_bytes
        if budget is None:
            if device.type == "cuda":
                free, total = torch.cuda.mem_get_info(device)
                # What this process holds is what its live tensors hold: memory the caching
                # allocator keeps from freed tensors (a closed engine's cache) is free for this one.
                allocated = torch.cuda.memory_allocated(device)
                cached = torch.cuda.memory_reserved(device) - allocated
                budget = kv_budget_bytes(total, free + cached, allocated, self.config.gpu_memory_utilization)
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
        if self._asleep:
            raise ModelUnavailable("the LLM engine is asleep")
        if self.core.num_waiting >= self.config.max_queue:
            raise QueueFull(f"more than {self.config.max_queue} requests are waiting")
        state = CoreRequest(request, asyncio.get_running_loop(), asyncio.Queue())
        self.core.add(state)
        output = RequestOutput(request, self._texts)
        core_done: set[int] = set()  # choices the core has ended (its blocks are free)
        try:
            while len(core_done) < state.n:
                for out in await state.queue.get():
                    if out.finish_reason is not None:
                        core_done.add(out.index)
                    delta, stopped_here = output.process(out)
                    if stopped_here:
                        self.core.finish_choice(state, out.index, "stop")
                    if delta is not None:
                        yield delta
        finally:
            if len(core_done) < state.n:
                self.core.abort_request(state)

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed at the next step and its stream ends with "abort"."""
        self.core.abort(request_id)

    def stats(self) -> dict:
        return {
            **self.core.stats(),
            "block_size": self.config.block_size,
            "max_model_len": self.max_model_len,
            "uptime_s": time.monotonic() - self._started,
        }

    def memory_bytes(self) -> dict[str, int]:
        """Device -> bytes this engine holds beyond the weights (KV cache and workspaces), for
        the model pool's per-device budget. Nothing while asleep."""
        if self._asleep:
            return {}
        size = kv_cache_bytes(self.core.runner) if self.in_process else self.core.kv_cache_bytes()
        return {str(self.device): int(size)}

    def sleep(self) -> None:
        """Free the device for another model: weights go to host memory and the KV cache (with its
        prefix cache) is dropped. Only when no request is in flight; `wake` undoes it. Both block
        until the step in progress ends: call them off the event loop (asyncio.to_thread)."""
        if self._asleep:
            return
        if self.in_process:
            self._parked = self.core.call(lambda: self.spec.sleep(self.core))
        else:
            self.core.sleep()
        self._asleep = True

    def wake(self) -> None:
        """Move the weights back and allocate a fresh KV cache (empty prefix cache)."""
        if not self._asleep:
            return
        if self.in_process:
            self.core.call(lambda: self.spec.wake(self.core, self._parked))
            self._parked = {}
        else:
            self.core.wake()
        self._asleep = False

    def close(self) -> None:
        """Stop the core (its thread or its process); requests still in flight end with "abort".
        An in-process core's KV cache, graphs and workspaces are released at once (on a GPU their
        memory goes back to the device), so the next engine's budget is not measured against a
        closed engine's cache; an engine process takes them with it when it exits."""
        self.core.close()
        if self.in_process:
            self.core.runner = None
        if self.device.type == "cuda":
            gc.collect()  # the runner and its graphs refer to each other: free them now, not at some later gc
            torch.cuda.empty_cache()

    # -- validation ----------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> None:
        p = request.params
        prompt = request.prompt_token_ids
        scoring = p.prompt_logprobs is not None
        checks = [
            (len(prompt) > 0, "prompt_token_ids", "the prompt is empty"),
            (all(0 <= t < self.vocab_size for t in prompt), "prompt_token_ids", "a prompt token id is out of range"),
            (p.n >= 1, "n", "n must be at least 1"),
            (p.max_new_tokens >= (0 if scoring else 1), "max_new_tokens",
             "max_new_tokens must be at least 1 (0 only with prompt_logprobs)"),
            (0 <= p.min_new_tokens, "min_new_tokens", "min_new_tokens must be >= 0"),
            (p.temperature >= 0, "temperature", "temperature must be >= 0"),
            (0 < p.top_p <= 1, "top_p", "top_p must be in (0, 1]"),
            (p.top_k >= 0, "top_k", "top_k must be >= 0"),
            (0 <= p.min_p <= 1, "min_p", "min_p must be in [0, 1]"),
            (p.repetition_penalty > 0, "repetition_penalty", "repetition_penalty must be > 0"),
            (p.logprobs is None or 0 <= p.logprobs <= MAX_LOGPROBS, "logprobs",
             f"logprobs must be between 0 and {MAX_LOGPROBS}"),
            (p.prompt_logprobs is None or 0 <= p.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
             f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}"),
            (all(0 <= t < self.vocab_size for t in p.logit_bias), "logit_bias", "a logit_bias token id is out of range"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidInput(message, param=param)
        if len(prompt) + p.max_new_tokens > self.max_model_len:
            raise PromptTooLong(len(prompt), p.max_new_tokens, self.max_model_len)


def _private_copy(tokenizer):
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # noqa: BLE001 - an uncopyable tokenizer is shared, as before
        return tokenizer
