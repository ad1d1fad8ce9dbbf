"""The scheduler: which READY process gets the next free slot of its model.

Mechanism (this module's :class:`Scheduler`): run queues per model, slot accounting,
READY -> RUNNING transitions, wait/service time. Policy (a :class:`Policy`): the order
of a run queue. The mechanism never looks inside a policy.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from kernel.process import Proc, ProcState


@dataclass(eq=False)
class Waiter:
    """A process's place in a run queue."""

    proc: Proc
    seq: int  # arrival order, for FIFO and tie-breaks
    enqueued: float = field(default_factory=time.monotonic)
    granted: asyncio.Future[Slot] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(eq=False)
class Slot:
    """One sequence a model can decode at a time, held by a RUNNING process."""

    model: str
    index: int
    proc: Proc | None = None
    since: float = 0.0


class Policy:
    """Orders a run queue: ``pick`` returns the waiter to run next."""

    name = "abstract"

    def pick(self, queue: list[Waiter]) -> Waiter:
        raise NotImplementedError


class Fifo(Policy):
    """First come, first served."""

    name = "fifo"

    def pick(self, queue: list[Waiter]) -> Waiter:
        return min(queue, key=lambda w: w.seq)


class Priority(Policy):
    """Lowest nice value first; FIFO among equals."""

    name = "priority"

    def pick(self, queue: list[Waiter]) -> Waiter:
        return min(queue, key=lambda w: (w.proc.nice, w.seq))


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Fifo, Priority)}


class Scheduler:
    """Grants slots of each model to READY processes in the policy's order."""

    def __init__(self, slots: dict[str, int], policy: Policy | None = None) -> None:
        self.policy = policy or Fifo()
        self._slots = {m: [Slot(m, i) for i in range(n)] for m, n in slots.items()}
        self._queues: dict[str, list[Waiter]] = {m: [] for m in slots}
        self._seq = itertools.count()

    def add_model(self, model: str, slots: int) -> None:
        self._slots[model] = [Slot(model, i) for i in range(slots)]
        self._queues[model] = []

    def busy(self, model: str) -> int:
        return sum(1 for s in self._slots[model] if s.proc is not None)

    def queued(self, model: str) -> int:
        return len(self._queues[model])

    async def acquire(self, proc: Proc) -> Slot:
        """Queue ``proc`` as READY and wait for a slot of its model; it is RUNNING on
        return. Cancelling the wait removes it from the queue."""
        waiter = Waiter(proc, next(self._seq))
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
        proc.service_s += time.monotonic() - slot.since
        slot.proc = None
        self._dispatch(slot.model)

    def _dispatch(self, model: str) -> None:
        queue = self._queues[model]
        for slot in self._slots[model]:
            if slot.proc is not None:
                continue
            waiter = self._next_live(queue)
            if waiter is None:
                return
            slot.proc, slot.since = waiter.proc, time.monotonic()
            waiter.proc.state = ProcState.RUNNING
            waiter.granted.set_result(slot)

    def _next_live(self, queue: list[Waiter]) -> Waiter | None:
        """Pop the policy's choice among runnable waiters: cancelled-but-not-yet-unwound
        waiters are dropped, STOPPED processes stay queued until SIGCONT."""
        queue[:] = [w for w in queue if not w.granted.done()]
        runnable = [w for w in queue if w.proc.cont.is_set()]
        if not runnable:
            return None
        waiter = self.policy.pick(runnable)
        queue.remove(waiter)
        return waiter

    def kick(self, model: str) -> None:
        """Re-run dispatch (after SIGCONT made a queued process runnable again)."""
        self._dispatch(model)
