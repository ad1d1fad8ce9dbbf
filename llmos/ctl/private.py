"""Starting kernel daemons from the operator's tools: ``start_kernel`` (what ``llmos
kernel start``, ``llmos run``, the shell and the gateway call), the one ready-wait
(``wait_ready``) it shares with :class:`PrivateKernel` (a throwaway daemon on its own
runtime dir, for benchmarks, tests and scripts)."""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from kernel.daemon import daemon_command, running_pid, validate_options
from kernel.daemon import parser as daemon_parser
from llmos.client import Client
from syscalls import models as m
from syscalls import paths
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


err = Console(stderr=True, soft_wrap=True)  # a sentence is never cut into lines


def kernel_pid() -> int | None:
    """Pid of the kernel holding this runtime dir's lock, if one is running."""
    return running_pid(paths.runtime_dir())


def _already_running(pid: int, args: argparse.Namespace, options: list[str]) -> int:
    """A kernel runs already: 0 if it has what these options ask, else 1 naming the
    options that differ (a second kernel is not started, and the first keeps its own)."""
    info = try_info()
    differ: list[str] = []
    if info is not None:
        given = {o.split("=", 1)[0] for o in options if o.startswith("--")}
        first = info.models[0] if info.models else None
        wanted = {
            "--policy": (args.policy, info.policy),
            "--driver": (args.driver, first.driver if first else None),
            "--slots": (args.slots, first.slots if first else None),
            "--model-name": (args.model_name, first.name if first else None),
        }
        for flag, (asked, has) in wanted.items():
            if flag in given and asked != has:
                differ.append(f"{flag} {asked} (it runs with {has})")
        for ep in args.listen or []:
            if ep not in info.endpoints:
                differ.append(f"--listen {ep} (it serves {', '.join(info.endpoints)})")
    if differ:
        err.print(
            f"[red]a kernel is already running[/] (pid {pid}) with other options: "
            f"{'; '.join(differ)}. `llmos kernel stop` it first, or use another "
            "--runtime-dir for a second kernel",
            highlight=False,
        )
        return 1
    err.print(f"[yellow]a kernel is already running[/] (pid {pid}); `llmos kernel stop` to stop it")
    return 0


def start_kernel(options: list[str], wait: bool = True) -> int:
    """Start a detached kernel with the daemon's ``options`` (as given to ``llmos kernel
    start``, passed through unchanged) and, by default, wait until its models are ready."""
    args = daemon_parser().parse_args(options)  # the daemon's own parser: one definition
    try:
        validate_options(args)
    except ValueError as exc:
        err.print(f"[red]llmos kernel start:[/] {exc}", highlight=False)
        return 2
    if args.runtime_dir:
        os.environ["LLMOS_RUNTIME_DIR"] = str(args.runtime_dir)
    if args.state_dir:
        os.environ["LLMOS_STATE_DIR"] = str(args.state_dir)
    if (pid := kernel_pid()) is not None:
        return _already_running(pid, args, options)
    state = paths.ensure_private_dir(paths.state_dir())
    paths.ensure_private_dir(paths.runtime_dir())
    log = state / "kernel.log"
    offset = log_size(log)
    with open(state / "kernel.out", "ab") as out_file:
        proc = subprocess.Popen(
            daemon_command(options),
            stdin=subprocess.DEVNULL,
            stdout=out_file,
            stderr=out_file,
            start_new_session=True,
            cwd="/",
        )
    if not wait:
        err.print(f"kernel starting (pid {proc.pid}); log: {log}")
        return 0
    t0 = time.monotonic()
    try:
        with err.status("starting the kernel…") as status:
            info = wait_ready(
                proc,
                Client,
                log,
                offset,
                progress=lambda detail: status.update(f"loading model… {detail}"),
            )
    except KernelStartError as exc:
        err.print(f"[red]{exc.message}[/]; log: {log}")
        for line in exc.log.splitlines()[-15:]:
            err.print("  " + line, markup=False, highlight=False)
        return 1
    err.print(
        f"[green]kernel ready[/] (pid {info.kernel_pid}) on {info.endpoints[0]}; "
        f"models: {', '.join(mod.name for mod in info.models)}  "
        f"[dim]({time.monotonic() - t0:.1f} s)[/]"
    )
    if info.curve_server_key:
        err.print(
            f"CURVE server key: [bold]{info.curve_server_key}[/] (remote clients pin it with "
            f"LLMOS_SERVER_KEY; admit a client with `llmos clients add NAME PUBLIC_KEY`)",
            highlight=False,
        )
    return 0


def try_info() -> Any:
    try:
        with Client() as c:
            return c.info() if c.token else None
    except SyscallError:
        return None


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
