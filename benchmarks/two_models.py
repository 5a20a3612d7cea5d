"""Two models on one GPU behind one server: a Llama-3-8B-shaped LLM (bf16, its KV cache bounded) and
a full-size I2VGen-XL (fp16), both random-weight, both loaded at start under the pool's device
budget, then driven together: chat completions stream from the LLM (benchmarks/loadgen.py) while
image-to-video predictions run through the Replicate API. Reports what each served, the LLM's
figures alone and while the video model denoises, the video seconds, and the GPU memory the
pool accounted for each model against what the device shows.

    python -m benchmarks.two_models --steps 25
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import loadgen  # noqa: E402
from benchmarks.common import device_label  # noqa: E402
from benchmarks.serving import (SERVED_NAME, build_llama3_8b_folder, free_port, start_ember, stop,  # noqa: E402
                                wait_ready)
from benchmarks.video import full_size_i2vgen_xl_folder  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VIDEO_NAME = "bench/i2vgen-xl"


def models_yaml(path: Path, llm: Path, video: Path, kv_gib: int) -> None:
    models = {
        SERVED_NAME: {"versions": [{"weights": str(llm), "kind": "text-generation", "dtype": "bfloat16",
                                    "placement": "cuda:0", "load": "eager", "pin": True,
                                    "limits": {"kv_cache_bytes": kv_gib * 2**30, "max_num_seqs": 64}}]},
        VIDEO_NAME: {"versions": [{"weights": str(video), "kind": "image-to-video",
                                   "pipeline_class": "I2VGenXLPipeline", "dtype": "float16", "placement": "cuda:0",
                                   "load": "eager", "pin": True}]},
    }
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))


def image_data_uri() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1280, 704), (180, 90, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def video_prediction(base: str, steps: int, seed: int) -> dict:
    body = {"input": {"image": image_data_uri(), "prompt": "a red balloon drifts over a river", "seed": seed,
                      "num_inference_steps": steps, "max_frames": 16}}
    async with httpx.AsyncClient(base_url=base, timeout=900) as client:
        start = time.perf_counter()
        made = await client.post(f"/v1/models/{VIDEO_NAME}/predictions", json=body)
        made.raise_for_status()
        prediction = made.json()
        while prediction["status"] not in ("succeeded", "failed", "canceled"):
            await asyncio.sleep(0.5)
            prediction = (await client.get(f"/v1/predictions/{prediction['id']}")).json()
        return {"status": prediction["status"], "seconds": time.perf_counter() - start,
                "error": prediction.get("error"), "output": bool(prediction.get("output"))}


async def drive(base: str, prompts: list[str], steps: int) -> dict:
    alone = await loadgen.run(base, SERVED_NAME, prompts, 128, 16)
    together = await asyncio.gather(loadgen.run(base, SERVED_NAME, prompts, 128, 16),
                                    video_prediction(base, steps, seed=1))
    return {"llm_alone": alone, "llm_with_video": together[0], "video": together[1]}


def version_status(base: str, name: str) -> dict:
    """The pool's view of a model's (only) version: its state and the memory charged to it."""
    versions = httpx.get(f"{base}/v1/models/{name}/versions", timeout=30).json()
    version_id = versions["results"][0]["id"]
    return httpx.get(f"{base}/v1/models/{name}/versions/{version_id}/status", timeout=30).json()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--kv-gib", type=int, default=8, help="the LLM's KV cache budget")
    ap.add_argument("--prompts", type=int, default=64)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from engine.config import ember_home

    home = ember_home()
    llm = build_llama3_8b_folder(home / "bench" / "serving-llama3-8b")
    video = full_size_i2vgen_xl_folder("cuda")
    work = Path(tempfile.mkdtemp(prefix="ember-two-models-"))
    models_yaml(work / "models.yaml", llm, video, args.kv_gib)
    port = free_port()
    server = start_ember(work / "models.yaml", work / "home", port, work / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(server, 600)
        print(f"both models loaded, server ready in {ready:.0f}s", flush=True)
        prompts = loadgen.random_prompts(AutoTokenizer.from_pretrained(llm), args.prompts, 256, seed=0)
        result = asyncio.run(drive(base, prompts, args.steps))
        status = {name: version_status(base, name) for name in (SERVED_NAME, VIDEO_NAME)}
        smi = torch.cuda.mem_get_info()
    finally:
        stop(server)
        shutil.rmtree(work, ignore_errors=True)
    a, t, v = result["llm_alone"], result["llm_with_video"], result["video"]
    print(f"LLM alone:      {a['output_throughput']:8.1f} tok/s  TPOT p50 {a['median_tpot_ms']:6.1f} ms  "
          f"completed {a['completed']} failed {a['failed']}")
    print(f"LLM with video: {t['output_throughput']:8.1f} tok/s  TPOT p50 {t['median_tpot_ms']:6.1f} ms  "
          f"completed {t['completed']} failed {t['failed']}")
    print(f"video ({args.steps} steps, 16 frames, 1280x704): {v['status']} in {v['seconds']:.1f}s {v['error'] or ''}")
    report = {"device": device_label("cuda"), "ready_s": ready, "steps": args.steps, "kv_gib": args.kv_gib,
              **{k: {key: val for key, val in r.items() if key != "output_lens"} if isinstance(r, dict) else r
                 for k, r in result.items()},
              "models": status, "device_free_total_bytes": list(smi)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"two_models_{report['device']}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
