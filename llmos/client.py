"""The SDK: connect to a kernel and make syscalls, synchronously or with asyncio.

    import llmos
    with llmos.connect() as k:                 # the admin (your user), or
        p = k.spawn("helper", system="Be brief.")
        print(p.chat("Name a colour."))
        for piece in p.stream("And another?"):
            print(piece, end="")
        p.exit()

Agent programs started by ``llmos run`` get their own process with
``llmos.this_process()``. Every failure is a :class:`syscalls.errors.SyscallError`
subclass named after its code (``errors.ESRCH``, ``errors.ETIMEDOUT``...).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from pydantic import BaseModel, ValidationError

from syscalls import codec, limits, paths
from syscalls import models as m
from syscalls.errors import Errno, SyscallError

#: Extra seconds the client waits past a call's deadline for the kernel's own ETIMEDOUT.
GRACE_S = 5.0
#: Most frames the asyncio client reads per wake-up before other tasks get a turn.
_READ_BATCH = 256
_NOBLOCK = int(zmq.NOBLOCK)


def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else ``$LLMOS_ENDPOINT``, else what the kernel wrote in the runtime
    dir, else the default ipc socket."""
    if endpoint:
        return endpoint
    if env := os.environ.get("LLMOS_ENDPOINT"):
        return env
    try:
        return (paths.runtime_dir() / "kernel.endpoint").read_text().strip()
    except OSError:
        return paths.default_endpoint()


def admin_token() -> str | None:
    """The admin credential the running kernel wrote for this user, if readable."""
    if env := os.environ.get("LLMOS_ADMIN_TOKEN"):
        return env
    try:
        return (paths.runtime_dir() / "admin.token").read_text().strip()
    except OSError:
        return None


def _check_endpoint(endpoint: str) -> None:
    if endpoint.startswith("ipc://") and not Path(endpoint[6:]).exists():
        raise SyscallError.of(
            Errno.ECONNREFUSED,
            f"no kernel socket at {endpoint[6:]}; start one with `llmos kernel start`",
        )


def _deadline_of(args: dict[str, Any], deadline_ms: int | None, name: str) -> float:
    if deadline_ms is not None:
        return deadline_ms / 1000
    if name == "llm.generate":
        return limits.DEFAULT_GENERATE_DEADLINE_MS / 1000
    if name == "proc.wait" and isinstance(args.get("timeout"), int | float):
        return max(args["timeout"] + 1, limits.DEFAULT_DEADLINE_MS / 1000)
    return limits.DEFAULT_DEADLINE_MS / 1000


def _final(frame: Any) -> dict[str, Any]:
    """Result of a final reply frame, or raise its error."""
    if not isinstance(frame, dict) or "ok" not in frame:
        raise SyscallError.of(Errno.EPROTO, f"kernel sent a malformed reply: {frame!r:.200}")
    if frame["ok"]:
        result = frame.get("result")
        return result if isinstance(result, dict) else {}
    raise SyscallError.from_wire(frame.get("error"))


