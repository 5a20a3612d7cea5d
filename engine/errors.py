"""Engine errors. Each carries an HTTP-ish status so every API dialect can render it in its own
error shape without re-deciding what went wrong."""

from __future__ import annotations


class EmberError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInput(EmberError):
    status = 422
    code = "invalid_input"


class BadRequest(InvalidInput):
    """Malformed input that the dialect answers with 400 rather than 422."""

    status = 400
    code = "bad_request"


class JobFailed(EmberError):
    """A synchronous request whose job failed while running."""

    status = 500
    code = "job_failed"


class ModelNotFound(EmberError):
    status = 404
    code = "model_not_found"


class ModelUnavailable(EmberError):
    """The version exists but cannot serve: weights missing, load failed, or not fitting."""

    status = 503
    code = "model_unavailable"


class PromptTooLong(EmberError):
    status = 400
    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_model_len: int, param: str = "messages"):
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_new_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_new_tokens} for the completion). Please reduce the prompt or max tokens.",
            param=param,
        )
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.max_model_len = max_model_len


class QuotaExceeded(EmberError):
    """The caller's key already holds as much as it may (files, bytes, sessions)."""

    status = 429
    code = "quota_exceeded"


class QueueFull(EmberError):
    status = 503
    code = "queue_full"
    retry_after: int = 1


class NotFound(EmberError):
    status = 404
    code = "not_found"


class Forbidden(EmberError):
    status = 403
    code = "forbidden"


class ModelBusy(EmberError):
    """A lifecycle change (unload, sleep) asked of a version that is serving requests."""

    status = 409
    code = "model_busy"
