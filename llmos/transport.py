"""The SDK's two transports to a kernel: blocking (a ZeroMQ socket per thread) and asyncio
(one socket, many calls in flight, replies matched by id). Both expose the same
operation, ``frames(name, args, pid, token, deadline_ms)``: the chunks of a call, then its
result (a dict), or its error raised as a :class:`SyscallError`.

Finding the kernel (``resolve_endpoint``) and the admin credential (``admin_token``) are
here too: the runtime-dir rendezvous of ``syscalls/paths.py``. A ``tcp://`` endpoint is
reached with CURVE when keys are configured (``syscalls/curve.py``: the pinned server key
and the client's pair); a socket's first connection is watched until its handshake ends,
so a refused key or a wrong pinned server key is an error that says what to do, not a
timeout.
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
from zmq.utils.monitor import parse_monitor_message, recv_monitor_message

from syscalls import codec, curve, limits, paths
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


def check_endpoint(endpoint: str) -> None:
    """ECONNREFUSED at once when an ipc endpoint's socket file does not exist."""
    if endpoint.startswith("ipc://") and not Path(endpoint[6:]).exists():
        raise SyscallError.of(
            Errno.ECONNREFUSED,
            f"no kernel socket at {endpoint[6:]}; start one with `llmos kernel start`",
        )


def wait_budget_s(args: dict[str, Any], deadline_ms: int | None, name: str) -> float:
    """How long the kernel may take to answer: the call's deadline (or its default)."""
    if deadline_ms is not None:
        return deadline_ms / 1000
    if name in ("llm.generate", "llm.stream"):
        return limits.DEFAULT_GENERATE_DEADLINE_MS / 1000
    if name == "proc.wait" and isinstance(args.get("timeout"), int | float):
        return max(args["timeout"] + 1, limits.DEFAULT_DEADLINE_MS / 1000)
    return limits.DEFAULT_DEADLINE_MS / 1000


def final_result(frame: Any) -> dict[str, Any]:
    """Result of a final reply frame, or raise its error."""
    if not isinstance(frame, dict) or "ok" not in frame:
        raise SyscallError.of(Errno.EPROTO, f"kernel sent a malformed reply: {frame!r:.200}")
    if frame["ok"]:
        result = frame.get("result")
        return result if isinstance(result, dict) else {}
    raise SyscallError.from_wire(frame.get("error"))


#: How long a new TCP socket waits for its first handshake before calls go ahead anyway
#: (no kernel answering yet: they then time out as on any endpoint).
HANDSHAKE_S = 10.0
_HS_OK = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
_HS_EVENTS = int(
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def curve_for(endpoint: str) -> curve.ClientCurve | None:
    """The CURVE keys for ``endpoint`` (None: ipc, or plain TCP); EACCES saying what to
    set when they are configured but unusable."""
    try:
        return curve.client_curve(endpoint, paths.runtime_dir())
    except ValueError as exc:
        raise SyscallError.of(Errno.EACCES, str(exc)) from None


def handshake_error(
    event: int, value: int, endpoint: str, keys: curve.ClientCurve | None
) -> SyscallError | None:
    """What a monitor's handshake event means for the caller (None: it succeeded)."""
    if event == _HS_OK:
        return None
    if event == int(zmq.EVENT_HANDSHAKE_FAILED_AUTH):
        return SyscallError.of(
            Errno.EACCES,
            f"the kernel at {endpoint} refused this client's CURVE key "
            f"{keys.pair.public if keys else ''}: ask its admin to run "
            "`llmos clients add NAME PUBLIC_KEY` (public key from `llmos keygen`)",
        )
    if event == int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL) and keys is None:
        return SyscallError.of(
            Errno.ECONNREFUSED,
            f"the kernel at {endpoint} requires CURVE encryption: set LLMOS_SERVER_KEY to its "
            "key (`llmos kernel key` on its machine) and LLMOS_CURVE_SECRET_KEY_FILE to a "
            "pair made by `llmos keygen FILE` that its admin added with `llmos clients add`",
        )
    if event == int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
        return SyscallError.of(
            Errno.ECONNREFUSED,
            f"the kernel at {endpoint} does not speak CURVE (started with --insecure?): "
            "unset LLMOS_SERVER_KEY, or restart it without --insecure",
        )
    pinned = keys.server if keys else "?"
    return SyscallError.of(
        Errno.ECONNREFUSED,
        f"the CURVE handshake with {endpoint} failed: the server key pinned by "
        f"{keys.source if keys else 'this client'} ({pinned}) is not that kernel's key; "
        "compare it with `llmos kernel key` on the kernel's machine and fix LLMOS_SERVER_KEY",
    )


