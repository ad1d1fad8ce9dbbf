"""Tool calling by the model: how ``llm.generate(tools=...)`` offers tools to a model and
reads its choice back, and how a tool's result is made fit for the wire.

A tool-using step is constrained decoding: the model's output must match
:func:`action_schema` (one call of an offered tool with arguments valid for it, or a
final answer), it is told what the tools are by :func:`tool_guide`, and
:func:`parse_action` turns the text back into a :class:`ToolCall` or the answer. What a
tool returns (built in or served) passes :func:`result_json` before anyone sees it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from syscalls import limits
from syscalls.errors import Errno, SyscallError
from syscalls.models import ToolCall

if TYPE_CHECKING:
    from kernel.tools import Tool


def action_schema(tools: list[Tool]) -> dict[str, Any]:
    """The JSON Schema of one step of a tool-using model: a call of one of ``tools`` with
    arguments valid for it, or a final answer."""
    calls = [
        {
            "type": "object",
            "properties": {"tool": {"const": t.name}, "arguments": t.parameters},
            "required": ["tool", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    answer = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    return {"anyOf": [*calls, answer]}


def tool_guide(tools: list[Tool]) -> str:
    """What the model is told about the tools it may call in this step."""
    lines = [
        "You can call one tool, or give your final answer. Reply with JSON only:",
        '{"tool": NAME, "arguments": {...}} to call a tool, '
        'or {"answer": "..."} when you know the answer.',
        "Tools:",
    ]
    for t in tools:
        args = ", ".join(
            f"{name}: {spec.get('type', 'value')}"
            for name, spec in t.parameters.get("properties", {}).items()
        )
        lines.append(f"- {t.name}({args}): {t.description}")
    return "\n".join(lines)


def parse_action(text: str) -> tuple[list[ToolCall], str | None]:
    """The tool call or answer in a constrained step's text (nothing if it was cut short)."""
    try:
        action = json.loads(text)
    except ValueError:
        return [], None
    if (
        isinstance(action, dict)
        and isinstance(action.get("tool"), str)
        and isinstance(action.get("arguments"), dict)
    ):
        return [ToolCall(name=action["tool"], arguments=action["arguments"])], None
    if isinstance(action, dict) and isinstance(action.get("answer"), str):
        return [], action["answer"]
    return [], None


def result_json(value: Any) -> Any:
    """``value`` as JSON-able data within the result size limit (EIO otherwise)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        raise SyscallError(Errno.EIO, "the tool returned something that is not JSON data") from None
    if len(text) > limits.MAX_TOOL_RESULT_BYTES:
        raise SyscallError(
            Errno.EIO,
            f"the tool's result is {len(text)} bytes, over the "
            f"{limits.MAX_TOOL_RESULT_BYTES}-byte limit",
        )
    return json.loads(text)
