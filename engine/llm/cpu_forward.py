"""A lean forward for Llama-shaped decoder models on CPU: the same weights and math as
transformers' forward, without its per-module Python.

At batch 1 a CPU decode step of a small model is bound by Python, not arithmetic: each decoder
layer calls a dozen modules through `nn.Module.__call__`, passes keyword bundles through
transformers' attention interface and output dataclasses, and the model builds masks and
position embeddings the paged attention does not use. `LeanForward` walks the same modules'
weights directly: embedding, then per layer RMSNorm -> q/k/v projections -> rotary -> paged
attention -> o_proj + residual -> RMSNorm -> gated MLP + residual, then the final norm and the
LM head on the rows that need logits only.

Each layer's q/k/v projections and its MLP's gate/up projections can be fused into one matrix
product each (`fuse_projections`): a oneDNN linear call costs ~20 us however small it is (measured
on this 2-core host), and a decode step at batch 1 makes 57 of them in a model of 8 layers.

It takes a model only when its structure is the plain Llama one (the decoder layers hold exactly
`input_layernorm`, `self_attn` with `q/k/v/o_proj`, `post_attention_layernorm`, `mlp` with
`gate/up/down_proj`; no sliding windows, no extra norms), and the runner keeps it only when its
logits agree with the model's own forward on a probe step (ModelRunner.check_lean_forward).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from engine.llm.attention import AttentionBatch, paged_attention
from engine.llm.cpu_fused import rms_norm, rotary, silu_mul
from engine.llm.cpu_linear import PackedLinear, padded_rows

LAYER_PARTS = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP_PARTS = {"gate_proj", "up_proj", "down_proj"}


def _eps(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return eps if isinstance(eps, float) else None


def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    out = rms_norm(x, norm.weight, norm._ember_eps)
    return out if out is not None else norm(x)


class LeanForward:
    """Callable like the runner's model call: (input_ids [1, T], position_ids [1, T], batch,
    logits_to_keep rows) -> float32 logits [rows, vocab]."""

    def __init__(self, model: nn.Module):
        self.model = model
        base = model.model
        self.embed = base.embed_tokens
        self.layers = list(base.layers)
        self.final_norm = base.norm
        self.rotary_emb = base.rotary_emb
        self.lm_head = model.lm_head
        config = model.config.get_text_config()
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        # where the native rotary declines: the model's own function, from its modeling module
        self.apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.fused = all(hasattr(layer.self_attn, "qkv_proj") and hasattr(layer.mlp, "gate_up_proj")
                         for layer in self.layers)  # by an earlier runner on the same model
        self.packed = any(isinstance(m, PackedLinear) for m in model.modules())
        for norm in [self.final_norm] + [n for layer in self.layers
                                         for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm._ember_eps = _eps(norm)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """The plain Llama structure, on CPU, with RMSNorm eps readable and no sliding windows."""
        base = getattr(model, "model", None)
        if base is None or not all(hasattr(base, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return False
        if not isinstance(getattr(model, "lm_head", None), nn.Module) or _eps(base.norm) is None:
            return False
        if any(p.device.type != "cpu" for p in model.parameters()):
            return False
        config = model.config.get_text_config()
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
            return False  # windowed layers (Mistral; Qwen2 with use_sliding_window) take the model's forward
        for layer in base.layers:
            if {name for name, _ in layer.named_children()} != LAYER_PARTS:
                return False
            attn, mlp = layer.self_attn, layer.mlp
            if {name for name, _ in attn.named_children()} - {"qkv_proj"} != ATTENTION_PARTS:
                return False
            if {name for name, _ in mlp.named_children()} - {"act_fn", "gate_up_proj"} != MLP_PARTS:
                return False
            if (getattr(attn, "sliding_window", None) is not None
                    or not isinstance(getattr(attn, "scaling", None), float)):
                return False
            if "silu" not in type(getattr(mlp, "act_fn", None)).__name__.lower():
                return False
            if not callable(getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)):
                return False
            if _eps(layer.input_layernorm) is None or _eps(layer.post_attention_layernorm) is None:
                return False
        return True

    def fuse_projections(self) -> bool:
        """Give every layer one `qkv_proj` and one `gate_up_proj` (concatenated weights, packed the
        same way as the originals) and use them. The originals stay until `drop_unfused`."""
        if self.fused:
            return True
        fused = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _concat([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up = _concat([mlp.gate_proj, mlp.up_proj])
            if qkv is None or gate_up is None:
                return False
            fused.append((qkv, gate_up))
        for layer, (qkv, gate_up) in zip(self.layers, fused):
            layer.self_attn.qkv_proj, layer.mlp.gate_up_proj = qkv, gate_up
        self.fused = True
        return True

    def undo_fusion(self) -> None:
        for layer in self.layers:
            del layer.self_attn.qkv_proj, layer.mlp.gate_up_proj
        self.fused = False

    def drop_unfused(self) -> None:
        """Replace the separate projections by slices of the fused ones (their weights are freed;
        the model's own forward still works, computing the fused product and slicing it)."""
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if isinstance(attn.q_proj, SliceOfLinear):
                continue
            bounds = [0]
            for name in ("q_proj", "k_proj", "v_proj"):
                bounds.append(bounds[-1] + getattr(attn, name).out_features)
            for name, start, end in zip(("q_proj", "k_proj", "v_proj"), bounds, bounds[1:]):
                setattr(attn, name, SliceOfLinear(attn.qkv_proj, start, end))
            inter = mlp.gate_proj.out_features
            mlp.gate_proj = SliceOfLinear(mlp.gate_up_proj, 0, inter)
            mlp.up_proj = SliceOfLinear(mlp.gate_up_proj, inter, 2 * inter)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, batch: AttentionBatch,
                 rows: torch.Tensor) -> torch.Tensor:
        real = input_ids.shape[1]
        # Padded once here, not per linear call (cpu_linear.padded_rows): the extra rows (token 0 at
        # position 0) go through every per-row op and are never attended to, written to the cache
        # or kept.
        tokens = padded_rows(real) if self.packed else real
        if tokens > real:
            input_ids = F.pad(input_ids, (0, tokens - real))
            position_ids = F.pad(position_ids, (0, tokens - real))
        h = self.embed(input_ids)
        cos, sin = self.rotary_emb(h, position_ids)
        q_shape = (1, tokens, self.heads, self.head_dim)
        kv_shape = (1, tokens, self.kv_heads, self.head_dim)
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            x = _norm(h, layer.input_layernorm)
            if self.fused:
                qkv = attn.qkv_proj(x)
                q_end = self.heads * self.head_dim
                k_end = q_end + self.kv_heads * self.head_dim
                q, k, v = qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(q_shape).transpose(1, 2)
            k = k.view(kv_shape).transpose(1, 2)
            v = v.view(kv_shape).transpose(1, 2)
            rotated = rotary(q, k, cos, sin)
            q, k = rotated if rotated is not None else self.apply_rotary(q, k, cos, sin)
            if tokens > real:
                k, v = k[:, :, :real], v[:, :, :real]
            out, _ = paged_attention(attn, q, k, v, None, scaling=attn.scaling, ember_batch=batch)
            h = h + attn.o_proj(out.reshape(1, tokens, -1))
            x = _norm(h, layer.post_attention_layernorm)
            if self.fused:
                gate_up = mlp.gate_up_proj(x)
                inter = gate_up.shape[-1] // 2
                gate, up = gate_up[..., :inter], gate_up[..., inter:]
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            act = silu_mul(gate, up)
            h = h + mlp.down_proj(act if act is not None else mlp.act_fn(gate) * up)
        kept = h.index_select(1, rows)  # [1, rows, hidden], the shape the model's own LM head call sees
        return self.lm_head(_norm(kept, self.final_norm))[0].float()


