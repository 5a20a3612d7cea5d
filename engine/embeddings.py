"""Embeddings: token ids in, one pooled (and by default unit-length) vector per input out.

An `EmbeddingWorker` owns one encoder (BERT-style) or decoder model without its head. Requests
that arrive while a batch runs wait in a queue and all go into the next one, so concurrent callers
share forward passes; inside a batch, inputs are sorted by length and cut into micro-batches to
keep padding small. Padding is on the right and masked, so a text's vector does not depend on
what it was batched with (up to float rounding).

Pooling is declared per version: `mean` over the real tokens, `cls` (the first token), or `last`
(the last real token, for decoder embedders). `dimensions` truncates to a smaller size only where
the version declares Matryoshka sizes; the truncated vector is normalized again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import BadRequest
from engine.registry import Version

log = logging.getLogger("ember.embeddings")


@dataclass
class EmbeddingBatch:
    """One caller's inputs and where its vectors go."""

    token_ids: list[list[int]]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class Embeddings:
    vectors: torch.Tensor  # (inputs, dimensions), float32 on the CPU
    prompt_tokens: int


@dataclass
class EmbeddingSettings:
    pooling: str = "mean"
    normalize: bool = True
    matryoshka_dimensions: tuple[int, ...] = ()
    max_length: int = 512
    max_batch_size: int = 32
    max_batch_tokens: int = 16384


def max_input_length(version: Version, model, tokenizer) -> int:
    """Longest input in tokens: the version's limit, else sentence-transformers' `max_seq_length`,
    else the model's position range."""
    if "max_model_len" in version.limits:
        return int(version.limits["max_model_len"])
    declared = Path(version.local_path or ".") / "sentence_bert_config.json"
    try:
        return int(json.loads(declared.read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError):
        pass
    positions = getattr(model.config, "max_position_embeddings", None)
    return int(positions or min(tokenizer.model_max_length, 1 << 16))


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row of `hidden` (batch, tokens, width); `mask` marks real tokens (right-padded)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class EmbeddingWorker:
    """Serves one embedding model: tokenizing callers' inputs, batching them, pooling the output."""

    def __init__(self, model, tokenizer, settings: EmbeddingSettings, device: str = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = device
        self.dimensions = int(model.config.hidden_size)
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.requests: queue.Queue[EmbeddingBatch | None] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name="ember-embeddings", daemon=True)
        self.thread.start()

    @classmethod
    def for_version(cls, model, tokenizer, version: Version, device: str) -> "EmbeddingWorker":
        settings = EmbeddingSettings(
            pooling=version.pooling or "mean", normalize=version.normalize,
            matryoshka_dimensions=version.matryoshka_dimensions,
            max_length=max_input_length(version, model, tokenizer),
            max_batch_size=int(version.limits.get("max_batch_size", 32)),
            max_batch_tokens=int(version.limits.get("max_batch_tokens", 16384)))
        return cls(model, tokenizer, settings, device)

    # ------------------------------------------------------------------ input checks

    def check_dimensions(self, dimensions: int | None) -> int:
        """The output size for a requested `dimensions` (None means the model's own)."""
        if dimensions is None or dimensions == self.dimensions:
            return self.dimensions
        allowed = self.settings.matryoshka_dimensions
        if dimensions in allowed:
            return dimensions
        if not allowed:
            raise BadRequest(f"This model's embeddings have {self.dimensions} dimensions and it was not "
                             f"trained for shorter ones; leave out 'dimensions' or send {self.dimensions}.",
                             param="dimensions")
        sizes = ", ".join(str(d) for d in sorted({self.dimensions, *allowed}))
        raise BadRequest(f"dimensions must be one of {sizes} for this model, not {dimensions}.",
                         param="dimensions")

    def tokenize(self, inputs: list[str] | list[list[int]]) -> list[list[int]]:
        """Token ids per input: texts are tokenized (with the model's special tokens), id lists are
        checked and used as given. Inputs longer than the model's limit are refused, not cut."""
        limit = self.settings.max_length
        out = []
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                ids = self.tokenizer(item, add_special_tokens=True)["input_ids"]
            else:
                bad = [t for t in item if not 0 <= t < self.vocab_size]
                if bad:
                    raise BadRequest(f"input[{index}] has token id {bad[0]} outside this model's vocabulary "
                                     f"(0..{self.vocab_size - 1}).", param="input")
                ids = list(item)
            if not ids:
                raise BadRequest(f"input[{index}] is empty.", param="input")
            if len(ids) > limit:
                raise BadRequest(f"input[{index}] has {len(ids)} tokens; this model's maximum input length "
                                 f"is {limit} tokens. Shorten or split the input.", param="input")
            out.append(ids)
        return out

    # ------------------------------------------------------------------ running

    async def embed(self, token_ids: list[list[int]], dimensions: int | None = None) -> Embeddings:
        """Vectors for already tokenized inputs, batched with whatever else is waiting."""
        size = self.check_dimensions(dimensions)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.requests.put(EmbeddingBatch(token_ids, future, loop))
        vectors = await future
        if size != self.dimensions:
            vectors = vectors[:, :size]
            if self.settings.normalize:
                vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return Embeddings(vectors=vectors, prompt_tokens=sum(len(ids) for ids in token_ids))

    def encode(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Pooled vectors (float32, CPU) in input order, computed in length-sorted micro-batches."""
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        out = torch.empty(len(token_ids), self.dimensions, dtype=torch.float32)
        start = 0
        while start < len(order):
            end = start + 1
            while (end < len(order) and end - start < self.settings.max_batch_size
                   and (end - start + 1) * len(token_ids[order[end]]) <= self.settings.max_batch_tokens):
                end += 1
            rows = order[start:end]
            out[rows] = self._forward([token_ids[i] for i in rows])
            start = end
        return out

    @torch.inference_mode()
    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, tokens in enumerate(batch):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        vectors = pool(hidden, mask, self.settings.pooling).float()
        if self.settings.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors.cpu()

    def _serve(self) -> None:
        while True:
            first = self.requests.get()
            if first is None:
                return
            waiting = [first]
            while True:
                try:
                    more = self.requests.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.requests.put(None)
                    break
                waiting.append(more)
            self._run(waiting)

    def _run(self, waiting: list[EmbeddingBatch]) -> None:
        live = [w for w in waiting if not w.future.done()]
        try:
            vectors = self.encode([ids for w in live for ids in w.token_ids])
        except Exception as exc:  # noqa: BLE001 - every waiting caller hears about the failure
            log.exception("embedding batch failed")
            for w in live:
                w.loop.call_soon_threadsafe(_settle, w.future, None, exc)
            return
        start = 0
        for w in live:
            part = vectors[start:start + len(w.token_ids)]
            start += len(w.token_ids)
            w.loop.call_soon_threadsafe(_settle, w.future, part, None)

    def abort(self, job_id: str) -> None:
        """Embedding calls are not jobs; nothing to abort."""

    def close(self) -> None:
        self.requests.put(None)
        self.thread.join(timeout=30)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

