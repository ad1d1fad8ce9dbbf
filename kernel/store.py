"""The kernel's durable state: one SQLite database in WAL mode, owned by one thread.

Everything the kernel must not forget lives here: the process table (with hashed
credentials, limits and usage), each process's context, context snapshots, core memory
blocks, recall memory (every message a process has seen, full-text indexed) and
archival memory (entries, metadata and their embedding vectors), memory grants, and
detached generations (runs) with their chunks.

One worker thread owns the connection; the event loop hands it work as closures and
awaits the result (:meth:`Store.call`) or just queues it (:meth:`Store.submit`). The
queue is FIFO, so writes land in the order the kernel made them, and a syscall that
awaits its write replies only once the write is committed. Transactions queued while
the worker was busy are committed together (group commit: a savepoint each, one COMMIT). With WAL and
``synchronous=NORMAL`` a committed transaction survives the kernel being killed
(``kill -9``); only an operating-system crash or power loss can take the last few.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from syscalls.errors import SyscallError

log = logging.getLogger("llmos.store")

T = TypeVar("T")

#: Bump with a new entry in _MIGRATIONS when the schema changes.
SCHEMA_VERSION = 5

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE procs (
        pid INTEGER PRIMARY KEY,
        ppid INTEGER NOT NULL,
        pgid INTEGER NOT NULL,
        record TEXT NOT NULL              -- JSON: everything else (see kernel/persist.py)
    );
    CREATE TABLE programs (
        pgid INTEGER PRIMARY KEY,
        record TEXT NOT NULL              -- JSON: limits, usage, memory namespace
    );
    CREATE TABLE contexts (
        pid INTEGER PRIMARY KEY,
        state TEXT NOT NULL               -- JSON: messages, summary, evicted
    );
    CREATE TABLE snapshots (
        pid INTEGER NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (pid, name)
    );
    CREATE TABLE blocks (
        ns TEXT NOT NULL,
        label TEXT NOT NULL,
        value TEXT NOT NULL,
        max_chars INTEGER NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (ns, label)
    );
    CREATE TABLE recall (
        id INTEGER PRIMARY KEY,
        ns TEXT NOT NULL,
        pid INTEGER NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        ts REAL NOT NULL
    );
    CREATE INDEX recall_ns_ts ON recall (ns, ts);
    CREATE VIRTUAL TABLE recall_fts USING fts5 (content, content='recall', content_rowid='id');
    CREATE TRIGGER recall_ai AFTER INSERT ON recall BEGIN
        INSERT INTO recall_fts (rowid, content) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER recall_ad AFTER DELETE ON recall BEGIN
        INSERT INTO recall_fts (recall_fts, rowid, content) VALUES ('delete', old.id, old.content);
    END;
    CREATE TABLE archival (
        id INTEGER PRIMARY KEY,
        ns TEXT NOT NULL,
        text TEXT NOT NULL,
        meta TEXT NOT NULL,               -- JSON object
        created REAL NOT NULL,
        vec BLOB NOT NULL                 -- float32 little-endian, L2-normalised
    );
    CREATE INDEX archival_ns ON archival (ns);
    CREATE TABLE grants (
        ns TEXT NOT NULL,
        grantee TEXT NOT NULL,            -- a namespace name: pid:N or prog:N
        write INTEGER NOT NULL,
        granted_by INTEGER NOT NULL,
        PRIMARY KEY (ns, grantee)
    );
    """,
    2: """
    CREATE TABLE fs_blobs (sha TEXT PRIMARY KEY, data BLOB NOT NULL);   -- file contents by SHA-256
    CREATE TABLE fs_versions (
        area TEXT NOT NULL,               -- pid:N, prog:NAME or mnt:/host/dir
        path TEXT NOT NULL,               -- inside the area
        version INTEGER NOT NULL,
        sha TEXT,                         -- NULL: the path was removed
        size INTEGER NOT NULL,
        ts REAL NOT NULL,
        op TEXT NOT NULL,
        PRIMARY KEY (area, path, version)
    );
    CREATE INDEX fs_versions_sha ON fs_versions (sha);
    CREATE TABLE fs_chunks (              -- embedded passages of text files (fs.search)
        id INTEGER PRIMARY KEY,
        area TEXT NOT NULL,
        path TEXT NOT NULL,
        chunk INTEGER NOT NULL,
        text TEXT NOT NULL,
        vec BLOB NOT NULL
    );
    CREATE INDEX fs_chunks_path ON fs_chunks (area, path);
    """,
    3: """
    CREATE TABLE audit (                  -- append-only, hash-chained (kernel/audit.py)
        seq INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        actor TEXT NOT NULL,              -- admin, kernel or pid:N
        program INTEGER,
        call TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,            -- ok or an error code
        digest TEXT NOT NULL,             -- SHA-256 of the arguments (not the arguments)
        detail TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_ts ON audit (ts);
    """,
    4: """
    CREATE TABLE runs (                   -- detached generations (kernel/runs.py)
        id INTEGER PRIMARY KEY,
        pid INTEGER NOT NULL,
        record TEXT NOT NULL              -- JSON: arguments, prompt, state, result or error
    );
    CREATE TABLE run_chunks (             -- a run's text chunks and token ids, in batches
        run INTEGER NOT NULL,
        seq INTEGER NOT NULL,             -- the batch's first chunk
        texts TEXT NOT NULL,              -- JSON list of the batch's chunks
        ids BLOB NOT NULL,                -- int32 token ids made with them
        PRIMARY KEY (run, seq)
    );
    """,
    5: """
    CREATE TABLE ctx_msgs (               -- a context's messages, one row each (appended)
        pid INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        msg TEXT NOT NULL,                -- JSON: role, content
        PRIMARY KEY (pid, seq)
    );
    INSERT INTO ctx_msgs (pid, seq, msg)
        SELECT c.pid, j.key, j.value FROM contexts c, json_each(c.state, '$.messages') j;
    UPDATE contexts SET state = json_remove(state, '$.messages');
    """,
}


