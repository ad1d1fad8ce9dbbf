"""Process lifecycle like Unix: pids never reused, zombies until waited, orphans to init."""

import asyncio

import pytest

from kernel.process import INIT_PID, Caller, ProcessTable, ProcState
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
