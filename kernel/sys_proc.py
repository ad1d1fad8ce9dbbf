"""proc.* handlers: spawn, getpid, ps, wait, kill, exit, nice."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil

from kernel.process import INIT_PID, SIGNAL_STATUS, Caller, Proc, ProcState
from kernel.quota import Limits
from kernel.syscall import Call
from syscalls import models as m
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel


async def sys_spawn(k: Kernel, call: Call, a: m.SpawnArgs) -> m.SpawnResult:
    caller = call.caller
    if a.claim is not None and (made := _claimed(k, caller, a.claim)) is not None:
        made.new_token()  # the reply that carried the first token may never have arrived
        k.persist.saved(made)
        await k.persist.barrier()
        return m.SpawnResult(pid=made.pid, token=made.token)
    model = a.model or k.default_model
    if model not in k.drivers:
        raise SyscallError(
            Errno.ENOENT, f"no model named {model!r}; loaded: {', '.join(k.drivers)}"
        )
    if caller.proc is not None and a.nice < caller.proc.nice:
        raise SyscallError(
            Errno.EPERM,
            f"a child cannot run at nice {a.nice}, above its parent's {caller.proc.nice}",
        )
    _check_table_room(k, caller.proc)
    host_started = _host_started(a.host_pid) if a.host_pid is not None else None
    inherited = (
        caller.proc.adapter if caller.proc is not None and caller.proc.model == model else None
    )
    adapter = a.adapter if a.adapter is not None else inherited
    if adapter is not None and adapter not in (have := k.drivers[model].adapters()):
        raise SyscallError(
            Errno.ENOENT if have else Errno.ENOTSUP,
            f"model {model} has no LoRA adapter {adapter!r}; "
            + (
                f"it has: {', '.join(have)}"
                if have
                else "its driver serves none "
                "(the vllm driver takes --driver-option adapters=NAME=PATH)"
            ),
        )
    mounts = await _mounts(caller.proc, a.mounts)
    ppid = caller.pid if caller.proc is not None else INIT_PID
    proc = k.procs.spawn(
        ppid,
        a.name,
        model,
        a.nice,
        a.system,
        _limits(a.limits),
        _limits(a.program_limits),
        namespace=a.namespace,
        fork=a.fork,
    )
    if not a.fork:
        proc.ctx_policy, proc.ctx_window = a.ctx_policy, a.ctx_window
    elif "ctx_policy" in a.model_fields_set or a.ctx_window is not None:
        proc.ctx_policy, proc.ctx_window = a.ctx_policy, a.ctx_window or proc.ctx_window
    proc.host_pid, proc.host_started = a.host_pid, host_started
    proc.mounts = mounts
    proc.adapter = adapter
    parent = caller.proc
    proc.tool_caps = [
        *(parent.tool_caps if parent else []),
        *([list(a.tools)] if a.tools is not None else []),
    ]
    proc.confirm = a.confirm or (parent.confirm if parent else False)
    proc.claim = a.claim
    proc.redact = tuple(sorted({*(parent.redact if parent else ()), *(a.redact or ())}))
    proc.redact_model = a.redact_model or (parent.redact_model if parent else False)
    if proc.redact:  # its system prompt, or the copy a fork starts with, is stored masked
        start, proc.context = proc.context, []  # nothing unmasked is seen meanwhile
        proc.context[:0] = await k.redactor.mask_messages(start, proc.redact)
    k.memory.record(proc, proc.context)  # what it starts with is what it has seen
    k.persist.saved(proc)
    await k.persist.barrier()
    return m.SpawnResult(pid=proc.pid, token=proc.token)


def _claimed(k: Kernel, caller: Caller, claim: str) -> Proc | None:
    """The live process ``caller`` spawned with ``claim``, if any."""
    if caller.proc is not None:  # among its children
        kids = (k.procs.get(pid) for pid in caller.proc.children)
        return next((p for p in kids if p is not None and p.claim == claim and p.alive), None)
    return next((p for p in k.procs if p.claim == claim and p.ppid == INIT_PID and p.alive), None)


async def _mounts(
    parent: Proc | None, specs: list[m.MountSpec] | None
) -> dict[str, tuple[str, bool]]:
    """The mounts of a new process: its parent's by default; the admin mounts host
    directories, a process passes on its own mounts (never with more access)."""
    if specs is None:
        return dict(parent.mounts) if parent is not None else {}
    found: dict[str, tuple[str, bool]] = {}
    for spec in specs:
        if spec.name in found:
            raise SyscallError(Errno.EINVAL, f"two mounts are named {spec.name!r}")
        write = spec.mode == "rw"
        if parent is None:
            if spec.path is None or not os.path.isabs(spec.path):
                raise SyscallError(
                    Errno.EINVAL, f"mount {spec.name!r}: the admin gives an absolute host path"
                )
            real = await asyncio.to_thread(os.path.realpath, spec.path)
            if not await asyncio.to_thread(os.path.isdir, real):
                raise SyscallError(
                    Errno.ENOENT, f"mount {spec.name!r}: {spec.path} is not a directory"
                )
            found[spec.name] = (real, write)
            continue
        if spec.path is not None:
            raise SyscallError(
                Errno.EPERM,
                f"mount {spec.name!r}: only the admin mounts host directories; "
                "a process passes on one of its own mounts by name",
            )
        have = parent.mounts.get(spec.name)
        if have is None:
            raise SyscallError(
                Errno.EPERM,
                f"mount {spec.name!r}: process {parent.pid} has no such mount to pass on",
            )
        if write and not have[1]:
            raise SyscallError(
                Errno.EPERM,
                f"mount {spec.name!r} is read-only for process {parent.pid}: "
                "a child cannot get it read-write",
            )
        found[spec.name] = (have[0], write)
    return found


def _host_started(pid: int) -> float:
    """Start time of OS process ``pid`` on this host (EINVAL if there is none)."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        raise SyscallError(
            Errno.EINVAL, f"host_pid {pid} is not a running process on the kernel's host"
        ) from None


