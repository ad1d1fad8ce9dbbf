"""Shared fixtures: one real kernel daemon (CPU driver, packaged SmolLM2) per test session."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib

from kernel.sandbox import SandboxConfig  # noqa: E402
from llmos.client import Client, Process  # noqa: E402
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
