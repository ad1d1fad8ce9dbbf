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

Every named method is written once (``llmos/calls.py``): on :class:`Client` and
:class:`Process` it returns its value; on :class:`AsyncClient` and :class:`AsyncProcess`
the same method returns a coroutine (``await p.files.write(...)``). ``Files``, ``Memory``
and ``Tools`` run on the handle that made them, so they are blocking or asyncio with it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

from pydantic import BaseModel

from llmos.calls import (
    Op,
    api,
    blocking_deadline_ms,
    check_args,
    file_content,
    generate_args,
    maybe_await,
    opt,
    parse_result,
    response_format,
    run_async,
    run_sync,
    spawn_args,
    wait_deadline_ms,
)
from llmos.transport import (
    AsyncTransport,
    SyncTransport,
    admin_token,
    check_endpoint,
    resolve_endpoint,
)
from syscalls import models as m
from syscalls.errors import Errno, SyscallError
from syscalls.limits import DEFAULT_GENERATE_DEADLINE_MS

__all__ = [
    "AsyncClient",
    "AsyncProcess",
    "Client",
    "Files",
    "Memory",
    "Process",
    "Tools",
    "aconnect",
    "admin_token",
    "connect",
    "resolve_endpoint",
    "response_format",
    "spawn",
    "this_process",
]

Gen = Generator[Op, Any, Any]


def _ipc_args(**kw: Any) -> dict[str, Any]:
    """ipc.* arguments: a ``message`` of None is sent (it is JSON null), other Nones not."""
    return opt(**kw) | ({"message": kw["message"]} if "message" in kw else {})


# -- the named API, once --------------------------------------------------------------


class _Identity:
    """Something that makes syscalls as one identity (the admin, or a process)."""

    pid: int
    token: str

    def _run(self, step: Any) -> Any:  # pragma: no cover - set by each flavour
        raise NotImplementedError

    @api("ipc.topic.create")
    def create_topic(self, topic: str, allow: list[int] | None = None, others: str = "none") -> Op:
        """Make ``topic`` owned by this identity's program (the admin's, for the admin):
        only its processes, those of the programs in ``allow`` and the admin may publish
        and subscribe; ``others`` ("subscribe" or "publish") opens one of the two to
        every program. Again: changes the rules. ``errors.EBUSY`` if another owns it."""
        return Op("ipc.topic.create", {"topic": topic, "allow": allow or [], "others": others})

    @api("ipc.topic.delete")
    def delete_topic(self, topic: str) -> Op:
        """Remove an owned topic; its subscribers lose it. Returns how many there were."""
        return Op("ipc.topic.delete", {"topic": topic}, then=lambda r: r.subscribers)


class _RunsAPI(_Identity):
    """Detached runs (``llm.generate detach=True``), as whoever may see them: the run's
    process, its ancestors, the admin."""

    last: m.GenerateResult | None = None  # the result a finished stream_run ended with

    @api("llm.run")
    def run_info(self, run: int) -> Op:
        """Run ``run``'s state (queued, running, done, failed, cancelled), chunks made,
        usage, timestamps and error."""
        return Op("llm.run", {"run": run})

    @api("llm.runs")
    def runs(self, pid: int | None = None) -> Op:
        """The runs this identity may see (of process ``pid`` only, if given)."""
        return Op("llm.runs", opt(pid=pid), then=lambda r: r.runs)

    @api("llm.wait")
    def wait_run(self, run: int, timeout: float | None = None, keep: bool = False) -> Op:
        """Wait for run ``run`` to finish; its result (as :meth:`Process.generate` gives)
        or its error (``errors.ECANCELED`` with ``.text``, the text so far, if it was
        cancelled). The run is collected unless ``keep``; a timeout (ETIMEDOUT) leaves it
        running."""
        deadline = wait_deadline_ms(timeout) or DEFAULT_GENERATE_DEADLINE_MS
        return Op("llm.wait", opt(run=run, timeout=timeout, keep=keep or None), deadline)

    @api("llm.collect")
    def collect_run(self, run: int) -> Op:
        """Forget finished run ``run`` (its result and chunks)."""
        return Op("llm.collect", {"run": run}, then=_none)

    @api("llm.cancel")
    def cancel_run(self, run: int) -> Op:
        """End run ``run`` at its next token; its process goes on, its ``wait_run`` gets
        ``errors.ECANCELED`` with the text so far."""
        return Op("llm.cancel", {"run": run})

    def _stream_run_args(self, run: int, from_seq: int) -> dict[str, Any]:
        args = {"run": run, "from_seq": from_seq}
        check_args("llm.stream", args)
        return args

    def _run_frame(self, frame: dict[str, Any]) -> m.RunChunk | None:
        """A run's chunk, or None for its final result (kept in ``last``)."""
        if "finish_reason" in frame:
            self.last = parse_result("llm.stream", frame)  # type: ignore[assignment]
            return None
        return m.RunChunk(**frame)


