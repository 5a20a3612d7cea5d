"""Per-choice state: one `Sequence` per completion the engine is producing.

A request with n choices becomes n sequences. The scheduler, block manager, runner and sampler
all work on sequences; only the engine core knows about requests. Text (detokenization, stop
strings) is not kept here: it belongs to the output side (output.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.llm.constraints import Constraint
    from engine.llm.types import FinishReason, SamplingParams


PLACEHOLDER = -1  # a token id sampled on the device that the host has not read yet


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # choice index within its request
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    priority: int = 0
    arrival: int = 0  # global admission order; with priority, the scheduling key
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # content hashes of full blocks
    num_published_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_runs: int = 0  # runs of consecutive block ids in block_table (1 = contiguous KV)
    region: tuple[int, int] | None = None  # blocks softly reserved for this sequence's growth
    stop_token_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    constraint: Constraint | None = None
    finish_reason: FinishReason | None = None
    # Async scheduling (core.py): tokens sampled for this sequence in steps the host has not read
    # yet. While any is pending it is not admitted again (after a preemption) and, unless the core
    # appended a placeholder for the token (PLACEHOLDER, overwritten when read), not scheduled.
    num_pending_tokens: int = 0
    num_preemptions: int = 0
    # Prompt logprobs being gathered (choice 0 of a request that asked): one entry per prompt
    # token, None for the first; filled chunk by chunk, handed out once the prompt is computed.
    prompt_logprobs: list | None = None

    @property
    def needs_prompt_rows(self) -> bool:
        """True while every prompt row must be computed (prompt logprobs still being gathered):
        such a sequence does not take prefix-cache hits."""
        return self.prompt_logprobs is not None and self.num_computed_tokens < self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Lower runs first: priority, then arrival (FIFO), then choice index."""
        return (self.priority, self.arrival, self.index)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
