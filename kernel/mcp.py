"""The kernel as an MCP host: Model Context Protocol servers mounted as kernel tools.

Each mounted server (``--mcp NAME=COMMAND|URL``, ``mcp.add``) is one :class:`Mount`
with one supervised session of the official ``mcp`` SDK's :class:`ClientSession`. All
sessions run on one asyncio loop of their own (the ``mcp`` thread), so a slow or
misbehaving server, or the SDK's own parsing, never blocks the kernel's loop; the kernel
only hands calls over (:meth:`McpHost.call`) and takes tool lists back.

* **Transports**: a command line runs as a stdio server, the kernel's child, with a
  clean environment (the SDK's short list: HOME, LOGNAME, PATH, SHELL, TERM, USER; never
  an LLMOS_* variable, token or key) and its stderr in the kernel log, line by line and
  bounded; an ``http(s)://`` URL is a streamable-HTTP server.
* **Supervision**: when a connection ends (the server died, closed, or failed to
  start) its calls in flight get EIO at once, its tools stay listed but answer EIO
  "server restarting", and it is started again with exponential backoff.
* **Tools**: every tool a server lists becomes ``SERVER__TOOL`` (:func:`tool_name`),
  its ``inputSchema`` checked first (:func:`check_schema`: bounded size and depth, a
  valid JSON Schema, local ``$ref``\\ s only, inlined); a refused tool is logged with the
  reason and the server's other tools are kept. ``notifications/tools/list_changed``
  lists them again. A tool counts as irreversible unless its annotations say it is
  read-only and not destructive (annotations are the server's hints: they can only
  make a tool need confirmation, never widen a capability).
* **Results**: structured content if the server gave it, else the text (several text
  items joined), else the content items without their binary data; ``isError`` is EIO
  with the server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import jsonschema

from kernel.tools import Tool, ToolTable
from syscalls import limits
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel
    from kernel.process import Proc

log = logging.getLogger("llmos.mcp")

#: Restart backoff of a server whose connection ended: doubling from MIN to MAX; a
#: connection that lasted STABLE_S starts again from MIN.
RESTART_MIN_S, RESTART_MAX_S, STABLE_S = 0.25, 30.0, 10.0
#: How long a server has to answer ``initialize`` and ``tools/list``.
HANDSHAKE_S = 30.0
#: A server's stderr in the kernel log: each line cut to this, at most this many lines a
#: minute (then one line saying how many were dropped).
STDERR_LINE_CHARS, STDERR_LINES_PER_MIN = 1000, 120
#: What the kernel says of itself to servers.
CLIENT_NAME = "llmos"
#: The most an error message from a server carries.
ERROR_CHARS = 2000


# -- names and schemas --------------------------------------------------------------------


def tool_name(server: str, remote: str, taken: set[str]) -> str:
    """The kernel name of ``server``'s tool ``remote``: ``server__`` then the tool's name
    in lower case with every character outside ``[a-z0-9_]`` made ``_``; if that is over
    64 characters, or already ``taken`` by another of the server's tools, it is cut to
    57 and ends with ``_`` and 6 hex digits of the SHA-1 of the tool's own name."""
    base = f"{server}__{re.sub(r'[^a-z0-9_]', '_', remote.lower())}"
    if len(base) <= 64 and base not in taken:
        return base
    return f"{base[:57]}_{hashlib.sha1(remote.encode()).hexdigest()[:6]}"


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of JSON ``value`` (stops counting past ``limit``)."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


#: Most nodes an inlined schema may have: references fanning out to references grow
#: exponentially, so the expansion stops here instead of taking the process with it.
MAX_INLINED_NODES = 20_000


def shown_target(target: str) -> str:
    """A server's target as logs and errors show it: a URL without its credentials
    (userinfo, query) or a command line's program only (its arguments may hold a key)."""
    if "://" in target:
        url = urllib.parse.urlsplit(target)
        host = url.hostname or ""
        netloc = f"{host}:{url.port}" if url.port else host
        return urllib.parse.urlunsplit((url.scheme, netloc, url.path, "", ""))
    words = target.split()
    return f"{words[0]} …" if len(words) > 1 else target


