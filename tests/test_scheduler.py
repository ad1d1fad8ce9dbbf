"""The scheduler grants a model's slots in policy order and never loses a slot."""

import asyncio

from kernel.process import INIT_PID, ProcessTable, ProcState
from kernel.scheduler import Priority, Scheduler


def procs(n, nice=None):
    t = ProcessTable(owner="me")
    return [t.spawn(INIT_PID, f"p{i}", "m", (nice or [0] * n)[i], None) for i in range(n)]


def test_slots_are_granted_fifo_and_released_to_the_next_waiter():
    async def go():
        s = Scheduler({"m": 1})
        a, b, c = procs(3)
        slot = await s.acquire(a)
        assert a.state is ProcState.RUNNING and s.busy("m") == 1
        tb = asyncio.create_task(s.acquire(b))
        tc = asyncio.create_task(s.acquire(c))
        await asyncio.sleep(0)
        assert b.state is ProcState.READY and s.queued("m") == 2
        s.release(slot)
        slot_b = await tb
        assert slot_b.proc is b and not tc.done()
        s.release(slot_b)
        s.release(await tc)
        assert s.busy("m") == 0 and s.queued("m") == 0
    asyncio.run(go())


def test_priority_policy_runs_lowest_nice_first():
    async def go():
        s = Scheduler({"m": 1}, Priority())
        holder, low, high = procs(3, nice=[0, 10, -5])
        slot = await s.acquire(holder)
        t_low = asyncio.create_task(s.acquire(low))
        t_high = asyncio.create_task(s.acquire(high))
        await asyncio.sleep(0)
        s.release(slot)
        await asyncio.sleep(0)
        assert t_high.done() and not t_low.done()
        s.release(t_high.result())
        s.release(await t_low)
    asyncio.run(go())


def test_a_cancelled_waiter_leaves_the_queue_and_no_slot_leaks():
    async def go():
        s = Scheduler({"m": 1})
        a, b, c = procs(3)
        slot = await s.acquire(a)
        tb = asyncio.create_task(s.acquire(b))
        await asyncio.sleep(0)
        tb.cancel()
        s.release(slot)  # dispatch runs before b's cancellation unwinds
        await asyncio.gather(tb, return_exceptions=True)
        assert s.busy("m") == 0
        s.release(await s.acquire(c))
        assert s.busy("m") == 0 and s.queued("m") == 0
    asyncio.run(go())


def test_stopped_processes_stay_queued_until_continued():
    async def go():
        s = Scheduler({"m": 1})
        a, b = procs(2)
        b.cont.clear()  # SIGSTOP
        tb = asyncio.create_task(s.acquire(b))
        await asyncio.sleep(0)
        assert not tb.done() and s.queued("m") == 1
        s.release(await s.acquire(a))  # a may pass the stopped process
        b.cont.set()
        s.kick("m")
        s.release(await tb)
    asyncio.run(go())


def test_wait_and_service_time_are_accounted():
    async def go():
        s = Scheduler({"m": 1})
        a, b = procs(2)
        slot = await s.acquire(a)
        tb = asyncio.create_task(s.acquire(b))
        await asyncio.sleep(0.05)
        s.release(slot)
        s.release(await tb)
        assert a.service_s >= 0.04 and b.wait_s >= 0.04
    asyncio.run(go())
