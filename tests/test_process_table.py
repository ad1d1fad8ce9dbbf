"""Process lifecycle like Unix: pids never reused, zombies until waited, orphans to init;
and the table is the one writer of a process's state: every legal edge of the lifecycle
is a method of it, every other edge is refused."""

import asyncio

import pytest

from kernel.process import (
    INIT_PID,
    LEGAL_EDGES,
    TRANSITIONS,
    Caller,
    ProcessTable,
    ProcState,
    TransitionError,
)
from syscalls.errors import Errno, SyscallError


def run(coro):
    return asyncio.run(coro)


def table_with_family():
    t = ProcessTable(owner="me")
    parent = t.spawn(INIT_PID, "parent", "m", 0, "sys")
    child = t.spawn(parent.pid, "child", "m", 0, None)
    grandchild = t.spawn(child.pid, "grandchild", "m", 0, None)
    return t, parent, child, grandchild


def test_spawn_keeps_system_prompt_and_inherits_owner():
    t, parent, child, _ = table_with_family()
    assert parent.context == [{"role": "system", "content": "sys"}] and child.context == []
    assert child.owner == "me" and child.ppid == parent.pid and child.state is ProcState.NEW


def test_pids_are_never_reused():
    async def go():
        t = ProcessTable(owner="me")
        seen = set()
        for _ in range(5):
            p = t.spawn(INIT_PID, "x", "m", 0, None)
            assert p.pid not in seen
            seen.add(p.pid)
            t.exit(p, 0)
            t.reap(p)
        return seen

    assert len(run(go())) == 5


def test_tokens_authenticate_only_their_own_process():
    t, parent, child, _ = table_with_family()
    assert t.authenticate(parent.pid, parent.token) is parent
    with pytest.raises(SyscallError) as exc:
        t.authenticate(parent.pid, child.token)
    assert exc.value.code is Errno.EACCES


def test_target_allows_self_and_descendants_only():
    t, parent, child, grandchild = table_with_family()
    as_child = Caller(child.pid, child)
    assert t.target(as_child, grandchild.pid) is grandchild
    assert t.target(as_child, None) is child
    with pytest.raises(SyscallError) as exc:
        t.target(as_child, parent.pid)
    assert exc.value.code is Errno.EPERM
    assert t.target(Caller(0, None), parent.pid) is parent
    with pytest.raises(SyscallError) as exc:
        t.target(as_child, 999)
    assert exc.value.code is Errno.ESRCH


def test_exit_leaves_a_zombie_until_the_parent_waits():
    async def go():
        t, parent, child, _ = table_with_family()
        t.exit(child, 3)
        assert t.get(child.pid).state is ProcState.ZOMBIE
        got = await t.wait(Caller(parent.pid, parent), None, timeout=1)
        assert got is child and got.exit_status == 3
        assert t.get(child.pid) is None and child.pid not in parent.children

    run(go())


def test_orphans_are_reparented_to_init_and_reaped_by_it_when_they_exit():
    async def go():
        t, parent, child, grandchild = table_with_family()
        t.exit(child, 0)
        assert grandchild.ppid == INIT_PID and grandchild.orphaned
        t.exit(grandchild, 0)
        assert t.get(grandchild.pid) is None  # init reaps orphans at once

    run(go())


def test_zombie_children_of_an_exiting_parent_are_reaped():
    async def go():
        t, parent, child, grandchild = table_with_family()
        t.exit(grandchild, 1)
        t.exit(child, 0)
        assert t.get(grandchild.pid) is None

    run(go())


def test_wait_blocks_until_a_child_exits():
    async def go():
        t, parent, child, _ = table_with_family()
        waiter = asyncio.create_task(t.wait(Caller(parent.pid, parent), child.pid, timeout=5))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        t.exit(child, 7)
        return await waiter

    assert run(go()).exit_status == 7


def test_wait_without_children_is_echild_and_times_out_with_etimedout():
    async def go():
        t, parent, child, grandchild = table_with_family()
        with pytest.raises(SyscallError) as exc:
            await t.wait(Caller(grandchild.pid, grandchild), None, timeout=0)
        assert exc.value.code is Errno.ECHILD
        with pytest.raises(SyscallError) as exc:
            await t.wait(Caller(parent.pid, parent), grandchild.pid, timeout=0)
        assert exc.value.code is Errno.ECHILD  # a grandchild is not a child
        with pytest.raises(SyscallError) as exc:
            await t.wait(Caller(parent.pid, parent), None, timeout=0.01)
        assert exc.value.code is Errno.ETIMEDOUT

    run(go())


