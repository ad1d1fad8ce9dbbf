"""The scheduler: which READY process gets the next free slot of its model, and when a
RUNNING one must give its slot back.

Plan (:meth:`Scheduler.schedule`): a pure function of the queues, the slots and ``now``
(the clock is injected) that returns a :class:`Plan` — ``grants`` (which waiter gets which
free slot) and ``preemptions`` (which holder must yield, and why) — as vLLM's scheduler
returns a ``SchedulerOutput``. Mechanism (:meth:`Scheduler.carry_out`): hand the slots
out (READY -> RUNNING through the process table, the waiters' futures resolved), flag the
slots that must yield, charge wait and service time. Policy (a :class:`Policy`): the order
of a run queue (``pick``) and whether a holder should yield to a waiting one
(``should_preempt``); the mechanism never looks inside a policy. The generation loop
(``kernel/sys_llm.py``) asks for a look when its slot reaches ``Slot.next_check`` tokens
and yields when a plan set ``Slot.preempt``, by aborting the driver request at a token
boundary and resuming later from the tokens already made. ``llmos bench sched`` replays
its workloads through the same plans in virtual time.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import operator
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kernel.process import Proc, ProcessTable, Program


@dataclass(eq=False)
class Waiter:
    """A process's place in a run queue."""

    proc: Proc
    seq: int  # arrival order, for FIFO and tie-breaks
    expected_tokens: int  # what this generation is expected to cost (load policy)
    enqueued: float = field(default_factory=time.monotonic)
    #: Resolved with the slot when a plan grants one (None: the caller reads the plan).
    granted: asyncio.Future[Slot] | None = None
    preemptible: bool = True  # False: a grant keeps its slot until the generation ends


#: ``Slot.next_check`` of a holder the scheduler will not look at again.
NEVER = sys.maxsize


@dataclass(eq=False)
class Slot:
    """One sequence a model can decode at a time, held by a RUNNING process.

    The holder's generation loop reads two fields at every token, nothing more:
    ``tokens >= next_check`` (time to ask the scheduler for a look, :meth:`Scheduler.tick`)
    and ``preempt`` (a plan told it to yield: abort at this token boundary)."""

    model: str
    index: int
    proc: Proc | None = None
    since: float = 0.0  # when the holder got it
    tokens: int = 0  # tokens the holder generated on it since then (its quantum's use)
    next_check: int = 0  # slot.tokens at which to consider preemption again
    preemptible: bool = True
    preempt: str | None = None  # why a plan asked the holder to yield; None: keep going


@dataclass(frozen=True, slots=True)
class Grant:
    """Part of a plan: ``waiter`` gets the free ``slot``."""

    waiter: Waiter
    slot: Slot


@dataclass(frozen=True, slots=True)
class Preemption:
    """Part of a plan: the holder of ``slot`` must yield it at its next token, because
    ``reason``."""

    slot: Slot
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """What :meth:`Scheduler.schedule` decided; :meth:`Scheduler.carry_out` does it.

    ``looked``: the running slots whose preemption the policy weighed (the mechanism
    looks at them again a quarter quantum later, since a look scans the queue)."""

    grants: tuple[Grant, ...] = ()
    preemptions: tuple[Preemption, ...] = ()
    looked: tuple[Slot, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.grants or self.preemptions or self.looked)


#: The plan of a look that found nothing to do (shared: the token path allocates nothing).
EMPTY_PLAN = Plan()


def _runnable(w: Waiter) -> bool:
    """A queued waiter a plan may grant: not STOPPED, not exited, not cancelled."""
    return w.proc.cont.is_set() and w.proc.alive and (w.granted is None or not w.granted.done())


@dataclass(frozen=True, slots=True)
class LoadView:
    """What a policy may know of the system's load for one model."""

    slots: int
    busy: int
    queued: int


class Policy:
    """Orders a run queue and decides preemption. Subclasses override both."""

    name = "abstract"
    #: Tokens a running process may generate before a waiter can take its slot (None: never).
    quantum: int | None = None

    def pick(self, queue: list[Waiter], now: float, load: LoadView) -> Waiter:
        raise NotImplementedError

    def should_preempt(self, slot: Slot, queue: list[Waiter], now: float, load: LoadView) -> bool:
        """Called at every token of a running process while others wait."""
        return self.quantum is not None and slot.tokens >= self.quantum


class Fifo(Policy):
    """First come, first served; a generation keeps its slot until it finishes."""

    name = "fifo"

    def pick(self, queue: list[Waiter], now: float, load: LoadView) -> Waiter:
        return min(queue, key=lambda w: w.seq)


