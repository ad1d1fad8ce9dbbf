"""Making the process table durable, and getting it back after a crash.

:class:`Persist` is the process table's journal: every change the table reports
(spawn, exit, re-parenting, reaping) and every change the kernel makes to a process's
usage or context is queued to the state database's thread in order. A syscall that
must not reply before its effect is durable awaits :meth:`Persist.barrier`.

:func:`recover` rebuilds the table when the kernel starts: processes come back with
their pids, credentials (as hashes), limits, usage and contexts; a plain generation that
was in flight is gone (the process is WAITING; a detached run goes on: kernel/runs.py). A process whose program (the OS process
that drove it, if it told the kernel at spawn) died while the kernel was down is hung
up: it exits with ``HUP`` (status 129), its children become orphans, as on Unix.
"""

from __future__ import annotations

import json
import logging
import operator
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from kernel.process import INIT_PID, SIGNAL_STATUS, Proc, ProcessTable, ProcState, Program
from kernel.quota import Account, Limits
from kernel.store import Store, dumps, get_meta, set_meta

log = logging.getLogger("llmos.kernel")


def proc_record(proc: Proc) -> dict[str, Any]:
    """Everything about ``proc`` that survives a restart, as JSON-able data."""
    acct = proc.account
    rec: dict[str, Any] = {
        "name": proc.name,
        "owner": proc.owner,
        "token_hash": proc.token_hash,
        "model": proc.model,
        "nice": proc.nice,
        "created": proc.created,
        "host_pid": proc.host_pid,
        "host_started": proc.host_started,
        "limits": acct.limits.as_dict(),
        "output_tokens": acct.output_tokens,
        "service_s": acct.service_s,
        "generate_calls": proc.generate_calls,
        "prompt_tokens": proc.prompt_tokens,
        "wait_s": proc.wait_s,
        "preemptions": proc.preemptions,
        "switch_prefill_tokens": proc.switch_prefill_tokens,
        "switch_s": proc.switch_s,
        "mean_output": proc.mean_output,
        "mounts": {n: [p, w] for n, (p, w) in proc.mounts.items()},
        "tool_caps": proc.tool_caps,
        "confirm": proc.confirm,
        "redact": list(proc.redact),
        "claim": proc.claim,
        "redact_model": proc.redact_model,
        "adapter": proc.adapter,
        "ctx_policy": proc.ctx_policy,
        "ctx_window": proc.ctx_window,
        "zombie": not proc.alive,
        "exit_status": proc.exit_status,
        "signal": proc.signal,
        "orphaned": proc.orphaned,
        "stopped": proc.state is ProcState.STOPPED,
        "never_ran": proc.state is ProcState.NEW,
    }
    return rec


def program_record(prog: Program) -> dict[str, Any]:
    """A program's account and namespace (they outlive its first process)."""
    return {
        "limits": prog.account.limits.as_dict(),
        "namespace": prog.namespace,
        "output_tokens": prog.account.output_tokens,
        "service_s": prog.account.service_s,
    }


def context_state(proc: Proc) -> dict[str, Any]:
    """A process's context as snapshots keep it (a copy of the list: the messages
    themselves are never changed in place)."""
    return {"messages": list(proc.context), "summary": proc.summary, "evicted": proc.evicted}


def message_bytes(msg: dict[str, Any]) -> int:
    """What one message counts against a context's byte bound (its UTF-8 content)."""
    return len(msg["content"].encode()) + len(msg["role"])


@dataclass(slots=True)
class _Stored:
    """What the database holds of one context: its messages (the very objects, so a
    change is found by identity, not by comparing or serialising content), their row
    numbers, their sizes, and the next row number."""

    msgs: list[dict[str, Any]]
    seqs: list[int]
    sizes: list[int]
    next_seq: int
    total: int


