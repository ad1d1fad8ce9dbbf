"""ctx.* handlers: read, append to and clear a process's context."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.process import Proc
from kernel.syscall import Call
from syscalls import limits
from syscalls import models as m
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel

#: Most messages a context may hold (the token window usually binds first).
MAX_CONTEXT_MESSAGES = 16 * limits.MAX_MESSAGES


def _writable(k: Kernel, call: Call, pid: int | None) -> Proc:
    proc = k.procs.target(call.caller, pid)
    if not proc.alive:
        raise SyscallError(Errno.ESRCH, f"process {proc.pid} has exited; its context is read-only")
    if proc.busy:
        raise SyscallError(Errno.EBUSY, f"process {proc.pid} is generating; change its context after that")
    return proc


def sys_ctx_get(k: Kernel, call: Call, a: m.CtxGetArgs) -> m.CtxGetResult:
    proc = k.procs.target(call.caller, a.pid)
    msgs = proc.context if a.last is None else proc.context[len(proc.context) - a.last:]
    return m.CtxGetResult(pid=proc.pid, messages=[m.ChatMessage(**x) for x in msgs], total=len(proc.context))


def sys_ctx_append(k: Kernel, call: Call, a: m.CtxAppendArgs) -> m.CtxResult:
    proc = _writable(k, call, a.pid)
    if len(proc.context) + len(a.messages) > MAX_CONTEXT_MESSAGES:
        raise SyscallError(Errno.E2BIG, f"a context holds at most {MAX_CONTEXT_MESSAGES} messages; clear it first")
    proc.context.extend(msg.model_dump() for msg in a.messages)
    return m.CtxResult(pid=proc.pid, total=len(proc.context))


def sys_ctx_clear(k: Kernel, call: Call, a: m.CtxClearArgs) -> m.CtxResult:
    proc = _writable(k, call, a.pid)
    keep = proc.context[:1] if a.keep_system and proc.context[:1] and proc.context[0]["role"] == "system" else []
    proc.context[:] = keep
    return m.CtxResult(pid=proc.pid, total=len(proc.context))


HANDLERS = {"ctx.get": sys_ctx_get, "ctx.append": sys_ctx_append, "ctx.clear": sys_ctx_clear}
