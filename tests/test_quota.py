"""Quota accounts: limits narrow downwards, and every limit is enforced with EDQUOT."""

import pytest

from kernel.process import INIT_PID, ProcessTable
from kernel.quota import Account, Limits
from syscalls.errors import Errno, SyscallError


def edquot(fn, *args):
    with pytest.raises(SyscallError) as exc:
        fn(*args)
    assert exc.value.code is Errno.EDQUOT
    return exc.value.message


def test_a_child_inherits_unset_limits_and_can_only_narrow_them():
    parent = Limits(max_output_tokens=100, max_wall_s=60)
    child = parent.narrowed(Limits(max_output_tokens=50, max_calls_per_min=10), "parent 2")
    assert child == Limits(max_output_tokens=50, max_wall_s=60, max_calls_per_min=10)
    with pytest.raises(SyscallError) as exc:
        parent.narrowed(Limits(max_output_tokens=101), "parent 2")
    assert exc.value.code is Errno.EPERM and "max_output_tokens" in exc.value.message


def test_output_tokens_are_reserved_clipped_and_then_refused():
    acct = Account("process 5", Limits(max_output_tokens=10))
    assert acct.reserve(8) == 8
    assert acct.reserve(8) == 2  # only 2 left while 8 are promised
    acct.charge(3)
    acct.settle(8, 3)
    acct.charge(2)
    acct.settle(2, 2)
    assert acct.output_tokens == 5 and acct.reserved == 0
    assert acct.reserve(100) == 5
    acct.charge(5)
    acct.settle(5, 5)
    message = edquot(acct.reserve, 1)
    assert "process 5" in message and "max_output_tokens=10" in message
    assert acct.exceeded == "max_output_tokens"


def test_the_call_rate_is_a_sliding_minute():
    acct = Account("p", Limits(max_calls_per_min=2))
    acct.admit_call(now=0.0)
    acct.admit_call(now=1.0)
    assert "retry in 58.0 s" in edquot(acct.admit_call, 2.0)
    acct.admit_call(now=60.5)  # the first call left the window


def test_wall_time_and_context_size_limits():
    acct = Account("p", Limits(max_wall_s=5, max_context_tokens=100), opened=0.0)
    acct.admit_call(now=4.0)
    edquot(acct.admit_call, 5.5)
    acct.check_context(100)
    edquot(acct.check_context, 101)


def test_unlimited_accounts_never_refuse():
    acct = Account("p")
    assert acct.reserve(10**9) == 10**9
    for t in range(1000):
        acct.admit_call(now=float(t))
    assert acct.wall_left() is None


def test_processes_of_a_program_share_its_account_and_children_inherit_limits():
    t = ProcessTable(owner="me")
    root = t.spawn(
        INIT_PID, "root", "m", 0, None, Limits(max_output_tokens=50), Limits(max_calls_per_min=9)
    )
    kid = t.spawn(root.pid, "kid", "m", 0, None)
    assert kid.program is root.program and root.program.pgid == root.pid
    assert kid.account.limits.max_output_tokens == 50 and kid.account is not root.account
    assert root.program.account.limits.max_calls_per_min == 9
    with pytest.raises(SyscallError) as exc:
        t.spawn(root.pid, "greedy", "m", 0, None, Limits(max_output_tokens=51))
    assert exc.value.code is Errno.EPERM
    with pytest.raises(SyscallError) as exc:
        t.spawn(root.pid, "x", "m", 0, None, None, Limits(max_wall_s=1))
    assert exc.value.code is Errno.EPERM
    other = t.spawn(INIT_PID, "other", "m", 0, None)
    assert other.program is not root.program
