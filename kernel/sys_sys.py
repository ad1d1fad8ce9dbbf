"""sys.* handlers: what this kernel is and what it runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.syscall import Call
from syscalls import limits
from syscalls import models as m

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def sys_info(k: Kernel, call: Call, a: m.Empty) -> m.SysInfoResult:
    from kernel.kernel import VERSION

    models = []
    for name, driver in k.drivers.items():
        info = driver.info()
        models.append(m.ModelRow(
            name=name, driver=info.driver, max_context=info.max_context, slots=info.slots,
            busy=k.scheduler.busy(name), queued=k.scheduler.queued(name), state=info.state, detail=info.detail,
        ))
    return m.SysInfoResult(
        version=VERSION, abi=limits.ABI_VERSION, uptime_s=round(k.uptime(), 3),
        kernel_pid=k.kernel_pid, endpoints=k.endpoints, models=models, processes=len(k.procs),
        policy=k.scheduler.policy.name,
    )


HANDLERS = {"sys.info": sys_info}
