"""Shared fixtures and helpers for the LLM engine tests (registered in tests/conftest.py).

Models are tiny, random and float32; the tokenizer and chat model come from engine.demo. Every
engine gets its own deep copy of a model, because the engine switches the model to its paged
attention, while reference outputs come from an untouched copy running `model.generate`.

`EMBER_TEST_DEVICE=cuda` (and optionally `EMBER_TEST_DTYPE=bfloat16`) runs the same tests with the
model on a GPU, so the CUDA paths (Triton paged attention, CUDA graphs, pinned staging) are checked
against transformers' own `generate` on that device.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import weakref

import pytest
import torch

from engine.llm.engine import LLMEngine, LLMEngineConfig
from engine.llm.types import GenerationDelta, GenerationRequest, SamplingParams

TEST_DEVICE = torch.device(os.environ.get("EMBER_TEST_DEVICE", "cpu"))
TEST_DTYPE = getattr(torch, os.environ.get("EMBER_TEST_DTYPE", "float32"))


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory):
    from engine.demo import build_tiny_chat

    return build_tiny_chat(tmp_path_factory.mktemp("llm") / "tiny-chat")


@pytest.fixture(scope="session")
def tokenizer(tiny_chat_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_dir)


@pytest.fixture(scope="session")
def llama(tiny_chat_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=TEST_DTYPE).to(TEST_DEVICE).eval()


def assert_idle(engine) -> None:
    """Nothing running or waiting, and every KV block back in the pool."""
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["active_requests"] == 0


SCHEDULING = {"async_scheduling": None}  # make_engine's default; set per test by `both_schedulings`


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def both_schedulings(request):
    """Runs a test once with each step read before the next is issued and once with async
    scheduling (core.py), which on CPU is otherwise off."""
    SCHEDULING["async_scheduling"] = request.param
    yield request.param
    SCHEDULING["async_scheduling"] = None


def make_engine(model, tokenizer, **config) -> LLMEngine:
    config.setdefault("async_scheduling", SCHEDULING["async_scheduling"])
    config.setdefault("kv_cache_bytes", 8 * 2**20)
    config.setdefault("process", False)  # the step loop in a thread: tests reach into the core
    return LLMEngine(copy.deepcopy(model), tokenizer, LLMEngineConfig(**config))


def random_prompts(count: int, vocab: int, seed: int = 0, shared_prefix: int = 40,
                   lengths: tuple[int, int] = (1, 90)) -> list[list[int]]:
    """Prompts of varied lengths; every third one starts with the same 'system prompt'."""
    rng = random.Random(seed)
    system = [rng.randrange(10, vocab) for _ in range(shared_prefix)]
    prompts = []
    for i in range(count):
        body = [rng.randrange(10, vocab) for _ in range(rng.randint(*lengths))]
        prompts.append(system + body if i % 3 == 0 else body)
    return prompts


# Per model object, dropped with it: keyed by id(model), a model built later at a freed model's
# address got that model's answers (the architectures test builds three models for one workload).
_reference_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """What transformers' own generate() produces (greedy, stops at EOS like the engine does)."""
    cache = _reference_cache.setdefault(model, {})
    key = (tuple(prompt), max_new_tokens)
    if key not in cache:
        with torch.inference_mode():
            ids = torch.tensor([prompt], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False)
        cache[key] = out[0, len(prompt):].tolist()
    return cache[key]


async def collect(engine: LLMEngine, request: GenerationRequest) -> dict[int, list[GenerationDelta]]:
    """All deltas of a request, per choice."""
    out: dict[int, list[GenerationDelta]] = {}
    async for delta in engine.generate(request):
        out.setdefault(delta.index, []).append(delta)
    return out


def run_all(engine: LLMEngine, requests: list[GenerationRequest]) -> list[dict[int, list[GenerationDelta]]]:
    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    return asyncio.run(main())


def tokens_of(deltas: list[GenerationDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text_of(deltas: list[GenerationDelta]) -> str:
    return "".join(d.text for d in deltas)


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **kw)


class NothingAllowed:
    """A constraint whose mask allows no token (a grammar that has nowhere to go)."""

    def allowed_token_mask(self, vocab_size):
        return torch.zeros(vocab_size, dtype=torch.bool)

    def accept(self, token_id):
        raise AssertionError("never sampled")

    def is_done(self):
        return False