def _context_ops(
    stored: _Stored | None, context: list[dict[str, Any]]
) -> tuple[_Stored, list[int] | None, list[tuple[int, dict[str, Any]]]]:
    """How to bring the stored rows to ``context``: (new stored view, row numbers to
    delete (None: every row), rows to insert). An append costs the new messages only; an
    eviction deletes the evicted rows; a message put before kept ones rewrites them all
    (rows are read back in order)."""
    if stored is None:
        sizes = [message_bytes(m) for m in context]
        view = _Stored(list(context), list(range(len(context))), sizes, len(context), sum(sizes))
        return view, None, list(enumerate(context))
    n = len(stored.msgs)
    if n <= len(context) and all(map(operator.is_, stored.msgs, context)):
        new = context[n:]
        inserts = list(enumerate(new, start=stored.next_seq))
        sizes = [message_bytes(m) for m in new]
        stored.msgs.extend(new)
        stored.seqs.extend(range(stored.next_seq, stored.next_seq + len(new)))
        stored.sizes.extend(sizes)
        stored.next_seq += len(new)
        stored.total += sum(sizes)
        return stored, [], inserts
    where = {id(m): i for i, m in enumerate(stored.msgs)}
    view = _Stored([], [], [], stored.next_seq, 0)
    kept: set[int] = set()
    inserts = []
    last = -1
    for msg in context:
        i = where.get(id(msg), -1)
        if i > last:
            if inserts:  # a new message before a kept one: rows are in order, so rewrite
                return _context_ops(None, context)
            last = i
            kept.add(i)
            seq, size = stored.seqs[i], stored.sizes[i]
        else:
            seq, size = view.next_seq, message_bytes(msg)
            view.next_seq += 1
            inserts.append((seq, msg))
        view.msgs.append(msg)
        view.seqs.append(seq)
        view.sizes.append(size)
        view.total += size
    deletes = [seq for i, seq in enumerate(stored.seqs) if i not in kept]
    return view, deletes, inserts


def _save(
    conn: sqlite3.Connection,
    pid: int,
    ppid: int,
    pgid: int,
    record: str,
    ctx: dict[str, Any],
    deletes: list[int] | None,
    inserts: list[tuple[int, dict[str, Any]]],
    program: str,
    next_pid: int,
) -> None:
    conn.execute(
        "INSERT INTO programs (pgid, record) VALUES (?, ?) "
        "ON CONFLICT (pgid) DO UPDATE SET record = excluded.record",
        (pgid, program),
    )
    conn.execute(
        "INSERT INTO procs (pid, ppid, pgid, record) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (pid) DO UPDATE SET ppid = excluded.ppid, record = excluded.record",
        (pid, ppid, pgid, record),
    )
    conn.execute(
        "INSERT INTO contexts (pid, state) VALUES (?, ?) "
        "ON CONFLICT (pid) DO UPDATE SET state = excluded.state",
        (pid, dumps(ctx)),
    )
    if deletes is None:
        conn.execute("DELETE FROM ctx_msgs WHERE pid = ?", (pid,))
    elif deletes:
        conn.executemany(
            "DELETE FROM ctx_msgs WHERE pid = ? AND seq = ?", [(pid, q) for q in deletes]
        )
    if inserts:  # serialised here, on the store thread, never on the loop
        conn.executemany(
            "INSERT INTO ctx_msgs (pid, seq, msg) VALUES (?, ?, ?)",
            [(pid, q, dumps(msg)) for q, msg in inserts],
        )
    set_meta(conn, "next_pid", str(next_pid))


def _forget(conn: sqlite3.Connection, pid: int, pgid: int | None, namespaces: list[str]) -> None:
    if pgid is not None:
        conn.execute("DELETE FROM programs WHERE pgid = ?", (pgid,))
    conn.execute("DELETE FROM procs WHERE pid = ?", (pid,))
    conn.execute("DELETE FROM contexts WHERE pid = ?", (pid,))
    conn.execute("DELETE FROM ctx_msgs WHERE pid = ?", (pid,))
    conn.execute("DELETE FROM snapshots WHERE pid = ?", (pid,))
    for ns in namespaces:
        for table in ("blocks", "recall", "archival"):
            conn.execute(f"DELETE FROM {table} WHERE ns = ?", (ns,))  # noqa: S608 - fixed names
        conn.execute("DELETE FROM grants WHERE ns = ? OR grantee = ?", (ns, ns))


