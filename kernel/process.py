"""The process table: LLM processes, their lifecycle, and who may act on whom.

Like xv6's proc.c: one struct per process with a small state enum, spawn/exit/wait/
kill, zombies until the parent waits, orphans re-parented to init (pid 1). All of it is
touched only from the kernel's event loop, so no locks.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from hmac import compare_digest
from typing import Protocol

from kernel.quota import Account, Limits
from syscalls.errors import Errno, SyscallError
from syscalls.models import ProcState

INIT_PID = 1


class TransitionError(RuntimeError):
    """A module asked the process table for a state change the lifecycle does not have:
    a kernel bug, never a caller's mistake (it surfaces as an internal error)."""


#: The lifecycle as data: each transition of :class:`ProcessTable` and the states it
#: may leave. Every other edge is refused. ``cont`` returns to the state before the stop
#: (READY if the process was queued or on a slot: it queues again for one).
TRANSITIONS: dict[str, frozenset[ProcState]] = {
    "ready": frozenset(
        {ProcState.NEW, ProcState.WAITING, ProcState.READY, ProcState.RUNNING}
    ),  # queued for a slot (READY -> READY: queued again, e.g. after SIGCONT)
    "run": frozenset({ProcState.READY}),  # granted a slot
    "idle": frozenset({ProcState.NEW, ProcState.READY, ProcState.RUNNING}),  # generation over
    "stop": frozenset({ProcState.NEW, ProcState.READY, ProcState.RUNNING, ProcState.WAITING}),
    "cont": frozenset({ProcState.STOPPED}),
    "exit": frozenset(set(ProcState) - {ProcState.ZOMBIE}),
    "recover": frozenset({ProcState.NEW}),  # a process rebuilt from the state database
}

#: Every legal (from, to) edge of a process's state.
LEGAL_EDGES: frozenset[tuple[ProcState, ProcState]] = frozenset(
    {(s, ProcState.READY) for s in TRANSITIONS["ready"]}
    | {(s, ProcState.RUNNING) for s in TRANSITIONS["run"]}
    | {(s, ProcState.WAITING) for s in TRANSITIONS["idle"]}
    | {(s, ProcState.STOPPED) for s in TRANSITIONS["stop"]}
    | {(ProcState.STOPPED, s) for s in (ProcState.NEW, ProcState.READY, ProcState.WAITING)}
    | {(s, ProcState.ZOMBIE) for s in TRANSITIONS["exit"]}
)  # recovery is not an edge: it restores a recorded state on a process not yet in the table


#: Exit status of a process ended by a signal, as a shell reports it (128 + signo).
#: HUP: its program died while the kernel was down (found at recovery), like a hangup.
SIGNAL_STATUS = {"HUP": 128 + 1, "TERM": 128 + 15, "KILL": 128 + 9}


def hash_token(token: str) -> str:
    """What the kernel keeps of a credential (on disk too): its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(eq=False)
class Program:
    """A top-level process and its descendants: one agent program, one account."""

    pgid: int  # the pid of the program's first process
    account: Account
    #: The memory namespace its processes share: ``prog:<pgid>``, or a name given at
    #: spawn so that a later run of the same program finds its memory again.
    namespace: str = ""
    procs: int = 0  # processes of it in the table (zombies included)

    def __post_init__(self) -> None:
        self.namespace = self.namespace or f"prog:{self.pgid}"


@dataclass(eq=False)
class Proc:
    """One LLM process. Every field is owned by the kernel's event loop."""

    pid: int
    ppid: int
    name: str
    owner: str
    token_hash: str  # SHA-256 of the secret credential: whoever holds pid+token acts as it
    model: str
    program: Program
    account: Account  # this process's own quota account (usage + limits)
    nice: int = 0
    state: ProcState = ProcState.NEW
    context: list[dict[str, str]] = field(default_factory=list)  # the conversation it keeps
    summary: str | None = None  # running summary of turns moved out of the window
    evicted: int = 0  # messages moved out of the window (to recall memory) so far
    ctx_policy: str = "truncate"  # what happens when a prompt would overflow the window
    ctx_window: int | None = None  # a window smaller than the model's, if asked at spawn
    host_pid: int | None = None  # OS pid of the program driving it (on the kernel's host)
    host_started: float | None = None  # that OS process's start time (pids get reused)
    mounts: dict[str, tuple[str, bool]] = field(
        default_factory=dict
    )  # /mnt/NAME -> (host dir, writable)
    tool_caps: list[list[str]] = field(
        default_factory=list
    )  # every layer must allow a tool's name (globs)
    confirm: bool = False  # irreversible tool calls wait for the owner's approval
    claim: str | None = None  # the spawn's idempotency key (SpawnArgs.claim)
    redact: tuple[str, ...] = ()  # PII kinds masked in what it stores (kernel/redact.py)
    redact_model: bool = False  # ... and in what its model is given
    adapter: str | None = None  # LoRA adapter of its model it generates with
    created: float = field(default_factory=time.time)
    token: str = field(default="", repr=False)  # the secret itself: set at spawn, never stored
    # usage counters
    generate_calls: int = 0
    prompt_tokens: int = 0
    wait_s: float = 0.0
    preemptions: int = 0  # times the scheduler took its slot mid-generation
    switch_prefill_tokens: int = 0  # tokens prefilled again to resume after preemptions
    switch_s: float = 0.0  # time spent on those re-prefills
    mean_output: float | None = None  # moving average of output tokens per call
    # lifecycle
    exit_status: int | None = None
    signal: str | None = None  # the signal that ended it, if any
    zombie_since: float | None = None
    orphaned: bool = False  # re-parented to init after its parent died
    term_pending: bool = False  # TERM arrived during a generation: exit when it ends
    state_before_stop: ProcState = ProcState.WAITING
    # the one llm.generate in flight, if any (a process generates one thing at a time)
    busy: bool = False
    cont: asyncio.Event = field(default_factory=asyncio.Event)  # set while not STOPPED
    children: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.cont.set()

    @property
    def alive(self) -> bool:
        return self.state is not ProcState.ZOMBIE

    # Usage lives in the account, where quotas are checked against it.
    @property
    def output_tokens(self) -> int:
        return self.account.output_tokens

    @property
    def service_s(self) -> float:
        return self.account.service_s

    @property
    def namespace(self) -> str:
        """Its own memory namespace."""
        return f"pid:{self.pid}"

    def new_token(self) -> str:
        """A fresh secret credential (the old one stops working)."""
        self.token = secrets.token_urlsafe(24)
        self.token_hash = hash_token(self.token)
        return self.token

    def check_token(self, token: str) -> bool:
        return compare_digest(self.token_hash, hash_token(token))


class Journal(Protocol):
    """Where the table reports changes that must be made durable (kernel/persist.py)."""

    def saved(self, proc: Proc) -> None:
        """``proc`` was created or changed."""

    def reaped(self, proc: Proc, program_gone: bool) -> None:
        """``proc`` left the table (and with it its program, if ``program_gone``)."""


