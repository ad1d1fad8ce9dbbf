"""``llmos gateway``: an OpenAI-compatible HTTP face on the kernel.

A user-space daemon and a privileged client of the kernel (the admin, over the SDK's
``AsyncClient``): FastAPI on uvicorn, SSE by sse-starlette, no model logic. Every request
becomes syscalls:

* an API key (``llmos keys``) is a program: its first request spawns the program's
  top-level process (the key's limits as ``program_limits``, its namespace and tools);
* a request runs in a *turn*, a child process of that program: stateless requests spawn
  a fresh child with the whole conversation and reap it afterwards; a request with a
  session id (``X-Llmos-Session`` or the body's ``user``) forks the session's persistent
  process (a copy of its context), sends only the messages the context lacks, and on
  success appends them and the answer to the session's context. Either way a client that
  leaves mid-stream is answered by killing the turn: the kernel aborts its generation
  and frees the slot, and the session's context is left as it was (the shell's Ctrl-C);
* OpenAI function tools become a JSON-schema ``response_format`` of one call or an
  answer (kernel/toolcall.py's ``action_schema``, ``tool_guide``, ``parse_action`` over
  the request's functions): the kernel's ``tools=`` names tools it serves itself, while
  an OpenAI client runs its functions on its own side and only needs the call back.

OpenAI's wire format (bodies, errors, the mapping onto ``llm.generate``) is in
llmos/ctl/openai_wire.py; this module holds the state (programs, sessions, turns), the
endpoints and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse

from kernel.daemon import running_pid
from kernel.toolcall import parse_action
from llmos.client import AsyncClient, AsyncProcess
from llmos.ctl.keys import KeyRecord, KeyStore
from llmos.ctl.openai_wire import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    ResponsesRequest,
    emptied,
    from_syscall,
    generate_options,
    kernel_messages,
    new_messages,
    now,
    openai_finish,
    read_json,
    response_format,
    tool_message,
    tool_plan,
    usage_json,
)
from syscalls import limits, paths
from syscalls.errors import Errno, SyscallError

MAX_SESSIONS_PER_KEY = 256  # persistent processes a key may hold; the least recent is reaped
MAX_CHAINED_RESPONSES = 65536  # previous_response_id -> session entries kept
MAX_WAITING_PER_SESSION = 16  # requests queued behind a session's running turn; more: 409
QUEUE_WAIT_S = 600.0  # the longest a queued turn waits without an X-Llmos-Timeout (504)
SETTLE_S = 5.0  # how long a cancelled session turn may take to let go of its process
SESSION_HEADER = "x-llmos-session"
PRIORITY_HEADER = "x-llmos-priority"  # nice, key's nice..19: a request may only lower its priority
TIMEOUT_HEADER = "x-llmos-timeout"  # seconds: the generation's deadline (504 past it)


# -- the gateway's state ----------------------------------------------------------------


SessionKey = tuple[str, str, str]  # (session id, kernel model, system prompt)


@dataclass
class Session:
    """A persistent process of a key's program; its turns run on it one at a time, in
    the order they arrived (``lock`` is FIFO), at most MAX_WAITING_PER_SESSION waiting."""

    proc: AsyncProcess
    key: SessionKey
    nice: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0

    def idle(self) -> bool:
        return not self.lock.locked() and self.waiting == 0


@dataclass
class Turn:
    """One request's process: a fresh child (stateless, reaped afterwards) or a session's
    own process (held through ``session.lock``)."""

    proc: AsyncProcess
    session: Session | None
    new: list[dict[str, str]]  # the turns to send (what the session's context lacks)


class Metrics:
    """The gateway's Prometheus series, on a registry of its own (no global state)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "llmos_gateway_requests", "HTTP requests", ["endpoint", "model", "status"], registry=r
        )
        self.latency = Histogram(
            "llmos_gateway_request_seconds",
            "request latency (to the last byte)",
            ["endpoint", "model"],
            registry=r,
        )
        self.ttft = Histogram(
            "llmos_gateway_ttft_seconds", "time to first token", ["model"], registry=r
        )
        self.tokens = Counter("llmos_gateway_tokens", "tokens", ["model", "direction"], registry=r)
        self.slots_busy = Gauge("llmos_model_slots_busy", "slots generating", ["model"], registry=r)
        self.slots = Gauge("llmos_model_slots", "slots", ["model"], registry=r)
        self.queued = Gauge("llmos_model_queue_length", "processes waiting", ["model"], registry=r)


