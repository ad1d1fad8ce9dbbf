"""Shared fixtures: one real kernel daemon (CPU driver, packaged SmolLM2) per test session."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib

from kernel.sandbox import SandboxConfig  # noqa: E402
from llmos.calls import blocking_deadline_ms  # noqa: E402
from llmos.client import Client, Process  # noqa: E402
from llmos.transport import final_result  # noqa: E402
from syscalls import codec  # noqa: E402
from tests.kernels import Daemon  # noqa: E402

GREEDY = {"temperature": 0.0}

#: Tests that run code with the python tool need its sandbox (bubblewrap).
needs_bwrap = pytest.mark.skipif(
    not SandboxConfig.detect().bwrap,
    reason="bubblewrap (bwrap) is not usable here; scripts/setup.sh installs it as root",
)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The real kernel daemon, with the real model, on a private ipc socket."""
    k = Daemon(tmp_path_factory.mktemp("kernel"), "--slots", "2").start()
    yield k
    k.stop()


@pytest.fixture
def admin(daemon: Daemon) -> Iterator[Client]:
    with daemon.admin() as c:
        yield c


@pytest.fixture
def spawn(admin: Client) -> Iterator[Callable[..., Process]]:
    """Spawn top-level processes that are killed and reaped after the test."""
    made: list[Process] = []

    def _spawn(name: str = "t", **kw: object) -> Process:
        p = admin.spawn(name, **kw)  # type: ignore[arg-type]
        made.append(p)
        return p

    yield _spawn
    for p in made:
        for row in admin.ps():
            if row.pid == p.pid or row.ppid == p.pid:
                with contextlib.suppress(Exception):
                    admin.kill(row.pid, "KILL")
        with contextlib.suppress(Exception):
            admin.wait(p.pid, timeout=5)


def wait_until(cond: Callable[[], bool], timeout: float = 30.0, every: float = 0.01) -> None:
    """Poll ``cond`` until true (for states reached asynchronously); fail on timeout."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        time.sleep(every)


async def wait_until_async(
    cond: Callable[[], bool], timeout: float = 30.0, every: float = 0.01
) -> None:
    """:func:`wait_until` for a test's own event loop: poll ``cond`` between loop steps."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(every)


#: A topic nobody publishes on: an ``ipc.recv`` filtered on it with timeout 0 finds
#: nothing and answers at once, touching no message (the barrier of :class:`Parked`).
BARRIER_TOPIC = "tests.barrier"


class Parked:
    """A blocking syscall made as ``proc``, returned once the kernel has started it.

    The kernel shows no "blocked in ipc.send/recv" state to poll, so this observes it
    with a barrier: right behind the call, on the same connection, goes a second call
    made as the same process (an ``ipc.recv`` on :data:`BARRIER_TOPIC`, timeout 0). The
    kernel reads a connection's frames in order and starts each asynchronous call as a
    task on its loop in that order, and the call runs up to its first wait before the
    barrier's task starts. So once the barrier is answered, the call is waiting in the
    kernel -- or it already answered (its reply came back first, on the same socket),
    which :meth:`done` then says. A test that checks ``not done()`` after this proves
    the call blocked, which a sleep before the check does not (a call that had not
    reached the kernel yet passes it too)."""

    _CALL, _BARRIER = 1, 2

    def __init__(
        self, proc: Process, name: str, args: dict[str, Any], deadline_ms: int | None = None
    ) -> None:
        if deadline_ms is None:
            deadline_ms = blocking_deadline_ms(args.get("timeout"))
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(proc.client.endpoint)
        self._replies: dict[int, Any] = {}
        req = codec.encode_request(self._CALL, name, args, proc.pid, proc.token, deadline_ms)
        barrier = codec.encode_request(
            self._BARRIER,
            "ipc.recv",
            {"timeout": 0, "topic": BARRIER_TOPIC},
            proc.pid,
            proc.token,
        )
        self._sock.send(req)
        self._sock.send(barrier)
        assert self._reply(self._BARRIER, 30.0), "the kernel did not answer the barrier"
        final_result(self._replies.pop(self._BARRIER))  # it must have succeeded

    def _reply(self, rid: int, timeout: float) -> bool:
        """Read replies until ``rid``'s is in; False if ``timeout`` passes first."""
        end = time.monotonic() + timeout
        while rid not in self._replies:
            left = end - time.monotonic()
            if not self._sock.poll(max(0, int(left * 1000))):
                return False
            frame = codec.unpackb(self._sock.recv())
            if isinstance(frame, dict) and "chunk" not in frame:
                self._replies[frame.get("id")] = frame
        return True

    def done(self) -> bool:
        """Whether the call has answered (without waiting)."""
        return self._reply(self._CALL, 0)

    def result(self, timeout: float = 30.0) -> dict[str, Any]:
        """The call's result (a dict), or raise its error."""
        try:
            assert self._reply(self._CALL, timeout), "call did not return"
            return final_result(self._replies[self._CALL])
        finally:
            self._sock.close()


class InThread:
    """Run a blocking call in a thread; ``.result()`` returns or raises its outcome."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._out: object = None
        self._exc: BaseException | None = None

        def run() -> None:
            try:
                self._out = fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the test
                self._exc = exc

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()

    def done(self) -> bool:
        return not self._t.is_alive()

    def result(self, timeout: float = 120.0) -> object:
        self._t.join(timeout)
        assert not self._t.is_alive(), "call did not return"
        if self._exc is not None:
            raise self._exc
        return self._out