class _ClientAPI(_RunsAPI):
    """What a connection can do as its own identity (usually the admin)."""

    _process_cls: type[_ProcessAPI]

    @api("proc.spawn")
    def spawn(
        self,
        name: str,
        system: str | None = None,
        model: str | None = None,
        nice: int = 0,
        limits: dict[str, Any] | None = None,
        program_limits: dict[str, Any] | None = None,
        **options: Any,
    ) -> Op:
        """Create an LLM process (a child of this client's process, or of init).
        ``options``: fork, namespace, ctx_policy, ctx_window, tools, confirm, mounts,
        host_pid, redact, redact_model, claim (see proc.spawn)."""
        args = spawn_args(name, system, model, nice, limits, program_limits, **options)
        return Op("proc.spawn", args, then=lambda r: self._process_cls(self, r.pid, r.token))

    @api("tool.list")
    def tools(self) -> Op:
        """Every tool the kernel has (built in and served)."""
        return Op("tool.list", {}, then=lambda r: r.tools)

    @api("tool.register")
    def register_tool(
        self,
        name: str,
        description: str,
        parameters: dict[str, Any] | type[BaseModel] | None,
        server: int,
        irreversible: bool = False,
        scope: str = "global",
    ) -> Op:
        """Register tool ``name`` for every process (``scope="global"``) or for the
        program of process ``server`` (``"program"``); ``server`` receives its calls
        (``Tools.serve``). ``parameters`` is a JSON schema or a pydantic model class."""
        if isinstance(parameters, type) and issubclass(parameters, BaseModel):
            parameters = parameters.model_json_schema()
        args = opt(
            name=name,
            description=description,
            parameters=parameters,
            irreversible=irreversible,
            scope=scope,
            server=server,
        )
        return Op("tool.register", args, then=_none)

    @api("tool.unregister")
    def unregister_tool(self, name: str) -> Op:
        """Remove a served tool of every process; its waiting callers get EIO."""
        return Op("tool.unregister", {"name": name}, then=_none)

    @api("tool.pending")
    def pending(self) -> Op:
        """Calls of irreversible tools waiting for your approval."""
        return Op("tool.pending", {}, then=lambda r: r.calls)

    @api("tool.approve")
    def approve(self, call_id: int) -> Op:
        """Let a parked tool call run."""
        return Op("tool.approve", {"id": call_id}, then=_none)

    @api("tool.deny")
    def deny(self, call_id: int) -> Op:
        """Refuse a parked tool call (its caller gets EPERM)."""
        return Op("tool.deny", {"id": call_id}, then=_none)

    @api("mcp.add")
    def mcp_add(
        self,
        name: str,
        target: str,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Op:
        """Mount an MCP server as ``name`` (the admin): ``target`` is a command line (run
        over stdio, with ``env`` set over its clean environment) or an http(s):// URL
        (sent ``headers``, e.g. ``{"Authorization": "Bearer ..."}``); its tools become
        ``name__TOOL``. Values of ``env`` and ``headers`` are never shown back. Waits up
        to ``timeout`` s for its tool list (EIO if it does not come up)."""
        args = opt(name=name, target=target, timeout_s=timeout, env=env, headers=headers)
        return Op("mcp.add", args, blocking_deadline_ms(timeout))

    @api("mcp.list")
    def mcp_list(self) -> Op:
        """The mounted MCP servers (the admin)."""
        return Op("mcp.list", {}, then=lambda r: r.servers)

    @api("mcp.remove")
    def mcp_remove(self, name: str) -> Op:
        """Unmount MCP server ``name`` (the admin): its tools go."""
        return Op("mcp.remove", {"name": name}, then=_none)

    def memory(self, namespace: str) -> Memory:
        """Memory syscalls on ``namespace`` as the admin (``pid:N``, ``prog:N`` or a name)."""
        return Memory(self, namespace)

    def process(self, pid: int, token: str) -> Any:
        """A handle acting as process ``pid`` (whose token you hold)."""
        return self._process_cls(self, pid, token)

    @api("sys.info")
    def info(self) -> Op:
        """The kernel: version, ABI, uptime, endpoints, models, policy, code sandbox."""
        return Op("sys.info", {})

    @api("sys.audit")
    def audit(
        self,
        pid: int | None = None,
        program: int | None = None,
        since: float | None = None,
        limit: int = 100,
        verify: bool = False,
    ) -> Op:
        """The audit trail (admin only): the newest ``limit`` rows matching the filters,
        and with ``verify`` whether the whole hash chain is intact."""
        args = opt(pid=pid, program=program, since=since, limit=limit, verify=verify or None)
        return Op("sys.audit", args)

    @api("sys.stat")
    def stat(self, procs: bool = True) -> Op:
        """The system state (``sys.stat``): models' slots and queues, process counts per
        state, token rates, host CPU/memory and, unless ``procs=False``, the process rows
        this client may see."""
        return Op("sys.stat", {} if procs else {"procs": False})

    @api("proc.ps")
    def ps(
        self, pid: int | None = None, state: str | None = None, program: int | None = None
    ) -> Gen:
        """The process table (everything, for the admin; ``pid``: one process; ``state``,
        ``program``: only those), fetched a page at a time."""
        return (yield from _all_pages(opt(pid=pid, state=state, program=program)))

    @api("proc.kill")
    def kill(self, pid: int, signal: str = "TERM") -> Op:
        """Send TERM, KILL, STOP or CONT to process ``pid``."""
        return Op("proc.kill", {"pid": pid, "signal": signal})

    @api("proc.wait")
    def wait(self, pid: int | None = None, timeout: float | None = None) -> Op:
        """Wait for a child (of init, for the admin) to exit; reap it."""
        return Op("proc.wait", opt(pid=pid, timeout=timeout), wait_deadline_ms(timeout))

    @api("llm.cancel")
    def cancel(self, pid: int) -> Op:
        """End process ``pid``'s generation at the next token; the process goes on."""
        return Op("llm.cancel", {"pid": pid})

    @api("proc.nice")
    def nice(self, pid: int, nice: int) -> Op:
        """Change process ``pid``'s priority."""
        return Op("proc.nice", {"pid": pid, "nice": nice})

    @api("ipc.send")
    def send(self, pid: int, message: Any, timeout: float = 0) -> Op:
        """Put ``message`` (any JSON value) in process ``pid``'s mailbox as the admin
        (sender 0); see :meth:`Process.send`."""
        args = _ipc_args(pid=pid, message=message, timeout=timeout or None)
        return Op("ipc.send", args, blocking_deadline_ms(timeout or None))

    @api("ipc.publish")
    def publish(self, topic: str, message: Any) -> Op:
        """Publish ``message`` on ``topic`` as the admin; see :meth:`Process.publish`."""
        return Op("ipc.publish", _ipc_args(topic=topic, message=message))


class _ProcessAPI(_RunsAPI):
    """What a process can do: its methods are the syscalls it makes."""

    def __init__(self, client: Any, pid: int, token: str, parent: Any = None) -> None:
        self.client, self.pid, self.token = client, pid, token
        self.parent = parent  # the process that spawned it (None: the client's own identity)
        self.last: m.GenerateResult | None = None  # result of the latest generation

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pid={self.pid})"

    def _run(self, step: Any) -> Any:
        return self.client._run_as(step, self.pid, self.token)

    def call(self, name: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
        """A raw syscall made as this process (its result as a dict)."""
        return self.client.call(name, args, pid=self.pid, token=self.token, **kw)

    @api("proc.kill", "proc.wait")
    def reap(self, timeout: float = 10.0) -> Gen:
        """End this process (KILL, if it still runs) and collect its exit status as its
        spawner; None if it was already reaped."""
        try:
            yield Op("proc.kill", {"pid": self.pid, "signal": "KILL"})
        except SyscallError as exc:
            if exc.code not in (Errno.ESRCH, Errno.EACCES):
                raise
        reaper = self.parent if self.parent is not None else self.client
        try:
            return (
                yield Op(
                    "proc.wait",
                    {"pid": self.pid, "timeout": timeout},
                    wait_deadline_ms(timeout),
                    pid=reaper.pid,
                    token=reaper.token,
                )
            )
        except SyscallError as exc:
            if exc.code in (Errno.ECHILD, Errno.ESRCH):
                return None
            raise

    # llm.*
    @api("llm.generate")
    def generate(
        self,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        deadline_ms: int | None = None,
        **options: Any,
    ) -> Op:
        """Generate from chat ``messages`` (kept in the context) or a raw ``prompt``.
        Options: temperature, top_p, max_tokens, stop, seed, response_format, tools,
        instructions (a system message for this call only, not kept in the context).

        ``response_format`` constrains the text (structured output): a dict such as
        ``{"type": "json_schema", "schema": {...}}``, ``{"type": "json_object"}``,
        ``{"type": "choice", "choices": [...]}``, ``{"type": "regex", "pattern": "..."}``
        or ``{"type": "grammar", "ebnf": "..."}``, or a pydantic model class (its JSON
        Schema), so that ``Model.model_validate_json(result.text)`` works unless the
        output was cut by ``max_tokens`` (``finish_reason == "length"``).

        ``detach=True`` returns at once with the id of a run that goes on in the kernel
        (survives this program and a kernel restart): :meth:`stream_run`,
        :meth:`wait_run`, :meth:`run_info`, :meth:`cancel_run`."""
        args = generate_args(messages=messages, prompt=prompt, **options)
        then = (lambda r: r.run) if options.get("detach") else self._keep_last
        return Op("llm.generate", args, deadline_ms, then=then)

    @api("llm.cancel")
    def cancel(self, pid: int | None = None) -> Op:
        """End the generation this process (or descendant ``pid``) is making, at the next
        token; the process goes on. Its generate call gets ``errors.ECANCELED``."""
        return Op("llm.cancel", opt(pid=pid))

    def _keep_last(self, result: m.GenerateResult) -> m.GenerateResult:
        self.last = result
        return result

    @api("llm.generate")
    def chat(self, text: str, **options: Any) -> Op:
        """Say ``text`` as the user; return the model's answer (both stay in the context)."""
        deadline_ms = options.pop("deadline_ms", None)
        args = generate_args(messages=[{"role": "user", "content": text}], **options)
        return Op("llm.generate", args, deadline_ms, then=lambda r: self._keep_last(r).text)

    def _stream_args(
        self, text: str | None, messages: list[dict[str, str]] | None, options: dict[str, Any]
    ) -> dict[str, Any]:
        if text is not None:
            messages = [*(messages or []), {"role": "user", "content": text}]
        args = generate_args(messages=messages, stream=True, **options)
        check_args("llm.generate", args)
        return args

    def _stream_frame(self, frame: dict[str, Any]) -> str | None:
        """A streamed chunk's text, or None for the final result (kept in ``last``)."""
        if "finish_reason" in frame:
            self.last = parse_result("llm.generate", frame)  # type: ignore[assignment]
            return None
        return frame["text"]

    # ctx.*
    @api("ctx.get")
    def context(self, last: int | None = None) -> Op:
        """The conversation (the last ``last`` messages)."""
        return Op("ctx.get", opt(last=last), then=lambda r: [x.model_dump() for x in r.messages])

    @api("ctx.append")
    def append(self, messages: list[dict[str, str]]) -> Op:
        """Append messages to the context without generating; returns the message count."""
        return Op("ctx.append", {"messages": messages}, then=lambda r: r.total)

    @api("ctx.clear")
    def clear(self, keep_system: bool = True) -> Op:
        """Empty the context (keeping its system prompt unless told not to)."""
        return Op("ctx.clear", {"keep_system": keep_system}, then=lambda r: r.total)

    @api("ctx.get")
    def context_info(self) -> Op:
        """The whole context with its running summary and eviction count."""
        return Op("ctx.get", {})

    @api("ctx.snapshot")
    def snapshot(self, name: str) -> Op:
        """Save a named checkpoint of this process's context."""
        return Op("ctx.snapshot", {"name": name})

    @api("ctx.restore")
    def restore(self, name: str) -> Op:
        """Put the context back to checkpoint ``name``; returns its message count."""
        return Op("ctx.restore", {"name": name}, then=lambda r: r.total)

    @api("ctx.snapshots")
    def snapshots(self) -> Op:
        """This process's context checkpoints."""
        return Op("ctx.snapshots", {}, then=lambda r: r.snapshots)

    # mem.*, tool.*, fs.*
    @property
    def memory(self) -> Memory:
        """This process's own memory namespace (``pid:N``)."""
        return Memory(self, own=f"pid:{self.pid}")

    @property
    def tools(self) -> Tools:
        """Tools this process may call, and tools it serves."""
        return Tools(self)

    @property
    def files(self) -> Files:
        """This process's files: its root, ``/home`` (its program's) and ``/mnt/NAME``."""
        return Files(self)

    def memory_of(self, namespace: str) -> Memory:
        """Another namespace: its program's (``prog:N`` or its name), or one granted to it."""
        return Memory(self, namespace)

    # proc.*
    @api("proc.getpid")
    def getpid(self) -> Op:
        """This process's pid and parent pid."""
        return Op("proc.getpid", {})

    @api("proc.spawn")
    def spawn(
        self,
        name: str,
        system: str | None = None,
        model: str | None = None,
        nice: int = 0,
        limits: dict[str, Any] | None = None,
        program_limits: dict[str, Any] | None = None,
        **options: Any,
    ) -> Op:
        """Spawn a child of this process (``program_limits`` is refused: a child joins its
        parent's program). ``options``: fork (copy this process's context), ctx_policy,
        ctx_window, tools, confirm, mounts, host_pid, redact, redact_model, claim (see proc.spawn)."""
        args = spawn_args(name, system, model, nice, limits, program_limits, **options)
        return Op(
            "proc.spawn",
            args,
            then=lambda r: type(self)(self.client, r.pid, r.token, parent=self),
        )

    def fork(self, name: str, **options: Any) -> Any:
        """A child that starts with a copy of this process's context, like fork()."""
        return self.spawn(name, fork=True, **options)

    @api("proc.ps")
    def ps(self, state: str | None = None) -> Gen:
        """This process and its descendants (``state``: only those), a page at a time."""
        return (yield from _all_pages(opt(state=state)))

    @api("sys.stat")
    def stat(self, procs: bool = True) -> Op:
        """``sys.stat`` as this process: counts and rows cover itself and its descendants."""
        return Op("sys.stat", {} if procs else {"procs": False})

    @api("proc.wait")
    def wait(self, pid: int | None = None, timeout: float | None = None) -> Op:
        """Wait for one of this process's children to exit."""
        return Op("proc.wait", opt(pid=pid, timeout=timeout), wait_deadline_ms(timeout))

    @api("proc.kill")
    def kill(self, pid: int | None = None, signal: str = "TERM") -> Op:
        """Signal this process (default) or one of its descendants."""
        return Op("proc.kill", {"pid": pid or self.pid, "signal": signal})

    @api("proc.nice")
    def nice(self, nice: int, pid: int | None = None) -> Op:
        """Change the priority of this process (or of a descendant)."""
        return Op("proc.nice", opt(pid=pid, nice=nice))

    @api("proc.exit")
    def exit(self, status: int = 0) -> Op:
        """End this process with ``status``; it stays a zombie until its parent waits."""
        return Op("proc.exit", {"status": status}, then=_none)

    # ipc.*
    @api("ipc.send")
    def send(self, pid: int, message: Any, timeout: float = 0) -> Op:
        """Put ``message`` (any JSON value up to 64 KiB as JSON) in the mailbox of process
        ``pid``, which must belong to this process's program (EPERM otherwise; use a
        topic to reach another program). If that mailbox is full: ``errors.EAGAIN`` at
        once, or after waiting up to ``timeout`` seconds for room. ``errors.ESRCH`` if
        ``pid`` has exited, or exits while this waits."""
        args = _ipc_args(pid=pid, message=message, timeout=timeout or None)
        return Op("ipc.send", args, blocking_deadline_ms(timeout or None))

    @api("ipc.recv")
    def recv(
        self, timeout: float | None = None, from_pid: int | None = None, topic: str | None = None
    ) -> Op:
        """The oldest message in this process's mailbox (only from ``from_pid`` / only
        on ``topic``, if given), waiting up to ``timeout`` seconds (0 polls; default:
        the call's 30 s deadline). None if none came. Its payload is ``.body``; ``.sender``,
        ``.topic`` and ``.sent`` say where it came from."""
        args = _ipc_args(timeout=timeout, from_pid=from_pid, topic=topic)
        return Op("ipc.recv", args, blocking_deadline_ms(timeout), then=lambda r: r.message)

    @api("ipc.recv")
    def recv_full(
        self, timeout: float | None = None, from_pid: int | None = None, topic: str | None = None
    ) -> Op:
        """:meth:`recv` with the mailbox's depth after it and its ``dropped`` counter."""
        args = _ipc_args(timeout=timeout, from_pid=from_pid, topic=topic)
        return Op("ipc.recv", args, blocking_deadline_ms(timeout))

    @api("ipc.subscribe")
    def subscribe(self, topic: str) -> Op:
        """Receive the messages published on ``topic`` from now on (in :meth:`recv`)."""
        return Op("ipc.subscribe", {"topic": topic})

    @api("ipc.unsubscribe")
    def unsubscribe(self, topic: str) -> Op:
        """Stop receiving ``topic`` (``errors.ENOENT`` if not subscribed); messages
        already in the mailbox stay."""
        return Op("ipc.unsubscribe", {"topic": topic})

    @api("ipc.publish")
    def publish(self, topic: str, message: Any) -> Op:
        """Put a copy of ``message`` in the mailbox of every process subscribed to
        ``topic`` (any program's). Never blocks: a subscriber whose mailbox is full
        misses it (counted in its ``dropped``). Returns how many got it."""
        return Op("ipc.publish", _ipc_args(topic=topic, message=message))


def _none(_: Any) -> None:
    return None


class _Part:
    """A group of syscalls (files, memory, tools) run on the handle that made it."""

    def __init__(self, owner: _Identity) -> None:
        self._owner = owner

    def _run(self, step: Any) -> Any:
        return self._owner._run(step)


class Tools(_Part):
    """The tool.* syscalls as a process: call tools, and serve tools of its own."""

    @api("tool.list")
    def list(self) -> Op:
        """The tools this process may use, with their argument schemas."""
        return Op("tool.list", {}, then=lambda r: r.tools)

    @api("tool.call")
    def call(self, name: str, args: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Op:
        """Call tool ``name`` and return its JSON result (errors raise SyscallError)."""
        return Op(
            "tool.call",
            {"name": name, "args": args or {}, "timeout_s": timeout_s},
            int(timeout_s * 1000) + 5000,
            then=lambda r: r.result,
        )

    @api("tool.register")
    def register(
        self,
        name: str,
        description: str,
        parameters: dict[str, Any] | type[BaseModel] | None = None,
        irreversible: bool = False,
    ) -> Op:
        """Serve tool ``name`` to the processes of this process's program (another
        program may use the name for its own tool: neither sees the other's calls);
        ``parameters`` is a JSON schema or a pydantic model class."""
        if isinstance(parameters, type) and issubclass(parameters, BaseModel):
            parameters = parameters.model_json_schema()
        args = opt(
            name=name, description=description, parameters=parameters, irreversible=irreversible
        )
        return Op("tool.register", args, then=_none)

    @api("tool.unregister")
    def unregister(self, name: str) -> Op:
        """Stop serving tool ``name``; its waiting callers get EIO."""
        return Op("tool.unregister", {"name": name}, then=_none)

    @api("tool.next")
    def next(self, timeout_s: float = 10.0) -> Op:
        """The next call of a tool this process serves (``id`` None if none came in time)."""
        return Op("tool.next", {"timeout_s": timeout_s}, int(timeout_s * 1000) + 5000)

    @api("tool.reply")
    def reply(self, call_id: int, result: Any = None, error: str | None = None) -> Op:
        """Answer a call: a JSON result, or an error sentence."""
        return Op("tool.reply", opt(id=call_id, result=result, error=error), then=_none)

    @api("tool.next", "tool.reply")
    def serve(self, handlers: dict[str, Any], stop: Any = None, poll_s: float = 1.0) -> Gen:
        """Answer calls with ``handlers[name](**args)`` until ``stop()`` is true (or forever).
        An exception in a handler is sent back as the call's error. Returns calls answered.
        On an asyncio handle, handlers (and ``stop``) may be coroutine functions."""
        answered = 0
        while stop is None or not (yield from maybe_await(stop())):
            req = yield Op("tool.next", {"timeout_s": poll_s}, int(poll_s * 1000) + 5000)
            if req.id is None or req.name is None:
                continue
            error: str | None = None
            try:
                result = yield from maybe_await(handlers[req.name](**req.args))
            except SyscallError as exc:
                error = f"{exc.code}: {exc.message}"
            except Exception as exc:  # the caller gets the error; the server goes on
                error = f"{type(exc).__name__}: {exc}"
            try:
                yield Op(
                    "tool.reply", opt(id=req.id, result=None if error else result, error=error)
                )
            except SyscallError as exc:  # the answer itself was refused (too big, not JSON...)
                if exc.code is not Errno.ENOENT:  # ENOENT: its caller gave up already
                    refused = {"id": req.id, "error": f"{exc.code}: {exc.message}"}
                    try:
                        yield Op("tool.reply", refused)
                    except SyscallError as again:
                        if again.code is not Errno.ENOENT:
                            raise
            answered += 1
        return answered


def _all_pages(args: dict[str, Any]) -> Gen:
    """Every row of ``proc.ps`` with ``args``, following ``next_after`` page by page."""
    rows: list[Any] = []
    after = 0
    while True:
        page = yield Op("proc.ps", {**args, **({"after": after} if after else {})})
        rows.extend(page.procs)
        if page.next_after is None:
            return rows
        after = page.next_after


class Files(_Part):
    """The fs.* syscalls, in the calling process's view of files.

    Paths are inside the process's root (a leading ``/`` is optional): ``notes.txt``,
    ``/home/shared.md`` (the program's home), ``/mnt/data/x.csv`` (a mount given at spawn).
    """

    @api("fs.read")
    def read(self, path: str, offset: int = 0, length: int | None = None) -> Op:
        """The file's content (text, or bytes when it is not UTF-8), up to ``length`` bytes."""
        return Op(
            "fs.read",
            opt(path=path, offset=offset or None, length=length),
            then=lambda r: r.text if r.text is not None else (r.data or b""),
        )

    @api("fs.write")
    def write(self, path: str, content: str | bytes, parents: bool = True) -> Op:
        """Replace the file's content (the old one stays in :meth:`history`)."""
        return Op("fs.write", {"path": path, **file_content(content), "parents": parents})

    @api("fs.append")
    def append(self, path: str, content: str | bytes) -> Op:
        """Append to the file (created if absent)."""
        return Op("fs.append", {"path": path, **file_content(content)})

    @api("fs.list")
    def list(self, path: str = "/") -> Op:
        """A directory's entries."""
        return Op("fs.list", {"path": path}, then=lambda r: r.entries)

    @api("fs.stat")
    def stat(self, path: str) -> Op:
        """A file's or directory's size, type, version and times."""
        return Op("fs.stat", {"path": path})

    @api("fs.mkdir")
    def mkdir(self, path: str, parents: bool = True) -> Op:
        """Make a directory (and its parents)."""
        return Op("fs.mkdir", {"path": path, "parents": parents}, then=_none)

    @api("fs.remove")
    def remove(self, path: str, recursive: bool = False) -> Op:
        """Remove a file or directory; returns how many files went (their content stays in history)."""
        return Op("fs.remove", {"path": path, "recursive": recursive}, then=lambda r: r.removed)

    @api("fs.rename")
    def rename(self, src: str, dst: str) -> Op:
        """Move a file or directory."""
        return Op("fs.rename", {"src": src, "dst": dst}, then=_none)

    @api("fs.history")
    def history(self, path: str, limit: int = 50) -> Op:
        """The path's versions, newest first."""
        return Op("fs.history", {"path": path, "limit": limit}, then=lambda r: r.versions)

    @api("fs.rollback")
    def rollback(self, path: str, version: int | None = None, time: float | None = None) -> Op:
        """Bring back ``version`` (or the content as of Unix ``time``) as the newest version."""
        return Op("fs.rollback", opt(path=path, version=version, time=time))

    @api("fs.search")
    def search(self, query: str, k: int = 5) -> Op:
        """Passages of this process's files closest in meaning to ``query``."""
        return Op("fs.search", {"query": query, "k": k}, then=lambda r: r.hits)


class Memory(_Part):
    """The mem.* syscalls on one namespace (the caller's own when ``namespace`` is None)."""

    def __init__(
        self, owner: _Identity, namespace: str | None = None, own: str | None = None
    ) -> None:
        super().__init__(owner)
        self.namespace, self._own = namespace, own

    def _args(self, **kw: Any) -> dict[str, Any]:
        return opt(namespace=self.namespace, **kw)

    # core memory blocks
    @api("mem.block.get")
    def blocks(self) -> Op:
        """Every core memory block: label -> text."""
        return Op(
            "mem.block.get", self._args(), then=lambda r: {b.label: b.value for b in r.blocks}
        )

    @api("mem.block.get")
    def block(self, label: str) -> Op:
        """One core memory block's text."""
        return Op("mem.block.get", self._args(label=label), then=lambda r: r.blocks[0].value)

    @api("mem.block.set")
    def set_block(self, label: str, value: str, max_chars: int | None = None) -> Op:
        """Create or overwrite a core memory block."""
        return Op("mem.block.set", self._args(label=label, value=value, max_chars=max_chars))

    @api("mem.block.append")
    def append_block(self, label: str, text: str) -> Op:
        """Add a line to a core memory block."""
        return Op("mem.block.append", self._args(label=label, text=text))

    @api("mem.block.replace")
    def replace_block(self, label: str, old: str, new: str) -> Op:
        """Replace every occurrence of ``old`` in a core memory block."""
        return Op("mem.block.replace", self._args(label=label, old=old, new=new))

    @api("mem.block.delete")
    def delete_block(self, label: str) -> Op:
        """Delete a core memory block."""
        return Op("mem.block.delete", self._args(label=label), then=_none)

    # recall memory
    @api("mem.recall.search")
    def recall(
        self,
        query: str = "",
        k: int = 10,
        since: float | None = None,
        until: float | None = None,
        role: str | None = None,
    ) -> Op:
        """Messages this namespace's process has seen, by words (ranked) and time."""
        args = self._args(query=query, k=k, since=since, until=until, role=role)
        return Op("mem.recall.search", args, then=lambda r: r.hits)

    # archival memory
    @api("mem.put")
    def put(self, *texts: str | tuple[str, dict[str, Any]]) -> Op:
        """Store entries (text, or (text, metadata)); returns their ids."""
        entries = [
            {"text": t, "metadata": {}} if isinstance(t, str) else {"text": t[0], "metadata": t[1]}
            for t in texts
        ]
        return Op("mem.put", self._args(entries=entries), then=lambda r: r.ids)

    @api("mem.get")
    def get(self, *ids: int) -> Op:
        """Entries by id (ids not in the namespace are left out)."""
        return Op("mem.get", self._args(ids=list(ids)), then=lambda r: r.entries)

    @api("mem.delete")
    def delete(self, *ids: int) -> Op:
        """Delete entries by id; returns how many went."""
        return Op("mem.delete", self._args(ids=list(ids)), then=lambda r: r.deleted)

    @api("mem.search")
    def search(
        self,
        query: str,
        k: int = 5,
        filter: dict[str, Any] | None = None,
        namespaces: list[str] | None = None,
    ) -> Op:
        """The ``k`` entries closest in meaning to ``query`` (best first, with scores)."""
        return Op(
            "mem.search", self._search_args(query, k, filter, namespaces), then=lambda r: r.hits
        )

    @api("mem.search")
    def search_full(
        self,
        query: str,
        k: int = 5,
        filter: dict[str, Any] | None = None,
        namespaces: list[str] | None = None,
    ) -> Op:
        """:meth:`search` with the embedding and search times."""
        return Op("mem.search", self._search_args(query, k, filter, namespaces))

    def _search_args(
        self, query: str, k: int, filter: dict[str, Any] | None, namespaces: list[str] | None
    ) -> dict[str, Any]:
        return opt(
            query=query,
            k=k,
            filter=filter or None,
            namespaces=namespaces or ([self.namespace] if self.namespace else None),
        )

    # sharing
    @api("mem.grant")
    def grant(self, pid: int, write: bool = False, program: bool = False) -> Op:
        """Let process ``pid`` (or its whole program) read, or read and write, this namespace."""
        ns = self._named("grant")
        return Op(
            "mem.grant",
            {"namespace": ns, "pid": pid, "write": write, "program": program},
            then=_none,
        )

    @api("mem.revoke")
    def revoke(self, pid: int, program: bool = False) -> Op:
        """Take a grant back."""
        ns = self._named("revoke")
        return Op("mem.revoke", {"namespace": ns, "pid": pid, "program": program}, then=_none)

    def _named(self, verb: str) -> str:
        ns = self.namespace or self._own
        if ns is None:
            raise SyscallError.of(
                Errno.EINVAL, f"name the namespace to {verb}: memory_of('pid:N') or a name"
            )
        return ns


# -- the connections ---------------------------------------------------------------------


class _Connection(_ClientAPI):
    """A connection to a kernel as one identity (the admin by default); each flavour
    names its transport and runs steps with its runner."""

    _transport_cls: Any

    def __init__(self, endpoint: str | None = None, pid: int = 0, token: str | None = None) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        check_endpoint(self.endpoint)
        self.pid = pid
        self.token = token if token is not None else (admin_token() or "") if pid == 0 else ""
        self._transport = self._transport_cls(self.endpoint)

    def stream(
        self,
        name: str,
        args: dict[str, Any],
        *,
        pid: int | None = None,
        token: str | None = None,
        deadline_ms: int | None = None,
    ) -> Any:
        """Make a raw streaming syscall: its chunks, then the final result (an iterator,
        or an async iterator on an asyncio connection)."""
        return self._transport.frames(
            name,
            args,
            self.pid if pid is None else pid,
            self.token if token is None else token,
            deadline_ms,
        )

    def _run(self, step: Any) -> Any:
        return self._run_as(step, self.pid, self.token)

    def _run_as(self, step: Any, pid: int, token: str) -> Any:  # pragma: no cover - per flavour
        raise NotImplementedError


def _streams(syscall: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a streaming method (written per flavour: it yields) with the syscall it makes."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__llmos_syscalls__ = (syscall,)  # type: ignore[attr-defined]
        return fn

    return mark


# -- blocking flavour --------------------------------------------------------------------


class Client(_Connection):
    """A synchronous connection to a kernel. Thread-safe: each thread gets its own
    socket, so a call blocking in one thread (a wait, a generation) never delays
    another thread's calls."""

    _transport_cls = SyncTransport

    def call(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        pid: int | None = None,
        token: str | None = None,
        deadline_ms: int | None = None,
    ) -> dict[str, Any]:
        """Make one raw syscall and return its result (a dict), or raise its error."""
        final: dict[str, Any] = {}
        for frame in self.stream(name, args or {}, pid=pid, token=token, deadline_ms=deadline_ms):
            final = frame
        return final

    def _run_as(self, step: Any, pid: int, token: str) -> Any:
        def do(op: Op) -> Any:
            check_args(op.name, op.args)
            raw = self.call(
                op.name,
                op.args,
                pid=pid if op.pid is None else op.pid,
                token=token if op.token is None else op.token,
                deadline_ms=op.deadline_ms,
            )
            return parse_result(op.name, raw)

        return run_sync(step, do)

    def close(self) -> None:
        """Close this connection's sockets."""
        self._transport.close()

    @_streams("llm.stream")
    def stream_run(
        self, run: int, from_seq: int = 0, deadline_ms: int | None = None
    ) -> Iterator[m.RunChunk]:
        """Run ``run``'s chunks from number ``from_seq`` (``.seq``, ``.text``), live until
        it ends; then ``self.last`` holds its result (its error is raised). Reconnect with
        ``from_seq`` = the next chunk wanted: nothing is missed or repeated."""
        args = self._stream_run_args(run, from_seq)
        for frame in self.stream(
            "llm.stream", args, pid=self.pid, token=self.token, deadline_ms=deadline_ms
        ):
            if (chunk := self._run_frame(frame)) is not None:
                yield chunk

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Process(_ProcessAPI):
    """A handle on one LLM process; its methods are the syscalls it makes."""

    client: Client

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reap()

    def stream(
        self,
        text: str | None = None,
        messages: list[dict[str, str]] | None = None,
        deadline_ms: int | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """Like :meth:`chat` but yields text as it is generated; ``self.last`` holds
        the final result afterwards."""
        args = self._stream_args(text, messages, options)
        for frame in self.client.stream(
            "llm.generate", args, pid=self.pid, token=self.token, deadline_ms=deadline_ms
        ):
            if (piece := self._stream_frame(frame)) is not None:
                yield piece

    @_streams("llm.stream")
    def stream_run(
        self, run: int, from_seq: int = 0, deadline_ms: int | None = None
    ) -> Iterator[m.RunChunk]:
        """Run ``run``'s chunks from number ``from_seq`` (``.seq``, ``.text``), live until
        it ends; then ``self.last`` holds its result (its error is raised). Reconnect with
        ``from_seq`` = the next chunk wanted: nothing is missed or repeated."""
        args = self._stream_run_args(run, from_seq)
        for frame in self.client.stream(
            "llm.stream", args, pid=self.pid, token=self.token, deadline_ms=deadline_ms
        ):
            if (chunk := self._run_frame(frame)) is not None:
                yield chunk


Client._process_cls = Process


# -- asyncio flavour ---------------------------------------------------------------------


class AsyncClient(_Connection):
    """An asyncio connection: many calls in flight on one socket, matched by id. Its
    methods are :class:`Client`'s, returning coroutines."""

    _transport_cls = AsyncTransport

    async def call(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        pid: int | None = None,
        token: str | None = None,
        deadline_ms: int | None = None,
    ) -> dict[str, Any]:
        """Make one raw syscall and return its result (a dict), or raise its error."""
        final: dict[str, Any] = {}
        async for frame in self.stream(
            name, args or {}, pid=pid, token=token, deadline_ms=deadline_ms
        ):
            final = frame
        return final

    def _run_as(self, step: Any, pid: int, token: str) -> Any:
        async def do(op: Op) -> Any:
            check_args(op.name, op.args)
            raw = await self.call(
                op.name,
                op.args,
                pid=pid if op.pid is None else op.pid,
                token=token if op.token is None else op.token,
                deadline_ms=op.deadline_ms,
            )
            return parse_result(op.name, raw)

        return run_async(step, do)

    async def close(self) -> None:
        """Close this connection's socket."""
        await self._transport.close()

    @_streams("llm.stream")
    async def stream_run(
        self, run: int, from_seq: int = 0, deadline_ms: int | None = None
    ) -> AsyncIterator[m.RunChunk]:
        """Run ``run``'s chunks from number ``from_seq`` (``.seq``, ``.text``), live until
        it ends; then ``self.last`` holds its result (its error is raised). Reconnect with
        ``from_seq`` = the next chunk wanted: nothing is missed or repeated."""
        args = self._stream_run_args(run, from_seq)
        async for frame in self.stream(
            "llm.stream", args, pid=self.pid, token=self.token, deadline_ms=deadline_ms
        ):
            if (chunk := self._run_frame(frame)) is not None:
                yield chunk

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncProcess(_ProcessAPI):
    """The asyncio twin of :class:`Process`: the same methods, returning coroutines."""

    client: AsyncClient

    async def __aenter__(self) -> AsyncProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.reap()

    async def stream(
        self,
        text: str | None = None,
        messages: list[dict[str, str]] | None = None,
        deadline_ms: int | None = None,
        **options: Any,
    ) -> AsyncIterator[str]:
        """Like :meth:`chat` but yields text as it is generated; ``self.last`` holds
        the final result afterwards."""
        args = self._stream_args(text, messages, options)
        async for frame in self.client.stream(
            "llm.generate", args, pid=self.pid, token=self.token, deadline_ms=deadline_ms
        ):
            if (piece := self._stream_frame(frame)) is not None:
                yield piece

    @_streams("llm.stream")
    async def stream_run(
        self, run: int, from_seq: int = 0, deadline_ms: int | None = None
    ) -> AsyncIterator[m.RunChunk]:
        """Run ``run``'s chunks from number ``from_seq`` (``.seq``, ``.text``), live until
        it ends; then ``self.last`` holds its result (its error is raised). Reconnect with
        ``from_seq`` = the next chunk wanted: nothing is missed or repeated."""
        args = self._stream_run_args(run, from_seq)
        async for frame in self.client.stream(
            "llm.stream", args, pid=self.pid, token=self.token, deadline_ms=deadline_ms
        ):
            if (chunk := self._run_frame(frame)) is not None:
                yield chunk


AsyncClient._process_cls = AsyncProcess


# -- entry points ------------------------------------------------------------------------

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


async def aconnect(endpoint: str | None = None) -> AsyncClient:
    """asyncio flavour of :func:`connect`."""
    return AsyncClient(endpoint)


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
