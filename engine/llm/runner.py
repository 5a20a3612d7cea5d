"""Runs one scheduled step through the transformers model.

The step's tokens are packed into one row: sequences computing one token first (decodes and
one-token prefill chunks), then multi-token prefill chunks (attention.py explains how each layer
attends). Positions come from each sequence's own offsets, new KV slots from its block table, and
only the hidden states whose logits are needed go through the LM head (`logits_to_keep` with
explicit indices): the last token of every sequence that samples, plus every token of the
sequences that asked for prompt logprobs. On CUDA, steps in which every sequence decodes its next
token replay CUDA graphs (cuda_graphs.py).

The KV cache is allocated per layer, on the device of that layer's attention module, so a model
spread over several devices keeps each layer's cache next to its weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch

from engine.llm import attention
from engine.llm.attention import AttentionBatch, SpanGroup, allocate_kv
from engine.llm.attention_cpu import TorchBackend
from engine.llm.cpu_forward import LeanForward
from engine.llm.cpu_fused import fuse_cpu_ops
from engine.llm.cpu_linear import pack_linears, warm_up
from engine.llm.sequence import Sequence
from engine.llm.transfer import array_to_device, to_device
from engine.llm.types import SamplingParams

logger = logging.getLogger(__name__)
LEAN_SWITCH = "EMBER_CPU_LEAN_FORWARD"  # "0": every CPU step through the model's own forward


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


def layer_devices(model: torch.nn.Module, num_layers: int) -> list[torch.device]:
    """The device of each decoder layer's attention module (the modules transformers hands a
    `layer_idx`), falling back to the model's first parameter's device."""
    default = next(model.parameters()).device
    devices: dict[int, torch.device] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and idx not in devices:
            param = next(module.parameters(), None)
            if param is not None:
                devices[idx] = param.device
    return [devices.get(i, default) for i in range(num_layers)]


@dataclass
class TokenFeed:
    """Input tokens that are still on the device. With async scheduling (core.py) a sequence's
    next step is issued before the host has read the token sampled for it in the step before; its
    last token id on the host is then a placeholder, and the step takes the token from `tokens`
    (the previous step's sampled ids) at row `rows[seq_id]`."""

    tokens: torch.Tensor
    rows: dict[int, int]

    def fill(self, input_ids: torch.Tensor, last_positions: list[tuple[int, int]]) -> None:
        """Given (position in input_ids, seq_id) of each sequence's last input token, overwrite
        those of the fed sequences with their tokens, on the device."""
        fed = [(position, self.rows[seq_id]) for position, seq_id in last_positions if seq_id in self.rows]
        if fed:
            positions, rows = zip(*fed)
            device = input_ids.device
            input_ids[0, to_device(positions, torch.long, device)] = self.tokens[to_device(rows, torch.long, device)]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, *, cuda_graphs: bool = False,
                 max_num_seqs: int = 64, max_model_len: int = 2048, max_num_batched_tokens: int = 2048):
        self.model = model
        self.device = next(model.parameters()).device
        self.packed_linears = pack_linears(model)  # CPU bf16 only (cpu_linear.py); 0 elsewhere
        self.fused_ops = fuse_cpu_ops(model, max_model_len)  # CPU only (cpu_fused.py): fused elementwise ops
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks  # one extra block that padding rows write to and attend to
        num_layers, num_kv_heads, head_dim = kv_layout(model)
        self.k_caches, self.v_caches = allocate_kv(layer_devices(model, num_layers), num_blocks, block_size,
                                                   num_kv_heads, head_dim, self.dtype)
        num_heads = model.config.get_text_config().num_attention_heads
        if self.device.type == "cuda":
            from engine.llm.attention_cuda import select_backend

            self.backend = select_backend(self.dtype, self.device, block_size, num_heads, num_kv_heads, head_dim)
        else:
            self.backend = TorchBackend(self.dtype, self.device)
        attention.register()
        model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
        self.supports_logits_to_keep = getattr(model, "_supports_logits_to_keep", lambda: False)()
        self.lean = self.check_lean_forward()
        if self.packed_linears:  # after the lean forward fused its projections: their final shapes
            warm_up(model, max_num_batched_tokens)
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            from engine.llm.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_num_seqs, max_model_len)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes held for the KV cache and the attention/graph workspaces."""
        total = sum(t.numel() * t.element_size() for t in self.k_caches + self.v_caches)
        total += getattr(self.backend, "workspace_bytes", 0)
        if self.graphs is not None:
            total += self.graphs.buffer_bytes
        return total

    def _group(self, seqs: list[Sequence], num_tokens: list[int], row_start: int) -> SpanGroup:
        """Block tables (padded with the scratch block), context lengths and query offsets."""
        bs = self.block_size
        contexts = [s.num_computed_tokens + n for s, n in zip(seqs, num_tokens)]
        widths = [-(-c // bs) for c in contexts]
        tables = np.full((len(seqs), max(widths)), self.scratch_block, dtype=np.int32)
        for row, (s, w) in enumerate(zip(seqs, widths)):
            tables[row, :w] = s.block_table[:w]
        q_max = max(num_tokens)
        host_tables = [s.block_table[:w] for s, w in zip(seqs, widths)]
        starts = list(accumulate(num_tokens, initial=0))
        return SpanGroup(row_start, sum(num_tokens), array_to_device(tables, self.device),
                         to_device(contexts, torch.int32, self.device), to_device(starts, torch.int32, self.device),
                         q_max, query_lens=list(num_tokens) if q_max > 1 else None,
                         host_tables=host_tables, host_context_lens=contexts)

    def prepare(self, seqs: list[Sequence], num_tokens: list[int], prompt_logprob_seqs: frozenset[int] = frozenset(),
                feed: TokenFeed | None = None):
        """Pack the step. Returns (model kwargs, LM-head rows, sequences sampled in row order,
        {seq_id: (first, end) range of its rows among the LM-head rows} for prompt logits)."""
        bs = self.block_size
        single = [i for i, n in enumerate(num_tokens) if n == 1]
        multi = [i for i, n in enumerate(num_tokens) if n > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        prompt_rows: dict[int, range] = {}
        last_positions: list[tuple[int, int]] = []  # (position in input_ids, seq_id), for the feed
        for i in single + multi:
            s, n = seqs[i], num_tokens[i]
            p = s.num_computed_tokens
            start = len(input_ids)
            input_ids.extend(s.token_ids[p:p + n])
            if feed is not None:
                last_positions.append((start + n - 1, s.seq_id))
            positions.extend(range(p, p + n))
            table = s.block_table
            slot_mapping.extend(table[q // bs] * bs + q % bs for q in range(p, p + n))
            if p + n == s.num_tokens:
                sample_rows.append(start + n - 1)
                sampled.append(s)
            if s.seq_id in prompt_logprob_seqs:
                prompt_rows[s.seq_id] = range(start, start + n)

        keep = list(sample_rows)
        extra: dict[int, tuple[int, int]] = {}
        for seq_id, rows in prompt_rows.items():
            extra[seq_id] = (len(keep), len(keep) + len(rows))
            keep.extend(rows)
        batch = AttentionBatch(
            self.k_caches, self.v_caches,
            slot_mapping=to_device(slot_mapping, torch.long, self.device),
            backend=self.backend,
            single=self._group([seqs[i] for i in single], [1] * len(single), 0) if single else None,
            multi=self._group([seqs[i] for i in multi], [num_tokens[i] for i in multi], len(single)) if multi else None,
        )
        ids = to_device([input_ids], torch.long, self.device)
        if feed is not None:
            feed.fill(ids, last_positions)
        kwargs = {
            "input_ids": ids,
            "position_ids": to_device([positions], torch.long, self.device),
            "use_cache": False,
            "ember_batch": batch,
        }
        rows = to_device(keep, torch.long, self.device)
        if self.supports_logits_to_keep:
            kwargs["logits_to_keep"] = rows
        return kwargs, rows, sampled, extra

    def check_lean_forward(self) -> LeanForward | None:
        """cpu_forward.LeanForward for this model, if it takes the model and its logits agree with
        the model's own forward on a probe step (a 5-token prompt written into the first blocks, which
        are free at start-up); else None and every step goes through the model's forward.
        `EMBER_CPU_LEAN_FORWARD=0` keeps the model's forward."""
        if (self.device.type != "cpu" or os.environ.get(LEAN_SWITCH, "1") == "0"
                or not LeanForward.supports(self.model) or self.num_blocks * self.block_size < 5):
            return None
        lean = LeanForward(self.model)
        vocab = self.model.config.get_text_config().vocab_size
        probe = Sequence(-1, "probe", 0, [(7 * i + 3) % vocab for i in range(5)], 5, SamplingParams(),
                         block_table=list(range(-(-5 // self.block_size))))

        def probe_logits(step) -> torch.Tensor:
            with torch.inference_mode():
                kwargs, rows, _, _ = self.prepare([probe], [5], frozenset({-1}))
                return step(kwargs, rows)

        def model_step(kwargs, rows) -> torch.Tensor:
            logits = self.model(**kwargs).logits[0].float()
            return logits if "logits_to_keep" in kwargs else logits[rows]

        def lean_step(kwargs, rows) -> torch.Tensor:
            return lean(kwargs["input_ids"], kwargs["position_ids"], kwargs["ember_batch"], rows)

        def agrees(got: torch.Tensor) -> bool:
            return got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3))

        want = probe_logits(model_step)
        ok = agrees(probe_logits(lean_step))
        if ok and lean.fuse_projections():  # fused q/k/v and gate/up, checked the same way
            if agrees(probe_logits(lean_step)):
                lean.drop_unfused()
            else:
                lean.undo_fusion()
        for cache in self.k_caches + self.v_caches:  # leave the cache as it was found
            cache[:len(probe.block_table)].zero_()
        if not ok:
            logger.warning("the lean CPU forward disagrees with the model's own on a probe step; not used")
            return None
        return lean

    @staticmethod
    def is_decode_step(seqs: list[Sequence], num_tokens: list[int]) -> bool:
        """Every sequence computes exactly its last token (so every row samples). A one-token
        prefill chunk in the middle of a prompt is not a decode, even though its row has one token."""
        return all(n == 1 and s.num_computed_tokens + 1 == s.num_tokens for s, n in zip(seqs, num_tokens))

    @torch.inference_mode()
    def execute(self, seqs: list[Sequence], num_tokens: list[int],
                prompt_logprob_seqs: frozenset[int] = frozenset(), feed: TokenFeed | None = None,
                ) -> tuple[torch.Tensor, list[Sequence], dict[int, torch.Tensor]]:
        """Run the step (on CUDA: queue it; nothing here waits for the device). Returns float32
        logits [num_sampled, vocab], the sampled sequences (in the logits' row order), and for
        every seq_id in `prompt_logprob_seqs` the float32 logits of every token this step
        computes for it, [n_tokens_this_step, vocab] in position order. `feed` supplies the input
        tokens the host has not read yet."""
        if self.graphs is not None and not prompt_logprob_seqs and self.is_decode_step(seqs, num_tokens):
            logits = self.graphs.run(seqs, feed)
            if logits is not None:
                return logits.float(), list(seqs), {}
        kwargs, rows, sampled, extra = self.prepare(seqs, num_tokens, prompt_logprob_seqs, feed)
        if self.lean is not None:
            logits = self.lean(kwargs["input_ids"], kwargs["position_ids"], kwargs["ember_batch"], rows)
        else:
            logits = self.model(**kwargs).logits[0]
            if "logits_to_keep" not in kwargs:
                logits = logits[rows]
            logits = logits.float()
        prompt_logits = {seq_id: logits[a:b] for seq_id, (a, b) in extra.items()}
        return logits[:len(sampled)], sampled, prompt_logits
