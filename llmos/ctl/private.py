"""Starting kernel daemons from the operator's tools: the one ready-wait (``wait_ready``)
that ``llmos kernel start`` and :class:`PrivateKernel` (a throwaway daemon on its own
runtime dir, for benchmarks, tests and scripts) share."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from kernel.daemon import daemon_command
from llmos.client import Client
from syscalls import models as m
from syscalls.errors import SyscallError


class KernelStartError(RuntimeError):
    """The daemon exited, a model failed to load, or it was not ready in time; ``log``
    holds the lines the daemon logged during this start."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(f"{message}:\n{log}" if log else message)
        self.message, self.log = message, log


def log_since(path: Path, offset: int) -> str:
    """What was appended to the log ``path`` after byte ``offset`` (this start's lines)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset if offset <= os.fstat(f.fileno()).st_size else 0)  # rotated: all
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def wait_ready(
    proc: subprocess.Popen[bytes],
    admin: Callable[[], Client],
    log: Path,
    log_offset: int = 0,
    timeout_s: float = 900,
    progress: Callable[[str], None] | None = None,
) -> m.SysInfoResult:
    """Wait until the daemon ``proc`` answers and every model is ready (or asleep beyond
    ``--max-loaded``: it loads on first use); KernelStartError otherwise."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise KernelStartError(
                f"the kernel exited with status {proc.returncode}", log_since(log, log_offset)
            )
        try:
            with admin() as c:
                info = c.info()
        except (SyscallError, OSError):
            info = None
        if info is not None:
            failed = [mod for mod in info.models if mod.state == "failed"]
            if failed:
                raise KernelStartError(
                    f"model {failed[0].name} failed to load: {failed[0].detail}",
                    log_since(log, log_offset),
                )
            if all(mod.state in ("ready", "asleep") for mod in info.models):
                return info
            if progress is not None:
                progress(
                    "; ".join(
                        f"{mod.name}: {mod.state} {mod.detail}".strip() for mod in info.models
                    )
                )
        time.sleep(0.2)
    raise KernelStartError(
        f"the kernel was not ready in {timeout_s:.0f} s", log_since(log, log_offset)
    )


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
        log = self.state_dir / "kernel.log"
        offset = log_size(log)
        self.proc = subprocess.Popen(
            daemon_command(list(self.args)),
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_ready(self.proc, self.admin, log, offset, timeout)
        return self

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
