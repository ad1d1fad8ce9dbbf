"""Test helpers: run a real kernel (daemon subprocess or in-process thread)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from drivers.base import Driver
from kernel.kernel import Kernel
from llmos.client import Client
from syscalls.errors import SyscallError

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


class Daemon:
    """``python -m kernel`` as a real subprocess on a private runtime dir."""

    def __init__(self, base: Path, *args: str) -> None:
        self.run_dir, self.state_dir = base / "run", base / "state"
        self.env = {**os.environ, "LLMOS_RUNTIME_DIR": str(self.run_dir), "LLMOS_STATE_DIR": str(self.state_dir)}
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'kernel.sock'}"

    @property
    def token(self) -> str:
        return (self.run_dir / "admin.token").read_text().strip()

    def start(self, timeout: float = 600) -> Daemon:
        self.proc = subprocess.Popen([sys.executable, "-m", "kernel", *self.args], env=self.env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, f"kernel died: {self.log()[-3000:]}"
            try:
                with self.admin() as c:
                    if all(mod.state == "ready" for mod in c.info().models):
                        return self
            except (SyscallError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"kernel not ready: {self.log()[-3000:]}")

    def admin(self) -> Client:
        return Client(self.endpoint, pid=0, token=self.token)

    def log(self) -> str:
        try:
            return (self.state_dir / "kernel.log").read_text()
        except OSError:
            return ""

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(30)
