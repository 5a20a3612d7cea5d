"""Image-to-video serving benchmark: what the worker costs, and what batching buys.

On one pipeline (a tiny one built here, or --model) and one set of inputs, in one run:
  overhead  the worker's end-to-end time for one request (queue, thread hop, step events, mp4
            encoding) against a plain diffusers pipeline call with the same inputs and seed;
  batching  N requests (N = 2, 4) submitted together, batched into one call, against the same N
            requests run one by one through the worker: the throughput ratio.
Every figure is the median of --repeats runs after one warm-up. Prints a table and saves JSON and
PNG under benchmarks/results/, named after the device.

    python -m benchmarks.video --device cpu
    python -m benchmarks.video --device cuda --model ali-vilab/i2vgen-xl --dtype float16 \\
        --steps 25 --frames 16 --width 512 --height 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import build_once, device_label  # noqa: E402
from engine.video.demo import TINY_DEFAULTS, build_tiny_i2v  # noqa: E402
from engine.video.export import to_mp4  # noqa: E402
from engine.video.families import family_for, load_pipeline, pipeline_class_of  # noqa: E402
from engine.video.worker import VideoRequest, VideoWorker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_SIZES = (2, 4)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--family", default="i2vgen-xl", help="tiny family to build when --model is not given")
    parser.add_argument("--model", help="a saved pipeline folder or hub repo (default: a tiny one built here)")
    parser.add_argument("--full-size", action="store_true",
                        help="build I2VGen-XL at its real component sizes with random weights (a GPU run; no "
                             "hub needed) and use it as --model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--warmups", type=int, default=1, help="warm-up runs before each timed comparison")
    parser.add_argument("--pipeline-class", help="diffusers class (default: from model_index.json)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--frames", type=int, help="max_frames (default: the tiny model's)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def request_inputs(args, family, seed: int) -> dict:
    from PIL import Image

    inputs = {"image": Image.new("RGB", (64, 48), (180, 90, 40)), "seed": seed,
              "num_inference_steps": args.steps}
    if "prompt" in {p.name for p in family.params}:
        inputs["prompt"] = "a red balloon drifts over a river"
    for name, value in (("max_frames", args.frames), ("width", args.width), ("height", args.height)):
        if value is not None:
            inputs[name] = value
    return family.normalize(inputs)


_ids = iter(range(10**9))


async def run_request(worker: VideoWorker, inputs: dict) -> None:
    async for event in worker.generate(VideoRequest(f"bench-{next(_ids)}", inputs)):
        if event.type == "error":
            raise RuntimeError(event.error)


async def timed(run, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    await run()
    sync(device)
    return time.perf_counter() - start


async def compare(first, second, device: str, repeats: int, warmups: int) -> tuple[list[float], list[float]]:
    """Wall times of `first` and `second`, alternated so that background load hits both alike,
    after `warmups` warm-up runs of each."""
    for _ in range(warmups):
        await first()
        await second()
    times = [], []
    for _ in range(repeats):
        times[0].append(await timed(first, device))
        times[1].append(await timed(second, device))
        print(f"    {times[0][-1]:8.2f} s vs {times[1][-1]:8.2f} s", flush=True)
    return times


async def measure_overhead(pipe, family, inputs: dict, device: str, repeats: int, warmups: int) -> dict:
    single = VideoWorker(pipe, family, max_batch_size=1, device=device)

    async def plain():
        return pipe(**family.call_kwargs([inputs], [torch.Generator().manual_seed(inputs["seed"])]))

    async def worker():
        await run_request(single, inputs)

    async def encode():
        to_mp4(frames, inputs["fps"])

    try:
        frames = (await plain()).frames[0]
        plain_runs, worker_runs = await compare(plain, worker, device, repeats, warmups)
        mp4_runs = [await timed(encode, device) for _ in range(repeats)]
    finally:
        single.close()
    plain_s, worker_s = statistics.median(plain_runs), statistics.median(worker_runs)
    return {"plain_s": plain_s, "worker_s": worker_s, "mp4_s": statistics.median(mp4_runs),
            "overhead_pct": 100 * (worker_s - plain_s) / plain_s,
            "plain_runs_s": plain_runs, "worker_runs_s": worker_runs}


async def measure_batching(pipe, family, requests: list[dict], device: str, repeats: int, warmups: int) -> dict:
    n = len(requests)
    single = VideoWorker(pipe, family, max_batch_size=1, device=device)
    batched = VideoWorker(pipe, family, max_batch_size=n, device=device, batch_window_s=5.0)

    async def one_by_one():
        for inputs in requests:
            await run_request(single, inputs)

    async def together():
        await asyncio.gather(*(run_request(batched, inputs) for inputs in requests))

    try:
        sequential_runs, batched_runs = await compare(one_by_one, together, device, repeats, warmups)
        assert batched.batch_sizes == {n: repeats + warmups}, batched.batch_sizes
    finally:
        single.close()
        batched.close()
    sequential_s, batched_s = statistics.median(sequential_runs), statistics.median(batched_runs)
    return {"requests": n, "one_by_one_s": sequential_s, "batched_s": batched_s,
            "throughput_ratio": sequential_s / batched_s,
            "one_by_one_runs_s": sequential_runs, "batched_runs_s": batched_runs}


async def measure(args, pipe, family) -> dict:
    inputs = request_inputs(args, family, seed=1)
    overhead = await measure_overhead(pipe, family, inputs, args.device, args.repeats, args.warmups)
    batching = [await measure_batching(pipe, family, [request_inputs(args, family, seed=i) for i in range(n)],
                                       args.device, args.repeats, args.warmups)
                for n in args.batch_sizes]
    return {"overhead": overhead, "batching": batching}


def report(result: dict) -> str:
    o = result["overhead"]
    lines = [
        f"video benchmark: {result['family']} on {result['device']} "
        f"({result['inputs']['max_frames']} frames, {result['inputs']['width']}x{result['inputs']['height']}, "
        f"{result['inputs']['num_inference_steps']} steps, median of {result['repeats']})",
        f"  plain pipeline call   {o['plain_s']:8.3f} s",
        f"  worker end to end     {o['worker_s']:8.3f} s   overhead {o['overhead_pct']:+.1f}% "
        f"(of which mp4 encoding {o['mp4_s']:.3f} s)",
    ]
    for b in result["batching"]:
        lines.append(f"  {b['requests']} requests: one by one {b['one_by_one_s']:7.3f} s, batched "
                     f"{b['batched_s']:7.3f} s  -> throughput x{b['throughput_ratio']:.2f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG")
        return False
    o = result["overhead"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(["plain call", "worker"], [o["plain_s"], o["worker_s"]], color=["#999999", "#3b75af"])
    left.set_ylabel("seconds per request (median)")
    left.set_title(f"worker overhead {o['overhead_pct']:+.1f}%")
    labels = [str(b["requests"]) for b in result["batching"]]
    xs = range(len(labels))
    right.bar([x - 0.2 for x in xs], [b["one_by_one_s"] for b in result["batching"]], 0.4,
              label="one by one", color="#999999")
    right.bar([x + 0.2 for x in xs], [b["batched_s"] for b in result["batching"]], 0.4,
              label="batched", color="#3b75af")
    for x, b in zip(xs, result["batching"], strict=True):
        right.annotate(f"x{b['throughput_ratio']:.2f}", (x + 0.2, b["batched_s"]), ha="center", va="bottom")
    right.set_xticks(list(xs), labels)
    right.set_xlabel("requests")
    right.set_ylabel("seconds for all requests (median)")
    right.set_title("batching")
    right.legend()
    fig.suptitle(f"{result['family']} on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_full_size_i2vgen_xl(folder: Path, device: str) -> Path:
    """I2VGen-XL with its real component shapes (diffusers' I2VGenXLUNet defaults are the released
    UNet's; OpenCLIP ViT-H/14 text and image towers; the SD VAE) and random weights, in float16."""
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLPipeline, I2VGenXLUNet
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from engine.video.demo import _clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = I2VGenXLUNet(sample_size=None)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=768)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=49408, hidden_size=1024,
            intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, projection_dim=1024,
            hidden_act="gelu", max_position_embeddings=77))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
            image_size=224, projection_dim=1024, hidden_act="gelu"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, rescale_betas_zero_snr=True, timestep_spacing="leading",
                              steps_offset=1)
    pipe = I2VGenXLPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer(), unet=unet,
                            image_encoder=image_encoder, feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
                            scheduler=scheduler)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(folder)
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def full_size_i2vgen_xl_folder(device: str) -> Path:
    """The full-size random I2VGen-XL under EMBER_HOME/bench, built on first use."""
    from engine.config import ember_home

    return build_once(ember_home() / "bench" / "i2vgen-xl-full-size", "model_index.json",
                      lambda partial: build_full_size_i2vgen_xl(partial, device))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    with tempfile.TemporaryDirectory() as tmp:
        if args.full_size:
            args.model = str(full_size_i2vgen_xl_folder(args.device))
        model = args.model or str(build_tiny_i2v(Path(tmp) / args.family, args.family))
        pipeline_class = args.pipeline_class or pipeline_class_of(model)
        family = family_for(pipeline_class)
        if not args.model:
            family = family.configure(defaults=TINY_DEFAULTS[family.name])
        pipe = load_pipeline(model, pipeline_class, dtype=args.dtype, device=args.device)
        inputs = request_inputs(args, family, seed=1)
        result = {
            "benchmark": "video",
            "family": family.name,
            "model": ("I2VGen-XL full size, random weights" if args.full_size else args.model)
            or f"tiny {family.name} (engine.video.demo)",
            "device": device_label(args.device),
            "dtype": args.dtype,
            "repeats": args.repeats,
            "inputs": {k: v for k, v in inputs.items() if k != "image"},
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            **asyncio.run(measure(args, pipe, family)),
        }
    print(report(result))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"video_{family.name}{'_full-size' if args.full_size else ''}_{result['device']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    saved = [stem.with_suffix(".json")] + ([stem.with_suffix(".png")] if plot(result, stem.with_suffix(".png")) else [])
    print("saved", ", ".join(str(p) for p in saved))
    return result


if __name__ == "__main__":
    main()