class RoundRobin(Policy):
    """FIFO with a quantum in tokens: a preempted process goes to the back of the queue."""

    name = "rr"

    def __init__(self, quantum: int = 32) -> None:
        self.quantum = quantum

    def pick(self, queue: list[Waiter], now: float, load: LoadView) -> Waiter:
        return min(queue, key=lambda w: w.seq)


class Priority(Policy):
    """Lowest nice first, with aging: every ``aging_s`` seconds of waiting counts as one
    nice level, so a low-priority process always gets a slot eventually. A waiter whose
    aged priority beats a runner's preempts it once the runner has used ``quantum``."""

    name = "priority"

    def __init__(self, aging_s: float = 2.0, quantum: int = 16) -> None:
        self.aging_s = aging_s
        self.quantum = quantum

    def effective(self, w: Waiter, now: float) -> float:
        return w.proc.nice - (now - w.enqueued) / self.aging_s

    def pick(self, queue: list[Waiter], now: float, load: LoadView) -> Waiter:
        return min(queue, key=lambda w: (self.effective(w, now), w.seq))

    def should_preempt(self, slot: Slot, queue: list[Waiter], now: float, load: LoadView) -> bool:
        assert slot.proc is not None and self.quantum is not None
        best = min(self.effective(w, now) for w in queue)
        return slot.tokens >= self.quantum and best < slot.proc.nice


_ENQUEUED = operator.attrgetter("enqueued")


