"""No client stalls another, and what one client makes the kernel keep is bounded
(issue 21, item 6): served-tool schemas never fetch and validate in bounded time,
contexts are stored incrementally and bounded in bytes, a peer that never reads is
dropped, version history counts in the area's quota, special files in mounts never
block.

No test here generates text, so the kernel runs the ``sim`` driver. Latencies are
measured and printed (``-s``), never asserted against tight bounds.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel.schema import ArgsValidator, ValidationTimeout, check_schema
from llmos.client import Process
from syscalls.errors import EINVAL, EPERM
from tests.kernels import Daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    k = Daemon(tmp_path_factory.mktemp("stalls"), "--driver", "sim", "--slots", "1").start()
    yield k
    k.stop()


class Pinger:
    """Another client timing ``proc.getpid`` in a thread while something else runs."""

    def __init__(self, proc: Process) -> None:
        self.proc, self.stop, self.samples = proc, threading.Event(), []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            self.proc.getpid()
            self.samples.append(time.perf_counter() - t0)
            time.sleep(0.002)

    def __enter__(self) -> Pinger:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)

    def report(self, what: str) -> dict[str, float]:
        xs = sorted(self.samples)
        figures = {
            "n": len(xs),
            "p50_ms": 1000 * statistics.median(xs),
            "max_ms": 1000 * xs[-1],
        }
        print(f"\n{what}: proc.getpid of another client {figures}")
        return figures


# -- (a) served-tool schemas ------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "object", "properties": {"x": {"$ref": "http://127.0.0.1:9/s.json"}}}, "local"),
        ({"type": 5}, "valid JSON Schema|type 'object'"),
        ({"type": "object", "properties": {"x": {"pattern": "(?=a)a"}}}, "RE2"),
        ({"type": "object", "properties": {"x": {"pattern": "(a)\\1"}}}, "RE2"),
        (
            {"type": "object", "$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
            "recursive",
        ),
    ],
)
def test_served_tool_schema_refused_at_registration(
    daemon: Daemon, schema: dict[str, Any], why: str
) -> None:
    with daemon.admin() as admin:
        server = admin.spawn("srv")
        try:
            t0 = time.monotonic()
            with pytest.raises(EINVAL, match=why):
                server.tools.register("bad", "refused", schema)
            assert time.monotonic() - t0 < 30  # answered, not fetched from a silent server
            assert "bad" not in [t.name for t in server.tools.list()]
        finally:
            admin.kill(server.pid, "KILL")
            admin.wait(server.pid, timeout=10)


def test_catastrophic_pattern_does_not_stall_other_clients(daemon: Daemon) -> None:
    schema = {
        "type": "object",
        "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}},
        "patternProperties": {"^(x+x+)+y$": {"type": "integer"}},
    }
    with daemon.admin() as admin:
        server, other = admin.spawn("srv"), admin.spawn("other")
        caller = server.spawn("caller")  # a served tool is its program's
        try:
            server.tools.register("evil", "catastrophic patterns", schema)
            hostile = {"s": "a" * 40 + "b", "x" * 30: 1}
            with Pinger(other) as pinger:
                time.sleep(0.05)
                t0 = time.monotonic()
                for _ in range(20):
                    with pytest.raises(EINVAL, match="does not match"):
                        caller.tools.call("evil", hostile, timeout_s=5)
                elapsed = time.monotonic() - t0
                time.sleep(0.05)
            figures = pinger.report(f"20 hostile calls in {elapsed:.3f} s")
            assert figures["n"] > 0
        finally:
            for p in (caller, server, other):
                p.reap()


def test_validation_stops_at_its_time_bound() -> None:
    branches = [{"type": "object", "required": [f"k{i}"]} for i in range(300)]
    v = ArgsValidator(
        check_schema(
            {"type": "object", "properties": {"a": {"type": "array", "items": {"anyOf": branches}}}}
        )
    )
    args = {"a": [{"z": 1}] * 2000}
    with pytest.raises(ValidationTimeout):
        v.first_error(args, 0.05)
    assert v.first_error({"a": [{"k1": 5}]}, 5) is None
    unique = ArgsValidator({"type": "object", "properties": {"u": {"uniqueItems": True}}})
    assert unique.first_error({"u": [{"a": i} for i in range(50_000)]}, 5) is None
    assert unique.first_error({"u": [1, 1.0]}, 5) is not None
    assert unique.first_error({"u": [1, True]}, 5) is None


# -- (c) a peer that never reads --------------------------------------------------------


def test_peer_that_never_reads_is_dropped_with_memory_bounded(daemon: Daemon) -> None:
    import psutil
    import zmq

    from syscalls import codec, limits

    kernel = psutil.Process(daemon.proc.pid)  # type: ignore[union-attr]
    with daemon.admin() as admin:
        big, other = admin.spawn("big"), admin.spawn("other")
        try:
            big.append([{"role": "user", "content": "x" * 190_000}] * 3)
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            try:
                sock.setsockopt(zmq.RCVHWM, 1)
                sock.setsockopt(zmq.RCVBUF, 4096)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(daemon.endpoint)
                rss0 = kernel.memory_info().rss
                n = 400  # 400 replies of ~500 kB: 200 MB if the kernel kept them all
                frame = codec.encode_request(1, "ctx.get", {"pid": big.pid}, 0, daemon.token)
                with Pinger(other) as pinger:
                    for _ in range(n):
                        sock.send(frame)
                    deadline = time.monotonic() + 60
                    while "dropped peer" not in daemon.log() and time.monotonic() < deadline:
                        time.sleep(0.1)
                grown = (kernel.memory_info().rss - rss0) / 2**20
                pinger.report(f"{n} unread 500 kB replies, kernel RSS +{grown:.0f} MiB")
                assert "dropped peer" in daemon.log()
                assert grown < 2 * (limits.MAX_PEER_BACKLOG_BYTES >> 20) + 100
                assert other.getpid().pid == other.pid  # everyone else is still answered
            finally:
                sock.close(linger=0)
                ctx.destroy(linger=0)
        finally:
            for p in (big, other):
                admin.kill(p.pid, "KILL")
                admin.wait(p.pid, timeout=10)


# -- (e) special files in mounts ---------------------------------------------------------


def test_fifo_in_a_mount_never_blocks_the_store_thread(daemon: Daemon, tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "dir").mkdir(parents=True)
    (host / "dir" / "a.txt").write_text("a")
    os.mkfifo(host / "pipe")
    os.mkfifo(host / "dir" / "pipe")
    with daemon.admin() as admin:
        p = admin.spawn("mounted", mounts=[{"name": "m", "path": str(host), "mode": "rw"}])
        try:
            t0 = time.monotonic()
            for call in (
                lambda: p.files.read("/mnt/m/pipe"),
                lambda: p.files.write("/mnt/m/pipe", b"\xffx"),
                lambda: p.files.rename("/mnt/m/pipe", "/mnt/m/moved"),
                lambda: p.files.rename("/mnt/m/dir", "/mnt/m/dir2"),
                lambda: p.files.rename("/mnt/m/dir", "/moved"),
                lambda: p.files.history("/mnt/m/pipe"),
            ):
                with pytest.raises(EPERM, match="not a regular file|special file"):
                    call()
            kinds = {e.name: e.type for e in p.files.list("/mnt/m")}
            assert kinds == {"dir": "dir", "pipe": "other"}
            p.files.write("/mnt/m/ok.bin", b"\xffdurable")  # the store thread is free
            assert (host / "ok.bin").read_bytes() == b"\xffdurable"
            assert (host / "dir" / "a.txt").exists() and (host / "pipe").exists()
            print(f"\nFIFO refusals and a write answered in {time.monotonic() - t0:.3f} s")
        finally:
            admin.kill(p.pid, "KILL")
            admin.wait(p.pid, timeout=10)


# -- (d) version history in the area's quota --------------------------------------------


def test_version_history_is_bounded_oldest_pruned_first(tmp_path: Path) -> None:
    history = 300_000
    with (
        Daemon(
            tmp_path, "--driver", "sim", "--fs-versions", "50", "--fs-history-bytes", str(history)
        ) as k,
        k.admin() as admin,
    ):
        p = admin.spawn("writer")
        for i in range(60):  # 60 versions of 20 kB each: 1.2 MB of history unbounded
            p.files.write("log.bin", bytes([0xFF, i]) + bytes(20_000))
        p.files.write("other.bin", b"\xff" + bytes(1000))
        versions = p.files.history("log.bin", limit=100)
        import sqlite3

        db = sqlite3.connect(k.state_dir / "state.db")
        kept = db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM fs_versions v WHERE area = ? AND version < "
            "(SELECT MAX(version) FROM fs_versions w WHERE w.area = v.area AND w.path = v.path)",
            (f"pid:{p.pid}",),
        ).fetchone()[0]
        db.close()
        print(f"\n60 writes of 20 kB: {len(versions)} versions kept, {kept} bytes of history")
        assert kept <= history
        numbers = [v.version for v in versions]
        assert numbers[0] == 60 and numbers == sorted(numbers, reverse=True)
        assert 10 <= len(numbers) < 60  # the oldest went first; the newest are all there
        assert numbers == list(range(60, 60 - len(numbers), -1))
        assert p.files.read("log.bin")[1] == 59


# -- (b) contexts stored incrementally, bounded in bytes --------------------------------


def test_context_appends_rows_and_stops_at_its_byte_bound(tmp_path: Path) -> None:
    from syscalls import limits
    from syscalls.errors import E2BIG

    chunk = [{"role": "user", "content": "y" * 190_000}] * 5  # ~950 kB a call
    with Daemon(tmp_path, "--driver", "sim") as k, k.admin() as admin:
        p, other = admin.spawn("big"), admin.spawn("other")
        times, n = [], 0
        with Pinger(other) as pinger, pytest.raises(E2BIG, match="bytes"):
            for _ in range(limits.MAX_CONTEXT_BYTES // 950_000 + 2):
                t0 = time.perf_counter()
                n = p.append(chunk)
                times.append(time.perf_counter() - t0)
        pinger.report(
            f"{len(times)} appends of 950 kB up to {n} messages "
            f"(append p50 {1000 * statistics.median(times):.0f} ms, last {1000 * times[-1]:.0f} ms)"
        )
        assert n == 5 * len(times)
        p.clear()
        p.append([{"role": "user", "content": "kept"}])
        p.append([{"role": "assistant", "content": "across a restart"}])
    with k, k.admin() as admin:  # the same state directory, a fresh kernel
        texts = [m["content"] for m in admin.call("ctx.get", {"pid": p.pid})["messages"]]
        assert texts == ["kept", "across a restart"]


def test_contexts_of_an_old_database_migrate_to_rows() -> None:
    import json
    import sqlite3

    from kernel.store import _MIGRATIONS

    conn = sqlite3.connect(":memory:")
    for version in (1, 2, 3, 4):  # 4: the detached runs' tables
        conn.executescript(_MIGRATIONS[version])
    state = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "é"}]}
    conn.execute("INSERT INTO contexts (pid, state) VALUES (7, ?)", (json.dumps(state),))
    conn.executescript(_MIGRATIONS[5])
    rows = conn.execute("SELECT seq, msg FROM ctx_msgs WHERE pid = 7 ORDER BY seq").fetchall()
    assert [(seq, json.loads(msg)) for seq, msg in rows] == list(enumerate(state["messages"]))
    assert "messages" not in json.loads(conn.execute("SELECT state FROM contexts").fetchone()[0])


def test_context_saves_write_only_what_changed_and_keep_rows_in_order() -> None:
    from kernel.persist import _context_ops

    def msg(text: str) -> dict[str, str]:
        return {"role": "user", "content": text}

    a, b, c, d, system = msg("a"), msg("b"), msg("c"), msg("d"), msg("system")
    view, deletes, inserts = _context_ops(None, [a, b])
    assert deletes is None and [q for q, _ in inserts] == [0, 1]
    view, deletes, inserts = _context_ops(view, [a, b, c])  # an append: one row
    assert deletes == [] and inserts == [(2, c)]
    view, deletes, inserts = _context_ops(view, [a, c])  # an eviction: one delete
    assert deletes == [1] and inserts == []
    view, deletes, inserts = _context_ops(view, [a, c, d])
    assert inserts == [(3, d)] and view.seqs == [0, 2, 3]
    view, deletes, inserts = _context_ops(view, [system, c, d])  # new first: rewritten
    assert deletes is None and view.seqs == [0, 1, 2]
    view, deletes, inserts = _context_ops(view, [system])
    assert deletes == [1, 2] and view.total == len("system") + len("user")
