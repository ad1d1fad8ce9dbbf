"""The kernel's own tools: what ``calculator``, ``datetime``, ``python`` and the file and
memory tools do when a process (or its model) calls them with ``tool.call``.

Each built-in has a pydantic model of its arguments (its JSON schema is what the tool
table checks and what a tool-calling model sees) and a runner that acts as the calling
process on the kernel's mechanisms directly: files through ``k.fs`` (kernel/fs.py) in the
caller's view, memory through ``k.memory`` (kernel/memory.py) in the caller's own
namespace, code through the sandbox (kernel/sandbox.py). Work that would block runs off
the kernel's loop.

* ``calculator``: a safe expression evaluator (``simpleeval``), no code execution.
* ``datetime``: the current time in an IANA time zone.
* ``python``: code in a bubblewrap sandbox, its working directory the caller's file
  root; irreversible, and granted only by name (``explicit``).
* ``fs_read``, ``fs_write``, ``fs_list``, ``fs_search``: the caller's files.
* ``memory_put``, ``memory_search``: archival memory (MemGPT's archival insert/search).
* ``memory_block_append``, ``memory_block_replace``: core memory blocks, which are placed
  in the caller's prompt (MemGPT's core memory edits).
* ``memory_recall_search``: every message the caller has seen, including those moved
  out of its context window (MemGPT's conversation search).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import zoneinfo
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError

from kernel.process import Proc
from kernel.sandbox import run_code
from kernel.tools import Runner, Tool
from syscalls import limits
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel
    from kernel.memory import BlockValue


class CalculatorArgs(BaseModel):
    expression: str = Field(
        min_length=1,
        max_length=500,
        description="arithmetic, e.g. '(17 * 23) + sqrt(2) ** 2'; functions: sqrt, sin, cos, "
        "tan, log, log10, exp, abs, round, floor, ceil, min, max; names: pi, e",
    )


class DatetimeArgs(BaseModel):
    timezone: str = Field(
        default="UTC", max_length=64, description="IANA time zone, e.g. Europe/Paris"
    )


class PythonArgs(BaseModel):
    code: str = Field(
        min_length=1, max_length=20_000, description="a Python 3 program; print what you want back"
    )
    timeout_s: float = Field(default=10.0, gt=0, le=60, description="wall-clock limit in seconds")


class FsReadToolArgs(BaseModel):
    path: str = Field(max_length=limits.MAX_PATH_BYTES, description="file path in your file root")


class FsWriteToolArgs(BaseModel):
    path: str = Field(max_length=limits.MAX_PATH_BYTES, description="file path in your file root")
    text: str = Field(
        max_length=limits.MAX_IO_BYTES, description="the new content (the old one is kept)"
    )


class FsListToolArgs(BaseModel):
    path: str = Field(
        default="/", max_length=limits.MAX_PATH_BYTES, description="directory to list"
    )


class SearchToolArgs(BaseModel):
    query: str = Field(
        min_length=1, max_length=1000, description="what to look for, in your own words"
    )
    k: int = Field(default=3, ge=1, le=20, description="how many results")


class MemoryPutToolArgs(BaseModel):
    text: str = Field(
        min_length=1, max_length=limits.MAX_ENTRY_CHARS, description="a fact to remember for later"
    )


class BlockAppendToolArgs(BaseModel):
    label: str = Field(
        min_length=1,
        max_length=limits.MAX_NAME_CHARS,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="the block to add to, e.g. 'user' or 'persona' (created if absent)",
    )
    text: str = Field(
        min_length=1, max_length=limits.MAX_BLOCK_CHARS, description="the line to add"
    )


class BlockReplaceToolArgs(BaseModel):
    label: str = Field(
        min_length=1,
        max_length=limits.MAX_NAME_CHARS,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="the block to edit",
    )
    old: str = Field(
        min_length=1, max_length=limits.MAX_BLOCK_CHARS, description="the exact text to replace"
    )
    new: str = Field(
        max_length=limits.MAX_BLOCK_CHARS, description="the replacement (empty deletes)"
    )


class RecallSearchToolArgs(BaseModel):
    query: str = Field(
        min_length=1, max_length=1000, description="words from the earlier conversation"
    )
    k: int = Field(default=5, ge=1, le=20, description="how many messages")


def _builtin(
    name: str,
    description: str,
    model: type[BaseModel],
    run: Runner,
    irreversible: bool = False,
    explicit: bool = False,
) -> Tool:
    schema = model.model_json_schema()
    schema.pop("title", None)
    return Tool(
        name, description, schema, irreversible, run=_validated(model, run), explicit=explicit
    )


def _validated(model: type[BaseModel], run: Runner) -> Runner:
    async def runner(k: Kernel, proc: Proc, args: dict[str, Any]) -> Any:
        try:
            parsed = model.model_validate(args)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise SyscallError(
                Errno.EINVAL, f"{'/'.join(map(str, first['loc'])) or 'arguments'}: {first['msg']}"
            ) from None
        return await run(k, proc, parsed.model_dump())

    return runner


_MATH = {
    name: getattr(math, name)
    for name in ("sqrt", "sin", "cos", "tan", "log", "log10", "exp", "floor", "ceil")
}


def _calculate(expression: str) -> float | int:
    from simpleeval import SimpleEval

    evaluator = SimpleEval(
        functions={**_MATH, "abs": abs, "round": round, "min": min, "max": max},
        names={"pi": math.pi, "e": math.e},
    )
    try:
        value = evaluator.eval(expression)
    except Exception as exc:
        raise SyscallError(
            Errno.EINVAL, f"cannot evaluate {expression!r}: {type(exc).__name__}: {exc}"
        ) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SyscallError(
            Errno.EINVAL, f"{expression!r} is not a number (got {type(value).__name__})"
        )
    if isinstance(value, int) and abs(value) > 10**100:
        raise SyscallError(Errno.EINVAL, f"{expression!r} is too large to return")
    return value


async def _run_calculator(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    value = await asyncio.to_thread(_calculate, a["expression"])
    return {"expression": a["expression"], "value": value}


async def _run_datetime(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    try:
        zone = zoneinfo.ZoneInfo(a["timezone"])
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise SyscallError(
            Errno.EINVAL,
            f"unknown time zone {a['timezone']!r}; use an IANA name such as Europe/Paris",
        ) from None
    now = dt.datetime.now(zone)
    return {
        "iso": now.isoformat(timespec="seconds"),
        "weekday": now.strftime("%A"),
        "timezone": a["timezone"],
        "unix": round(now.timestamp(), 3),
    }


async def _run_python_tool(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    root = k.fs.place(proc, "/").base
    return await run_code(k.sandbox, a["code"], root, a["timeout_s"])


async def _run_fs_read(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    place = k.fs.file_place(proc, a["path"])
    data, size, _ = await k.fs.read(place, 0, None)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # a model reads text: say what is there instead of the bytes
        text = f"<{size} bytes of binary data>"
    return {"path": place.shown, "text": text}


async def _run_fs_write(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    place = k.fs.file_place(proc, a["path"], write=True)
    version, size = await k.fs.write(place, a["text"].encode("utf-8"), False, True)
    return {"path": place.shown, "size": size, "version": version}


async def _run_fs_list(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    place = k.fs.place(proc, a["path"])
    entries = await k.fs.listdir(proc, place)
    return {
        "path": place.shown,
        "entries": [f"{name}/" if kind == "dir" else name for name, kind, _, _ in entries],
    }


async def _run_fs_search(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    hits = await k.fs.search(proc, a["query"], a["k"])
    return {"hits": [{"path": p, "text": t, "score": round(s, 3)} for p, _, t, s in hits]}


async def _run_memory_put(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    (text,) = await k.redactor.mask_for(proc, [a["text"]])
    ids, _ = await k.memory.put(proc.namespace, [(text, {})])
    return {"id": ids[0]}


async def _run_memory_search(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    rows, _, _ = await k.memory.search(
        [proc.namespace, proc.program.namespace], a["query"], a["k"], {}
    )
    return {"hits": [{"text": row[2], "score": round(float(row[-1]), 3)} for row in rows]}


def _block_result(label: str, block: BlockValue) -> dict[str, Any]:
    return {"label": label, "value": block.value, "max_chars": block.max_chars}


async def _run_block_append(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    # MemGPT's core_memory_append: a model should not have to create a block first.
    (text,) = await k.redactor.mask_for(proc, [a["text"]])
    block = await k.memory.block_append(proc.namespace, a["label"], text, create=True)
    return _block_result(a["label"], block)


async def _run_block_replace(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    old, new = await k.redactor.mask_for(proc, [a["old"], a["new"]])
    block = await k.memory.block_replace(proc.namespace, a["label"], old, new)
    return _block_result(a["label"], block)


async def _run_recall_search(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    rows = await k.memory.recall_search(proc.namespace, a["query"], None, None, None, a["k"])
    return {"hits": [{"role": role, "content": content} for _, _, role, content, _ in rows]}


def builtin_tools() -> list[Tool]:
    """The kernel's own tools."""
    return [
        _builtin(
            "calculator",
            "Evaluate an arithmetic expression exactly (no code execution).",
            CalculatorArgs,
            _run_calculator,
        ),
        _builtin(
            "datetime", "The current date and time in a time zone.", DatetimeArgs, _run_datetime
        ),
        _builtin(
            "python",
            "Run a short Python program in a sandbox (no network; CPU, memory and time "
            "limits; working directory: your file root) and return its output.",
            PythonArgs,
            _run_python_tool,
            irreversible=True,
            explicit=True,
        ),
        _builtin("fs_read", "Read a text file from your file root.", FsReadToolArgs, _run_fs_read),
        _builtin(
            "fs_write",
            "Write a text file in your file root (the previous content stays in its history).",
            FsWriteToolArgs,
            _run_fs_write,
        ),
        _builtin("fs_list", "List a directory of your file root.", FsListToolArgs, _run_fs_list),
        _builtin(
            "fs_search", "Find passages of your files by meaning.", SearchToolArgs, _run_fs_search
        ),
        _builtin(
            "memory_put",
            "Remember a fact in your long-term (archival) memory.",
            MemoryPutToolArgs,
            _run_memory_put,
        ),
        _builtin(
            "memory_search",
            "Search your long-term memory by meaning.",
            SearchToolArgs,
            _run_memory_search,
        ),
        _builtin(
            "memory_block_append",
            "Add a line to a core memory block (always in your prompt), creating the block "
            "if needed. Use it for lasting facts about the user or yourself.",
            BlockAppendToolArgs,
            _run_block_append,
        ),
        _builtin(
            "memory_block_replace",
            "Replace exact text in a core memory block (an empty replacement deletes it).",
            BlockReplaceToolArgs,
            _run_block_replace,
        ),
        _builtin(
            "memory_recall_search",
            "Search every earlier message of your conversation by words, including those "
            "moved out of your context window.",
            RecallSearchToolArgs,
            _run_recall_search,
        ),
    ]
