"""Native CPU kernels: built from engine/llm/csrc/ with the host's C compiler on first use.

PyTorch has no CPU operator that attends a batch of single-query rows to contexts scattered over
a paged cache: SDPA wants each context contiguous, so a decode step either calls it once per
sequence per layer (~60 us of fixed cost per call) or copies every context into a padded buffer
first (another read and write of the bytes the step is bound by). `paged_decode` is that
operator: one call per layer for the whole decode group, reading keys and values in place
through the block tables (engine/llm/csrc/paged_decode.c says how). Measured on 2 cores, bf16, the
serving benchmark's shape (8 layers, 8 KV heads of 64): 64 rows of 320 keys 19 ms per step against
32 ms for per-sequence SDPA at first; with the next block prefetched and bfloat16 dot products
(`vdpbf16ps`), 64 rows of 256-384 keys over scattered tables 2.3-2.4 ms per layer against 3.0
(~18 GB/s of K/V read against 14; a plain float32 sum of 256 MB reads at ~32 GB/s here), measured
by benchmarks/cpu_attention.py over a step's worth of layers (`--layers 8`). The same library carries the fused
elementwise ops of cpu_fused.py (csrc/fused_ops.c, csrc/silu_mul.c).

The shared library is compiled once per set of sources, compiler and CPU into
`EMBER_HOME/cache/kernels/` (about a second) and loaded with ctypes, so no PyTorch headers or
build step are needed. Where there is no compiler, the build fails, the library fails its
self-check against SDPA, or `EMBER_CPU_ATTENTION_KERNEL=0`, `paged_decode` returns False and the
caller keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.config import ember_home

log = logging.getLogger(__name__)
CSRC = Path(__file__).resolve().parent / "csrc"
# Each source with its flags: the attention kernel may reassociate its float32 sums (-ffast-math lets
# the softmax's expf vectorize); the fused elementwise ops must round exactly as PyTorch does.
SOURCES = {CSRC / "paged_decode.c": ["-ffast-math"], CSRC / "fused_ops.c": ["-ffp-contract=off"],
           CSRC / "silu_mul.c": ["-ffast-math"]}
ENV_SWITCH = "EMBER_CPU_ATTENTION_KERNEL"  # "0": keep PyTorch's SDPA path (to compare against it)
COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC"]
LINK_FLAGS = ["-shared", "-fopenmp"]  # no -ffast-math here: it would link crtfastmath (FTZ/DAZ on load)
_FUNCTIONS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}
_ARGTYPES = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]  # query, row/head strides
             + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]  # caches, block/slot strides
             + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]  # block tables, their row stride, context lens
             + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]  # out, row/head strides
             + [ctypes.c_int] * 5 + [ctypes.c_float, ctypes.c_int, ctypes.c_int])
_RMS_NORM_ARGTYPES = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_int])
_ROTARY_ARGTYPES = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2 + [ctypes.c_int]  # q in, q out, heads
                    + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2 + [ctypes.c_int]  # k in, k out, heads
                    + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int])
_SILU_MUL_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                      ctypes.c_int]
_library: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def _cpu_signature() -> str:
    """What the -march=native build depends on: the CPU's model and instruction-set flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    parts = [version, _cpu_signature(), *COMPILE_FLAGS, *LINK_FLAGS]
    for source, flags in SOURCES.items():
        parts += [source.name, source.read_text(), *flags]
    for header in sorted(CSRC.glob("*.h")):
        parts += [header.name, header.read_text()]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    folder = ember_home() / "cache" / "kernels"
    target = folder / f"ember-cpu-{digest}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        objects = []
        for source, flags in SOURCES.items():
            objects.append(str(Path(tmp) / f"{source.stem}.o"))
            subprocess.run([compiler, *COMPILE_FLAGS, *flags, "-c", str(source), "-o", objects[-1]],
                           capture_output=True, text=True, check=True)
        lib = Path(tmp) / "kernels.so"
        subprocess.run([compiler, *LINK_FLAGS, *objects, "-lm", "-o", str(lib)], capture_output=True, text=True,
                       check=True)
        os.replace(lib, target)  # atomic: processes building at once each install a whole file
    return target


