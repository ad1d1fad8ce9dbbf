"""A throwaway kernel daemon on its own runtime dir: for benchmarks, tests and scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from llmos.client import Client
from syscalls.errors import SyscallError


class PrivateKernel:
    """``python -m kernel`` as a real subprocess on ``base/run`` (its ipc socket, lock
    and admin token) and ``base/state`` (its log). Extra daemon options in ``args``."""

    def __init__(self, base: Path, *args: str) -> None:
        self.run_dir, self.state_dir = base / "run", base / "state"
        self.args = args
        self.env = {
            **os.environ,
            "LLMOS_RUNTIME_DIR": str(self.run_dir),
            "LLMOS_STATE_DIR": str(self.state_dir),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'kernel.sock'}"

    @property
    def token(self) -> str:
        return (self.run_dir / "admin.token").read_text().strip()

    def start(self, timeout: float = 900) -> PrivateKernel:
        """Start the daemon and wait until every model is ready (or asleep, beyond
        ``--max-loaded``: it loads on first use)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernel", *self.args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the kernel exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            try:
                with self.admin() as c:
                    info = c.info()
                if any(mod.state == "failed" for mod in info.models):
                    raise RuntimeError(f"a model failed to load:\n{self.log()[-3000:]}")
                if all(mod.state in ("ready", "asleep") for mod in info.models):
                    return self
            except (SyscallError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the kernel was not ready in {timeout} s:\n{self.log()[-3000:]}")

    def admin(self) -> Client:
        """A client holding this kernel's admin credential."""
        return Client(self.endpoint, pid=0, token=self.token)

    def log(self) -> str:
        try:
            return (self.state_dir / "kernel.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the daemon's exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def __enter__(self) -> PrivateKernel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
