"""fs.* handlers: files in the caller's view (its root, its program's /home, its mounts).

Resolution, versions, quotas and search live in :class:`kernel.fs.FileSystem`; these
handlers validate, resolve and shape the results. Disk work runs on the state
database's thread, never on the kernel's loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.fs import Place
from kernel.process import Proc
from kernel.syscall import Call
from syscalls import models as m
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def _me(call: Call) -> Proc:
    proc = call.caller.proc
    assert proc is not None  # fs.* calls need a process (the table says so)
    return proc


def _at(k: Kernel, call: Call, path: str) -> Place:
    return k.fs.place(_me(call), path)


def _viewer(k: Kernel, call: Call, pid: int | None) -> Proc:
    """Whose files a read-only call looks at: the caller's, or (``pid``) a descendant's,
    or anyone's for the admin."""
    return k.procs.target(call.caller, pid)


async def sys_read(k: Kernel, call: Call, a: m.FsReadArgs) -> m.FsReadResult:
    place = k.fs.file_place(_viewer(k, call, a.pid), a.path)
    data, size, version = await k.fs.read(place, a.offset, a.length)
    try:
        return m.FsReadResult(
            path=place.shown, text=data.decode("utf-8"), size=size, version=version
        )
    except UnicodeDecodeError:
        return m.FsReadResult(path=place.shown, data=data, size=size, version=version)


async def _write(k: Kernel, call: Call, a: m.FsWriteArgs, append: bool) -> m.FsWriteResult:
    place = k.fs.file_place(_me(call), a.path, write=True)
    version, size = await k.fs.write(place, a.payload(), append, a.parents)
    return m.FsWriteResult(path=place.shown, size=size, version=version)


async def sys_write(k: Kernel, call: Call, a: m.FsWriteArgs) -> m.FsWriteResult:
    return await _write(k, call, a, append=False)


async def sys_append(k: Kernel, call: Call, a: m.FsWriteArgs) -> m.FsWriteResult:
    return await _write(k, call, a, append=True)


async def sys_list(k: Kernel, call: Call, a: m.FsPathArgs) -> m.FsListResult:
    viewer = _viewer(k, call, a.pid)
    place = k.fs.place(viewer, a.path)
    entries = await k.fs.listdir(viewer, place)
    return m.FsListResult(
        path=place.shown,
        entries=[m.FsEntry(name=n, type=t, size=s, mtime=mt) for n, t, s, mt in entries],
    )


async def sys_stat(k: Kernel, call: Call, a: m.FsPathArgs) -> m.FsStatResult:
    place = k.fs.place(_viewer(k, call, a.pid), a.path)
    if place.area == "mnt":
        return m.FsStatResult(
            path="/mnt", type="dir", size=0, mtime=0.0, versions=0, writable=False
        )
    kind, size, mtime, versions = await k.fs.stat(place)
    return m.FsStatResult(
        path=place.shown,
        type=kind,
        size=size,
        mtime=mtime,
        versions=versions,
        writable=place.writable,
    )


async def sys_mkdir(k: Kernel, call: Call, a: m.FsMkdirArgs) -> m.Done:
    place = _at(k, call, a.path)
    if place.area == "mnt" or not place.rel:
        raise SyscallError(Errno.EPERM, f"{place.shown} is made by the kernel, not by fs.mkdir")
    await k.fs.mkdir(place, a.parents)
    return m.Done()


async def sys_remove(k: Kernel, call: Call, a: m.FsRemoveArgs) -> m.FsRemoveResult:
    place = _at(k, call, a.path)
    if place.area == "mnt":
        raise SyscallError(Errno.EPERM, "/mnt and its mounts cannot be removed")
    return m.FsRemoveResult(removed=await k.fs.remove(place, a.recursive))


async def sys_rename(k: Kernel, call: Call, a: m.FsRenameArgs) -> m.Done:
    src, dst = _at(k, call, a.src), _at(k, call, a.dst)
    if "mnt" in (src.area, dst.area):
        raise SyscallError(Errno.EPERM, "/mnt holds mounts only: rename inside /mnt/NAME")
    await k.fs.rename(src, dst)
    return m.Done()


async def sys_history(k: Kernel, call: Call, a: m.FsHistoryArgs) -> m.FsHistoryResult:
    place = k.fs.place(_viewer(k, call, a.pid), a.path)
    rows = await k.fs.history(place, a.limit)
    return m.FsHistoryResult(
        path=place.shown,
        versions=[
            m.FsVersion(version=v, sha256=sha, size=size, time=ts, op=op)
            for v, sha, size, ts, op in rows
        ],
    )


async def sys_rollback(k: Kernel, call: Call, a: m.FsRollbackArgs) -> m.FsWriteResult:
    if (a.version is None) == (a.time is None):
        raise SyscallError(
            Errno.EINVAL, "give exactly one of version (a number from fs.history) or time"
        )
    place = _at(k, call, a.path)
    version, size = await k.fs.rollback(place, a.version, a.time)
    return m.FsWriteResult(path=place.shown, size=size, version=version)


async def sys_search(k: Kernel, call: Call, a: m.FsSearchArgs) -> m.FsSearchResult:
    hits = await k.fs.search(_me(call), a.query, a.k)
    return m.FsSearchResult(
        hits=[m.FsHit(path=p, passage=n, text=t, score=s) for p, n, t, s in hits]
    )


HANDLERS = {
    "fs.read": sys_read,
    "fs.write": sys_write,
    "fs.append": sys_append,
    "fs.list": sys_list,
    "fs.stat": sys_stat,
    "fs.mkdir": sys_mkdir,
    "fs.remove": sys_remove,
    "fs.rename": sys_rename,
    "fs.history": sys_history,
    "fs.rollback": sys_rollback,
    "fs.search": sys_search,
}
