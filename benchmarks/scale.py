"""Scale-out: the tiny chat model served by one process, and by Ray Serve with 1 and 2 replicas.

Each setup gets the same load: `--requests` streamed chat completions through the OpenAI endpoint,
`--concurrency` at a time, sampled with a per-request seed and `--max-tokens` each. Reported per
setup: output tokens/s, mean time per output token (TPOT, between streamed chunks after the first)
and mean time to first token. Ray's overhead is its TPOT over the one-process TPOT. On Ray the
replicas share the machine's 2 CPUs (`num_cpus` 2 for one replica, 1 each for two: Ray sets
their torch threads from it) with the ingress, the HTTP proxy and Serve's controller.

    python -m benchmarks.scale --requests 64 --concurrency 16

Saves JSON and a PNG under benchmarks/results/. On a small shared CPU the figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import device_label

KEY = "sk-bench"
MODEL = """
models:
  ember/tiny-chat:
    versions:
      - weights: demo:tiny-chat
        dtype: float32
        placement: cpu
        limits: {{max_num_seqs: 32, kv_cache_bytes: 67108864, max_model_len: 512}}
        scale: {{replicas: {replicas}, num_cpus: {cpus}, max_ongoing_requests: 32}}
"""


async def one_request(client: httpx.AsyncClient, index: int, max_tokens: int) -> dict:
    body = {"model": "ember/tiny-chat", "stream": True, "max_tokens": max_tokens, "temperature": 1.0,
            "seed": index, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Tell a story about the number {index}."}]}
    start, stamps, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    tpot = (stamps[-1] - stamps[0]) / (tokens - 1) if len(stamps) > 1 and tokens > 1 else None
    return {"tokens": tokens, "ttft": stamps[0] - start if stamps else None, "tpot": tpot}


async def load(url: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as client:
        await one_request(client, -1, 4)  # warm-up

        async def bounded(index: int) -> dict:
            async with limit:
                return await one_request(client, index, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        elapsed = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"tokens": tokens, "seconds": round(elapsed, 3), "tok_s": round(tokens / elapsed, 1),
            "tpot_ms": round(1000 * statistics.mean(r["tpot"] for r in results if r["tpot"]), 2),
            "ttft_ms": round(1000 * statistics.mean(r["ttft"] for r in results if r["ttft"]), 1)}


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up")


def one_process(home: Path, port: int, args) -> dict:
    env = {**os.environ, "EMBER_HOME": str(home), "EMBER_MODELS": str(home / "models.yaml"), "EMBER_API_KEYS": KEY}
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--log-level",
                               "warning"], env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        return asyncio.run(load(f"http://127.0.0.1:{port}", args.requests, args.concurrency, args.max_tokens))
    finally:
        server.terminate()
        server.wait()


def on_ray(home: Path, port: int, args, replicas: int) -> dict:
    import ray
    from ray import serve

    from server.ray_serve import APP_NAME, build_app
    from server.settings import Settings

    (home / "models.yaml").write_text(MODEL.format(replicas=replicas, cpus=2 // replicas))
    settings = Settings(home=home, models=home / "models.yaml", port=port, api_keys=[KEY])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ember-ray-"))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        return asyncio.run(load(f"http://127.0.0.1:{port}", args.requests, args.concurrency, args.max_tokens))
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8741)
    parser.add_argument("--tag", default="", help="appended to the result file names")
    args = parser.parse_args()

    from engine.demo import ensure_demo_models

    home = Path(tempfile.mkdtemp(prefix="ember-scale-"))
    ensure_demo_models(home)
    (home / "models.yaml").write_text(MODEL.format(replicas=1, cpus=1))
    figures = {"one process": one_process(home, args.port, args)}
    print("one process", figures["one process"], flush=True)
    for replicas in (1, 2):
        name = f"ray, {replicas} replica{'s' if replicas > 1 else ''}"
        figures[name] = on_ray(home, args.port + replicas, args, replicas)
        print(name, figures[name], flush=True)
    base = figures["one process"]["tpot_ms"]
    summary = {"ray_tpot_overhead_pct": round(100 * (figures["ray, 1 replica"]["tpot_ms"] / base - 1), 1),
               "two_replica_speedup": round(figures["ray, 2 replicas"]["tok_s"] / figures["ray, 1 replica"]["tok_s"], 2)}
    print(summary)
    out = Path(__file__).parent / "results" / "_".join(p for p in ("scale", device_label("cpu"), args.tag) if p)
    settings = {"ray_stream_interval_ms": os.environ.get("EMBER_RAY_STREAM_INTERVAL_MS", "default (20)"),
                "load_average_at_end": os.getloadavg()}
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "settings": settings, "figures": figures,
                                                    **summary}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(list(figures), [f["tok_s"] for f in figures.values()])
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"tiny chat, {args.requests} requests at concurrency {args.concurrency}")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"))
    except ImportError:
        pass


if __name__ == "__main__":
    main()
