"""What an engine core is built from, and building it: in the server process (in-process mode) or
in the engine process, from the same picklable `CoreSpec`.

The spec holds the loaded model (its CPU tensors travel to the engine process through shared
memory, so loading, placement and memory accounting stay in the model pool) and the sizes the
facade computed from it; the runner, KV cache, scheduler and sampler are built where the loop runs.
Sleeping drops the runner (its KV cache and workspaces) and parks GPU weights; waking builds a
fresh runner and scheduler, so the prefix cache starts empty.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.llm.core import EngineCore, Sink
from engine.llm.kv_cache import BlockManager
from engine.llm.runner import ModelRunner
from engine.llm.scheduler import Scheduler
from engine.residency import park_weights, restore_weights

if TYPE_CHECKING:
    from engine.llm.engine import LLMEngineConfig


@dataclass
class CoreSpec:
    model: torch.nn.Module
    config: LLMEngineConfig
    num_blocks: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    cpu_threads: int | None  # intra-op threads of the loop's thread on CPU (None: torch's default)

    def new_runner(self) -> ModelRunner:
        cfg = self.config
        return ModelRunner(self.model, self.num_blocks, cfg.block_size, cuda_graphs=cfg.cuda_graphs,
                           max_num_seqs=cfg.max_num_seqs, max_model_len=self.max_model_len,
                           max_num_batched_tokens=cfg.max_num_batched_tokens)

    def new_scheduler(self) -> Scheduler:
        cfg = self.config
        block_manager = BlockManager(self.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        return Scheduler(block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                         admission_reserve_blocks=max(1, self.num_blocks // 100))

    def new_core(self, *, thread: bool, sink: Sink | None = None) -> EngineCore:
        runner = self.new_runner()
        overlap = self.config.async_scheduling
        if overlap is None:
            overlap = runner.device.type == "cuda"
        return EngineCore(runner, self.new_scheduler(), eos_token_ids=self.eos_token_ids,
                          max_model_len=self.max_model_len, block_size=self.config.block_size,
                          vocab_size=self.vocab_size, cpu_threads=self.cpu_threads, sink=sink, thread=thread,
                          async_scheduling=overlap)

    def sleep(self, core: EngineCore) -> dict[int, Any]:
        """Free the KV cache and park GPU weights; on the loop's thread, between steps."""
        if core.num_active:
            raise RuntimeError("cannot sleep while requests are running")
        core.settle()
        core.runner = None
        gc.collect()
        return park_weights([self.model])

    def wake(self, core: EngineCore, parked: dict[int, Any]) -> None:
        restore_weights([self.model], parked)
        core.runner = self.new_runner()
        core.scheduler = self.new_scheduler()


def kv_cache_bytes(runner) -> int:
    """The bytes a runner's KV cache and workspaces hold."""
    size = getattr(runner, "kv_cache_bytes", None)
    if size is None:  # a runner that does not report its cache: count its KV tensor
        return runner.kv.numel() * runner.kv.element_size()
    return int(size() if callable(size) else size)
