"""sys.* handlers: what this kernel is, what it runs, and how busy it is."""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING

from kernel.process import Proc, ProcState
from kernel.sys_proc import proc_info, wait_channels
from kernel.syscall import Call
from syscalls import limits
from syscalls import models as m
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def sys_info(k: Kernel, call: Call, a: m.Empty) -> m.SysInfoResult:
    from kernel.kernel import VERSION

    models = []
    for name, driver in k.drivers.items():
        info = driver.info()
        models.append(
            m.ModelRow(
                name=name,
                driver=info.driver,
                max_context=info.max_context,
                slots=info.slots,
                busy=k.scheduler.busy(name),
                queued=k.scheduler.queued(name),
                state=model_state(k, name, info.state),
                detail=info.detail,
                default=name == k.default_model,
                adapters=driver.adapters(),
                wakes=k.residency.stats(name)["wakes"],
            )
        )
    return m.SysInfoResult(
        version=VERSION,
        abi=limits.ABI_VERSION,
        uptime_s=round(k.uptime(), 3),
        kernel_pid=k.kernel_pid,
        endpoints=k.endpoints,
        models=models,
        processes=len(k.procs),
        policy=k.scheduler.policy.name,
        sandbox=k.sandbox.mode,
        curve_server_key=k.curve.pair.public if k.curve is not None else None,
    )


def model_state(k: Kernel, name: str, driver_state: str) -> str:
    """The driver's state, or where the kernel has it: asleep, sleeping, waking."""
    residence = k.residency.state(name)
    return residence if residence in ("asleep", "sleeping", "waking") else driver_state


#: The order of sys.stat's rows: the processes on slots first, then the queued, ...
STAT_ORDER = (
    ProcState.RUNNING,
    ProcState.READY,
    ProcState.STOPPED,
    ProcState.NEW,
    ProcState.WAITING,
    ProcState.ZOMBIE,
)


def visible_procs(k: Kernel, call: Call) -> list[Proc]:
    """The processes the caller may see, as proc.ps shows them: all for the admin; the
    caller and its descendants for a process."""
    caller = call.caller
    if caller.proc is None:
        return sorted(k.procs, key=lambda p: p.pid)
    return [caller.proc, *k.procs.descendants(caller.pid)]


def sys_stat(k: Kernel, call: Call, a: m.StatArgs) -> m.StatResult:
    """The system state vector S = (CPU, MEM, NET, JOBS): model slots and queues, process
    counts per state, token rates, host figures, and the caller-visible process rows.
    Synchronous and non-blocking: a table walk and a few /proc reads."""
    models = []
    for name, driver in k.drivers.items():
        info = driver.info()
        models.append(
            m.ModelStat(
                name=name,
                driver=info.driver,
                slots=info.slots,
                busy=k.scheduler.busy(name),
                queued=k.scheduler.queued(name),
                state=model_state(k, name, info.state),
                memory_bytes=info.memory_bytes,
                **k.residency.stats(name),
            )
        )
    if call.caller.proc is None:  # the admin sees the whole table: counts kept per state
        by_state = k.procs.by_state
        states = {s.value: len(by_state[s]) for s in ProcState}
        rows = list(
            itertools.islice(
                itertools.chain.from_iterable(by_state[s].values() for s in STAT_ORDER),
                a.limit if a.procs else 0,
            )
        )
    else:
        procs = visible_procs(k, call)
        states = dict.fromkeys((s.value for s in ProcState), 0)
        for p in procs:
            states[p.state.value] += 1
        rank = {s: i for i, s in enumerate(STAT_ORDER)}
        rows = sorted(procs, key=lambda p: (rank[p.state], p.pid))[: a.limit] if a.procs else []
    st = k.stats
    tokens = m.TokenStat(
        window_s=st.window_s,
        prompt_tps=round(st.prompt.rate(), 3),
        output_tps=round(st.output.rate(), 3),
        prompt_total=st.prompt.total,
        output_total=st.output.total,
        cached_total=st.cached,
    )
    wchan = wait_channels(k)
    return m.StatResult(
        time=time.time(),
        uptime_s=round(k.uptime(), 3),
        policy=k.scheduler.policy.name,
        models=models,
        states=states,
        tokens=tokens,
        host=m.HostStat(**st.host.sample().as_dict()),
        procs=[proc_info(p, k.ipc.depth(p.pid), wchan(p.pid)) for p in rows],
        procs_total=sum(states.values()),
    )


async def sys_audit(k: Kernel, call: Call, a: m.AuditArgs) -> m.AuditResult:
    if not call.caller.admin:
        raise SyscallError(Errno.EPERM, "only the kernel's owner (the admin) reads the audit trail")
    rows = await k.store.call(k.audit.query, a.pid, a.program, a.since, a.limit)
    verdict = None
    if a.verify:
        found = await k.store.call(k.audit.verify)
        verdict = m.AuditVerdict(
            ok=found.ok, rows=found.rows, first_broken=found.first_broken, reason=found.reason
        )
    return m.AuditResult(rows=[m.AuditRow(**r) for r in rows], verified=verdict)


HANDLERS = {"sys.info": sys_info, "sys.stat": sys_stat, "sys.audit": sys_audit}
