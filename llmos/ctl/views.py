"""What the operator's commands share: rich tables the command line and the shell both
print, and option parsers several commands use."""

from __future__ import annotations

import json
import time

from rich.table import Table

from syscalls import models as m
from syscalls.errors import Errno, SyscallError


def pending_table(calls: list[m.ParkedCall], names: dict[int, str] | None = None) -> Table:
    """Irreversible tool calls waiting for the owner's approval: which process (``names``:
    pid -> process name), since when, what it asks."""
    table = Table(box=None, header_style="bold")
    for col in ("ID", "PID", "NAME", "TOOL", "SINCE", "WAITING s", "ARGUMENTS"):
        table.add_column(col)
    for p in calls:
        table.add_row(
            str(p.id),
            str(p.caller),
            (names or {}).get(p.caller, "?"),
            p.name,
            time.strftime("%H:%M:%S", time.localtime(p.since)),
            f"{time.time() - p.since:.0f}",
            json.dumps(p.args)[:200],
        )
    return table


def parse_limits(items: list[str] | None) -> dict[str, float] | None:
    """``["max_wall_s=60", ...]`` -> spawn limits (validated by the SDK and the kernel)."""
    if not items:
        return None
    limits: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            limits[key.strip()] = float(value) if "." in value else int(value)
        except ValueError:
            raise SyscallError.of(Errno.EINVAL, f"--limit {item!r}: expected KEY=NUMBER") from None
        if not sep:
            raise SyscallError.of(Errno.EINVAL, f"--limit {item!r}: expected KEY=NUMBER")
    return limits