class Fair(Policy):
    """Program-level least attained service (Autellix's PLAS) with FCFS inside a level,
    its level boundaries learnt from the programs the kernel has seen finish.

    A program's attained service is the output tokens all its processes have generated.
    It is in level 0 below a threshold ``T``, then one level per doubling of ``T``. Lower
    levels run first, so short agent programs are never stuck behind long ones; inside a
    level the older program goes first (program-level FCFS: a program that has started
    is finished before newcomers are interleaved with it), then, among its processes,
    the one of lowest nice (a program's urgent work first), then the least service. After
    its quantum a runner yields to a waiter of a lower level; a waiter that has waited
    ``starve_s`` goes first regardless.

    ``T`` is ``spread`` times the median size (output tokens) of the last ``window``
    programs that finished (``base_tokens`` until ``min_programs`` have): a program is
    demoted only once it has received several times what a typical program needs. This
    is the Gittins-index view of LAS: demoting early helps only if the sizes have a long
    tail, and among programs of similar size serving the oldest first is best. A fixed
    ``T`` is wrong for some workload: with ``T`` = 64 tokens, chat programs of about 100
    tokens are demoted one after the other and LAS degenerates to processor sharing
    (mean and p95 completion worse than FIFO), while a ``T`` above them lets a long
    program of a short-program workload hold a slot for hundreds of tokens. A program
    counts as finished when every process of it the scheduler has seen is a zombie; the
    kernel knows this without any hint from the program.

    With ``starve_factor`` set, the starvation wait is instead that many times the median
    lifetime (spawn to exit) of the last programs to finish, a bound free of any time
    scale (on the simulator it gains less; docs/BENCHMARKS.md has the frontier).

    The defaults (``spread`` 4, ``starve_s`` 3) are the point of the frontier measured by
    ``llmos bench sched`` where p95 completion is no worse than FIFO's on any workload;
    ``starve_s`` 30 gains a few percent more in the mean at a p95 up to 2 % worse."""

    name = "fair"

    def __init__(
        self,
        quantum: int = 32,
        starve_s: float = 3.0,
        base_tokens: int = 64,
        spread: float = 4.0,
        window: int = 256,
        min_programs: int = 16,
        min_tokens: int = 8,
        sweep_s: float = 0.25,
        starve_factor: float | None = None,
    ) -> None:
        if spread <= 0 or window < 1 or min_programs < 1 or min_tokens < 1 or base_tokens < 1:
            raise ValueError(
                "spread, window, min_programs, min_tokens and base_tokens must be positive"
            )
        self.quantum = quantum
        self.starve_s = starve_s
        self.base_tokens = base_tokens
        self.spread = spread
        self.min_programs = min_programs
        self.min_tokens = min_tokens
        self.sweep_s = sweep_s
        #: Level-0 threshold in output tokens (see the class docstring).
        self.threshold: float = float(base_tokens)
        self.finished: deque[int] = deque(maxlen=window)  # sizes of the last programs to finish
        self.lifetimes: deque[float] = deque(maxlen=window)  # their seconds from spawn to exit
        self.starve_factor = starve_factor
        self.starve_after: float = starve_s  # the waiting time at which a waiter goes first
        self._live: dict[
            int, tuple[Program, list[Proc]]
        ] = {}  # pgid -> program, its processes seen
        self._swept = -math.inf
        self._ranks: dict[Waiter, tuple[int, int, int, int]] = {}  # cached rank() of queued waiters
        self._ranked_at = -math.inf

    def level(self, proc: Proc) -> int:
        used = proc.program.account.output_tokens
        return 0 if used < self.threshold else int(math.log2(used / self.threshold)) + 1

    def key(self, w: Waiter, now: float) -> tuple[int, float, int, int, int, int]:
        if now - w.enqueued >= self.starve_after:
            return (0, w.enqueued, 0, 0, 0, w.seq)
        p = w.proc
        return (1, self.level(p), p.program.pgid, p.nice, p.account.output_tokens, w.seq)

    def observe(self, proc: Proc, now: float) -> None:
        """Note that ``proc`` (and its program) is scheduled; every ``sweep_s`` move the
        programs whose processes have all exited to the finished sizes and update the
        threshold."""
        seen = self._live.get(proc.program.pgid)
        if seen is None:
            self._live[proc.program.pgid] = (proc.program, [proc])
        elif proc not in seen[1]:
            seen[1].append(proc)
        if now - self._swept < self.sweep_s:
            return
        self._swept = now
        done = [pgid for pgid, (_, procs) in self._live.items() if not any(p.alive for p in procs)]
        for pgid in done:
            account = self._live.pop(pgid)[0].account
            self.finished.append(account.output_tokens)
            self.lifetimes.append(now - account.opened)
        if done and len(self.finished) >= self.min_programs:
            self.threshold = max(
                float(self.min_tokens), self.spread * statistics.median(self.finished)
            )
            if self.starve_factor is not None:
                self.starve_after = self.starve_factor * statistics.median(self.lifetimes)

    def rank(self, w: Waiter) -> tuple[int, int, int, int]:
        """``key`` of a waiter that is not starving, less its seq (the queue is in seq order)."""
        p = w.proc
        return (self.level(p), p.program.pgid, p.nice, p.account.output_tokens)

    def pick(self, queue: list[Waiter], now: float, load: LoadView) -> Waiter:
        # The order of key(). With a thousand programs queued this runs at every grant on
        # the kernel's one loop, so each waiter's rank is computed once and refreshed every
        # sweep_s (a waiting process makes no tokens; only its program's other processes
        # and the threshold move it), and the scans themselves run in C.
        oldest = min(queue, key=_ENQUEUED)
        if now - oldest.enqueued >= self.starve_after:
            chosen = oldest
        else:
            if now - self._ranked_at >= self.sweep_s:
                self._ranks.clear()
                self._ranked_at = now
            ranks = self._ranks
            for w in queue:
                if w not in ranks:
                    ranks[w] = self.rank(w)
            chosen = min(queue, key=ranks.__getitem__)  # ties: the first in the queue
        self._ranks.pop(chosen, None)
        self.observe(chosen.proc, now)
        return chosen

    def should_preempt(self, slot: Slot, queue: list[Waiter], now: float, load: LoadView) -> bool:
        assert slot.proc is not None and self.quantum is not None
        if slot.tokens < self.quantum:
            return False
        if now - min(queue, key=_ENQUEUED).enqueued >= self.starve_after:
            return True
        mine = self.level(slot.proc)
        if mine == 0:
            return False
        bound = self.threshold * 2 ** (mine - 1)  # a program below this is in a lower level
        return any(w.proc.program.account.output_tokens < bound for w in queue)


class Load(Policy):
    """The source documents' rule: when load is above a threshold, run the cheapest
    waiting request (fewest expected tokens) to drain the queue; otherwise the
    highest-priority one (lowest nice). Load = (busy slots + queued) / slots."""

    name = "load"

    def __init__(self, threshold: float = 1.5) -> None:
        self.threshold = threshold

    def pick(self, queue: list[Waiter], now: float, load: LoadView) -> Waiter:
        if (load.busy + load.queued) / max(load.slots, 1) > self.threshold:
            return min(queue, key=lambda w: (w.expected_tokens, w.seq))
        return min(queue, key=lambda w: (w.proc.nice, w.seq))


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Fifo, RoundRobin, Priority, Fair, Load)}

#: The policy a kernel runs unless told otherwise (the winner of `llmos bench sched`).
DEFAULT_POLICY = "fair"


