"""mcp.* handlers: mount, list and unmount MCP servers (the admin only).

The mechanism (sessions, supervision, the servers' tools in the tool table) is
:class:`kernel.mcp.McpHost`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from kernel.mcp import Mount, listed_target
from kernel.syscall import Call
from syscalls import models as m
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def _admin(call: Call, what: str) -> None:
    if call.caller.proc is not None:
        raise SyscallError(
            Errno.EPERM,
            f"only the kernel's owner (the admin) may {what}: an MCP server is "
            "trusted code run as the kernel's user",
        )


def info(mount: Mount) -> m.McpServerInfo:
    """What ``mcp.list`` says of a mount: names of its env and headers, never values."""
    return m.McpServerInfo(
        name=mount.name,
        target=listed_target(mount.target),
        transport=mount.transport,  # type: ignore[arg-type]
        state=mount.state,  # type: ignore[arg-type]
        tools=sorted(mount.tools),
        refused=list(mount.refused),
        restarts=mount.restarts,
        error=mount.error,
        env=sorted(mount.env),
        headers=sorted(mount.headers),
    )


async def sys_add(k: Kernel, call: Call, a: m.McpAddArgs) -> m.McpServerInfo:
    _admin(call, "mount an MCP server")
    wait = max(0.001, min(a.timeout_s, call.deadline - asyncio.get_running_loop().time() - 0.5))
    return info(await k.mcp.add(a.name, a.target, wait_s=wait, **secrets(a)))


def secrets(a: m.McpAddArgs) -> dict[str, dict[str, str]]:
    """The values behind ``a``'s SecretStr fields, for the mount only."""
    return {
        "env": {k: v.get_secret_value() for k, v in a.env.items()},
        "headers": {k: v.get_secret_value() for k, v in a.headers.items()},
    }


def sys_list(k: Kernel, call: Call, a: m.Empty) -> m.McpListResult:
    _admin(call, "list the MCP servers")
    return m.McpListResult(servers=[info(mount) for mount in k.mcp.mounts.values()])


async def sys_remove(k: Kernel, call: Call, a: m.McpNameArgs) -> m.Done:
    _admin(call, "unmount an MCP server")
    await k.mcp.remove(a.name)
    return m.Done()


HANDLERS = {
    "mcp.add": sys_add,
    "mcp.list": sys_list,
    "mcp.remove": sys_remove,
}