class StoreError(Exception):
    """The state database cannot be opened or is from a newer llmos."""


#: Most queued transactions committed together (one COMMIT for the batch).
MAX_BATCH = 256


@dataclass(slots=True)
class _Work:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    fut: concurrent.futures.Future[Any]
    queued: float  # time.monotonic() at submit (the metrics' commit latency)


class Store:
    """The state database at ``path`` (``None``: an in-memory one, for tests).

    Group commit: the worker takes every transaction queued meanwhile (up to
    ``MAX_BATCH``), runs each inside a savepoint of one SQLite transaction (a failing one
    is rolled back alone and gets its exception) and commits once; every result is
    handed back only after that COMMIT, so "replied" still means "committed". Under load
    this turns a commit per write into a commit per batch."""

    def __init__(self, path: Path | None, key: bytes | None = None) -> None:
        self.path = path
        self.key = key  # 32 bytes: the whole database (and its WAL) encrypted by SQLCipher
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        # The metrics' hook, called in the store thread with each transaction's seconds
        # from submit to commit.
        self.on_commit: Callable[[float], None] | None = None
        self.commits = 0  # batches committed
        self.transactions = 0  # transactions in them
        opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._serve, args=(opened,), name="llmos-store", daemon=True
        )
        self._thread.start()
        opened.result()

    # -- the worker thread's side --------------------------------------------------------
    def _serve(self, opened: concurrent.futures.Future[None]) -> None:
        try:
            self._open()
        except BaseException as exc:
            opened.set_exception(exc)
            return
        opened.set_result(None)
        while True:
            batch: list[_Work] = []
            item = self._queue.get()
            while item is not None:
                batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._run_batch(batch)
            if item is None:  # close(): everything queued before it is done
                self._shut()
                return

    def _open(self) -> None:
        target = ":memory:" if self.path is None else str(self.path)
        try:
            conn = self._connect(target)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            hint = (
                "it is encrypted: start the kernel with --encrypt-state and the key it was "
                "made with (--state-key-file FILE or $LLMOS_STATE_KEY)"
                if self.key is None and _looks_encrypted(self.path)
                else "move it aside to start with empty state"
            )
            raise StoreError(f"cannot open the state database {target}: {exc}; {hint}") from exc
        except StoreError:
            raise
        except Exception as exc:  # sqlcipher3's own DatabaseError: a wrong key
            raise StoreError(
                f"cannot decrypt the state database {target} ({exc}): the key given is not "
                "the one it was made with, or the database is not encrypted (give the right "
                "--state-key-file / $LLMOS_STATE_KEY, or move the database aside)"
            ) from exc
        self._conn = conn

    def _connect(self, target: str) -> sqlite3.Connection:
        if self.key is None:
            return sqlite3.connect(target, isolation_level=None, check_same_thread=True)
        try:
            from sqlcipher3 import dbapi2 as sqlcipher
        except ImportError:
            raise StoreError(
                "--encrypt-state needs the sqlcipher3 package (pip install sqlcipher3)"
            ) from None
        conn = sqlcipher.connect(target, isolation_level=None, check_same_thread=True)
        conn.execute(f"PRAGMA key = \"x'{self.key.hex()}'\"")  # a raw key: no KDF per open
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # wrong key: raises
        return conn  # type: ignore[no-any-return]

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"schema version {version} is newer than this llmos understands ({SCHEMA_VERSION})"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            conn.executescript(
                f"BEGIN;\n{_MIGRATIONS[target]}\nPRAGMA user_version={target};\nCOMMIT;"
            )

    def _run_batch(self, batch: list[_Work]) -> None:
        """One SQLite transaction for the batch, a savepoint for each of its works."""
        conn = self._conn
        live = [w for w in batch if w.fut.set_running_or_notify_cancel()]
        if not live:
            return
        done: list[tuple[_Work, bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
            for w in live:
                if len(live) > 1:
                    conn.execute("SAVEPOINT work")  # type: ignore[union-attr]
                try:
                    out = w.fn(conn, *w.args)
                except BaseException as exc:  # noqa: BLE001 - handed to its caller
                    if len(live) > 1:
                        conn.execute("ROLLBACK TO work")  # type: ignore[union-attr]
                        conn.execute("RELEASE work")  # type: ignore[union-attr]
                    else:
                        conn.execute("ROLLBACK")  # type: ignore[union-attr]
                    done.append((w, False, exc))
                    continue
                if len(live) > 1:
                    conn.execute("RELEASE work")  # type: ignore[union-attr]
                done.append((w, True, out))
            if conn.in_transaction:  # type: ignore[union-attr]
                conn.execute("COMMIT")  # type: ignore[union-attr]
        except Exception as exc:  # BEGIN or COMMIT failed (disk full, I/O error)
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            for w in live:
                w.fut.set_exception(exc)
            return
        self.commits += 1
        self.transactions += len(live)
        if self.on_commit is not None:
            now = time.monotonic()
            for w in live:
                self.on_commit(now - w.queued)
        for w, ok, value in done:
            if ok:
                w.fut.set_result(value)
            else:
                w.fut.set_exception(value)

    def _shut(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._conn.close()
                self._conn = None

    # -- the loop's side -----------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Transactions queued and not yet taken by the worker."""
        return self._queue.qsize()

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(conn, *args)`` as one transaction; writes commit in queue order.
        Failures are logged (nobody may be waiting)."""
        if self._closed:
            raise RuntimeError("the store is closed")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        fut.add_done_callback(_log_failure)
        self._queue.put(_Work(fn, args, fut, time.monotonic()))
        return fut

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` as one transaction in the store thread; its result once
        committed."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Like :meth:`call`, blocking: for startup and shutdown, never from the loop."""
        return self.submit(fn, *args).result()

    def close(self) -> None:
        """Finish queued writes, checkpoint the WAL and close."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()


def _looks_encrypted(path: Path | None) -> bool:
    """A database file that does not start with SQLite's plain header."""
    try:
        with open(path, "rb") as f:  # type: ignore[arg-type]
            head = f.read(16)
    except (OSError, TypeError):
        return False
    return len(head) == 16 and head != b"SQLite format 3\x00"


def _log_failure(fut: concurrent.futures.Future[Any]) -> None:
    if (
        not fut.cancelled()
        and (exc := fut.exception()) is not None
        and not isinstance(exc, SyscallError)
    ):
        log.error("state database write failed: %s", exc, exc_info=exc)


def dumps(value: Any) -> str:
    """JSON for a column (compact, UTF-8 kept)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def get_meta(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else row[0]


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )
