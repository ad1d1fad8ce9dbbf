"""Rich tables the command line and the shell both print."""

from __future__ import annotations

import json
import time

from rich.table import Table

from syscalls import models as m


def pending_table(calls: list[m.ParkedCall]) -> Table:
    """Irreversible tool calls waiting for the owner's approval."""
    table = Table(box=None, header_style="bold")
    for col in ("ID", "PID", "TOOL", "WAITING s", "ARGUMENTS"):
        table.add_column(col)
    for p in calls:
        table.add_row(
            str(p.id),
            str(p.caller),
            p.name,
            f"{time.time() - p.since:.0f}",
            json.dumps(p.args)[:200],
        )
    return table
