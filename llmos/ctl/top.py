"""``llmos top``: a live rich view of ``sys.stat`` (models, states, token rates, host, the
process table sorted by %TOK; %TOK computed client-side from two successive snapshots,
like top's %CPU)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from llmos.client import connect
from syscalls import models as m

out = Console()


def _size(n: int | None) -> str:
    """Bytes for people: 1.5 GiB, 812 MiB."""
    if n is None:
        return "?"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    x, i = float(n), 0
    while x >= 1024 and i < len(units) - 1:
        x, i = x / 1024, i + 1
    return f"{x:.0f} {units[i]}" if i == 0 or x >= 100 else f"{x:.1f} {units[i]}"


def tok_shares(snap: m.StatResult, prev: m.StatResult | None) -> dict[int, float]:
    """%TOK per pid: each process's share of the output tokens its visible peers generated
    between ``prev`` and ``snap`` (like top's %CPU). Without ``prev``, shares of the
    lifetime totals. A pid absent from ``prev`` is new: all its tokens are recent."""
    before = {p.pid: p.output_tokens for p in prev.procs} if prev is not None else {}
    made = {p.pid: max(p.output_tokens - before.get(p.pid, 0), 0) for p in snap.procs}
    total = sum(made.values())
    return {pid: (100.0 * n / total if total else 0.0) for pid, n in made.items()}


def top_view(snap: m.StatResult, prev: m.StatResult | None, max_rows: int | None = None) -> Any:
    """One frame of ``llmos top``: the header (models, states, token rates, host) and the
    process table sorted by %TOK."""
    from rich.console import Group
    from rich.text import Text

    h, t = snap.host, snap.tokens
    up = time.strftime("%H:%M:%S", time.gmtime(snap.uptime_s))
    days = int(snap.uptime_s // 86400)
    lines = [
        Text.from_markup(
            f"[bold]llmos top[/]  {time.strftime('%H:%M:%S', time.localtime(snap.time))}  "
            f"up {f'{days}d ' if days else ''}{up}  policy {snap.policy}"
        )
    ]
    for mod in snap.models:
        mem = f", {_size(mod.memory_bytes)}" if mod.memory_bytes is not None else ""
        lines.append(
            Text.from_markup(
                f"[bold]model[/]  {mod.name} ({mod.driver}, {mod.state}{mem}): "
                f"slots [bold]{mod.busy}[/]/{mod.slots} busy, [bold]{mod.queued}[/] queued"
            )
        )
    counts = ", ".join(f"{n} {state}" for state, n in snap.states.items())
    lines.append(Text.from_markup(f"[bold]procs[/]  {sum(snap.states.values())}: {counts}"))
    lines.append(
        Text.from_markup(
            f"[bold]tokens[/] prompt [bold]{t.prompt_tps:.1f}[/]/s ({t.prompt_total} total), "
            f"output [bold]{t.output_tps:.1f}[/]/s ({t.output_total} total)  "
            f"[dim]over {t.window_s:.0f} s[/]"
        )
    )
    load = " ".join(f"{x:.2f}" for x in h.load_avg)
    lines.append(
        Text.from_markup(
            f"[bold]host[/]   cpu [bold]{h.cpu_percent:.1f}%[/] of {h.cpus} cpus, load {load}, "
            f"mem {_size(h.mem_available)} free of {_size(h.mem_total)}"
        )
    )
    lines.append(
        Text.from_markup(
            f"[bold]kernel[/] rss [bold]{_size(h.kernel_rss)}[/], cpu {h.kernel_cpu_percent:.1f}% "
            f"({h.kernel_cpu_s:.1f} s)"
        )
    )

    shares = tok_shares(snap, prev)
    rows = sorted(snap.procs, key=lambda p: (-shares.get(p.pid, 0.0), p.pid))
    table = Table(box=None, header_style="bold reverse", pad_edge=False)
    # Minimum widths keep the figures whole in 80 columns; NAME (and MODEL) give way.
    widths = {
        "PID": 5,
        "PPID": 5,
        "STATE": 7,
        "NI": 3,
        "MODEL": 5,
        "TOK IN": 6,
        "TOK OUT": 7,
        "%TOK": 5,
        "RUN s": 6,
        "WAIT s": 6,
        "NAME": None,
    }
    for col, width in widths.items():
        left = col in ("STATE", "MODEL", "NAME")
        table.add_column(
            col,
            justify="left" if left else "right",
            no_wrap=True,
            overflow="ellipsis",
            min_width=width,
            max_width=40 if col == "MODEL" else None,  # a long name may not crowd out the rest
        )
    shown = rows if max_rows is None else rows[: max(max_rows, 1)]
    for p in shown:
        style = "green" if p.state == "RUNNING" else "dim" if p.state == "ZOMBIE" else None
        table.add_row(
            str(p.pid),
            str(p.ppid),
            p.state,
            str(p.nice),
            p.model,
            str(p.prompt_tokens),
            str(p.output_tokens),
            f"{shares.get(p.pid, 0.0):.1f}",
            f"{p.service_s:.2f}",
            f"{p.wait_s:.2f}",
            p.name,
            style=style,
        )
    hidden = len(rows) - len(shown)
    parts: list[Any] = [*lines, Text(""), table]
    if hidden:
        parts.append(Text(f"… {hidden} more", style="dim"))
    return Group(*parts)


def cmd_top(args: argparse.Namespace) -> int:
    """A live view of sys.stat, refreshed every ``--interval`` s; Ctrl-C leaves with 0."""
    interval = max(args.interval, 0.1)
    deadline_ms = int(max(5.0, 2 * interval) * 1000)
    with connect() as c:

        def snapshot() -> tuple[dict[str, Any], m.StatResult]:
            raw = c.call("sys.stat", deadline_ms=deadline_ms)
            return raw, m.StatResult(**raw)

        if args.json:
            print(json.dumps(snapshot()[0]))
            return 0
        if args.once:
            out.print(top_view(snapshot()[1], None))
            return 0
        from rich.live import Live

        prev: m.StatResult | None = None
        try:
            with Live(
                console=out, auto_refresh=False, screen=out.is_terminal, vertical_overflow="crop"
            ) as live:
                while True:
                    snap = snapshot()[1]
                    live.update(
                        top_view(snap, prev, max_rows=out.height - len(snap.models) - 9),
                        refresh=True,
                    )
                    prev = snap
                    time.sleep(interval)
        except KeyboardInterrupt:
            return 0
