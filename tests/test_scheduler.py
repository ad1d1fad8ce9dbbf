"""The scheduler grants a model's slots in policy order and never loses a slot."""

import asyncio

import pytest

from kernel.process import INIT_PID, ProcessTable, ProcState
from kernel.scheduler import NEVER, Plan, Priority, Scheduler


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


# -- policies on crafted queues -----------------------------------------------------

from kernel.scheduler import (  # noqa: E402
    POLICIES,
    Fair,
    Fifo,
    Load,
    LoadView,
    RoundRobin,
    Slot,
    Waiter,
    make_policy,
)

IDLE = LoadView(slots=4, busy=0, queued=1)


def waiters(procs_, now=0.0, expected=None):
    """Waiters built without an event loop (pick never touches ``granted``)."""
    out = []
    for i, p in enumerate(procs_):
        w = Waiter.__new__(Waiter)
        w.proc, w.seq, w.enqueued = p, i, now
        w.expected_tokens = (expected or [0] * len(procs_))[i]
        out.append(w)
    return out


def test_fifo_and_rr_pick_the_earliest_arrival():
    ws = waiters(procs(3, nice=[5, -5, 0]))
    assert Fifo().pick(ws, 0, IDLE) is ws[0]
    assert RoundRobin().pick(ws, 0, IDLE) is ws[0]


def test_rr_preempts_only_after_its_quantum():
    p = procs(1)[0]
    rr = RoundRobin(quantum=4)
    slot = Slot("m", 0, p, 0.0, tokens=3)
    assert not rr.should_preempt(slot, waiters(procs(1)), 0, IDLE)
    slot.tokens = 4
    assert rr.should_preempt(slot, waiters(procs(1)), 0, IDLE)
    assert not Fifo().should_preempt(slot, waiters(procs(1)), 0, IDLE)


def test_priority_ages_waiters_so_low_priority_never_starves():
    pol = POLICIES["priority"](aging_s=1.0)
    old_low = waiters(procs(1, nice=[19]), now=0.0)[0]
    fresh_high = waiters(procs(1, nice=[-20]), now=10.0)[0]
    fresh_high.seq = 1
    assert pol.pick([old_low, fresh_high], 10.0, IDLE) is fresh_high  # early on, priority wins
    fresh_high.enqueued = 40.0  # high-priority work keeps arriving ...
    assert (
        pol.pick([old_low, fresh_high], 40.0, IDLE) is old_low
    )  # ... but 40 s of waiting beats 39 levels


def test_priority_preempts_a_runner_for_a_better_waiter_after_its_quantum():
    pol = POLICIES["priority"](quantum=2)
    runner, better, worse = procs(3, nice=[5, 0, 10])
    slot = Slot("m", 0, runner, 0.0, tokens=2)
    assert pol.should_preempt(slot, waiters([better]), 0.0, IDLE)
    assert not pol.should_preempt(slot, waiters([worse]), 0.0, IDLE)


def test_fair_runs_the_program_with_least_attained_service_first():
    pol = Fair(base_tokens=64)
    heavy, light = procs(2)
    heavy.program.account.output_tokens = 300  # level 3
    light.program.account.output_tokens = 70  # level 1
    assert pol.pick(waiters([heavy, light]), 0.0, IDLE).proc is light


def test_fair_is_first_come_first_served_between_programs_of_one_level():
    pol = Fair(base_tokens=64)
    older, newer = procs(2)  # older has the smaller program id
    older.program.account.output_tokens = 40  # both below 64 tokens: level 0
    ws = waiters([newer, older])  # the newer program's call arrived first
    assert pol.pick(ws, 0.0, IDLE).proc is older


def test_fair_ranks_processes_of_one_program_by_their_own_service():
    from kernel.process import INIT_PID, ProcessTable

    t = ProcessTable(owner="me")
    root = t.spawn(INIT_PID, "root", "m", 0, None)
    a, b = t.spawn(root.pid, "a", "m", 0, None), t.spawn(root.pid, "b", "m", 0, None)
    assert a.program is b.program is root.program
    a.account.output_tokens, b.account.output_tokens = 5, 1
    assert Fair().pick(waiters([a, b]), 0.0, IDLE).proc is b


def test_fair_serves_a_programs_urgent_processes_first():
    from kernel.process import INIT_PID, ProcessTable

    t = ProcessTable(owner="me")
    root = t.spawn(INIT_PID, "dispatcher", "m", 0, None)
    routine = t.spawn(root.pid, "routine", "m", 10, None)
    urgent = t.spawn(root.pid, "urgent", "m", 0, None)
    urgent.account.output_tokens = 50  # even with more service than the routine job
    assert Fair().pick(waiters([routine, urgent]), 0.0, IDLE).proc is urgent
    other = t.spawn(INIT_PID, "older-program-first", "m", 19, None)
    assert (
        Fair().pick(waiters([other, urgent]), 0.0, IDLE).proc is urgent
    )  # nice never jumps programs


def test_fair_lets_a_starving_waiter_go_first():
    pol = Fair(starve_s=5.0)
    rich, poor = procs(2)
    rich.program.account.output_tokens = 10_000
    ws = waiters([rich, poor])
    ws[0].enqueued, ws[1].enqueued = 0.0, 8.0
    assert pol.pick(ws, 6.0, IDLE).proc is rich  # waited 6 s > 5 s: starving
    assert pol.pick(ws, 4.0, IDLE).proc is poor


def test_fair_preempts_a_runner_only_for_a_lower_level_waiter():
    pol = Fair(quantum=4, base_tokens=64)
    runner, newcomer = procs(2)
    runner.program.account.output_tokens = 200
    slot = Slot("m", 0, runner, since=0.0, tokens=4)
    assert pol.should_preempt(slot, waiters([newcomer], now=0.5), 1.0, IDLE)
    runner.program.account.output_tokens = 10  # same level as the newcomer: FCFS, no preemption
    assert not pol.should_preempt(slot, waiters([newcomer], now=0.5), 1.0, IDLE)


def test_load_picks_the_cheapest_when_busy_and_the_highest_priority_when_idle():
    pol = Load(threshold=1.5)
    big_important, small = procs(2, nice=[-10, 0])
    ws = waiters([big_important, small], expected=[500, 20])
    assert pol.pick(ws, 0, LoadView(slots=2, busy=2, queued=2)).proc is small
    assert pol.pick(ws, 0, LoadView(slots=2, busy=1, queued=1)).proc is big_important


def test_make_policy_validates_names_and_quanta():
    assert make_policy("rr", 8).quantum == 8
    with pytest.raises(ValueError):
        make_policy("nope")
    with pytest.raises(ValueError):
        make_policy("fifo", 8)
    with pytest.raises(ValueError):
        make_policy("rr", 0)


def test_scheduler_asks_for_preemption_only_when_someone_runnable_waits():
    async def go():
        s = Scheduler({"m": 1}, RoundRobin(quantum=2))
        a, b = procs(2)
        slot = await s.acquire(a)
        slot.tokens = 5
        assert not s.tick(slot).preemptions and slot.preempt is None  # nobody waits
        b.cont.clear()
        tb = asyncio.create_task(s.acquire(b))
        await asyncio.sleep(0)
        assert slot.preempt is None  # the only waiter is STOPPED
        b.cont.set()
        slot.tokens += 1  # the next look comes with the holder's next token
        assert slot.tokens >= slot.next_check  # the generation loop's cheap test
        plan = s.tick(slot)
        assert [p.slot for p in plan.preemptions] == [slot] and slot.preempt
        s.release(slot)
        s.release(await tb)

    asyncio.run(go())


def test_service_time_is_charged_to_the_process_and_its_program():
    async def go():
        s = Scheduler({"m": 1})
        a = procs(1)[0]
        slot = await s.acquire(a)
        await asyncio.sleep(0.02)
        s.release(slot)
        assert a.account.service_s >= 0.02 and a.program.account.service_s == a.account.service_s

    asyncio.run(go())


# -- fair: level boundaries learnt from finished programs ----------------------------


def _finish(pol, programs_tokens, extra=0):
    """Let ``pol`` see programs of the given sizes run and then exit; return ``extra``
    further live processes of the same process table (program ids never repeat)."""
    ps = procs(len(programs_tokens) + 1 + extra)
    done, sweeper, rest = (
        ps[: len(programs_tokens)],
        ps[len(programs_tokens)],
        ps[len(programs_tokens) + 1 :],
    )
    for p, used in zip(done, programs_tokens, strict=True):
        p.program.account.output_tokens = used
        p.program.account.opened = 0.0
        pol.pick(waiters([p]), 0.0, IDLE)
    for p in done:
        p.state = ProcState.ZOMBIE
    pol.pick(waiters([sweeper]), 4.0, IDLE)  # the next look sweeps the exited programs
    return rest


