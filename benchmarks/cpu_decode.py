"""One CPU decode step's forward, eager nn.Linear against the faster paths, interleaved.

Builds the serving benchmark's model shape (random Llama, hidden 512 x 8 layers, vocab 32k) or
SmolLM2-135M's, and times `ModelRunner.execute` on a decode step of `--rows` sequences at
`--context` tokens each, for each variant in turn, round after round (so a load change on a
shared machine hits every variant alike); prints the median per variant and its ratio to eager.

- eager: nn.Linear as transformers builds it (`EMBER_CPU_PACKED_LINEAR=0` behaviour);
- packed: oneDNN prepacked weights (engine/llm/cpu_linear.py, what the runner does by default for
  bfloat16; forced here for float32 too, to measure it);
- compiled-mlp: eager linears, each decoder layer's MLP through torch.compile (inductor, freezing
  on, dynamic shapes), the part of the model that compiles: the whole forward does not (the paged
  attention is Python, and inductor fails on the model's dynamic shapes), and inductor's freezing
  rejects the packed weights' opaque tensors;
- packed-each / packed-padded: packed, with the native decode-attention kernel off and the PyTorch
  fallback's decode path forced per sequence or padded;
- packed-sdpa: packed, native decode-attention kernel off (the fallback's own rule, `prefer_padded`);
- packed-model-forward: packed, the model's own forward instead of the lean one (cpu_forward.py).
Every variant but those named otherwise runs the engine's defaults: native decode attention, fused
elementwise ops and the lean forward where they apply (compiled-mlp runs the model's forward, so its
compiled MLPs are the ones called).

    python -m benchmarks.cpu_decode --rows 1 16 64 --dtype bfloat16
    python -m benchmarks.cpu_decode --variants packed packed-sdpa packed-model-forward
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.engine_steps import smollm2_shape
from benchmarks.offline_llm import build_model
from engine.llm import attention_cpu

BLOCK_SIZE = 16
ATTENTION = {"packed-each": lambda group, k_cache: False, "packed-padded": lambda group, k_cache: True}
KERNEL_OFF = {"EMBER_CPU_ATTENTION_KERNEL": "0"}
LEAN_OFF = {"EMBER_CPU_LEAN_FORWARD": "0"}
VARIANT_ENV = {"packed-each": KERNEL_OFF, "packed-padded": KERNEL_OFF, "packed-sdpa": KERNEL_OFF,
               "packed-model-forward": LEAN_OFF, "compiled-mlp": LEAN_OFF}


@contextlib.contextmanager
def variant_env(variant: str):
    """The engine switches a variant turns off, set while it is built and while it runs."""
    changes = VARIANT_ENV.get(variant, {})
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def decode_batch(rows: int, context: int, vocab: int):
    from engine.llm.sequence import Sequence
    from engine.llm.types import SamplingParams

    blocks = -(-context // BLOCK_SIZE)
    seqs = []
    for i in range(rows):
        tokens = [(7 * i + t) % vocab for t in range(context)]
        s = Sequence(i, f"r{i}", 0, tokens, context - 1, SamplingParams())
        s.num_computed_tokens = context - 1
        s.block_table = list(range(i * blocks, (i + 1) * blocks))
        seqs.append(s)
    return seqs, rows * blocks


def make_runner(model, variant: str, num_blocks: int):
    from engine.llm import cpu_linear
    from engine.llm.runner import ModelRunner

    os.environ[cpu_linear.ENV_SWITCH] = "1" if variant.startswith("packed") else "0"
    policy, cpu_linear.PACKED_DTYPES = cpu_linear.PACKED_DTYPES, (torch.float32, torch.bfloat16)
    try:
        with variant_env(variant):
            runner = ModelRunner(model, num_blocks, BLOCK_SIZE)
    finally:
        cpu_linear.PACKED_DTYPES = policy
    if variant == "compiled-mlp":
        import torch._inductor.config as inductor

        inductor.freezing = True
        for layer in model.model.layers:
            layer.mlp = torch.compile(layer.mlp, dynamic=True)
    return runner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["bench", "smollm2"], default="bench")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--context", type=int, default=320)
    ap.add_argument("--variants", nargs="+", default=["packed", "packed-sdpa", "packed-model-forward", "eager"],
                    choices=["eager", "packed", "compiled-mlp", "packed-each", "packed-padded", "packed-sdpa",
                             "packed-model-forward"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (the engine's step thread uses 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rule = attention_cpu.prefer_padded
    base = (build_model("cpu") if args.shape == "bench" else smollm2_shape()).to(getattr(torch, args.dtype))
    report = {"args": vars(args), "ms": {}}
    for rows in args.rows:
        seqs, num_blocks = decode_batch(rows, args.context, base.config.vocab_size)
        runners = {v: make_runner(copy.deepcopy(base), v, num_blocks) for v in args.variants}
        times: dict[str, list[float]] = {v: [] for v in args.variants}
        for round_ in range(args.rounds + 2):  # two warm-up rounds (compilation happens there)
            for variant, runner in runners.items():
                attention_cpu.prefer_padded = ATTENTION.get(variant, rule)
                with variant_env(variant):
                    start = time.perf_counter()
                    runner.execute(seqs, [1] * rows)
                    if round_ >= 2:
                        times[variant].append(1000 * (time.perf_counter() - start))
        medians = {v: statistics.median(t) for v, t in times.items()}
        report["ms"][rows] = medians
        ratios = " ".join(f"{v} {m:.2f} ms ({m / medians[args.variants[0]]:.2f}x)" for v, m in medians.items())
        print(f"rows {rows}: {ratios}", flush=True)
        del runners
    print(json.dumps(report))


if __name__ == "__main__":
    main()
