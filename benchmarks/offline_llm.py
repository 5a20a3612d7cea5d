"""Offline LLM throughput: ember's engine against three ways of running transformers.

All four run in this one process, on the same random-weight model and the same workload:
  ember           LLMEngine, every request submitted at once
  sequential      model.generate, one request at a time
  padded batch    model.generate on batches of 16 in arrival order, left padding; each batch runs
                  to its longest output, only the tokens each request asked for are counted
  generate_batch  transformers' continuous batching (the manager behind model.generate_batch, fed
                  per-request max_new_tokens, which generate_batch itself cannot take)

Workload: prompts of 16-256 tokens and outputs of 8-256 tokens drawn with a fixed seed, EOS
ignored. Throughput = output tokens / wall time; the median of --repeats runs is reported.
Also measured: batch-1 decode tokens/s, with the memory-bandwidth roofline (weights bytes per token
vs. a measured device copy bandwidth), which is the meaningful yardstick on a GPU.

    python -m benchmarks.offline_llm               # CPU, the full workload (about 10 min on 2 cores)
    python -m benchmarks.offline_llm --quick       # a few minutes
    python -m benchmarks.offline_llm --device cuda # Llama-3-8B shape, bf16
    python -m benchmarks.offline_llm --fragment    # fresh vs fragmented block pool, same probe

--fragment measures one engine twice on a 64-request probe: once fresh, and once (same shapes,
other tokens, so no prefix-cache hits) after mixed streaming traffic (varied prompt and output
lengths, staggered arrivals, a third of the requests aborted part-way) went through its block
pool, printing both side by side with the mean number of block runs per sequence (1 = contiguous).
A smaller --kv-cache-mib puts the pool under pressure, where contexts do get scattered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/offline_llm.py` too

from benchmarks.common import device_label

# -- model, tokenizer, workload ------------------------------------------------------------------

def build_model(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if device == "cuda":  # Llama-3-8B shape
        config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                             rope_theta=500000.0)
        dtype = torch.bfloat16
    else:
        config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
        dtype = torch.float32
    config.eos_token_id = None
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer over the whole vocabulary, so every sampled id decodes to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0")


def make_workload(num_requests: int, seed: int, vocab: int, prompt_range, output_range):
    rng = random.Random(seed)
    work = []
    for _ in range(num_requests):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(*prompt_range))]
        work.append((prompt, rng.randint(*output_range)))
    return work


def set_attention(model, name: str) -> None:
    model.set_attn_implementation(name)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- the four contenders -------------------------------------------------------------------------

def run_ember(model, tokenizer, work, args, async_scheduling: bool | None = None) -> tuple[int, float, dict]:
    from engine.llm.engine import LLMEngine, LLMEngineConfig
    from engine.llm.types import GenerationRequest, SamplingParams

    config = LLMEngineConfig(kv_cache_bytes=args.kv_cache_mib * 2**20 if args.device == "cpu" else None,
                             max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batch_tokens,
                             async_scheduling=async_scheduling)
    engine = LLMEngine(model, tokenizer, config)

    async def one(i, prompt, n):
        count = 0
        params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        async for delta in engine.generate(GenerationRequest(f"r{i}", prompt, params)):
            count += len(delta.token_ids)
        return count

    async def main():
        return await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(work)))

    try:
        start = time.perf_counter()
        tokens = sum(asyncio.run(main()))
        sync(args.device)
        elapsed = time.perf_counter() - start
        stats = engine.stats()
    finally:
        engine.close()
    set_attention(model, "sdpa")
    return tokens, elapsed, stats


@torch.inference_mode()
def run_sequential(model, work, args) -> tuple[int, float]:
    tokens = 0
    start = time.perf_counter()
    for prompt, n in work:
        ids = torch.tensor([prompt], device=args.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
        tokens += out.shape[1] - len(prompt)
    sync(args.device)
    return tokens, time.perf_counter() - start


@torch.inference_mode()
def run_padded(model, work, args, batch_size: int = 16) -> tuple[int, float]:
    tokens = 0
    start = time.perf_counter()
    for b in range(0, len(work), batch_size):
        chunk = work[b:b + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=args.device)
        longest = max(n for _, n in chunk)
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False)
        tokens += sum(n for _, n in chunk)  # what the requests asked for; the rest is padding waste
    sync(args.device)
    return tokens, time.perf_counter() - start


@torch.inference_mode()
def run_generate_batch(model, work, args) -> tuple[int, float]:
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb_kwargs = {"max_batch_tokens": args.max_batch_tokens, "max_requests_per_batch": args.max_num_seqs}
    if args.device == "cpu":  # its default sizing takes 90% of RAM; give it ember's KV budget
        per_token = 2 * model.config.num_hidden_layers * model.config.hidden_size * 4
        cb_kwargs["num_blocks"] = max(8, args.kv_cache_mib * 2**20 // (per_token * 256))
    cb_config = ContinuousBatchingConfig(**cb_kwargs)
    start = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gen_config, continuous_batching_config=cb_config,
                                                   warmup=False) as manager:
        for i, (prompt, n) in enumerate(work):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
        tokens, done = 0, 0
        while done < len(work):
            result = manager.get_result(timeout=60)
            if result is None:
                raise RuntimeError("transformers' continuous batching stalled")
            if result.is_finished():
                done += 1
                tokens += len(result.generated_tokens)
    sync(args.device)
    elapsed = time.perf_counter() - start
    set_attention(model, "sdpa")
    return tokens, elapsed


# -- fresh vs fragmented block pool -------------------------------------------------------------

async def _stream(engine, request_id, prompt, n, stop_after=None) -> int:
    from engine.llm.types import GenerationRequest, SamplingParams

    count = 0
    params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    async for delta in engine.generate(GenerationRequest(request_id, prompt, params)):
        count += len(delta.token_ids)
        if stop_after is not None and count >= stop_after:
            engine.abort(request_id)
    return count


def mixed_traffic(engine, vocab: int, seed: int, num_requests: int) -> None:
    """Streaming requests of varied lengths arriving over time; a third abort part-way."""
    rng = random.Random(seed)

    async def one(i):
        await asyncio.sleep(rng.random() * 2.0)
        prompt = [rng.randrange(1, vocab) for _ in range(rng.choice((8, 40, 150, 400)) + rng.randint(0, 30))]
        n = rng.randint(1, 160)
        stop_after = rng.randint(1, n) if i % 3 == 0 else None
        await _stream(engine, f"mix{seed}-{i}", prompt, n, stop_after)

    async def main():
        await asyncio.gather(*(one(i) for i in range(num_requests)))

    asyncio.run(main())


def table_runs(table: list[int]) -> int:
    return sum(1 for i, b in enumerate(table) if i == 0 or table[i - 1] + 1 != b)


def run_probe(engine, work, label) -> tuple[int, float, float]:
    """Output tokens, seconds, and the mean number of block runs per sequence over its steps
    (1 = every context in consecutive blocks)."""
    runs, rows = [0], [0]
    execute = engine.runner.execute

    def counting(seqs, num_tokens, *rest):
        runs[0] += sum(table_runs(s.block_table) for s in seqs)
        rows[0] += len(seqs)
        return execute(seqs, num_tokens, *rest)

    engine.runner.execute = counting

    async def main():
        return await asyncio.gather(*(_stream(engine, f"{label}-{i}", p, n) for i, (p, n) in enumerate(work)))

    start = time.perf_counter()
    try:
        tokens = sum(asyncio.run(main()))
        sync(engine.runner.device.type)
    finally:
        engine.runner.execute = execute
    return tokens, time.perf_counter() - start, runs[0] / max(rows[0], 1)


def fragment_benchmark(model, tokenizer, args) -> dict:
    from engine.llm.engine import LLMEngine, LLMEngineConfig

    # In-process core: the probe counts block runs inside the runner.
    config = LLMEngineConfig(kv_cache_bytes=args.kv_cache_mib * 2**20 if args.device == "cpu" else None,
                             max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batch_tokens,
                             process=False)
    probe = make_workload(64, args.seed, model.config.vocab_size, (128, 256), (16, 32) if args.quick else (64, 128))
    # Warm-up on a throwaway engine: the first pass through new GEMM/attention shapes pays one-off
    # costs (measured ~2x slower) that would otherwise land on the fresh run only.
    warm = LLMEngine(model, tokenizer, config)
    try:
        run_probe(warm, [([t % (model.config.vocab_size - 2) + 2 for t in p], n) for p, n in probe], "warm")
    finally:
        warm.close()
    engine = LLMEngine(model, tokenizer, config)
    try:
        fresh = run_probe(engine, probe, "fresh")
        for wave in range(1 if args.quick else 4):
            mixed_traffic(engine, model.config.vocab_size, seed=wave, num_requests=64 if args.quick else 96)
        # the same shapes with other tokens: the fresh run's prompts must not be prefix-cache hits
        shifted = [([t % (model.config.vocab_size - 1) + 1 for t in p], n) for p, n in probe]
        fragmented = run_probe(engine, shifted, "fragmented")
    finally:
        engine.close()
    set_attention(model, "sdpa")
    report = {"fresh_tok_s": fresh[0] / fresh[1], "fragmented_tok_s": fragmented[0] / fragmented[1],
              "mean_block_runs_fresh": fresh[2], "mean_block_runs_fragmented": fragmented[2],
              "num_blocks": engine.block_manager.num_blocks}
    report["fragmented_over_fresh"] = report["fragmented_tok_s"] / report["fresh_tok_s"]
    print(f"\n{'pool':12s} {'tok/s':>9s} {'block runs per sequence':>24s}")
    print(f"{'fresh':12s} {report['fresh_tok_s']:9.1f} {fresh[2]:24.2f}")
    print(f"{'fragmented':12s} {report['fragmented_tok_s']:9.1f} {fragmented[2]:24.2f}")
    print(f"fragmented / fresh = {report['fragmented_over_fresh']:.2f} "
          f"({report['num_blocks']} blocks of {config.block_size} tokens)")
    return report


# -- batch-1 decode and roofline -----------------------------------------------------------------

def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = 2**28 if device == "cuda" else 2**26
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * n * 10 / (time.perf_counter() - start)


def ember_batch1(model, tokenizer, args, new_tokens: int, prompt: list[int], async_scheduling: bool | None) -> float:
    """ember's decode tokens/s for one request, after a warm-up request."""
    from engine.llm.engine import LLMEngine, LLMEngineConfig
    from engine.llm.types import GenerationRequest, SamplingParams

    engine = LLMEngine(model, tokenizer, LLMEngineConfig(
        kv_cache_bytes=64 * 2**20 if args.device == "cpu" else 2**30, async_scheduling=async_scheduling))

    async def main():
        stamps = []
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        async for _ in engine.generate(GenerationRequest("b1", prompt, params)):
            stamps.append(time.perf_counter())
        return stamps

    try:
        asyncio.run(main())  # warm-up
        stamps = asyncio.run(main())
    finally:
        engine.close()
    set_attention(model, "sdpa")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def batch1_decode(model, tokenizer, args) -> dict:
    new_tokens = 64 if args.quick else 128
    prompt = list(range(1, 33))
    ember = ember_batch1(model, tokenizer, args, new_tokens, prompt, None)
    # On CUDA the default is async scheduling; the same request with each step read before the
    # next is issued shows what the overlap is worth.
    sync_steps = (ember_batch1(model, tokenizer, args, new_tokens, prompt, False)
                  if args.device == "cuda" and "ember_sync" not in args.skip else None)

    with torch.inference_mode():
        ids = torch.tensor([prompt], device=args.device)
        model.generate(ids, max_new_tokens=4, do_sample=False)
        sync(args.device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        sync(args.device)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync(args.device)
        t2 = time.perf_counter()
    hf = (new_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9)

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(args.device)
    roofline = bandwidth / weight_bytes
    return {"ember_tok_s": ember, "ember_sync_steps_tok_s": sync_steps, "hf_generate_tok_s": hf,
            "weight_bytes": weight_bytes,
            "copy_bandwidth_GBps": bandwidth / 1e9, "roofline_tok_s": roofline,
            "ember_fraction_of_roofline": ember / roofline}


# -- driver --------------------------------------------------------------------------------------

def measure(label, fn, repeats):
    runs = []
    for r in range(repeats):
        tokens, elapsed = fn()[:2]
        runs.append(tokens / elapsed)
        print(f"  {label:15s} run {r + 1}: {tokens} tokens in {elapsed:.1f}s = {tokens / elapsed:.1f} tok/s", flush=True)
    return {"tok_s": statistics.median(runs), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="smaller workload, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sequential-subset", type=int, default=16,
                    help="run the sequential baseline on the first N requests only (its rate is extrapolated)")
    ap.add_argument("--kv-cache-mib", type=int, default=1024, help="KV budget on CPU, for ember and generate_batch")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fragment", action="store_true",
                    help="only compare one engine fresh and after mixed traffic fragmented its block pool")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="model dtype (default: "
                    "float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["sequential", "padded", "generate_batch", "batch1", "ember_sync"],
                    help="ember_sync: on CUDA, ember with async scheduling off (run by default beside it)")
    args = ap.parse_args()
    prompt_range, output_range = (16, 256), (8, 256)
    if args.quick:
        args.num_requests = min(args.num_requests, 32)
        args.repeats = 1
        args.sequential_subset = min(args.sequential_subset, 4)
        prompt_range, output_range = (16, 128), (8, 128)

    model = build_model(args.device)
    if args.dtype is not None:
        model.to(getattr(torch, args.dtype))
    tokenizer = build_tokenizer(model.config.vocab_size)
    set_attention(model, "sdpa")
    if args.fragment:
        report = {"device": device_label(args.device), "args": vars(args), "fragment": fragment_benchmark(
            model, tokenizer, args)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = f"fragment_llm_{report['device']}_{args.dtype or 'default'}_kv{args.kv_cache_mib}mib"
        path = RESULTS / f"{name}{'_quick' if args.quick else ''}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"saved {path}")
        return
    work = make_workload(args.num_requests, args.seed, model.config.vocab_size, prompt_range, output_range)
    print(f"device {device_label(args.device)}; {args.num_requests} requests, prompts {prompt_range}, "
          f"outputs {output_range}, {sum(n for _, n in work)} output tokens; repeats {args.repeats}", flush=True)

    warm = work[:2]
    run_ember(model, tokenizer, [(p, 4) for p, _ in warm], args)
    results: dict = {}
    results["ember"] = measure("ember", lambda: run_ember(model, tokenizer, work, args), args.repeats)
    if args.device == "cuda" and "ember_sync" not in args.skip:
        results["ember_sync_steps"] = measure("ember, sync", lambda: run_ember(model, tokenizer, work, args, False),
                                              args.repeats)
    if "sequential" not in args.skip:
        subset = work[:args.sequential_subset]
        run_sequential(model, [(p, 4) for p, _ in warm], args)
        results["sequential"] = measure("sequential", lambda: run_sequential(model, subset, args), args.repeats)
        results["sequential"]["note"] = (f"run on the first {len(subset)} of {len(work)} requests; "
                                         "its tokens/s is taken as the rate for the whole workload")
    if "padded" not in args.skip:
        results["padded_batch"] = measure("padded batch", lambda: run_padded(model, work, args), args.repeats)
    if "generate_batch" not in args.skip:
        results["generate_batch"] = measure("generate_batch", lambda: run_generate_batch(model, work, args),
                                            args.repeats)

    ember = results["ember"]["tok_s"]
    print(f"\n{'method':16s} {'tok/s':>9s} {'ember ratio':>12s}")
    for name, r in results.items():
        r["ember_ratio"] = ember / r["tok_s"]
        print(f"{name:16s} {r['tok_s']:9.1f} {r['ember_ratio']:11.2f}x")

    report = {"device": device_label(args.device), "args": vars(args), "prompt_range": prompt_range,
              "output_range": output_range, "output_tokens": sum(n for _, n in work), "throughput": results}
    if "batch1" not in args.skip:
        report["batch1_decode"] = b1 = batch1_decode(model, tokenizer, args)
        if b1["ember_sync_steps_tok_s"] is not None:
            print(f"\nbatch-1 decode with async scheduling off: {b1['ember_sync_steps_tok_s']:.1f} tok/s")
        print(f"\nbatch-1 decode: ember {b1['ember_tok_s']:.1f} tok/s, transformers generate "
              f"{b1['hf_generate_tok_s']:.1f} tok/s; roofline {b1['roofline_tok_s']:.1f} tok/s "
              f"({b1['weight_bytes'] / 1e9:.2f} GB weights at {b1['copy_bandwidth_GBps']:.1f} GB/s copy bandwidth) "
              f"-> ember at {100 * b1['ember_fraction_of_roofline']:.0f}% of roofline")
    save(report, args)


def save(report: dict, args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"offline_llm_{report['device']}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["throughput"])
    values = [report["throughput"][n]["tok_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, values, color=["#d9534f" if n == "ember" else "#5b7db1" for n in names])
    for bar, name in zip(bars, names):
        ratio = report["throughput"][name]["ember_ratio"]
        label = f"{bar.get_height():.0f}" + ("" if name == "ember" else f"\n(ember {ratio:.1f}x)")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Offline throughput, {report['device']}, {args.num_requests} requests")
    ax.set_ylim(0, max(values) * 1.25)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print(f"saved {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
