"""The sandbox code a process runs in (the built-in ``python`` tool).

Code runs in Linux namespaces made by bubblewrap (``bwrap``): no network, its own pid
namespace (nothing outside it is visible, and everything in it dies with it), a private
``/tmp``, the system's ``/usr`` and the interpreter read-only, no ``/etc``, and one
writable directory: the caller's file root, mounted at ``/work``. The state dir, the
runtime dir (admin token, socket), the kernel's ``/proc`` and other processes' roots are
not in its mount namespace at all; all capabilities are dropped, the environment is
cleared, and CPU, memory, file-size, open-file and (for a kernel not running as root)
process-count rlimits apply. The wall-clock limit kills the sandbox's process group;
its pid namespace takes every descendant with it, ``setsid`` or not.

Where ``bwrap`` is missing the tool answers ``ENOTSUP`` — unless the kernel's operator
started it with ``--unsafe-python``, which runs the code as a plain child process with
rlimits only (no isolation: it can read what the kernel's user can).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import resource
import shutil
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syscalls import limits
from syscalls.errors import Errno, SyscallError

#: Most output (bytes) returned of each stream.
MAX_OUTPUT = 64 << 10

#: Processes (tasks) the sandboxed code may add to the kernel user's count, where
#: RLIMIT_NPROC binds (not for root, whom Linux exempts).
MAX_EXTRA_TASKS = 64

#: Where the caller's file root appears inside the sandbox.
WORKDIR = "/work"


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """How the kernel runs code: isolated with bwrap (the default), or, only when the
    operator opted in, unisolated."""

    bwrap: str | None = None  # path of bwrap; None: not installed
    unsafe: bool = False  # run without isolation when bwrap is missing

    @classmethod
    def detect(cls, unsafe: bool = False) -> SandboxConfig:
        """Find ``bwrap`` on ``PATH`` and check it can make namespaces here."""
        path = shutil.which("bwrap")
        if path is not None and not _bwrap_works(path):
            path = None
        return cls(bwrap=path, unsafe=unsafe)

    @property
    def available(self) -> bool:
        return self.bwrap is not None or self.unsafe

    @property
    def mode(self) -> str:
        """``bwrap``, ``unsafe`` or ``off`` (for sys.info and the docs)."""
        return "bwrap" if self.bwrap else "unsafe" if self.unsafe else "off"


def _bwrap_works(path: str) -> bool:
    """bwrap may be installed where user namespaces are not allowed (some containers)."""
    import subprocess

    try:
        done = subprocess.run(
            [path, *_bwrap_base_args(), "--", _interpreter(), "-I", "-c", "pass"],
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _interpreter() -> str:
    """The base interpreter (not a virtualenv's wrapper: its folder is not mounted)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(base)


def _system_binds() -> list[str]:
    """Read-only binds of the system (``/usr`` and its merged-usr links) and of the
    interpreter's own prefix when it lives elsewhere (pyenv, /opt)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64"):
        path = Path("/") / top
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    prefixes.add(os.path.dirname(os.path.dirname(stdlib)))
    interp_dir = os.path.dirname(os.path.dirname(_interpreter()))
    prefixes.add(interp_dir)
    for prefix in sorted(prefixes):
        if prefix != "/" and not prefix.startswith("/usr") and os.path.isdir(prefix):
            args += ["--ro-bind", prefix, prefix]
    return args


def _bwrap_base_args() -> list[str]:
    return [
        "--unshare-all",  # net, pid, ipc, uts, cgroup (and user where allowed)
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "PYTHONIOENCODING",
        "utf-8",
        "--setenv",
        "HOME",
        WORKDIR,
        *_system_binds(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
    ]


#: Signals by which the kernel enforces a limit, and the limit each one means.
_LIMIT_SIGNALS = {signal.SIGXCPU: "cpu_time", signal.SIGXFSZ: "file_size"}


def _limit_child(cpu_s: int, memory_bytes: int, nproc: int | None) -> None:
    """In the child, before exec: its resource limits (inherited by the sandbox), all
    computed by the parent, so the forked child only makes setrlimit calls (a forked
    child of a threaded process must do as little as it can before exec). The CPU
    limit's soft part sends SIGXCPU (so a CPU-limit death is told apart from a kill);
    the hard part, a second later, kills code that ignores it."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.MAX_FILE_BYTES, limits.MAX_FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if nproc is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _nproc_cap() -> int | None:
    """The RLIMIT_NPROC to give sandboxed code: the user's tasks now plus
    MAX_EXTRA_TASKS, never above the hard limit; None for root (whom Linux exempts).
    Scans /proc: run it in the parent, off the event loop."""
    if os.getuid() == 0:
        return None
    cap = _tasks_of_user() + MAX_EXTRA_TASKS
    _, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    return cap if hard == resource.RLIM_INFINITY else min(cap, hard)


def _tasks_of_user() -> int:
    """Threads and processes the current user has (what RLIMIT_NPROC counts)."""
    uid = os.getuid()
    count = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


async def run_code(
    config: SandboxConfig,
    code: str,
    root: Path,
    timeout_s: float,
    cpu_s: int | None = None,
    memory_bytes: int = limits.PY_MEMORY_BYTES,
) -> dict[str, Any]:
    """Run Python ``code`` with ``root`` as its only writable directory, never longer
    than ``timeout_s``; ENOTSUP when no sandbox is available and unsafe runs are off."""
    if not config.available:
        raise SyscallError(
            Errno.ENOTSUP,
            "code execution needs bubblewrap (bwrap), which this kernel cannot use: install "
            "it (Debian/Ubuntu: apt-get install bubblewrap), or start the kernel with "
            "--unsafe-python to run code without isolation",
        )
    # One second of CPU more than the wall clock: single-threaded code always meets the
    # wall clock first, so the same program reports the same limit every time.
    cpu = cpu_s or math.ceil(timeout_s) + 1
    root.mkdir(parents=True, exist_ok=True)
    nproc = await asyncio.to_thread(_nproc_cap)
    if config.bwrap is not None:
        argv = [
            config.bwrap,
            *_bwrap_base_args(),
            "--bind",
            str(root),
            WORKDIR,
            "--chdir",
            WORKDIR,
            "--",
            _interpreter(),
            "-I",
            "-c",
            code,
        ]
        cwd, env = "/", {}
    else:
        argv = [sys.executable, "-I", "-c", code]
        cwd = str(root)
        env = {"PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8", "HOME": str(root)}
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env=env,
        preexec_fn=lambda: _limit_child(cpu, memory_bytes, nproc),
    )
    t0 = time.monotonic()
    timed_out = False
    try:
        out, err = await asyncio.wait_for(_read_capped(proc), timeout_s)
    except TimeoutError:
        timed_out = True
        _kill_group(proc.pid)
        out, err = b"", b""
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            await proc.wait()
    status = proc.returncode
    if config.bwrap is not None and status is not None and status > 128 and not timed_out:
        status = 128 - status  # bwrap's init reports its child's signal N as 128 + N
    signo = -status if status is not None and status < 0 else None
    stderr = err.decode("utf-8", "replace")
    return {
        "exit_code": status,
        "stdout": out.decode("utf-8", "replace"),
        "stderr": stderr,
        "timed_out": timed_out,
        "signal": None if timed_out else signo,
        "limit": _limit_hit(timed_out, signo, status, stderr),
        "wall_s": round(time.monotonic() - t0, 3),
        "sandbox": config.mode,
    }


def _limit_hit(timed_out: bool, signo: int | None, status: int | None, stderr: str) -> str | None:
    """Which limit ended the run, if one did: wall_clock, cpu_time, file_size or memory."""
    if timed_out:
        return "wall_clock"
    if signo is not None and signo in _LIMIT_SIGNALS:
        return _LIMIT_SIGNALS[signal.Signals(signo)]
    if status not in (0, None) and stderr.rstrip().endswith("MemoryError"):
        return "memory"
    if status not in (0, None) and f"[Errno {errno.EFBIG}]" in stderr:
        return "file_size"  # Python ignores SIGXFSZ: the write fails with EFBIG instead
    return None


async def _read_capped(proc: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    async def drain(stream: asyncio.StreamReader | None) -> bytes:
        kept = b""
        while stream is not None and (piece := await stream.read(65536)):
            if len(kept) < MAX_OUTPUT:
                kept += piece[: MAX_OUTPUT - len(kept)]
        return kept

    out, err = await asyncio.gather(drain(proc.stdout), drain(proc.stderr))
    await proc.wait()
    return out, err


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, 9)