class Gateway:
    """The kernel side of the HTTP face: one admin connection, the keys' programs and
    sessions, metrics."""

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | None = None,
        keys: KeyStore | None = None,
        runtime_dir: Path | None = None,
    ) -> None:
        self.endpoint, self.token = endpoint, token
        self.keys = keys if keys is not None else KeyStore()
        self.runtime_dir = runtime_dir if runtime_dir is not None else paths.runtime_dir()
        self.admin: AsyncClient | None = None
        self.programs: dict[str, AsyncProcess] = {}
        self.sessions: dict[str, OrderedDict[SessionKey, Session]] = {}
        self.chains: OrderedDict[tuple[str, str], SessionKey] = OrderedDict()  # response -> it
        self._spawning = asyncio.Lock()  # concurrent first requests make one program/session
        self._reaping: set[asyncio.Task[None]] = set()  # stateless turns being reaped
        self.metrics = Metrics()
        self._models: dict[str, int] = {}  # kernel model -> context window
        self._default_model: str | None = None

    async def start(self) -> None:
        self.admin = AsyncClient(self.endpoint, pid=0, token=self.token)
        with contextlib.suppress(ApiError, SyscallError):  # a kernel down now is a 503 later
            await self.models()

    async def close(self) -> None:
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)
        if self.admin is not None:
            for key in list(self.programs):
                await self._forget(key)
            await self.admin.close()

    def kernel_alive(self) -> bool:
        return running_pid(self.runtime_dir) is not None

    def _client(self) -> AsyncClient:
        if self.admin is None or not self.kernel_alive():
            raise ApiError(503, "the llmos kernel is not running", "service_unavailable")
        return self.admin

    # -- keys and models

    def authenticate(self, request: Request) -> KeyRecord:
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        rec = self.keys.lookup(key.strip()) if scheme.lower() == "bearer" and key else None
        if rec is None:
            raise ApiError(
                401,
                "missing, unknown or revoked API key",
                "invalid_request_error",
                "invalid_api_key",
            )
        return rec

    async def models(self, refresh: bool = False) -> dict[str, int]:
        if refresh or not self._models:
            info = await self._client().info()
            self._models = {mod.name: mod.max_context for mod in info.models}
            self._default_model = next(
                (mod.name for mod in info.models if mod.default), info.models[0].name
            )
        return self._models

    def remember(self, key: str, response_id: str, skey: SessionKey) -> None:
        """``response_id`` continues the session ``skey`` (previous_response_id); bounded."""
        self.chains[(key, response_id)] = skey
        while len(self.chains) > MAX_CHAINED_RESPONSES:
            self.chains.popitem(last=False)

    def model_label(self, rec: KeyRecord, name: str) -> str:
        """A metrics label: a name the client invents is not a new series (bounded labels)."""
        return name if name in self._models or name in rec.agents else "unknown"

    async def resolve_model(self, rec: KeyRecord, name: str) -> tuple[str, str | None]:
        """(kernel model, system prompt) for a model name: a kernel model or a key's agent."""
        if name in rec.agents:
            await self.models()
            return self._default_model or "", rec.agents[name]
        if name in await self.models() or name in await self.models(refresh=True):
            return name, None
        raise ApiError(
            404,
            f"the model {name!r} does not exist",
            "invalid_request_error",
            "model_not_found",
            "model",
        )

    # -- programs, sessions, turns

    async def program(self, rec: KeyRecord) -> AsyncProcess:
        """The key's program: its top-level process, made on first use."""
        proc = self.programs.get(rec.name)
        if proc is not None:
            return proc
        async with self._spawning:
            return self.programs.get(rec.name) or await self._spawn_program(rec)

    async def _spawn_program(self, rec: KeyRecord) -> AsyncProcess:
        proc = await self._client().spawn(
            rec.name,
            program_limits=rec.limits or None,
            namespace=rec.namespace,
            tools=rec.tools,
            host_pid=os.getpid(),  # hung up by the kernel if the gateway dies
        )
        self.programs[rec.name] = proc
        return proc

    async def _forget(self, key: str) -> None:
        """Drop a key's program (after a kernel restart, or at close), reaping what is left."""
        self.sessions.pop(key, None)
        proc = self.programs.pop(key, None)
        if proc is not None:
            with contextlib.suppress(SyscallError):
                for row in await self._client().ps():
                    if row.program == proc.pid and row.state != "ZOMBIE":
                        with contextlib.suppress(SyscallError):
                            await self.admin.kill(row.pid, "KILL")  # type: ignore[union-attr]
                await proc.reap()

    async def session(self, rec: KeyRecord, skey: SessionKey, create: bool = True) -> Session:
        """The session ``skey`` of the key's program, made on first use unless ``create`` is
        false (a ``previous_response_id`` names one that must exist: else 404). Past
        MAX_SESSIONS_PER_KEY the least recently used idle session is reaped."""
        table = self.sessions.setdefault(rec.name, OrderedDict())
        if skey not in table:
            if not create:
                raise _session_gone()
            prog = await self.program(rec)
            async with self._spawning:
                if skey not in table:
                    idle = [k for k, sess in table.items() if sess.idle()]
                    if len(table) >= MAX_SESSIONS_PER_KEY and not idle:
                        raise ApiError(
                            429,
                            f"this key has {len(table)} sessions, all busy; wait for one to finish",
                            "rate_limit_error",
                            "too_many_sessions",
                        )
                    for old in idle[: max(len(table) + 1 - MAX_SESSIONS_PER_KEY, 0)]:
                        await self._drop_session(rec.name, old)
                    sid, model, system = skey
                    proc = await prog.spawn(
                        "session", system=system or None, model=model, nice=rec.nice,
                        tools=rec.tools,
                    )  # fmt: skip
                    table[skey] = Session(proc, skey, rec.nice)
        table.move_to_end(skey)
        return table[skey]

    async def open_turn(
        self,
        rec: KeyRecord,
        sid: str | None,
        model: str,
        system: str | None,
        sent: list[dict[str, str]],
        nice: int,
        request: Request | None = None,
        deadline_ms: int | None = None,
        chained: bool = False,
    ) -> Turn:
        """The process this request runs in: a fresh child of the key's program
        (stateless), or the session's own process once the turns queued before it are
        done. A process of ours that is gone (killed by the operator, or a kernel restart
        that forgot it) is made again: first the session's, then the whole program's; a
        ``chained`` session (a ``previous_response_id``) that is gone is a 404."""
        skey = (sid, model, system or "") if sid is not None else None
        for attempt in (0, 1, 2):
            try:
                if skey is None:
                    prog = await self.program(rec)
                    proc = await prog.spawn(
                        "chat", system=system, model=model, nice=nice, tools=rec.tools
                    )
                    return Turn(proc, None, sent)
                sess = await self.session(rec, skey, create=not chained)
                await self._enter(sess, request, deadline_ms)
                try:
                    context = await sess.proc.context()
                    if nice != sess.nice:
                        await self._client().nice(sess.proc.pid, nice)
                        sess.nice = nice
                except BaseException:
                    sess.lock.release()
                    raise
                return Turn(sess.proc, sess, new_messages(context, sent))
            except SyscallError as exc:
                if attempt == 2 or exc.code not in (Errno.ESRCH, Errno.EACCES, Errno.EPERM):
                    raise
                if skey is not None:
                    await self._drop_session(rec.name, skey)
                    if chained:
                        raise _session_gone() from None
                if attempt == 1 or skey is None:
                    await self._forget(rec.name)
        raise AssertionError("unreachable")

    async def _enter(self, sess: Session, request: Request | None, deadline_ms: int | None) -> None:
        """Take the session's turn, after those queued before it (FIFO). Refused with
        409 when MAX_WAITING_PER_SESSION wait already; 504 past the request's deadline; a
        client that leaves while waiting leaves the queue."""
        if sess.lock.locked() and sess.waiting >= MAX_WAITING_PER_SESSION:
            raise ApiError(
                409,
                f"the session {sess.key[0]!r} is busy: {sess.waiting} requests wait for it "
                "already; its turns run one at a time, in order",
                "invalid_request_error",
                "session_busy",
            )
        if not sess.lock.locked():
            await sess.lock.acquire()  # free: no task, no wait
            return
        sess.waiting += 1
        acquire = asyncio.ensure_future(sess.lock.acquire())
        gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
        wait = QUEUE_WAIT_S if deadline_ms is None else deadline_ms / 1000
        try:
            await asyncio.wait(
                {acquire, *([gone] if gone else [])},
                timeout=wait,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            sess.waiting -= 1
            if gone is not None:
                gone.cancel()
            if not acquire.done() or acquire.cancelled() or acquire.exception() is not None:
                acquire.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acquire
                if acquire.done() and not acquire.cancelled():
                    sess.lock.release()  # taken just as we gave up: pass it on
                acquired = False
            else:
                acquired = True
        if not acquired:
            if gone is not None and gone.done() and not gone.cancelled():
                raise ApiError(499, "the client closed the request", "client_closed_request")
            raise ApiError(
                504, f"waited {wait:g} s for the session's earlier turns", "timeout_error"
            )

    async def _drop_session(self, key: str, skey: SessionKey) -> None:
        sess = self.sessions.get(key, OrderedDict()).pop(skey, None)
        if sess is not None:
            with contextlib.suppress(SyscallError):
                await sess.proc.reap()

    def finish(self, turn: Turn) -> None:
        """End a turn whose answer is complete: a session's next turn goes in now; a
        stateless turn's process is reaped in the background (the response does not wait
        for the reap's round trips; ``close`` waits for what is left)."""
        if turn.session is not None:
            turn.session.lock.release()
            return
        task = asyncio.get_running_loop().create_task(self.close_turn(turn))
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def close_turn(self, turn: Turn) -> None:
        """End the turn: reap a stateless turn's process; let a session's next turn in (its
        context has this turn already if it succeeded: the kernel commits it)."""
        with anyio.CancelScope(shield=True):  # runs even as a disconnected stream is cancelled
            try:
                if turn.session is None:
                    with contextlib.suppress(SyscallError):
                        await turn.proc.reap()
            finally:
                if turn.session is not None:
                    turn.session.lock.release()

    async def abandon(self, turn: Turn) -> None:
        """The client left mid-turn: free the slot now. A stateless turn's process is
        reaped (killed); a session's generation is ended with ``llm.cancel`` (the process
        and its context stay; the half turn is not kept), and the next queued turn goes in
        once the kernel has let go of the process."""
        with anyio.CancelScope(shield=True):
            sess = turn.session
            if sess is not None:
                try:
                    await self._client().cancel(turn.proc.pid)
                    await self._settle(turn.proc.pid)
                except (ApiError, SyscallError, TimeoutError):
                    for key, table in self.sessions.items():
                        if table.get(sess.key) is sess:
                            await self._drop_session(key, sess.key)  # not trusted again
            await self.close_turn(turn)

    async def _settle(self, pid: int) -> None:
        """Wait until process ``pid`` is no longer generating (a cancelled call's handler
        gives its slot back within a step; TimeoutError past SETTLE_S)."""
        with anyio.fail_after(SETTLE_S):
            delay = 0.001
            while True:
                (row,) = await self._client().ps(pid)
                if row.state not in ("READY", "RUNNING"):
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)


