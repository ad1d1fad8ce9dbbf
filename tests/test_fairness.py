"""Shared tables have per-program shares: one program filling the process table (its
zombies included), the calls in flight, the topic table, the mailbox byte pool or the
parked confirmations leaves other programs and the admin working. Real daemon, sim
driver, the hostile program in an OS process of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernel.sys_proc import ADMIN_RESERVE
from llmos.client import AsyncClient
from syscalls.errors import ERRORS, Errno, SyscallError
from tests.kernels import Daemon

ROOT = Path(__file__).resolve().parent.parent

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


# -- the other shared tables: one program exhausting each leaves the others working -------

SMALL = ["--max-topics", "64", "--max-ipc-bytes", str(2 << 20), "--max-parked", "16"]
SMALL += ["--max-calls-in-flight", "64"]
EPERM_ = ERRORS[Errno.EPERM]

#: A hostile program in its own OS process: exhausts one table, says so, holds on.
HOG = textwrap.dedent("""
    import asyncio, os, sys
    from llmos.client import AsyncClient
    from syscalls.errors import SyscallError

    async def main(what):
        pid, token = int(os.environ["LLMOS_PID"]), os.environ["LLMOS_TOKEN"]
        async with AsyncClient(os.environ["LLMOS_ENDPOINT"], pid=pid, token=token) as c:
            me = c.process(pid, token)
            kid = await me.spawn("hog-kid")
            held, error = [], None
            try:
                if what == "calls":  # blocking receives until the share is spent
                    async def recv(p):
                        try:
                            await p.recv(timeout=60)
                        except SyscallError as exc:
                            return exc
                    tasks = [asyncio.ensure_future(recv(p)) for p in [me, kid] * 40]
                    done, _ = await asyncio.wait(tasks, timeout=20, return_when="FIRST_COMPLETED")
                    error = next(iter(done)).result()
                elif what == "topics":
                    for i in range(10_000):
                        await (me if i % 2 else kid).subscribe(f"hog.{i}")
                elif what == "bytes":
                    for i in range(10_000):
                        await me.send(kid.pid, "x" * 60_000)
                elif what == "parked":
                    await kid.tools.register("wipe", "irreversible", {"type": "object"},
                                             irreversible=True)
                    careful = await me.spawn("careful", confirm=True)
                    async def call():
                        try:
                            await careful.tools.call("wipe", timeout_s=60)
                        except SyscallError as exc:
                            return exc
                    # more than its parked share (4), fewer than its calls in flight (16)
                    tasks = [asyncio.ensure_future(call()) for _ in range(10)]
                    done, _ = await asyncio.wait(tasks, timeout=20, return_when="FIRST_COMPLETED")
                    error = next(iter(done)).result()
            except SyscallError as exc:
                error = exc
            print(error.code, error.message, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main(sys.argv[1]))
