"""Text jobs: from a dialect-neutral task to prompt tokens, through the LLM engine, to job events.

Every dialect builds a `TextTask` (chat messages, a raw prompt or prompt token ids, tools, output
format, sampling) and the engine runs it here, so prompt templates, forced tool calls and JSON
output behave the same whichever API the request came through. The job's events carry the
model's text as generated; reading tool calls out of it is dialect work (server/tool_calls.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from engine.errors import BadRequest, InvalidInput, PromptTooLong
from engine.jobs import Choice, Job
from engine.llm.types import GenerationRequest, SamplingParams
from engine.registry import Version
from engine.tool_choice import chosen_tools

# A prompt longer than this many characters per context token cannot fit any tokenizer's context:
# refuse it before tokenizing (tokenizing 10 MB costs far more memory than the text itself).
MAX_CHARS_PER_TOKEN = 16

# Tokenizing a long text leaves tens of MiB in the allocator's free lists that the process never
# gives back (glibc keeps them per thread arena); after texts this long, hand them back.
RELEASE_AFTER_CHARS = 64 * 1024

# Used when a tokenizer has no chat template: plain role headers, documented in the README.
FALLBACK_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}" \
                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"


@dataclass
class TextTask:
    """What to generate, independent of the API dialect that asked."""

    messages: list[dict] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None  # used as given: no template, no special tokens added
    system_prompt: str | None = None
    prompt_template: str | None = None
    tools: list[dict] | None = None
    tool_choice: Any = "auto"  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    response_format: dict | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens_clip: bool = False  # clip max_new_tokens to the context instead of failing
    priority: int = 0  # lower is scheduled first; FIFO within a priority
    # messages[start:end] are a stored conversation's history: when the whole does not fit the
    # context, its oldest turns are left out (whole turns, each starting at a user message).
    history_span: tuple[int, int] | None = None


# What shared_prefix_key keeps of a plain prompt, and the shortest shared start worth a key (a few
# KV blocks at most: not worth steering a request for).
PREFIX_CHARS = 1024
PREFIX_TOKENS = 256
MIN_PREFIX_CHARS = 64


def shared_prefix_key(task: TextTask) -> str | None:
    """A digest of the part of the task's prompt that other requests may share, so that a router
    can send them where its KV blocks are cached: the system prompt, the tools and every message
    but the last; for a plain prompt its first PREFIX_CHARS characters (or PREFIX_TOKENS token
    ids). None when that part is too short to matter."""
    messages, system = task.messages, task.system_prompt
    if messages and (len(messages) > 1 or system):
        return _digest(json.dumps([system, task.tools, messages[:-1]], sort_keys=True, default=str))
    if task.prompt_token_ids:
        ids = task.prompt_token_ids
        return _digest(json.dumps(ids[:PREFIX_TOKENS])) if len(ids) >= PREFIX_TOKENS else None
    if messages:
        content = messages[0].get("content") if isinstance(messages[0], dict) else None
        text = content if isinstance(content, str) else ""
    else:
        text = (system or "") + (task.prompt or "")
    return _digest(text[:PREFIX_CHARS]) if len(text) >= PREFIX_CHARS else None


def _digest(text: str) -> str | None:
    if len(text) < MIN_PREFIX_CHARS:
        return None
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass
class PreparedText:
    request: GenerationRequest


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise InvalidInput("message content must be a string or a list of content parts", param="messages")


def _with_decoded_arguments(call: dict) -> dict:
    """OpenAI sends tool-call arguments as a JSON string; chat templates expect a mapping
    (a string would be JSON-encoded a second time)."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments)
        except json.JSONDecodeError:
            return call
        if isinstance(decoded, dict):
            return {**call, "function": {**function, "arguments": decoded}}
    return call


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None) -> str:
    """Chat template text for messages; tools go to the template, or into the system prompt when
    the template cannot take them."""
    template = tokenizer.chat_template or FALLBACK_TEMPLATE
    messages = [dict(m) for m in messages]
    for message in messages:
        if not isinstance(message.get("content"), str) and message.get("content") is not None:
            message["content"] = _message_text(message["content"])
        if message.get("tool_calls"):
            message["tool_calls"] = [_with_decoded_arguments(c) for c in message["tool_calls"]]
    if tools and "tools" not in template:
        listing = "\n".join(json.dumps(t.get("function", t)) for t in tools)
        preamble = ("You can call these tools. To call one, answer only with "
                    "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.\n" + listing)
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{preamble}"
        else:
            messages.insert(0, {"role": "system", "content": preamble})
        tools = None
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template,
                                             add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - template errors (e.g. role order) are user input errors
        raise InvalidInput(f"the chat template rejected these messages: {exc}", param="messages") from exc


