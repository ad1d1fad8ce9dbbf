"""``llmos trace PID|PROGRAM [--json]``: a program's trace as a tree, read from the
kernel's trace files (the state directory's ``traces/``, kernel/trace.py).

Each line is a span: what the process called, how long it took, and where it waited
(for a model slot, for the owner's confirmation of a tool call, in a blocking call such
as ``ipc.recv`` or ``tool.next``). A served tool's ``tool.next``/``tool.reply`` and the
``ipc.recv`` of a message appear under the span they link to, marked ``⇠``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from kernel.trace import TRACE_DIR, find_program, program_spans, subtree, tree
from syscalls import paths

err = Console(stderr=True)


def add_parser(sub: Any) -> None:
    """``llmos trace``'s parser."""
    tp = sub.add_parser(
        "trace", help="the tree of calls a program made: durations, waits, errors (its trace)"
    )
    tp.add_argument(
        "ref",
        metavar="PID|PROGRAM",
        help="a pid (its process's part of the trace; a program's first pid: all of it) "
        "or a program's name (its latest run)",
    )
    tp.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the kernel's state dir (default: $LLMOS_STATE_DIR or ~/.local/state/llmos)",
    )
    tp.add_argument("--json", action="store_true", help="print the tree as JSON")


def cmd_trace(args: argparse.Namespace) -> int:
    """Entry point of ``llmos trace``."""
    folder = (args.state_dir or paths.state_dir()) / TRACE_DIR
    if not folder.is_dir():
        err.print(
            f"[red]llmos trace:[/] no traces in {escape(str(folder.parent))} "
            "(is tracing on? `llmos kernel start --trace on`, the default)"
        )
        return 1
    program = find_program(folder, args.ref)
    if program is None:
        err.print(f"[red]llmos trace:[/] no spans of {escape(args.ref)!s} in {escape(str(folder))}")
        return 1
    roots = tree(program_spans(folder, program))
    if args.ref.isdigit() and int(args.ref) != program:
        roots = subtree(roots, int(args.ref)) or roots
    if args.json:
        print(json.dumps({"program": program, "roots": roots}, indent=1))
        return 0
    top = Tree(f"[bold]program {program}[/]" + (f" · trace {roots[0]['trace']}" if roots else ""))
    for root in roots:
        _add(top, root)
    Console().print(top)
    return 0


def _add(parent: Tree, node: dict[str, Any]) -> None:
    branch = parent.add(label(node))
    for linked in node.get("linked", ()):
        branch.add("[magenta]⇠[/] " + label(linked, linked=True))
    for child in node.get("children", ()):
        _add(branch, child)


def duration(node: dict[str, Any]) -> float | None:
    """A span's seconds (None while it is open)."""
    if node.get("end") is None:
        return None
    return (node["end"] - node["start"]) / 1e9


def fmt_s(seconds: float) -> str:
    """``812 µs``, ``12.3 ms``, ``1.25 s``."""
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def label(node: dict[str, Any], linked: bool = False) -> str:
    """One line of the tree: a span's name, duration and what it says."""
    a = node["attrs"]
    name = node["name"]
    took = duration(node)
    parts: list[str] = []
    if name.startswith("process "):
        head = f"[bold cyan]{escape(name)}[/]"
        if a.get("llmos.process"):
            head += f" {escape(str(a['llmos.process']))}"
        if node.get("open"):
            parts.append("[green]running[/] (or the kernel stopped first)")
        else:
            status = a.get("llmos.exit_status")
            sig = a.get("llmos.signal")
            parts.append(f"killed by SIG{sig}" if sig else f"exit {status}")
    else:
        head = f"[bold]{escape(name)}[/]"
        if linked:
            head += f" by pid {a.get('llmos.pid')}"
    if took is not None:
        parts.insert(0, fmt_s(took))
    if node.get("status", "ok") != "ok":
        parts.append(f"[red]{escape(node['status'])}[/]")
    parts += _details(name, a)
    return head + "  " + " · ".join(parts)


def _details(name: str, a: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if "gen_ai.request.model" in a and name == "llm.generate":
        out.append(escape(str(a["gen_ai.request.model"])))
    if "gen_ai.usage.output_tokens" in a:
        tokens_in = a.get("gen_ai.usage.input_tokens", "?")
        out.append(f"{tokens_in}→{a['gen_ai.usage.output_tokens']} tokens")
    wait = a.get("llmos.queue_wait_s")
    if wait:
        out.append(f"[yellow]waited {fmt_s(wait)} for a slot[/]")
    if a.get("llmos.preemptions"):
        out.append(f"[yellow]preempted {a['llmos.preemptions']}×[/]")
    if "llmos.tool" in a:
        out.append(f"tool {escape(str(a['llmos.tool']))}")
    if "llmos.tool.server" in a:
        out.append(f"served by pid {a['llmos.tool.server']}")
    if "llmos.tool.caller" in a:
        out.append(f"for pid {a['llmos.tool.caller']}")
    if a.get("llmos.confirm_wait_s") is not None:
        out.append(f"[yellow]waited {fmt_s(a['llmos.confirm_wait_s'])} for confirmation[/]")
    if name == "proc.spawn" and "llmos.child" in a:
        out.append(f"→ pid {a['llmos.child']} {escape(str(a.get('llmos.process', '')))}")
    if name in ("ipc.send",) and "llmos.ipc.peer" in a:
        out.append(f"→ pid {a['llmos.ipc.peer']}")
    if name == "ipc.recv" and "llmos.ipc.peer" in a:
        out.append(f"← pid {a['llmos.ipc.peer']}")
    if "llmos.ipc.topic" in a:
        out.append(f"topic {escape(str(a['llmos.ipc.topic']))}")
    if "llmos.fs.path" in a:
        out.append(escape(str(a["llmos.fs.path"])))
    if "llmos.bytes" in a:
        out.append(f"{a['llmos.bytes']} B")
    if a.get("llmos.wait_s") and name != "llm.generate":
        out.append(f"[yellow]waited {fmt_s(a['llmos.wait_s'])}[/]")
    return out