def _session_gone() -> ApiError:
    return ApiError(
        404,
        "the response to continue is unknown, expired, or its session has ended",
        "invalid_request_error",
        "previous_response_not_found",
        "previous_response_id",
    )


# -- the app ----------------------------------------------------------------------------


def create_app(gw: Gateway) -> FastAPI:
    """The FastAPI app serving ``gw``."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        yield
        await gw.close()

    app = FastAPI(title="llmos gateway", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(SyscallError)
    async def _sys_error(_: Request, exc: SyscallError) -> JSONResponse:
        if not gw.kernel_alive():
            return ApiError(
                503, "the llmos kernel is not running", "service_unavailable"
            ).response()
        return from_syscall(exc).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            info = await gw._client().info()
        except (ApiError, SyscallError) as exc:
            return JSONResponse({"status": "down", "error": str(exc)}, status_code=503)
        return JSONResponse(
            {
                "status": "ok",
                "kernel_pid": info.kernel_pid,
                "models": {mod.name: mod.state for mod in info.models},
            }
        )

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        with contextlib.suppress(ApiError, SyscallError):
            stat = await gw._client().stat(procs=False)
            for mod in stat.models:
                gw.metrics.slots.labels(mod.name).set(mod.slots)
                gw.metrics.slots_busy.labels(mod.name).set(mod.busy)
                gw.metrics.queued.labels(mod.name).set(mod.queued)
        return PlainTextResponse(
            generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        rec = gw.authenticate(request)
        names = [*await gw.models(refresh=True), *rec.agents]
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "llmos"} for n in names]
        return JSONResponse({"object": "list", "data": data})

    async def observed(request: Request, endpoint: str, model: str, stream: bool, run: Any) -> Any:
        """Run an endpoint's work, counting it by status (a stream's latency is taken when
        its last event is sent)."""
        t0, status = time.monotonic(), 200
        try:
            return await run(t0)
        except ApiError as exc:
            status = exc.status
            raise
        except SyscallError as exc:
            status = 503 if not gw.kernel_alive() else from_syscall(exc).status
            raise
        finally:
            gw.metrics.requests.labels(endpoint, model, str(status)).inc()
            if not stream or status != 200:
                gw.metrics.latency.labels(endpoint, model).observe(time.monotonic() - t0)

    def count_tokens(model: str, usage: Any) -> None:
        gw.metrics.tokens.labels(model, "in").inc(usage.prompt_tokens)
        gw.metrics.tokens.labels(model, "out").inc(usage.output_tokens)

    async def sse(
        turn: Turn,
        gen: dict[str, Any],
        deadline_ms: int | None,
        endpoint: str,
        model: str,
        t0: float,
        head: list[dict[str, Any]],
        on_piece: Any,
        on_end: Any,
        typed: bool = False,
    ) -> EventSourceResponse:
        """Stream a turn's generation as SSE: ``head`` events, ``on_piece(text)`` per
        piece (None: nothing to send), ``on_end(result)`` events, then ``[DONE]`` (or,
        ``typed``, as the Responses API streams: each event named by its ``type``, no
        ``[DONE]``). The first piece is awaited before the response starts, so a refusal
        (quota, bad format) is still an HTTP error; a client that leaves has its turn
        abandoned (Gateway.abandon; shielded cleanup)."""
        pieces = turn.proc.stream(deadline_ms=deadline_ms, **gen).__aiter__()
        try:
            first = await anext(pieces, None)
        except SyscallError:
            await gw.close_turn(turn)
            raise
        except BaseException:
            await gw.abandon(turn)
            raise
        gw.metrics.ttft.labels(model).observe(time.monotonic() - t0)

        def ev(body: dict[str, Any] | bytes) -> bytes:
            """One SSE event, encoded (pre-encoded bodies pass as they are)."""
            data = body if isinstance(body, bytes) else orjson.dumps(body)
            if typed and not isinstance(body, bytes):
                return b"event: " + body["type"].encode() + b"\ndata: " + data + b"\n\n"
            return b"data: " + data + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            # Each kernel chunk is one socket write; the head goes with the first piece
            # and the closing events with [DONE] (fewer writes, fewer wakeups).
            text: list[str] = []
            ended = False  # the kernel has answered the call (done, or failed)
            closed = False
            try:
                out = [ev(body) for body in head]
                piece = first
                while piece is not None:
                    text.append(piece)
                    if piece and (body := on_piece(piece)) is not None:
                        out.append(ev(body))
                    if out:
                        yield b"".join(out)
                        out = []
                    try:
                        piece = await anext(pieces, None)
                    except SyscallError:
                        ended = True
                        raise
                ended = True
                last = turn.proc.last
                assert last is not None
                out += [ev(body) for body in on_end(last)]
                if not typed:
                    out.append(b"data: [DONE]\n\n")
                # The session lets go now; a stateless turn is reaped behind the answer,
                # off the request's critical path (the stream ends without waiting for it).
                closed = True
                gw.finish(turn)
                count_tokens(model, last.usage)
                yield b"".join(out)
            except SyscallError as exc:  # mid-stream: the status is sent, so an error event
                err = from_syscall(exc)
                body = {"error": {"message": err.message, "type": err.type, "code": err.code}}
                yield b"".join([*out, b"data: " + orjson.dumps(body) + b"\n\n"])
            finally:
                with anyio.CancelScope(shield=True):
                    with contextlib.suppress(BaseException):
                        await pieces.aclose()  # type: ignore[attr-defined]
                    if not ended:  # the client left mid-stream
                        await gw.abandon(turn)
                    elif not closed:
                        await gw.close_turn(turn)
                gw.metrics.latency.labels(endpoint, model).observe(time.monotonic() - t0)

        return EventSourceResponse(events(), ping=15, sep="\n")

    async def generate(
        request: Request, turn: Turn, gen: dict[str, Any], deadline_ms: int | None
    ) -> Any:
        """A whole (unstreamed) generation; a client that leaves first has its turn
        abandoned (the slot is freed) instead of its answer made for no one."""
        call = asyncio.ensure_future(turn.proc.generate(deadline_ms=deadline_ms, **gen))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({call, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                raise ApiError(499, "the client closed the request", "client_closed_request")
            return call.result()
        finally:
            gone.cancel()
            if not call.done():  # the client left (or we are cancelled): end the generation
                await gw.abandon(turn)
            elif call.cancelled() or call.exception() is not None:
                await gw.close_turn(turn)
            else:
                gw.finish(turn)
            call.cancel()
            with contextlib.suppress(BaseException):
                await call

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        rec = gw.authenticate(request)
        req: ChatRequest = await read_json(request, ChatRequest)
        return await observed(
            request,
            "chat.completions",
            gw.model_label(rec, req.model),
            req.stream,
            lambda t0: _chat(request, rec, req, t0),
        )

    async def _chat(request: Request, rec: KeyRecord, req: ChatRequest, t0: float) -> Any:
        if req.tools and req.response_format and req.tool_choice != "none":
            raise ApiError(400, "response_format: not with tools", param="response_format")
        opts = generate_options(req)
        plan = tool_plan(req)
        fmt = plan.response_format if plan else response_format(req)
        if fmt is not None:
            opts["response_format"] = fmt
        nice = _nice(request, rec)
        deadline_ms = _deadline_ms(request.headers.get(TIMEOUT_HEADER))
        sent = kernel_messages(req.messages)
        model, system = await gw.resolve_model(rec, req.model)
        sid = request.headers.get(SESSION_HEADER) or req.user
        if sid is not None and len(sid) > 256:
            raise ApiError(400, f"{SESSION_HEADER}: over 256 characters", param=SESSION_HEADER)
        turn = await gw.open_turn(rec, sid, model, system, sent, nice, request, deadline_ms)
        opts["messages"] = list(turn.new)
        if plan is not None:  # the guide is for this step only: never kept in a session
            opts["instructions"] = plan.guide
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", now()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def body(choices: list[dict[str, Any]], usage: Any = None, chunk: bool = True) -> Any:
            out: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk" if chunk else "chat.completion",
                "created": created,
                "model": req.model,
                "system_fingerprint": None,
                "choices": choices,
            }
            if usage is not None or include_usage or not chunk:
                out["usage"] = (
                    None
                    if usage is None
                    else usage_json(usage.prompt_tokens, usage.output_tokens, usage.cached_tokens)
                )
            return out

        def delta(d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return body([{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}])

        if not req.stream:
            res = await generate(request, turn, opts, deadline_ms)
            count_tokens(req.model, res.usage)
            if plan is not None:
                message, finish = tool_message(res.text, res.finish_reason)
            else:
                message = {"role": "assistant", "content": res.text, "refusal": None}
                finish = openai_finish(res.finish_reason)
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            return JSONResponse(body([choice], res.usage, chunk=False))

        def on_end(last: Any) -> list[dict[str, Any]]:
            events = []
            if plan is not None:  # a tool step is one JSON object: sent whole, parsed
                message, finish = tool_message(last.text, last.finish_reason)
                d = {"content": message["content"]}
                if "tool_calls" in message:
                    d["tool_calls"] = [
                        {"index": i, **tc} for i, tc in enumerate(message["tool_calls"])
                    ]
                events.append(delta(d))
            else:
                finish = openai_finish(last.finish_reason)
            events.append(delta({}, finish))
            if include_usage:
                events.append(body([], last.usage))
            return events

        head = [delta({"role": "assistant", "content": "", "refusal": None})]
        pre, post = orjson.dumps(delta({"content": "\0"})).split(b'"\\u0000"')
        on_piece = (
            (lambda p: None) if plan is not None else (lambda p: pre + orjson.dumps(p) + post)
        )
        return await sse(
            turn, opts, deadline_ms, "chat.completions", req.model, t0, head, on_piece, on_end
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        rec = gw.authenticate(request)
        req: CompletionRequest = await read_json(request, CompletionRequest)
        return await observed(
            request,
            "completions",
            gw.model_label(rec, req.model),
            req.stream,
            lambda t0: _complete(request, rec, req, t0),
        )

    async def _complete(request: Request, rec: KeyRecord, req: CompletionRequest, t0: float) -> Any:
        prompt = req.prompt_text()
        opts = generate_options(req)
        opts["prompt"] = prompt
        nice = _nice(request, rec)
        deadline_ms = _deadline_ms(request.headers.get(TIMEOUT_HEADER))
        model, system = await gw.resolve_model(rec, req.model)
        turn = await gw.open_turn(rec, None, model, system, [], nice)  # raw text: no session
        rid, created = f"cmpl-{secrets.token_hex(12)}", now()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def body(text: str | None, finish: str | None, usage: Any = None) -> dict[str, Any]:
            choices = (
                []
                if text is None
                else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
            )
            out: dict[str, Any] = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": req.model,
                "system_fingerprint": None,
                "choices": choices,
            }
            if usage is not None or (req.stream and include_usage) or not req.stream:
                out["usage"] = (
                    None
                    if usage is None
                    else usage_json(usage.prompt_tokens, usage.output_tokens, usage.cached_tokens)
                )
            return out

        echo = prompt if req.echo else ""
        if not req.stream:
            res = await generate(request, turn, opts, deadline_ms)
            count_tokens(req.model, res.usage)
            return JSONResponse(body(echo + res.text, openai_finish(res.finish_reason), res.usage))

        def on_end(last: Any) -> list[dict[str, Any]]:
            events = [body("", openai_finish(last.finish_reason))]
            if include_usage:
                events.append(body(None, None, last.usage))
            return events

        head = [body(echo, None)] if echo else []
        return await sse(
            turn,
            opts,
            deadline_ms,
            "completions",
            gw.model_label(rec, req.model),
            t0,
            head,
            lambda p: body(p, None),
            on_end,
        )

    @app.post("/v1/responses")
    async def responses(request: Request) -> Any:
        rec = gw.authenticate(request)
        req: ResponsesRequest = await read_json(request, ResponsesRequest)
        return await observed(
            request,
            "responses",
            gw.model_label(rec, req.model),
            req.stream,
            lambda t0: _respond(request, rec, req, t0),
        )

    async def _respond(request: Request, rec: KeyRecord, req: ResponsesRequest, t0: float) -> Any:
        opts: dict[str, Any] = {
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "max_tokens": min(
                req.max_output_tokens or limits.MAX_OUTPUT_TOKENS, limits.MAX_OUTPUT_TOKENS
            ),
        }
        nice = _nice(request, rec)
        deadline_ms = _deadline_ms(request.headers.get(TIMEOUT_HEADER))
        sent = req.messages()
        plan = req.plan()
        if plan is not None:
            opts["response_format"] = plan.response_format
        model, system = await gw.resolve_model(rec, req.model)
        rid = f"resp_{secrets.token_hex(12)}"
        # A chain of responses is one session, named by the first response's id. As at
        # OpenAI, `instructions` hold for the one response that names them: they go to the
        # kernel as this call's instructions, never into the session's context.
        skey: SessionKey | None = None
        if req.previous_response_id is not None:
            skey = gw.chains.get((rec.name, req.previous_response_id))
            if skey is None:
                raise _session_gone()
        elif req.store:
            skey = (rid, model, system or "")
        sid, model, system = skey if skey is not None else (None, model, system)
        turn = await gw.open_turn(
            rec, sid, model, system or None, sent, nice, request, deadline_ms,
            chained=req.previous_response_id is not None,
        )  # fmt: skip
        if skey is not None and req.store:
            gw.remember(rec.name, rid, skey)
        opts["messages"] = list(turn.new)
        notes = [n for n in (req.instructions, plan.guide if plan else None) if n]
        if notes:  # for this step only: never kept in a session
            opts["instructions"] = "\n\n".join(notes)
        created, mid = time.time(), f"msg_{secrets.token_hex(12)}"
        tools = [{"type": "function", "strict": False, **t.model_dump()} for t in req.tools or []]
        choice = req.tool_choice
        choice_out = choice.model_dump() if isinstance(choice, BaseModel) else choice or "auto"
        seq = iter(range(1 << 62))

        def message(text: str, status: str) -> dict[str, Any]:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            return {
                "type": "message",
                "id": mid,
                "role": "assistant",
                "status": status,
                "content": [part] if status != "in_progress" else [],
            }

        def output(result: Any, status: str) -> list[dict[str, Any]]:
            if plan is None:
                return [message(result.text, status)]
            calls, answer = parse_action(result.text)
            if not calls:
                return [message(answer if answer is not None else result.text, status)]
            return [
                {
                    "type": "function_call",
                    "id": f"fc_{secrets.token_hex(12)}",
                    "call_id": f"call_{secrets.token_hex(12)}",
                    "name": c.name,
                    "arguments": json.dumps(c.arguments),
                    "status": "completed",
                }
                for c in calls
            ]

        def response(result: Any | None) -> dict[str, Any]:
            status = "in_progress"
            body: dict[str, Any] = {"output": [], "usage": None, "incomplete_details": None}
            if result is not None:
                cut = result.finish_reason == "length"
                status = "incomplete" if cut else "completed"
                u = result.usage
                body = {
                    "output": output(result, status),
                    "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
                    "usage": {
                        "input_tokens": u.prompt_tokens,
                        "input_tokens_details": {"cached_tokens": u.cached_tokens},
                        "output_tokens": u.output_tokens,
                        "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": u.prompt_tokens + u.output_tokens,
                    },
                }
            return {
                "id": rid,
                "object": "response",
                "created_at": created,
                "model": req.model,
                "status": status,
                "error": None,
                "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens,
                "previous_response_id": req.previous_response_id,
                "temperature": opts["temperature"],
                "top_p": opts["top_p"],
                "parallel_tool_calls": False,
                "tool_choice": choice_out,
                "tools": tools,
                "store": req.store,
                **body,
            }

        if not req.stream:
            res = await generate(request, turn, opts, deadline_ms)
            count_tokens(req.model, res.usage)
            return JSONResponse(response(res))

        def event(type_: str, **fields: Any) -> dict[str, Any]:
            return {"type": type_, "sequence_number": next(seq), **fields}

        where = {"item_id": mid, "output_index": 0, "content_index": 0}
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        head = [
            event("response.created", response=response(None)),
            event("response.in_progress", response=response(None)),
        ]

        def finished(done: dict[str, Any]) -> dict[str, Any]:
            state = "incomplete" if done["status"] == "incomplete" else "completed"
            return event(f"response.{state}", response=done)

        def on_end(last: Any) -> list[dict[str, Any]]:
            done = response(last)
            item = done["output"][0]
            return [
                event("response.output_text.done", text=last.text, logprobs=[], **where),
                event("response.content_part.done", part=item["content"][0], **where),
                event("response.output_item.done", output_index=0, item=item),
                finished(done),
            ]

        def on_end_tools(last: Any) -> list[dict[str, Any]]:
            """A tool step is one JSON object: its items are sent whole, once parsed."""
            done = response(last)
            events = []
            for i, item in enumerate(done["output"]):
                at = {"item_id": item["id"], "output_index": i}
                events.append(
                    event(
                        "response.output_item.added",
                        output_index=i,
                        item={**item, "status": "in_progress", **emptied(item)},
                    )
                )
                if item["type"] == "function_call":
                    args = item["arguments"]
                    events.append(event("response.function_call_arguments.delta", delta=args, **at))
                    events.append(
                        event("response.function_call_arguments.done", arguments=args, **at)
                    )
                else:
                    part = item["content"][0]
                    at["content_index"] = 0
                    events.append(
                        event("response.content_part.added", part={**part, "text": ""}, **at)
                    )
                    events.append(
                        event("response.output_text.delta", delta=part["text"], logprobs=[], **at)
                    )
                    events.append(
                        event("response.output_text.done", text=part["text"], logprobs=[], **at)
                    )
                    events.append(event("response.content_part.done", part=part, **at))
                events.append(event("response.output_item.done", output_index=i, item=item))
            return [*events, finished(done)]

        if plan is not None:
            return await sse(
                turn,
                opts,
                deadline_ms,
                "responses",
                req.model,
                t0,
                head[:2],
                lambda p: None,
                on_end_tools,
                typed=True,
            )
        head += [
            event("response.output_item.added", output_index=0, item=message("", "in_progress")),
            event("response.content_part.added", part=empty, **where),
        ]

        return await sse(
            turn,
            opts,
            deadline_ms,
            "responses",
            req.model,
            t0,
            head,
            lambda p: event("response.output_text.delta", delta=p, logprobs=[], **where),
            on_end,
            typed=True,
        )

    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read: what is left is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _nice(request: Request, rec: KeyRecord) -> int:
    """The request's nice: the key's own unless ``X-Llmos-Priority`` asks for a value in
    ``rec.nice..19`` (a key's requests may lower their priority, never raise it: 403)."""
    nice = _header_int(request, PRIORITY_HEADER, 0, 19, rec.nice)
    if nice < rec.nice:
        raise ApiError(
            403,
            f"{PRIORITY_HEADER}: this key's requests run at nice {rec.nice} or above",
            "permission_error",
            "priority_not_allowed",
            PRIORITY_HEADER,
        )
    return nice


def _header_int(request: Request, name: str, lo: int, hi: int, default: int) -> int:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ApiError(400, f"{name}: expected an integer in {lo}..{hi}", param=name)
    return value


def _deadline_ms(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= limits.MAX_DEADLINE_MS / 1000:
        raise ApiError(400, f"{TIMEOUT_HEADER}: expected seconds, > 0", param=TIMEOUT_HEADER)
    return int(seconds * 1000)


# -- llmos gateway ------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SyscallError.of(Errno.EINVAL, f"--listen {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from llmos.ctl.private import err, kernel_pid, start_kernel

    host, port = parse_listen(args.listen)
    if bool(args.tls_cert) != bool(args.tls_key):
        err.print("llmos gateway: --tls-cert and --tls-key go together")
        return 2
    if kernel_pid() is None and start_kernel([]) != 0:
        return 1
    scheme = "https" if args.tls_cert else "http"
    err.print(f"llmos gateway on {scheme}://{host}:{port}/v1 (keys: `llmos keys create NAME`)")
    uvicorn.run(
        create_app(Gateway()),
        host=host,
        port=port,
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
        log_level="warning",
        access_log=False,  # no request lines in logs: a key never appears there by mistake
    )
    return 0
