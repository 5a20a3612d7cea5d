"""Fused elementwise steps for CPU models: RMSNorm, rotary embeddings and the gated MLP's
silu(gate) * up in one native pass each.

A decode step of a small model on CPU spends as long in its elementwise ops as in its matrix
products: transformers' RMSNorm is seven tensor ops (a float32 copy, pow, mean, add, rsqrt, two
multiplies) and `apply_rotary_pos_emb` twelve per layer, each paying PyTorch's dispatch and a pass
over memory. engine/llm/csrc/fused_ops.c does each in one pass, rounding where PyTorch rounds.

`fuse_cpu_ops(model)` swaps them in where they are proven equal on this model:
- every RMSNorm-like module (a 1-D `weight` and `variance_epsilon`/`eps`) whose own forward agrees
  with the fused one on a random input gets the fused forward (per instance; a variant such as
  Gemma's `1 + weight` fails the check and keeps its own);
- the module-level `apply_rotary_pos_emb` of the model's attention classes (where transformers
  looks it up at call time) is wrapped, once per modeling module, when it agrees with the fused
  rotary on a random input: the wrapper takes CPU tensors of the supported shapes and dtypes and
  hands anything else to the original, so other models and devices see no change;
- every gated MLP (gate_proj, up_proj, down_proj and a SiLU `act_fn`) whose forward agrees with
  `down_proj(silu_mul(gate_proj(x), up_proj(x)))` on a random input gets that forward (per
  instance). In bfloat16 the two ops it replaces took 13% of a 2,048-token prefill step;
- a rotary embedding module of a static RoPE type answers from cos/sin tables (see `_tabulate_rotary`).
Nothing is swapped off the CPU, without the native library, or with `EMBER_CPU_FUSED_OPS=0`.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
from torch import nn

from engine.llm import cpu_kernels

ENV_SWITCH = "EMBER_CPU_FUSED_OPS"  # "0": keep transformers' own ops (to compare against them)
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_patched_modules: set[str] = set()


def _tracks_grad(*tensors: torch.Tensor) -> bool:
    """Autograd would need the ops' backward, which the native ones do not have: leave it the originals."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """transformers' RMSNorm of `x` over its last dimension, or None where the kernel cannot take it."""
    lib = cpu_kernels.library()
    if (lib is None or _tracks_grad(x, weight) or x.device.type != "cpu" or x.dtype not in _DTYPES
            or weight.dtype != x.dtype or weight.dim() != 1 or x.shape[-1] != weight.shape[0]
            or not weight.is_contiguous()):
        return None
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype)
    getattr(lib, f"rms_norm_{_DTYPES[x.dtype]}")(
        rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(), out.stride(0), rows.shape[0],
        rows.shape[1], float(eps), torch.get_num_threads())
    return out.view(x.shape)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q, k) [1, heads, tokens, head_dim] rotated by cos/sin [1, tokens, head_dim], as
    transformers' `apply_rotary_pos_emb` with `unsqueeze_dim=1`; None where the kernel cannot take them."""
    lib = cpu_kernels.library()
    if (lib is None or _tracks_grad(q, k, cos, sin) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3
            or q.shape[0] != 1 or cos.shape[0] != 1):
        return None
    tokens, head_dim = q.shape[2], q.shape[3]
    if (k.shape[0] != 1 or k.shape[2:] != q.shape[2:] or cos.shape != sin.shape or cos.shape[1:] != (tokens, head_dim)
            or head_dim % 2 or cos.stride() != sin.stride()):
        return None
    tensors = (q, k, cos, sin)
    if q.dtype not in _DTYPES or any(t.device.type != "cpu" or t.dtype != q.dtype or t.stride(-1) != 1
                                     for t in tensors):
        return None
    # token-major memory ([1, tokens, heads, D] seen as [1, heads, tokens, D]): the attention layer
    # scatters keys into the cache by token, and reads queries by token (measured: index_copy_ of
    # 2,048 tokens of keys 0.27 ms from token-major against 0.49 ms from head-major)
    q_out = torch.empty(1, tokens, q.shape[1], head_dim, dtype=q.dtype).transpose(1, 2)
    k_out = torch.empty(1, tokens, k.shape[1], head_dim, dtype=k.dtype).transpose(1, 2)
    getattr(lib, f"rotary_{_DTYPES[q.dtype]}")(
        q.data_ptr(), q.stride(2), q.stride(1), q_out.data_ptr(), q_out.stride(2), q_out.stride(1), q.shape[1],
        k.data_ptr(), k.stride(2), k.stride(1), k_out.data_ptr(), k_out.stride(2), k_out.stride(1), k.shape[1],
        cos.data_ptr(), sin.data_ptr(), cos.stride(1), tokens, head_dim, torch.get_num_threads())
    return q_out, k_out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """`silu(gate) * up` (same shapes, last dimension contiguous), or None where the kernel cannot take them."""
    lib = cpu_kernels.library()
    if (lib is None or _tracks_grad(gate, up) or gate.shape != up.shape or gate.dtype != up.dtype
            or gate.dtype not in _DTYPES or gate.device.type != "cpu" or up.device.type != "cpu"):
        return None
    g, u = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
    if g.stride() != u.stride() or g.stride(-1) != 1:
        g, u = g.contiguous(), u.contiguous()
    out = torch.empty(g.shape, dtype=gate.dtype)
    getattr(lib, f"silu_mul_{_DTYPES[gate.dtype]}")(g.data_ptr(), u.data_ptr(), g.stride(0), out.data_ptr(),
                                                    g.shape[0], g.shape[1], torch.get_num_threads())
    return out.view(gate.shape)


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    hidden = silu_mul(gate, up)
    return self.down_proj(hidden if hidden is not None else self.act_fn(gate) * up)


