"""The syscall table as data: name -> arguments, result, errors, streaming.

The kernel registers one handler per row (``kernel/syscall.py``); the docs and
``llmos syscalls`` are generated from it. Adding a syscall = one row here, one model
pair in ``models.py`` and one handler.
"""

from __future__ import annotations

import enum
import types
import typing
from dataclasses import dataclass

from pydantic import BaseModel

from syscalls import models as m
from syscalls.errors import Errno

#: Errors any syscall may return (envelope, credentials, deadline, shutdown).
COMMON_ERRORS = (Errno.EPROTO, Errno.EINVAL, Errno.EACCES, Errno.ETIMEDOUT, Errno.ESHUTDOWN)


@dataclass(frozen=True, slots=True)
class SyscallSpec:
    """One row of the syscall table."""

    name: str
    args: type[m.Args]
    result: type[BaseModel]
    errors: tuple[Errno, ...]
    doc: str
    chunk: type[BaseModel] | None = None  # streaming syscalls send these before the result
    needs_process: bool = True  # False: callable with the kernel's admin token (pid 0)


def _row(name, args, result, errors, doc, **kw) -> tuple[str, SyscallSpec]:
    return name, SyscallSpec(name, args, result, tuple(errors), doc, **kw)


SYSCALLS: dict[str, SyscallSpec] = dict(
    [
        _row(
            "proc.spawn",
            m.SpawnArgs,
            m.SpawnResult,
            [Errno.ENOENT, Errno.EPERM, Errno.EAGAIN],
            "Create an LLM process (child of the caller, or of init for the admin).",
            needs_process=False,
        ),
        _row("proc.getpid", m.Empty, m.GetpidResult, [], "The caller's pid and parent pid."),
        _row(
            "proc.ps",
            m.PsArgs,
            m.PsResult,
            [Errno.ESRCH, Errno.EPERM],
            "The process table: the caller and its descendants (everything, for the admin), "
            "in pid order, a page at a time (`after`, `limit`; `next_after` when more follow).",
            needs_process=False,
        ),
        _row(
            "proc.wait",
            m.WaitArgs,
            m.WaitResult,
            [Errno.ECHILD, Errno.ESRCH, Errno.ETIMEDOUT, Errno.EPERM],
            "Wait for a child to exit, reap the zombie, return its exit status.",
            needs_process=False,
        ),
        _row(
            "proc.kill",
            m.KillArgs,
            m.KillResult,
            [Errno.ESRCH, Errno.EPERM],
            "Send TERM, KILL, STOP or CONT to the caller or one of its descendants.",
            needs_process=False,
        ),
        _row(
            "proc.exit",
            m.ExitArgs,
            m.Done,
            [],
            "End the caller with a status; it stays a zombie until its parent waits.",
        ),
        _row(
            "proc.nice",
            m.NiceArgs,
            m.NiceResult,
            [Errno.ESRCH, Errno.EPERM],
            "Change the priority of the caller or a descendant (never above the caller's).",
            needs_process=False,
        ),
        _row(
            "llm.generate",
            m.GenerateArgs,
            m.GenerateResult,
            [
                Errno.E2BIG,
                Errno.EDQUOT,
                Errno.ECANCELED,
                Errno.EBUSY,
                Errno.EIO,
                Errno.EAGAIN,
                Errno.ENOTSUP,
            ],
            "Generate with the process's model: chat turns (kept in its context) or raw text; "
            "detach: return at once with a run id (llm.run, llm.stream, llm.wait).",
            chunk=m.GenerateChunk,
        ),
        _row(
            "llm.cancel",
            m.CancelArgs,
            m.CancelResult,
            [Errno.ESRCH, Errno.EPERM],
            "End the generation of the caller or a descendant at the next token, or one "
            "detached run; the process goes on (its generate call or llm.wait gets ECANCELED; "
            "a chat turn is not kept).",
            needs_process=False,
        ),
        _row(
            "llm.run",
            m.RunArgs,
            m.RunInfo,
            [Errno.ENOENT, Errno.EPERM],
            "A detached run's state, usage, timestamps and error (the caller's, a "
            "descendant's, or any for the admin).",
            needs_process=False,
        ),
        _row(
            "llm.runs",
            m.RunsArgs,
            m.RunsResult,
            [Errno.ESRCH, Errno.EPERM],
            "The detached runs the caller may see: its own and its descendants' (all, for the admin).",
            needs_process=False,
        ),
        _row(
            "llm.stream",
            m.StreamArgs,
            m.GenerateResult,
            [Errno.ENOENT, Errno.EPERM, Errno.EINVAL, Errno.ECANCELED, Errno.EIO, Errno.EDQUOT],
            "Stream a run's text chunks from chunk from_seq (a client that reconnects misses "
            "nothing, gets nothing twice), then its result or its error.",
            chunk=m.RunChunk,
            needs_process=False,
        ),
        _row(
            "llm.wait",
            m.WaitRunArgs,
            m.GenerateResult,
            [
                Errno.ENOENT,
                Errno.EPERM,
                Errno.ETIMEDOUT,
                Errno.ECANCELED,
                Errno.EIO,
                Errno.EDQUOT,
                Errno.E2BIG,
            ],
            "Wait for a run to finish; its result (as llm.generate's) or its error. Collects "
            "the run unless keep.",
            needs_process=False,
        ),
        _row(
            "llm.collect",
            m.RunArgs,
            m.Done,
            [Errno.ENOENT, Errno.EPERM, Errno.EBUSY],
            "Forget a finished run's result and chunks (llm.wait does it too).",
            needs_process=False,
        ),
        _row(
            "ctx.get",
            m.CtxGetArgs,
            m.CtxGetResult,
            [Errno.ESRCH, Errno.EPERM],
            "Read a process's context (its conversation); the admin names any pid.",
            needs_process=False,
        ),
        _row(
            "ctx.append",
            m.CtxAppendArgs,
            m.CtxResult,
            [Errno.ESRCH, Errno.EPERM, Errno.E2BIG, Errno.EBUSY],
            "Append messages to a process's context without generating.",
        ),
        _row(
            "ctx.clear",
            m.CtxClearArgs,
            m.CtxResult,
            [Errno.ESRCH, Errno.EPERM, Errno.EBUSY],
            "Empty a process's context (optionally keeping its system prompt).",
        ),
        _row(
            "ctx.snapshot",
            m.CtxSnapshotArgs,
            m.SnapshotInfo,
            [Errno.ESRCH, Errno.EPERM, Errno.EBUSY, Errno.EDQUOT],
            "Save a named checkpoint of a process's context (messages, summary).",
            needs_process=False,
        ),
        _row(
            "ctx.restore",
            m.CtxSnapshotArgs,
            m.CtxResult,
            [Errno.ESRCH, Errno.EPERM, Errno.EBUSY, Errno.ENOENT],
            "Put a process's context back to a named checkpoint.",
            needs_process=False,
        ),
        _row(
            "ctx.snapshots",
            m.CtxSnapshotsArgs,
            m.CtxSnapshotsResult,
            [Errno.ESRCH, Errno.EPERM],
            "List a process's context checkpoints.",
            needs_process=False,
        ),
        _row(
            "mem.block.get",
            m.BlockGetArgs,
            m.BlocksResult,
            [Errno.ENOENT, Errno.EACCES],
            "Read core memory blocks (labelled text always placed in the owner's prompt).",
            needs_process=False,
        ),
        _row(
            "mem.block.set",
            m.BlockSetArgs,
            m.Block,
            [Errno.EACCES, Errno.E2BIG, Errno.EDQUOT],
            "Create or overwrite a core memory block.",
            needs_process=False,
        ),
        _row(
            "mem.block.append",
            m.BlockAppendArgs,
            m.Block,
            [Errno.ENOENT, Errno.EACCES, Errno.E2BIG],
            "Append text to a core memory block (a new line).",
            needs_process=False,
        ),
        _row(
            "mem.block.replace",
            m.BlockReplaceArgs,
            m.Block,
            [Errno.ENOENT, Errno.EACCES, Errno.E2BIG],
            "Replace text in a core memory block (every occurrence of old).",
            needs_process=False,
        ),
        _row(
            "mem.block.delete",
            m.BlockDeleteArgs,
            m.Done,
            [Errno.ENOENT, Errno.EACCES],
            "Delete a core memory block.",
            needs_process=False,
        ),
        _row(
            "mem.recall.search",
            m.RecallSearchArgs,
            m.RecallSearchResult,
            [Errno.EACCES],
            "Search recall memory (every message a process has seen) by words and time.",
            needs_process=False,
        ),
        _row(
            "mem.put",
            m.PutArgs,
            m.PutResult,
            [Errno.EACCES, Errno.EIO],
            "Store archival memory entries (text + metadata), embedded for search by meaning.",
            needs_process=False,
        ),
        _row(
            "mem.get",
            m.IdsArgs,
            m.EntriesResult,
            [Errno.EACCES],
            "Read archival entries by id (ids not in the namespace are left out).",
            needs_process=False,
        ),
        _row(
            "mem.delete",
            m.IdsArgs,
            m.DeleteResult,
            [Errno.EACCES],
            "Delete archival entries by id.",
            needs_process=False,
        ),
        _row(
            "mem.search",
            m.SearchArgs,
            m.SearchResult,
            [Errno.EACCES, Errno.EIO],
            "Search archival memory by meaning (cosine over sentence embeddings), with a metadata filter.",
            needs_process=False,
        ),
        _row(
            "mem.grant",
            m.GrantArgs,
            m.Done,
            [Errno.EACCES, Errno.ESRCH],
            "Let another process (or its whole program) read, or read and write, a namespace the caller owns.",
            needs_process=False,
        ),
        _row(
            "mem.revoke",
            m.RevokeArgs,
            m.Done,
            [Errno.EACCES, Errno.ESRCH, Errno.ENOENT],
            "Take a grant back.",
            needs_process=False,
        ),
        _row(
            "ipc.send",
            m.SendArgs,
            m.SendResult,
            [Errno.ESRCH, Errno.EPERM, Errno.EAGAIN, Errno.ECANCELED],
            "Put a message in the mailbox of a process of the caller's program (anyone's, for the admin); "
            "EAGAIN while it is full, unless a timeout lets the sender wait for room.",
            needs_process=False,
        ),
        _row(
            "ipc.recv",
            m.RecvArgs,
            m.RecvResult,
            [Errno.ECANCELED],
            "Take the oldest message (optionally from one sender or topic) from the caller's mailbox, "
            "waiting up to the timeout; no message (null) if none came.",
        ),
        _row(
            "ipc.subscribe",
            m.TopicArgs,
            m.SubscribeResult,
            [Errno.EAGAIN, Errno.EPERM],
            "Receive the messages published on a topic from now on (an owned topic: if its "
            "rules let the caller's program).",
        ),
        _row(
            "ipc.topic.create",
            m.TopicCreateArgs,
            m.TopicCreateResult,
            [Errno.EBUSY, Errno.EAGAIN],
            "Make a topic the caller's program owns: only it, the programs it allows and the "
            "admin may publish and subscribe (others: none, subscribe or publish); it lives "
            "until deleted or its program's last process exits.",
            needs_process=False,
        ),
        _row(
            "ipc.topic.delete",
            m.TopicArgs,
            m.TopicDeleteResult,
            [Errno.ENOENT, Errno.EPERM],
            "Remove an owned topic (its program's processes or the admin); subscribers lose it.",
            needs_process=False,
        ),
        _row(
            "ipc.unsubscribe",
            m.TopicArgs,
            m.SubscribeResult,
            [Errno.ENOENT],
            "Stop receiving a topic.",
        ),
        _row(
            "ipc.publish",
            m.PublishArgs,
            m.PublishResult,
            [Errno.EPERM],
            "Put a copy of a message in every subscriber's mailbox; a full mailbox drops its copy "
            "(counted), never blocking the publisher (an owned topic: if its rules let the "
            "caller's program).",
            needs_process=False,
        ),
        _row(
            "sys.info",
            m.Empty,
            m.SysInfoResult,
            [],
            "Kernel version, ABI, uptime, endpoints, models and their slots.",
            needs_process=False,
        ),
        _row(
            "sys.audit",
            m.AuditArgs,
            m.AuditResult,
            [Errno.EPERM],
            "The audit trail (admin only): who did what to which object with which result; "
            "with verify, whether its hash chain is intact.",
            needs_process=False,
        ),
        _row(
            "sys.stat",
            m.StatArgs,
            m.StatResult,
            [],
            "The system state: model slots and queues, process counts per state, token rates, "
            "host CPU and memory, and the caller-visible process rows.",
            needs_process=False,
        ),
        _row(
            "fs.read",
            m.FsReadArgs,
            m.FsReadResult,
            [Errno.ENOENT, Errno.EPERM, Errno.EINVAL],
            "Read a file (text, or bytes when it is not UTF-8), from an offset.",
            needs_process=False,
        ),
        _row(
            "fs.write",
            m.FsWriteArgs,
            m.FsWriteResult,
            [Errno.EPERM, Errno.EINVAL, Errno.EROFS, Errno.EFBIG, Errno.EDQUOT],
            "Write a file (its previous content stays in fs.history); text files become searchable.",
        ),
        _row(
            "fs.append",
            m.FsWriteArgs,
            m.FsWriteResult,
            [Errno.EPERM, Errno.EINVAL, Errno.EROFS, Errno.EFBIG, Errno.EDQUOT],
            "Append to a file (created if absent), as a new version.",
        ),
        _row(
            "fs.list",
            m.FsPathArgs,
            m.FsListResult,
            [Errno.ENOENT, Errno.EPERM, Errno.EINVAL],
            "List a directory (/ shows home and mnt too; /mnt lists the mounts).",
            needs_process=False,
        ),
        _row(
            "fs.stat",
            m.FsPathArgs,
            m.FsStatResult,
            [Errno.ENOENT, Errno.EPERM, Errno.EINVAL],
            "Type, size, modification time and number of versions of a path.",
            needs_process=False,
        ),
        _row(
            "fs.mkdir",
            m.FsMkdirArgs,
            m.Done,
            [Errno.ENOENT, Errno.EPERM, Errno.EINVAL, Errno.EROFS],
            "Create a directory.",
        ),
        _row(
            "fs.remove",
            m.FsRemoveArgs,
            m.FsRemoveResult,
            [Errno.ENOENT, Errno.EPERM, Errno.EINVAL, Errno.EROFS],
            "Remove a file or (recursive) a directory; the contents stay in fs.history.",
        ),
        _row(
            "fs.rename",
            m.FsRenameArgs,
            m.Done,
            [Errno.ENOENT, Errno.EPERM, Errno.EINVAL, Errno.EROFS],
            "Move a file or directory (across the root, /home and rw mounts too), with its history.",
        ),
        _row(
            "fs.history",
            m.FsHistoryArgs,
            m.FsHistoryResult,
            [Errno.ENOENT, Errno.EPERM, Errno.EINVAL],
            "The versions of a path, newest first (writes, appends, removals, renames, rollbacks).",
            needs_process=False,
        ),
        _row(
            "fs.rollback",
            m.FsRollbackArgs,
            m.FsWriteResult,
            [Errno.ENOENT, Errno.EPERM, Errno.EINVAL, Errno.EROFS],
            "Bring back a version (by number, or as of a time) as the newest version.",
        ),
        _row(
            "fs.search",
            m.FsSearchArgs,
            m.FsSearchResult,
            [Errno.EIO],
            "Search the caller's files (root, home, mounts) by meaning; passages with their paths.",
        ),
        _row(
            "tool.list",
            m.Empty,
            m.ToolListResult,
            [],
            "The tools the caller may use (every tool, for the admin), with their argument schemas.",
            needs_process=False,
        ),
        _row(
            "tool.call",
            m.ToolCallArgs,
            m.ToolCallResult,
            [Errno.ENOENT, Errno.EPERM, Errno.EINVAL, Errno.ETIMEDOUT, Errno.EIO, Errno.EAGAIN],
            "Call a tool; arguments are validated first; irreversible ones may wait for the owner's approval.",
        ),
        _row(
            "tool.register",
            m.ToolRegisterArgs,
            m.Done,
            [Errno.EBUSY, Errno.EINVAL, Errno.EDQUOT, Errno.EPERM, Errno.ESRCH],
            "Serve a tool from this process for its own program's processes: calls arrive "
            "through tool.next, answers go back with tool.reply. The admin registers one for "
            "every process, naming its server.",
            needs_process=False,
        ),
        _row(
            "tool.unregister",
            m.ToolNameArgs,
            m.Done,
            [Errno.ENOENT],
            "Stop serving a tool (its waiting callers get EIO); the admin removes a tool of "
            "every process.",
            needs_process=False,
        ),
        _row(
            "tool.next",
            m.ToolNextArgs,
            m.ToolRequest,
            [Errno.ENOENT],
            "The next call of a tool this process serves (id null if none came within the timeout).",
        ),
        _row(
            "tool.reply",
            m.ToolReplyArgs,
            m.Done,
            [Errno.ENOENT, Errno.EIO],
            "Answer a call received with tool.next: a JSON result, or an error sentence.",
        ),
        _row(
            "tool.pending",
            m.Empty,
            m.ToolPendingResult,
            [],
            "Calls of irreversible tools waiting for the owner's approval.",
            needs_process=False,
        ),
        _row(
            "tool.approve",
            m.ToolDecideArgs,
            m.Done,
            [Errno.ENOENT, Errno.EPERM],
            "Approve a parked call (the admin).",
            needs_process=False,
        ),
        _row(
            "tool.deny",
            m.ToolDecideArgs,
            m.Done,
            [Errno.ENOENT, Errno.EPERM],
            "Deny a parked call (the admin); its caller gets EPERM.",
            needs_process=False,
        ),
        _row(
            "mcp.add",
            m.McpAddArgs,
            m.McpServerInfo,
            [Errno.EPERM, Errno.EBUSY, Errno.EDQUOT, Errno.EIO],
            "Mount an MCP server (a command run over stdio, or a streamable-HTTP URL); its tools "
            "become NAME__TOOL (the admin).",
            needs_process=False,
        ),
        _row(
            "mcp.list",
            m.Empty,
            m.McpListResult,
            [Errno.EPERM],
            "The mounted MCP servers: state, tools, refused tools, restarts (the admin).",
            needs_process=False,
        ),
        _row(
            "mcp.remove",
            m.McpNameArgs,
            m.Done,
            [Errno.EPERM, Errno.ENOENT],
            "Unmount an MCP server: its tools go, calls in flight get EIO (the admin).",
            needs_process=False,
        ),
    ]
)


