"""Tools: a registry of named, typed operations that processes (and their models) call
through the kernel, with capabilities, deadlines and owner confirmation.

A tool has a name, a description, a JSON schema for its arguments and an ``irreversible``
mark. Arguments are validated against the schema (``jsonschema``) before anything runs;
a tool's failure, timeout or malformed answer comes back as an error code with a
sentence, never as a hang or a crash of the kernel.

* **Built-in tools** run in the kernel, off its loop where they do work: ``calculator``
  (a safe expression evaluator, ``simpleeval``), ``datetime``, ``python`` (code in a
  separate OS process with CPU-time, memory, file-size and wall-clock limits, its
  working directory the caller's file root), and the file and memory operations
  (``fs_*``, ``memory_*``) acting as the calling process.
* **Served tools** are registered by a user-space program (``tool.register``); the kernel
  queues each call for the serving process (``tool.next``) and routes its answer
  (``tool.reply``) back to the caller. They vanish when their server exits; its callers
  get ``EIO`` at once.
* **Capabilities**: a process may use a tool only if every layer of its tool
  capabilities allows the name (glob patterns given at spawn; a child adds a layer, so
  it can only narrow what its parent may use).
* **Confirmation**: a process spawned with ``confirm=True`` (inherited) parks every call
  of an irreversible tool until the kernel's owner approves it (``tool.approve``) or
  denies it (``tool.deny``), from the CLI or a script; no answer within the call's
  timeout means denied.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import itertools
import json
import math
import time
import zoneinfo
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jsonschema
from pydantic import BaseModel, Field, ValidationError

from kernel.process import Caller, Proc
from kernel.sandbox import run_code
from syscalls import limits
from syscalls.errors import Errno, SyscallError
from syscalls.models import ToolCall

if TYPE_CHECKING:
    from kernel.kernel import Kernel

Runner = Callable[["Kernel", Proc, dict[str, Any]], Awaitable[Any]]


@dataclass(eq=False)
class Tool:
    """One entry of the registry."""

    name: str
    description: str
    parameters: dict[str, Any]
    irreversible: bool = False
    server: int | None = None  # pid of the process serving it; None: built in
    run: Runner | None = None
    explicit: bool = False  # only for processes whose every layer names it (code execution)
    validator: Any = None

    def __post_init__(self) -> None:
        self.validator = jsonschema.Draft202012Validator(self.parameters)


@dataclass(eq=False)
class Request:
    """A call of a served tool, waiting for its server's reply."""

    id: int
    tool: Tool
    args: dict[str, Any]
    caller: int
    answer: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(eq=False)
class Parked:
    """A call of an irreversible tool waiting for the owner's confirmation."""

    id: int
    tool: Tool
    args: dict[str, Any]
    caller: int
    since: float
    verdict: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def allowed(proc: Proc, tool: Tool) -> bool:
    """May ``proc`` use ``tool``? Every capability layer must allow its name; a tool that
    runs code (``explicit``) must be named literally by every layer, and a process with no
    layers (spawned with every tool) does not get it: no wildcard ever grants it."""
    if tool.explicit:
        return bool(proc.tool_caps) and all(tool.name in layer for layer in proc.tool_caps)
    return all(
        any(fnmatch.fnmatchcase(tool.name, pattern) for pattern in layer)
        for layer in proc.tool_caps
    )


