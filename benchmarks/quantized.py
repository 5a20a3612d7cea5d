"""bitsandbytes on CUDA: one model folder loaded as bf16, 8-bit and 4-bit through ember's own
registry and loader (`quantization: none | bnb-8bit | bnb-4bit`), each then decoding through the
engine. Reports per variant: the quantized layer types and counts, GPU memory of the weights, load
seconds, batch-1 decode tokens/s (128 tokens after a 32-token prompt) and batch-16 tokens/s, and
how many of the first 32 greedy tokens agree with the bf16 model's.

    python -m benchmarks.quantized                 # the Llama-3-8B-shaped folder serving.py builds
    python -m benchmarks.quantized --model FOLDER  # any HF-format causal LM folder
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_label  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("none", "bnb-8bit", "bnb-4bit")


def load(folder: Path, quantization: str, home: Path):
    from engine.loading import load_text_model
    from engine.registry import load_registry

    text = (f"models:\n  bench/q:\n    versions:\n      - weights: {folder}\n        placement: 'cuda:0'\n"
            f"        dtype: bfloat16\n        quantization: {quantization}\n")
    version = load_registry(home / "models.yaml", home, {}, text=text).resolve("bench/q")
    return load_text_model(version)[:2]


def decode_rates(model, tokenizer, vocab: int) -> dict:
    from engine.llm.engine import LLMEngine, LLMEngineConfig
    from engine.llm.types import GenerationRequest, SamplingParams

    engine = LLMEngine(model, tokenizer, LLMEngineConfig(kv_cache_bytes=4 * 2**30, max_num_seqs=16))

    async def stream(i: int, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        ids, stamps = [], []
        params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        async for delta in engine.generate(GenerationRequest(f"q{i}", prompt, params)):
            ids += delta.token_ids
            stamps.append(time.perf_counter())
        return ids, stamps

    async def batch(size: int, n: int):
        prompts = [[(7 * i + 13 * j) % (vocab - 10) + 10 for j in range(32)] for i in range(size)]
        start = time.perf_counter()
        out = await asyncio.gather(*(stream(i, p, n) for i, p in enumerate(prompts)))
        return out, time.perf_counter() - start

    try:
        asyncio.run(batch(1, 8))  # warm-up
        (single,), _ = asyncio.run(batch(1, 128))
        ids, stamps = single
        many, seconds = asyncio.run(batch(16, 64))
        graphs = engine.runner.graphs is not None and engine.runner.graphs.enabled
    finally:
        engine.close()
    return {"batch1_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "batch16_tok_s": sum(len(i) for i, _ in many) / seconds, "first_tokens": ids[:32],
            "cuda_graphs_on": graphs}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a model folder (default: the serving benchmark's Llama-3-8B shape)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args(argv)
    from benchmarks.serving import build_llama3_8b_folder
    from engine.config import ember_home

    home = ember_home()
    folder = (args.model or build_llama3_8b_folder(home / "bench" / "serving-llama3-8b")).resolve()
    report: dict = {"device": device_label("cuda"), "model": folder.name, "variants": {}}
    for quantization in args.variants:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        model, tokenizer = load(folder, quantization, home)
        loaded = time.perf_counter() - start
        layers = Counter(type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__)
        weights = torch.cuda.memory_allocated() - before
        row = {"load_s": loaded, "weights_gib": weights / 2**30, "linear_layers": dict(layers),
               **decode_rates(model, tokenizer, model.config.vocab_size)}
        reference = report["variants"].get("none", {}).get("first_tokens")
        if reference:
            agree = next((i for i, (a, b) in enumerate(zip(reference, row["first_tokens"])) if a != b),
                         len(reference))
            row["greedy_tokens_agreeing_with_bf16"] = agree
        report["variants"][quantization] = row
        print(f"{quantization:9s} load {loaded:5.1f}s  weights {row['weights_gib']:5.2f} GiB  "
              f"batch-1 {row['batch1_tok_s']:7.1f} tok/s  batch-16 {row['batch16_tok_s']:8.1f} tok/s  "
              f"graphs {row['cuda_graphs_on']}  layers {dict(layers)}", flush=True)
        del model, tokenizer
        gc.collect()
        torch.cuda.empty_cache()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"quantized_{report['device']}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