class SyncTransport:
    """Blocking calls; thread-safe: each thread gets its own socket, so a call blocking in
    one thread (a wait, a generation) never delays another thread's calls."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._ctx = zmq.Context.instance()
        self._ids = itertools.count(1)
        self._local = threading.local()
        self._socks: list[zmq.Socket[bytes]] = []
        self._lock = threading.Lock()
        self._curve = curve_for(endpoint)

    def _socket(self) -> zmq.Socket[bytes]:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self._curve is not None:
                self._curve.apply(sock)
            if self.endpoint.startswith("tcp://"):
                try:
                    self._connect_watched(sock)
                except SyscallError:
                    sock.close(linger=0)
                    raise
            else:
                sock.connect(self.endpoint)
            self._local.sock = sock
            with self._lock:
                self._socks.append(sock)
        return sock

    def _connect_watched(self, sock: zmq.Socket[bytes]) -> None:
        """Connect, then wait for the first handshake's outcome (at most HANDSHAKE_S)."""
        mon = sock.get_monitor_socket(_HS_EVENTS)
        try:
            sock.connect(self.endpoint)
            if mon.poll(int(HANDSHAKE_S * 1000)):
                msg = recv_monitor_message(mon)
                err = handshake_error(
                    int(msg["event"]), int(msg["value"]), self.endpoint, self._curve
                )
                if err is not None:
                    raise err
        finally:
            sock.disable_monitor()
            mon.close(linger=0)

    def frames(
        self, name: str, args: dict[str, Any], pid: int, token: str, deadline_ms: int | None
    ) -> Iterator[dict[str, Any]]:
        """The chunks of one call, then its result."""
        sock = self._socket()
        rid = next(self._ids)
        wait_ms = int((wait_budget_s(args, deadline_ms, name) + GRACE_S) * 1000)
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
            yield final_result(frame)
            return

    def close(self) -> None:
        with self._lock:
            for sock in self._socks:
                sock.close(linger=0)
            self._socks.clear()
        self._local = threading.local()


class AsyncTransport:
    """asyncio calls: many in flight on one socket, replies matched by id."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._curve = curve_for(endpoint)
        if self._curve is not None:
            self._curve.apply(self._sock)
        self._mon = (
            self._sock.get_monitor_socket(_HS_EVENTS) if endpoint.startswith("tcp://") else None
        )
        self._handshake: asyncio.Task[None] | None = None
        self._sock.connect(endpoint)
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
                try:  # one bad frame must not end the reader (every call would time out)
                    frame = codec.unpackb(raw)
                    rid = frame.get("id") if isinstance(frame, dict) else None
                    q = inbox.get(rid) if isinstance(rid, int) else None
                except SyscallError:
                    continue
                if q is not None:
                    q.put_nowait(frame)

    async def _watch_handshake(self) -> None:
        mon = self._mon
        assert mon is not None
        try:
            async with asyncio.timeout(HANDSHAKE_S):
                msg = parse_monitor_message(await mon.recv_multipart())
        except TimeoutError:
            return
        finally:
            self._sock.disable_monitor()
            mon.close(linger=0)
            self._mon = None
        err = handshake_error(int(msg["event"]), int(msg["value"]), self.endpoint, self._curve)
        if err is not None:
            raise err

    async def frames(
        self, name: str, args: dict[str, Any], pid: int, token: str, deadline_ms: int | None
    ) -> AsyncIterator[dict[str, Any]]:
        """The chunks of one call, then its result."""
        if self._mon is not None and self._handshake is None:
            self._handshake = asyncio.get_running_loop().create_task(self._watch_handshake())
        if self._handshake is not None:
            await asyncio.shield(self._handshake)  # every early call learns its outcome
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())
        rid = next(self._ids)
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._inbox[rid] = q
        loop = asyncio.get_running_loop()
        try:
            await self._sock.send(codec.encode_request(rid, name, args, pid, token, deadline_ms))
            # The deadline bounds waiting for the kernel only: it must not be armed while
            # the consumer holds a yielded frame (a slow consumer would be cancelled in
            # its own code instead of seeing ETIMEDOUT).
            deadline = loop.time() + wait_budget_s(args, deadline_ms, name) + GRACE_S
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        frame = await q.get()
                except TimeoutError:
                    raise SyscallError.of(
                        Errno.ETIMEDOUT, f"no reply from the kernel at {self.endpoint} for {name}"
                    ) from None
                if "chunk" in frame:
                    yield frame["chunk"]
                    continue
                yield final_result(frame)
                return
        finally:
            self._inbox.pop(rid, None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._handshake is not None and not self._handshake.done():
            self._handshake.cancel()
            await asyncio.gather(self._handshake, return_exceptions=True)
        if self._mon is not None:
            self._mon.close(linger=0)
        self._sock.close(linger=0)
