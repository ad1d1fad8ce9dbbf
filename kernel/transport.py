"""The kernel's front door: one ZeroMQ ROUTER socket served by the asyncio loop.

Clients use DEALER sockets; each message is ``[identity, frame]`` on the kernel side.
The receive loop drains every message that is ready before yielding back to the loop,
so a burst of cheap syscalls costs one wake-up, not one per call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.asyncio

from syscalls import limits

log = logging.getLogger("llmos.kernel")


class Transport:
    """Binds the endpoints, feeds frames to ``on_frames``, sends replies."""

    def __init__(self, endpoints: list[str], on_frames: Callable[[list[bytes]], None]) -> None:
        self.endpoints = endpoints
        self.on_frames = on_frames
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        # A peer sending a frame over the hard cap is disconnected before we buffer it.
        self._sock.setsockopt(zmq.MAXMSGSIZE, limits.MAX_TRANSPORT_BYTES)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._task: asyncio.Task[None] | None = None

    def bind(self) -> None:
        """Bind every endpoint (ipc sockets are made private to the user)."""
        for ep in self.endpoints:
            self._sock.bind(ep)
            if ep.startswith("ipc://"):
                Path(ep[len("ipc://"):]).chmod(0o600)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="transport")

    async def _serve(self) -> None:
        sock = self._sock
        while True:
            parts = await sock.recv_multipart(copy=True)
            self.on_frames(parts)
            # Drain what is already queued without going back through the loop.
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                try:
                    parts = await sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                self.on_frames(parts)

    def send(self, identity: bytes, frame: bytes) -> None:
        """Queue a reply; a vanished or hopelessly slow peer loses it (never blocks)."""
        fut = self._sock.send_multipart([identity, frame], flags=zmq.NOBLOCK, copy=False)
        if fut.done():
            _report(fut)
        else:
            fut.add_done_callback(_report)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close(linger=0)
        self._ctx.term()
        for ep in self.endpoints:
            if ep.startswith("ipc://"):
                Path(ep[len("ipc://"):]).unlink(missing_ok=True)


def _report(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.warning("dropped a reply to a peer: %s", exc)
