"""Test helpers: run a real kernel (daemon subprocess or in-process thread)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from drivers.base import Driver
from kernel.kernel import Kernel
from llmos.client import Client
from llmos.private import PrivateKernel

ROOT = Path(__file__).resolve().parent.parent


class KernelThread:
    """A :class:`Kernel` serving on its own event loop in a background thread."""

    def __init__(self, drivers: dict[str, Driver], run_dir: Path, **kw: object) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.endpoint = f"ipc://{run_dir / 'k.sock'}"
        self.drivers, self.kw = drivers, kw
        self.kernel: Kernel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self.kernel = Kernel(self.drivers, [self.endpoint], **self.kw)  # type: ignore[arg-type]
            await self.kernel.start()
            self._started.set()
            try:
                await self.kernel.serve_forever()
            finally:
                await self.kernel.stop()
        asyncio.run(main())

    def __enter__(self) -> KernelThread:
        self._thread.start()
        assert self._started.wait(30), "kernel thread did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self.kernel is not None
        self._loop.call_soon_threadsafe(self.kernel.request_stop)
        self._thread.join(30)

    def admin(self) -> Client:
        assert self.kernel is not None
        return Client(self.endpoint, pid=0, token=self.kernel.admin_token)


class Daemon(PrivateKernel):
    """A real kernel daemon for integration tests (see :class:`llmos.private.PrivateKernel`)."""
