"""Conversations kept across requests, shared by the OpenAI-style and Flowise-style routers.

A session is a stored list of messages (OpenAI roles: system, user, assistant, tool) owned by the
identity that created it. A request naming a session gets its stored messages prepended; after
the answer, the new turn is appended. Flowise's chat messages are the same rows, shown with its
role names (userMessage / apiMessage).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from server.store import Store

FLOWISE_ROLES = {"user": "userMessage", "assistant": "apiMessage"}
OPENAI_ROLES = {v: k for k, v in FLOWISE_ROLES.items()}


@dataclass
class Conversation:
    session_id: str
    history: list[dict]  # stored messages, oldest first, in OpenAI chat shape
    created: bool  # True when this request started the session


def _as_chat_message(row: dict) -> dict:
    message = {"role": row["role"], "content": row["content"]}
    for key in ("tool_calls", "tool_call_id", "name"):
        if row.get(key):
            message[key] = row[key]
    return message


def open_conversation(store: Store, identity: str | None, session_id: str | None, *, model: str,
                      flow_id: str | None = None, create_with_id: bool = False) -> Conversation:
    """The session named (checked against the caller's identity), or a new one.

    With `create_with_id`, an unknown `session_id` starts a session under that id (Flowise lets
    clients choose their own ids); otherwise an unknown id is NotFound.
    """
    if session_id:
        if create_with_id and store.find_session(session_id) is None:
            store.create_session(identity, model, flow_id=flow_id, session_id=session_id)
            return Conversation(session_id, [], created=True)
        store.get_session(session_id, identity)
        rows = store.messages(session_id=session_id)
        return Conversation(session_id, [_as_chat_message(r) for r in rows], created=False)
    session = store.create_session(identity, model, flow_id=flow_id)
    return Conversation(session["id"], [], created=True)


@contextmanager
def dropped_on_error(store: Store, conversation: Conversation | None, identity: str | None):
    """A session this request started is deleted again if the request fails before answering."""
    try:
        yield
    except BaseException:
        if conversation is not None and conversation.created:
            store.delete_session(conversation.session_id, identity)
        raise


def record_turn(store: Store, conversation: Conversation, new_messages: list[dict], answer: dict,
                *, flow_id: str | None = None, chat_id: str | None = None) -> dict:
    """Append the request's new messages and the assistant's answer; returns the answer's row."""
    rows = []
    for message in new_messages:
        extra = {k: message[k] for k in ("tool_calls", "tool_call_id", "name") if message.get(k)}
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        rows.append((message["role"], content, extra))
    rows.append(("assistant", answer.get("content"), {k: answer[k] for k in ("tool_calls",) if answer.get(k)}))
    return store.add_messages(conversation.session_id, rows, flow_id=flow_id, chat_id=chat_id)[-1]
