"""mem.* handlers: core memory blocks, recall search, archival memory, grants.

Access control lives in :class:`kernel.memory.Memory` (``resolve``/``owns``); these
handlers validate, resolve the namespace and shape the results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.memory import BlockValue
from kernel.syscall import Call
from syscalls import models as m
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def _block(ns: str, label: str, b: BlockValue) -> m.Block:
    return m.Block(
        namespace=ns, label=label, value=b.value, max_chars=b.max_chars, updated=b.updated
    )


def sys_block_get(k: Kernel, call: Call, a: m.BlockGetArgs) -> m.BlocksResult:
    ns = k.memory.resolve(call.caller, a.namespace, write=False)
    if a.label is not None:
        return m.BlocksResult(blocks=[_block(ns, a.label, k.memory.block(ns, a.label))])
    return m.BlocksResult(
        blocks=[_block(ns, label, b) for label, b in sorted(k.memory.blocks_of(ns).items())]
    )


async def sys_block_set(k: Kernel, call: Call, a: m.BlockSetArgs) -> m.Block:
    ns = k.memory.resolve(call.caller, a.namespace, write=True)
    (value,) = await k.redactor.mask_for(call.caller.proc, [a.value])
    return _block(ns, a.label, await k.memory.block_write(ns, a.label, value, a.max_chars))


async def sys_block_append(k: Kernel, call: Call, a: m.BlockAppendArgs) -> m.Block:
    ns = k.memory.resolve(call.caller, a.namespace, write=True)
    (text,) = await k.redactor.mask_for(call.caller.proc, [a.text])
    return _block(ns, a.label, await k.memory.block_append(ns, a.label, text))


async def sys_block_replace(k: Kernel, call: Call, a: m.BlockReplaceArgs) -> m.Block:
    ns = k.memory.resolve(call.caller, a.namespace, write=True)
    old, new = await k.redactor.mask_for(call.caller.proc, [a.old, a.new])
    return _block(ns, a.label, await k.memory.block_replace(ns, a.label, old, new))


async def sys_block_delete(k: Kernel, call: Call, a: m.BlockDeleteArgs) -> m.Done:
    ns = k.memory.resolve(call.caller, a.namespace, write=True)
    await k.memory.block_delete(ns, a.label)
    return m.Done()


async def sys_recall_search(k: Kernel, call: Call, a: m.RecallSearchArgs) -> m.RecallSearchResult:
    ns = k.memory.resolve(call.caller, a.namespace, write=False)
    rows = await k.memory.recall_search(ns, a.query, a.since, a.until, a.role, a.k)
    return m.RecallSearchResult(
        hits=[
            m.RecallHit(id=i, pid=pid, role=role, content=c, ts=ts) for i, pid, role, c, ts in rows
        ]
    )


async def sys_put(k: Kernel, call: Call, a: m.PutArgs) -> m.PutResult:
    ns = k.memory.resolve(call.caller, a.namespace, write=True)
    texts = await k.redactor.mask_for(call.caller.proc, [e.text for e in a.entries])
    entries = [(text, dict(e.metadata)) for text, e in zip(texts, a.entries, strict=True)]
    ids, embed_s = await k.memory.put(ns, entries)
    return m.PutResult(ids=ids, embed_s=round(embed_s, 6))


def _entry(row: tuple, score: float | None = None) -> m.StoredEntry:
    i, ns, text, meta, created = row[:5]
    return m.StoredEntry(
        id=i,
        namespace=ns,
        text=text,
        metadata=meta,
        created=created,
        score=None if score is None else round(float(score), 6),
    )


async def sys_get(k: Kernel, call: Call, a: m.IdsArgs) -> m.EntriesResult:
    ns = k.memory.resolve(call.caller, a.namespace, write=False)
    return m.EntriesResult(entries=[_entry(r) for r in await k.memory.get(ns, list(a.ids))])


async def sys_delete(k: Kernel, call: Call, a: m.IdsArgs) -> m.DeleteResult:
    ns = k.memory.resolve(call.caller, a.namespace, write=True)
    return m.DeleteResult(deleted=await k.memory.delete(ns, list(a.ids)))


async def sys_search(k: Kernel, call: Call, a: m.SearchArgs) -> m.SearchResult:
    names = a.namespaces or [None]
    spaces = list(dict.fromkeys(k.memory.resolve(call.caller, ns, write=False) for ns in names))
    rows, embed_s, search_s = await k.memory.search(spaces, a.query, a.k, dict(a.filter))
    return m.SearchResult(
        hits=[_entry(r, r[5]) for r in rows], embed_s=round(embed_s, 6), search_s=round(search_s, 6)
    )


async def sys_grant(k: Kernel, call: Call, a: m.GrantArgs) -> m.Done:
    grantee = k.procs.lookup(a.pid)
    if not grantee.alive:
        raise SyscallError(Errno.ESRCH, f"process {a.pid} has exited")
    await k.memory.grant(call.caller, a.namespace, grantee, a.program, a.write)
    return m.Done()


async def sys_revoke(k: Kernel, call: Call, a: m.RevokeArgs) -> m.Done:
    await k.memory.revoke(call.caller, a.namespace, k.procs.lookup(a.pid), a.program)
    return m.Done()


HANDLERS = {
    "mem.block.get": sys_block_get,
    "mem.block.set": sys_block_set,
    "mem.block.append": sys_block_append,
    "mem.block.replace": sys_block_replace,
    "mem.block.delete": sys_block_delete,
    "mem.recall.search": sys_recall_search,
    "mem.put": sys_put,
    "mem.get": sys_get,
    "mem.delete": sys_delete,
    "mem.search": sys_search,
    "mem.grant": sys_grant,
    "mem.revoke": sys_revoke,
}