@torch.inference_mode()
def _fuse_mlp(module: nn.Module, dtype: torch.dtype) -> bool:
    """A gated MLP (gate_proj, up_proj, down_proj, a SiLU act_fn) whose own forward agrees with the fused one."""
    if not all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj")):
        return False
    act = getattr(module, "act_fn", None)
    if not isinstance(act, nn.Module) or "silu" not in type(act).__name__.lower():
        return False
    gen = torch.Generator().manual_seed(0)
    hidden = getattr(module.gate_proj, "in_features", None)
    if hidden is None:
        return False
    x = torch.randn(1, 5, hidden, generator=gen).to(dtype)
    want = type(module).forward(module, x)
    if not _agree(_fused_mlp_forward(module, x), want):
        return False
    module.forward = functools.partial(_fused_mlp_forward, module)
    return True


def _table_rotary_forward(self: nn.Module, x: torch.Tensor, position_ids: torch.Tensor):
    cos, sin = self._ember_tables
    if (position_ids.dim() == 2 and position_ids.shape[0] == 1 and x.dtype == cos.dtype
            and position_ids.device == cos.device and int(position_ids.max()) < cos.shape[0]):
        rows = position_ids[0]  # index_select: ~4x faster than advanced indexing for 2,048 positions
        return cos.index_select(0, rows).unsqueeze(0), sin.index_select(0, rows).unsqueeze(0)
    return type(self).forward(self, x, position_ids)


@torch.inference_mode()
def _tabulate_rotary(module: nn.Module, dtype: torch.dtype, max_positions: int) -> bool:
    """A rotary embedding whose cos/sin depend on the position alone (not dynamic or long-context
    RoPE, which rescale with the sequence) answers from tables of every position up to
    `max_positions`, computed once by its own forward (so exactly its values); recomputing them
    every step took ~4 % of a decode step at 64 rows."""
    rope_type = str(getattr(module, "rope_type", ""))
    if (not type(module).__name__.endswith("RotaryEmbedding")
            or not isinstance(getattr(module, "inv_freq", None), torch.Tensor)
            or "dynamic" in rope_type or rope_type == "longrope" or max_positions < 1):
        return False
    x = torch.empty(0, dtype=dtype, device=module.inv_freq.device)
    positions = torch.arange(max_positions, device=x.device)[None]
    cos, sin = type(module).forward(module, x, positions)
    if cos.shape[:2] != (1, max_positions):
        return False
    module._ember_tables = (cos[0], sin[0])
    probe = torch.randint(0, max_positions, (1, 7), generator=torch.Generator().manual_seed(0)).to(x.device)
    want = type(module).forward(module, x, probe)
    got = _table_rotary_forward(module, x, probe)
    if not all(torch.equal(a, b) for a, b in zip(got, want)):
        del module._ember_tables
        return False
    module.forward = functools.partial(_table_rotary_forward, module)
    return True


