"""The audit trail: who did what to which object, with which result — append-only and
hash-chained in the state database, so an altered or removed row is found.

Every row holds its time, actor (``admin`` or ``pid:N``) and program, the syscall, its
target (a pid, a path, a tool), the outcome (``ok`` or an error code), a digest of the
arguments (SHA-256 over their canonical JSON; contents are never stored) and a detail,
and ``hash = SHA-256(previous hash + canonical row)``. Rows are made on the loop and
written, digested and chained in the store thread, in order (the store's FIFO), so the
loop does no hashing of payloads. A redacting caller's arguments (kernel/redact.py) are
masked there before its row's target and digest are made.

Bounded: past ``max_rows`` the oldest rows move to an archived segment file
(``audit/segment-FIRST-LAST.jsonl``, 0600) and the database keeps the hash of the last
moved row as its anchor; ``verify`` walks the segments and then the table, so the whole
history stays verifiable. Authentication failures are counted, not logged one by one:
one row per interval says how many there were and from how many peers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kernel.process import Caller
from kernel.redact import Redactor

#: Syscalls that change something someone may later need to account for.
AUDITED = frozenset(
    {
        "proc.spawn",
        "proc.kill",
        "proc.exit",
        "proc.nice",
        "llm.cancel",
        "ctx.clear",
        "ctx.restore",
        "mem.grant",
        "mem.revoke",
        "mem.delete",
        "fs.write",
        "fs.append",
        "fs.remove",
        "fs.rename",
        "fs.mkdir",
        "fs.rollback",
        "tool.call",
        "tool.register",
        "tool.unregister",
        "tool.approve",
        "tool.deny",
        "mcp.add",
        "mcp.remove",
    }
)

#: Rows kept in the database before the oldest move to a segment file.
MAX_ROWS = 200_000
#: How many of the oldest rows move at a time.
ROTATE_ROWS = 50_000
#: Seconds between the rows that count authentication failures.
AUTH_INTERVAL_S = 60.0
#: The chain's start.
GENESIS = "0" * 64

_COLUMNS = ("seq", "ts", "actor", "program", "call", "target", "outcome", "digest", "detail")


def _canonical(row: dict[str, Any]) -> bytes:
    return json.dumps([row[c] for c in _COLUMNS], separators=(",", ":"), default=str).encode()


def chain(prev: str, row: dict[str, Any]) -> str:
    """The hash of ``row`` following the row whose hash is ``prev``."""
    return hashlib.sha256(prev.encode() + _canonical(row)).hexdigest()


def digest(args: BaseModel | dict[str, Any] | None) -> str:
    """A short SHA-256 of the arguments' canonical JSON (the arguments are not kept)."""
    if args is None:
        return ""
    data = args.model_dump() if isinstance(args, BaseModel) else args
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _plain(value: Any) -> str:
    """JSON for what json cannot write: bytes (binary file content) as hex, else str."""
    return value.hex() if isinstance(value, bytes | bytearray) else str(value)