def render_prompt(task: TextTask, version: Version, tokenizer) -> str:
    """Text for a raw-prompt task: the prompt template (request's, else version's), else the chat
    template with a system and a user message."""
    template = task.prompt_template or version.prompt_template
    if template:
        if "{prompt}" not in template:
            raise InvalidInput("prompt_template must contain {prompt}", param="prompt_template")
        return template.replace("{system_prompt}", task.system_prompt or "").replace("{prompt}", task.prompt or "")
    messages = ([{"role": "system", "content": task.system_prompt}] if task.system_prompt else []) + \
        [{"role": "user", "content": task.prompt or ""}]
    if tokenizer.chat_template:
        return render_chat(tokenizer, messages, None)
    return "\n\n".join(m["content"] for m in messages)


def _render(task: TextTask, version: Version, tokenizer, tools: list[dict] | None) -> str:
    if task.messages is not None:
        if not task.messages:
            raise InvalidInput("messages must not be empty", param="messages")
        return render_chat(tokenizer, task.messages, tools)
    return render_prompt(task, version, tokenizer)


def _tokenize(tokenizer, text: str) -> list[int]:
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    if len(text) >= RELEASE_AFTER_CHARS:
        release_free_memory()
    return ids


def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_memory() -> None:
    """Return the allocator's free memory to the OS (glibc's malloc_trim; elsewhere nothing)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _chars(messages: list[dict]) -> int:
    return sum(len(_message_text(m.get("content"))) for m in messages)


def _turn_starts(messages: list[dict], start: int, end: int) -> list[int]:
    """Where the kept history may begin: at each user message, or with no history at all."""
    return [i for i in range(start, end) if messages[i].get("role") == "user"] + [end]


def _drop_history(task: TextTask, cut: int) -> None:
    start, end = task.history_span
    task.messages = task.messages[:start] + task.messages[cut:]
    task.history_span = (start, end - (cut - start))


def _room_needed(task: TextTask, max_model_len: int) -> int:
    """Tokens the completion needs: what was asked, or a quarter of the context when no length
    was asked for (the completion is clipped to what is left)."""
    asked = task.params.max_new_tokens
    return min(asked, max(1, max_model_len // 4)) if task.max_tokens_clip else asked


def _fit_history(task: TextTask, version: Version, tokenizer, tools, max_model_len: int,
                 char_limit: int) -> list[int] | None:
    """Leave out the oldest history turns until the prompt fits (characters first, cheaply, then
    tokens by bisection over turn boundaries). The prompt's tokens, or None without history."""
    if task.history_span is None or task.messages is None:
        return None
    start, end = task.history_span
    cuts = _turn_starts(task.messages, start, end)
    fixed = _chars(task.messages[:start] + task.messages[end:])
    cuts = [c for c in cuts if fixed + _chars(task.messages[c:end]) <= char_limit] or [end]
    room = _room_needed(task, max_model_len)

    def tokens_from(cut: int) -> list[int]:
        messages = task.messages[:start] + task.messages[cut:]
        return _tokenize(tokenizer, render_chat(tokenizer, messages, tools))

    low, high = 0, len(cuts) - 1  # the first cut that fits is the one that keeps the most history
    best = tokens_from(cuts[high])
    if len(best) + room > max_model_len:
        _drop_history(task, cuts[high])
        return best
    while low < high:
        middle = (low + high) // 2
        ids = tokens_from(cuts[middle])
        if len(ids) + room <= max_model_len:
            high, best = middle, ids
        else:
            low = middle + 1
    _drop_history(task, cuts[high])
    return best