#: Slots of the process table only the admin may fill: it can always spawn and clean up.
ADMIN_RESERVE = 64


def _check_table_room(k: Kernel, parent: Proc | None) -> None:
    """EAGAIN when the process table is full for this caller: the admin may use all of
    it; programs leave the admin's reserve, and each program (zombies included) holds at
    most its share — its ``max_procs`` limit, or a quarter of the table — so one program
    cannot deny spawns to the others."""
    if len(k.procs) >= k.max_procs:
        raise SyscallError(
            Errno.EAGAIN, f"process table full ({k.max_procs} processes); wait for some to exit"
        )
    if parent is None:
        return
    if len(k.procs) >= k.max_procs - ADMIN_RESERVE:
        raise SyscallError(
            Errno.EAGAIN,
            f"process table nearly full: the last {ADMIN_RESERVE} of {k.max_procs} slots are "
            "kept for the admin; wait for processes to exit (and reap your zombies)",
        )
    program = parent.program
    share = program.account.limits.max_procs or max(1, k.max_procs // 4)
    held = sum(1 for p in k.procs if p.program is program)
    if held >= share:
        raise SyscallError(
            Errno.EAGAIN,
            f"program {program.pgid} holds {held} processes (zombies included), its share of "
            f"the process table (max_procs={share}); reap exited children or raise it with "
            "program_limits",
        )


def _limits(given: m.Limits | None) -> Limits | None:
    return None if given is None else Limits(**given.model_dump())


def sys_getpid(k: Kernel, call: Call, a: m.Empty) -> m.GetpidResult:
    proc = call.caller.proc
    assert proc is not None
    return m.GetpidResult(pid=proc.pid, ppid=proc.ppid)


#: Blocking syscalls as the wait channel ps shows (as Unix's WCHAN); the first one a
#: process has in flight names it, after a parked confirmation (``confirm:TOOL``).
WCHANS = {
    "llm.generate": "llm",
    "tool.call": "tool.call",
    "tool.next": "tool.next",
    "ipc.recv": "ipc.recv",
    "ipc.send": "ipc.send",
    "proc.wait": "wait",
    "llm.wait": "run.wait",
    "llm.stream": "run.stream",
}


def wait_channels(k: Kernel) -> Callable[[int], str]:
    """A function giving each process's wait channel now: ``confirm:TOOL`` while a call
    of an irreversible tool waits for a human, else its first blocking call in flight."""
    parked = {p.caller: p.tool.name for p in k.tools.parked.values()}

    def wchan(pid: int) -> str:
        if pid in parked:
            return f"confirm:{parked[pid]}"
        calls = k.calls_of(pid)
        if calls:
            names = {c.name for c in calls}
            for name, chan in WCHANS.items():
                if name in names:
                    return chan
        return ""

    return wchan


def proc_info(p: Proc, mailbox: int = 0, wchan: str = "") -> m.ProcInfo:
    """The ps row of a process (``mailbox``: messages waiting in its IPC mailbox;
    ``wchan``: what it is blocked in)."""
    return m.ProcInfo(
        pid=p.pid,
        ppid=p.ppid,
        name=p.name,
        owner=p.owner,
        state=p.state.value,
        nice=p.nice,
        model=p.model,
        context_messages=len(p.context),
        generate_calls=p.generate_calls,
        prompt_tokens=p.prompt_tokens,
        output_tokens=p.output_tokens,
        service_s=round(p.service_s, 6),
        wait_s=round(p.wait_s, 6),
        created=p.created,
        exit_status=p.exit_status,
        signal=p.signal,
        program=p.program.pgid,
        preemptions=p.preemptions,
        switch_prefill_tokens=p.switch_prefill_tokens,
        switch_s=round(p.switch_s, 6),
        limits=p.account.limits.as_dict(),
        quota_exceeded=p.account.exceeded or p.program.account.exceeded,
        mailbox=mailbox,
        redact=list(p.redact),
        wchan=wchan,
    )


def init_info(k: Kernel) -> m.ProcInfo:
    """The ps row of init (pid 1): the kernel's own parent of top-level processes and
    reaper of orphans; not an LLM process, so it has no context, model or tokens."""
    return m.ProcInfo(
        pid=INIT_PID,
        ppid=0,
        name="init",
        owner=k.procs.owner,
        state="WAITING",
        nice=0,
        model="",
        context_messages=0,
        generate_calls=0,
        prompt_tokens=0,
        output_tokens=0,
        service_s=0.0,
        wait_s=0.0,
        created=round(time.time() - k.uptime(), 3),
        program=INIT_PID,
    )


def sys_ps(k: Kernel, call: Call, a: m.PsArgs) -> m.PsResult:
    caller = call.caller
    if a.pid == INIT_PID:
        return m.PsResult(procs=[init_info(k)])
    if a.pid is not None:
        procs, more = [k.procs.target(caller, a.pid)], False
    else:

        def keep(p: Proc) -> bool:
            return (a.state is None or p.state == a.state) and (
                a.program is None or p.program.pgid == a.program
            )

        if caller.proc is None and a.state is not None:  # that state's own index
            pool = sorted(
                (p for p in k.procs.by_state[ProcState(a.state)].values() if p.pid > a.after),
                key=lambda p: p.pid,
            )
            found = [p for p in pool if a.program is None or p.program.pgid == a.program]
            procs, more = found[: a.limit], len(found) > a.limit
        elif caller.proc is None:
            procs, more = k.procs.page(a.after, a.limit, keep)
        else:
            mine = [caller.proc, *k.procs.descendants(caller.pid)]
            found = sorted((p for p in mine if p.pid > a.after and keep(p)), key=lambda p: p.pid)
            procs, more = found[: a.limit], len(found) > a.limit
    wchan = wait_channels(k)
    return m.PsResult(
        procs=[proc_info(p, k.ipc.depth(p.pid), wchan(p.pid)) for p in procs],
        next_after=procs[-1].pid if more else None,
    )


async def sys_wait(k: Kernel, call: Call, a: m.WaitArgs) -> m.WaitResult:
    zombie = await k.procs.wait(call.caller, a.pid, a.timeout)
    assert zombie.exit_status is not None
    return m.WaitResult(pid=zombie.pid, exit_status=zombie.exit_status, signal=zombie.signal)


def sys_kill(k: Kernel, call: Call, a: m.KillArgs) -> m.KillResult:
    if a.pid == INIT_PID:
        raise SyscallError(
            Errno.EPERM, "init (pid 1) is the kernel's reaper of orphans: it takes no signals"
        )
    proc = k.procs.target(call.caller, a.pid)
    if proc.alive:
        match a.signal:
            case "KILL":
                k.terminate(proc, SIGNAL_STATUS["KILL"], "KILL")
            case "TERM":
                if proc.busy:
                    proc.term_pending = True  # the current generation finishes first
                else:
                    k.terminate(proc, SIGNAL_STATUS["TERM"], "TERM")
            case "STOP":
                k.stop_process(proc)
                k.persist.saved(proc)
            case "CONT":
                k.continue_process(proc)
                k.persist.saved(proc)
    return m.KillResult(pid=proc.pid, state=proc.state.value)


def sys_exit(k: Kernel, call: Call, a: m.ExitArgs) -> m.Done:
    proc = call.caller.proc
    assert proc is not None
    k.terminate(proc, a.status, None)
    return m.Done()


def sys_nice(k: Kernel, call: Call, a: m.NiceArgs) -> m.NiceResult:
    proc = k.procs.target(call.caller, a.pid)
    if not proc.alive:
        raise SyscallError(Errno.ESRCH, f"process {proc.pid} has exited")
    caller = call.caller.proc
    if caller is not None and a.nice < caller.nice:
        raise SyscallError(
            Errno.EPERM,
            f"nice {a.nice} would rank above the caller's own {caller.nice}; only the admin may",
        )
    proc.nice = a.nice
    k.persist.saved(proc)
    return m.NiceResult(pid=proc.pid, nice=proc.nice)


HANDLERS = {
    "proc.spawn": sys_spawn,
    "proc.getpid": sys_getpid,
    "proc.ps": sys_ps,
    "proc.wait": sys_wait,
    "proc.kill": sys_kill,
    "proc.exit": sys_exit,
    "proc.nice": sys_nice,
}

__all__ = ["HANDLERS", "ProcState", "proc_info"]
