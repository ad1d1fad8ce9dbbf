"""The audit trail against the real daemon: who did what to which object with which
result, hash-chained so that an altered or removed row is found (``llmos audit --verify``
exits 1 naming the first broken row), bounded by rotation into segments that stay
verifiable, and authentication failures counted rather than logged one by one."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from kernel.audit import Audit
from kernel.store import Store
from syscalls.errors import ERRORS, Errno
from tests.kernels import Daemon
from tests.test_cli import ROOT

EPERM = ERRORS[Errno.EPERM]


def llmos(k: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", *args],
        env=k.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_trail_records_who_did_what_and_detects_tampering(tmp_path: Path) -> None:
    k = Daemon(tmp_path, "--driver", "sim").start()
    try:
        with k.admin() as c:
            p = c.spawn("worker")
            p.files.write("notes.txt", "content that must not be in the trail")
            kid = p.spawn("kid")
            p.kill(kid.pid, "KILL")
            with pytest.raises(EPERM):
                p.call("sys.audit", {})  # only the admin reads it
            p.tools.call("calculator", {"expression": "1+1"})
            rows = c.audit(limit=1000).rows
        calls = [(r.actor, r.call, r.outcome) for r in rows]
        assert ("kernel", "kernel.start", "ok") in calls
        assert ("admin", "proc.spawn", "ok") in calls
        assert (f"pid:{p.pid}", "fs.write", "ok") in calls
        assert (f"pid:{p.pid}", "proc.kill", "ok") in calls
        assert (f"pid:{p.pid}", "tool.call", "ok") in calls
        write = next(r for r in rows if r.call == "fs.write")
        assert write.target == "path=notes.txt" and write.program == p.pid and write.digest
        assert "content" not in json.dumps([r.model_dump() for r in rows])  # digests only
        kill = next(r for r in rows if r.call == "proc.kill")
        assert kill.target == f"pid={kid.pid}"
        mine = llmos(k, "audit", "--pid", str(p.pid), "--json")
        assert {r["call"] for r in json.loads(mine.stdout)["rows"]} >= {"fs.write", "proc.kill"}
        ok = llmos(k, "audit", "--verify")
        assert ok.returncode == 0 and "intact" in ok.stderr, ok.stderr
    finally:
        k.stop()
    db = k.state_dir / "state.db"
    with sqlite3.connect(db) as conn:  # someone edits history while the kernel is down
        (seq,) = conn.execute("SELECT seq FROM audit WHERE call = 'fs.write'").fetchone()
        conn.execute("UPDATE audit SET outcome = 'EPERM' WHERE seq = ?", (seq,))
    k.start()
    try:
        broken = llmos(k, "audit", "--verify")
        assert broken.returncode == 1 and f"broken at row {seq}" in broken.stderr
        assert "altered" in broken.stderr
    finally:
        k.stop()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit SET outcome = 'ok' WHERE seq = ?", (seq,))  # put it back
        conn.execute("DELETE FROM audit WHERE seq = ?", (seq + 1,))  # and remove the next
    k.start()
    try:
        gone = llmos(k, "audit", "--verify", "--json")
        assert gone.returncode == 1
        verdict = json.loads(gone.stdout)["verified"]
        assert verdict["first_broken"] == seq + 2 and "missing" in verdict["reason"]
    finally:
        k.stop()


def test_rotation_moves_old_rows_to_segments_that_stay_verifiable(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.call_sync(lambda conn: None)  # open and migrate
    audit = Audit(store, tmp_path / "audit", max_rows=1500, rotate_rows=1000)
    for i in range(3200):
        audit.record(None, "test.event", "ok", detail=f"event {i}")
    verdict = store.call_sync(audit.verify)
    assert verdict.ok and verdict.rows == 3200, verdict
    (kept,) = store.call_sync(lambda conn: conn.execute("SELECT count(*) FROM audit").fetchone())
    segments = sorted((tmp_path / "audit").glob("segment-*.jsonl"))
    assert kept <= 1500 + 1000 and len(segments) >= 1
    assert all(oct(s.stat().st_mode)[-3:] == "600" for s in segments)
    lines = segments[0].read_text().splitlines()
    row = json.loads(lines[10])
    row["detail"] = "rewritten"
    lines[10] = json.dumps(row)
    segments[0].write_text("\n".join(lines) + "\n")
    verdict = store.call_sync(audit.verify)
    assert not verdict.ok and verdict.first_broken == 11 and "segment" in verdict.reason
    store.close()


def test_refused_credentials_are_counted_in_one_row(tmp_path: Path) -> None:
    k = Daemon(tmp_path, "--driver", "sim").start()
    try:
        from llmos.client import Client

        with Client(k.endpoint, pid=0, token="wrong") as bad:
            for _ in range(20):
                with pytest.raises(ERRORS[Errno.EACCES]):
                    bad.info()
    finally:
        k.stop()  # the count is flushed at shutdown
    with sqlite3.connect(k.state_dir / "state.db") as conn:
        rows = conn.execute("SELECT outcome, detail FROM audit WHERE call = 'auth.fail'").fetchall()
    assert len(rows) == 1 and rows[0][0] == "EACCES" and "20 refused credentials" in rows[0][1]


def test_a_binary_file_write_is_audited_by_digest() -> None:
    from kernel.audit import digest
    from syscalls import models as m

    one = digest(m.FsWriteArgs(path="a.bin", data=b"\xff\xfe\x00"))
    other = digest(m.FsWriteArgs(path="a.bin", data=b"\xff\xfe\x01"))
    assert one and other and one != other  # not valid UTF-8, still digested


@pytest.mark.parametrize("name", ["proc.nice", "tool.approve"])  # synchronous handlers
def test_a_synchronous_handlers_internal_error_is_audited_as_eio(name: str) -> None:
    """A bug in a synchronous handler of an audited syscall answers EIO and still leaves
    its row in the trail, as the asynchronous path does."""
    import asyncio
    import dataclasses

    from drivers.sim import SimDriver
    from kernel.kernel import Kernel
    from syscalls import codec

    def broken(k: object, call: object, a: object) -> None:
        raise RuntimeError("a bug")

    args = {"proc.nice": {"pid": 2, "nice": 1}, "tool.approve": {"id": 1}}[name]

    async def go() -> tuple[list[dict], list[dict]]:
        k = Kernel({"sim": SimDriver()}, ["inproc://audit-sync"], embedder=None)
        sent: list[dict] = []
        k.dispatcher.send = lambda identity, frame: sent.append(codec.unpackb(frame))
        table = k.dispatcher.table
        table[name] = dataclasses.replace(table[name], handler=broken)
        try:
            k.dispatcher.on_frames([b"a", codec.encode_request(1, name, args, 0, k.admin_token)])
            rows = await k.store.call(k.audit.query, None, None, None, 100)
        finally:
            await k.transport.close()
            k.memory.close()
            await asyncio.to_thread(k.store.close)
        return sent, rows

    sent, rows = asyncio.run(go())
    assert sent[0]["ok"] is False and sent[0]["error"]["code"] == "EIO"
    assert [(r["call"], r["outcome"], r["actor"]) for r in rows] == [(name, "EIO", "admin")]