def _load() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: CPU decode attention stays on PyTorch's SDPA")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("CPU attention kernel unavailable (%s); using PyTorch's SDPA", str(detail).strip()[:500])
        return None
    for name in _FUNCTIONS.values():
        function = getattr(library, name)
        function.argtypes, function.restype = _ARGTYPES, ctypes.c_int
    for suffix in ("f32", "bf16"):
        norm, rotary = getattr(library, f"rms_norm_{suffix}"), getattr(library, f"rotary_{suffix}")
        norm.argtypes, norm.restype = _RMS_NORM_ARGTYPES, None
        rotary.argtypes, rotary.restype = _ROTARY_ARGTYPES, None
        silu_mul = getattr(library, f"silu_mul_{suffix}")
        silu_mul.argtypes, silu_mul.restype = _SILU_MUL_ARGTYPES, None
    return library


def library() -> ctypes.CDLL | None:
    """The built kernels, or None where they are unavailable (built, loaded and checked once)."""
    global _library
    if _library is None:
        _library = False
        loaded = _load()
        if loaded is not None:
            _library = loaded
            if not all(_self_check(loaded, dtype) for dtype in _FUNCTIONS):
                log.warning("CPU attention kernel failed its self-check; using PyTorch's SDPA")
                _library = False
    return _library or None


def enabled(dtype: torch.dtype) -> bool:
    return dtype in _FUNCTIONS and os.environ.get(ENV_SWITCH, "1") != "0" and library() is not None


def paged_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, out: torch.Tensor, scale: float, window: int | None = None) -> bool:
    """Attend row i of `query` [S, heads, D] to the first `context_lens[i]` positions of sequence
    i (the last `window` of them when given) through `block_tables` (int32 [S, W]) into the
    caches [blocks, block_size, kv_heads, D]; writes `out` [S, heads, D]. Returns False (and
    writes nothing) where the kernel cannot take these tensors."""
    if not enabled(query.dtype):
        return False
    return decode_into(library(), query, k_cache, v_cache, block_tables, context_lens, out, scale, window)


def decode_into(lib: ctypes.CDLL, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                block_tables: torch.Tensor, context_lens: torch.Tensor, out: torch.Tensor, scale: float,
                window: int | None) -> bool:
    """`paged_decode` through a loaded library, for callers that checked `enabled` once (the CPU
    attention backend, per runner) rather than on every layer of every step."""
    tensors = (query, k_cache, v_cache, block_tables, context_lens, out)
    if any(t.device.type != "cpu" for t in tensors) or {k_cache.dtype, v_cache.dtype, out.dtype} != {query.dtype}:
        return False
    if (query.stride(-1) != 1 or out.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous()
            or block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32
            or block_tables.stride(-1) != 1 or not context_lens.is_contiguous()):
        return False
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    failed = getattr(lib, _FUNCTIONS[query.dtype])(
        query.data_ptr(), query.stride(0), query.stride(1),
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
        block_tables.data_ptr(), block_tables.stride(0), context_lens.data_ptr(),
        out.data_ptr(), out.stride(0), out.stride(1),
        num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale, window or 0, torch.get_num_threads())
    if failed:
        raise MemoryError("CPU paged attention could not allocate its score buffers")
    return True


def reference_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """What `paged_decode` computes, one sequence at a time in float32 (for checks and tests)."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    heads = query.shape[1]
    rows = []
    for i, ctx in enumerate(context_lens.tolist()):
        blocks = block_tables[i, :-(-ctx // block_size)].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float()
        first = max(0, ctx - window) if window else 0
        k, v = k[first:], v[first:]
        q = query[i].float().view(num_kv_heads, heads // num_kv_heads, head_dim)
        o = F.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1), scale=scale)
        rows.append(o.reshape(heads, head_dim))
    return torch.stack(rows).to(query.dtype)


def _self_check(lib: ctypes.CDLL, dtype: torch.dtype) -> bool:
    """The kernel matches the reference on a small GQA case with scattered blocks and a window
    (values from a private generator: building a runner must not move the global RNG)."""
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(9, 4, 2, 8, generator=gen).to(dtype)
    v_cache = torch.randn(9, 4, 2, 8, generator=gen).to(dtype)
    query = torch.randn(3, 6, 8, generator=gen).to(dtype)
    tables = torch.tensor([[3, 0, 7], [8, 2, 2], [5, 1, 4]], dtype=torch.int32)
    lens = torch.tensor([10, 5, 12], dtype=torch.int32)
    ok = True
    for window in (None, 3):
        out = torch.empty_like(query)
        ok &= decode_into(lib, query, k_cache, v_cache, tables, lens, out, 0.35, window)
        want = reference_decode(query, k_cache, v_cache, tables, lens, 0.35, window)
        ok &= bool(torch.allclose(out.float(), want.float(), rtol=1e-2, atol=1e-2))
    return ok
