"""Shared tables have per-program shares: one program filling the process table (its
zombies included) leaves other programs and the admin able to spawn. Real daemon, sim."""

from __future__ import annotations

import pytest

from kernel.sys_proc import ADMIN_RESERVE
from syscalls.errors import ERRORS, Errno
from tests.kernels import Daemon

EAGAIN = ERRORS[Errno.EAGAIN]
TABLE = 200


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    k = Daemon(
        tmp_path_factory.mktemp("fair"), "--driver", "sim", "--max-procs", str(TABLE)
    ).start()
    yield k
    k.stop()


def _fill(p) -> int:
    """Spawn children of ``p`` (and let them exit: zombies count) until EAGAIN."""
    made = 0
    with pytest.raises(EAGAIN) as err:
        while True:
            kid = p.spawn(f"kid{made}")
            kid.exit(0)  # a zombie until reaped: it still holds its slot
            made += 1
    assert "share" in str(err.value) or "admin" in str(err.value)
    return made


def test_one_program_cannot_fill_the_process_table_for_the_others(admin) -> None:
    hog = admin.spawn("hog")
    assert _fill(hog) == TABLE // 4 - 1  # its share, its own process included
    other = admin.spawn("other")
    assert other.spawn("still-fine").pid > 0  # another program spawns
    programs = [hog, other]
    while True:  # more programs fill the rest of the table, up to the admin's reserve
        programs.append(admin.spawn(f"filler{len(programs)}"))
        _fill(programs[-1])
        with pytest.raises(EAGAIN) as err:
            programs[-1].spawn("probe")
        if "kept for the admin" in str(err.value):
            break
    assert len(admin.ps()) >= TABLE - ADMIN_RESERVE
    more = [admin.spawn(f"admin{i}") for i in range(10)]  # the admin always can
    assert len(more) == 10
    for p in (*programs, *more):
        p.reap()
    assert hog.pid not in {r.pid for r in admin.ps()}


def test_a_program_limit_sets_its_share(admin) -> None:
    small = admin.spawn("small", program_limits={"max_procs": 5})
    assert _fill(small) == 4
    assert "max_procs=5" in str(pytest.raises(EAGAIN, small.spawn, "x").value)
    small.reap()
