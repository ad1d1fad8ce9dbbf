"""``llmos mcp``: mount, list and unmount MCP servers on the running kernel (mcp.*).

llmos mcp add time "python -m mcp_server_time"   # stdio: the kernel runs it
llmos mcp add --env GITHUB_TOKEN gh npx -y @modelcontextprotocol/server-github
llmos mcp add docs http://127.0.0.1:8000/mcp --bearer-file ~/.docs-token   # streamable HTTP
llmos mcp list [--json]
llmos mcp remove time

Secrets: ``--env KEY=VALUE`` or ``--env KEY`` (the value of KEY here, so it is not on the
command line) for a stdio server; ``--header 'Name: value'``, ``--bearer-file FILE``,
``--bearer-env VAR`` for an HTTP server. The kernel shows their names only. Options go
before the command (its own options follow it), or after a URL or a quoted command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmos.client import connect
from syscalls.errors import Errno, SyscallError

out = Console()
err = Console(stderr=True, soft_wrap=True)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``llmos mcp`` on the ``llmos`` command's subparsers."""
    mp = sub.add_parser("mcp", help="mount, list or unmount MCP servers (their tools: NAME__TOOL)")
    msub = mp.add_subparsers(dest="mcmd", required=True)
    ad = msub.add_parser(
        "add",
        help="mount an MCP server (trusted code: it runs as your user)",
        usage="llmos mcp add [--env KEY[=VALUE]]... [--header 'NAME: VALUE']... "
        "[--bearer-file FILE | --bearer-env VAR] [--timeout S] [--json] "
        "NAME COMMAND [ARG...] | NAME URL",
    )
    ad.add_argument(
        "--env",
        action="append",
        metavar="KEY[=VALUE]",
        help="stdio: a variable set over the server's clean environment; KEY alone takes "
        "KEY's value from yours (repeatable; only names are ever shown)",
    )
    ad.add_argument(
        "--header",
        action="append",
        metavar="'NAME: VALUE'",
        help="HTTP: a header sent with every request (repeatable)",
    )
    ad.add_argument(
        "--bearer-file", metavar="FILE", help="HTTP: 'Authorization: Bearer TOKEN', TOKEN in FILE"
    )
    ad.add_argument("--bearer-env", metavar="VAR", help="HTTP: the same, TOKEN in variable VAR")
    ad.add_argument("name", help="its name, the prefix of its tools' names (e.g. time)")
    ad.add_argument(
        "target",
        nargs=argparse.REMAINDER,
        help="a command line (stdio; the words after the command are its own, options "
        "included) or an http(s):// URL (streamable HTTP)",
    )
    ad.add_argument(
        "--timeout", type=float, default=None, help="wait this long for its tools (default: 30)"
    )
    ad.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    ls = msub.add_parser("list", help="the mounted MCP servers")
    ls.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    rm = msub.add_parser("remove", help="unmount an MCP server (its tools go)")
    rm.add_argument("name")
    sv = msub.add_parser(
        "serve",
        help="be an MCP server on stdin/stdout for MCP hosts (run tasks, ps, kill, files, "
        "memory), acting as the admin or as a gateway key's program",
    )
    sv.add_argument(
        "--http",
        default=None,
        metavar="HOST:PORT",
        help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio",
    )
    sv.add_argument(
        "--key-file",
        metavar="FILE",
        help="act as this gateway key's program (llmos keys create), not the admin: its "
        "limits, namespace and tool patterns bind everything spawned",
    )
    sv.add_argument(
        "--key",
        default=None,
        help="the key itself (visible in ps: prefer --key-file or $LLMOS_MCP_KEY)",
    )


@dataclass
class AddSpec:
    """What ``mcp add`` was given after NAME: the target, its secrets, the wait."""

    target: str = ""
    env: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 30.0


def _readers(environ: Mapping[str, str]) -> dict[str, Callable[[str], tuple[str, str, str]]]:
    from kernel import mcp  # here: every `llmos` command imports this module

    def timeout(text: str) -> tuple[str, str, str]:
        return "timeout", "", text

    return {
        "--env": lambda v: ("env", *mcp.env_entry(v, environ)),  # type: ignore[arg-type]
        "--header": lambda v: ("headers", *mcp.header_entry(v)),
        "--bearer-file": lambda v: ("headers", *mcp.bearer(mcp.secret_file(v))),
        "--bearer-env": lambda v: ("headers", *mcp.bearer(mcp.env_value(v, environ))),  # type: ignore[arg-type]
        "--timeout": timeout,
    }


