"""``llmos mcp serve``: llmos as an MCP server (stdio, or ``--http HOST:PORT``), for MCP hosts (IDE agents, desktop
assistants), on the official ``mcp`` SDK's ``MCPServer``.

It acts with the admin's credentials (the runtime dir's admin token) and exposes a
curated set of syscalls, not all of them:

* ``run_task``: spawn a process and run the default agent loop on a task; its answer.
* ``spawn``, ``chat``: a process of this server's, and a turn of conversation with it.
* ``ps``, ``kill``, ``wait``: the process table and signals.
* ``read_file``, ``write_file``: the files of a process this server spawned.

Errors are MCP tool errors (``isError``) whose text starts with the errno (``ESRCH: ...``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from llmos.client import Client, Process, connect
from syscalls.errors import SyscallError

#: Annotations (MCP's hints for hosts): what reads, what changes, what ends things.
READ_ONLY = {"read_only_hint": True, "destructive_hint": False}
CHANGES = {"read_only_hint": False, "destructive_hint": False}
DESTROYS = {"read_only_hint": False, "destructive_hint": True}


def build_server(client: Client) -> Any:
    """The MCPServer whose tools make syscalls through ``client`` (the admin)."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp_types import ToolAnnotations

    from llmos.agent import Agent

    app = MCPServer(
        "llmos", instructions="Run LLM agent processes on an llmos kernel and inspect them."
    )
    mine: dict[int, Process] = {}  # the processes this server spawned (it holds their tokens)

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
        p = syscall(client.spawn, "mcp-task", **({"tools": tools} if tools else {}))
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
        p = syscall(client.spawn, name, system=system, **extra)
        mine[p.pid] = p
        return {"pid": p.pid}

    @app.tool(annotations=ToolAnnotations(**CHANGES))
    def chat(pid: int, message: str, max_tokens: Annotated[int, Field(ge=1)] = 256) -> str:
        """One turn of conversation with a process this server spawned; its reply."""
        return syscall(proc(pid).chat, message, max_tokens=max_tokens)

    @app.tool(annotations=ToolAnnotations(**READ_ONLY))
    def ps() -> dict[str, Any]:
        """The process table: pid, parent, state, name, tokens, of every process."""
        rows = syscall(client.ps)
        return {"procs": [r.model_dump(include={"pid", "ppid", "state", "name"}) for r in rows]}

    @app.tool(annotations=ToolAnnotations(**DESTROYS))
    def kill(pid: int, signal: str = "TERM") -> dict[str, Any]:
        """Send TERM, KILL, STOP or CONT to a process."""
        return syscall(client.kill, pid, signal).model_dump()

    @app.tool(annotations=ToolAnnotations(**CHANGES))
    def wait(pid: int, timeout: Annotated[float, Field(gt=0, le=600)] = 30) -> dict[str, Any]:
        """Wait for a process (a child of init) to exit, and reap it."""
        mine.pop(pid, None)
        return syscall(client.wait, pid, timeout=timeout).model_dump()

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

    return app


def serve(http: str | None = None) -> int:
    """Serve MCP on stdin/stdout until the host closes it, or with ``http`` (HOST:PORT)
    streamable HTTP at ``http://HOST:PORT/mcp`` until interrupted."""
    import anyio

    with connect() as client:
        app = build_server(client)
        if http is None:
            anyio.run(app.run_stdio_async)
            return 0
        host, _, port = http.rpartition(":")
        if not host or not port.isdigit():
            raise SystemExit(f"llmos mcp serve: --http expects HOST:PORT, got {http!r}")
        anyio.run(lambda: app.run_streamable_http_async(host=host, port=int(port)))
    return 0