def _dense_weight(linear: nn.Module) -> torch.Tensor:
    return linear.packed_weight.to_dense() if isinstance(linear, PackedLinear) else linear.weight.detach()


def _concat(linears: list[nn.Module]) -> nn.Module | None:
    """One linear computing all of `linears` (outputs concatenated), packed if they are; None
    where they cannot be joined (not linears, mixed biases or dtypes, tied weights)."""
    if not all(isinstance(m, (nn.Linear, PackedLinear)) for m in linears):
        return None
    if any(isinstance(m, PackedLinear) and m.tied_weight is not None for m in linears):
        return None
    if len({type(m) for m in linears}) != 1 or len({m.bias is None for m in linears}) != 1:
        return None
    weight = torch.cat([_dense_weight(m) for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
    joined = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    joined.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        joined.bias = nn.Parameter(bias, requires_grad=False)
    if isinstance(linears[0], PackedLinear):
        return PackedLinear(joined, False, linears[0]._ops)
    return joined


class SliceOfLinear(nn.Module):
    """Output features [start, end) of a fused linear: what a projection fused into it computes.
    Saves the state an `nn.Linear` of those rows would (`weight`, `bias`)."""

    def __init__(self, fused: nn.Module, start: int, end: int):
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a child: the fused module is its parent's
        self.start, self.end = start, end
        self.in_features, self.out_features = fused.in_features, end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start:self.end]

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = _dense_weight(self.fused)[self.start:self.end]
        if self.fused.bias is not None:
            destination[prefix + "bias"] = self.fused.bias.detach()[self.start:self.end]
