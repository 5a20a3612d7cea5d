"""What /openapi.json says about errors and about the bodies routes read by hand.

Each dialect answers errors in its own shape (server/errors.py); these schemas document them per
router, so clients and schema-driven fuzzers know what a 4xx looks like. The Flowise prediction
and feedback routes read their bodies themselves (JSON, multipart or url-encoded form), so their
request bodies are described here.
"""

from __future__ import annotations

from http import HTTPStatus

PROBLEM = {"type": "object", "title": "Problem", "required": ["title", "detail", "status"],
           "properties": {"title": {"type": "string"}, "detail": {"type": "string"}, "status": {"type": "integer"},
                          "errors": {"type": "array", "items": {"type": "object"}}}}
OPENAI_ERROR = {"type": "object", "title": "OpenAIError", "required": ["error"],
                "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": "string", "nullable": True}, "code": {"type": "string", "nullable": True}}}}}
FLOWISE_ERROR = {"type": "object", "title": "FlowiseError", "required": ["statusCode", "success", "message"],
                 "properties": {"statusCode": {"type": "integer"}, "success": {"type": "boolean"},
                                "message": {"type": "string"}, "stack": {"type": "object"}}}
SHARED_ERROR = {"allOf": [OPENAI_ERROR, PROBLEM]}

SHAPES = {"replicate": ("application/problem+json", PROBLEM), "openai": ("application/json", OPENAI_ERROR),
          "flowise": ("application/json", FLOWISE_ERROR), "shared": ("application/json", SHARED_ERROR)}
STATUSES = (400, 401, 403, 404, 408, 413, 422, 429, 503)


def error_responses(dialect: str, statuses: tuple[int, ...] = STATUSES) -> dict:
    media, schema = SHAPES[dialect]
    return {status: {"description": HTTPStatus(status).phrase, "content": {media: {"schema": schema}}}
            for status in statuses}


_HISTORY = {"type": "array", "items": {"type": "object", "properties": {
    "role": {"type": "string", "enum": ["userMessage", "apiMessage"]}, "content": {"type": "string"}}}}
_UPLOADS = {"type": "array", "items": {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string"}, "type": {"type": "string", "enum": ["file", "url"]},
    "name": {"type": "string"}, "mime": {"type": "string"}}}}
_FORM = {"type": "object", "properties": {
    "question": {"type": "string"}, "chatId": {"type": "string"}, "streaming": {"type": "string", "enum": ["true", "false"]},
    "overrideConfig": {"type": "string", "description": "a JSON object, as text"},
    "history": {"type": "string", "description": "a JSON array, as text"}}}

FLOWISE_PREDICTION = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "title": "FlowisePrediction", "properties": {
        "question": {"type": "string"}, "overrideConfig": {"type": "object"}, "chatId": {"type": "string"},
        "history": _HISTORY, "uploads": _UPLOADS, "streaming": {"type": "boolean"}}}},
    "multipart/form-data": {"schema": {**_FORM, "properties": {
        **_FORM["properties"], "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/x-www-form-urlencoded": {"schema": _FORM}}}}

FLOWISE_FEEDBACK = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "title": "FlowiseFeedback", "required": ["messageId", "rating"], "properties": {
        "chatflowid": {"type": "string"}, "chatId": {"type": "string"}, "messageId": {"type": "string"},
        "rating": {"type": "string", "enum": ["THUMBS_UP", "THUMBS_DOWN"]}, "content": {"type": "string"}}}}}}}