def _take_options(words: list[str], spec: AddSpec, environ: Mapping[str, str]) -> list[str]:
    """Apply the options at the head of ``words`` to ``spec``; the words after them."""
    readers = _readers(environ)
    words = list(words)
    while words:
        flag, eq, inline = words[0].partition("=")
        if words[0] == "--":
            return words[1:]
        if flag not in readers:
            return words
        if eq:
            value, words = inline, words[1:]
        elif len(words) < 2:
            raise SyscallError.of(Errno.EINVAL, f"mcp add {flag}: give it a value")
        else:
            value, words = words[1], words[2:]
        try:
            kind, key, got = readers[flag](value)
        except ValueError as exc:  # the messages name keys and files, never values
            raise SyscallError.of(Errno.EINVAL, f"mcp add {flag}: {exc}") from None
        if kind == "timeout":
            try:
                spec.timeout = float(got)
            except ValueError:
                raise SyscallError.of(Errno.EINVAL, "mcp add --timeout: seconds") from None
        else:
            getattr(spec, kind)[key] = got
    return words


def parse_add(words: list[str], environ: Mapping[str, str] | None = None) -> AddSpec:
    """``mcp add``'s words after NAME (the shell's too): options, then the command line
    (the rest, its own options included) or a URL; after a URL or a one-word (quoted)
    command line, more options. EINVAL naming what is wrong (never a secret value)."""
    environ = os.environ if environ is None else environ
    spec = AddSpec()
    rest = _take_options(words, spec, environ)
    if not rest:
        raise SyscallError.of(Errno.EINVAL, "mcp add: give NAME and a COMMAND or URL")
    first = rest[0]
    if len(rest) == 1 or first.startswith(("http://", "https://")) or " " in first.strip():
        extra = _take_options(rest[1:], spec, environ)
        if extra:
            raise SyscallError.of(
                Errno.EINVAL,
                f"mcp add: {extra[0]!r} after the target: a URL takes no arguments; a quoted "
                "command line takes options only (--env, --header, --bearer-*, --timeout)",
            )
        spec.target = first
    else:
        spec.target = shlex.join(rest)
    return spec


def run(args: argparse.Namespace) -> int:
    """Run ``llmos mcp SUBCOMMAND``; a SyscallError is printed by the caller."""
    if args.mcmd == "serve":
        from llmos.ctl.mcp_serve import serve

        return serve(args.http, key=_serve_key(args))
    if args.mcmd == "add":  # checked (and secrets read) before the kernel is asked
        given: list[str] = []
        for flag in ("env", "header"):
            for value in getattr(args, flag) or []:
                given += [f"--{flag}", value]
        for flag in ("bearer_file", "bearer_env", "timeout"):
            if getattr(args, flag) is not None:
                given += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        spec = parse_add([*given, *args.target])
    with connect() as c:
        if args.mcmd == "add":
            server = c.mcp_add(
                args.name,
                spec.target,
                timeout=spec.timeout,
                env=spec.env or None,
                headers=spec.headers or None,
            )
            if args.json:
                print(json.dumps(server.model_dump()))
                return 0
            print_added(out, err, server)
            return 0
        if args.mcmd == "remove":
            c.mcp_remove(args.name)
            return 0
        servers = c.mcp_list()
    if args.json:
        print(json.dumps([s.model_dump() for s in servers]))
        return 0
    out.print(servers_table(servers))
    return 0


def _serve_key(args: argparse.Namespace) -> str | None:
    from llmos.ctl.mcp_serve import read_key

    return read_key(args.key, args.key_file)


def print_added(out: Console, err: Console, server: Any) -> None:
    """What ``mcp add`` prints: the tools it brought, and those refused (with why)."""
    out.print(f"mounted [bold]{server.name}[/]: {len(server.tools)} tools", highlight=False)
    for line in server.tools:
        out.print(f"  {line}", highlight=False)
    for line in server.refused:
        err.print(f"  [yellow]refused[/] {escape(line)}", highlight=False)


def servers_table(servers: list[Any]) -> Table:
    """The mounted servers as ``llmos mcp list`` and the shell's ``mcp list`` show them:
    the names of their variables and headers, never the values."""
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "TRANSPORT", "STATE", "TOOLS", "REFUSED", "RESTARTS", "SECRETS", "TARGET"):
        table.add_column(col)
    for s in servers:
        names = [*(f"env {n}" for n in s.env), *(f"header {n}" for n in s.headers)]
        table.add_row(
            s.name,
            s.transport,
            s.state,
            str(len(s.tools)),
            str(len(s.refused)),
            str(s.restarts),
            ", ".join(names) or "-",
            escape(s.target),
        )
    return table
