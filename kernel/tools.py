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
  get ``EIO`` at once. A served tool's name is its program's: a process registers a tool
  for the processes of its own program only, so another program may use the same name
  for itself and never receives the first one's calls. Only the admin registers a served
  tool for everyone (naming the process that serves it). A process's name resolves to
  its own program's tool first, then to the tools of everyone (built in, MCP, the
  admin's). Schemas are checked at registration like an MCP server's
  (:func:`kernel.schema.check_schema`).
* **Capabilities**: a process may use a tool only if every layer of its tool
  capabilities allows the name (glob patterns given at spawn; a child adds a layer, so
  it can only narrow what its parent may use).
* **MCP tools** are those of mounted MCP servers (kernel/mcp.py): built in for the
  table's purposes (a ``run`` that calls the server), with ``mcp`` naming the server.
* **Confirmation**: a process spawned with ``confirm=True`` (inherited) parks every call
  of an irreversible tool until the kernel's owner approves it (``tool.approve``) or
  denies it (``tool.deny``), from the CLI or a script; no answer within the call's
  timeout means denied. The parked table is shared out: each program parks at most its
  share (``max_parked``, default a quarter of the table).
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
from kernel.schema import ArgsValidator, ValidationTimeout
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
    program: int | None = None  # the program whose processes it serves; None: everyone
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
    program: int  # the caller's program: parked calls are shared out per program
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


def _provider(tool: Tool) -> str:
    """Who provides ``tool``, for error messages."""
    if tool.mcp:
        return f"MCP server {tool.mcp}"
    if tool.server is None:
        return "the kernel"
    if tool.program is None:
        return f"process {tool.server} (for every program, registered by the admin)"
    return f"process {tool.server} of your program"