class Persist:
    """The process table's journal, writing through a :class:`Store`.

    ``on_drop(namespace)`` is called (on the loop) when a namespace's memory is deleted
    because its last owner was reaped, so in-memory indexes can follow.
    """

    def __init__(
        self, store: Store, table: ProcessTable, on_drop: Callable[[str], None] | None = None
    ) -> None:
        self.store = store
        self.table = table
        self.on_drop = on_drop
        self._stored: dict[int, _Stored] = {}  # pid -> what the database holds of its context

    def saved(self, proc: Proc) -> None:
        """Queue ``proc``'s record and the change of its context since the last save
        (new messages as new rows: never the whole context again)."""
        view, deletes, inserts = _context_ops(self._stored.get(proc.pid), proc.context)
        self._stored[proc.pid] = view
        self.store.submit(
            _save,
            proc.pid,
            proc.ppid,
            proc.program.pgid,
            dumps(proc_record(proc)),
            {"summary": proc.summary, "evicted": proc.evicted},
            deletes,
            inserts,
            dumps(program_record(proc.program)),
            self.table.next_pid,
        )

    def adopt(self, proc: Proc, seqs: list[int]) -> None:
        """``proc``'s context as recovered is what the database holds, rows ``seqs``."""
        sizes = [message_bytes(m) for m in proc.context]
        self._stored[proc.pid] = _Stored(
            list(proc.context), list(seqs), sizes, (seqs[-1] + 1) if seqs else 0, sum(sizes)
        )

    def context_bytes(self, proc: Proc) -> int:
        """Bytes of ``proc``'s context as last saved (every change is saved at once)."""
        stored = self._stored.get(proc.pid)
        if stored is None:
            return sum(message_bytes(m) for m in proc.context)
        return stored.total

    def reaped(self, proc: Proc, program_gone: bool) -> None:
        namespaces = [proc.namespace]
        prog = proc.program
        if program_gone and prog.namespace == f"prog:{prog.pgid}":  # named ones outlive runs
            namespaces.append(prog.namespace)
        self._stored.pop(proc.pid, None)
        self.store.submit(_forget, proc.pid, prog.pgid if program_gone else None, namespaces)
        if self.on_drop is not None:
            for ns in namespaces:
                self.on_drop(ns)

    async def barrier(self) -> None:
        """Return once everything queued so far is committed."""
        await self.store.call(_noop)


def _noop(conn: sqlite3.Connection) -> None:
    return None


def instance_id(conn: sqlite3.Connection) -> str:
    """This state database's kernel instance: 8 hex digits made once and kept (store
    thread). With pids (never reused within one database) it names an LLM process to
    the outside world -- a router's session key -- distinctly from other kernels'."""
    value = get_meta(conn, "instance")
    if value is None:
        value = secrets.token_hex(4)
        set_meta(conn, "instance", value)
    return value


@dataclass(frozen=True, slots=True)
class Recovered:
    """What :func:`recover` found."""

    procs: int
    hung_up: list[int]
    next_pid: int


def _load(
    conn: sqlite3.Connection,
) -> tuple[
    list[tuple[int, int, int, str, str | None]],
    dict[int, str],
    dict[int, list[tuple[int, str]]],
    int,
]:
    rows = conn.execute(
        "SELECT p.pid, p.ppid, p.pgid, p.record, c.state FROM procs p "
        "LEFT JOIN contexts c ON c.pid = p.pid ORDER BY p.pid"
    ).fetchall()
    programs = dict(conn.execute("SELECT pgid, record FROM programs").fetchall())
    msgs: dict[int, list[tuple[int, str]]] = {}
    for pid, seq, msg in conn.execute("SELECT pid, seq, msg FROM ctx_msgs ORDER BY pid, seq"):
        msgs.setdefault(pid, []).append((seq, msg))
    return rows, programs, msgs, int(get_meta(conn, "next_pid", "2") or 2)


def _limits(data: dict[str, Any] | None) -> Limits:
    return Limits(**(data or {}))


