"""``llmos mcp serve``: llmos as an MCP server (stdio, or ``--http HOST:PORT``), for MCP hosts (IDE agents, desktop
assistants), on the official ``mcp`` SDK's ``MCPServer``.

It acts with the admin's credentials (the runtime dir's admin token), or, given a
gateway key (``--key-file FILE``, ``$LLMOS_MCP_KEY`` or ``--key``; ``llmos keys``), as
that key's program: one top-level process spawned with the key's limits (its program's
quotas), namespace and tool patterns, whose children every process it spawns is; it
then sees, signals and waits for those only. It exposes a curated set of syscalls:

* ``run_task``: spawn a process and run the default agent loop on a task; its answer.
* ``spawn``, ``chat``: a process of this server's, and a turn of conversation with it.
* ``ps``, ``kill``, ``wait``: the process table and signals.
* ``read_file``, ``write_file``, ``search_files``: the files of a process it spawned.
* ``search_memory``: that process's archival memory (by meaning) and recall (by words).

Errors are MCP tool errors (``isError``) whose text starts with the errno (``ESRCH: ...``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from llmos.client import Client, Process, connect
from syscalls.errors import Errno, SyscallError

#: The environment variable holding the gateway key ``llmos mcp serve`` acts with.
KEY_ENV = "LLMOS_MCP_KEY"

#: Annotations (MCP's hints for hosts): what reads, what changes, what ends things.
READ_ONLY = {"read_only_hint": True, "destructive_hint": False}
CHANGES = {"read_only_hint": False, "destructive_hint": False}
DESTROYS = {"read_only_hint": False, "destructive_hint": True}


class Actor:
    """Who the server's tools act as: the admin (``client``), or a key's program
    (``program``, a process spawned by the admin), whose children it spawns and whose
    descendants alone it sees, signals and waits for."""

    def __init__(self, client: Client, program: Process | None = None) -> None:
        self.client, self.program = client, program
        self.on = program if program is not None else client

    def spawn(self, name: str, **options: Any) -> Process:
        return self.on.spawn(name, **options)

    def ps(self) -> list[Any]:
        rows = self.on.ps()
        return [r for r in rows if self.program is None or r.pid != self.program.pid]

    def kill(self, pid: int, signal: str) -> Any:
        return self.on.kill(pid, signal)

    def wait(self, pid: int, timeout: float) -> Any:
        return self.on.wait(pid, timeout=timeout)

    def close(self) -> None:
        """A key's program ends with the server: its processes killed, then reaped."""
        if self.program is None:
            return
        with contextlib.suppress(SyscallError):
            for row in self.client.ps():
                if row.program == self.program.pid and row.pid != self.program.pid:
                    with contextlib.suppress(SyscallError):
                        self.client.kill(row.pid, "KILL")
            self.program.reap()


def key_program(client: Client, key: str) -> Process:
    """Spawn the program of gateway key ``key`` (EACCES if it is unknown or revoked)."""
    from llmos.ctl.keys import KeyStore

    rec = KeyStore().lookup(key.strip())
    if rec is None:
        raise SyscallError.of(Errno.EACCES, "unknown or revoked key (see `llmos keys list`)")
    return client.spawn(
        rec.name,
        program_limits=rec.limits or None,
        namespace=rec.namespace,
        tools=rec.tools,
        host_pid=os.getpid(),  # hung up by the kernel if this server dies
    )


