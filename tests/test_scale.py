"""A large process table: ps in pages, sys.stat's bounded rows, oversized replies,
group commit in the state database, and `llmos bench scale` itself."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.store import Store
from llmos.errors import E2BIG, ECANCELED
from tests.kernels import Daemon

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    k = Daemon(tmp_path_factory.mktemp("scale"), "--driver", "sim", "--slots", "1").start()
    yield k
    k.stop()


def test_ps_comes_in_pages_that_cover_the_table_once(sim: Daemon) -> None:
    with sim.admin() as c:
        made = {c.spawn(f"p{i}").pid for i in range(23)}
        seen: list[int] = []
        after = 0
        while True:
            page = c.call("proc.ps", {"after": after, "limit": 7})
            assert len(page["procs"]) <= 7
            seen += [r["pid"] for r in page["procs"]]
            if page["next_after"] is None:
                break
            after = page["next_after"]
        assert seen == sorted(seen) and len(seen) == len(set(seen))
        assert made <= set(seen)
        assert {p.pid for p in c.ps()} == set(seen)  # the SDK follows the pages
        one = sorted(made)[5]
        assert [p.pid for p in c.ps(program=one)] == [one]
        c.kill(one, "STOP")
        assert one in {p.pid for p in c.ps(state="STOPPED")}
        assert all(p.state == "STOPPED" for p in c.ps(state="STOPPED"))


def test_a_process_pages_through_its_own_descendants(sim: Daemon) -> None:
    with sim.admin() as c:
        parent = c.spawn("parent")
        kids = [parent.spawn(f"k{i}").pid for i in range(5)]
        page = parent.call("proc.ps", {"limit": 4})
        assert [r["pid"] for r in page["procs"]] == [parent.pid, *kids[:3]]
        rest = parent.call("proc.ps", {"after": page["next_after"], "limit": 4})
        assert [r["pid"] for r in rest["procs"]] == kids[3:] and rest["next_after"] is None
        assert [p.pid for p in parent.ps()] == [parent.pid, *kids]


def test_sys_stat_counts_everything_and_shows_the_busiest_rows_first(sim: Daemon) -> None:
    with sim.admin() as c:
        busy = c.spawn("busy")
        queued = c.spawn("queued")

        def run(p: object) -> None:
            with contextlib.suppress(ECANCELED):  # killed at the end
                p.generate(prompt="go", max_tokens=400)  # type: ignore[attr-defined]

        runs = [threading.Thread(target=run, args=(p,)) for p in (busy, queued)]
        for t in runs:
            t.start()
        try:
            for _ in range(500):
                st = c.call("sys.stat", {"limit": 2})
                if st["states"]["RUNNING"] == 1 and st["states"]["READY"] >= 1:
                    break
            assert [r["state"] for r in st["procs"]] == ["RUNNING", "READY"]
            assert st["procs_total"] == sum(st["states"].values()) > 2
            assert c.call("sys.stat", {"limit": 0})["procs"] == []
        finally:
            c.kill(busy.pid, "KILL")
            c.kill(queued.pid, "KILL")
            for t in runs:
                t.join(30)


def test_a_reply_too_large_for_any_client_is_e2big_not_silence(sim: Daemon) -> None:
    with sim.admin() as c:
        p = c.spawn("big")
        for _ in range(6):
            p.append([{"role": "user", "content": "x" * 190_000}])
        with pytest.raises(E2BIG, match="ask for less"):
            p.context()
        assert len(p.context(last=1)) == 1  # a smaller read still works


def test_queued_transactions_commit_together_and_fail_alone() -> None:
    store = Store(None)
    try:
        store.call_sync(lambda conn: conn.execute("CREATE TABLE t (n INTEGER)"))
        gate = threading.Event()
        first = store.submit(lambda conn: gate.wait(10))  # holds the worker meanwhile

        def put(conn: object, n: int) -> int:
            conn.execute("INSERT INTO t VALUES (?)", (n,))  # type: ignore[attr-defined]
            if n == 25:
                raise ValueError("this one fails")
            return n

        futs = [store.submit(put, n) for n in range(50)]
        before = store.commits
        gate.set()
        first.result(10)
        assert [f.result(10) for f in futs if f.exception() is None] == [
            n for n in range(50) if n != 25
        ]
        assert isinstance(futs[25].exception(), ValueError)
        rows = store.call_sync(lambda conn: [r[0] for r in conn.execute("SELECT n FROM t")])
        assert rows == [n for n in range(50) if n != 25]  # the failing one alone rolled back
        assert store.commits - before <= 3  # 50 transactions, a commit or so for all
    finally:
        store.close()


def test_bench_scale_reports_every_phase(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "bench", "scale", "--idle", "150", "--active", "12"]
        + ["--samples", "3", "--clients", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["spawn"]["idle"] == 150 and report["spawn"]["spawns_per_s"] > 0
    assert report["spawn"]["rss_kib_per_process"] > 0
    assert report["active"]["stat_rows"]["p50_ms"] > 0
    assert report["recovery"]["recovered"] >= 162  # the idle, the active, all back
    assert set(report["goals"]) == {"rss_100k_le_2GiB", "spawns_ge_2000_per_s", "stat_le_50ms"}