class ToolTable:
    """The registry, the served tools' queues, and the parked confirmations."""

    def __init__(self) -> None:
        self.tools: dict[str, Tool] = {}
        self.queues: dict[int, asyncio.Queue[Request]] = {}  # server pid -> its pending requests
        self.inflight: dict[int, Request] = {}  # request id -> request given to its server
        self.parked: dict[int, Parked] = {}
        self._ids = itertools.count(1)
        for tool in builtin_tools():
            self.tools[tool.name] = tool

    def visible(self, proc: Proc | None) -> list[Tool]:
        """The tools ``proc`` may use (all of them for the admin), by name."""
        return sorted(
            (t for t in self.tools.values() if proc is None or allowed(proc, t)),
            key=lambda t: t.name,
        )

    def lookup(self, proc: Proc, name: str) -> Tool:
        tool = self.tools.get(name)
        if tool is None:
            raise SyscallError(
                Errno.ENOENT, f"no tool named {name!r}; tool.list shows the ones you may use"
            )
        if not allowed(proc, tool):
            why = (
                "it runs code, so it must be granted by name at spawn (tools=[..., "
                f"{name!r}]) by every ancestor"
                if tool.explicit
                else "its tool capabilities were narrowed at spawn"
            )
            raise SyscallError(Errno.EPERM, f"process {proc.pid} may not use tool {name!r} ({why})")
        return tool

    @staticmethod
    def validate(tool: Tool, args: dict[str, Any]) -> None:
        """EINVAL naming the first problem if ``args`` do not match the tool's schema."""
        error = jsonschema.exceptions.best_match(tool.validator.iter_errors(args))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "arguments"
            raise SyscallError(Errno.EINVAL, f"tool {tool.name!r}: {where}: {error.message}")

    # -- served tools -------------------------------------------------------------------
    def register(
        self,
        server: Proc,
        name: str,
        description: str,
        parameters: dict[str, Any],
        irreversible: bool,
    ) -> None:
        existing = self.tools.get(name)
        if existing is not None and existing.server != server.pid:
            owner = "the kernel" if existing.server is None else f"process {existing.server}"
            raise SyscallError(
                Errno.EBUSY, f"tool {name!r} is already provided by {owner}; pick another name"
            )
        if (
            existing is None
            and sum(t.server == server.pid for t in self.tools.values()) >= limits.MAX_SERVED_TOOLS
        ):
            raise SyscallError(
                Errno.EDQUOT, f"a process serves at most {limits.MAX_SERVED_TOOLS} tools"
            )
        try:
            tool = Tool(name, description, parameters, irreversible, server=server.pid)
        except jsonschema.exceptions.SchemaError as exc:
            raise SyscallError(
                Errno.EINVAL, f"parameters is not a valid JSON schema: {exc.message}"
            ) from None
        self.tools[name] = tool
        self.queues.setdefault(server.pid, asyncio.Queue(maxsize=limits.MAX_TOOL_QUEUE))

    def unregister(self, server: Proc, name: str) -> None:
        tool = self.tools.get(name)
        if tool is None or tool.server != server.pid:
            raise SyscallError(Errno.ENOENT, f"process {server.pid} serves no tool named {name!r}")
        del self.tools[name]
        self._fail_waiting(lambda r: r.tool is tool, f"tool {name!r} was unregistered")

    def server_gone(self, pid: int) -> None:
        """Process ``pid`` ended: its tools go, and calls waiting on them fail at once."""
        for name in [n for n, t in self.tools.items() if t.server == pid]:
            del self.tools[name]
        self._fail_waiting(
            lambda r: r.tool.server == pid, f"the server of the tool (process {pid}) exited"
        )
        self.queues.pop(pid, None)
        for parked in [p for p in self.parked.values() if p.caller == pid]:
            self.parked.pop(parked.id, None)

    def _fail_waiting(self, match: Callable[[Request], bool], why: str) -> None:
        for request in [r for r in self.inflight.values() if match(r)]:
            self.inflight.pop(request.id, None)
            if not request.answer.done():
                request.answer.set_exception(SyscallError(Errno.EIO, why))
        for queue in self.queues.values():
            kept = []
            while not queue.empty():
                request = queue.get_nowait()
                if match(request):
                    if not request.answer.done():
                        request.answer.set_exception(SyscallError(Errno.EIO, why))
                else:
                    kept.append(request)
            for request in kept:
                queue.put_nowait(request)

    async def call_served(
        self, tool: Tool, args: dict[str, Any], caller: int, timeout: float
    ) -> Any:
        assert tool.server is not None
        queue = self.queues[tool.server]
        request = Request(next(self._ids), tool, args, caller)
        try:
            queue.put_nowait(request)
        except asyncio.QueueFull:
            raise SyscallError(
                Errno.EAGAIN,
                f"the server of tool {tool.name!r} has {queue.maxsize} calls "
                "waiting; try again later",
            ) from None
        try:
            async with asyncio.timeout(timeout):
                return await request.answer
        except TimeoutError:
            raise SyscallError(
                Errno.ETIMEDOUT, f"tool {tool.name!r} did not answer within {timeout:.3g} s"
            ) from None
        finally:
            self.inflight.pop(request.id, None)

    async def next_request(self, server: Proc, timeout: float) -> Request | None:
        queue = self.queues.get(server.pid)
        if queue is None:
            raise SyscallError(
                Errno.ENOENT, f"process {server.pid} serves no tools; tool.register one first"
            )
        while True:
            try:
                async with asyncio.timeout(timeout):
                    request = await queue.get()
            except TimeoutError:
                return None
            if not request.answer.done():  # its caller may have given up already
                self.inflight[request.id] = request
                return request

    def reply(self, server: Proc, request_id: int, result: Any, error: str | None) -> None:
        request = self.inflight.get(request_id)
        if request is None or request.tool.server != server.pid:
            raise SyscallError(
                Errno.ENOENT,
                f"no call {request_id} is waiting for process {server.pid}'s reply "
                "(its caller may have timed out)",
            )
        del self.inflight[request_id]
        if request.answer.done():
            return
        if error is not None:
            request.answer.set_exception(
                SyscallError(Errno.EIO, f"tool {request.tool.name!r} failed: {error}")
            )
        else:
            request.answer.set_result(result)

    # -- confirmation ---------------------------------------------------------------------
    async def confirm(self, tool: Tool, args: dict[str, Any], caller: int, timeout: float) -> None:
        """Park the call until the owner approves (return) or denies / lets it time out (EPERM)."""
        if len(self.parked) >= limits.MAX_PARKED_CALLS:
            raise SyscallError(
                Errno.EAGAIN, "too many calls wait for confirmation; approve or deny some"
            )
        parked = Parked(next(self._ids), tool, args, caller, time.time())
        self.parked[parked.id] = parked
        try:
            async with asyncio.timeout(timeout):
                approved = await parked.verdict
        except TimeoutError:
            approved = False
        finally:
            self.parked.pop(parked.id, None)
        if not approved:
            raise SyscallError(
                Errno.EPERM,
                f"the owner did not approve irreversible tool {tool.name!r} "
                f"(call {parked.id}: denied or not answered in {timeout:.3g} s)",
            )

    def decide(self, call_id: int, approve: bool) -> None:
        parked = self.parked.get(call_id)
        if parked is None:
            raise SyscallError(
                Errno.ENOENT, f"no call {call_id} waits for confirmation; see tool.pending"
            )
        if not parked.verdict.done():
            parked.verdict.set_result(approve)


