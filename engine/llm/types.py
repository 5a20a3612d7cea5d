"""The LLM engine's request and output types: what the server hands in and gets back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from engine.llm.constraints import Constraint

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class SamplingParams:
    """Per-request sampling settings. Every field applies to its own row of the batch only."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy for this request
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, never emitted
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; N >= 0: chosen token plus top-N alternatives
    # None: off; N >= 0: the logprob of every prompt token given its prefix, plus top-N
    # alternatives, on each choice's first delta. Makes max_new_tokens == 0 valid (score only).
    prompt_logprobs: int | None = None
    n: int = 1  # completions sampled from one shared prompt


@dataclass
class GenerationRequest:
    """One prompt to complete. `request_id` is the handle for `abort`."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0  # lower runs first; FIFO within a priority
    # Optional constrained decoding (JSON output, forced tool calls): `factory(choice_index)` returns
    # one constraint per choice with `allowed_token_mask(vocab_size) -> BoolTensor | None` (True =
    # allowed, None = unrestricted this step), `accept(token_id)` and `is_done()` (True finishes the
    # choice with "stop"). See engine/llm/constraints.py.
    constraint_factory: Callable[[int], Constraint] | None = None


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob)


@dataclass
class GenerationDelta:
    """A piece of one completion. The last delta of each choice has `finish_reason` set;
    every request ends with exactly one final delta per choice."""

    request_id: str
    index: int  # which of the n choices
    text: str  # new text since the previous delta (stop strings already removed)
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far for this choice
    # Only on each choice's first delta, when SamplingParams.prompt_logprobs is set: one entry per
    # prompt token (None for the first, which has no prefix to be predicted from).
    prompt_logprobs: list[TokenLogprob | None] | None = None