class _NoJournal:
    def saved(self, proc: Proc) -> None:
        pass

    def reaped(self, proc: Proc, program_gone: bool) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a syscall: a process (pid > 0, token checked) or the admin (pid 0)."""

    pid: int
    proc: Proc | None

    @property
    def admin(self) -> bool:
        return self.proc is None


class ProcessTable:
    """Owns every :class:`Proc`; allocates pids; implements exit/wait/reap; and is the one
    writer of ``Proc.state``: every transition is a method here that refuses an edge the
    lifecycle does not have (:class:`TransitionError`)."""

    def __init__(self, owner: str, journal: Journal | None = None) -> None:
        self._procs: dict[int, Proc] = {}
        self._pids: list[int] = []  # the table's pids, ascending (pages of proc.ps)
        # Each state's processes, in the order they entered it: counts and the rows
        # sys.stat shows first (the ones on slots and queued) without walking the table.
        self.by_state: dict[ProcState, dict[int, Proc]] = {s: {} for s in ProcState}
        self._next_pid = INIT_PID + 1  # pids are never reused, across restarts too
        self._child_exited: dict[int, set[asyncio.Event]] = {}  # ppid -> its waiters
        self.owner = owner
        self.journal: Journal = journal or _NoJournal()

    @property
    def next_pid(self) -> int:
        return self._next_pid

    # -- lookup ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._procs)

    def __iter__(self) -> Iterator[Proc]:
        return iter(list(self._procs.values()))

    def page(self, after: int, limit: int, keep: Callable[[Proc], bool]) -> tuple[list[Proc], bool]:
        """Up to ``limit`` processes with pids above ``after`` that ``keep`` accepts, in
        pid order, and whether there are more."""
        out: list[Proc] = []
        for i in range(bisect.bisect_right(self._pids, after), len(self._pids)):
            proc = self._procs[self._pids[i]]
            if keep(proc):
                if len(out) == limit:
                    return out, True
                out.append(proc)
        return out, False

    def get(self, pid: int) -> Proc | None:
        return self._procs.get(pid)

    def lookup(self, pid: int) -> Proc:
        """The process ``pid`` or ESRCH."""
        proc = self._procs.get(pid)
        if proc is None:
            raise SyscallError(Errno.ESRCH, f"no process with pid {pid}")
        return proc

    def authenticate(self, pid: int, token: str) -> Proc:
        """The live process whose credential this is, or EACCES."""
        proc = self._procs.get(pid)
        if proc is None or not proc.check_token(token):
            raise SyscallError(
                Errno.EACCES,
                f"pid {pid} with that token is not a process of this kernel"
                " (it may have exited and been reaped, or the token is wrong)",
            )
        if not proc.alive:
            raise SyscallError(
                Errno.EACCES, f"process {pid} has exited; it can make no more syscalls"
            )
        return proc

    def is_ancestor(self, ancestor: int, pid: int) -> bool:
        """True if ``ancestor`` is ``pid``'s parent, grandparent, ..."""
        proc = self._procs.get(pid)
        while proc is not None and proc.ppid != 0:
            if proc.ppid == ancestor:
                return True
            proc = self._procs.get(proc.ppid)
        return False

    def target(self, caller: Caller, pid: int | None) -> Proc:
        """Resolve the process a call acts on: the caller itself, one of its
        descendants, or (for the admin) anyone. ESRCH / EPERM / EINVAL otherwise."""
        if pid is None:
            if caller.proc is None:
                raise SyscallError(Errno.EINVAL, "the admin must name the target process (pid)")
            return caller.proc
        proc = self.lookup(pid)
        if caller.admin or pid == caller.pid or self.is_ancestor(caller.pid, pid):
            return proc
        raise SyscallError(
            Errno.EPERM,
            f"process {caller.pid} may not act on process {pid}: "
            "only on itself and its descendants",
        )

    def descendants(self, pid: int) -> list[Proc]:
        """``pid``'s descendants, parents before children."""
        out, frontier = [], [pid]
        while frontier:
            proc = self._procs.get(frontier.pop())
            if proc is None:
                continue
            kids = [self._procs[c] for c in sorted(proc.children) if c in self._procs]
            out.extend(kids)
            frontier.extend(k.pid for k in kids)
        return out

    # -- state transitions: the only writers of Proc.state -------------------------
    def _move(self, proc: Proc, how: str, to: ProcState) -> None:
        if proc.state not in TRANSITIONS[how]:
            raise TransitionError(
                f"process {proc.pid}: {how} cannot take it from {proc.state} to {to}"
                f" (allowed from {', '.join(sorted(TRANSITIONS[how]))})"
            )
        if self._procs.get(proc.pid) is proc:
            del self.by_state[proc.state][proc.pid]
            self.by_state[to][proc.pid] = proc
        proc.state = to

    def ready(self, proc: Proc) -> None:
        """The process is runnable and waits for a slot (or for its model to load)."""
        self._move(proc, "ready", ProcState.READY)

    def run(self, proc: Proc) -> None:
        """The scheduler granted the process a slot: READY -> RUNNING."""
        self._move(proc, "run", ProcState.RUNNING)

    def idle(self, proc: Proc) -> None:
        """Its generation is over: the process waits for its program's next call."""
        self._move(proc, "idle", ProcState.WAITING)

    def stop(self, proc: Proc) -> None:
        """SIGSTOP: park the process, remembering where it was; it holds no slot until
        :meth:`cont` (``proc.cont`` is clear while STOPPED)."""
        before = proc.state
        self._move(proc, "stop", ProcState.STOPPED)
        proc.state_before_stop = before
        proc.cont.clear()

    def cont(self, proc: Proc) -> None:
        """SIGCONT: back to where the stop found it; a process that was queued or on a
        slot is READY (it queues for a slot again)."""
        before = proc.state_before_stop
        queued = before in (ProcState.RUNNING, ProcState.READY)
        self._move(proc, "cont", ProcState.READY if queued else before)
        proc.cont.set()

    def idle_when_continued(self, proc: Proc) -> None:
        """A stopped process's generation ended (cancelled, timed out): SIGCONT brings it
        back idle (WAITING), not queued for a slot it no longer wants."""
        if proc.state is ProcState.STOPPED:
            proc.state_before_stop = ProcState.WAITING

    def recover(self, proc: Proc, state: ProcState) -> None:
        """Give a process rebuilt from the state database (still NEW, not yet inserted)
        the state it was recorded in; a recovered STOPPED process stopped while idle."""
        if proc.pid in self._procs:
            raise TransitionError(f"process {proc.pid}: only a process not yet in the table")
        self._move(proc, "recover", state)
        if state is ProcState.STOPPED:
            proc.state_before_stop = ProcState.WAITING
            proc.cont.clear()

    # -- lifecycle -----------------------------------------------------------------
    def spawn(
        self,
        ppid: int,
        name: str,
        model: str,
        nice: int,
        system: str | None,
        limits: Limits | None = None,
        program_limits: Limits | None = None,
        namespace: str | None = None,
        fork: bool = False,
    ) -> Proc:
        """Create a process as a child of ``ppid`` (INIT_PID for top-level ones, which
        start a new program). A child inherits its parent's program and limits, and
        may only narrow the limits; with ``fork`` it starts with a copy of its parent's
        context. The new process's ``token`` is its secret credential (the kernel keeps
        only its hash after the reply)."""
        parent = self._procs.get(ppid)
        if parent is not None and program_limits is not None:
            raise SyscallError(
                Errno.EPERM, "program limits are set when a program starts (a top-level spawn)"
            )
        if parent is not None and namespace is not None:
            raise SyscallError(
                Errno.EPERM, "a memory namespace is named when a program starts (a top-level spawn)"
            )
        if fork and parent is None:
            raise SyscallError(
                Errno.EINVAL, "fork copies the caller's context: only a process can fork"
            )
        pid = self._next_pid
        self._next_pid += 1
        if parent is None:
            program = Program(
                pid, Account(f"program {pid}", program_limits or Limits()), namespace or ""
            )
            mine = limits or Limits()
        else:
            program = parent.program
            mine = parent.account.limits.narrowed(
                limits or Limits(), f"parent process {parent.pid}"
            )
        token = secrets.token_urlsafe(24)
        proc = Proc(
            pid=pid,
            ppid=ppid,
            name=name,
            owner=parent.owner if parent else self.owner,
            token_hash=hash_token(token),
            model=model,
            program=program,
            account=Account(f"process {pid}", mine),
            nice=nice,
            token=token,
        )
        if fork and parent is not None:
            proc.context = [dict(msg) for msg in parent.context]
            proc.summary, proc.evicted = parent.summary, parent.evicted
            proc.ctx_policy, proc.ctx_window = parent.ctx_policy, parent.ctx_window
            if system:  # a forked child may still get its own system prompt
                if proc.context and proc.context[0]["role"] == "system":
                    proc.context[0] = {"role": "system", "content": system}
                else:
                    proc.context.insert(0, {"role": "system", "content": system})
        elif system:
            proc.context.append({"role": "system", "content": system})
        self.insert(proc)
        if parent is not None:
            parent.children.add(pid)
        return proc

    def insert(self, proc: Proc) -> None:
        """Put ``proc`` in the table (spawn, or recovery from the state database)."""
        self._procs[proc.pid] = proc
        if not self._pids or proc.pid > self._pids[-1]:
            self._pids.append(proc.pid)
        else:
            bisect.insort(self._pids, proc.pid)
        self.by_state[proc.state][proc.pid] = proc
        proc.program.procs += 1
        self._next_pid = max(self._next_pid, proc.pid + 1)

    def reserve_pids(self, next_pid: int) -> None:
        """Never hand out a pid below ``next_pid`` (recovery: pids of reaped processes)."""
        self._next_pid = max(self._next_pid, next_pid)

    def exit(self, proc: Proc, status: int, signal: str | None = None) -> None:
        """Make ``proc`` a zombie, hand its children to init, wake its parent.

        The caller (kernel) is responsible for cancelling the process's in-flight work.
        """
        if not proc.alive:
            return
        self._move(proc, "exit", ProcState.ZOMBIE)
        proc.exit_status, proc.signal = status, signal
        proc.zombie_since = time.monotonic()
        proc.cont.set()  # nothing may stay parked on a dead process
        self.journal.saved(proc)
        for cpid in sorted(proc.children):
            self._reparent_to_init(cpid)
        proc.children.clear()
        if proc.ppid == INIT_PID and proc.orphaned:
            self.reap(proc)  # init reaps orphans at once, as on Unix
        self._notify(proc.ppid)

    def _reparent_to_init(self, pid: int) -> None:
        child = self._procs.get(pid)
        if child is None:
            return
        child.ppid, child.orphaned = INIT_PID, True
        if not child.alive:
            self.reap(child)
        else:
            self.journal.saved(child)

    def reap(self, proc: Proc) -> None:
        """Remove a zombie from the table (its pid is never handed out again)."""
        if self._procs.pop(proc.pid, None) is None:
            return
        del self._pids[bisect.bisect_left(self._pids, proc.pid)]
        del self.by_state[proc.state][proc.pid]
        parent = self._procs.get(proc.ppid)
        if parent is not None:
            parent.children.discard(proc.pid)
        proc.program.procs -= 1
        self.journal.reaped(proc, proc.program.procs == 0)

    def reap_stale(self, older_than_s: float) -> list[int]:
        """Init's housekeeping: reap top-level zombies nobody waited for in time."""
        now, reaped = time.monotonic(), []
        for proc in self:
            if (
                proc.ppid == INIT_PID
                and not proc.alive
                and proc.zombie_since is not None
                and now - proc.zombie_since >= older_than_s
            ):
                self.reap(proc)
                reaped.append(proc.pid)
        return reaped

    # -- wait ----------------------------------------------------------------------
    def _notify(self, ppid: int) -> None:
        for event in self._child_exited.get(ppid, ()):
            event.set()

    def _children_of(self, caller: Caller) -> list[Proc]:
        if caller.admin:
            return [p for p in self if p.ppid == INIT_PID and not p.orphaned]
        assert caller.proc is not None
        return [self._procs[c] for c in sorted(caller.proc.children) if c in self._procs]

    def _find_zombie(self, caller: Caller, pid: int | None) -> Proc | None:
        kids = self._children_of(caller)
        if pid is not None:
            kids = [k for k in kids if k.pid == pid]
            if not kids and pid not in self._procs:
                raise SyscallError(
                    Errno.ESRCH, f"no process with pid {pid} (it never existed, or was reaped)"
                )
            if not kids:
                raise SyscallError(Errno.ECHILD, f"process {pid} is not a child of the caller")
        elif not kids:
            raise SyscallError(Errno.ECHILD, "the caller has no children to wait for")
        return next((k for k in kids if not k.alive), None)

    async def wait(self, caller: Caller, pid: int | None, timeout: float | None) -> Proc:
        """Block until a child (``pid`` or any) is a zombie; reap and return it.

        ECHILD if there is no such child; ETIMEDOUT if ``timeout`` passes first.
        """
        key = INIT_PID if caller.admin else caller.pid
        event = asyncio.Event()
        self._child_exited.setdefault(key, set()).add(event)
        try:
            async with asyncio.timeout(timeout):
                while (zombie := self._find_zombie(caller, pid)) is None:
                    event.clear()
                    await event.wait()
        except TimeoutError:
            raise SyscallError(Errno.ETIMEDOUT, f"no child exited within {timeout} s") from None
        finally:
            waiters = self._child_exited[key]
            waiters.discard(event)
            if not waiters:
                del self._child_exited[key]
        self.reap(zombie)
        return zombie
