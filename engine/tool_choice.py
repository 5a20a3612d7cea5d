"""Which of a request's tools the model may call under its `tool_choice`: the prompt lists them, a
forced call's grammar allows them, and the server reads calls to them out of the text."""

from __future__ import annotations

from typing import Any

from engine.errors import InvalidInput


def chosen_tools(tools: list[dict] | None, tool_choice: Any) -> list[dict]:
    """`tools` under `tool_choice`: none for "none", the named one for {"function": {"name"}}
    (InvalidInput when it is not among them), else all."""
    if not tools or tool_choice == "none":
        return []
    if isinstance(tool_choice, dict):
        wanted = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools if (t.get("function") or {}).get("name") == wanted]
        if not chosen:
            raise InvalidInput(f"tool_choice names '{wanted}', which is not among the tools", param="tool_choice")
        return chosen
    return list(tools)
