"""Memory operations offered to the model as tools, in MemGPT's style.

Each tool has a name, a description for the model, and a pydantic parameter model
(its JSON schema is what a tool-calling model sees); :func:`call_memory_tool` validates
the model's arguments and runs the matching memory syscall as the process, returning
a short text observation. The default agent loop (``Agent``, the tools issue) offers
these next to its other tools; any agent program can use them today:

    specs = memory_tool_specs()                     # OpenAI-style function specs
    observation = call_memory_tool(proc, "archival_memory_search", {"query": "refunds"})
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmos.client import Process
from syscalls import limits
from syscalls.errors import Errno, SyscallError


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CoreAppend(_Params):
    label: str = Field(
        description="block to add to, e.g. 'user' or 'persona'", pattern=r"^[A-Za-z0-9_.-]{1,64}$"
    )
    text: str = Field(
        description="the line to add", min_length=1, max_length=limits.MAX_BLOCK_CHARS
    )


class CoreReplace(_Params):
    label: str = Field(description="block to edit", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    old: str = Field(
        description="exact text to replace", min_length=1, max_length=limits.MAX_BLOCK_CHARS
    )
    new: str = Field(
        description="replacement text (empty deletes)", max_length=limits.MAX_BLOCK_CHARS
    )


class ArchivalInsert(_Params):
    text: str = Field(
        description="a fact worth keeping for later",
        min_length=1,
        max_length=limits.MAX_ENTRY_CHARS,
    )


class ArchivalSearch(_Params):
    query: str = Field(
        description="what to look for, in plain words", min_length=1, max_length=1000
    )
    k: int = Field(default=3, ge=1, le=10, description="how many results")


class ConversationSearch(_Params):
    query: str = Field(
        description="words from the earlier conversation", min_length=1, max_length=1000
    )
    k: int = Field(default=5, ge=1, le=20, description="how many messages")


@dataclass(frozen=True, slots=True)
class MemoryTool:
    """One memory tool: what the model sees and what runs."""

    name: str
    description: str
    params: type[_Params]
    run: Callable[[Process, Any], str]

    def spec(self) -> dict[str, Any]:
        """The tool as an OpenAI-style function spec (JSON schema parameters)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.params.model_json_schema(),
            },
        }


def _core_append(p: Process, a: CoreAppend) -> str:
    try:
        block = p.memory.append_block(a.label, a.text)
    except SyscallError as exc:
        if exc.code != Errno.ENOENT:
            raise
        block = p.memory.set_block(a.label, a.text)
    return f"core memory block {a.label!r} now holds {len(block.value)} of {block.max_chars} characters"


def _core_replace(p: Process, a: CoreReplace) -> str:
    block = p.memory.replace_block(a.label, a.old, a.new)
    return f"core memory block {a.label!r} updated ({len(block.value)} characters)"


def _archival_insert(p: Process, a: ArchivalInsert) -> str:
    (entry_id,) = p.memory.put(a.text)
    return f"stored in archival memory as entry {entry_id}"


def _archival_search(p: Process, a: ArchivalSearch) -> str:
    hits = p.memory.search(a.query, k=a.k)
    if not hits:
        return "archival memory has nothing on that"
    return "\n".join(f"[{h.id}] ({h.score:.2f}) {h.text}" for h in hits)


def _conversation_search(p: Process, a: ConversationSearch) -> str:
    hits = p.memory.recall(a.query, k=a.k)
    if not hits:
        return "no earlier message matches"
    return "\n".join(f"{h.role}: {h.content}" for h in hits)


MEMORY_TOOLS: dict[str, MemoryTool] = {
    t.name: t
    for t in (
        MemoryTool(
            "core_memory_append",
            "Add a line to a core memory block (always in your prompt), creating it "
            "if needed. Use it for lasting facts about the user or yourself.",
            CoreAppend,
            _core_append,
        ),
        MemoryTool(
            "core_memory_replace",
            "Replace exact text in a core memory block.",
            CoreReplace,
            _core_replace,
        ),
        MemoryTool(
            "archival_memory_insert",
            "Store a fact in long-term archival memory for later search.",
            ArchivalInsert,
            _archival_insert,
        ),
        MemoryTool(
            "archival_memory_search",
            "Search long-term archival memory by meaning.",
            ArchivalSearch,
            _archival_search,
        ),
        MemoryTool(
            "conversation_search",
            "Search every earlier message of this conversation, including those "
            "moved out of the context window.",
            ConversationSearch,
            _conversation_search,
        ),
    )
}


def memory_tool_specs() -> list[dict[str, Any]]:
    """Every memory tool as an OpenAI-style function spec."""
    return [tool.spec() for tool in MEMORY_TOOLS.values()]


def call_memory_tool(process: Process, name: str, arguments: dict[str, Any] | str) -> str:
    """Validate ``arguments`` (a dict or JSON text) and run memory tool ``name`` as
    ``process``; returns the observation. Raises :class:`SyscallError` (EINVAL for an
    unknown tool or bad arguments, or the syscall's own error)."""
    tool = MEMORY_TOOLS.get(name)
    if tool is None:
        raise SyscallError.of(
            Errno.EINVAL, f"no memory tool {name!r}; there are: {', '.join(MEMORY_TOOLS)}"
        )
    try:
        raw = json.loads(arguments) if isinstance(arguments, str) else arguments
        params = tool.params.model_validate(raw)
    except (ValueError, ValidationError) as exc:
        raise SyscallError.of(Errno.EINVAL, f"{name}: bad arguments: {exc}") from None
    return tool.run(process, params)
