"""The kernel's front door: one ZeroMQ ROUTER socket served by the asyncio loop.

Clients use DEALER sockets; each message is ``[identity, frame]`` on the kernel side.
The reader drains every message that is ready (up to a batch) before yielding back to
the loop, so a burst of cheap syscalls costs one wake-up, not one per call. Replies go
the other way batched too: those queued for one peer during a loop iteration leave at
its end as one multipart message (one frame per reply).

Replies a peer does not read are bounded: ZeroMQ holds at most ``PEER_HWM`` messages
(each at most ``MESSAGE_BYTES`` of replies, or one larger reply) for a peer, and past
that (``ROUTER_MANDATORY`` makes the send answer EAGAIN) the kernel keeps at most
``limits.MAX_PEER_BACKLOG_BYTES`` more, retried in order. A peer whose backlog goes past
that is dropped: its replies are discarded, the reason is logged once, and its frames
are ignored for ``DROP_S`` seconds (a fresh socket is a fresh peer).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
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
_EAGAIN = int(zmq.EAGAIN)

#: ZeroMQ messages queued for one peer before the kernel holds replies back itself.
PEER_HWM = 16
#: Most bytes of replies batched into one ZeroMQ message.
MESSAGE_BYTES = 256 << 10
#: How often a held-back backlog is retried.
RETRY_S = 0.005
#: How long a dropped peer's frames are ignored; how many dropped peers are remembered.
DROP_S, MAX_DROPPED = 60.0, 4096


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
        self._sock.setsockopt(zmq.SNDHWM, PEER_HWM)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # EAGAIN at the HWM, not a silent drop
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_reader = False
        self._rearmed = False
        #: Replies waiting for the end of this loop iteration, per peer, in order.
        self._pending: dict[bytes, list[bytes]] = {}
        self._pending_bytes: dict[bytes, int] = {}
        self._flush_scheduled = False
        #: Replies ZeroMQ would not take yet (the peer is not reading), per peer, and
        #: their bytes.
        self._backlog: dict[bytes, list[bytes]] = {}
        self._backlog_bytes: dict[bytes, int] = {}
        self._held_since: dict[bytes, float] = {}
        self._retry_scheduled = False
        #: Dropped peers -> until when their frames are ignored (oldest first).
        self._dropped: OrderedDict[bytes, float] = OrderedDict()
        self.peers_dropped = 0

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
                if self._dropped and parts[0] in self._dropped and not self._forgiven(parts[0]):
                    continue
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
        if self._dropped and identity in self._dropped:
            return
        frames = self._pending.get(identity)
        if frames is None:
            self._pending[identity] = [frame]
            self._pending_bytes[identity] = len(frame)
            if not self._flush_scheduled and self._loop is not None:
                self._flush_scheduled = True
                self._loop.call_soon(self.flush)
            return
        frames.append(frame)
        size = self._pending_bytes[identity] + len(frame)
        if size < MESSAGE_BYTES:
            self._pending_bytes[identity] = size
            return
        del self._pending[identity], self._pending_bytes[identity]  # a full message: now
        self._out(identity, frames)

    def flush(self) -> None:
        """Send every queued reply now (never blocks): what ZeroMQ will not take for a peer
        yet waits in its backlog, in order; a vanished peer loses its replies."""
        self._flush_scheduled = False
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        self._pending_bytes = {}
        for identity, frames in pending.items():
            self._out(identity, frames)
        if not self._in_reader:
            self._rearm()

    def _out(self, identity: bytes, frames: list[bytes]) -> None:
        if identity in self._dropped:
            return
        if identity in self._backlog:  # older replies leave first
            self._hold(identity, frames)
        else:
            self._push(identity, frames)

    def _push(self, identity: bytes, frames: list[bytes]) -> None:
        """Hand ``frames`` to ZeroMQ in messages of at most MESSAGE_BYTES; the rest, from
        the first message it refuses at the HWM, goes to the backlog."""
        send = self._sock.send
        start = 0
        while start < len(frames):
            end, size = start + 1, len(frames[start])
            while end < len(frames) and size + len(frames[end]) <= MESSAGE_BYTES:
                size += len(frames[end])
                end += 1
            try:
                send(identity, _MORE_NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno == _EAGAIN:
                    self._hold(identity, frames[start:])
                else:  # EHOSTUNREACH: the peer is gone
                    log.debug("dropped %d replies to a vanished peer: %s", len(frames), exc)
                return
            for frame in frames[start : end - 1]:
                send(frame, _MORE_NOBLOCK)
            send(frames[end - 1], _NOBLOCK)
            start = end

    def _hold(self, identity: bytes, frames: list[bytes]) -> None:
        backlog = self._backlog.setdefault(identity, [])
        backlog.extend(frames)
        total = self._backlog_bytes.get(identity, 0) + sum(len(f) for f in frames)
        self._backlog_bytes[identity] = total
        assert self._loop is not None
        since = self._held_since.setdefault(identity, self._loop.time())
        if total > limits.MAX_PEER_BACKLOG_BYTES:
            self._drop(identity, f"{total} bytes of replies it does not read")
            return
        if self._loop.time() - since > DROP_S:
            self._drop(identity, f"it has read none of its replies for {DROP_S:.0f} s")
            return
        if not self._retry_scheduled and self._loop is not None:
            self._retry_scheduled = True
            self._loop.call_later(RETRY_S, self._retry)

    def _retry(self) -> None:
        self._retry_scheduled = False
        backlog, self._backlog = self._backlog, {}
        self._backlog_bytes = {}
        for identity, frames in backlog.items():
            self._push(identity, frames)
        for identity in [i for i in self._held_since if i not in self._backlog]:
            del self._held_since[identity]  # it read: its clock starts again

    def _drop(self, identity: bytes, why: str) -> None:
        self._backlog.pop(identity, None)
        self._backlog_bytes.pop(identity, None)
        self._held_since.pop(identity, None)
        self._pending.pop(identity, None)
        self._pending_bytes.pop(identity, None)
        assert self._loop is not None
        self._dropped[identity] = self._loop.time() + DROP_S
        self._dropped.move_to_end(identity)
        while len(self._dropped) > MAX_DROPPED:
            self._dropped.popitem(last=False)
        self.peers_dropped += 1
        log.warning(
            "dropped peer %s: %s (at most %d bytes are kept for one peer); its frames are "
            "ignored for %.0f s",
            identity.hex()[:16],
            why,
            limits.MAX_PEER_BACKLOG_BYTES,
            DROP_S,
        )

    def _forgiven(self, identity: bytes) -> bool:
        """Is the drop of ``identity`` over (then it is forgotten)?"""
        assert self._loop is not None
        if self._loop.time() < self._dropped[identity]:
            return False
        del self._dropped[identity]
        return True

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
