"""ctx.* handlers: read, append to, clear, checkpoint and restore a process's context.

Every change is recorded in the state database before the call returns, and every
message that enters a context is logged to the process's recall memory.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import TYPE_CHECKING, Any

from kernel import context
from kernel.persist import context_state
from kernel.process import Proc
from kernel.store import dumps
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
        raise SyscallError(
            Errno.EBUSY, f"process {proc.pid} is generating; change its context after that"
        )
    return proc


async def _commit(k: Kernel, proc: Proc) -> None:
    k.persist.saved(proc)
    await k.persist.barrier()


def sys_ctx_get(k: Kernel, call: Call, a: m.CtxGetArgs) -> m.CtxGetResult:
    proc = k.procs.target(call.caller, a.pid)
    msgs = proc.context if a.last is None else proc.context[max(0, len(proc.context) - a.last) :]
    return m.CtxGetResult(
        pid=proc.pid,
        messages=[m.ChatMessage(**x) for x in msgs],
        total=len(proc.context),
        summary=proc.summary,
        evicted=proc.evicted,
    )


async def sys_ctx_append(k: Kernel, call: Call, a: m.CtxAppendArgs) -> m.CtxResult:
    proc = _writable(k, call, a.pid)
    if len(proc.context) + len(a.messages) > MAX_CONTEXT_MESSAGES:
        raise SyscallError(
            Errno.E2BIG, f"a context holds at most {MAX_CONTEXT_MESSAGES} messages; clear it first"
        )
    turns = await k.redactor.mask_messages([msg.model_dump() for msg in a.messages], proc.redact)
    proc = _writable(k, call, a.pid)  # still writable after masking (off the loop)?
    context.check_room(k, proc, turns)
    proc.context.extend(turns)
    k.memory.record(proc, turns)
    await _commit(k, proc)
    return m.CtxResult(pid=proc.pid, total=len(proc.context))


async def sys_ctx_clear(k: Kernel, call: Call, a: m.CtxClearArgs) -> m.CtxResult:
    proc = _writable(k, call, a.pid)
    keep = (
        proc.context[:1]
        if a.keep_system and proc.context[:1] and proc.context[0]["role"] == "system"
        else []
    )
    proc.context[:] = keep
    proc.summary, proc.evicted = None, 0
    await _commit(k, proc)
    return m.CtxResult(pid=proc.pid, total=len(proc.context))


def _put_snapshot(
    conn: sqlite3.Connection, pid: int, name: str, state: dict[str, Any], created: float
) -> int:
    count = conn.execute(
        "SELECT COUNT(*) FROM snapshots WHERE pid = ? AND name != ?", (pid, name)
    ).fetchone()[0]
    if count >= limits.MAX_SNAPSHOTS:
        raise SyscallError(
            Errno.EDQUOT,
            f"process {pid} already has {limits.MAX_SNAPSHOTS} snapshots; "
            "restore or replace one (same name) instead",
        )
    conn.execute(
        "INSERT INTO snapshots (pid, name, state, created) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (pid, name) DO UPDATE SET state = excluded.state, created = excluded.created",
        (pid, name, dumps(state), created),  # serialised here, off the loop
    )
    return count + 1


def _get_snapshot(conn: sqlite3.Connection, pid: int, name: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT state FROM snapshots WHERE pid = ? AND name = ?", (pid, name)
    ).fetchone()
    return None if row is None else json.loads(row[0])  # parsed here, off the loop


def _list_snapshots(conn: sqlite3.Connection, pid: int) -> list[tuple[str, int, float]]:
    return conn.execute(
        "SELECT name, json_array_length(state, '$.messages'), created FROM snapshots "
        "WHERE pid = ? ORDER BY created",
        (pid,),
    ).fetchall()


async def sys_ctx_snapshot(k: Kernel, call: Call, a: m.CtxSnapshotArgs) -> m.SnapshotInfo:
    proc = _writable(k, call, a.pid)
    now = time.time()
    await k.store.call(_put_snapshot, proc.pid, a.name, context_state(proc), now)
    return m.SnapshotInfo(name=a.name, messages=len(proc.context), created=now)


async def sys_ctx_restore(k: Kernel, call: Call, a: m.CtxSnapshotArgs) -> m.CtxResult:
    proc = _writable(k, call, a.pid)
    state = await k.store.call(_get_snapshot, proc.pid, a.name)
    if state is None:
        raise SyscallError(
            Errno.ENOENT, f"process {proc.pid} has no snapshot named {a.name!r} (see ctx.snapshots)"
        )
    if proc.busy:  # it may have started generating while we read
        raise SyscallError(Errno.EBUSY, f"process {proc.pid} is generating; restore after that")
    proc.context = state["messages"]
    proc.summary, proc.evicted = state.get("summary"), state.get("evicted", 0)
    await _commit(k, proc)
    return m.CtxResult(pid=proc.pid, total=len(proc.context))


async def sys_ctx_snapshots(k: Kernel, call: Call, a: m.CtxSnapshotsArgs) -> m.CtxSnapshotsResult:
    proc = k.procs.target(call.caller, a.pid)
    rows = await k.store.call(_list_snapshots, proc.pid)
    return m.CtxSnapshotsResult(
        pid=proc.pid,
        snapshots=[
            m.SnapshotInfo(name=name, messages=count, created=created)
            for name, count, created in rows
        ],
    )


HANDLERS = {
    "ctx.get": sys_ctx_get,
    "ctx.append": sys_ctx_append,
    "ctx.clear": sys_ctx_clear,
    "ctx.snapshot": sys_ctx_snapshot,
    "ctx.restore": sys_ctx_restore,
    "ctx.snapshots": sys_ctx_snapshots,
}
