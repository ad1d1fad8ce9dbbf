"""Tools: a registry of named, typed operations that processes (and their models) call
through the kernel, with capabilities, deadlines and owner confirmation.

A tool has a name, a description, a JSON schema for its arguments and an ``irreversible``
mark. Arguments are validated against the schema (``jsonschema``) before anything runs;
a tool's failure, timeout or malformed answer comes back as an error code with a
sentence, never as a hang or a crash of the kernel.

This module is the tool table; what the kernel's own tools do is in
kernel/builtin_tools.py, and how a model calls tools (``llm.generate tools=...``) is in
kernel/toolcall.py.

* **Built-in tools** run in the kernel (:class:`Tool` with a ``run``), acting as the
  calling process; the table is given them when the kernel starts.
* **Served tools** are registered by a user-space program (``tool.register``); the kernel
  queues each call for the serving process (``tool.next``) and routes its answer
  (``tool.reply``) back to the caller. They vanish when their server exits; its callers
  get ``EIO`` at once.
* **Capabilities**: a process may use a tool only if every layer of its tool
  capabilities allows the name (glob patterns given at spawn; a child adds a layer, so
  it can only narrow what its parent may use).
* **MCP tools** are those of mounted MCP servers (kernel/mcp.py): built in for the
  table's purposes (a ``run`` that calls the server), with ``mcp`` naming the server.
* **Confirmation**: a process spawned with ``confirm=True`` (inherited) parks every call
  of an irreversible tool until the kernel's owner approves it (``tool.approve``) or
  denies it (``tool.deny``), from the CLI or a script; no answer within the call's
  timeout means denied.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jsonschema

from kernel.process import Proc
from kernel.schema import ArgsValidator, ValidationTimeout, check_schema
from syscalls import limits
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel

#: What runs a built-in tool: (kernel, calling process, validated arguments) -> JSON data.
Runner = Callable[["Kernel", Proc, dict[str, Any]], Awaitable[Any]]


@dataclass(eq=False)
class Tool:
    """One entry of the registry."""

    name: str
    description: str
    parameters: dict[str, Any]
    irreversible: bool = False
    server: int | None = None  # pid of the process serving it; None: built in or MCP
    mcp: str | None = None  # the MCP server providing it (kernel/mcp.py)
    run: Runner | None = None
    explicit: bool = False  # only for processes whose every layer names it (code execution)
    validator: Any = None

    def __post_init__(self) -> None:
        self.validator = ArgsValidator(self.parameters)


@dataclass(eq=False)
class Request:
    """A call of a served tool, waiting for its server's reply."""

    id: int
    tool: Tool
    args: dict[str, Any]
    caller: int
    origin: tuple[int, int] | None = None  # the caller's tool.call span (program, span id)
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

    def __init__(self, builtins: Iterable[Tool] = ()) -> None:
        self.tools: dict[str, Tool] = {}
        self.queues: dict[int, asyncio.Queue[Request]] = {}  # server pid -> its pending requests
        self.inflight: dict[int, Request] = {}  # request id -> request given to its server
        self.parked: dict[int, Parked] = {}
        self._ids = itertools.count(1)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="tool-validate"
        )
        self._validating = 0
        for tool in builtins:
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

    async def validate(self, tool: Tool, args: dict[str, Any]) -> None:
        """EINVAL naming the first problem if ``args`` do not match the tool's schema.

        Validation runs on the tool table's validation threads (never on the loop), at most
        ``limits.TOOL_VALIDATION_S`` seconds (then EINVAL: the arguments are too costly)."""
        if self._validating >= limits.MAX_TOOL_VALIDATIONS:
            raise SyscallError(
                Errno.EAGAIN, "too many tool calls are being validated; try again later"
            )
        self._validating += 1
        try:
            error = await asyncio.get_running_loop().run_in_executor(
                self._executor, tool.validator.first_error, args, limits.TOOL_VALIDATION_S
            )
        except ValidationTimeout:
            raise SyscallError(
                Errno.EINVAL,
                f"tool {tool.name!r}: checking the arguments against its schema took over "
                f"{limits.TOOL_VALIDATION_S} s; send smaller arguments",
            ) from None
        finally:
            self._validating -= 1
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
            owner = (
                f"MCP server {existing.mcp}"
                if existing.mcp
                else "the kernel"
                if existing.server is None
                else f"process {existing.server}"
            )
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
            schema = check_schema(parameters, "parameters")
            tool = Tool(name, description, schema, irreversible, server=server.pid)
        except (ValueError, RecursionError, jsonschema.exceptions.SchemaError) as exc:
            why = exc.message if isinstance(exc, jsonschema.exceptions.SchemaError) else exc
            raise SyscallError(Errno.EINVAL, f"tool {name!r} refused: {why}") from None
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
        self,
        tool: Tool,
        args: dict[str, Any],
        caller: int,
        timeout: float,
        origin: tuple[int, int] | None = None,
    ) -> Any:
        assert tool.server is not None
        queue = self.queues[tool.server]
        request = Request(next(self._ids), tool, args, caller, origin)
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