def test_fair_threshold_is_a_multiple_of_the_median_finished_program():
    pol = Fair(spread=4.0, min_programs=3, sweep_s=0.0)
    _finish(pol, [10, 20, 1000])
    assert list(pol.finished) == [10, 20, 1000]
    assert pol.threshold == 80.0  # 4 x median(10, 20, 1000)


def test_fair_keeps_its_base_threshold_until_enough_programs_finished():
    pol = Fair(base_tokens=64, min_programs=5, sweep_s=0.0)
    _finish(pol, [500, 500])
    assert pol.threshold == 64.0


def test_fair_does_not_count_a_program_with_a_live_process_as_finished():
    pol = Fair(min_programs=1, sweep_s=0.0)
    alive, other = procs(2)
    pol.pick(waiters([alive]), 0.0, IDLE)
    pol.pick(waiters([other]), 1.0, IDLE)
    assert not pol.finished


def test_fair_serves_programs_of_typical_size_oldest_first():
    pol = Fair(spread=4.0, min_programs=3, sweep_s=0.0)
    older, newer = _finish(pol, [100, 100, 100], extra=2)  # threshold 400
    older.program.account.output_tokens = 250  # above a fixed 64-token level 0, but typical here
    assert pol.pick(waiters([newer, older], now=5.0), 5.0, IDLE).proc is older


def test_fair_demotes_a_program_far_above_the_typical_size():
    pol = Fair(spread=4.0, min_programs=3, sweep_s=0.0)
    long, newer = _finish(pol, [10, 10, 10], extra=2)  # threshold 40
    long.program.account.output_tokens = 300
    assert pol.pick(waiters([long, newer], now=5.0), 5.0, IDLE).proc is newer
    slot = Slot("m", 0, long, since=0.0, tokens=pol.quantum)
    assert pol.should_preempt(slot, waiters([newer], now=5.0), 5.0, IDLE)


def test_fair_starvation_wait_can_follow_the_lifetime_of_finished_programs():
    pol = Fair(starve_s=30.0, starve_factor=1.0, min_programs=2, sweep_s=0.0)
    rich, poor = _finish(pol, [10, 10], extra=2)  # both seen exiting 4 s after they started
    assert pol.starve_after == 4.0
    rich.program.account.output_tokens = 10_000
    ws = waiters([rich, poor])
    ws[0].enqueued, ws[1].enqueued = 0.0, 4.5
    assert pol.pick(ws, 5.0, IDLE).proc is rich  # waited 5 s > 4 s: starving


def test_fair_rejects_non_positive_knobs():
    with pytest.raises(ValueError):
        Fair(spread=0)
    with pytest.raises(ValueError):
        Fair(window=0)


# -- schedule(now): the plan alone, on an injected clock ------------------------------