def _program_alive(proc: Proc) -> bool:
    """Is the OS process that drove ``proc`` still the same one, still running?"""
    if proc.host_pid is None:
        return True  # driven by whoever holds its token: nothing to check
    try:
        host = psutil.Process(proc.host_pid)
        return proc.host_started is None or abs(host.create_time() - proc.host_started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return False


def recover(store: Store, table: ProcessTable, persist: Persist | None = None) -> Recovered:
    """Rebuild ``table`` from ``store`` (call before serving, off the loop or at startup);
    ``persist`` learns what the database holds of each context."""
    rows, program_rows, messages, next_pid = store.call_sync(_load)
    programs: dict[int, Program] = {}
    now_wall, now_mono = time.time(), time.monotonic()
    procs: list[Proc] = []
    for pid, ppid, pgid, record, ctx in rows:
        rec = json.loads(record)
        if pgid not in programs:
            prog_rec = json.loads(program_rows.get(pgid, "{}"))
            account = Account(f"program {pgid}", _limits(prog_rec.get("limits")))
            account.output_tokens = prog_rec.get("output_tokens", 0)
            account.service_s = prog_rec.get("service_s", 0.0)
            programs[pgid] = Program(pgid, account, prog_rec.get("namespace", ""))
        account = Account(f"process {pid}", _limits(rec.get("limits")))
        account.output_tokens, account.service_s = (
            rec.get("output_tokens", 0),
            rec.get("service_s", 0.0),
        )
        account.opened = now_mono - max(now_wall - rec["created"], 0.0)
        programs[pgid].account.opened = min(programs[pgid].account.opened, account.opened)
        proc = Proc(
            pid=pid,
            ppid=ppid,
            name=rec["name"],
            owner=rec["owner"],
            token_hash=rec["token_hash"],
            model=rec["model"],
            program=programs[pgid],
            account=account,
            nice=rec["nice"],
            created=rec["created"],
            host_pid=rec.get("host_pid"),
            host_started=rec.get("host_started"),
            ctx_policy=rec.get("ctx_policy", "truncate"),
            ctx_window=rec.get("ctx_window"),
        )
        for key in (
            "generate_calls",
            "prompt_tokens",
            "wait_s",
            "preemptions",
            "switch_prefill_tokens",
            "switch_s",
            "mean_output",
        ):
            if key in rec:
                setattr(proc, key, rec[key])
        proc.mounts = {n: (p, bool(w)) for n, (p, w) in rec.get("mounts", {}).items()}
        proc.tool_caps, proc.confirm = rec.get("tool_caps", []), rec.get("confirm", False)
        proc.redact = tuple(rec.get("redact", ()))
        proc.claim = rec.get("claim")
        proc.redact_model = rec.get("redact_model", False)
        proc.adapter = rec.get("adapter")
        state = json.loads(ctx) if ctx else {}
        stored = messages.get(pid, [])
        proc.context = [json.loads(msg) for _, msg in stored]
        if persist is not None:
            persist.adopt(proc, [seq for seq, _ in stored])
        proc.summary, proc.evicted = state.get("summary"), state.get("evicted", 0)
        proc.orphaned = rec.get("orphaned", False)
        if rec.get("zombie"):
            table.recover(proc, ProcState.ZOMBIE)
            proc.exit_status, proc.signal = rec["exit_status"], rec.get("signal")
            proc.zombie_since = now_mono
        elif rec.get("stopped"):
            table.recover(proc, ProcState.STOPPED)
        else:
            table.recover(proc, ProcState.NEW if rec.get("never_ran") else ProcState.WAITING)
        procs.append(proc)
    for proc in procs:
        table.insert(proc)
    for proc in procs:
        parent = table.get(proc.ppid)
        if parent is not None:
            parent.children.add(proc.pid)
        elif proc.ppid != INIT_PID:  # its parent was reaped while the write was queued
            proc.ppid, proc.orphaned = INIT_PID, True
    table.reserve_pids(next_pid)
    hung_up = [proc.pid for proc in procs if proc.alive and not _program_alive(proc)]
    for pid in hung_up:
        proc = table.get(pid)
        if proc is not None and proc.alive:
            table.exit(proc, SIGNAL_STATUS["HUP"], "HUP")
            log.info(
                "process %d (%s): its program died while the kernel was down; hung up",
                pid,
                proc.name,
            )
    return Recovered(len(procs), hung_up, table.next_pid)