def make_policy(name: str, quantum: int | None = None) -> Policy:
    """Instantiate policy ``name``; ``quantum`` (tokens) for the policies that preempt."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    cls = POLICIES[name]
    if quantum is None:
        return cls()
    if "quantum" not in inspect.signature(cls).parameters:
        raise ValueError(f"policy {name!r} does not preempt, so it takes no quantum")
    if quantum < 1:
        raise ValueError("the quantum must be at least 1 token")
    return cls(quantum=quantum)  # type: ignore[call-arg]


class Scheduler:
    """The mechanism: run queues and slots per model. :meth:`schedule` plans who gets
    which free slot and who must yield (asking the policy, never deciding itself);
    :meth:`carry_out` does it, moving processes READY -> RUNNING through the process
    table and resolving the waiters' futures. Every event that can change a plan
    (a process queues, a slot is released, SIGCONT, a holder reaches its next look)
    plans and carries out at once, so the queues are always in a planned state."""

    def __init__(
        self,
        slots: dict[str, int],
        policy: Policy | None = None,
        procs: ProcessTable | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or Fifo()
        #: Where state transitions go (a private table if none: its rules need no rows).
        self.procs = procs if procs is not None else ProcessTable(owner="scheduler")
        self.clock = clock  # virtual time in `llmos bench sched`'s model
        self._slots = {m: [Slot(m, i) for i in range(n)] for m, n in slots.items()}
        self._queues: dict[str, list[Waiter]] = {m: [] for m in slots}
        self._seq = itertools.count()
        self.preempted: dict[str, int] = dict.fromkeys(slots, 0)  # yields asked, per model

    def slot(self, model: str, index: int) -> Slot:
        """Slot ``index`` of ``model`` (to read; the scheduler alone hands slots out)."""
        return self._slots[model][index]

    def busy(self, model: str) -> int:
        return sum(1 for s in self._slots[model] if s.proc is not None)

    def queued(self, model: str) -> int:
        return len(self._queues[model])

    def queue_states(self, model: str) -> dict[str, int]:
        """How many of ``model``'s waiters are in each process state (READY, STOPPED)."""
        counts: dict[str, int] = {}
        for w in self._queues[model]:
            counts[w.proc.state.value] = counts.get(w.proc.state.value, 0) + 1
        return counts

    def load(self, model: str) -> LoadView:
        return LoadView(len(self._slots[model]), self.busy(model), self.queued(model))

    # -- the plan ------------------------------------------------------------------
    def schedule(self, now: float, model: str | None = None) -> Plan:
        """Plan for every model (or just ``model``) at time ``now``: grant each free slot
        to the policy's pick among runnable waiters, and, for running slots due for a
        look, ask the policy whether the holder should yield to someone runnable (at
        most one yield per runnable waiter not already served). Changes no queue or
        slot (a policy may keep statistics of its own)."""
        grants: list[Grant] = []
        preemptions: list[Preemption] = []
        looked: list[Slot] = []
        for name in (model,) if model is not None else self._queues:
            self._plan(name, now, grants, preemptions, looked)
        if not (grants or preemptions or looked):
            return EMPTY_PLAN
        return Plan(tuple(grants), tuple(preemptions), tuple(looked))

    def _plan(
        self,
        model: str,
        now: float,
        grants: list[Grant],
        preemptions: list[Preemption],
        looked: list[Slot],
    ) -> None:
        queue = self._queues[model]
        if not queue:
            return
        slots = self._slots[model]
        free = [s for s in slots if s.proc is None]
        busy = len(slots) - len(free)
        # A policy's choice is the least waiter by an order of its own, so when its choice
        # among all queued waiters is runnable it is also its choice among the runnable
        # ones: only when a STOPPED or cancelled waiter came first is the queue filtered,
        # which with a thousand waiters costs more than the pick itself.
        waiting = queue
        for i, slot in enumerate(free):
            if not waiting:
                break
            load = LoadView(len(slots), busy, len(waiting))
            w = self.policy.pick(waiting, now, load)
            if not _runnable(w):
                waiting = [x for x in waiting if _runnable(x)]
                if not waiting:
                    break
                w = self.policy.pick(waiting, now, load)
            grants.append(Grant(w, slot))
            busy += 1
            if i + 1 < len(free) or self.policy.quantum is not None:
                waiting = [x for x in waiting if x is not w]
            else:
                return  # the last free slot, and this policy never preempts
        quantum = self.policy.quantum
        if quantum is None or not waiting:
            return  # nobody left waiting: a due holder looks again at its next token
        runnable: list[Waiter] | None = None
        budget = 0
        for slot in slots:
            if slot.proc is None or slot.preempt is not None or slot.tokens < slot.next_check:
                continue
            if runnable is None:
                runnable = [w for w in waiting if _runnable(w)]
                pending = sum(1 for s in slots if s.preempt is not None)
                budget = len(runnable) - pending  # yields already asked for serve some
            looked.append(slot)
            if budget <= 0:
                continue
            load = LoadView(len(slots), busy, len(waiting))
            if self.policy.should_preempt(slot, runnable, now, load):
                budget -= 1
                preemptions.append(
                    Preemption(
                        slot,
                        f"{self.policy.name}: {slot.tokens} tokens past a quantum of"
                        f" {quantum}, {len(runnable)} runnable waiting",
                    )
                )

    def carry_out(self, plan: Plan) -> Plan:
        """Do what ``plan`` says: hand out the granted slots (READY -> RUNNING, futures
        resolved), flag the slots that must yield (their holders abort at the next token
        boundary), and schedule the next look at the slots looked at. Returns ``plan``."""
        now = self.clock()
        for grant in plan.grants:
            w, slot = grant.waiter, grant.slot
            self._queues[slot.model].remove(w)
            quantum = self.policy.quantum
            slot.proc, slot.since, slot.tokens = w.proc, now, 0
            slot.preemptible, slot.preempt = w.preemptible, None
            slot.next_check = quantum if quantum is not None and w.preemptible else NEVER
            self.procs.run(w.proc)
            if w.granted is not None:
                w.granted.set_result(slot)
        for p in plan.preemptions:
            p.slot.preempt, p.slot.next_check = p.reason, NEVER
            self.preempted[p.slot.model] += 1
        for slot in plan.looked:
            if slot.preempt is None:
                slot.next_check = slot.tokens + max(1, (self.policy.quantum or 4) // 4)
        return plan

    def dispatch(self, model: str) -> Plan:
        """Plan for ``model`` now and carry the plan out."""
        return self.carry_out(self.schedule(self.clock(), model))

    # -- events --------------------------------------------------------------------
    def enqueue(self, proc: Proc, expected_tokens: int = 0, preemptible: bool = True) -> Waiter:
        """Queue ``proc`` (now READY) for a slot of its model, without planning yet."""
        waiter = Waiter(proc, next(self._seq), expected_tokens, self.clock(), None, preemptible)
        self._queues[proc.model].append(waiter)
        self.procs.ready(proc)
        return waiter

    def dequeue(self, waiter: Waiter) -> None:
        """Take a waiter that was not granted a slot out of its queue."""
        queue = self._queues[waiter.proc.model]
        if waiter in queue:
            queue.remove(waiter)

    async def acquire(self, proc: Proc, expected_tokens: int = 0, preemptible: bool = True) -> Slot:
        """Queue ``proc`` as READY and wait for a slot of its model; it is RUNNING on
        return. Cancelling the wait removes it from the queue. A ``preemptible=False``
        holder keeps its slot until it releases it."""
        waiter = self.enqueue(proc, expected_tokens, preemptible)
        waiter.granted = asyncio.get_running_loop().create_future()
        self.dispatch(proc.model)
        try:
            return await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.release(waiter.granted.result())  # granted just as we were cancelled
            else:
                self.dequeue(waiter)
            raise
        finally:
            proc.wait_s += self.clock() - waiter.enqueued

    def release(self, slot: Slot) -> Plan:
        """Give ``slot`` back (generation finished, preempted, stopped or killed) and
        hand it on; returns the plan carried out."""
        proc = slot.proc
        if proc is None:
            return EMPTY_PLAN
        used = self.clock() - slot.since
        proc.account.service_s += used
        proc.program.account.service_s += used
        slot.proc, slot.tokens, slot.next_check, slot.preempt = None, 0, 0, None
        return self.dispatch(slot.model)

    def tick(self, slot: Slot) -> Plan:
        """The holder of ``slot`` reached ``slot.next_check`` tokens: plan and carry out
        (the plan may flag ``slot.preempt``). With nobody queued this returns at once:
        a holder past its quantum calls it at every token until someone waits."""
        if not self._queues[slot.model] or slot.proc is None:
            return EMPTY_PLAN
        return self.dispatch(slot.model)

    def kick(self, model: str) -> None:
        """Re-run dispatch (after SIGCONT made a queued process runnable again)."""
        self.dispatch(model)