def _check_chars(task: TextTask, char_limit: int) -> None:
    if task.messages is not None:
        span = task.history_span or (0, 0)
        own = task.messages[:span[0]] + task.messages[span[1]:]
        size, param = _chars(own), "messages"
    else:
        size, param = len(task.prompt or "") + len(task.system_prompt or ""), "prompt"
    if size > char_limit:
        raise InvalidInput(f"the prompt is {size} characters; this model takes at most {char_limit}", param=param)


def prepare(task: TextTask, job: Job, version: Version, tokenizer, max_model_len: int) -> PreparedText:
    """Tokenize the task and check it fits the context, before anything is queued."""
    tools = chosen_tools(task.tools, task.tool_choice) or None
    if task.prompt_token_ids is not None:
        ids = _checked_token_ids(task.prompt_token_ids, len(tokenizer))
        job.prompt_text = tokenizer.decode(ids)
    else:
        char_limit = max_model_len * MAX_CHARS_PER_TOKEN
        _check_chars(task, char_limit)
        ids = _fit_history(task, version, tokenizer, tools, max_model_len, char_limit)
        if ids is None:
            job.prompt_text = _render(task, version, tokenizer, tools)
            ids = _tokenize(tokenizer, job.prompt_text)
        else:
            job.prompt_text = tokenizer.decode(ids)
        if not ids:
            raise BadRequest("the prompt is empty", param="messages" if task.messages is not None else "prompt")
    params = task.params
    if len(ids) + params.max_new_tokens > max_model_len:
        if task.max_tokens_clip and len(ids) < max_model_len:
            params.max_new_tokens = max_model_len - len(ids)
        else:
            prompt_param = "messages" if task.messages is not None else "prompt"
            param = "max_tokens" if len(ids) < max_model_len and not task.max_tokens_clip else prompt_param
            raise PromptTooLong(len(ids), 1 if task.max_tokens_clip else params.max_new_tokens, max_model_len,
                                param=param)
    outside = [t for t in params.logit_bias if not 0 <= t < len(tokenizer)]
    if outside:
        raise InvalidInput(f"logit_bias token ids must be between 0 and {len(tokenizer) - 1}; got {outside[:5]}",
                           param="logit_bias")
    job.prompt_tokens = len(ids)
    request = GenerationRequest(request_id=job.id, prompt_token_ids=ids, params=params, priority=task.priority)
    if task.response_format or (tools and task.tool_choice not in (None, "auto", "none")):
        from engine.llm.grammar import constraint_factory

        request.constraint_factory = constraint_factory(tokenizer, task.response_format, tools,
                                                        task.tool_choice)
    return PreparedText(request=request)


def _checked_token_ids(ids: list[int], vocab_size: int) -> list[int]:
    if not ids:
        raise InvalidInput("the prompt is empty", param="prompt")
    outside = [t for t in ids if not 0 <= t < vocab_size]
    if outside:
        raise InvalidInput(f"prompt token ids must be between 0 and {vocab_size - 1}; got {outside[:5]}",
                           param="prompt")
    return list(ids)


async def run(job: Job, prepared: PreparedText, llm) -> None:
    """Stream the LLM's deltas into job events, as generated."""
    n = prepared.request.params.n
    job.choices = [Choice(index=i) for i in range(n)]
    chunks: list[str] = []
    errors: list[str] = []
    async for delta in llm.generate(prepared.request):
        choice = job.choices[delta.index]
        choice.completion_tokens = delta.completion_tokens
        choice.logprobs.extend(delta.logprobs)
        prompt_logprobs = getattr(delta, "prompt_logprobs", None) or None
        if prompt_logprobs:
            choice.prompt_logprobs = prompt_logprobs
        choice.text += delta.text
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            if delta.error:
                errors.append(delta.error)
        if delta.index == 0 and delta.text:
            chunks.append(delta.text)
        if delta.text or delta.logprobs or prompt_logprobs or delta.finish_reason:
            job.emit("output", delta.text, choice=delta.index, logprobs=delta.logprobs or None,
                     prompt_logprobs=prompt_logprobs, finish_reason=delta.finish_reason)
    job.output = chunks
    if errors:
        job.finish("failed", errors[0])
    elif any(c.finish_reason == "abort" for c in job.choices):
        job.finish("canceled")
    else:
        job.finish("succeeded")
