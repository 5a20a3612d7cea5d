"""oneDNN prepacked weights for the linear layers of a CPU model.

At batch 1 a CPU decode step is bound by its matrix-vector products, and eager `F.linear` on a
bfloat16 weight reorders that weight into oneDNN's blocked layout on every call. Packing each
weight once (`torch.ops.mkldnn._reorder_linear_weight`, the op inductor's freezing uses) and
calling `torch.ops.mkldnn._linear_pointwise` on the packed copy skips that work. Measured with one
thread on an AVX-512/AMX host (noisy, shared machine), per call, eager -> packed:

- bfloat16, 512x512 weight: 44 -> 22 us at 1 row, 150 -> 110 us at 256 rows;
- bfloat16, 32000x512 LM head: 2.35 -> 1.4 ms at 1 row, 8.5 -> 6.2 ms at 256 rows;
- float32 is slower packed at 1 row (512x512: 17 -> 25 us), so float32 models keep `nn.Linear`.

Calls of more than 64 rows run at a padded row count (`padded_rows`), so that a server's steps of
ever-changing token counts reuse a few dozen oneDNN primitives instead of building a new one per
step, and `warm_up` builds those once, when the runner starts (about 1 s for the serving
benchmark's model): steps mixing a prefill chunk with decodes, at random token counts, went from
105-110 to 89-92 ms per 1,000 tokens (`padded_rows` says more). The lean CPU forward pads a whole
step once (cpu_forward.py), so its calls arrive padded; any other caller's rows are copied into a
padded buffer per call (~0.07 ms per call at 263 rows, 0.2 at 1,841).

Results are bit-identical to `F.linear` in bfloat16, padded or not (rows are computed
independently). `pack_linears` swaps every `nn.Linear` of the model for a `PackedLinear` in place
(idempotent, so a runner rebuilt on wake finds them packed). An untied weight is replaced by its
packed copy; a weight tied to another module (an LM head sharing the input embedding) keeps the
shared tensor for that module and adds the packed copy as a buffer, which the model pool's
accounting (engine/residency.py) counts with the weights.
Where the ops are missing or fail a self-check on this host (another torch build, a CPU without
the instructions) nothing is swapped; so are layers off the CPU or under an accelerate hook
(offloaded weights).
"""

from __future__ import annotations

import copy
import ctypes
import os

import torch
import torch.nn.functional as F
from torch import nn

PACKED_DTYPES = (torch.bfloat16,)
ENV_SWITCH = "EMBER_CPU_PACKED_LINEAR"  # "0" turns the packing off (to compare against eager)
EXACT_ROWS = 64  # calls up to this many rows run at their own size (decode steps: one per batch size)
PAD_FRACTION = 16  # above EXACT_ROWS, rows round up to a multiple of 1/16 of the next power of two


def padded_rows(rows: int) -> int:
    """The row count a packed linear call runs at.

    oneDNN builds (and caches) a primitive per input shape, and building one is slow: measured on
    the serving benchmark's layer shapes (2 threads), the four linears of a layer took 17 ms at 263
    rows the first time and 4-5 ms after; 45-60 ms vs 21-31 ms at 1,500-1,841 rows. A server's
    steps that mix prefill chunks with decodes rarely repeat a token count, so nearly every such
    step paid that. Above EXACT_ROWS, rows are rounded up to a multiple of 1/16 of the next power
    of two: 8 sizes per octave (40 from 65 to 2048 rows), less than 12.5 % more rows (4 % on
    average over counts spread evenly). `warm_up` builds them all when a runner starts."""
    if rows <= EXACT_ROWS:
        return rows
    step = (1 << (rows - 1).bit_length()) // PAD_FRACTION
    return -(-rows // step) * step


def _ops():
    """(reorder, linear) or None where this torch build lacks them."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        reorder, linear = mkldnn._reorder_linear_weight, mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    return reorder, linear


class PackedLinear(nn.Module):
    """`nn.Linear` computed from a oneDNN-packed copy of its weight (inference only).

    `weight` is the packed tensor (an opaque mkldnn tensor of the same shape and dtype), so code
    that reads `weight.shape` still works; `tied_weight` is the original when another module
    shares it."""

    def __init__(self, linear: nn.Linear, tied: bool, ops):
        super().__init__()
        self._ops = ops
        reorder, self._linear = ops
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", reorder(linear.weight.detach()), persistent=False)
        self.bias = linear.bias
        self.tied_weight = linear.weight if tied else None

    @property
    def weight(self) -> torch.Tensor:
        return self.packed_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        padded = padded_rows(rows)
        if padded == rows:
            return self._linear(x, self.packed_weight, self.bias, "none", [], "")
        staged = x.new_empty(padded, self.in_features)  # the rows past `rows` are zeros, then dropped
        staged[:rows] = x.reshape(rows, self.in_features)
        staged[rows:].zero_()
        out = self._linear(staged, self.packed_weight, self.bias, "none", [], "")
        return out[:rows].view(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """The keys and dense values nn.Linear would save (`weight`, `bias`)."""
        weight = self.tied_weight if self.tied_weight is not None else self.packed_weight.to_dense()
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        """A copy packed afresh from the dense weight (oneDNN's opaque tensors cannot be copied)."""
        tied = self.tied_weight is not None
        dense = copy.deepcopy(self.tied_weight, memo) if tied else self.packed_weight.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = dense if tied else nn.Parameter(dense, requires_grad=False)
        linear.bias = copy.deepcopy(self.bias, memo)
        clone = PackedLinear(linear, tied, self._ops)
        memo[id(self)] = clone
        return clone

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _self_check(ops, dtype: torch.dtype) -> bool:
    """The packed path runs on this host and matches F.linear on a small case (values from a
    private generator: building a runner must not move the global RNG)."""
    try:
        gen = torch.Generator().manual_seed(0)
        layer = nn.utils.skip_init(nn.Linear, 32, 48, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(48, 32, generator=gen))
            layer.bias.copy_(torch.randn(48, generator=gen))
            x = torch.randn(3, 32, generator=gen).to(dtype)
            got = PackedLinear(layer, False, ops)(x)
            want = F.linear(x, layer.weight, layer.bias)
        return bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2))
    except RuntimeError:
        return False


