"""Runs one scheduled step through the transformers model.

The step's tokens are packed into one row: decode tokens first (one per sequence), then prefill
chunks (attention.py explains how each layer attends). Positions come from each sequence's own
offsets, new KV slots from its block table, and only the hidden states of tokens whose next token
is sampled go through the LM head (`logits_to_keep` with explicit indices). On CUDA, decode-only
steps replay CUDA graphs (cuda_graphs.py).
"""

from __future__ import annotations

from itertools import accumulate

import torch

from engine.llm import attention
from engine.llm.attention import AttentionBatch, PaddedDecode, Span, Varlen, Workspace
from engine.llm.sequence import Sequence


def kv_layout(model: torch.nn.Module) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder-only transformers model."""
    config = model.config.get_text_config()
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return config.num_hidden_layers, num_kv_heads, head_dim


def kv_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype) -> int:
    num_layers, num_kv_heads, head_dim = kv_layout(model)
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, *, cuda_graphs: bool = False,
                 max_num_seqs: int = 64, max_model_len: int = 2048):
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks  # one extra block that padding rows may write to
        self.kv_shape = num_layers, num_kv_heads, head_dim = kv_layout(model)
        slots = (num_blocks + 1) * block_size
        # One allocation for the whole cache; per-layer [1, kv_heads, slots, head_dim] views into it.
        self.kv = torch.zeros(2, num_layers, 1, num_kv_heads, slots, head_dim, dtype=self.dtype, device=self.device)
        self.k_caches = list(self.kv[0])
        self.v_caches = list(self.kv[1])
        self.workspace = Workspace(num_kv_heads, head_dim, self.dtype, self.device)
        self.padded_decode = self.device.type != "cpu"
        self.use_flash = (self.device.type == "cuda" and attention.flash_attn_varlen_func is not None
                          and self.dtype in (torch.float16, torch.bfloat16) and self._flash_self_check())
        attention.register()
        model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
        self.supports_logits_to_keep = getattr(model, "_supports_logits_to_keep", lambda: False)()
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            from engine.llm.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_num_seqs, max_model_len)

    def _flash_self_check(self) -> bool:
        """flash-attn varlen must agree with the SDPA path on a small synthetic batch (one decode
        with context, one prefill chunk after context, one fresh prefill) before it is used."""
        try:
            _, heads_kv, dim = self.kv_shape
            gen = torch.Generator(device=self.device).manual_seed(0)
            rand = lambda *shape: torch.randn(*shape, generator=gen, device=self.device, dtype=self.dtype)
            cache_k, cache_v = rand(1, heads_kv, 64, dim), rand(1, heads_kv, 64, dim)
            spans = [Span(0, 1, 20, slots=torch.arange(20, device=self.device)),
                     Span(1, 6, 12, slots=torch.arange(30, 42, device=self.device)),
                     Span(6, 10, 4, slots=torch.arange(50, 54, device=self.device), fresh=True)]
            slot_mapping = torch.tensor([19, 37, 38, 39, 40, 41, 50, 51, 52, 53], device=self.device)
            query, key, value = rand(1, heads_kv * 2, 10, dim), rand(1, heads_kv, 10, dim), rand(1, heads_kv, 10, dim)
            cu = [torch.tensor(list(accumulate(x, initial=0)), dtype=torch.int32, device=self.device)
                  for x in ([1, 5, 4], [20, 12, 4])]
            layer = type("Layer", (), {"layer_idx": 0})()
            results = []
            for varlen in (None, Varlen(torch.cat([s.slots for s in spans]), cu[0], cu[1], 5, 20)):
                batch = AttentionBatch([cache_k.clone()], [cache_v.clone()], slot_mapping, spans,
                                       Workspace(heads_kv, dim, self.dtype, self.device), varlen=varlen)
                results.append(attention.paged_attention(layer, query, key, value, None, scaling=dim ** -0.5,
                                                         ember_batch=batch)[0].float())
            return bool(torch.allclose(results[0], results[1], atol=2e-2, rtol=2e-2))
        except Exception:  # noqa: BLE001 - any failure just means: do not use flash-attn
            return False

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _context_slots(self, table: list[int], length: int, on_device: bool = True) -> torch.Tensor:
        bs = self.block_size
        blocks = torch.tensor(table[:-(-length // bs)], dtype=torch.long)
        slots = (blocks[:, None] * bs + torch.arange(bs)).reshape(-1)[:length]
        return slots.to(self.device) if on_device else slots

    def _padded(self, decode: list[Sequence]) -> PaddedDecode:
        bs = self.block_size
        lens = [s.num_computed_tokens + 1 for s in decode]
        max_len = max(lens)
        width = -(-max_len // bs)
        tables = torch.tensor([(s.block_table + [0] * width)[:width] for s in decode], dtype=torch.long)
        slots = (tables[:, :, None] * bs + torch.arange(bs)).reshape(len(decode), -1)[:, :max_len]
        return PaddedDecode(len(decode), slots.reshape(-1).to(self.device),
                            torch.tensor(lens, dtype=torch.long, device=self.device), max_len)

    def prepare(self, seqs: list[Sequence], num_tokens: list[int]):
        """Pack the step. Returns (model kwargs, logits rows, sequences sampled, in row order)."""
        bs = self.block_size
        is_decode = [n == 1 and s.num_computed_tokens > 0 for s, n in zip(seqs, num_tokens)]
        order = [i for i, d in enumerate(is_decode) if d] + [i for i, d in enumerate(is_decode) if not d]
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        spans: list[Span] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for i in order:
            s, n = seqs[i], num_tokens[i]
            p = s.num_computed_tokens
            start = len(input_ids)
            input_ids.extend(s.token_ids[p:p + n])
            positions.extend(range(p, p + n))
            table = s.block_table
            if n == 1:
                slot_mapping.append(table[p // bs] * bs + p % bs)
            else:
                slot_mapping.extend(self._slots(table, p, p + n))
            span = Span(start, start + n, p + n, fresh=p == 0)
            if p > 0:
                if s.num_runs == 1:
                    span.view_start = table[0] * bs
                elif not (self.padded_decode and is_decode[i]):
                    span.slots = self._context_slots(table, p + n)
            spans.append(span)
            if p + n == s.num_tokens:
                sample_rows.append(start + n - 1)
                sampled.append(s)

        decode = [seqs[i] for i in order if is_decode[i]]
        batch = AttentionBatch(
            self.k_caches, self.v_caches,
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
            spans=spans, workspace=self.workspace,
            padded_decode=self._padded(decode) if self.padded_decode and decode and not self.use_flash else None,
            varlen=self._varlen([seqs[i] for i in order], spans) if self.use_flash else None,
        )
        kwargs = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long, device=self.device),
            "position_ids": torch.tensor([positions], dtype=torch.long, device=self.device),
            "use_cache": False,
            "ember_batch": batch,
        }
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        if self.supports_logits_to_keep:
            kwargs["logits_to_keep"] = rows
        return kwargs, rows, sampled

    def _varlen(self, seqs: list[Sequence], spans: list[Span]) -> Varlen:
        slots = torch.cat([self._context_slots(s.block_table, span.context_len, on_device=False)
                           for s, span in zip(seqs, spans)])
        q_lens = [span.q_len for span in spans]
        k_lens = [span.context_len for span in spans]
        cu_q, cu_k = (torch.tensor(list(accumulate(x, initial=0)), dtype=torch.int32, device=self.device)
                      for x in (q_lens, k_lens))
        return Varlen(slots.to(self.device), cu_q, cu_k, max(q_lens), max(k_lens))

    @torch.inference_mode()
    def execute(self, seqs: list[Sequence], num_tokens: list[int]) -> tuple[torch.Tensor, list[Sequence]]:
        """Run the step; returns float32 logits [num_sampled, vocab] and the sampled sequences."""
        if self.graphs is not None and all(n == 1 and s.num_computed_tokens > 0 for s, n in zip(seqs, num_tokens)):
            logits = self.graphs.run(seqs)
            if logits is not None:
                return logits.float(), seqs
        kwargs, rows, sampled = self.prepare(seqs, num_tokens)
        logits = self.model(**kwargs).logits[0]
        if "logits_to_keep" not in kwargs:
            logits = logits[rows]
        return logits.float(), sampled
