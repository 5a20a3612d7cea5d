"""Text jobs: from a dialect-neutral task to prompt tokens, through the LLM engine, to job events.

Every dialect builds a `TextTask` (chat messages, a raw prompt or prompt token ids, tools, output
format, sampling) and the engine runs it here, so prompt templates, forced tool calls and JSON
output behave the same whichever API the request came through. The job's events carry the
model's text as generated; reading tool calls out of it is dialect work (server/tool_calls.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidInput, PromptTooLong
from engine.jobs import Choice, Job
from engine.llm.types import GenerationRequest, SamplingParams
from engine.registry import Version
from engine.tool_choice import chosen_tools

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


def prepare(task: TextTask, job: Job, version: Version, tokenizer, max_model_len: int) -> PreparedText:
    """Tokenize the task and check it fits the context, before anything is queued."""
    tools = chosen_tools(task.tools, task.tool_choice) or None
    if task.prompt_token_ids is not None:
        ids = _checked_token_ids(task.prompt_token_ids, len(tokenizer))
        job.prompt_text = tokenizer.decode(ids)
    else:
        job.prompt_text, ids = _prompt_ids(task, version, tokenizer, tools)
    params = task.params
    if len(ids) + params.max_new_tokens > max_model_len:
        if task.max_tokens_clip and len(ids) < max_model_len:
            params.max_new_tokens = max_model_len - len(ids)
        else:
            raise PromptTooLong(len(ids), 1 if task.max_tokens_clip else params.max_new_tokens, max_model_len)
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


def _prompt_ids(task: TextTask, version: Version, tokenizer, tools: list[dict] | None) -> tuple[str, list[int]]:
    """The prompt's text and token ids."""
    if task.messages is not None:
        if not task.messages:
            raise InvalidInput("messages must not be empty", param="messages")
        text = render_chat(tokenizer, task.messages, tools)
    else:
        text = render_prompt(task, version, tokenizer)
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return text, tokenizer(text, add_special_tokens=add_special)["input_ids"]


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
