"""tool.* handlers: list, call, serve (register/next/reply), and owner confirmation.

The registry, capabilities, queues and parked calls live in :class:`kernel.tools.ToolTable`;
the built-in tools in kernel/builtin_tools.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from kernel.process import Proc
from kernel.schema import check_schema
from kernel.syscall import Call
from kernel.toolcall import result_json
from syscalls import limits
from syscalls import models as m
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel

log = logging.getLogger("llmos.tools")


def _me(call: Call) -> Proc:
    proc = call.caller.proc
    assert proc is not None
    return proc


def _admin(call: Call, what: str) -> None:
    if call.caller.proc is not None:
        raise SyscallError(Errno.EPERM, f"only the kernel's owner (the admin) may {what}")


def sys_list(k: Kernel, call: Call, a: m.Empty) -> m.ToolListResult:
    return m.ToolListResult(
        tools=[
            m.ToolInfo(
                name=t.name,
                description=t.description,
                parameters=t.parameters,
                irreversible=t.irreversible,
                server=t.server,
                mcp=t.mcp,
                program=t.program,
            )
            for t in k.tools.visible(call.caller.proc)
        ]
    )


async def sys_call(k: Kernel, call: Call, a: m.ToolCallArgs) -> m.ToolCallResult:
    proc = _me(call)
    tool = k.tools.lookup(proc, a.name)
    try:
        size = len(json.dumps(a.args, default=str))
    except (RecursionError, ValueError):
        raise SyscallError(Errno.EINVAL, "the arguments nest too deeply to be JSON") from None
    if size > limits.MAX_TOOL_ARGS_BYTES:
        raise SyscallError(
            Errno.EINVAL, f"the arguments are over {limits.MAX_TOOL_ARGS_BYTES} bytes of JSON"
        )
    await k.tools.validate(tool, a.args)
    loop = asyncio.get_running_loop()
    timeout = max(0.001, min(a.timeout_s, call.deadline - loop.time() - 0.05))
    t0 = time.monotonic()
    if tool.irreversible and proc.confirm:
        log.info("process %d: call of irreversible tool %s waits for approval", proc.pid, tool.name)
        try:
            await k.tools.confirm(tool, a.args, proc, timeout)
        finally:
            call.note("llmos.confirm_wait_s", round(time.monotonic() - t0, 6))
        timeout = max(0.001, timeout - (time.monotonic() - t0))
    if tool.server is not None:
        call.note("llmos.tool.server", tool.server)
        result = await k.tools.call_served(tool, a.args, proc.pid, timeout, call.origin())
    else:
        assert tool.run is not None
        try:
            async with asyncio.timeout(timeout):
                result = await tool.run(k, proc, a.args)
        except TimeoutError:
            raise SyscallError(
                Errno.ETIMEDOUT, f"tool {tool.name!r} did not finish within {timeout:.3g} s"
            ) from None
        except SyscallError:
            raise
        except Exception as exc:  # a failing tool is an error for its caller, never for the kernel
            log.exception("tool %s failed", tool.name)
            raise SyscallError(
                Errno.EIO, f"tool {tool.name!r} failed: {type(exc).__name__}: {exc}"
            ) from None
    return m.ToolCallResult(
        name=tool.name, result=result_json(result), elapsed_s=round(time.monotonic() - t0, 4)
    )


def sys_register(k: Kernel, call: Call, a: m.ToolRegisterArgs) -> m.Done:
    me = call.caller.proc
    if me is None:  # the admin: a tool for everyone (or for one program), served by a process
        if a.server is None:
            raise SyscallError(
                Errno.EINVAL, "the admin names the process that serves the tool (server=PID)"
            )
        server = k.procs.lookup(a.server)
        if not server.alive:
            raise SyscallError(Errno.ESRCH, f"process {a.server} has exited; it serves nothing")
        everyone = a.scope != "program"
    else:
        if a.server is not None and a.server != me.pid:
            raise SyscallError(
                Errno.EPERM, "a process serves its own tools only (leave server out)"
            )
        if a.scope == "global":
            raise SyscallError(
                Errno.EPERM,
                "only the admin registers a tool for every program (tool.register with "
                f"server={me.pid}); a process's tools serve its own program",
            )
        server, everyone = me, False
    try:
        schema = check_schema(a.parameters, "parameters")
    except ValueError as exc:
        raise SyscallError(Errno.EINVAL, f"tool {a.name!r}: {exc}") from None
    k.tools.register(server, a.name, a.description, schema, a.irreversible, everyone=everyone)
    return m.Done()


def sys_unregister(k: Kernel, call: Call, a: m.ToolNameArgs) -> m.Done:
    k.tools.unregister(call.caller.proc, a.name)
    return m.Done()


async def sys_next(k: Kernel, call: Call, a: m.ToolNextArgs) -> m.ToolRequest:
    loop = asyncio.get_running_loop()
    timeout = max(0.0, min(a.timeout_s, call.deadline - loop.time() - 0.05))
    request = await k.tools.next_request(_me(call), timeout)
    if request is None:
        return m.ToolRequest()
    call.link(request.origin, "tool.request")  # the caller's tool.call span
    return m.ToolRequest(
        id=request.id, name=request.tool.name, args=request.args, caller=request.caller
    )


def sys_reply(k: Kernel, call: Call, a: m.ToolReplyArgs) -> m.Done:
    request = k.tools.inflight.get(a.id)
    if request is not None and request.tool.server == call.caller.pid:
        call.link(request.origin, "tool.reply")  # the caller's tool.call span
    result = None
    if a.error is None:
        try:
            result = result_json(a.result)
        except SyscallError as exc:  # the caller learns its tool misbehaved; so does the server
            k.tools.reply(_me(call), a.id, None, f"it returned an unusable result ({exc.message})")
            raise
    k.tools.reply(_me(call), a.id, result, a.error)
    return m.Done()


def sys_pending(k: Kernel, call: Call, a: m.Empty) -> m.ToolPendingResult:
    proc = call.caller.proc
    return m.ToolPendingResult(
        calls=[
            m.ParkedCall(id=p.id, name=p.tool.name, args=p.args, caller=p.caller, since=p.since)
            for p in k.tools.parked.values()
            if proc is None or p.caller == proc.pid
        ]
    )


def sys_approve(k: Kernel, call: Call, a: m.ToolDecideArgs) -> m.Done:
    _admin(call, "approve a parked tool call")
    k.tools.decide(a.id, True)
    return m.Done()


def sys_deny(k: Kernel, call: Call, a: m.ToolDecideArgs) -> m.Done:
    _admin(call, "deny a parked tool call")
    k.tools.decide(a.id, False)
    return m.Done()


HANDLERS = {
    "tool.list": sys_list,
    "tool.call": sys_call,
    "tool.register": sys_register,
    "tool.unregister": sys_unregister,
    "tool.next": sys_next,
    "tool.reply": sys_reply,
    "tool.pending": sys_pending,
    "tool.approve": sys_approve,
    "tool.deny": sys_deny,
}