def test_the_admin_waits_for_top_level_processes():
    async def go():
        t, parent, _, _ = table_with_family()
        t.exit(parent, 0)
        return await t.wait(Caller(0, None), parent.pid, timeout=1)

    assert run(go()).exit_status == 0


def test_init_reaps_unwaited_top_level_zombies_after_their_ttl():
    async def go():
        t, parent, _, _ = table_with_family()
        t.exit(parent, 0)
        assert t.reap_stale(3600) == []
        assert t.reap_stale(0) == [parent.pid]

    run(go())


# -- state transitions: legal edges walked, illegal ones refused ---------------------

S = ProcState
#: Each transition method and the state it leads to (cont: see the STOPPED cases).
TARGET = {"ready": S.READY, "run": S.RUNNING, "idle": S.WAITING, "stop": S.STOPPED}
#: How to reach each state from a fresh (NEW) process by legal transitions only.
PATH = {
    S.NEW: [],
    S.READY: ["ready"],
    S.RUNNING: ["ready", "run"],
    S.WAITING: ["idle"],
    S.STOPPED: ["stop"],
    S.ZOMBIE: ["exit"],
}


def reach(state, before_stop=S.NEW):
    """A process of a fresh table in ``state``, got there by legal transitions."""
    t = ProcessTable(owner="me")
    p = t.spawn(INIT_PID, "p", "m", 0, None)
    steps = [*PATH[before_stop], "stop"] if state is S.STOPPED else PATH[state]
    for how in steps:
        apply(t, p, how)
    assert p.state is state
    return t, p


def apply(t, p, how):
    if how == "exit":
        t.exit(p, 0)
    else:
        getattr(t, how)(p)


def test_every_legal_edge_is_a_transition_and_lands_where_it_says():
    walked = set()
    for how, to in TARGET.items():
        for start in TRANSITIONS[how]:
            t, p = reach(start)
            apply(t, p, how)
            assert p.state is to, (how, start)
            walked.add((start, to))
    for before in (S.NEW, S.READY, S.RUNNING, S.WAITING):
        t, p = reach(S.STOPPED, before_stop=before)
        assert not p.cont.is_set()
        t.cont(p)
        back = S.READY if before in (S.READY, S.RUNNING) else before
        assert p.state is back and p.cont.is_set()
        walked.add((S.STOPPED, back))
    for start in S:
        if start is not S.ZOMBIE:
            t, p = reach(start)
            t.exit(p, 0)
            assert p.state is S.ZOMBIE and p.cont.is_set()
            walked.add((start, S.ZOMBIE))
    assert walked == LEGAL_EDGES


@pytest.mark.parametrize("how", ["ready", "run", "idle", "stop", "cont"])
def test_every_other_edge_is_refused_and_leaves_the_state_alone(how):
    refused = 0
    for start in set(S) - TRANSITIONS[how]:
        t, p = reach(start)
        with pytest.raises(TransitionError, match=f"process {p.pid}: {how} cannot"):
            apply(t, p, how)
        assert p.state is start
        refused += 1
    assert refused >= 1


def test_a_zombie_never_comes_back():
    t, p = reach(S.ZOMBIE)
    for how in ("ready", "run", "idle", "stop", "cont"):
        with pytest.raises(TransitionError):
            apply(t, p, how)
    t.exit(p, 1)  # exiting twice is a no-op, not a second death
    assert p.exit_status == 0


def test_only_a_granted_ready_process_runs():
    _, p = reach(S.WAITING)
    with pytest.raises(TransitionError, match="allowed from READY"):
        ProcessTable.run(ProcessTable(owner="me"), p)


def test_recovery_restores_a_recorded_state_only_before_the_process_is_in_the_table():
    from kernel.process import Proc, Program
    from kernel.quota import Account, Limits

    t = ProcessTable(owner="me")
    prog = Program(7, Account("program 7", Limits()))
    p = Proc(7, INIT_PID, "p", "me", "h", "m", prog, Account("process 7", Limits()))
    t.recover(p, S.STOPPED)
    assert p.state is S.STOPPED and p.state_before_stop is S.WAITING and not p.cont.is_set()
    t.insert(p)
    with pytest.raises(TransitionError):
        t.recover(p, S.WAITING)
