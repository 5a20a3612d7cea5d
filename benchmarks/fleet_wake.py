"""Wake versus cold load, through the real ModelPool.

For each model: a cold load (unloaded -> ready: weights from disk, engine start, KV cache
allocation) and a wake (sleeping -> ready), each repeated and reported as the median, with the
bytes the version holds awake and asleep. On a CPU-only host sleep can only free the KV cache and
workspaces (the weights already live in host memory), so waking is re-allocating and zeroing
that cache; on CUDA sleep also parks the weights in pinned host memory and waking copies them back.

    python -m benchmarks.fleet_wake                  # demo models + an ~80M-parameter Llama
    python -m benchmarks.fleet_wake --device cuda    # the same on cuda:0
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import device_label

RESULTS = Path(__file__).parent / "results"


def models_yaml(placement: str, mid_folder: Path) -> str:
    dtype = "float32" if placement == "cpu" else "bfloat16"
    return f"""
models:
  ember/tiny-chat:
    versions: [{{weights: demo:tiny-chat, placement: "{placement}", dtype: {dtype},
                limits: {{kv_cache_bytes: 67108864, max_model_len: 2048}}}}]
  ember/tiny-i2v:
    versions: [{{weights: demo:tiny-i2v, kind: image-to-video, pipeline_class: I2VGenXLPipeline,
                placement: "{placement}", dtype: float32}}]
  bench/mid-chat:
    versions: [{{weights: {{path: "{mid_folder}"}}, placement: "{placement}", dtype: {dtype},
                limits: {{kv_cache_bytes: 268435456, max_model_len: 2048}}}}]
"""


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure(pool, version, repeats: int) -> dict:
    def acquire_release():
        pool.acquire(version)
        pool.release(version)

    cold, wake, sleep = [], [], []
    awake_bytes = asleep_bytes = {}
    for _ in range(repeats):
        pool.unload(version.id)
        cold.append(timed(acquire_release))
        awake_bytes = dict(pool.state(version).memory)
        sleep.append(timed(lambda: pool.sleep(version.id)))
        asleep_bytes = dict(pool.state(version).memory)
        wake.append(timed(acquire_release))
    pool.unload(version.id)
    cold_s, wake_s = statistics.median(cold), statistics.median(wake)
    return {"model": version.model, "cold_load_s": round(cold_s, 4), "sleep_s": round(statistics.median(sleep), 4),
            "wake_s": round(wake_s, 4), "wake_over_cold": round(wake_s / cold_s, 4),
            "bytes_awake": awake_bytes, "bytes_asleep": asleep_bytes, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--home", type=Path, default=None, help="EMBER_HOME with (or for) the demo models")
    args = parser.parse_args()

    from engine.config import ember_home
    from engine.demo import build_tiny_chat, ensure_demo_models
    from engine.engine import EngineOptions, build_worker
    from engine.loading import ModelPool
    from engine.registry import load_registry

    home = args.home or ember_home()
    folders = ensure_demo_models(home)
    placement = "cpu" if args.device == "cpu" else "cuda:0"
    with tempfile.TemporaryDirectory() as scratch:
        mid = build_tiny_chat(Path(scratch) / "mid-chat", hidden_size=1024, num_layers=8)
        registry = load_registry(Path(scratch) / "m.yaml", Path(scratch), folders,
                                 text=models_yaml(placement, mid))
        pool = ModelPool(lambda v: build_worker(v, EngineOptions()), budgets={})
        rows = [measure(pool, version, args.repeats) for version in registry.versions()]
    label = device_label(args.device)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"fleet_wake_{label}.json"
    out.write_text(json.dumps({"device": label, "results": rows}, indent=2) + "\n")
    print(f"{'model':<18} {'cold load s':>11} {'sleep s':>8} {'wake s':>8} {'wake/cold':>9}  bytes awake -> asleep")
    for r in rows:
        print(f"{r['model']:<18} {r['cold_load_s']:>11.3f} {r['sleep_s']:>8.4f} {r['wake_s']:>8.4f} "
              f"{r['wake_over_cold']:>9.3f}  {r['bytes_awake']} -> {r['bytes_asleep']}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
