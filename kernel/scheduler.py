"""The scheduler: which READY process gets the next free slot of its model, and when a
RUNNING one must give its slot back.

Mechanism (:class:`Scheduler`): run queues per model, slot accounting, READY -> RUNNING,
wait and service time, the preemption check at every token. Policy (a :class:`Policy`):
the order of a run queue (``pick``) and whether a running process should yield to a
waiting one (``should_preempt``). The mechanism never looks inside a policy; the
generation loop (``kernel/sys_llm.py``) carries out a preemption by aborting the driver
request at a token boundary and resuming later from the tokens already made.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import time
from dataclasses import dataclass, field

from kernel.process import Proc, ProcState


@dataclass(eq=False)
class Waiter:
    """A process's place in a run queue."""

    proc: Proc
    seq: int  # arrival order, for FIFO and tie-breaks
    expected_tokens: int  # what this generation is expected to cost (load policy)
    enqueued: float = field(default_factory=time.monotonic)
    granted: asyncio.Future[Slot] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(eq=False)
class Slot:
    """One sequence a model can decode at a time, held by a RUNNING process."""

    model: str
    index: int
    proc: Proc | None = None
    since: float = 0.0  # when the holder got it
    tokens: int = 0  # tokens the holder generated on it since then (its quantum's use)
    next_check: int = 0  # slot.tokens at which to consider preemption again


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


class Fair(Policy):
    """Program-level least attained service (Autellix's PLAS) with FCFS inside a level.

    A program's attained service is the output tokens all its processes have generated;
    it falls into level 0 below ``base_tokens``, then one level per doubling. Lower levels
    run first, so short agent programs are never stuck behind long ones; inside a level
    the older program goes first (program-level FCFS: a program that has started is
    finished before newcomers are interleaved with it), then its process with the least
    service. A waiter older than ``starve_s`` goes first regardless; after its quantum a
    runner yields to a waiter of a lower level."""

    name = "fair"

    def __init__(self, quantum: int = 32, starve_s: float = 30.0, base_tokens: int = 64) -> None:
        self.quantum = quantum
        self.starve_s = starve_s
        self.base_tokens = base_tokens

    def level(self, proc: Proc) -> int:
        used = proc.program.account.output_tokens
        return 0 if used < self.base_tokens else int(math.log2(used / self.base_tokens)) + 1

    def key(self, w: Waiter, now: float) -> tuple[int, float, int, int, int]:
        if now - w.enqueued >= self.starve_s:
            return (0, w.enqueued, 0, 0, w.seq)
        p = w.proc
        return (1, self.level(p), p.program.pgid, p.account.output_tokens, w.seq)

    def pick(self, queue: list[Waiter], now: float, load: LoadView) -> Waiter:
        return min(queue, key=lambda w: self.key(w, now))

    def should_preempt(self, slot: Slot, queue: list[Waiter], now: float, load: LoadView) -> bool:
        assert slot.proc is not None and self.quantum is not None
        if slot.tokens < self.quantum:
            return False
        mine = self.level(slot.proc)
        return any(now - w.enqueued >= self.starve_s or self.level(w.proc) < mine for w in queue)


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
    """Grants slots of each model to READY processes in the policy's order."""

    def __init__(self, slots: dict[str, int], policy: Policy | None = None) -> None:
        self.policy = policy or Fifo()
        self._slots = {m: [Slot(m, i) for i in range(n)] for m, n in slots.items()}
        self._queues: dict[str, list[Waiter]] = {m: [] for m in slots}
        self._seq = itertools.count()

    def busy(self, model: str) -> int:
        return sum(1 for s in self._slots[model] if s.proc is not None)

    def queued(self, model: str) -> int:
        return len(self._queues[model])

    def load(self, model: str) -> LoadView:
        return LoadView(len(self._slots[model]), self.busy(model), self.queued(model))

    async def acquire(self, proc: Proc, expected_tokens: int = 0) -> Slot:
        """Queue ``proc`` as READY and wait for a slot of its model; it is RUNNING on
        return. Cancelling the wait removes it from the queue."""
        waiter = Waiter(proc, next(self._seq), expected_tokens)
        self._queues[proc.model].append(waiter)
        proc.state = ProcState.READY
        self._dispatch(proc.model)
        try:
            return await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.release(waiter.granted.result())  # granted just as we were cancelled
            elif waiter in self._queues[proc.model]:
                self._queues[proc.model].remove(waiter)
            raise
        finally:
            proc.wait_s += time.monotonic() - waiter.enqueued

    def release(self, slot: Slot) -> None:
        """Give ``slot`` back (generation finished, preempted, stopped or killed)."""
        proc = slot.proc
        if proc is None:
            return
        used = time.monotonic() - slot.since
        proc.account.service_s += used
        proc.program.account.service_s += used
        slot.proc, slot.tokens, slot.next_check = None, 0, 0
        self._dispatch(slot.model)

    def should_preempt(self, slot: Slot) -> bool:
        """Whether the holder of ``slot`` should yield now (checked at every token)."""
        quantum = self.policy.quantum
        if quantum is None or slot.tokens < max(quantum, slot.next_check) or slot.proc is None:
            return False  # the cheap common case, checked first: this runs at every token
        queue = self._queues[slot.model]
        if not queue:
            return False
        # Past the quantum, look again only every quarter quantum: a look scans the queue.
        slot.next_check = slot.tokens + max(1, quantum // 4)
        runnable = [w for w in queue if w.proc.cont.is_set() and not w.granted.done()]
        if not runnable:
            return False
        return self.policy.should_preempt(slot, runnable, time.monotonic(), self.load(slot.model))

    def kick(self, model: str) -> None:
        """Re-run dispatch (after SIGCONT made a queued process runnable again)."""
        self._dispatch(model)

    def _dispatch(self, model: str) -> None:
        queue = self._queues[model]
        for slot in self._slots[model]:
            if slot.proc is not None:
                continue
            waiter = self._next_live(queue, model)
            if waiter is None:
                return
            slot.proc, slot.since, slot.tokens, slot.next_check = waiter.proc, time.monotonic(), 0, 0
            waiter.proc.state = ProcState.RUNNING
            waiter.granted.set_result(slot)

    def _next_live(self, queue: list[Waiter], model: str) -> Waiter | None:
        """Pop the policy's choice among runnable waiters: cancelled-but-not-yet-unwound
        waiters are dropped, STOPPED processes stay queued until SIGCONT."""
        queue[:] = [w for w in queue if not w.granted.done()]
        runnable = [w for w in queue if w.proc.cont.is_set()]
        if not runnable:
            return None
        waiter = self.policy.pick(runnable, time.monotonic(), self.load(model))
        queue.remove(waiter)
        return waiter