def _inline_refs(
    node: Any, root: dict[str, Any], seen: tuple[str, ...] = (), budget: list[int] | None = None
) -> Any:
    """``node`` with every local ``$ref`` replaced by what it points to, so the schema
    stands alone inside another (the model's action schema); ValueError for a remote or
    recursive reference, or one that expands past MAX_INLINED_NODES."""
    budget = [MAX_INLINED_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"its $refs expand past {MAX_INLINED_NODES} schema nodes")
    if isinstance(node, list):
        return [_inline_refs(v, root, seen, budget) for v in node]
    if not isinstance(node, dict):
        return node
    for key in ("$ref", "$dynamicRef"):
        ref = node.get(key)
        if ref is None:
            continue
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"{key} {ref!r} is not local (remote references are refused)")
        if ref in seen:
            raise ValueError(f"{key} {ref!r} is recursive")
        target: Any = root
        for part in ref[1:].lstrip("/").split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"{key} {ref!r} points nowhere")
            target = target[part]
        rest = {k: v for k, v in node.items() if k != key}
        resolved = _inline_refs(target, root, (*seen, ref), budget)
        if not rest:
            return resolved
        return {"allOf": [resolved, _inline_refs(rest, root, seen, budget)]}
    return {
        k: _inline_refs(v, root, seen, budget)
        for k, v in node.items()
        if k not in ("$defs", "definitions")
    }


def check_schema(
    schema: Any,
    what: str = "inputSchema",
    max_bytes: int = limits.MAX_MCP_SCHEMA_BYTES,
    max_depth: int = limits.MAX_MCP_SCHEMA_DEPTH,
) -> dict[str, Any]:
    """A tool's argument schema (an MCP server's ``inputSchema``, a served tool's
    ``parameters``: ``what`` names it in errors) made fit for the tool table, or
    ValueError saying why it is refused: over the size or depth limit, not an object
    schema, invalid JSON Schema, or with a remote or recursive ``$ref``."""
    if not isinstance(schema, dict):
        raise ValueError(f"{what} is not an object")
    if _depth(schema, max_depth) > max_depth:  # first: json.dumps recurses
        raise ValueError(f"{what} nests deeper than {max_depth} levels")
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not JSON ({exc})") from None
    if size > max_bytes:
        raise ValueError(f"{what} is {size} bytes (at most {max_bytes})")
    if schema.get("type") != "object":
        raise ValueError(f"{what} must have type 'object'")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise ValueError(f"{what} is not a valid JSON Schema: {exc.message}") from None
    inlined = _inline_refs(schema, schema)
    if len(json.dumps(inlined)) > max_bytes:
        raise ValueError(f"{what} is over the size limit once its $refs are inlined")
    return inlined


def irreversible(annotations: Any) -> bool:
    """Does a tool with these MCP annotations need confirmation? Yes unless the server
    says it is read-only and not destructive (MCP's defaults: not read-only, destructive)."""
    if annotations is None or annotations.read_only_hint is not True:
        return True
    return annotations.destructive_hint is True


def result_value(result: Any) -> Any:
    """An MCP ``CallToolResult`` as a kernel tool result (EIO if it is an error)."""
    texts = [c.text for c in result.content if getattr(c, "type", None) == "text"]
    if result.is_error:
        message = "\n".join(texts) or "the server gave no message"
        raise SyscallError(Errno.EIO, message[:ERROR_CHARS])
    if result.structured_content is not None:
        return result.structured_content
    if len(texts) == len(result.content):
        return "\n".join(texts)
    items = []
    for c in result.content:  # images, audio, resources: what they are, not their bytes
        item = c.model_dump(exclude_none=True, exclude={"data", "blob", "annotations", "meta"})
        if getattr(c, "type", None) == "resource":
            item["resource"] = {
                k: v for k, v in item.get("resource", {}).items() if k not in ("blob",)
            }
        items.append(item)
    return items


def parse_target(target: str) -> tuple[str, list[str]]:
    """``("http", [url])`` or ``("stdio", argv)`` for a mount's target; ValueError if
    it is neither."""
    if re.match(r"https?://", target):
        return "http", [target]
    try:
        argv = shlex.split(target)
    except ValueError as exc:
        raise ValueError(f"cannot parse the command {target!r}: {exc}") from None
    if not argv:
        raise ValueError("the command is empty")
    return "stdio", argv


# -- one mounted server ---------------------------------------------------------------------


@dataclass(eq=False)
class Mount:
    """One mounted MCP server. Written on the mcp loop; the kernel's loop reads it."""

    name: str
    target: str
    transport: str  # "stdio" | "http"
    argv: list[str]
    state: str = "starting"  # starting | ready | restarting
    tools: dict[str, Tool] = field(default_factory=dict)  # kernel name -> tool
    remote: dict[str, str] = field(default_factory=dict)  # kernel name -> server's name
    refused: list[str] = field(default_factory=list)
    restarts: int = 0
    error: str | None = None
    session: Any = None  # the live ClientSession, None between connections
    lost: asyncio.Event | None = None  # set when the live connection ends
    refresh: asyncio.Event | None = None  # set by tools/list_changed
    first: asyncio.Event | None = None  # set when the first connection is up or failed
    task: asyncio.Task[None] | None = None


