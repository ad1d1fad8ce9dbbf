"""The kernel object: process table + scheduler + drivers + dispatch + transport.

No global state: tests start a :class:`Kernel` in-process; the daemon (``kernel/daemon.py``)
wraps one with a lock file, signals and a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import secrets
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from drivers.base import Driver, DriverError
from kernel import (
    sys_ctx,
    sys_fs,
    sys_ipc,
    sys_llm,
    sys_mcp,
    sys_mem,
    sys_proc,
    sys_sys,
    sys_tool,
)
from kernel.audit import Audit
from kernel.builtin_tools import builtin_tools
from kernel.curve import ServerCurve
from kernel.fs import FileSystem, load_index
from kernel.ipc import Ipc
from kernel.mcp import McpHost
from kernel.memory import Memory
from kernel.metrics import KernelMetrics
from kernel.persist import Persist, instance_id, recover
from kernel.process import Caller, Proc, ProcessTable, ProcState
from kernel.redact import Redactor
from kernel.residency import MIN_AWAKE_S, Residency
from kernel.runs import RunTable
from kernel.sandbox import SandboxConfig
from kernel.scheduler import DEFAULT_POLICY, POLICIES, Scheduler, make_policy
from kernel.stats import KernelStats
from kernel.store import Store
from kernel.syscall import Call, Dispatcher, build_table
from kernel.tools import ToolTable
from kernel.trace import TRACE_DIR, Observer
from kernel.transport import Transport
from kernel.vindex import VectorIndex
from syscalls import limits
from syscalls import models as m
from syscalls.errors import Errno, SyscallError
from syscalls.table import SyscallSpec

log = logging.getLogger("llmos.kernel")

VERSION = "0.1.0"

#: The dispatch table: syscall name -> handler, one module per syscall family.
HANDLERS = {
    **sys_proc.HANDLERS,
    **sys_llm.HANDLERS,
    **sys_ctx.HANDLERS,
    **sys_mem.HANDLERS,
    **sys_fs.HANDLERS,
    **sys_tool.HANDLERS,
    **sys_mcp.HANDLERS,
    **sys_ipc.HANDLERS,
    **sys_sys.HANDLERS,
}

#: The state database's file name in the kernel's state directory.
STATE_DB = "state.db"


def default_embedder() -> Any:
    """The packaged sentence-embedding model (loaded on first use), or None if the
    embedding code cannot be imported."""
    try:
        from kernel.embed import Embedder
    except ImportError:  # pragma: no cover - numpy/transformers missing
        log.warning("no embedding model: archival memory search is off")
        return None
    return Embedder(threads=1)  # two torch threads beside the model driver run 4-30x slower here


def _load_progress(name: str) -> Any:
    """A driver's load/wake progress, logged."""
    return lambda desc, frac: log.info(
        "%s: %s %s", name, desc, "" if frac is None else f"{frac:.0%}"
    )


def _dim_of(embedder: Any) -> int:
    """The embedding width (read from the model's config; 384, MiniLM's, if unknown)."""
    try:
        return int(embedder.dim) if embedder is not None else 384
    except Exception:  # the model package is missing: mem.put/search will say so
        return 384


