"""Durability: ``kill -9`` the real kernel in the middle of writes, start it again on the
same state directory, and find every acknowledged write, nothing half-written, the
process table back (credentials included), and processes whose program died hung up."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from llmos.client import Client
from llmos.errors import EACCES, EINVAL
from syscalls.errors import SyscallError
from tests.conftest import GREEDY
from tests.kernels import Daemon

pytestmark = pytest.mark.model


def _hammer(
    endpoint: str, pid: int, token: str, acked: dict[str, list], stop: threading.Event
) -> None:
    """Write as process ``pid`` until the kernel dies; remember what it acknowledged.
    Its own connection (sockets belong to one thread), short deadlines once it is gone."""
    with Client(endpoint, pid=pid, token=token) as c:
        i = 0
        while not stop.is_set():
            try:
                entry = {"text": f"entry number {i}", "metadata": {"i": i}}
                acked["ids"].extend(
                    c.call("mem.put", {"entries": [entry]}, deadline_ms=5000)["ids"]
                )
                turns = [
                    {"role": "user", "content": f"q{i}"},
                    {"role": "assistant", "content": f"a{i}"},
                ]
                c.call("ctx.append", {"messages": turns}, deadline_ms=5000)
                acked["turns"].append(i)
            except SyscallError:
                return  # the kernel is gone
            i += 1


def test_kill_9_loses_nothing_committed_and_recovers_the_process_table(tmp_path: Path) -> None:
    base = tmp_path / "k"
    first = Daemon(base, "--slots", "1").start()
    hosts = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
    try:
        with first.admin() as admin:
            kept = admin.spawn("kept", system="You are kept.", host_pid=hosts[0].pid)
            doomed = admin.spawn("doomed", host_pid=hosts[1].pid)
            orphan = doomed.spawn("orphan")
            free = admin.spawn("free", namespace="free-memory")
            free.memory.set_block("persona", "I survive crashes.")
            kept.generate([{"role": "user", "content": "Say hi."}], max_tokens=4, **GREEDY)
            acked: dict[str, list] = {"ids": [], "turns": []}
            stop = threading.Event()
            writer = threading.Thread(
                target=_hammer,
                args=(first.endpoint, free.pid, free.token, acked, stop),
                daemon=True,
            )
            writer.start()
            while len(acked["turns"]) < 20:
                writer.join(0.05)
            assert first.proc is not None
            os.kill(first.proc.pid, signal.SIGKILL)  # mid-write, no shutdown of any kind
            first.proc.wait(10)
            stop.set()
            writer.join()  # it returns within its 5 s deadline once the kernel is gone
        hosts[1].kill()  # doomed's program dies while the kernel is down
        hosts[1].wait()

        second = Daemon(base, "--slots", "1").start()
        try:
            with second.admin() as admin:
                rows = {r.pid: r for r in admin.ps()}
                assert rows[kept.pid].state in ("WAITING", "NEW") and rows[free.pid].state in (
                    "WAITING",
                    "NEW",
                )
                assert rows[kept.pid].generate_calls == 1 and rows[kept.pid].output_tokens > 0
                assert rows[doomed.pid].state == "ZOMBIE" and rows[doomed.pid].exit_status == 129
                assert rows[doomed.pid].signal == "HUP"
                assert rows[orphan.pid].ppid == 1  # re-parented to init, as on Unix
                assert admin.wait(doomed.pid).signal == "HUP"
                fresh = admin.spawn("fresh")
                assert fresh.pid > max(rows)  # pids are never reused, across restarts too

            # The old credentials still work, on a new connection to the new kernel.
            with Client(second.endpoint, pid=free.pid, token=free.token) as c:
                again = c.process(free.pid, free.token)
                got = {e.id for e in again.memory.get(*acked["ids"][:200])}
                assert got == set(acked["ids"][:200])  # every acknowledged entry is there
                turns = again.context()
                assert len(turns) % 2 == 0  # an append is all or nothing
                contents = [m["content"] for m in turns]
                assert contents[: 2 * len(acked["turns"])] == [
                    x for i in acked["turns"] for x in (f"q{i}", f"a{i}")
                ]
                assert again.memory.blocks() == {"persona": "I survive crashes."}
                n = len(acked["ids"])
                hit = again.memory.search(f"entry number {n - 1}", k=1, filter={"i": n - 1})
                assert hit and hit[0].id == acked["ids"][-1]  # the vector index was rebuilt
            with Client(second.endpoint, pid=kept.pid, token=kept.token) as c:
                assert c.process(kept.pid, kept.token).chat("Hello", max_tokens=3, **GREEDY)
                assert c.process(kept.pid, kept.token).context()[0]["content"] == "You are kept."
        finally:
            second.stop()
    finally:
        for h in hosts:
            h.kill()
            h.wait()


def test_the_kernel_instance_id_is_made_once_per_state_database() -> None:
    """The instance id (with a pid, the session key a router sees) is kept in the
    database: the same on every later read, another in another database."""
    import sqlite3

    from kernel.persist import instance_id

    def database() -> sqlite3.Connection:
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        return conn

    one, other = database(), database()
    first = instance_id(one)
    assert len(first) == 8 and int(first, 16) >= 0
    assert instance_id(one) == first
    assert instance_id(other) != first


def test_a_spawn_repeated_with_its_claim_after_a_kill_9_gets_the_same_process(
    tmp_path: Path,
) -> None:
    """A spawn whose reply was lost (the kernel died after committing it) is not a
    process nobody can drive: repeating it with the same claim returns that process
    with a new token, and the old token no longer works."""
    claim = "job-7f3a9c2e-first-try"
    k = Daemon(tmp_path, "--driver", "sim").start()
    try:
        with k.admin() as c:
            first = c.call("proc.spawn", {"name": "worker", "claim": claim})
            kid = Client(k.endpoint, pid=first["pid"], token=first["token"])
            child = kid.call("proc.spawn", {"name": "sub", "claim": claim})  # its own scope
            assert child["pid"] != first["pid"]
            kid.close()
        os.kill(k.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        k.proc.wait(30)  # type: ignore[union-attr]
        k.start()
        with k.admin() as c:
            again = c.call("proc.spawn", {"name": "worker", "claim": claim})
            assert again["pid"] == first["pid"] and again["token"] != first["token"]
            with Client(k.endpoint, pid=again["pid"], token=again["token"]) as me:
                assert me.call("proc.getpid", {})["pid"] == first["pid"]
            with (
                pytest.raises(EACCES),
                Client(k.endpoint, pid=first["pid"], token=first["token"]) as old,
            ):
                old.call("proc.getpid", {})
            other = c.call("proc.spawn", {"name": "worker", "claim": "job-7f3a9c2e-second-try"})
            assert other["pid"] not in (first["pid"], child["pid"])
            with pytest.raises(EINVAL):
                c.call("proc.spawn", {"name": "w", "claim": "short"})
    finally:
        k.stop()
