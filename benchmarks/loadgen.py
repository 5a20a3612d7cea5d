"""A small OpenAI-chat load generator, for hosts where vLLM's `vllm bench serve` is not installed
(a GPU host with no vLLM wheel, say).

It measures what `vllm bench serve --backend openai-chat --dataset-name random --ignore-eos` measures
and reports it under the same keys, so benchmarks/serving.py can use either: prompts are
`input_len` random token ids of the served model's tokenizer decoded to text, each request streams
`/v1/chat/completions` with `max_completion_tokens=output_len` and `ignore_eos`, at most
`concurrency` requests are in flight, all are queued at once (request rate infinite), one warm-up
request runs first. Per request: TTFT (first content chunk), ITL (gaps between content chunks),
TPOT ((latency - TTFT) / (output tokens - 1), output tokens from the final usage chunk), E2E.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def random_prompts(tokenizer, count: int, input_len: int, seed: int) -> list[str]:
    """Texts of random ordinary tokens, re-encoded to about `input_len` tokens (as vLLM's random
    dataset does, the decode/encode round trip may move the length by a token or two)."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    return [tokenizer.decode([rng.choice(ordinary) for _ in range(input_len)]) for _ in range(count)]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, output_len: int) -> RequestResult:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_completion_tokens": output_len, "ignore_eos": True, "temperature": 0.0,
            "stream_options": {"include_usage": True}}
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no usage chunk"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = repr(exc)
    return result


def summarise(results: list[RequestResult], duration: float) -> dict:
    """The result JSON keys of `vllm bench serve` that benchmarks/serving.py reads."""
    done = [r for r in results if r.ok]
    per = {"ttft": [r.ttft * 1e3 for r in done],
           "tpot": [(r.latency - r.ttft) * 1e3 / (r.output_tokens - 1) for r in done if r.output_tokens > 1],
           "itl": [gap * 1e3 for r in done for gap in r.itl],
           "e2el": [r.latency * 1e3 for r in done]}
    out = {"completed": len(done), "failed": len(results) - len(done), "duration": duration,
           "total_output_tokens": sum(r.output_tokens for r in done),
           "output_lens": [r.output_tokens for r in done],
           "errors": sorted({r.error for r in results if r.error})[:5]}
    out["output_throughput"] = out["total_output_tokens"] / duration if duration else 0.0
    for metric, values in per.items():
        stats = (np.mean(values), *np.percentile(values, [50, 99])) if values else (0.0, 0.0, 0.0)
        for name, value in zip(("mean", "median", "p99"), stats):
            out[f"{name}_{metric}_ms"] = float(value)
    return out


async def run(base_url: str, model: str, prompts: list[str], output_len: int, concurrency: int) -> dict:
    url = base_url.rstrip("/") + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        warm = await _one(client, url, model, prompts[0], min(output_len, 8))
        if not warm.ok:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        gate = asyncio.Semaphore(concurrency)

        async def gated(prompt: str) -> RequestResult:
            async with gate:
                return await _one(client, url, model, prompt, output_len)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(p) for p in prompts))
        return summarise(results, time.perf_counter() - start)