def _why(exc: BaseException) -> str:
    """One sentence for an exception (the innermost of an exception group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:ERROR_CHARS]


class _StderrLog:
    """A stdio server's stderr: a pipe read on the mcp loop into the kernel log, bounded."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._r, w = os.pipe()
        os.set_blocking(self._r, False)
        self.file: TextIO = os.fdopen(w, "w")
        self._buf = b""
        self._window, self._lines, self._dropped = time.monotonic(), 0, 0
        asyncio.get_running_loop().add_reader(self._r, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self._r, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > STDERR_LINE_CHARS:
            lines.append(self._buf)
            self._buf = b""
        for line in lines:
            self._emit(line.decode(errors="replace")[:STDERR_LINE_CHARS].rstrip())

    def _emit(self, line: str) -> None:
        now = time.monotonic()
        if now - self._window >= 60:
            if self._dropped:
                log.info("mcp %s: stderr: %d lines dropped", self.name, self._dropped)
            self._window, self._lines, self._dropped = now, 0, 0
        if self._lines >= STDERR_LINES_PER_MIN:
            self._dropped += 1
        elif line:
            self._lines += 1
            log.info("mcp %s: stderr: %s", self.name, line)

    def parent_done(self) -> None:
        """The child holds the write end now: close ours, so its exit is our EOF."""
        with contextlib.suppress(OSError):
            self.file.close()

    def close(self) -> None:
        if self._r < 0:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._r)
        with contextlib.suppress(OSError):
            os.close(self._r)
        self._r = -1
        self.parent_done()


# -- the host -------------------------------------------------------------------------------