def type_name(ann: object) -> str:
    """A readable name for a field annotation (``int | None``, ``list[ChatMessage]``)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return "|".join(repr(a) for a in args)
    if isinstance(ann, type) and issubclass(ann, enum.Enum):  # its values, as for a Literal
        return "|".join(repr(member.value) for member in ann)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in args)}]"
    return "None" if ann is type(None) else getattr(ann, "__name__", str(ann))


def describe_model(model: type[BaseModel]) -> str:
    """``name: type = default`` for each field, for the generated table."""
    parts = []
    for name, field in model.model_fields.items():
        text = f"{field.alias or name}: {type_name(field.annotation)}"
        if not field.is_required():
            default = field.get_default(call_default_factory=True)
            text += f" = {default!r}"
        parts.append(text)
    return ", ".join(parts) or "-"


def table_rows() -> list[dict[str, str]]:
    """The syscall table as plain rows (name, args, result, errors, doc)."""
    return [
        {
            "name": spec.name,
            "args": describe_model(spec.args),
            "result": describe_model(spec.result) + (" (streams chunks)" if spec.chunk else ""),
            "errors": ", ".join(dict.fromkeys(str(e) for e in spec.errors + COMMON_ERRORS)),
            "doc": spec.doc,
        }
        for spec in SYSCALLS.values()
    ]


def markdown_table() -> str:
    """The syscall table in Markdown (goes into docs/SYSCALLS.md)."""
    lines = ["| syscall | arguments | result | errors | what it does |", "|---|---|---|---|---|"]
    for r in table_rows():
        cells = [f"`{r['name']}`", r["args"], r["result"], r["errors"], r["doc"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
