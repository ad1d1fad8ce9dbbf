"""Detached generations ("runs"): a generation that belongs to the kernel, not to a call.

``llm.generate detach=true`` makes a :class:`Run` and returns its id at once. The run
goes on as a kernel task acting as its process (a :class:`RunCall`: the call a client
would have made, with no socket behind it), so a client that disconnects loses nothing;
``llm.stream`` replays its chunks from any sequence number and follows it live, and
``llm.wait`` returns its result. A process generates one thing at a time, so its runs
queue behind each other (and behind a generation its program makes meanwhile).

Runs survive the kernel. Each text chunk a run makes is paired with the token ids made
up to it (a chunk always ends at a driver delta, so ``(text so far, ids so far)`` is a
point the drivers' exact-resume path, ``resume_ids``, continues from). The chunks are
journaled through the store thread in batches — at most one write per run every
:data:`JOURNAL_INTERVAL_S` or :data:`JOURNAL_TOKENS` tokens, whichever comes first — so
the cost per token is bounded. After ``kill -9`` and a restart, :meth:`RunTable.load`
brings runs back: finished ones as results to collect, unfinished ones queued again to
continue from their last journaled chunk with the prompt they were given (journaled when
they started), so a greedy run ends with the text an uninterrupted one would have.

Bounds (``syscalls/limits.py``): runs held by the kernel and by one process (EAGAIN
beyond), how long an uncollected result is kept, the text all kept runs may hold.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kernel.process import INIT_PID, Caller, ProcessTable
from kernel.store import Store, dumps, get_meta, set_meta
from kernel.syscall import Call
from syscalls import limits
from syscalls import models as m
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.sys_llm import Generation

log = logging.getLogger("llmos.kernel")

RunState = m.RunState
FINISHED = (RunState.DONE, RunState.FAILED, RunState.CANCELLED)

#: A run's journal is written at most this often (seconds) ...
JOURNAL_INTERVAL_S = 0.25
#: ... or once this many tokens are unwritten, whichever comes first.
JOURNAL_TOKENS = 256


@dataclass(eq=False)
class Run:
    """One detached generation: its arguments, chunks, resume point and outcome."""

    id: int
    pid: int
    lineage: list[int]  # its process and that process's ancestors when it was made
    args: m.GenerateArgs
    created: float = field(default_factory=time.time)
    state: RunState = RunState.QUEUED
    started: float | None = None
    finished: float | None = None
    chunks: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # token ids up to the end of the last chunk
    prompt: list[dict[str, str]] | str | None = None  # as composed when it started
    n_prompt: int = 0
    result: m.GenerateResult | None = None
    error: SyscallError | None = None
    resumed: int = 0  # restarts it went on after
    uncharged: int = 0  # journaled tokens made before a restart, not yet in the accounts
    bytes: int = 0  # UTF-8 size of its chunks
    call: RunCall | None = None
    gen: Generation | None = None  # the generation it runs now (its live token count)
    journaled: int = 0  # chunks written to the journal
    journaled_ids: int = 0
    last_write: float = 0.0
    dirty: bool = False  # its record changed since it was last written
    _event: asyncio.Event | None = None

    @property
    def done(self) -> bool:
        return self.state in FINISHED

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def output_tokens(self) -> int:
        return len(self.gen.out_ids) if self.gen is not None else len(self.ids)

    async def changed(self) -> None:
        """Return at the run's next chunk or its end."""
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    def info(self) -> m.RunInfo:
        err = self.error
        return m.RunInfo(
            run=self.id,
            pid=self.pid,
            state=self.state,
            chat=self.args.messages is not None,
            chunks=len(self.chunks),
            output_tokens=self.output_tokens(),
            usage=self.result.usage if self.result is not None else None,
            finish_reason=self.result.finish_reason if self.result is not None else None,
            error=None if err is None else m.RunError(code=str(err.code), message=err.message),
            created=self.created,
            started=self.started,
            finished=self.finished,
            resumed=self.resumed,
        )

    def outcome(self) -> m.GenerateResult:
        """A finished run's result, or its error raised (with the text it made)."""
        if self.error is not None:
            raise SyscallError(self.error.code, self.error.message, text=self.text)
        assert self.result is not None
        return self.result


class RunCall(Call):
    """The llm.generate call a run makes as its process: chunks go to the run (and its
    journal), not to a socket."""

    def __init__(self, run: Run, caller: Caller, deadline: float, table: RunTable) -> None:
        super().__init__(0, "llm.generate", caller, deadline, b"", _no_send)
        self.run = run
        self.table = table

    def chunk(self, data: dict[str, Any]) -> None:  # pragma: no cover - runs use add_chunk
        raise RuntimeError("a run's chunks go through RunTable.add_chunk")


def _no_send(identity: bytes, frame: bytes) -> None:  # pragma: no cover - never called
    raise RuntimeError("a run has no socket")


class RunTable:
    """The kernel's runs: creation under bounds, visibility, queueing per process, the
    journal, expiry, and recovery at start. Loop-only (the journal goes through the store)."""

    def __init__(self, store: Store, procs: ProcessTable, journal: bool = True) -> None:
        self.store = store
        self.procs = procs
        self.journal = journal
        self.runs: dict[int, Run] = {}
        self.next_id = 1
        self.bytes = 0
        self._queues: dict[int, deque[Run]] = {}  # pid -> runs waiting for their turn
        self._turns: dict[int, asyncio.Event] = {}
        self.closing = False

    # -- making and finding runs -----------------------------------------------------------
    def create(self, caller: Caller, args: m.GenerateArgs) -> Run:
        """A new queued run of the caller's process; EAGAIN when a bound is reached."""
        proc = caller.proc
        assert proc is not None
        self.sweep()
        mine = sum(1 for r in self.runs.values() if r.pid == proc.pid)
        if mine >= limits.MAX_RUNS_PER_PROC:
            raise SyscallError(
                Errno.EAGAIN,
                f"process {proc.pid} holds {mine} runs (at most {limits.MAX_RUNS_PER_PROC}); "
                "collect finished ones with llm.wait or llm.collect",
            )
        if len(self.runs) >= limits.MAX_RUNS:
            raise SyscallError(
                Errno.EAGAIN,
                f"the kernel holds {len(self.runs)} runs (at most {limits.MAX_RUNS}); "
                "collect finished ones or wait",
            )
        lineage, pid = [], proc.pid
        while pid > INIT_PID:
            lineage.append(pid)
            parent = self.procs.get(pid)
            pid = parent.ppid if parent is not None else INIT_PID
        run = Run(self.next_id, proc.pid, lineage, args.model_copy(update={"detach": False}))
        self.next_id += 1
        self.runs[run.id] = run
        self._write_record(run)
        return run

    def get(self, caller: Caller, run_id: int) -> Run:
        """Run ``run_id`` if the caller may see it (its process or an ancestor of it, or the
        admin); ENOENT / EPERM otherwise."""
        run = self.runs.get(run_id)
        if run is not None and self._expired(run, time.time()):
            self._drop(run)
            run = None
        if run is None:
            raise SyscallError(Errno.ENOENT, f"no run {run_id} (never made, collected, or expired)")
        if not (caller.admin or caller.pid in run.lineage):
            raise SyscallError(
                Errno.EPERM,
                f"process {caller.pid} may not see run {run_id} of process {run.pid}: only "
                "its process, that process's ancestors and the admin may",
            )
        return run

    def visible(self, caller: Caller, pid: int | None) -> list[Run]:
        """The runs the caller may see (of process ``pid`` only, if given), oldest first."""
        self.sweep()
        return [
            r
            for r in self.runs.values()
            if (caller.admin or caller.pid in r.lineage) and (pid is None or r.pid == pid)
        ]

    def collect(self, run: Run) -> None:
        """Forget a finished run (its result and chunks, in memory and in the journal)."""
        if not run.done:
            raise SyscallError(
                Errno.EBUSY, f"run {run.id} is {run.state}; cancel it first (llm.cancel run=)"
            )
        self._drop(run)

    def _drop(self, run: Run) -> None:
        if self.runs.pop(run.id, None) is not None:
            self.bytes -= run.bytes
            if self.journal:
                self.store.submit(_delete, run.id)

    def _expired(self, run: Run, now: float) -> bool:
        return run.done and run.finished is not None and now - run.finished > limits.RUN_TTL_S

    def sweep(self) -> None:
        """Drop results kept past their time, then the oldest ones while over the size bound."""
        now = time.time()
        for run in [r for r in self.runs.values() if self._expired(r, now)]:
            self._drop(run)
        if self.bytes > limits.MAX_RUN_BYTES:
            for run in sorted(
                (r for r in self.runs.values() if r.done), key=lambda r: r.finished or 0.0
            ):
                self._drop(run)
                if self.bytes <= limits.MAX_RUN_BYTES:
                    break

    # -- a process's generations, one at a time --------------------------------------------
    def enqueue(self, run: Run) -> None:
        self._queues.setdefault(run.pid, deque()).append(run)

    async def turn(self, run: Run, busy: Callable[[], bool]) -> None:
        """Return when ``run`` is first in its process's queue and the process is not
        generating (then the caller starts at once, in the same step)."""
        queue = self._queues[run.pid]
        while queue[0] is not run or busy():
            event = self._turns.setdefault(run.pid, asyncio.Event())
            await event.wait()
        queue.popleft()
        if not queue:
            del self._queues[run.pid]

    def leave_queue(self, run: Run) -> None:
        queue = self._queues.get(run.pid)
        if queue is not None and run in queue:
            queue.remove(run)
            if not queue:
                del self._queues[run.pid]
            self.kick(run.pid)

    def kick(self, pid: int) -> None:
        """Process ``pid`` may have stopped generating: its next run looks again."""
        event = self._turns.pop(pid, None)
        if event is not None:
            event.set()

    # -- progress ---------------------------------------------------------------------------
    def attach(self, run: Run, gen: Generation) -> int:
        """``gen`` runs ``run``: it starts from the run's resume point. Returns the tokens
        made before a restart that the accounts have not been charged for yet."""
        run.gen = gen
        gen.out_ids = list(run.ids)
        gen.parts = [run.text] if run.chunks else []
        uncharged, run.uncharged = run.uncharged, 0
        return uncharged

    def on_slot(self, run: Run) -> None:
        if run.state is RunState.QUEUED:  # written with its next chunks
            run.state, run.started, run.dirty = RunState.RUNNING, run.started or time.time(), True

    def started_with(self, run: Run, prompt: list[dict[str, str]] | str, n_prompt: int) -> None:
        """The prompt the run was composed with: a resumed run uses it again as it is
        (journaled with its first chunks: a run with no chunk yet starts afresh anyway)."""
        run.prompt, run.n_prompt, run.dirty = prompt, n_prompt, True

    def add_chunk(self, run: Run, text: str, out_ids: list[int]) -> None:
        """A chunk of text, made with the tokens ``out_ids`` so far (a resume point)."""
        if not text:
            return
        run.chunks.append(text)
        size = len(text.encode())
        run.bytes += size
        self.bytes += size
        run.ids.extend(out_ids[len(run.ids) :])
        self._maybe_write(run)
        run._wake()

    def _maybe_write(self, run: Run, force: bool = False) -> None:
        if not self.journal or run.journaled == len(run.chunks):
            return
        now = time.monotonic()
        if (
            force
            or now - run.last_write >= JOURNAL_INTERVAL_S
            or len(run.ids) - run.journaled_ids >= JOURNAL_TOKENS
        ):
            ids = array.array("i", run.ids[run.journaled_ids :]).tobytes()
            record = self._record(run) if run.dirty else None
            run.dirty = False
            self.store.submit(
                _write_chunks,
                run.id,
                run.journaled,
                dumps(run.chunks[run.journaled :]),
                ids,
                record,
            )
            run.journaled, run.journaled_ids, run.last_write = (
                len(run.chunks),
                len(run.ids),
                now,
            )

    def finish(
        self, run: Run, result: m.GenerateResult | None = None, error: SyscallError | None = None
    ) -> None:
        """The run ended: with its result, or with ``error`` (ECANCELED: cancelled)."""
        if run.done:
            return
        gen = run.gen
        if gen is not None:  # text made after the last chunk (a cancel mid-interval)
            self.add_chunk(run, "".join(gen.parts)[len(run.text) :], gen.out_ids)
        run.gen = None
        run.result, run.error = result, error
        if error is None:
            run.state = RunState.DONE
        elif error.code is Errno.ECANCELED:
            run.state = RunState.CANCELLED
        else:
            run.state = RunState.FAILED
        run.finished = time.time()
        run.call = None
        run.dirty = True
        self._maybe_write(run, force=True)  # its last chunks and its outcome: one write
        if run.dirty:
            self._write_record(run)
        self.leave_queue(run)
        run._wake()

    # -- the journal ------------------------------------------------------------------------
    def _write_record(self, run: Run) -> None:
        run.dirty = False
        if self.journal:
            self.store.submit(_write_run, run.id, run.pid, self._record(run), self.next_id)

    def _record(self, run: Run) -> str:
        record = {
            "pid": run.pid,
            "lineage": run.lineage,
            "args": run.args.model_dump(mode="json", by_alias=True, exclude_defaults=True),
            "created": run.created,
            "state": str(run.state),
            "started": run.started,
            "finished": run.finished,
            "prompt": run.prompt,
            "n_prompt": run.n_prompt,
            "resumed": run.resumed,
            "result": run.result.model_dump(mode="json") if run.result is not None else None,
            "error": run.error.to_wire() if run.error is not None else None,
        }
        return dumps(record)

    def load(self) -> list[Run]:
        """Bring the journal's runs back (call at start, off the loop); returns the runs that
        had not finished, to be queued again."""
        rows, chunk_rows, next_id = self.store.call_sync(_load)
        self.next_id = max(self.next_id, next_id)
        chunks: dict[int, list[tuple[list[str], bytes]]] = {}
        for run_id, _seq, texts, ids in chunk_rows:
            chunks.setdefault(run_id, []).append((json.loads(texts), ids))
        pending: list[Run] = []
        for run_id, record in rows:
            rec = json.loads(record)
            try:
                args = m.GenerateArgs.model_validate(rec["args"], strict=False)
            except ValueError:
                log.warning("run %d: its journaled arguments no longer validate; dropped", run_id)
                self.store.submit(_delete, run_id)
                continue
            run = Run(run_id, rec["pid"], rec["lineage"], args, created=rec["created"])
            run.state = RunState(rec["state"])
            run.started, run.finished = rec.get("started"), rec.get("finished")
            run.prompt, run.n_prompt = rec.get("prompt"), rec.get("n_prompt", 0)
            run.resumed = rec.get("resumed", 0)
            for texts, ids in chunks.get(run_id, ()):
                run.chunks.extend(texts)
                run.ids.extend(array.array("i", ids).tolist())
            run.journaled, run.journaled_ids = len(run.chunks), len(run.ids)
            run.bytes = sum(len(c.encode()) for c in run.chunks)
            if rec.get("result") is not None:
                run.result = m.GenerateResult.model_validate(rec["result"])
            if rec.get("error") is not None:
                run.error = SyscallError.from_wire(rec["error"])
            self.runs[run_id] = run
            self.bytes += run.bytes
            self.next_id = max(self.next_id, run_id + 1)
            if not run.done:
                run.resumed += 1
                run.uncharged = len(run.ids)
                run.state = RunState.QUEUED
                pending.append(run)
        return pending

    def close(self) -> Iterable[Run]:
        """The kernel is stopping: unfinished runs stay in the journal as they are, to go on
        at the next start (their unwritten chunks are written now). Returns them."""
        self.closing = True
        active = [r for r in self.runs.values() if not r.done]
        for run in active:
            self._maybe_write(run, force=True)
        return active


def _write_run(conn: sqlite3.Connection, run_id: int, pid: int, record: str, next_id: int) -> None:
    conn.execute(
        "INSERT INTO runs (id, pid, record) VALUES (?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET record = excluded.record",
        (run_id, pid, record),
    )
    set_meta(conn, "next_run", str(next_id))


def _write_chunks(
    conn: sqlite3.Connection,
    run_id: int,
    seq: int,
    texts: str,
    ids: bytes,
    record: str | None,
) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO run_chunks (run, seq, texts, ids) VALUES (?, ?, ?, ?)",
        (run_id, seq, texts, ids),
    )
    if record is not None:  # the run's record changed with them (its prompt, its outcome)
        conn.execute("UPDATE runs SET record = ? WHERE id = ?", (record, run_id))


def _delete(conn: sqlite3.Connection, run_id: int) -> None:
    conn.execute("DELETE FROM run_chunks WHERE run = ?", (run_id,))
    conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))


def _load(
    conn: sqlite3.Connection,
) -> tuple[list[tuple[int, str]], list[tuple[int, int, str, bytes]], int]:
    rows = conn.execute("SELECT id, record FROM runs ORDER BY id").fetchall()
    chunk_rows = conn.execute(
        "SELECT run, seq, texts, ids FROM run_chunks ORDER BY run, seq"
    ).fetchall()
    return rows, chunk_rows, int(get_meta(conn, "next_run", "1") or 1)
