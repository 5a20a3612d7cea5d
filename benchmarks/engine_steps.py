"""Where an LLM engine step's time goes, without HTTP: forward pass, sampling, the rest of the step.

Runs `--concurrency` requests at once through LLMEngine on the offline benchmark's CPU model
(hidden 512, 8 layers, vocab 32k) and times, on the step thread, the runner's forward pass, the
sampler and the whole step; decode-only steps are reported apart. The consumer side (the
event loop turning ids into deltas) is timed too. Figures on a shared machine are noisy.

    python -m benchmarks.engine_steps --concurrency 64 --prompt 256 --output 128
    python -m benchmarks.engine_steps --prompt 1024 --sampling   # temperature, top_p, penalties
    python -m benchmarks.engine_steps --dtype bfloat16 --concurrency 1   # the serving benchmark's dtype
    EMBER_CPU_PACKED_LINEAR=0 python -m benchmarks.engine_steps --dtype bfloat16   # eager nn.Linear
    python -m benchmarks.engine_steps --shape smollm2 --cpu-attention padded   # 30 layers, 9q/3kv heads
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.offline_llm import build_model, build_tokenizer, make_workload


def timed(record: list, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - start)
    return wrapper


def smollm2_shape():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    config.eos_token_id = None
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--shape", choices=["bench", "smollm2"], default="bench",
                        help="bench: hidden 512 x 8 layers; smollm2: SmolLM2-135M's shape (random weights)")
    parser.add_argument("--cpu-attention", choices=["auto", "each", "padded"], default="auto",
                        help="force the CPU attention backend's decode path (auto: its own rule)")
    parser.add_argument("--sampling", action="store_true", help="temperature 0.8, top_p 0.9, repetition 1.1")
    parser.add_argument("--threads", type=int, help="intra-op threads of the step thread (default 1)")
    args = parser.parse_args()

    import torch

    from engine.llm import attention_cpu
    from engine.llm.engine import LLMEngine, LLMEngineConfig
    from engine.llm.types import GenerationRequest, SamplingParams

    if args.cpu_attention != "auto":
        attention_cpu.prefer_padded = lambda *a, choice=args.cpu_attention == "padded": choice
    torch.manual_seed(0)
    model = (build_model("cpu") if args.shape == "bench" else smollm2_shape()).to(getattr(torch, args.dtype))
    tokenizer = build_tokenizer(model.config.vocab_size)
    # The core runs in a thread of this process here (process=False), so its steps can be timed
    # from inside; the serving benchmark measures the engine process.
    engine = LLMEngine(model, tokenizer, LLMEngineConfig(kv_cache_bytes=1024 * 2**20, max_num_seqs=args.concurrency,
                                                         max_num_batched_tokens=2048, process=False,
                                                         cpu_threads=args.threads))
    # The step loop lives on the engine core where there is one, else on the engine itself.
    loop_owner = getattr(engine, "core", engine)
    caller = importlib.import_module(type(loop_owner).__module__)
    forward, sampling, steps, decode_steps = [], [], [], []
    runner = engine.runner
    runner.execute = timed(forward, runner.execute)
    caller.draw = timed(sampling, caller.draw)
    real_run_once = loop_owner.run_once

    def run_once():
        decode = all(s.num_computed_tokens > 0 for s in engine.scheduler.running) and not engine.scheduler.num_waiting
        before = (len(forward), len(sampling), loop_owner.counters["steps"])
        start = time.perf_counter()
        ran = real_run_once()
        elapsed = time.perf_counter() - start
        if loop_owner.counters["steps"] > before[2]:  # a step was issued (and, on CPU, read)
            (decode_steps if decode else steps).append((elapsed, sum(forward[before[0]:]), sum(sampling[before[1]:])))
        return ran

    loop_owner.run_once = run_once
    work = make_workload(args.concurrency, 0, model.config.vocab_size, (args.prompt, args.prompt),
                         (args.output, args.output))
    async def one(i, prompt, n):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=0.0)
        if args.sampling:
            params = SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=0.8, top_p=0.9,
                                    repetition_penalty=1.1, seed=i)
        async for _ in engine.generate(GenerationRequest(f"r{i}", prompt, params)):
            pass

    async def run():
        await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(work)))

    start = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - start
    engine.close()

    def per_step(records):
        if not records:
            return {}
        step, fwd, smp = (1000 * statistics.mean(r[k] for r in records) for k in range(3))
        return {"steps": len(records), "step_ms": step, "forward_ms": fwd, "sample_ms": smp,
                "rest_ms": step - fwd - smp}

    report = {"args": vars(args), "packed_linears": runner.packed_linears, "wall_s": wall,
              "output_tok_s": args.concurrency * args.output / wall,
              "decode_steps": per_step(decode_steps), "other_steps": per_step(steps)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
