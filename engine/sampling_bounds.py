"""The one authority for sampling-setting bounds.

Every dialect derives its checks from `BOUNDS`, so a value is refused with a 422 at request time in
each of them, before a job exists: the OpenAI request models (`Bound.field`), the Replicate input
schema that each version publishes (`Bound.json_schema`) and Flowise's overrideConfig
(`Bound.check`). Keys are `SamplingParams` field names. Non-finite numbers (NaN, Infinity) are
never a valid setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from engine.errors import InvalidInput


@dataclass(frozen=True)
class Bound:
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # minimum itself is not allowed
    integer: bool = False
    note: str = ""

    def describe(self) -> str:
        low = "" if self.minimum is None else f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
        high = "" if self.maximum is None else f"<= {self.maximum:g}"
        return " and ".join(p for p in (low, high) if p)

    def check(self, value: Any, param: str) -> int | float:
        """`value` as a number within bounds; InvalidInput naming `param` otherwise."""
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value) if not self.integer else _integer(value)
            except (TypeError, ValueError):
                raise InvalidInput(f"{param} must be {kind}, got {value!r}", param=param) from None
        if not math.isfinite(value):
            raise InvalidInput(f"{param} must be a finite number, got {value!r}", param=param)
        if self.integer:
            if value != int(value):
                raise InvalidInput(f"{param} must be {kind}, got {value!r}", param=param)
            value = int(value)
        below = self.minimum is not None and (value <= self.minimum if self.exclusive_minimum
                                              else value < self.minimum)
        above = self.maximum is not None and value > self.maximum
        if below or above:
            raise InvalidInput(f"{param} must be {self.describe()}, got {value!r}", param=param)
        return value

    def json_schema(self, **extra: Any) -> dict:
        """JSON Schema (draft 2020-12) of the setting."""
        schema: dict[str, Any] = {"type": "integer" if self.integer else "number"}
        if self.minimum is not None:
            schema["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.note:
            schema["description"] = self.note
        return {**schema, **extra}

    def field(self, default: Any = None, **extra: Any) -> Any:
        """A pydantic `Field` with these bounds (for request models)."""
        limits: dict[str, Any] = {}
        if self.minimum is not None:
            limits["gt" if self.exclusive_minimum else "ge"] = self.minimum
        if self.maximum is not None:
            limits["le"] = self.maximum
        if not self.integer:
            limits["allow_inf_nan"] = False
        return Field(default, **limits, **extra)


def _integer(value: Any) -> int:
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        raise ValueError(value)
    return int(number)


BOUNDS: dict[str, Bound] = {
    "temperature": Bound(0, 5, note="0 samples greedily"),
    "top_p": Bound(0, 1, exclusive_minimum=True),
    "top_k": Bound(-1, integer=True, note="0 or -1 disables"),
    "min_p": Bound(0, 1),
    "repetition_penalty": Bound(0, 10, exclusive_minimum=True, note="1 disables"),
    "presence_penalty": Bound(-2, 2),
    "frequency_penalty": Bound(-2, 2),
    "max_new_tokens": Bound(1, integer=True),
    "min_new_tokens": Bound(-1, integer=True, note="-1 or 0 disables"),
    "n": Bound(1, 16, integer=True),
    "logprobs": Bound(0, 20, integer=True),
    "seed": Bound(integer=True, note="any integer (taken modulo 2**63)"),
}
SEED_MODULUS = 1 << 63


def engine_seed(seed: int | None) -> int | None:
    """A request's seed as the engine takes it (a non-negative 63-bit integer)."""
    return None if seed is None else seed % SEED_MODULUS


def non_finite_path(value: Any, path: str = "") -> str | None:
    """The path of the first NaN or infinite number inside `value`, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "value"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = non_finite_path(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None