""")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    k = Daemon(tmp_path_factory.mktemp("fair-tables"), "--driver", "sim", *SMALL).start()
    yield k
    k.stop()


@contextlib.contextmanager
def hog(k: Daemon, admin, what: str, tmp_path: Path):
    """Run the hostile program in its own OS process until it exhausted ``what``;
    yields its error line (code and sentence)."""
    p = admin.spawn(f"hog-{what}")
    script = tmp_path / "hog.py"
    script.write_text(HOG)
    env = {
        **k.env,
        "LLMOS_PID": str(p.pid),
        "LLMOS_TOKEN": p.token,
        "LLMOS_ENDPOINT": k.endpoint,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [sys.executable, str(script), what],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("EAGAIN"), (line, proc.stderr.read() if proc.poll() else "")
        yield line
    finally:
        proc.communicate(timeout=30)
        p.reap()


def _async(coro) -> object:
    return asyncio.run(coro)


def test_one_program_spending_its_calls_in_flight_leaves_others_and_the_admin_working(
    small: Daemon, tmp_path: Path
) -> None:
    with small.admin() as admin, hog(small, admin, "calls", tmp_path) as line:
        assert "its share of the kernel's (max_calls_in_flight=16)" in line
        other = admin.spawn("other")

        async def others() -> None:
            async with AsyncClient(small.endpoint, pid=0, token=small.token) as c:
                me = c.process(other.pid, other.token)
                kid = await me.spawn("kid")
                got = await asyncio.gather(
                    *(p.recv(timeout=0.5) for p in [me, kid] * 4),
                    c.spawn("admin-spawns"),  # an asynchronous call of the admin's
                    return_exceptions=True,
                )
                assert got[:8] == [None] * 8  # another program's blocking calls run
                assert got[8].pid > kid.pid
                await got[8].reap()
                await kid.reap()

        _async(others())
        capped = admin.spawn("capped", limits={"max_calls_in_flight": 2})

        async def per_process() -> list:
            async with AsyncClient(small.endpoint, pid=0, token=small.token) as c:
                me = c.process(capped.pid, capped.token)
                return await asyncio.gather(
                    *(me.recv(timeout=1) for _ in range(3)), return_exceptions=True
                )

        got = _async(per_process())
        assert sorted(type(g).__name__ for g in got) == ["EAGAIN", "NoneType", "NoneType"]
        assert "max_calls_in_flight=2" in str(next(g for g in got if g is not None))
        for p in (other, capped):
            p.reap()


def test_one_program_filling_the_topic_table_leaves_others_and_the_admin_working(
    small: Daemon, tmp_path: Path
) -> None:
    with small.admin() as admin:
        with hog(small, admin, "topics", tmp_path) as line:
            assert "its share of the topic table (max_topics=16)" in line
            other = admin.spawn("other")
            other.subscribe("other.news")
            assert admin.create_topic("admin.news").created
            small_share = admin.spawn("tiny", program_limits={"max_topics": 2})
            small_share.subscribe("t1")
            small_share.subscribe("t2")
            with pytest.raises(EAGAIN, match="max_topics=2"):
                small_share.subscribe("t3")
            fillers = []
            with pytest.raises(EAGAIN) as err:  # more programs fill it up to the admin's part
                for i in range(10):
                    fillers.append(admin.spawn(f"filler{i}"))
                    for j in range(16):
                        fillers[-1].subscribe(f"f{i}.{j}")
            assert "kept for the admin" in str(err.value)
            assert admin.create_topic("admin.more").created  # the admin still can
            for p in (other, small_share, *fillers):
                p.reap()
        admin.delete_topic("admin.news")
        admin.delete_topic("admin.more")


def test_one_program_filling_the_mailbox_pool_leaves_others_and_the_admin_working(
    small: Daemon, tmp_path: Path
) -> None:
    with small.admin() as admin, hog(small, admin, "bytes", tmp_path) as line:
        assert "its share of the pool (max_ipc_bytes=524288)" in line
        other = admin.spawn("other")
        kid = other.spawn("kid")
        other.send(kid.pid, "x" * 60_000)  # another program sends
        assert kid.recv(timeout=5).body == "x" * 60_000
        admin.send(kid.pid, "from the admin")
        assert kid.recv(timeout=5).body == "from the admin"
        other.reap()


def test_one_program_filling_the_parked_calls_leaves_others_and_the_admin_working(
    small: Daemon, tmp_path: Path
) -> None:
    with small.admin() as admin, hog(small, admin, "parked", tmp_path) as line:
        assert "its share of the table (max_parked=4)" in line
        assert len(admin.pending()) == 4
        other = admin.spawn("other", confirm=True)
        server = other.spawn("server", confirm=False)
        server.tools.register("send_mail", "irreversible", {"type": "object"}, irreversible=True)

        def call() -> object:
            try:
                return other.tools.call("send_mail", timeout_s=20)
            except SyscallError as exc:
                return exc

        async def both() -> list:
            loop = asyncio.get_running_loop()
            waiting = loop.run_in_executor(None, call)
            for _ in range(500):  # another program parks its call
                mine = [p for p in admin.pending() if p.caller == other.pid]
                if mine:
                    break
                await asyncio.sleep(0.02)
            admin.deny(mine[0].id)  # the admin decides it
            return [await waiting]

        (outcome,) = _async(both())
        assert isinstance(outcome, EPERM_) and "did not approve" in str(outcome)
        for parked in admin.pending():
            admin.deny(parked.id)
        other.reap()
