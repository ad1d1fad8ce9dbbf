"""``llmos mcp``: mount, list and unmount MCP servers on the running kernel (mcp.*).

llmos mcp add time "python -m mcp_server_time"   # stdio: the kernel runs it
llmos mcp add docs http://127.0.0.1:8000/mcp     # streamable HTTP
llmos mcp list [--json]
llmos mcp remove time
"""

from __future__ import annotations

import argparse
import json
import shlex

from rich.console import Console
from rich.table import Table

from llmos.client import connect

out = Console()
err = Console(stderr=True, soft_wrap=True)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``llmos mcp`` on the ``llmos`` command's subparsers."""
    mp = sub.add_parser("mcp", help="mount, list or unmount MCP servers (their tools: NAME__TOOL)")
    msub = mp.add_subparsers(dest="mcmd", required=True)
    ad = msub.add_parser(
        "add",
        help="mount an MCP server (trusted code: it runs as your user)",
        usage="llmos mcp add [--timeout S] [--json] NAME COMMAND [ARG...] | NAME URL",
    )
    ad.add_argument("name", help="its name, the prefix of its tools' names (e.g. time)")
    ad.add_argument(
        "target",
        nargs=argparse.REMAINDER,
        help="a command line (stdio; the rest of the line, options included) or an "
        "http(s):// URL (streamable HTTP)",
    )
    ad.add_argument(
        "--timeout", type=float, default=30.0, help="wait this long for its tools (default: 30)"
    )
    ad.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    ls = msub.add_parser("list", help="the mounted MCP servers")
    ls.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    rm = msub.add_parser("remove", help="unmount an MCP server (its tools go)")
    rm.add_argument("name")
    sv = msub.add_parser(
        "serve",
        help="be an MCP server on stdin/stdout for MCP hosts (run tasks, ps, kill, files), "
        "acting as the admin",
    )
    sv.add_argument(
        "--http",
        default=None,
        metavar="HOST:PORT",
        help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``llmos mcp SUBCOMMAND``; a SyscallError is printed by the caller."""
    if args.mcmd == "serve":
        from llmos.ctl.mcp_serve import serve

        return serve(args.http)
    with connect() as c:
        if args.mcmd == "add":
            if not args.target:
                err.print("llmos mcp add: give NAME and a COMMAND or URL")
                return 2
            target = args.target[0] if len(args.target) == 1 else shlex.join(args.target)
            server = c.mcp_add(args.name, target, timeout=args.timeout)
            if args.json:
                print(json.dumps(server.model_dump()))
                return 0
            out.print(f"mounted [bold]{server.name}[/]: {len(server.tools)} tools", highlight=False)
            for line in server.tools:
                out.print(f"  {line}", highlight=False)
            for line in server.refused:
                err.print(f"  [yellow]refused[/] {line}", highlight=False)
            return 0
        if args.mcmd == "remove":
            c.mcp_remove(args.name)
            return 0
        servers = c.mcp_list()
    if args.json:
        print(json.dumps([s.model_dump() for s in servers]))
        return 0
    table = Table(box=None)
    for col in ("NAME", "TRANSPORT", "STATE", "TOOLS", "REFUSED", "RESTARTS", "TARGET"):
        table.add_column(col)
    for s in servers:
        table.add_row(
            s.name,
            s.transport,
            s.state,
            str(len(s.tools)),
            str(len(s.refused)),
            str(s.restarts),
            s.target,
        )
    out.print(table)
    return 0