class McpHost:
    """Every mounted server, supervised on the mcp loop; their tools in ``table``."""

    def __init__(self, table: ToolTable) -> None:
        self.table = table
        self.mounts: dict[str, Mount] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # the mcp thread's
        self._kernel_loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- life (kernel loop) -----------------------------------------------------------
    def start(self) -> None:
        """Start the mcp thread and its loop."""
        self._kernel_loop = asyncio.get_running_loop()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="mcp", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Unmount every server (stdio servers are stopped), then end the mcp thread."""
        if self.loop is None:
            return
        with contextlib.suppress(Exception):
            await self._on_mcp(self._stop_all(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self._thread.join, 5)  # type: ignore[union-attr]
        if not self.loop.is_running():
            self.loop.close()
        self.loop = None

    async def _on_mcp(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coro`` on the mcp loop and await it here; cancelling this cancels it."""
        assert self.loop is not None
        future = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))
        if timeout is None:
            return await future
        async with asyncio.timeout(timeout):
            return await future

    # -- mounting (kernel loop) -----------------------------------------------------
    async def add(self, name: str, target: str, wait_s: float | None = None) -> Mount:
        """Mount ``target`` as ``name``. With ``wait_s``, wait that long for the first
        connection and its tool list: a server that cannot start is unmounted again
        (EIO with why); without, it is retried with backoff until it comes up."""
        if name in self.mounts:
            raise SyscallError(
                Errno.EBUSY, f"an MCP server named {name!r} is mounted; mcp.remove it first"
            )
        if len(self.mounts) >= limits.MAX_MCP_SERVERS:
            raise SyscallError(
                Errno.EDQUOT, f"at most {limits.MAX_MCP_SERVERS} MCP servers are mounted at once"
            )
        try:
            transport, argv = parse_target(target)
        except ValueError as exc:
            raise SyscallError(Errno.EINVAL, str(exc)) from None
        mount = Mount(name, target, transport, argv)
        self.mounts[name] = mount
        await self._on_mcp(self._launch(mount))
        log.info("mcp %s: mounting %s (%s)", name, shown_target(target), transport)
        if wait_s is None:
            return mount
        try:
            await self._on_mcp(mount.first.wait(), timeout=wait_s)  # type: ignore[union-attr]
        except TimeoutError:
            mount.error = f"no tool list within {wait_s:.3g} s"
        if mount.state != "ready":
            why = mount.error or "it did not start"
            await self.remove(name)
            raise SyscallError(
                Errno.EIO, f"MCP server {name!r} ({shown_target(target)}) did not come up: {why}"
            )
        return mount

    async def remove(self, name: str) -> None:
        """Unmount ``name``: its tools go, calls in flight get EIO, a stdio server stops."""
        mount = self.mounts.pop(name, None)
        if mount is None:
            raise SyscallError(Errno.ENOENT, f"no MCP server named {name!r} is mounted")
        self._install(mount, {}, {})
        with contextlib.suppress(Exception):
            await self._on_mcp(self._stop(mount), timeout=10)
        log.info("mcp %s: unmounted", name)

    def _install(self, mount: Mount, tools: dict[str, Tool], remote: dict[str, str]) -> None:
        """Put ``mount``'s tools in the table (the kernel loop: the table's only writer)."""
        for tname in list(mount.tools):
            if self.table.tools.get(tname) is mount.tools[tname]:
                del self.table.tools[tname]
        if self.mounts.get(mount.name) is not mount:  # unmounted meanwhile: nothing goes in
            tools, remote = {}, {}
        kept: dict[str, Tool] = {}
        for tname, tool in tools.items():
            other = self.table.tools.get(tname)
            if other is not None:
                owner = f"MCP server {other.mcp}" if other.mcp else "the kernel or a process"
                mount.refused.append(f"{tname}: the name is taken by {owner}")
                log.warning("mcp %s: tool %s refused: the name is taken", mount.name, tname)
                continue
            self.table.tools[tname] = tool
            kept[tname] = tool
        mount.tools, mount.remote = kept, remote

    # -- calls (kernel loop) ----------------------------------------------------------
    def runner(self, mount: Mount, tname: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        async def run(k: Kernel, proc: Proc, args: dict[str, Any]) -> Any:
            return await self.call(mount, tname, args)

        return run

    async def call(self, mount: Mount, tname: str, args: dict[str, Any]) -> Any:
        """Call ``mount``'s tool ``tname``; the caller's deadline bounds it (cancel)."""
        if mount.session is None:
            raise SyscallError(
                Errno.EIO,
                f"MCP server {mount.name!r} is restarting"
                + (f" (its connection ended: {mount.error})" if mount.error else ""),
            )
        return await self._on_mcp(self._call(mount, mount.remote.get(tname, tname), args))

    # -- the mcp loop -------------------------------------------------------------------
    async def _launch(self, mount: Mount) -> None:
        mount.first, mount.refresh = asyncio.Event(), asyncio.Event()
        mount.task = asyncio.get_running_loop().create_task(
            self._supervise(mount), name=f"mcp {mount.name}"
        )

    async def _stop(self, mount: Mount) -> None:
        if mount.task is not None:
            mount.task.cancel()
            with contextlib.suppress(BaseException):
                await mount.task

    async def _stop_all(self) -> None:
        await asyncio.gather(*(self._stop(m) for m in list(self.mounts.values())))

    async def _supervise(self, mount: Mount) -> None:
        """Keep ``mount`` connected: connect, serve until the connection ends, back off,
        connect again, until the mount is removed (cancelled)."""
        delay = RESTART_MIN_S
        while True:
            began = time.monotonic()
            try:
                await self._connection(mount)
                why = "the server closed the connection"
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # a failing server is logged and restarted, never fatal
                why = _why(exc)
            mount.session, mount.state, mount.error = None, "restarting", why
            if mount.lost is not None:
                mount.lost.set()
            mount.first.set()  # type: ignore[union-attr]
            if time.monotonic() - began > STABLE_S:
                delay = RESTART_MIN_S
            mount.restarts += 1
            log.warning("mcp %s: %s; restarting in %.2g s", mount.name, why, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    @contextlib.asynccontextmanager
    async def _transport(self, mount: Mount) -> AsyncIterator[tuple[Any, Any]]:
        if mount.transport == "http":
            from mcp.client.streamable_http import streamable_http_client

            async with streamable_http_client(mount.argv[0]) as streams:
                yield streams[0], streams[1]
            return
        from mcp.client.stdio import StdioServerParameters, stdio_client

        command, *args = mount.argv
        # env=None: the SDK's clean environment only (get_default_environment()).
        params = StdioServerParameters(command=command, args=args, env=None)
        stderr = _StderrLog(mount.name)
        try:
            async with stdio_client(params, errlog=stderr.file) as streams:
                stderr.parent_done()
                yield streams[0], streams[1]
        finally:
            stderr.parent_done()
            # The server's last words may still be in the pipe: read them, then close.
            asyncio.get_running_loop().call_later(1.0, stderr.close)

    async def _connection(self, mount: Mount) -> None:
        """One connection's life: handshake, tool list, serve; returns when it ends."""
        import anyio
        import mcp_types as types
        from mcp.client.session import ClientSession

        lost = asyncio.Event()
        assert mount.refresh is not None

        async def on_message(message: Any) -> None:
            if isinstance(message, types.ToolListChangedNotification):
                mount.refresh.set()  # type: ignore[union-attr]

        async with self._transport(mount) as (read, write):
            # Relay the server's messages so the end of its stream is seen at once.
            relay_w, relay_r = anyio.create_memory_object_stream[Any](16)

            async def relay() -> None:
                try:
                    async with relay_w:
                        async for message in read:
                            await relay_w.send(message)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream):
                    pass
                finally:
                    lost.set()
                    if mount.lost is lost:  # known at once: its tools answer "restarting"
                        mount.session, mount.state = None, "restarting"

            relay_task = asyncio.get_running_loop().create_task(relay())
            try:
                async with ClientSession(
                    relay_r,
                    write,
                    message_handler=on_message,
                    client_info=types.Implementation(name=CLIENT_NAME, version="0.1.0"),
                ) as session:
                    with anyio.fail_after(HANDSHAKE_S):
                        await session.initialize()
                        await self._list_tools(mount, session)
                    mount.session, mount.lost, mount.state = session, lost, "ready"
                    mount.first.set()  # type: ignore[union-attr]
                    log.info("mcp %s: ready, %d tools", mount.name, len(mount.remote))
                    while not lost.is_set():
                        await _first(lost.wait(), mount.refresh.wait())
                        if mount.refresh.is_set() and not lost.is_set():
                            mount.refresh.clear()
                            with anyio.fail_after(HANDSHAKE_S):
                                await self._list_tools(mount, session)
                            log.info("mcp %s: tool list changed", mount.name)
            finally:
                mount.session = None
                lost.set()
                relay_task.cancel()
                with contextlib.suppress(BaseException):
                    await relay_task

    async def _list_tools(self, mount: Mount, session: Any) -> None:
        """Fetch every page of the server's tools, check them, install the good ones."""
        import mcp_types as types

        listed: list[Any] = []
        cursor = None
        while True:
            page = await session.list_tools(
                params=types.PaginatedRequestParams(cursor=cursor) if cursor else None
            )
            listed.extend(page.tools)
            cursor = page.next_cursor
            if not cursor or len(listed) > limits.MAX_MCP_TOOLS:
                break
        tools: dict[str, Tool] = {}
        remote: dict[str, str] = {}
        refused: list[str] = []
        for t in listed:
            if len(tools) >= limits.MAX_MCP_TOOLS:
                refused.append(f"{t.name}: over {limits.MAX_MCP_TOOLS} tools from one server")
                continue
            tname = tool_name(mount.name, t.name, set(tools))
            try:
                schema = check_schema(t.input_schema)
                description = (t.description or t.title or t.name)[:2000]
                tool = Tool(tname, description, schema, irreversible(t.annotations))
            except (ValueError, RecursionError, jsonschema.exceptions.SchemaError) as exc:
                refused.append(f"{str(t.name)[:100]}: {str(exc)[:300]}")
                log.warning("mcp %s: tool %r refused: %s", mount.name, str(t.name)[:100], exc)
                continue
            tool.mcp = mount.name
            tool.run = self.runner(mount, tname)
            tools[tname], remote[tname] = tool, t.name
        assert self._kernel_loop is not None
        done = asyncio.get_running_loop().create_future()

        def install() -> None:
            mount.refused = refused
            self._install(mount, tools, remote)
            self.loop.call_soon_threadsafe(done.set_result, None)  # type: ignore[union-attr]

        self._kernel_loop.call_soon_threadsafe(install)
        await done

    async def _call(self, mount: Mount, remote: str, args: dict[str, Any]) -> Any:
        session, lost = mount.session, mount.lost
        if session is None or lost is None or lost.is_set():
            raise SyscallError(Errno.EIO, f"MCP server {mount.name!r} is restarting")
        call = asyncio.ensure_future(session.call_tool(remote, args))
        watch = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({call, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not call.done():
                call.cancel()
        exc = None if not call.done() or call.cancelled() else call.exception()
        if not call.done() or call.cancelled() or (exc is not None and lost.is_set()):
            raise SyscallError(
                Errno.EIO,
                f"MCP server {mount.name!r} went away during the call of {remote!r}; "
                "it is restarting",
            )
        if exc is not None:
            if isinstance(exc, SyscallError):
                raise exc
            raise SyscallError(Errno.EIO, f"MCP server {mount.name!r}: {_why(exc)}")
        return result_value(call.result())


async def _first(*aws: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of ``aws`` is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def python_command(module: str, *args: str) -> str:
    """A stdio command line running ``module`` with this interpreter (tests, docs)."""
    return shlex.join([sys.executable, "-m", module, *args])