class Client:
    """A synchronous connection to a kernel. Thread-safe: each thread gets its own
    socket, so a call blocking in one thread (a wait, a generation) never delays
    another thread's calls."""

    def __init__(self, endpoint: str | None = None, pid: int = 0, token: str | None = None) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        _check_endpoint(self.endpoint)
        self.pid = pid
        self.token = token if token is not None else (admin_token() or "") if pid == 0 else ""
        self._ctx = zmq.Context.instance()
        self._ids = itertools.count(1)
        self._local = threading.local()
        self._socks: list[zmq.Socket[bytes]] = []
        self._lock = threading.Lock()

    def _socket(self) -> zmq.Socket[bytes]:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            self._local.sock = sock
            with self._lock:
                self._socks.append(sock)
        return sock

    # -- raw syscalls -------------------------------------------------------------------
    def call(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        pid: int | None = None,
        token: str | None = None,
        deadline_ms: int | None = None,
    ) -> dict[str, Any]:
        """Make one syscall and return its result (a dict), or raise its error."""
        for frame in self._frames(name, args or {}, pid, token, deadline_ms):
            final = frame
        return final

    def stream(
        self,
        name: str,
        args: dict[str, Any],
        *,
        pid: int | None = None,
        token: str | None = None,
        deadline_ms: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Make a streaming syscall: yields each chunk, then the final result."""
        yield from self._frames(name, args, pid, token, deadline_ms)

    def _frames(
        self,
        name: str,
        args: dict[str, Any],
        pid: int | None,
        token: str | None,
        deadline_ms: int | None,
    ) -> Iterator[dict[str, Any]]:
        sock = self._socket()
        rid = next(self._ids)
        pid = self.pid if pid is None else pid
        token = self.token if token is None else token
        wait_ms = int((_deadline_of(args, deadline_ms, name) + GRACE_S) * 1000)
        if getattr(self._local, "rcvtimeo", None) != wait_ms:
            sock.setsockopt(zmq.RCVTIMEO, wait_ms)
            self._local.rcvtimeo = wait_ms
        sock.send(codec.encode_request(rid, name, args, pid, token, deadline_ms))
        while True:
            try:
                raw = sock.recv()
            except zmq.Again:
                raise SyscallError.of(
                    Errno.ETIMEDOUT,
                    f"no reply from the kernel at {self.endpoint} for {name}; "
                    "is it running? (`llmos kernel status`)",
                ) from None
            frame = codec.unpackb(raw)
            if not isinstance(frame, dict) or frame.get("id") not in (rid, None):
                continue  # a late reply to an earlier call (timed out, or a stream left early)
            if "chunk" in frame:
                yield frame["chunk"]
                continue
            yield _final(frame)
            return

    # -- conveniences -------------------------------------------------------------------
    def spawn(
        self,
        name: str,
        system: str | None = None,
        model: str | None = None,
        nice: int = 0,
        limits: dict[str, Any] | None = None,
        program_limits: dict[str, Any] | None = None,
        **options: Any,
    ) -> Process:
        """Create an LLM process (a child of this client's process, or of init).
        ``options``: fork, namespace, ctx_policy, ctx_window, host_pid (see proc.spawn)."""
        args = _spawn_args(name, system, model, nice, limits, program_limits, **options)
        res = m.SpawnResult(**self.call("proc.spawn", args))
        return Process(self, res.pid, res.token)

    def tools(self) -> list[m.ToolInfo]:
        """Every tool the kernel has (built in and served)."""
        return m.ToolListResult(**self.call("tool.list")).tools

    def pending(self) -> list[m.ParkedCall]:
        """Calls of irreversible tools waiting for your approval."""
        return m.ToolPendingResult(**self.call("tool.pending")).calls

    def approve(self, call_id: int) -> None:
        """Let a parked tool call run."""
        self.call("tool.approve", {"id": call_id})

    def deny(self, call_id: int) -> None:
        """Refuse a parked tool call (its caller gets EPERM)."""
        self.call("tool.deny", {"id": call_id})

    def memory(self, namespace: str) -> Memory:
        """Memory syscalls on ``namespace`` as the admin (``pid:N``, ``prog:N`` or a name)."""
        return Memory(self.call, namespace)

    def process(self, pid: int, token: str) -> Process:
        """A handle acting as process ``pid`` (whose token you hold)."""
        return Process(self, pid, token)

    def info(self) -> m.SysInfoResult:
        return m.SysInfoResult(**self.call("sys.info"))

    def stat(self, procs: bool = True) -> m.StatResult:
        """The system state (``sys.stat``): models' slots and queues, process counts per
        state, token rates, host CPU/memory and, unless ``procs=False``, the process rows
        this client may see."""
        return m.StatResult(**self.call("sys.stat", {} if procs else {"procs": False}))

    def ps(self, pid: int | None = None) -> list[m.ProcInfo]:
        return m.PsResult(**self.call("proc.ps", _opt(pid=pid))).procs

    def kill(self, pid: int, signal: str = "TERM") -> m.KillResult:
        return m.KillResult(**self.call("proc.kill", {"pid": pid, "signal": signal}))

    def wait(self, pid: int | None = None, timeout: float | None = None) -> m.WaitResult:
        return m.WaitResult(
            **self.call(
                "proc.wait", _opt(pid=pid, timeout=timeout), deadline_ms=_wait_deadline(timeout)
            )
        )

    def nice(self, pid: int, nice: int) -> m.NiceResult:
        return m.NiceResult(**self.call("proc.nice", {"pid": pid, "nice": nice}))

    def send(self, pid: int, message: Any, timeout: float = 0) -> m.SendResult:
        """Put ``message`` (any JSON value) in process ``pid``'s mailbox as the admin
        (sender 0); see :meth:`Process.send`."""
        args = _ipc_args(m.SendArgs, pid=pid, message=message, timeout=timeout or None)
        return m.SendResult(
            **self.call("ipc.send", args, deadline_ms=_blocking_deadline_ms(timeout or None))
        )

    def publish(self, topic: str, message: Any) -> m.PublishResult:
        """Publish ``message`` on ``topic`` as the admin; see :meth:`Process.publish`."""
        return m.PublishResult(
            **self.call("ipc.publish", _ipc_args(m.PublishArgs, topic=topic, message=message))
        )

    def close(self) -> None:
        with self._lock:
            for sock in self._socks:
                sock.close(linger=0)
            self._socks.clear()
        self._local = threading.local()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Process:
    """A handle on one LLM process; its methods are the syscalls it makes."""

    def __init__(self, client: Client, pid: int, token: str, parent: Process | None = None) -> None:
        self.client, self.pid, self.token = client, pid, token
        self.parent = parent  # the process that spawned it (None: the client's own identity)
        self.last: m.GenerateResult | None = None  # result of the latest generation

    def __repr__(self) -> str:
        return f"Process(pid={self.pid})"

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reap()

    def reap(self, timeout: float = 10.0) -> m.WaitResult | None:
        """End this process (KILL, if it still runs) and collect its exit status as its
        spawner; None if it was already reaped."""
        try:
            self.call("proc.kill", {"pid": self.pid, "signal": "KILL"})
        except SyscallError as exc:
            if exc.code not in (Errno.ESRCH, Errno.EACCES):
                raise
        waiter = self.parent.wait if self.parent is not None else self.client.wait
        try:
            return waiter(self.pid, timeout=timeout)
        except SyscallError as exc:
            if exc.code in (Errno.ECHILD, Errno.ESRCH):
                return None
            raise

    def call(self, name: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """A raw syscall made as this process."""
        return self.client.call(name, args, pid=self.pid, token=self.token, **kw)

    # llm.*
    def generate(
        self,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        deadline_ms: int | None = None,
        **options: Any,
    ) -> m.GenerateResult:
        """Generate from chat ``messages`` (kept in the context) or a raw ``prompt``.
        Options: temperature, top_p, max_tokens, stop, seed, response_format.

        ``response_format`` constrains the text (structured output): a dict such as
        ``{"type": "json_schema", "schema": {...}}``, ``{"type": "json_object"}``,
        ``{"type": "choice", "choices": [...]}``, ``{"type": "regex", "pattern": "..."}``
        or ``{"type": "grammar", "ebnf": "..."}``, or a pydantic model class (its JSON
        Schema), so that ``Model.model_validate_json(result.text)`` works unless the
        output was cut by ``max_tokens`` (``finish_reason == "length"``)."""
        args = _generate_args(messages=messages, prompt=prompt, **options)
        self.last = m.GenerateResult(**self.call("llm.generate", args, deadline_ms=deadline_ms))
        return self.last

    def chat(self, text: str, **options: Any) -> str:
        """Say ``text`` as the user; return the model's answer (both stay in the context)."""
        return self.generate([{"role": "user", "content": text}], **options).text

    def stream(
        self,
        text: str | None = None,
        messages: list[dict[str, str]] | None = None,
        deadline_ms: int | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """Like :meth:`chat` but yields text as it is generated; ``self.last`` holds
        the final result afterwards."""
        if text is not None:
            messages = [*(messages or []), {"role": "user", "content": text}]
        args = _generate_args(messages=messages, stream=True, **options)
        for frame in self.client.stream(
            "llm.generate", args, pid=self.pid, token=self.token, deadline_ms=deadline_ms
        ):
            if "finish_reason" in frame:
                self.last = m.GenerateResult(**frame)
            else:
                yield frame["text"]

    # ctx.*
    def context(self, last: int | None = None) -> list[dict[str, str]]:
        return self.call("ctx.get", _opt(last=last))["messages"]

    def append(self, messages: list[dict[str, str]]) -> int:
        return self.call("ctx.append", {"messages": messages})["total"]

    def clear(self, keep_system: bool = True) -> int:
        return self.call("ctx.clear", {"keep_system": keep_system})["total"]

    def context_info(self) -> m.CtxGetResult:
        """The whole context with its running summary and eviction count."""
        return m.CtxGetResult(**self.call("ctx.get"))

    def snapshot(self, name: str) -> m.SnapshotInfo:
        """Save a named checkpoint of this process's context."""
        return m.SnapshotInfo(**self.call("ctx.snapshot", {"name": name}))

    def restore(self, name: str) -> int:
        """Put the context back to checkpoint ``name``; returns its message count."""
        return self.call("ctx.restore", {"name": name})["total"]

    def snapshots(self) -> list[m.SnapshotInfo]:
        return m.CtxSnapshotsResult(**self.call("ctx.snapshots")).snapshots

    # mem.*
    @property
    def memory(self) -> Memory:
        """This process's own memory namespace (``pid:N``)."""
        return Memory(self.call, own=f"pid:{self.pid}")

    @property
    def tools(self) -> Tools:
        """Tools this process may call, and tools it serves."""
        return Tools(self.call)

    @property
    def files(self) -> Files:
        """This process's files: its root, ``/home`` (its program's) and ``/mnt/NAME``."""
        return Files(self.call)

    def memory_of(self, namespace: str) -> Memory:
        """Another namespace: its program's (``prog:N`` or its name), or one granted to it."""
        return Memory(self.call, namespace)

    # proc.*
    def getpid(self) -> m.GetpidResult:
        return m.GetpidResult(**self.call("proc.getpid"))

    def spawn(
        self,
        name: str,
        system: str | None = None,
        model: str | None = None,
        nice: int = 0,
        limits: dict[str, Any] | None = None,
        program_limits: dict[str, Any] | None = None,
        **options: Any,
    ) -> Process:
        """Spawn a child of this process (``program_limits`` is refused: a child joins its
        parent's program). ``options``: fork (copy this process's context), ctx_policy,
        ctx_window, host_pid (see proc.spawn)."""
        args = _spawn_args(name, system, model, nice, limits, program_limits, **options)
        res = m.SpawnResult(**self.call("proc.spawn", args))
        return Process(self.client, res.pid, res.token, parent=self)

    def fork(self, name: str, **options: Any) -> Process:
        """A child that starts with a copy of this process's context, like fork()."""
        return self.spawn(name, fork=True, **options)

    def ps(self) -> list[m.ProcInfo]:
        return m.PsResult(**self.call("proc.ps")).procs

    def stat(self, procs: bool = True) -> m.StatResult:
        """``sys.stat`` as this process: counts and rows cover itself and its descendants."""
        return m.StatResult(**self.call("sys.stat", {} if procs else {"procs": False}))

    def wait(self, pid: int | None = None, timeout: float | None = None) -> m.WaitResult:
        """Wait for one of this process's children to exit."""
        return m.WaitResult(
            **self.call(
                "proc.wait", _opt(pid=pid, timeout=timeout), deadline_ms=_wait_deadline(timeout)
            )
        )

    def kill(self, pid: int | None = None, signal: str = "TERM") -> m.KillResult:
        """Signal this process (default) or one of its descendants."""
        return m.KillResult(**self.call("proc.kill", {"pid": pid or self.pid, "signal": signal}))

    def nice(self, nice: int, pid: int | None = None) -> m.NiceResult:
        return m.NiceResult(**self.call("proc.nice", _opt(pid=pid, nice=nice)))

    def exit(self, status: int = 0) -> None:
        self.call("proc.exit", {"status": status})

    # ipc.*
    def send(self, pid: int, message: Any, timeout: float = 0) -> m.SendResult:
        """Put ``message`` (any JSON value up to 64 KiB as JSON) in the mailbox of process
        ``pid``, which must belong to this process's program (EPERM otherwise; use a
        topic to reach another program). If that mailbox is full: ``errors.EAGAIN`` at
        once, or after waiting up to ``timeout`` seconds for room. ``errors.ESRCH`` if
        ``pid`` has exited, or exits while this waits."""
        args = _ipc_args(m.SendArgs, pid=pid, message=message, timeout=timeout or None)
        return m.SendResult(
            **self.call("ipc.send", args, deadline_ms=_blocking_deadline_ms(timeout or None))
        )

    def recv(
        self, timeout: float | None = None, from_pid: int | None = None, topic: str | None = None
    ) -> m.IpcMessage | None:
        """The oldest message in this process's mailbox (only from ``from_pid`` / only
        on ``topic``, if given), waiting up to ``timeout`` seconds (0 polls; default:
        the call's 30 s deadline). None if none came. Its payload is ``.body``; ``.sender``,
        ``.topic`` and ``.sent`` say where it came from."""
        return self.recv_full(timeout, from_pid, topic).message

    def recv_full(
        self, timeout: float | None = None, from_pid: int | None = None, topic: str | None = None
    ) -> m.RecvResult:
        """:meth:`recv` with the mailbox's depth after it and its ``dropped`` counter."""
        args = _ipc_args(m.RecvArgs, timeout=timeout, from_pid=from_pid, topic=topic)
        return m.RecvResult(
            **self.call("ipc.recv", args, deadline_ms=_blocking_deadline_ms(timeout))
        )

    def subscribe(self, topic: str) -> m.SubscribeResult:
        """Receive the messages published on ``topic`` from now on (in :meth:`recv`)."""
        return m.SubscribeResult(**self.call("ipc.subscribe", _ipc_args(m.TopicArgs, topic=topic)))

    def unsubscribe(self, topic: str) -> m.SubscribeResult:
        """Stop receiving ``topic`` (``errors.ENOENT`` if not subscribed); messages
        already in the mailbox stay."""
        return m.SubscribeResult(
            **self.call("ipc.unsubscribe", _ipc_args(m.TopicArgs, topic=topic))
        )

    def publish(self, topic: str, message: Any) -> m.PublishResult:
        """Put a copy of ``message`` in the mailbox of every process subscribed to
        ``topic`` (any program's). Never blocks: a subscriber whose mailbox is full
        misses it (counted in its ``dropped``). Returns how many got it."""
        return m.PublishResult(
            **self.call("ipc.publish", _ipc_args(m.PublishArgs, topic=topic, message=message))
        )


class Tools:
    """The tool.* syscalls as a process: call tools, and serve tools of its own."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def list(self) -> list[m.ToolInfo]:
        """The tools this process may use, with their argument schemas."""
        return m.ToolListResult(**self._call("tool.list")).tools

    def call(self, name: str, args: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
        """Call tool ``name`` and return its JSON result (errors raise SyscallError)."""
        res = self._call(
            "tool.call",
            {"name": name, "args": args or {}, "timeout_s": timeout_s},
            deadline_ms=int(timeout_s * 1000) + 5000,
        )
        return m.ToolCallResult(**res).result

    def register(
        self,
        name: str,
        description: str,
        parameters: dict[str, Any] | type[BaseModel] | None = None,
        irreversible: bool = False,
    ) -> None:
        """Serve tool ``name``; ``parameters`` is a JSON schema or a pydantic model class."""
        if isinstance(parameters, type) and issubclass(parameters, BaseModel):
            parameters = parameters.model_json_schema()
        self._call(
            "tool.register",
            _opt(
                name=name, description=description, parameters=parameters, irreversible=irreversible
            ),
        )

    def unregister(self, name: str) -> None:
        self._call("tool.unregister", {"name": name})

    def next(self, timeout_s: float = 10.0) -> m.ToolRequest:
        """The next call of a tool this process serves (``id`` None if none came in time)."""
        return m.ToolRequest(
            **self._call(
                "tool.next", {"timeout_s": timeout_s}, deadline_ms=int(timeout_s * 1000) + 5000
            )
        )

    def reply(self, call_id: int, result: Any = None, error: str | None = None) -> None:
        """Answer a call: a JSON result, or an error sentence."""
        self._call("tool.reply", _opt(id=call_id, result=result, error=error))

    def serve(self, handlers: dict[str, Any], stop: Any = None, poll_s: float = 1.0) -> int:
        """Answer calls with ``handlers[name](**args)`` until ``stop()`` is true (or forever).
        An exception in a handler is sent back as the call's error. Returns calls answered."""
        answered = 0
        while stop is None or not stop():
            req = self.next(poll_s)
            if req.id is None or req.name is None:
                continue
            try:
                self.reply(req.id, result=handlers[req.name](**req.args))
            except SyscallError as exc:
                if exc.code is not Errno.ENOENT:  # ENOENT: its caller gave up, or it was answered
                    _answer_quietly(self, req.id, f"{exc.code}: {exc.message}")
            except Exception as exc:  # the caller gets the error; the server goes on
                _answer_quietly(self, req.id, f"{type(exc).__name__}: {exc}")
            answered += 1
        return answered


def _answer_quietly(tools: Tools, call_id: int, error: str) -> None:
    """Send ``error`` as a call's answer, unless the call is already over."""
    try:
        tools.reply(call_id, error=error)
    except SyscallError as exc:
        if exc.code is not Errno.ENOENT:
            raise


class Files:
    """The fs.* syscalls, in the calling process's view of files.

    Paths are inside the process's root (a leading ``/`` is optional): ``notes.txt``,
    ``/home/shared.md`` (the program's home), ``/mnt/data/x.csv`` (a mount given at spawn).
    """

    def __init__(self, call: Any) -> None:
        self._call = call

    def read(self, path: str, offset: int = 0, length: int | None = None) -> str | bytes:
        """The file's content (text, or bytes when it is not UTF-8), up to ``length`` bytes."""
        res = m.FsReadResult(
            **self._call("fs.read", _opt(path=path, offset=offset or None, length=length))
        )
        return res.text if res.text is not None else (res.data or b"")

    def write(self, path: str, content: str | bytes, parents: bool = True) -> m.FsWriteResult:
        """Replace the file's content (the old one stays in :meth:`history`)."""
        return m.FsWriteResult(
            **self._call("fs.write", {"path": path, **_content(content), "parents": parents})
        )

    def append(self, path: str, content: str | bytes) -> m.FsWriteResult:
        """Append to the file (created if absent)."""
        return m.FsWriteResult(**self._call("fs.append", {"path": path, **_content(content)}))

    def list(self, path: str = "/") -> list[m.FsEntry]:
        return m.FsListResult(**self._call("fs.list", {"path": path})).entries

    def stat(self, path: str) -> m.FsStatResult:
        return m.FsStatResult(**self._call("fs.stat", {"path": path}))

    def mkdir(self, path: str, parents: bool = True) -> None:
        self._call("fs.mkdir", {"path": path, "parents": parents})

    def remove(self, path: str, recursive: bool = False) -> int:
        """Remove a file or directory; returns how many files went (their content stays in history)."""
        return m.FsRemoveResult(
            **self._call("fs.remove", {"path": path, "recursive": recursive})
        ).removed

    def rename(self, src: str, dst: str) -> None:
        self._call("fs.rename", {"src": src, "dst": dst})

    def history(self, path: str, limit: int = 50) -> list[m.FsVersion]:
        """The path's versions, newest first."""
        return m.FsHistoryResult(
            **self._call("fs.history", {"path": path, "limit": limit})
        ).versions

    def rollback(
        self, path: str, version: int | None = None, time: float | None = None
    ) -> m.FsWriteResult:
        """Bring back ``version`` (or the content as of Unix ``time``) as the newest version."""
        return m.FsWriteResult(
            **self._call("fs.rollback", _opt(path=path, version=version, time=time))
        )

    def search(self, query: str, k: int = 5) -> list[m.FsHit]:
        """Passages of this process's files closest in meaning to ``query``."""
        return m.FsSearchResult(**self._call("fs.search", {"query": query, "k": k})).hits


def _content(content: str | bytes) -> dict[str, Any]:
    if isinstance(content, str):
        return {"text": content}
    if isinstance(content, bytes | bytearray | memoryview):
        return {"data": bytes(content)}
    raise TypeError(f"file content must be str or bytes, not {type(content).__name__}")


class Memory:
    """The mem.* syscalls on one namespace (the caller's own when ``namespace`` is None)."""

    def __init__(self, call: Any, namespace: str | None = None, own: str | None = None) -> None:
        self._call, self.namespace, self._own = call, namespace, own

    def _args(self, **kw: Any) -> dict[str, Any]:
        return _opt(namespace=self.namespace, **kw)

    # core memory blocks
    def blocks(self) -> dict[str, str]:
        """Every core memory block: label -> text."""
        res = m.BlocksResult(**self._call("mem.block.get", self._args()))
        return {b.label: b.value for b in res.blocks}

    def block(self, label: str) -> str:
        return (
            m.BlocksResult(**self._call("mem.block.get", self._args(label=label))).blocks[0].value
        )

    def set_block(self, label: str, value: str, max_chars: int | None = None) -> m.Block:
        return m.Block(
            **self._call("mem.block.set", self._args(label=label, value=value, max_chars=max_chars))
        )

    def append_block(self, label: str, text: str) -> m.Block:
        return m.Block(**self._call("mem.block.append", self._args(label=label, text=text)))

    def replace_block(self, label: str, old: str, new: str) -> m.Block:
        return m.Block(**self._call("mem.block.replace", self._args(label=label, old=old, new=new)))

    def delete_block(self, label: str) -> None:
        self._call("mem.block.delete", self._args(label=label))

    # recall memory
    def recall(
        self,
        query: str = "",
        k: int = 10,
        since: float | None = None,
        until: float | None = None,
        role: str | None = None,
    ) -> list[m.RecallHit]:
        """Messages this namespace's process has seen, by words (ranked) and time."""
        args = self._args(query=query, k=k, since=since, until=until, role=role)
        return m.RecallSearchResult(**self._call("mem.recall.search", args)).hits

    # archival memory
    def put(self, *texts: str | tuple[str, dict[str, Any]]) -> list[int]:
        """Store entries (text, or (text, metadata)); returns their ids."""
        entries = [
            {"text": t, "metadata": {}} if isinstance(t, str) else {"text": t[0], "metadata": t[1]}
            for t in texts
        ]
        return m.PutResult(**self._call("mem.put", self._args(entries=entries))).ids

    def get(self, *ids: int) -> list[m.StoredEntry]:
        return m.EntriesResult(**self._call("mem.get", self._args(ids=list(ids)))).entries

    def delete(self, *ids: int) -> int:
        return m.DeleteResult(**self._call("mem.delete", self._args(ids=list(ids)))).deleted

    def search(
        self,
        query: str,
        k: int = 5,
        filter: dict[str, Any] | None = None,
        namespaces: list[str] | None = None,
    ) -> list[m.StoredEntry]:
        """The ``k`` entries closest in meaning to ``query`` (best first, with scores)."""
        return self.search_full(query, k, filter, namespaces).hits

    def search_full(
        self,
        query: str,
        k: int = 5,
        filter: dict[str, Any] | None = None,
        namespaces: list[str] | None = None,
    ) -> m.SearchResult:
        """:meth:`search` with the embedding and search times."""
        args = _opt(
            query=query,
            k=k,
            filter=filter or None,
            namespaces=namespaces or ([self.namespace] if self.namespace else None),
        )
        return m.SearchResult(**self._call("mem.search", args))

    # sharing
    def grant(self, pid: int, write: bool = False, program: bool = False) -> None:
        """Let process ``pid`` (or its whole program) read, or read and write, this namespace."""
        ns = self.namespace or self._own
        if ns is None:
            raise SyscallError.of(
                Errno.EINVAL, "name the namespace to grant: memory_of('pid:N') or a name"
            )
        self._call("mem.grant", {"namespace": ns, "pid": pid, "write": write, "program": program})

    def revoke(self, pid: int, program: bool = False) -> None:
        ns = self.namespace or self._own
        if ns is None:
            raise SyscallError.of(Errno.EINVAL, "name the namespace to revoke")
        self._call("mem.revoke", {"namespace": ns, "pid": pid, "program": program})


def _spawn_args(
    name: str,
    system: str | None,
    model: str | None,
    nice: int,
    limits: dict[str, Any] | None,
    program_limits: dict[str, Any] | None,
    **options: Any,
) -> dict[str, Any]:
    """proc.spawn arguments, checked here first so mistakes fail before the round trip.
    ``limits``/``program_limits``: max_output_tokens, max_context_tokens, max_wall_s,
    max_calls_per_min."""
    try:
        args = m.SpawnArgs.model_validate(
            _opt(
                name=name,
                system=system,
                model=model,
                nice=nice,
                limits=limits,
                program_limits=program_limits,
                **options,
            ),
            strict=False,
        )
    except ValidationError as exc:
        raise SyscallError.of(Errno.EINVAL, codec.describe_validation(exc)) from None
    return args.model_dump(exclude_none=True, exclude_defaults=True) | {"name": name}


def _ipc_args(model: type[m.Args], **kw: Any) -> dict[str, Any]:
    """ipc.* arguments, checked here first (types, sizes, topic names) so mistakes fail
    with EINVAL before the round trip. A ``message`` of None is sent: it is JSON null."""
    args = _opt(**kw) | ({"message": kw["message"]} if "message" in kw else {})
    try:
        model.model_validate(args)
    except ValidationError as exc:
        raise SyscallError.of(Errno.EINVAL, codec.describe_validation(exc)) from None
    return args


def _blocking_deadline_ms(timeout: float | None) -> int | None:
    """The deadline for a call that may wait ``timeout`` seconds: long enough for the
    wait to end on its own (never shorter than the default)."""
    if timeout is None:
        return None
    return min(max(limits.DEFAULT_DEADLINE_MS, int((timeout + 1) * 1000)), limits.MAX_DEADLINE_MS)


def _wait_deadline(timeout: float | None) -> int | None:
    """A deadline for a call that blocks up to ``timeout`` seconds: longer than it."""
    return None if timeout is None else int(timeout * 1000) + 5000


def _opt(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def response_format(value: Any) -> dict[str, Any]:
    """llm.generate's ``response_format`` from what the SDK accepts: the dict form as is, a
    pydantic model class as ``{"type": "json_schema", "schema": <its JSON Schema>}``, or
    one of the ABI's format models (``syscalls.models.ChoiceFormat(...)``...)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True)
    if isinstance(value, type) and issubclass(value, BaseModel):
        return {"type": "json_schema", "schema": value.model_json_schema()}
    raise TypeError(
        f"response_format must be a dict (e.g. {{'type': 'json_object'}}) or a pydantic model "
        f"class, not {type(value).__name__}"
    )


def _generate_args(**kw: Any) -> dict[str, Any]:
    """llm.generate's arguments: unset ones left out, response_format in its wire form."""
    if kw.get("response_format") is not None:
        kw["response_format"] = response_format(kw["response_format"])
    return _opt(**kw)


_default: threading.local = threading.local()


def spawn(
    name: str = "agent",
    system: str | None = None,
    model: str | None = None,
    nice: int = 0,
    **options: Any,
) -> Process:
    """Spawn a top-level LLM process from any script, as the kernel's owner (one admin
    connection per thread, made on first use). Use it in a ``with`` block to have it
    killed and reaped at the end::

        with llmos.spawn("helper", system="Be brief.") as p:
            print(p.chat("Hi"))
    """
    client = getattr(_default, "client", None)
    if client is None:
        client = _default.client = Client()
    return client.spawn(name, system=system, model=model, nice=nice, **options)


def connect(endpoint: str | None = None) -> Client:
    """Connect to the running kernel as the admin (the user who started it)."""
    return Client(endpoint)


def this_process(endpoint: str | None = None) -> Process:
    """The LLM process this program was started with (``llmos run`` sets
    ``LLMOS_PID``, ``LLMOS_TOKEN`` and ``LLMOS_ENDPOINT``)."""
    try:
        pid, token = int(os.environ["LLMOS_PID"]), os.environ["LLMOS_TOKEN"]
    except (KeyError, ValueError):
        raise SyscallError.of(
            Errno.EACCES, "this program has no LLM process: run it with `llmos run PROGRAM.py`"
        ) from None
    client = Client(endpoint, pid=pid, token=token)
    return Process(client, pid, token)


# -- asyncio flavour -------------------------------------------------------------------


class AsyncClient:
    """An asyncio connection: many calls in flight on one socket, matched by id."""

    def __init__(self, endpoint: str | None = None, pid: int = 0, token: str | None = None) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        _check_endpoint(self.endpoint)
        self.pid = pid
        self.token = token if token is not None else (admin_token() or "") if pid == 0 else ""
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)
        self._ids = itertools.count(1)
        self._inbox: dict[int, asyncio.Queue[Any]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        # After each awaited frame, read what else is already here (the kernel sends a
        # loop iteration's replies to one socket as one multipart message) with plain
        # non-blocking reads on a shadow of the socket: no future per frame.
        plain = zmq.Socket.shadow(self._sock.underlying)
        inbox = self._inbox
        while True:
            raws = [await self._sock.recv()]
            while len(raws) < _READ_BATCH:
                try:
                    raws.append(plain.recv(_NOBLOCK))
                except zmq.Again:
                    break
            for raw in raws:
                frame = codec.unpackb(raw)
                if isinstance(frame, dict) and (q := inbox.get(frame.get("id"))) is not None:
                    q.put_nowait(frame)

    async def _frames(
        self,
        name: str,
        args: dict[str, Any],
        pid: int | None,
        token: str | None,
        deadline_ms: int | None,
    ) -> AsyncIterator[dict[str, Any]]:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        rid = next(self._ids)
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._inbox[rid] = q
        try:
            await self._sock.send(
                codec.encode_request(
                    rid,
                    name,
                    args,
                    self.pid if pid is None else pid,
                    self.token if token is None else token,
                    deadline_ms,
                )
            )
            async with asyncio.timeout(_deadline_of(args, deadline_ms, name) + GRACE_S):
                while True:
                    frame = await q.get()
                    if "chunk" in frame:
                        yield frame["chunk"]
                        continue
                    yield _final(frame)
                    return
        except TimeoutError:
            raise SyscallError.of(
                Errno.ETIMEDOUT, f"no reply from the kernel at {self.endpoint} for {name}"
            ) from None
        finally:
            self._inbox.pop(rid, None)

    async def call(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        pid: int | None = None,
        token: str | None = None,
        deadline_ms: int | None = None,
    ) -> dict[str, Any]:
        """Make one syscall and return its result, or raise its error."""
        result: dict[str, Any] = {}
        async for frame in self._frames(name, args or {}, pid, token, deadline_ms):
            result = frame
        return result

    def stream(
        self,
        name: str,
        args: dict[str, Any],
        *,
        pid: int | None = None,
        token: str | None = None,
        deadline_ms: int | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Chunks of a streaming syscall, then its final result."""
        return self._frames(name, args, pid, token, deadline_ms)

    async def spawn(
        self,
        name: str,
        system: str | None = None,
        model: str | None = None,
        nice: int = 0,
        limits: dict[str, Any] | None = None,
        program_limits: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncProcess:
        args = _spawn_args(name, system, model, nice, limits, program_limits, **options)
        res = m.SpawnResult(**await self.call("proc.spawn", args))
        return AsyncProcess(self, res.pid, res.token)

    async def info(self) -> m.SysInfoResult:
        return m.SysInfoResult(**await self.call("sys.info"))

    async def stat(self, procs: bool = True) -> m.StatResult:
        """asyncio flavour of :meth:`Client.stat`."""
        return m.StatResult(**await self.call("sys.stat", {} if procs else {"procs": False}))

    async def ps(self, pid: int | None = None) -> list[m.ProcInfo]:
        return m.PsResult(**await self.call("proc.ps", _opt(pid=pid))).procs

    async def kill(self, pid: int, signal: str = "TERM") -> m.KillResult:
        return m.KillResult(**await self.call("proc.kill", {"pid": pid, "signal": signal}))

    async def wait(self, pid: int | None = None, timeout: float | None = None) -> m.WaitResult:
        return m.WaitResult(
            **await self.call(
                "proc.wait", _opt(pid=pid, timeout=timeout), deadline_ms=_wait_deadline(timeout)
            )
        )

    async def send(self, pid: int, message: Any, timeout: float = 0) -> m.SendResult:
        """asyncio flavour of :meth:`Client.send`."""
        args = _ipc_args(m.SendArgs, pid=pid, message=message, timeout=timeout or None)
        return m.SendResult(
            **await self.call("ipc.send", args, deadline_ms=_blocking_deadline_ms(timeout or None))
        )

    async def publish(self, topic: str, message: Any) -> m.PublishResult:
        """asyncio flavour of :meth:`Client.publish`."""
        args = _ipc_args(m.PublishArgs, topic=topic, message=message)
        return m.PublishResult(**await self.call("ipc.publish", args))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._sock.close(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncProcess:
    """The asyncio twin of :class:`Process`."""

    def __init__(self, client: AsyncClient, pid: int, token: str) -> None:
        self.client, self.pid, self.token = client, pid, token
        self.last: m.GenerateResult | None = None

    async def __aenter__(self) -> AsyncProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.reap()

    async def reap(self, timeout: float = 10.0) -> m.WaitResult | None:
        """asyncio flavour of :meth:`Process.reap` (reaped by the client's identity)."""
        try:
            await self.call("proc.kill", {"pid": self.pid, "signal": "KILL"})
        except SyscallError as exc:
            if exc.code not in (Errno.ESRCH, Errno.EACCES):
                raise
        try:
            return await self.client.wait(self.pid, timeout=timeout)
        except SyscallError as exc:
            if exc.code in (Errno.ECHILD, Errno.ESRCH):
                return None
            raise

    async def call(
        self, name: str, args: dict[str, Any] | None = None, **kw: Any
    ) -> dict[str, Any]:
        return await self.client.call(name, args, pid=self.pid, token=self.token, **kw)

    async def generate(
        self,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        deadline_ms: int | None = None,
        **options: Any,
    ) -> m.GenerateResult:
        args = _generate_args(messages=messages, prompt=prompt, **options)
        self.last = m.GenerateResult(
            **await self.call("llm.generate", args, deadline_ms=deadline_ms)
        )
        return self.last

    async def chat(self, text: str, **options: Any) -> str:
        return (await self.generate([{"role": "user", "content": text}], **options)).text

    async def stream(
        self, text: str, deadline_ms: int | None = None, **options: Any
    ) -> AsyncIterator[str]:
        args = _generate_args(messages=[{"role": "user", "content": text}], stream=True, **options)
        async for frame in self.client.stream(
            "llm.generate", args, pid=self.pid, token=self.token, deadline_ms=deadline_ms
        ):
            if "finish_reason" in frame:
                self.last = m.GenerateResult(**frame)
            else:
                yield frame["text"]

    async def context(self, last: int | None = None) -> list[dict[str, str]]:
        return (await self.call("ctx.get", _opt(last=last)))["messages"]

    async def getpid(self) -> m.GetpidResult:
        return m.GetpidResult(**await self.call("proc.getpid"))

    async def kill(self, pid: int | None = None, signal: str = "TERM") -> m.KillResult:
        return m.KillResult(
            **await self.call("proc.kill", {"pid": pid or self.pid, "signal": signal})
        )

    async def wait(self, pid: int | None = None, timeout: float | None = None) -> m.WaitResult:
        return m.WaitResult(
            **await self.call(
                "proc.wait", _opt(pid=pid, timeout=timeout), deadline_ms=_wait_deadline(timeout)
            )
        )

    async def exit(self, status: int = 0) -> None:
        await self.call("proc.exit", {"status": status})

    async def send(self, pid: int, message: Any, timeout: float = 0) -> m.SendResult:
        """asyncio flavour of :meth:`Process.send`."""
        args = _ipc_args(m.SendArgs, pid=pid, message=message, timeout=timeout or None)
        return m.SendResult(
            **await self.call("ipc.send", args, deadline_ms=_blocking_deadline_ms(timeout or None))
        )

    async def recv(
        self, timeout: float | None = None, from_pid: int | None = None, topic: str | None = None
    ) -> m.IpcMessage | None:
        """asyncio flavour of :meth:`Process.recv` (other calls go on while it waits)."""
        return (await self.recv_full(timeout, from_pid, topic)).message

    async def recv_full(
        self, timeout: float | None = None, from_pid: int | None = None, topic: str | None = None
    ) -> m.RecvResult:
        """asyncio flavour of :meth:`Process.recv_full`."""
        args = _ipc_args(m.RecvArgs, timeout=timeout, from_pid=from_pid, topic=topic)
        return m.RecvResult(
            **await self.call("ipc.recv", args, deadline_ms=_blocking_deadline_ms(timeout))
        )

    async def subscribe(self, topic: str) -> m.SubscribeResult:
        """asyncio flavour of :meth:`Process.subscribe`."""
        return m.SubscribeResult(
            **await self.call("ipc.subscribe", _ipc_args(m.TopicArgs, topic=topic))
        )

    async def unsubscribe(self, topic: str) -> m.SubscribeResult:
        """asyncio flavour of :meth:`Process.unsubscribe`."""
        return m.SubscribeResult(
            **await self.call("ipc.unsubscribe", _ipc_args(m.TopicArgs, topic=topic))
        )

    async def publish(self, topic: str, message: Any) -> m.PublishResult:
        """asyncio flavour of :meth:`Process.publish`."""
        args = _ipc_args(m.PublishArgs, topic=topic, message=message)
        return m.PublishResult(**await self.call("ipc.publish", args))


async def aconnect(endpoint: str | None = None) -> AsyncClient:
    """asyncio flavour of :func:`connect`."""
    return AsyncClient(endpoint)