class Clock:
    """Virtual time for a scheduler: tests move it by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sched(policy, slots=1):
    """A scheduler on a virtual clock and its process table."""
    from kernel.scheduler import Scheduler

    t, clock = ProcessTable(owner="me"), Clock()
    return Scheduler({"m": slots}, policy, procs=t, clock=clock), t, clock


def test_schedule_grants_free_slots_in_fifo_order_and_changes_nothing():
    s, t, clock = sched(Fifo(), slots=2)
    a, b, c = (t.spawn(INIT_PID, n, "m", 0, None) for n in "abc")
    wa, wb, _ = s.enqueue(a), s.enqueue(b), s.enqueue(c)
    plan = s.schedule(clock.now)
    assert [(g.waiter, g.slot.index) for g in plan.grants] == [(wa, 0), (wb, 1)]
    assert not plan.preemptions
    assert s.queued("m") == 3 and s.busy("m") == 0 and a.state is ProcState.READY  # pure
    assert s.schedule(clock.now) == plan  # the same state plans the same
    s.carry_out(plan)
    assert a.state is b.state is ProcState.RUNNING and c.state is ProcState.READY
    assert s.queued("m") == 1 and s.busy("m") == 2


def test_schedule_skips_stopped_and_exited_waiters():
    s, t, clock = sched(Fifo())
    a, b, c = (t.spawn(INIT_PID, n, "m", 0, None) for n in "abc")
    s.enqueue(a), s.enqueue(b)
    wc = s.enqueue(c)
    t.stop(a)
    t.exit(b, 0)  # killed while queued, its call not yet unwound
    assert [g.waiter for g in s.schedule(clock.now).grants] == [wc]


def test_schedule_plans_rr_preemption_only_once_the_quantum_is_used():
    s, t, clock = sched(RoundRobin(quantum=4))
    a, b = t.spawn(INIT_PID, "a", "m", 0, None), t.spawn(INIT_PID, "b", "m", 0, None)
    s.enqueue(a)
    slot = s.carry_out(s.schedule(clock.now)).grants[0].slot
    assert slot.proc is a and slot.next_check == 4
    s.enqueue(b)
    slot.tokens = 3
    assert s.schedule(clock.now) == Plan()  # not due: nothing to plan
    slot.tokens = 4
    plan = s.schedule(clock.now)
    assert [p.slot for p in plan.preemptions] == [slot] and "quantum of 4" in plan.preemptions[
        0
    ].reason
    assert plan.looked == (slot,)
    s.carry_out(plan)
    assert slot.preempt and slot.next_check == NEVER
    s.release(slot)  # the holder yields at its token boundary: b gets the slot
    assert slot.proc is b and b.state is ProcState.RUNNING


def test_schedule_never_preempts_under_fifo_or_a_non_preemptible_holder():
    for policy, preemptible in ((Fifo(), True), (RoundRobin(quantum=1), False)):
        s, t, clock = sched(policy)
        a, b = t.spawn(INIT_PID, "a", "m", 0, None), t.spawn(INIT_PID, "b", "m", 0, None)
        s.enqueue(a, preemptible=preemptible)
        s.carry_out(s.schedule(clock.now))
        s.enqueue(b)
        s.slot("m", 0).tokens = 1000
        assert not s.schedule(clock.now).preemptions


def test_schedule_asks_one_yield_per_runnable_waiter():
    s, t, clock = sched(RoundRobin(quantum=2), slots=3)
    runners = [t.spawn(INIT_PID, f"r{i}", "m", 0, None) for i in range(3)]
    for p in runners:
        s.enqueue(p)
    s.carry_out(s.schedule(clock.now))
    for slot in (s.slot("m", i) for i in range(3)):
        slot.tokens = 10
    s.enqueue(t.spawn(INIT_PID, "w", "m", 0, None))
    plan = s.schedule(clock.now)
    assert len(plan.preemptions) == 1 and len(plan.looked) == 3
    s.carry_out(plan)
    for slot in (s.slot("m", i) for i in range(3)):
        slot.next_check = 0  # due again: the flagged yield still serves the one waiter
    assert not s.schedule(clock.now).preemptions


def test_schedule_priority_preempts_for_a_better_waiter_and_ages_on_the_clock():
    s, t, clock = sched(Priority(aging_s=1.0, quantum=2))
    runner = t.spawn(INIT_PID, "runner", "m", 5, None)
    s.enqueue(runner)
    s.carry_out(s.schedule(clock.now))
    slot = s.slot("m", 0)
    slot.tokens = 2
    s.enqueue(t.spawn(INIT_PID, "worse", "m", 10, None))
    assert not s.schedule(clock.now).preemptions  # nice 10 does not beat nice 5 ...
    clock.now = 6.0
    slot.next_check = 0
    assert s.schedule(clock.now).preemptions  # ... until 6 s of waiting age it to 4


def test_schedule_fair_grants_the_lower_level_program_and_preempts_for_it():
    s, t, clock = sched(Fair(quantum=4, base_tokens=64), slots=2)
    heavy, light, runner = (t.spawn(INIT_PID, n, "m", 0, None) for n in ("h", "l", "r"))
    heavy.program.account.output_tokens = 300
    runner.program.account.output_tokens = 200
    s.enqueue(runner)
    s.carry_out(s.schedule(clock.now))
    s.enqueue(heavy), s.enqueue(light)
    clock.now = 1.0
    plan = s.schedule(clock.now)
    assert [g.waiter.proc for g in plan.grants] == [light]
    s.carry_out(plan)
    slot = next(x for x in (s.slot("m", 0), s.slot("m", 1)) if x.proc is runner)
    slot.tokens = 4
    assert not s.schedule(clock.now).preemptions  # only heavy waits: a higher level
