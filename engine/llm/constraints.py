"""Constrained decoding protocol.

A request may carry `constraint_factory(choice_index) -> Constraint`. Each step the sampler asks
the choice's constraint which tokens are allowed, masks the rest to -inf for that row only, and
tells it which token was picked. When `is_done()` turns True the choice finishes with "stop".
Grammar engines (JSON schema, tool-call formats) plug in by implementing these three methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Constraint(Protocol):
    def allowed_token_mask(self, vocab_size: int) -> torch.Tensor | None:
        """A bool tensor of shape [vocab_size] (True = allowed), or None for no restriction."""

    def accept(self, token_id: int) -> None:
        """Advance the constraint's state past the sampled token."""

    def is_done(self) -> bool:
        """True once the output is complete; the choice then stops."""


class ForcedTokens:
    """Forces an exact token sequence, then finishes. Useful for forced prefixes and tests."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = list(token_ids)
        self.pos = 0

    def allowed_token_mask(self, vocab_size: int) -> torch.Tensor | None:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.token_ids[self.pos]] = True
        return mask

    def accept(self, token_id: int) -> None:
        if token_id != self.token_ids[self.pos]:
            raise ValueError(f"token {token_id} violates the forced sequence")
        self.pos += 1

    def is_done(self) -> bool:
        return self.pos >= len(self.token_ids)


@dataclass(frozen=True)
class ForcedTokensFactory:
    """`factory(choice_index) -> ForcedTokens`: a plain picklable object, so it can cross to the
    engine process (a lambda cannot)."""

    token_ids: tuple[int, ...]

    def __call__(self, index: int) -> ForcedTokens:
        return ForcedTokens(list(self.token_ids))
