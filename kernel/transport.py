"""The kernel's front door: one ZeroMQ ROUTER socket served by the asyncio loop.

Clients use DEALER sockets; each message is ``[identity, frame]`` on the kernel side.
The reader drains every message that is ready (up to a batch) before yielding back to
the loop, so a burst of cheap syscalls costs one wake-up, not one per call. Replies go
the other way batched too: those queued for one peer during a loop iteration leave at
its end as one multipart message (one frame per reply).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from syscalls import limits

if TYPE_CHECKING:
    from kernel.curve import ServerCurve

log = logging.getLogger("llmos.kernel")


#: Most messages handled per wake-up before other ready tasks get a turn.
BATCH = 256

# Plain ints: pyzmq's enum sugar costs microseconds per call on this hot path.
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_RCVMORE = int(zmq.RCVMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)


class Transport:
    """Binds the endpoints, feeds frames to ``on_frames``, sends replies.

    The socket is a plain (blocking-API) ZeroMQ socket read from an ``add_reader``
    callback with NOBLOCK calls: no futures per message. ZeroMQ's FD is edge-triggered,
    so after any send made outside the reader the reader is re-run once to pick up
    messages whose arrival that send absorbed.
    """

    def __init__(
        self,
        endpoints: list[str],
        on_frames: Callable[[list[bytes]], None],
        curve: ServerCurve | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.on_frames = on_frames
        self.curve = curve
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        # A peer sending a frame over the hard cap is disconnected before we buffer it.
        self._sock.setsockopt(zmq.MAXMSGSIZE, limits.MAX_TRANSPORT_BYTES)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_reader = False
        self._rearmed = False
        #: Replies waiting for the end of this loop iteration, per peer, in order.
        self._pending: dict[bytes, list[bytes]] = {}
        self._flush_scheduled = False

    def bind(self) -> None:
        """Bind every endpoint (ipc sockets are made private to the user). The CURVE ones
        last: ZeroMQ copies a socket's security options into each listener when it is
        bound, so the plain (ipc, ``--insecure``) listeners are bound before the socket
        becomes a CURVE server, with the ZAP handler started before the first CURVE
        listener exists (no handshake is ever accepted unchecked)."""
        secure = self.curve.endpoints if self.curve is not None else set()
        for ep in self.endpoints:
            if ep not in secure:
                self._sock.bind(ep)
                if ep.startswith("ipc://"):
                    Path(ep[len("ipc://") :]).chmod(0o600)
        if self.curve is not None and secure:
            self.curve.start(self._ctx)
            self.curve.apply(self._sock)
            for ep in self.endpoints:
                if ep in secure:
                    self._sock.bind(ep)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.getsockopt(zmq.FD), self._drain)
        self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._rearmed = False
        sock, handled = self._sock, 0
        get, recv = sock.get, sock.recv
        self._in_reader = True
        try:
            while get(_EVENTS) & _POLLIN:
                if handled >= BATCH:  # let generation streams and timers run too
                    self._rearm()
                    return
                try:
                    parts = [recv(_NOBLOCK)]
                    while get(_RCVMORE):
                        parts.append(recv(_NOBLOCK))
                except zmq.Again:
                    return
                handled += 1
                self.on_frames(parts)
        finally:
            self._in_reader = False

    def _rearm(self) -> None:
        if not self._rearmed and self._loop is not None:
            self._rearmed = True
            self._loop.call_soon(self._drain)

    def send(self, identity: bytes, frame: bytes) -> None:
        """Queue a reply for ``identity``; sent at the end of this loop iteration.

        Replies queued for the same peer in one iteration (say, the streamed tokens of a
        decoding step for every process one client drives) go out as ONE multipart ZeroMQ
        message, one frame per reply: one hand-over to ZeroMQ's I/O thread instead of one
        per reply. A client reads the parts with plain ``recv`` calls, one reply each.
        """
        frames = self._pending.get(identity)
        if frames is None:
            self._pending[identity] = [frame]
            if not self._flush_scheduled and self._loop is not None:
                self._flush_scheduled = True
                self._loop.call_soon(self.flush)
        else:
            frames.append(frame)

    def flush(self) -> None:
        """Send every queued reply now; a vanished or hopelessly slow peer loses its
        replies (never blocks)."""
        self._flush_scheduled = False
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        send = self._sock.send
        for identity, frames in pending.items():
            try:
                send(identity, _MORE_NOBLOCK)
                for frame in frames[:-1]:
                    send(frame, _MORE_NOBLOCK)
                send(frames[-1], _NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("dropped %d replies to a peer: %s", len(frames), exc)
        if not self._in_reader:
            self._rearm()

    async def close(self) -> None:
        """Send what is queued, then close the socket (waiting at most 100 ms for the
        last replies to leave) and remove ipc socket files."""
        self.flush()
        if self._loop is not None:
            self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
        self._sock.close(linger=100)
        if self.curve is not None:
            self.curve.stop()
        self._ctx.term()
        for ep in self.endpoints:
            if ep.startswith("ipc://"):
                Path(ep[len("ipc://") :]).unlink(missing_ok=True)
