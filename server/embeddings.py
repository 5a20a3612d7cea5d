"""`POST /v1/embeddings`, in OpenAI's shape.

`input` is a string, a list of strings, a list of token ids, or a list of token-id lists;
`encoding_format` is `float` (lists of numbers) or `base64` (little-endian float32 bytes, what
openai-python asks for by default and decodes itself); `dimensions` shortens vectors where the model
declares Matryoshka sizes. Without `model`, the first embedding model in the registry answers.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import BadRequest
from server.auth import require_identity

router = APIRouter(dependencies=[Depends(require_identity)])

MAX_INPUTS = 2048  # OpenAI's own limit on inputs per request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: Any
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


def _is_ids(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def split_inputs(raw: Any) -> list[str] | list[list[int]]:
    """The request's `input` as a list of texts or a list of token-id lists."""
    if isinstance(raw, str):
        items = [raw]
    elif _is_ids(raw):
        items = [raw]
    elif isinstance(raw, list) and raw and (all(isinstance(t, str) for t in raw) or all(map(_is_ids, raw))):
        items = raw
    else:
        raise BadRequest("input must be a non-empty string, a list of strings, a list of token ids, or a "
                         "list of token-id lists (not mixed).", param="input")
    if len(items) > MAX_INPUTS:
        raise BadRequest(f"input has {len(items)} items; at most {MAX_INPUTS} per request.", param="input")
    empty = next((i for i, item in enumerate(items) if item == ""), None)
    if empty is not None:
        raise BadRequest(f"input[{empty}] is an empty string.", param="input")
    return items


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict:
    inputs = split_inputs(body.input)
    version = request.app.state.engine.registry.resolve_kind(body.model, "embedding", "embeddings")
    result = await request.app.state.engine.embed(version, inputs, body.dimensions)
    vectors = result.vectors.numpy()
    data = [{"object": "embedding", "index": i, "embedding": encode(vector, body.encoding_format)}
            for i, vector in enumerate(vectors)]
    return {"object": "list", "data": data, "model": body.model or version.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}