# -- built-in tools ------------------------------------------------------------------------


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


class _As:
    """A stand-in for the Call a syscall handler receives: the tool's caller."""

    def __init__(self, proc: Proc) -> None:
        self.caller = Caller(proc.pid, proc)


async def _run_fs_read(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    from kernel import sys_fs
    from syscalls import models as m

    res = await sys_fs.sys_read(k, _As(proc), m.FsReadArgs(path=a["path"]))  # type: ignore[arg-type]
    return {
        "path": res.path,
        "text": res.text if res.text is not None else f"<{res.size} bytes of binary data>",
    }


async def _run_fs_write(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    from kernel import sys_fs
    from syscalls import models as m

    res = await sys_fs.sys_write(k, _As(proc), m.FsWriteArgs(path=a["path"], text=a["text"]))  # type: ignore[arg-type]
    return res.model_dump()


async def _run_fs_list(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    from kernel import sys_fs
    from syscalls import models as m

    res = await sys_fs.sys_list(k, _As(proc), m.FsPathArgs(path=a["path"]))  # type: ignore[arg-type]
    return {
        "path": res.path,
        "entries": [f"{e.name}/" if e.type == "dir" else e.name for e in res.entries],
    }


async def _run_fs_search(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    hits = await k.fs.search(proc, a["query"], a["k"])
    return {"hits": [{"path": p, "text": t, "score": round(s, 3)} for p, _, t, s in hits]}


async def _run_memory_put(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    ids, _ = await k.memory.put(proc.namespace, [(a["text"], {})])
    return {"id": ids[0]}


async def _run_memory_search(k: Kernel, proc: Proc, a: dict[str, Any]) -> dict[str, Any]:
    rows, _, _ = await k.memory.search(
        [proc.namespace, proc.program.namespace], a["query"], a["k"], {}
    )
    return {"hits": [{"text": row[2], "score": round(float(row[-1]), 3)} for row in rows]}


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
    ]


# -- tool calling by the model (llm.generate tools=...) ------------------------------------


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
        '{"tool": NAME, "arguments": {...}} to call a tool, or {"answer": "..."} when you know the answer.',
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