def build_server(client: Client, actor: Actor | None = None) -> Any:
    """The MCPServer whose tools make syscalls through ``client`` (the admin), as
    ``actor`` (the admin itself by default, or a key's program)."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp_types import ToolAnnotations

    from llmos.agent import Agent

    app = MCPServer(
        "llmos", instructions="Run LLM agent processes on an llmos kernel and inspect them."
    )
    mine: dict[int, Process] = {}  # the processes this server spawned (it holds their tokens)
    actor = actor if actor is not None else Actor(client)

    def syscall(fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except SyscallError as exc:
            raise ToolError(f"{exc.code}: {exc.message}") from None

    def proc(pid: int) -> Process:
        if pid not in mine:
            raise ToolError(f"ESRCH: process {pid} was not spawned by this MCP server")
        return mine[pid]

    @app.tool(annotations=ToolAnnotations(**CHANGES))
    def run_task(
        task: Annotated[str, Field(description="what the agent should do")],
        tools: Annotated[
            list[str] | None, Field(description="tool names or patterns it may use")
        ] = None,
        max_steps: Annotated[int, Field(ge=1, le=20)] = 6,
    ) -> dict[str, Any]:
        """Spawn an LLM process and run the default agent loop (ReAct over the kernel's
        tools) on a task; returns its answer, the tool calls it made and why it stopped."""
        p = syscall(actor.spawn, "mcp-task", **({"tools": tools} if tools else {}))
        mine[p.pid] = p
        # Patterns are the process's capabilities; the loop offers every tool they allow.
        result = syscall(Agent(p, max_steps=max_steps).run, task)
        return {
            "pid": p.pid,
            "answer": result.answer,
            "stopped": result.stopped,
            "steps": [
                {"tool": s.tool, "arguments": s.arguments, "result": s.result, "error": s.error}
                for s in result.steps
            ],
        }

    @app.tool(annotations=ToolAnnotations(**CHANGES))
    def spawn(
        name: Annotated[str, Field(min_length=1, max_length=64)],
        system: str | None = None,
        tools: list[str] | None = None,
    ) -> dict[str, Any]:
        """Spawn an LLM process (kept by this server for chat and its files); its pid."""
        extra = {"tools": tools} if tools else {}
        p = syscall(actor.spawn, name, system=system, **extra)
        mine[p.pid] = p
        return {"pid": p.pid}

    @app.tool(annotations=ToolAnnotations(**CHANGES))
    def chat(pid: int, message: str, max_tokens: Annotated[int, Field(ge=1)] = 256) -> str:
        """One turn of conversation with a process this server spawned; its reply."""
        return syscall(proc(pid).chat, message, max_tokens=max_tokens)

    @app.tool(annotations=ToolAnnotations(**READ_ONLY))
    def ps() -> dict[str, Any]:
        """The process table: pid, parent, state, name, of every process this server may
        see (all of them as the admin; a key's program's own as a key)."""
        rows = syscall(actor.ps)
        return {"procs": [r.model_dump(include={"pid", "ppid", "state", "name"}) for r in rows]}

    @app.tool(annotations=ToolAnnotations(**DESTROYS))
    def kill(pid: int, signal: str = "TERM") -> dict[str, Any]:
        """Send TERM, KILL, STOP or CONT to a process."""
        return syscall(actor.kill, pid, signal).model_dump()

    @app.tool(annotations=ToolAnnotations(**CHANGES))
    def wait(pid: int, timeout: Annotated[float, Field(gt=0, le=600)] = 30) -> dict[str, Any]:
        """Wait for a process this server spawned to exit, and reap it."""
        result = syscall(actor.wait, pid, timeout).model_dump()
        mine.pop(pid, None)
        return result

    @app.tool(annotations=ToolAnnotations(**READ_ONLY))
    def read_file(pid: int, path: str) -> str:
        """A text file of a process this server spawned (in its own file view)."""
        data = syscall(proc(pid).files.read, path)
        return data if isinstance(data, str) else f"<{len(data)} bytes, not UTF-8 text>"

    @app.tool(annotations=ToolAnnotations(**CHANGES))
    def write_file(pid: int, path: str, text: str) -> dict[str, Any]:
        """Write a text file of a process this server spawned (the old content is kept in
        the file's history)."""
        syscall(proc(pid).files.write, path, text)
        return {"path": path, "bytes": len(text.encode())}

    @app.tool(annotations=ToolAnnotations(**READ_ONLY))
    def search_files(
        pid: int, query: str, k: Annotated[int, Field(ge=1, le=50)] = 5
    ) -> dict[str, Any]:
        """Passages of a spawned process's files closest in meaning to a query."""
        hits = syscall(proc(pid).files.search, query, k=k)
        return {"hits": [h.model_dump() for h in hits]}

    @app.tool(annotations=ToolAnnotations(**READ_ONLY))
    def search_memory(
        pid: int, query: str, k: Annotated[int, Field(ge=1, le=50)] = 5
    ) -> dict[str, Any]:
        """A spawned process's memory: archival entries closest in meaning to a query, and
        the messages it has seen (recall) that contain its words."""
        memory = proc(pid).memory
        archival = syscall(memory.search, query, k=k)
        recall = syscall(memory.recall, query, k=k)
        return {
            "archival": [h.model_dump() for h in archival],
            "recall": [h.model_dump() for h in recall],
        }

    return app


def read_key(key: str | None, key_file: str | None) -> str | None:
    """The gateway key to act with: ``--key-file``, else ``--key``, else ``$LLMOS_MCP_KEY``."""
    if key_file is not None:
        try:
            return Path(key_file).read_text().strip()
        except OSError as exc:
            raise SyscallError.of(Errno.ENOENT, f"--key-file {key_file}: {exc.strerror}") from None
    return key or os.environ.get(KEY_ENV) or None


def serve(http: str | None = None, key: str | None = None) -> int:
    """Serve MCP on stdin/stdout until the host closes it, or with ``http`` (HOST:PORT)
    streamable HTTP at ``http://HOST:PORT/mcp`` until interrupted; as the admin, or as
    gateway key ``key``'s program."""
    import anyio

    if http is not None:
        host, _, port = http.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SyscallError.of(Errno.EINVAL, f"--http expects HOST:PORT, got {http!r}")
    with connect() as client:
        actor = Actor(client, key_program(client, key) if key else None)
        try:
            app = build_server(client, actor)
            if http is None:
                anyio.run(app.run_stdio_async)
            else:
                anyio.run(lambda: app.run_streamable_http_async(host=host, port=int(port)))
        finally:
            actor.close()
    return 0