class Kernel:
    """An llmos kernel serving ``endpoints`` with ``drivers`` (model name -> driver)."""

    def __init__(
        self,
        drivers: dict[str, Driver],
        endpoints: list[str],
        admin_token: str | None = None,
        policy: str = DEFAULT_POLICY,
        quantum: int | None = None,
        max_procs: int = 4096,
        max_topics: int = limits.MAX_TOPICS,
        max_ipc_bytes: int = limits.MAX_IPC_BYTES,
        max_parked: int = limits.MAX_PARKED_CALLS,
        max_calls_in_flight: int = limits.MAX_CALLS_IN_FLIGHT,
        zombie_ttl_s: float = 600.0,
        state_dir: Path | None = None,
        embedder: Any = "default",
        max_loaded: int | None = None,
        min_awake_s: float = MIN_AWAKE_S,
        sandbox: SandboxConfig | None = None,
        mcp: list[m.McpAddArgs] | None = None,
        run_journal: bool = True,
        trace: bool = False,
        otlp_endpoint: str | None = None,
        metrics: tuple[str, int] | None = None,
        fs_versions: int = limits.MAX_FS_VERSIONS,
        fs_history_bytes: int | None = None,
        curve: ServerCurve | None = None,
        state_key: bytes | None = None,
    ) -> None:
        if not drivers:
            raise ValueError("a kernel needs at least one model driver")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        self.drivers = drivers
        self.default_model = next(iter(drivers))
        self.endpoints = endpoints
        self.admin_token = admin_token or secrets.token_urlsafe(32)
        self.max_procs = max_procs
        self.zombie_ttl_s = zombie_ttl_s
        self.procs = ProcessTable(owner=getpass.getuser())
        # Durable state: the process table's journal and the memory tiers share one
        # SQLite database (in memory when no state directory is given, e.g. unit tests).
        self.store = Store(state_dir / STATE_DB if state_dir is not None else None, state_key)
        embedder = default_embedder() if embedder == "default" else embedder
        self.memory = Memory(self.store, self.procs, embedder, VectorIndex(_dim_of(embedder)))
        # Files: real directories under the state dir (a temporary one without it).
        self._scratch = (
            None if state_dir is not None else tempfile.TemporaryDirectory(prefix="llmos-files-")
        )
        files = state_dir / "files" if state_dir is not None else Path(self._scratch.name)  # type: ignore[union-attr]
        self.fs = FileSystem(files, self.store, self.memory, fs_versions, fs_history_bytes)
        # Who did what: hash-chained in the state database, old rows in segment files.
        # PII masking for processes spawned with redact=[...], on a thread of its own.
        self.redactor = Redactor()
        self.audit = Audit(
            self.store,
            state_dir / "audit" if state_dir is not None else None,
            redactor=self.redactor,
        )
        self.tools = ToolTable(builtin_tools())
        self.tools.max_parked = max_parked
        # MCP servers mounted as tools (--mcp: name, command line or URL, env or headers),
        # on a loop of their own; no server is ever given the admin token.
        self.mcp = McpHost(self.tools, kernel_secrets=(self.admin_token,))
        self._mcp_mounts = list(mcp or [])
        # How the python tool runs code: in bwrap namespaces, or not at all without it.
        self.sandbox = sandbox if sandbox is not None else SandboxConfig.detect()
        self.persist = Persist(self.store, self.procs, on_drop=self._drop_namespace)
        self.procs.journal = self.persist
        self.ipc = Ipc(self.procs, max_bytes=max_ipc_bytes, max_topics=max_topics)
        # Detached generations, journaled so they go on after a restart (unless told not to).
        self.runs = RunTable(self.store, self.procs, journal=run_journal)
        self.scheduler = Scheduler(
            {name: d.slots for name, d in drivers.items()},
            make_policy(policy, quantum),
            procs=self.procs,
        )
        self.running: dict[int, str] = {}  # pid -> driver request id on a slot now
        self.stats = KernelStats()
        self._calls: dict[int, set[Call]] = defaultdict(set)  # caller pid -> async calls
        # Which models are loaded: all of them, unless max_loaded says fewer fit at once.
        self.residency = Residency(drivers, max_loaded, min_awake_s, progress=_load_progress)
        self._tasks: list[asyncio.Task[None]] = []
        # Observability: spans per syscall (kernel/trace.py) and Prometheus metrics
        # (kernel/metrics.py), both fed by one hook of the dispatcher; None when both are off.
        self.metrics = KernelMetrics(self, metrics) if metrics is not None else None
        self.observer = (
            Observer(
                state_dir / TRACE_DIR if state_dir is not None and trace else None,
                trace=trace,
                otlp_endpoint=otlp_endpoint,
                on_call=self.metrics.on_call if self.metrics is not None else None,
                version=VERSION,
            )
            if trace or metrics is not None
            else None
        )
        if self.metrics is not None:
            self.metrics.observer = self.observer
            self.store.on_commit = self.metrics.on_commit
        self.curve = curve
        self.transport = Transport(endpoints, self._on_frames, curve)
        self.dispatcher = Dispatcher(self, build_table(HANDLERS), self.transport.send)
        self.dispatcher.max_calls = max_calls_in_flight
        self.started = time.monotonic()
        self.kernel_pid = os.getpid()
        #: This state database's instance id (kept across restarts; read at start):
        #: with a pid, the session key routers see (``llmos-<instance>-<pid>``).
        self.instance = secrets.token_hex(4)
        self._stopped = asyncio.Event()

    # -- life ------------------------------------------------------------------------
    async def start(self) -> None:
        """Recover the state database, bind the endpoints, start serving, and load the
        models in the background."""
        loop = asyncio.get_running_loop()
        if self.metrics is not None:
            self.metrics.start(loop)  # binds its address first: a taken one fails the start
        if self.observer is not None:
            self.observer.start()
        found = await asyncio.to_thread(recover, self.store, self.procs, self.persist)
        self.instance = await self.store.call(instance_id)
        unfinished = await asyncio.to_thread(self.runs.load)
        entries = await asyncio.to_thread(self.memory.load)
        if self.memory.index is not None:
            await self.store.call(load_index, self.memory.index)
        if any(p.redact for p in self.procs):
            self.redactor.preload()  # their audit rows are masked in the store thread
        if found.procs or entries:
            log.info(
                "recovered %d processes (%d hung up: their programs died), %d archival entries; next pid %d",
                found.procs,
                len(found.hung_up),
                entries,
                found.next_pid,
            )
        self.transport.bind()
        self.transport.start()
        sys_llm.resume_runs(self, unfinished)
        self.audit.record(
            None,
            "kernel.start",
            "ok",
            detail=f"kernel {VERSION}, pid {os.getpid()}; recovered {found.procs} processes "
            f"({len(found.hung_up)} hung up)",
        )
        self.residency.start()
        self.mcp.start()
        for spec in self._mcp_mounts:  # retried with backoff until they come up
            await self.mcp.add(spec.name, spec.target, **sys_mcp.secrets(spec))
        self._tasks.append(loop.create_task(self._init_reaper(), name="init"))
        log.info(
            "kernel %s serving %s (policy %s)",
            VERSION,
            ", ".join(self.endpoints),
            self.scheduler.policy.name,
        )

    @contextlib.asynccontextmanager
    async def use_model(self, name: str) -> AsyncIterator[Driver]:
        """Model ``name``'s driver, held awake for the body (waits while it loads, sleeps
        or wakes); EIO if it failed to load or to wake."""
        try:
            driver = await self.residency.acquire(name)
        except DriverError as exc:
            raise SyscallError(Errno.EIO, f"model {name} failed to load: {exc}") from None
        try:
            yield driver
        finally:
            self.residency.release(name)

    async def _init_reaper(self) -> None:
        """Init's housekeeping: reap top-level zombies nobody waited for."""
        while True:
            await asyncio.sleep(min(30.0, max(self.zombie_ttl_s / 4, 0.05)))
            for pid in self.procs.reap_stale(self.zombie_ttl_s):
                log.info("init reaped unwaited zombie %d", pid)

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    def request_stop(self) -> None:
        self._stopped.set()

    async def stop(self) -> None:
        """Answer calls in flight with ESHUTDOWN, close the socket, unload models."""
        self._stopped.set()
        runs = [r.call.task for r in self.runs.close() if r.call is not None and r.call.task]
        for task in runs:  # they stay journaled as they are and go on at the next start
            task.cancel()
        if runs:
            await asyncio.wait(runs, timeout=5)
        await self.dispatcher.shutdown()
        self.audit.flush_auth()
        self.audit.record(None, "kernel.stop", "ok", detail="clean shutdown")
        await self.mcp.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0.05)  # let the last replies leave the socket
        await self.transport.close()
        await self.residency.close()
        for driver in self.drivers.values():
            try:
                await driver.shutdown()
            except Exception:
                log.exception("driver shutdown failed")
        self.memory.close()
        if self.observer is not None:  # the last spans, then the exporters' flush
            await asyncio.to_thread(self.observer.close)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        await asyncio.to_thread(self.store.close)
        self.redactor.close()
        if self._scratch is not None:
            self._scratch.cleanup()

    def _drop_namespace(self, namespace: str) -> None:
        """A namespace's last owner was reaped: forget its memory and its files."""
        self.memory.drop(namespace)
        self.fs.drop(namespace)

    # -- dispatch hooks ------------------------------------------------------------
    def _on_frames(self, parts: list[bytes]) -> None:
        self.dispatcher.on_frames(parts)

    def audit_detail(self, name: str, args: Any, caller: Caller) -> str:
        """What an audit row says beyond the call's target: a tool call's irreversibility."""
        if name == "tool.call":
            tool = self.tools.resolve(caller.proc, args.name)
            return "irreversible" if tool is not None and tool.irreversible else ""
        return ""

    def authenticate(self, pid: int, token: str, spec: SyscallSpec) -> Caller:
        """Resolve the caller of a syscall: the admin (pid 0) or a live process."""
        if pid == 0:
            if not secrets.compare_digest(token.encode(), self.admin_token.encode()):
                raise SyscallError(
                    Errno.EACCES, "pid 0 is the admin and needs the kernel's admin token"
                )
            if spec.needs_process:
                raise SyscallError(
                    Errno.EACCES,
                    f"{spec.name} acts on the calling process: call it with a process's pid and token",
                )
            return Caller(0, None)
        return Caller(pid, self.procs.authenticate(pid, token))

    def track(self, call: Call) -> None:
        if call.caller.proc is not None:
            self._calls[call.caller.pid].add(call)

    def calls_in_flight(self, pid: int) -> int:
        """Asynchronous calls process ``pid`` has in flight."""
        return len(self._calls.get(pid, ()))

    def untrack(self, call: Call) -> None:
        calls = self._calls.get(call.caller.pid)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self._calls[call.caller.pid]

    def calls_of(self, pid: int) -> set[Call]:
        """Process ``pid``'s asynchronous calls in flight (its detached runs included)."""
        return self._calls.get(pid, set())

    def interrupt_calls(self, pid: int, name: str, error: SyscallError) -> int:
        """Answer process ``pid``'s calls of syscall ``name`` in flight with ``error`` now
        (their handlers' ``finally`` give back what they held); how many there were."""
        calls = [c for c in self._calls.get(pid, ()) if c.name == name]
        for call in calls:
            call.interrupt(error)
        return len(calls)

    # -- process control (the mechanism behind proc.kill / proc.exit) ----------------
    def terminate(self, proc: Proc, status: int, signal: str | None) -> None:
        """End ``proc`` now: it becomes a zombie, every call it has in flight (a
        generation on a slot, an ipc.recv included) is answered with ECANCELED at once,
        and its IPC mailbox and subscriptions vanish."""
        if not proc.alive:
            return
        self.procs.exit(proc, status, signal)
        if self.observer is not None:
            self.observer.exited(proc)
        self.tools.server_gone(proc.pid)
        how = f"killed by SIG{signal}" if signal else f"exited with status {status}"
        for call in list(self._calls.pop(proc.pid, ())):
            call.interrupt(
                SyscallError(Errno.ECANCELED, f"process {proc.pid} {how} during {call.name}")
            )
        self.ipc.close(
            proc.pid
        )  # its mailbox and subscriptions go; senders waiting on it get ESRCH
        log.info("process %d (%s) %s", proc.pid, proc.name, how)

    def stop_process(self, proc: Proc) -> None:
        """SIGSTOP: park the process; a generation on a slot stops at the next token
        and gives the slot back (its tokens so far are kept for SIGCONT)."""
        if proc.state is ProcState.STOPPED:
            return
        self.procs.stop(proc)
        rid = self.running.get(proc.pid)
        if rid is not None:
            self.drivers[proc.model].abort(rid)

    def continue_process(self, proc: Proc) -> None:
        """SIGCONT: a stopped process becomes runnable again where it left off."""
        if proc.state is not ProcState.STOPPED:
            return
        self.procs.cont(proc)
        self.scheduler.kick(proc.model)

    def uptime(self) -> float:
        return time.monotonic() - self.started