def target_of(args: BaseModel | dict[str, Any] | None) -> str:
    """The object a call acts on, from its arguments: a pid, a path, a tool or a name."""
    if args is None:
        return ""
    for field in ("pid", "path", "src", "name", "id", "namespace"):
        value = args.get(field) if isinstance(args, dict) else getattr(args, field, None)
        if value is not None:
            return f"{field}={value}"[:200]
    return ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``verify`` found."""

    ok: bool
    rows: int
    first_broken: int | None = None
    reason: str = ""


class Audit:
    """The kernel's audit trail over ``store`` (segments under ``archive``, if given)."""

    def __init__(
        self,
        store: Any,
        archive: Path | None,
        max_rows: int = MAX_ROWS,
        rotate_rows: int = 0,
        redactor: Redactor | None = None,
    ) -> None:
        self.store = store
        self.redactor = redactor  # masks a redacting caller's arguments (kernel/redact.py)
        self.archive = archive
        self.max_rows = max_rows
        self.rotate_rows = rotate_rows or min(ROTATE_ROWS, max(1, max_rows // 4))
        self._auth_failures = 0
        self._auth_peers: set[bytes] = set()
        self._auth_since = time.monotonic()
        # The chain's head, owned by the store thread (loaded by its first write).
        self._head: tuple[int, str] | None = None

    # -- making rows (the loop) ----------------------------------------------------------
    def record(
        self,
        caller: Caller | None,
        call: str,
        outcome: str,
        args: BaseModel | None = None,
        detail: str = "",
        program: int | None = None,
    ) -> None:
        """Queue one row (written, digested and chained in the store thread)."""
        kinds: tuple[str, ...] = ()
        if caller is None:
            actor, prog = "kernel", program
        elif caller.proc is None:
            actor, prog = "admin", program
        else:
            actor, prog = f"pid:{caller.pid}", caller.proc.program.pgid
            kinds = caller.proc.redact
        self.store.submit(self._write, time.time(), actor, prog, call, outcome, args, detail, kinds)

    def auth_failure(self, peer: bytes) -> None:
        """Count a refused credential; one row per interval says how many and from where."""
        self._auth_failures += 1
        if len(self._auth_peers) < 10_000:
            self._auth_peers.add(peer)
        if time.monotonic() - self._auth_since >= AUTH_INTERVAL_S:
            self.flush_auth()

    def flush_auth(self) -> None:
        """Write the pending count of authentication failures, if any."""
        if self._auth_failures:
            detail = (
                f"{self._auth_failures} refused credentials from {len(self._auth_peers)} peers "
                f"in {time.monotonic() - self._auth_since:.0f} s"
            )
            self.record(None, "auth.fail", "EACCES", detail=detail)
        self._auth_failures, self._auth_peers = 0, set()
        self._auth_since = time.monotonic()

    # -- the store thread ---------------------------------------------------------------
    def _load_head(self, conn: sqlite3.Connection) -> tuple[int, str]:
        last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        if last is not None:
            return int(last[0]), str(last[1])
        anchor = conn.execute("SELECT value FROM meta WHERE key = 'audit_anchor'").fetchone()
        if anchor is not None:
            seq, h = json.loads(anchor[0])
            return int(seq), str(h)
        return 0, GENESIS

    def _write(
        self,
        conn: sqlite3.Connection,
        ts: float,
        actor: str,
        program: int | None,
        call: str,
        outcome: str,
        args: BaseModel | None,
        detail: str,
        kinds: tuple[str, ...] = (),
    ) -> None:
        data: BaseModel | dict[str, Any] | None = args
        if kinds and args is not None and self.redactor is not None:
            # A redacting caller's PII is masked before the target and digest are made.
            data = self.redactor.mask_value(args.model_dump(), kinds)
            detail = self.redactor.mask_text(detail, kinds)
        if self._head is None:
            self._head = self._load_head(conn)
        seq, prev = self._head
        row = {
            "seq": seq + 1,
            "ts": round(ts, 6),
            "actor": actor,
            "program": program,
            "call": call,
            "target": target_of(data),
            "outcome": outcome,
            "digest": digest(data),
            "detail": detail[:500],
        }
        h = chain(prev, row)
        conn.execute(
            f"INSERT INTO audit ({', '.join(_COLUMNS)}, hash) VALUES ({', '.join('?' * 10)})",
            [*(row[c] for c in _COLUMNS), h],
        )
        self._head = (seq + 1, h)
        if self.archive is not None and (seq + 1) % 1000 == 0:
            self._maybe_rotate(conn)

    def _maybe_rotate(self, conn: sqlite3.Connection) -> None:
        (count,) = conn.execute("SELECT count(*) FROM audit").fetchone()
        if count <= self.max_rows or self.archive is None:
            return
        rows = conn.execute(
            f"SELECT {', '.join(_COLUMNS)}, hash FROM audit ORDER BY seq LIMIT ?",
            (self.rotate_rows,),
        ).fetchall()
        self.archive.mkdir(mode=0o700, exist_ok=True)
        first, last = rows[0][0], rows[-1][0]
        path = self.archive / f"segment-{first:012d}-{last:012d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            for r in rows:
                f.write(json.dumps(dict(zip((*_COLUMNS, "hash"), r, strict=True))) + "\n")
            f.flush()
            os.fsync(f.fileno())
        conn.execute("DELETE FROM audit WHERE seq <= ?", (last,))
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('audit_anchor', ?)",
            (json.dumps([last, rows[-1][-1]]),),
        )

    # -- reading and verifying (store thread, via Store.call) ----------------------------
    def query(
        self,
        conn: sqlite3.Connection,
        pid: int | None,
        program: int | None,
        since: float | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` rows (oldest first) matching the filters."""
        where, params = ["1"], []
        if pid is not None:
            where.append("(actor = ? OR target = ?)")
            params += [f"pid:{pid}", f"pid={pid}"]
        if program is not None:
            where.append("program = ?")
            params.append(program)
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        rows = conn.execute(
            f"SELECT {', '.join(_COLUMNS)}, hash FROM audit WHERE {' AND '.join(where)} "
            "ORDER BY seq DESC LIMIT ?",
            [*params, limit],
        ).fetchall()
        return [dict(zip((*_COLUMNS, "hash"), r, strict=True)) for r in reversed(rows)]

    def verify(self, conn: sqlite3.Connection) -> Verdict:
        """Walk the archived segments, then the table: every row must follow the one
        before (seq + 1) and carry the hash of the chain so far."""
        seq, prev, n = 0, GENESIS, 0
        for row in self._segment_rows():
            bad = self._check(row, seq, prev)
            if bad:
                return Verdict(False, n, row.get("seq"), f"archived segment: {bad}")
            seq, prev, n = row["seq"], row["hash"], n + 1
        if n == 0:
            anchor = conn.execute("SELECT value FROM meta WHERE key = 'audit_anchor'").fetchone()
            if anchor is not None:  # segments gone: they cannot be checked
                return Verdict(False, 0, None, "archived segments are missing")
        cursor = conn.execute(f"SELECT {', '.join(_COLUMNS)}, hash FROM audit ORDER BY seq")
        for r in cursor:
            row = dict(zip((*_COLUMNS, "hash"), r, strict=True))
            bad = self._check(row, seq, prev)
            if bad:
                return Verdict(False, n, row["seq"], bad)
            seq, prev, n = row["seq"], row["hash"], n + 1
        return Verdict(True, n)

    @staticmethod
    def _check(row: dict[str, Any], seq: int, prev: str) -> str:
        if row["seq"] != seq + 1:
            return f"row {seq + 1} is missing (the next row is {row['seq']})"
        if chain(prev, row) != row["hash"]:
            return f"row {row['seq']} was altered (its hash does not follow the chain)"
        return ""

    def _segment_rows(self) -> Any:
        if self.archive is None or not self.archive.is_dir():
            return
        for path in sorted(self.archive.glob("segment-*.jsonl")):
            with open(path) as f:
                for line in f:
                    yield json.loads(line)
