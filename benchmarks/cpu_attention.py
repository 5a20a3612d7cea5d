"""The CPU decode attention paths, timed against each other on one layer: the native kernel
(engine/llm/cpu_kernels.py, the default where it builds) and the PyTorch fallback's two paths.

`TorchBackend` (engine/llm/attention_cpu.py) attends a decode group either per sequence over views
of the cache (`attend_each`) or in one padded, masked SDPA call after gathering every context
(`attend_padded`). Which is faster depends on the number of rows, how many query heads share a KV
head and the context length; this sweeps those and prints per-call times and the ratio
padded / each, and which path the backend's rule (`prefer_padded`, fitted to whole steps timed by
benchmarks/cpu_decode.py) picks. Contexts vary uniformly in [ctx * (1 - spread), ctx] (padding is
part of the padded path's cost); blocks are laid out contiguously per sequence ("contiguous", a
fresh server) or shuffled ("scattered", a fragmented pool). One thread, as the engine's step
thread ran before the engine process (`--threads` for more); figures on a shared machine are noisy.
`native_ms` is the kernel's time over the same group (absent where it does not build).

    python -m benchmarks.cpu_attention                       # the default sweep, bfloat16
    python -m benchmarks.cpu_attention --heads 9:3 --rows 16 64 --ctx 256 --dtype float32
    python -m benchmarks.cpu_attention --heads 8:8 --rows 64 --ctx 384 --spread 0.33 --layout scattered \
        --threads 2 --layers 8    # the serving benchmark's decode at concurrency 64, as a step reads it
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from engine.llm import cpu_kernels
from engine.llm.attention import SpanGroup
from engine.llm.attention_cpu import TorchBackend, prefer_padded

BLOCK_SIZE = 16


def make_group(rows: int, ctx: int, kv_heads: int, head_dim: int, layout: str, dtype: torch.dtype,
               spread: float, seed: int = 0):
    rng = random.Random(seed)
    contexts = [rng.randint(max(1, round(ctx * (1 - spread))), ctx) for _ in range(rows)]
    widths = [-(-c // BLOCK_SIZE) for c in contexts]
    num_blocks = sum(widths) + 1
    free = list(range(num_blocks - 1))
    if layout == "scattered":
        rng.shuffle(free)
    tables, at = [], 0
    for w in widths:
        tables.append(free[at:at + w])
        at += w
    width = max(widths)
    padded = torch.tensor([t + [num_blocks - 1] * (width - len(t)) for t in tables], dtype=torch.int32)
    k = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim).to(dtype)
    v = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim).to(dtype)
    group = SpanGroup(0, rows, padded, torch.tensor(contexts, dtype=torch.int32),
                      torch.arange(rows + 1, dtype=torch.int32), 1, host_tables=tables, host_context_lens=contexts)
    return group, k, v


def time_path(path, group, query, caches: list[tuple[torch.Tensor, torch.Tensor]], out, repeats: int) -> float:
    """Median ms per layer of one pass over every layer's (k, v) cache: with one layer its cache is
    still in the CPU's caches from the call before; with a step's worth of layers, as in a step, not."""
    times = []
    for _ in range(repeats):
        group.cache.clear()  # the per-step plan is built once per step and reused by every layer:
        path(group, query, *caches[-1], out, 0.125, None)  # time layers after the first
        start = time.perf_counter()
        for k, v in caches:
            path(group, query, k, v, out, 0.125, None)
        times.append((time.perf_counter() - start) / len(caches))
    return 1000 * statistics.median(times)


def native_path(group, query, k, v, out, scale, window) -> None:
    cpu_kernels.paged_decode(query, k, v, group.block_tables, group.context_lens, out, scale, window)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", nargs="+", default=["8:8", "9:3", "32:8"], help="query heads:kv heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--ctx", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--layout", nargs="+", default=["contiguous", "scattered"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--spread", type=float, default=0.5, help="contexts vary in [ctx * (1 - spread), ctx]")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=1,
                    help="caches of this many layers, attended in turn (8: a step's worth, none of it still cached)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    results = []
    for spec in args.heads:
        heads, kv_heads = map(int, spec.split(":"))
        for layout in args.layout:
            for ctx in args.ctx:
                for rows in args.rows:
                    group, k, v = make_group(rows, ctx, kv_heads, args.head_dim, layout, dtype, args.spread)
                    caches = [(k, v)] + [(torch.randn(k.shape).to(dtype), torch.randn(v.shape).to(dtype))
                                         for _ in range(args.layers - 1)]
                    query = torch.randn(rows, heads, args.head_dim).to(dtype)
                    out = torch.empty_like(query)
                    backend = TorchBackend(dtype, query.device)
                    each = time_path(backend.attend_each, group, query, caches, out, args.repeats)
                    padded = time_path(backend.attend_padded, group, query, caches, out, args.repeats)
                    row = {"heads": heads, "kv_heads": kv_heads, "layout": layout, "ctx": ctx, "spread": args.spread, "rows": rows,
                           "each_ms": round(each, 3), "padded_ms": round(padded, 3),
                           "padded_over_each": round(padded / each, 2),
                           "rule_picks": "padded" if prefer_padded(group, k) else "each"}
                    if cpu_kernels.enabled(dtype):
                        native = time_path(native_path, group, query, caches, out, args.repeats)
                        kv_bytes = 2 * int(group.context_lens.sum()) * kv_heads * args.head_dim * k.element_size()
                        row |= {"native_ms": round(native, 3), "native_over_each": round(native / each, 2),
                                "native_gb_s": round(kv_bytes / native / 1e6, 1)}
                    results.append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