def packable(model: nn.Module) -> bool:
    """Whether `pack_linears` would pack this model: on CPU, in a packed dtype, with working ops."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None or param.device.type != "cpu" or param.dtype not in PACKED_DTYPES:
        return False
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    ops = _ops()
    return ops is not None and _self_check(ops, param.dtype)


def pack_linears(model: nn.Module) -> int:
    """Replace the model's `nn.Linear` modules with `PackedLinear` where `packable`; returns how
    many were replaced (0 when not packable or already packed)."""
    if not packable(model):
        return 0
    ops = _ops()
    owners: dict[int, int] = {}  # id(weight) -> modules holding it
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    targets = [name for name, module in model.named_modules()
               if type(module) is nn.Linear and module.weight.dtype in PACKED_DTYPES
               and module.weight.device.type == "cpu" and not hasattr(module, "_hf_hook")]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        tied = owners[id(getattr(parent, child).weight)] > 1
        setattr(parent, child, PackedLinear(getattr(parent, child), tied, ops))
    if targets:
        _release_replaced_weights(model)
    return len(targets)


def _release_replaced_weights(model: nn.Module) -> None:
    """Hand the replaced weights' memory back to the OS.

    Weights loaded from safetensors are views of one memory-mapped file, which stays mapped (and
    its pages resident once packing has read them) while any tensor from it lives: copying the
    remaining tensors (embeddings, norms, biases) out lets the mapping go. Measured on the serving
    benchmark's model (110 MB of bf16 weights), RSS after one forward: eager 510 MB, packed 545 MB
    (594 MB without this). And glibc keeps freed heap memory resident until `malloc_trim` (a model
    built in memory: +58 MB without it, +8 MB with it); elsewhere that call does nothing."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_mkldnn:
            tensor.data = tensor.data.clone()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.inference_mode()
def warm_up(model: nn.Module, max_rows: int) -> int:
    """Have oneDNN build, once, the primitive of every padded row count (`padded_rows`, above
    EXACT_ROWS) up to `max_rows` (the step's token budget) for each packed linear shape but the LM
    head's (it only sees the rows that need logits). Layers of one shape share primitives; counts
    up to EXACT_ROWS (decode steps) are built when first used, as each costs memory (~0.8 MB
    measured) that a server never using them should not hold. Returns the number of calls made."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shapes = {(m.in_features, m.out_features, m.bias is not None, m.packed_weight.dtype): m
              for m in model.modules() if isinstance(m, PackedLinear) and m is not head}
    sizes = sorted({padded_rows(rows) for rows in range(EXACT_ROWS + 1, max_rows + 1)})
    for linear in shapes.values():
        for rows in sizes:
            linear(torch.zeros(rows, linear.in_features, dtype=linear.packed_weight.dtype))
    return len(shapes) * len(sizes)


def packed_bytes(model: nn.Module) -> int:
    """Bytes of the packed weight copies in `model` (0 when nothing is packed)."""
    return sum(m.packed_weight.numel() * m.packed_weight.element_size()
               for m in model.modules() if isinstance(m, PackedLinear))