class ToolTable:
    """The registry, the served tools' queues, and the parked confirmations.

    Two name spaces: ``tools`` holds the tools of everyone (built in, MCP, served tools
    the admin registered), ``private`` each program's own served tools. A process sees
    its program's tools over everyone's."""

    def __init__(self, builtins: Iterable[Tool] = ()) -> None:
        self.tools: dict[str, Tool] = {}
        self.private: dict[int, dict[str, Tool]] = {}  # program id -> its served tools
        self.queues: dict[int, asyncio.Queue[Request]] = {}  # server pid -> its pending requests
        self.inflight: dict[int, Request] = {}  # request id -> request given to its server
        self.parked: dict[int, Parked] = {}
        self.parked_by: dict[int, int] = {}  # program id -> its calls parked now
        self.max_parked = limits.MAX_PARKED_CALLS  # the whole table
        self._ids = itertools.count(1)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="tool-validate"
        )
        self._validating = 0
        for tool in builtins:
            self.tools[tool.name] = tool

    def visible(self, proc: Proc | None) -> list[Tool]:
        """The tools ``proc`` may use, by name; for the admin every tool, each program's
        own included."""
        if proc is None:
            every = [*self.tools.values(), *(t for p in self.private.values() for t in p.values())]
            return sorted(every, key=lambda t: (t.name, t.program or 0))
        seen = {**self.tools, **self.private.get(proc.program.pgid, {})}
        return sorted((t for t in seen.values() if allowed(proc, t)), key=lambda t: t.name)

    def resolve(self, proc: Proc | None, name: str) -> Tool | None:
        """What ``name`` means to ``proc``: its program's tool, else everyone's."""
        if proc is not None:
            mine = self.private.get(proc.program.pgid, {}).get(name)
            if mine is not None:
                return mine
        return self.tools.get(name)

    def lookup(self, proc: Proc, name: str) -> Tool:
        tool = self.resolve(proc, name)
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
        everyone: bool = False,
    ) -> Tool:
        """Serve ``name`` from ``server``: for its program's processes, or (``everyone``:
        the admin's registration) for every process. ``parameters`` must be checked
        already. EBUSY if the name is taken where it would be seen."""
        program = None if everyone else server.program.pgid
        space = self.tools if everyone else self.private.get(server.program.pgid, {})
        existing = space.get(name)
        if existing is None and not everyone:
            existing = self.tools.get(name)  # everyone's names are taken in every program
        if existing is not None and (existing.server != server.pid or existing.program != program):
            raise SyscallError(
                Errno.EBUSY,
                f"tool {name!r} is already provided by {_provider(existing)}; pick another name",
            )
        if existing is None and self.served_by(server.pid) >= limits.MAX_SERVED_TOOLS:
            raise SyscallError(
                Errno.EDQUOT, f"a process serves at most {limits.MAX_SERVED_TOOLS} tools"
            )
        try:
            tool = Tool(
                name, description, parameters, irreversible, server=server.pid, program=program
            )
        except jsonschema.exceptions.SchemaError as exc:
            raise SyscallError(
                Errno.EINVAL, f"parameters is not a valid JSON schema: {exc.message}"
            ) from None
        if everyone:
            self.tools[name] = tool
        else:
            self.private.setdefault(server.program.pgid, {})[name] = tool
        self.queues.setdefault(server.pid, asyncio.Queue(maxsize=limits.MAX_TOOL_QUEUE))
        return tool

    def served_by(self, pid: int) -> int:
        """How many tools process ``pid`` serves."""
        return sum(t.server == pid for t in self._served())

    def _served(self) -> Iterable[Tool]:
        yield from (t for t in self.tools.values() if t.server is not None)
        for space in self.private.values():
            yield from space.values()

    def _remove(self, tool: Tool) -> None:
        if tool.program is None:
            if self.tools.get(tool.name) is tool:
                del self.tools[tool.name]
            return
        space = self.private.get(tool.program, {})
        if space.get(tool.name) is tool:
            del space[tool.name]
            if not space:
                del self.private[tool.program]

    def unregister(self, server: Proc | None, name: str) -> None:
        """Stop serving ``name``: a process its own tool (its program's first), the admin
        (``server`` None) a tool of everyone."""
        if server is None:
            tool = self.tools.get(name)
            if tool is None or tool.server is None:
                raise SyscallError(Errno.ENOENT, f"no served tool named {name!r} is everyone's")
        else:
            tool = self.private.get(server.program.pgid, {}).get(name)
            if tool is None or tool.server != server.pid:
                tool = self.tools.get(name)
            if tool is None or tool.server != server.pid:
                raise SyscallError(
                    Errno.ENOENT, f"process {server.pid} serves no tool named {name!r}"
                )
        self._remove(tool)
        self._fail_waiting(lambda r: r.tool is tool, f"tool {name!r} was unregistered")

    def server_gone(self, pid: int) -> None:
        """Process ``pid`` ended: its tools go, and calls waiting on them fail at once."""
        for tool in [t for t in self._served() if t.server == pid]:
            self._remove(tool)
        self._fail_waiting(
            lambda r: r.tool.server == pid, f"the server of the tool (process {pid}) exited"
        )
        self.queues.pop(pid, None)
        for parked in [p for p in self.parked.values() if p.caller == pid]:
            self._unpark(parked)

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
    def _unpark(self, parked: Parked) -> None:
        if self.parked.pop(parked.id, None) is not None:
            left = self.parked_by[parked.program] - 1
            if left:
                self.parked_by[parked.program] = left
            else:
                del self.parked_by[parked.program]

    def park_room(self, caller: Proc) -> None:
        """EAGAIN unless ``caller``'s program may park one more call: the table holds
        ``max_parked`` calls, and each program at most its share (its ``max_parked``
        limit, or a quarter of the table), so one program's unanswered calls never keep
        another's from asking."""
        program = caller.program
        share = program.account.limits.max_parked or max(1, self.max_parked // 4)
        held = self.parked_by.get(program.pgid, 0)
        if held >= share:
            raise SyscallError(
                Errno.EAGAIN,
                f"program {program.pgid} has {held} calls waiting for confirmation, its share "
                f"of the table (max_parked={share}); wait for the owner to approve or deny them",
            )
        if len(self.parked) >= self.max_parked:
            raise SyscallError(
                Errno.EAGAIN, "too many calls wait for confirmation; approve or deny some"
            )

    async def confirm(self, tool: Tool, args: dict[str, Any], caller: Proc, timeout: float) -> None:
        """Park the call until the owner approves (return) or denies / lets it time out (EPERM)."""
        self.park_room(caller)
        parked = Parked(next(self._ids), tool, args, caller.pid, time.time(), caller.program.pgid)
        self.parked[parked.id] = parked
        self.parked_by[parked.program] = self.parked_by.get(parked.program, 0) + 1
        try:
            async with asyncio.timeout(timeout):
                approved = await parked.verdict
        except TimeoutError:
            approved = False
        finally:
            self._unpark(parked)
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