def _norm_eps(module: nn.Module) -> float | None:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    return eps if isinstance(eps, float) else None


def _fused_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    out = rms_norm(hidden_states, self.weight, self._ember_eps)
    return out if out is not None else type(self).forward(self, hidden_states)


def _agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to one rounding step of the dtype (the float32 statistics may sum in another order)."""
    tol = 1e-5 if got.dtype == torch.float32 else 8e-3
    return got.shape == want.shape and bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))


@torch.inference_mode()
def _fuse_norm(module: nn.Module) -> bool:
    eps = _norm_eps(module)
    if eps is None or module.weight.device.type != "cpu" or module.weight.dtype not in _DTYPES:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, module.weight.shape[0], generator=gen).to(module.weight.dtype)
    fused = rms_norm(x, module.weight, eps)
    if fused is None or not _agree(fused, type(module).forward(module, x)):
        return False
    module._ember_eps = eps
    module.forward = functools.partial(_fused_norm_forward, module)  # unlike a bound method, pickles
    return True


def _rotary_wrapper(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        if unsqueeze_dim == 1 and len(args) <= 1 and set(kwargs) <= {"unsqueeze_dim"}:
            out = rotary(q, k, cos, sin)
            if out is not None:
                return out
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.__wrapped__ = original
    apply_rotary_pos_emb._ember_fused = True
    return apply_rotary_pos_emb


@torch.inference_mode()
def _rotary_agrees(original, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    tokens = 5
    # laid out as the attention layers make them: [1, tokens, heads, D] projections viewed [1, heads, tokens, D]
    q = torch.randn(1, tokens, heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(1, tokens, kv_heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
    angles = torch.randn(1, tokens, head_dim // 2, generator=gen) * 3
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    fused = rotary(q, k, cos, sin)
    want = original(q, k, cos, sin)
    return fused is not None and all(torch.equal(a, b) for a, b in zip(fused, want))


def _fuse_rotary(model: nn.Module, dtype: torch.dtype) -> int:
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    patched = 0
    for name in {type(m).__module__ for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)}:
        modeling = sys.modules.get(name)
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        if original is None or getattr(original, "_ember_fused", False):
            patched += original is not None
            continue
        if _rotary_agrees(original, dtype, heads, kv_heads, head_dim):
            modeling.apply_rotary_pos_emb = _rotary_wrapper(original)
            _patched_modules.add(name)
            patched += 1
    return patched


def fuse_cpu_ops(model: nn.Module, max_positions: int = 0) -> dict[str, int]:
    """Swap in the fused ops where they agree with the model's own (see the module docstring);
    returns how many of each now run fused. `max_positions` > 0 also tabulates rotary cos/sin."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if (param is None or param.device.type != "cpu" or param.dtype not in _DTYPES
            or os.environ.get(ENV_SWITCH, "1") == "0" or cpu_kernels.library() is None):
        return {"norms": 0, "mlps": 0, "rotary": 0, "rotary_tables": 0}
    unfused = [m for m in model.modules() if "forward" not in vars(m)]
    return {"norms": sum(_fuse_norm(m) for m in unfused),
            "mlps": sum(_fuse_mlp(m, param.dtype) for m in unfused),
            "rotary": _fuse_rotary(model, param.dtype),
            "rotary_tables": sum(_tabulate_rotary(m, param.dtype, max_positions) for m in unfused)}


def unfuse_rotary() -> None:
    """Put the original `apply_rotary_pos_emb` functions back (for tests and benchmarks)."""
    for name in list(_patched_modules):
        modeling = sys.modules[name]
        modeling.apply_rotary_pos_emb = modeling.apply_rotary_pos_emb.__wrapped__
        _patched_modules.discard(name)

