"""``llmos shell``: an interactive shell on a running kernel.

Three layers, so most of it is testable without a terminal:

- the command table (:data:`COMMANDS`): data, as the syscall table is; parsing
  (:func:`parse`) and checking (:func:`check`) use only it;
- :class:`Session`: runs one parsed command with the SDK and prints with rich; it
  holds the admin :class:`~llmos.client.Client`, reconnecting after a kernel restart,
  and the handles of processes spawned in this shell (the only ones it can chat with);
- :func:`run_shell`: the prompt_toolkit loop (history, completion, Ctrl-C/Ctrl-D).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmos.client import Client, Process, admin_token
from llmos.ctl.views import pending_table
from syscalls import models as m
from syscalls import paths
from syscalls.errors import Errno, SyscallError

PROMPT = "llmos> "
#: Errors after which the kernel is presumed gone: the next command reconnects.
LOST = {Errno.ECONNREFUSED, Errno.ETIMEDOUT, Errno.ESHUTDOWN}
#: Commands a proposal may not contain: they take over the terminal or end the shell.
INTERACTIVE = ("chat", "top", "exit", "quit", "help")


@dataclass(frozen=True, slots=True)
class Command:
    """A row of the shell's command table."""

    name: str
    usage: str  # the arguments, as help shows them
    help: str  # one line
    args: tuple[
        str, ...
    ] = ()  # kind of each positional argument, for completion: pid, path, model, tool, signal
    min_args: int = 0
    max_args: int | None = 0  # None: any number (the rest of the line)
    raw_after: int | None = None  # after this many words, the rest of the line is one argument


COMMANDS: tuple[Command, ...] = (
    Command("ps", "", "list processes"),
    Command(
        "top", "[N]", "live view of models and processes (N refreshes, or until Ctrl-C)", max_args=1
    ),
    Command(
        "spawn",
        "NAME [--system TEXT] [--model MODEL]",
        "spawn a process (kept for chat, cd)",
        min_args=1,
        max_args=None,
    ),
    Command(
        "kill",
        "PID [SIG]",
        "signal a process: TERM (default), KILL, STOP, CONT",
        ("pid", "signal"),
        1,
        2,
    ),
    Command("stop", "PID", "stop a process (SIGSTOP)", ("pid",), 1, 1),
    Command("cont", "PID", "resume a stopped process (SIGCONT)", ("pid",), 1, 1),
    Command("nice", "PID N", "set a process's nice value", ("pid",), 2, 2),
    Command("wait", "PID", "wait for a process to exit and reap it", ("pid",), 1, 1),
    Command("stat", "", "system state: models, process counts, token rates, host"),
    Command("models", "", "the kernel's models"),
    Command("syscalls", "", "the syscall table"),
    Command(
        "tools",
        "[call NAME [JSON]]",
        "list tools, or call one with JSON arguments (the rest of the line, quotes and all)",
        ("call", "tool"),
        0,
        3,
        raw_after=2,
    ),
    Command(
        "mcp",
        "list | add NAME COMMAND|URL | remove NAME",
        "MCP servers: list, mount (its tools become NAME__TOOL; options as llmos mcp add), unmount",
        ("mcp", "mcpname"),
        1,
        None,
        raw_after=2,
    ),
    Command("pending", "", "irreversible tool calls waiting for approval"),
    Command("approve", "ID", "let a parked tool call run", ("id",), 1, 1),
    Command("deny", "ID", "refuse a parked tool call", ("id",), 1, 1),
    Command(
        "chat",
        "[PID]",
        "converse with a process spawned here (a new one without PID)",
        ("pid",),
        0,
        1,
    ),
    Command(
        "cd", "PID", "choose the process whose files and memory ls/cat/mem use", ("pid",), 1, 1
    ),
    Command("ls", "[PATH]", "list a directory of the current process", ("path",), 0, 1),
    Command("cat", "PATH", "print a file", ("path",), 1, 1),
    Command("write", "PATH TEXT", "replace a file's content with TEXT", ("path",), 2, None),
    Command("rm", "PATH", "remove a file (its content stays in history)", ("path",), 1, 1),
    Command("history", "PATH", "a file's versions, newest first", ("path",), 1, 1),
    Command("rollback", "PATH VERSION", "bring back an old version of a file", ("path",), 2, 2),
    Command(
        "mem", "[search QUERY]", "core memory blocks, or an archival search", ("search",), 0, None
    ),
    Command("help", "[COMMAND]", "this table", ("command",), 0, 1),
    Command("exit", "", "leave the shell (also quit, Ctrl-D)"),
    Command("quit", "", "leave the shell"),
)
BY_NAME = {c.name: c for c in COMMANDS}


class ShellExit(Exception):
    """The user asked to leave."""


def parse(line: str) -> tuple[Command, list[str]]:
    """Split ``line`` (shell quoting) into its command row and arguments; EINVAL for a
    bad line, ENOSYS for an unknown command."""
    head = line.split(None, 1)
    cmd = BY_NAME.get(head[0]) if head else None
    if cmd is not None and cmd.raw_after is not None:
        words = _split_raw_tail(line, 1 + cmd.raw_after)
    else:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise SyscallError.of(Errno.EINVAL, f"cannot parse the line: {exc}") from None
    if not words:
        raise SyscallError.of(Errno.EINVAL, "empty command")
    cmd = BY_NAME.get(words[0])
    if cmd is None:
        raise SyscallError.of(Errno.ENOSYS, f"unknown command {words[0]!r}; `help` lists them")
    args = words[1:]
    if len(args) < cmd.min_args or (cmd.max_args is not None and len(args) > cmd.max_args):
        raise SyscallError.of(Errno.EINVAL, f"usage: {cmd.name} {cmd.usage}".rstrip())
    return cmd, args


def _split_raw_tail(line: str, words: int) -> list[str]:
    """The first ``words`` words of ``line`` (shell quoting), then the rest of the line as
    it was typed (a JSON argument keeps its quotes)."""
    lex = shlex.shlex(line, posix=True)
    lex.whitespace_split = True
    out: list[str] = []
    try:
        while len(out) < words:
            token = lex.get_token()
            if token is None:
                return out
            out.append(token)
    except ValueError as exc:
        raise SyscallError.of(Errno.EINVAL, f"cannot parse the line: {exc}") from None
    rest = line[lex.instream.tell() :].strip()
    if rest[:1] in ("'", '"'):  # the whole tail quoted for the shell: take it unquoted
        with contextlib.suppress(ValueError):
            if len(unquoted := shlex.split(rest)) == 1:
                rest = unquoted[0]
    return [*out, rest] if rest else out


def check(line: str) -> str | None:
    """Why ``line`` is not a valid shell command, or None when it is (for proposals)."""
    try:
        cmd, _ = parse(line)
    except SyscallError as exc:
        return f"{exc.code}: {exc.message}"
    if cmd.name in INTERACTIVE:
        return f"{cmd.name} is interactive; type it yourself"
    return None


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SyscallError.of(Errno.EINVAL, f"{what} must be a number, not {text!r}") from None


def _spawn_options(args: list[str]) -> tuple[str, dict[str, Any]]:
    name, opts, rest = args[0], {}, args[1:]
    while rest:
        flag = rest.pop(0)
        if flag not in ("--system", "--model") or not rest:
            raise SyscallError.of(Errno.EINVAL, f"usage: spawn {BY_NAME['spawn'].usage}")
        opts[flag[2:]] = rest.pop(0)
    return name, opts


class Session:
    """The shell's state and its commands; prints to ``console``."""

    def __init__(
        self, console: Console | None = None, connect: Callable[[], Client] = Client
    ) -> None:
        self.console = console or Console(highlight=False)
        self._connect = connect
        self.last_turn = ""  # the latest chat reply's tokens and speed, shown after it
        self.client: Client | None = None
        self._token: str | None = None
        self.procs: dict[int, Process] = {}  # processes spawned in this shell
        self.cwd: int | None = None  # the process whose files ls/cat use
        self.chat_pid: int | None = None  # set by `chat`: the UI then enters chat mode

    # -- connection -------------------------------------------------------------------
    def admin(self) -> Client:
        """The admin client; a new one when the kernel restarted (its token changed)."""
        token = admin_token()
        if self.client is not None and token == self._token:
            return self.client
        if self.client is not None:
            self.client.close()
            self.client = None
        self.client = self._connect()
        restarted, self._token = self._token is not None and token != self._token, token
        if restarted:
            self._forget_gone("the kernel restarted; reconnected")
        return self.client

    def _forget_gone(self, why: str) -> None:
        alive = {p.pid for p in self.client.ps()} if self.client else set()
        gone = sorted(pid for pid in self.procs if pid not in alive)
        for pid in gone:
            del self.procs[pid]
        if self.cwd in gone:
            self.cwd = None
        note = f"; handles of processes {', '.join(map(str, gone))} are gone" if gone else ""
        self.say(f"[yellow]{why}{note}[/]")

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def error(self, exc: SyscallError) -> None:
        self.console.print(f"[red]error {exc.code}:[/] {exc.message}", highlight=False, markup=True)

    # -- running a line ---------------------------------------------------------------
    def execute(self, line: str) -> bool:
        """Run one command line; errors are printed as one line (and give False).
        Raises ShellExit."""
        line = line.strip()
        if not line or line.startswith("#"):
            return True
        try:
            cmd, args = parse(line)
            getattr(self, f"do_{cmd.name}")(args)
            return True
        except SyscallError as exc:
            self.error(exc)
            if exc.code in LOST and self.client is not None:  # the next command reconnects
                self.client.close()
                self.client = None
        except (ShellExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug or a broken reply: one line, and the shell goes on
            self.console.print(
                f"[red]error:[/] {type(exc).__name__}: {exc}", highlight=False, markup=True
            )
        return False

    # -- processes --------------------------------------------------------------------
    def do_ps(self, args: list[str]) -> None:
        table = Table(box=None, header_style="bold")
        for col in (
            "PID",
            "PPID",
            "STATE",
            "NI",
            "MODEL",
            "TOK IN",
            "TOK OUT",
            "WAIT s",
            "AGE s",
            "WCHAN",
            "NAME",
        ):
            table.add_column(
                col, justify="left" if col in ("STATE", "MODEL", "WCHAN", "NAME") else "right"
            )
        now = time.time()
        for p in self.admin().ps():
            mark = "*" if p.pid in self.procs else ""
            table.add_row(
                str(p.pid),
                str(p.ppid),
                p.state,
                str(p.nice),
                p.model,
                str(p.prompt_tokens),
                str(p.output_tokens),
                f"{p.wait_s:.1f}",
                f"{now - p.created:.0f}",
                p.wchan or "-",
                p.name + mark,
                style="green" if p.state == "RUNNING" else None,
            )
        self.console.print(table)

    def do_top(self, args: list[str]) -> None:
        from rich.live import Live

        from llmos.ctl.top import top_view

        n = _int(args[0], "N") if args else None
        prev: m.StatResult | None = None
        done = 0
        with (
            contextlib.suppress(KeyboardInterrupt),
            Live(console=self.console, auto_refresh=False) as live,
        ):
            while n is None or done < n:
                snap = self.admin().stat()
                live.update(top_view(snap, prev, max_rows=20), refresh=True)
                prev, done = snap, done + 1
                if n is None or done < n:
                    time.sleep(1.0)

    def do_spawn(self, args: list[str]) -> None:
        name, opts = _spawn_options(args)
        proc = self.admin().spawn(name, **opts)
        self.procs[proc.pid] = proc
        self.cwd = proc.pid
        self.say(f"spawned {proc.pid} ({name}); `chat {proc.pid}` to talk to it")

    def do_kill(self, args: list[str]) -> None:
        self._signal(_int(args[0], "PID"), args[1] if len(args) > 1 else "TERM")

    def do_stop(self, args: list[str]) -> None:
        self._signal(_int(args[0], "PID"), "STOP")

    def do_cont(self, args: list[str]) -> None:
        self._signal(_int(args[0], "PID"), "CONT")

    def _signal(self, pid: int, sig: str) -> None:
        sig = sig.upper().removeprefix("SIG")
        if sig not in ("TERM", "KILL", "STOP", "CONT"):
            raise SyscallError.of(Errno.EINVAL, f"unknown signal {sig!r}: TERM, KILL, STOP or CONT")
        res = self.admin().kill(pid, sig)
        self.say(f"process {res.pid}: {res.state}")

    def do_nice(self, args: list[str]) -> None:
        res = self.admin().nice(_int(args[0], "PID"), _int(args[1], "N"))
        self.say(f"process {res.pid}: nice {res.nice}")

    def do_wait(self, args: list[str]) -> None:
        pid = _int(args[0], "PID")
        res = self.admin().wait(pid)
        self.procs.pop(pid, None)
        self.say(
            f"process {res.pid} exited with status {res.exit_status}"
            + (f" (signal {res.signal})" if res.signal else "")
        )

    # -- the system -------------------------------------------------------------------
    def do_stat(self, args: list[str]) -> None:
        from llmos.ctl.top import top_view

        self.console.print(top_view(self.admin().stat(), None, max_rows=20))

    def do_models(self, args: list[str]) -> None:
        table = Table(box=None, header_style="bold")
        for col in ("MODEL", "DRIVER", "STATE", "SLOTS", "BUSY", "QUEUED", "WINDOW"):
            table.add_column(col)
        for mod in self.admin().info().models:
            table.add_row(
                mod.name + (" (default)" if mod.default else ""),
                mod.driver,
                mod.state,
                str(mod.slots),
                str(mod.busy),
                str(mod.queued),
                str(mod.max_context),
            )
        self.console.print(table)

    def do_syscalls(self, args: list[str]) -> None:
        from syscalls.table import table_rows

        table = Table(box=None, header_style="bold")
        table.add_column("SYSCALL", style="bold")
        table.add_column("WHAT")
        for r in table_rows():
            table.add_row(r["name"], r["doc"])
        self.console.print(table)

    def do_tools(self, args: list[str]) -> None:
        if args:
            if args[0] != "call" or len(args) < 2:
                raise SyscallError.of(Errno.EINVAL, f"usage: tools {BY_NAME['tools'].usage}")
            try:
                targs = json.loads(args[2]) if len(args) > 2 else {}
            except json.JSONDecodeError as exc:
                raise SyscallError.of(Errno.EINVAL, f"arguments are not JSON: {exc}") from None
            if not isinstance(targs, dict):
                raise SyscallError.of(Errno.EINVAL, "the arguments must be a JSON object")
            proc = self._current()
            self.console.print_json(json.dumps(proc.tools.call(args[1], targs)))
            return
        table = Table(box=None, header_style="bold")
        for col in ("TOOL", "SERVED BY", "ARGUMENTS", "DESCRIPTION"):
            table.add_column(col)
        for t in self.admin().tools():
            by = f"mcp {t.mcp}" if t.mcp else "kernel" if t.server is None else f"pid {t.server}"
            table.add_row(
                t.name,
                by,
                ", ".join(t.parameters.get("properties", {})),
                t.description,
            )
        self.console.print(table)

    def do_mcp(self, args: list[str]) -> None:
        from llmos.ctl.mcp_cli import parse_add, print_added, servers_table

        usage = SyscallError.of(Errno.EINVAL, f"usage: mcp {BY_NAME['mcp'].usage}")
        sub, rest = args[0], args[1:]
        if sub == "list" and not rest:
            servers = self.admin().mcp_list()
            if not servers:
                self.say("no MCP server is mounted; `mcp add NAME COMMAND|URL` mounts one")
                return
            self.console.print(servers_table(servers))
        elif sub == "remove" and len(rest) == 1:
            self.admin().mcp_remove(rest[0])
            self.say(f"unmounted {rest[0]}")
        elif sub == "add" and len(rest) == 2:
            try:
                words = shlex.split(rest[1])
            except ValueError as exc:
                raise SyscallError.of(Errno.EINVAL, f"cannot parse the line: {exc}") from None
            spec = parse_add(words)
            with self.console.status(f"mounting {rest[0]}…"):
                server = self.admin().mcp_add(
                    rest[0],
                    spec.target,
                    timeout=spec.timeout,
                    env=spec.env or None,
                    headers=spec.headers or None,
                )
            print_added(self.console, self.console, server)
        else:
            raise usage

    def do_pending(self, args: list[str]) -> None:
        calls = self.admin().pending()
        if not calls:
            self.say("no tool call is waiting for approval")
            return
        self.console.print(pending_table(calls, {p.pid: p.name for p in self.admin().ps()}))

    def do_approve(self, args: list[str]) -> None:
        self.admin().approve(_int(args[0], "ID"))
        self.say(f"call {args[0]} approved")

    def do_deny(self, args: list[str]) -> None:
        self.admin().deny(_int(args[0], "ID"))
        self.say(f"call {args[0]} denied")

    def do_help(self, args: list[str]) -> None:
        rows = [BY_NAME[a] for a in args if a in BY_NAME] if args else list(COMMANDS)
        if args and not rows:
            raise SyscallError.of(Errno.ENOSYS, f"unknown command {args[0]!r}")
        table = Table(box=None, header_style="bold")
        table.add_column("COMMAND", style="bold")
        table.add_column("USAGE")
        table.add_column("WHAT")
        for c in rows:
            table.add_row(c.name, escape(c.usage), escape(c.help))  # [..] is not markup
        self.console.print(table)
        if not args:
            self.say(
                "[dim]? QUESTION asks the model to propose commands (run only after you confirm)[/]"
            )

    def do_exit(self, args: list[str]) -> None:
        raise ShellExit

    do_quit = do_exit

    # -- one process: chat, files, memory ------------------------------------------------
    def handle(self, pid: int) -> Process:
        """The handle of a process spawned in this shell."""
        self.admin()
        proc = self.procs.get(pid)
        if proc is None:
            raise SyscallError.of(
                Errno.EPERM,
                f"process {pid} was not spawned in this shell, so it cannot be attached; "
                "`spawn NAME` or `chat` alone makes one",
            )
        return proc

    def _current(self) -> Process:
        if self.cwd is None:
            raise SyscallError.of(Errno.ESRCH, "no current process: `spawn NAME` or `cd PID` first")
        return self.handle(self.cwd)

    def do_cd(self, args: list[str]) -> None:
        self.cwd = self.handle(_int(args[0], "PID")).pid
        self.say(f"files and memory of process {self.cwd}")

    def do_chat(self, args: list[str]) -> None:
        if args:
            self.chat_pid = self.handle(_int(args[0], "PID")).pid
        else:
            self.do_spawn(["chat"])
            self.chat_pid = self.cwd

    def chat_turn(
        self, pid: int, text: str, write: Callable[[str], None], max_tokens: int = 512
    ) -> str:
        """Say ``text`` to process ``pid``; ``write`` gets the reply as it streams.

        The turn runs on the process itself (its context, accounting and state show it).
        Ctrl-C ends just this generation (``llm.cancel``), and the turn as far as it went
        is kept in the process's context."""
        proc = self.handle(pid)
        pieces: list[str] = []
        t0 = time.monotonic()
        first: float | None = None
        try:
            for piece in proc.stream(text, max_tokens=max_tokens):
                first = first if first is not None else time.monotonic()
                pieces.append(piece)
                write(piece)
            if proc.last is not None and first is not None:
                tokens, spent = proc.last.usage.output_tokens, time.monotonic() - first
                self.last_turn = f"{tokens} tokens, first after {first - t0:.2f} s" + (
                    f", {tokens / spent:.1f} tok/s" if spent > 0 and tokens > 1 else ""
                )
        except KeyboardInterrupt:
            with contextlib.suppress(SyscallError):
                self.admin().cancel(pid)
            turn = [
                {"role": "user", "content": text},
                {"role": "assistant", "content": "".join(pieces)},
            ]
            for _ in range(50):  # the cancelled call may need a moment to let go of it
                try:
                    proc.append(turn)
                    break
                except SyscallError as exc:
                    if exc.code is not Errno.EBUSY:
                        break
                    time.sleep(0.02)
            raise
        return "".join(pieces)

    def do_ls(self, args: list[str]) -> None:
        path = args[0] if args else "/"
        entries = self._current().files.list(path)
        table = Table(box=None, header_style="bold")
        for col in ("NAME", "TYPE", "SIZE", "MODIFIED"):
            table.add_column(col)
        for e in entries:
            name = f"[blue]{e.name}/[/]" if e.type == "dir" else e.name
            table.add_row(
                name, e.type, str(e.size), time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime))
            )
        if not entries:
            self.say(f"{path}: empty")
            return
        self.console.print(table)

    def do_cat(self, args: list[str]) -> None:
        content = self._current().files.read(args[0])
        text = content if isinstance(content, str) else f"<{len(content)} bytes of binary data>"
        self.console.print(text, markup=False, highlight=False)

    def do_write(self, args: list[str]) -> None:
        res = self._current().files.write(args[0], " ".join(args[1:]))
        self.say(f"{args[0]}: version {res.version}, {res.size} bytes")

    def do_rm(self, args: list[str]) -> None:
        n = self._current().files.remove(args[0])
        self.say(f"removed {n} file{'s' if n != 1 else ''}")

    def do_history(self, args: list[str]) -> None:
        table = Table(box=None, header_style="bold")
        for col in ("VERSION", "TIME", "SIZE", "OP"):
            table.add_column(col)
        for v in self._current().files.history(args[0]):
            table.add_row(
                str(v.version),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.time)),
                str(v.size),
                v.op,
            )
        self.console.print(table)

    def do_rollback(self, args: list[str]) -> None:
        res = self._current().files.rollback(args[0], _int(args[1], "VERSION"))
        self.say(f"{args[0]}: version {res.version} now")

    def do_mem(self, args: list[str]) -> None:
        mem = self._current().memory
        if args:
            if args[0] != "search" or len(args) < 2:
                raise SyscallError.of(Errno.EINVAL, f"usage: mem {BY_NAME['mem'].usage}")
            hits = mem.search(" ".join(args[1:]))
            if not hits:
                self.say("no archival entry")
            for h in hits:
                self.console.print(
                    f"[bold]{h.id}[/] [dim]{h.score or 0:.3f}[/] {h.text}", highlight=False
                )
            return
        blocks = mem.blocks()
        if not blocks:
            self.say("no core memory block")
        for label, value in blocks.items():
            self.console.print(f"[bold]{label}[/]: {value}", highlight=False)

    # -- natural language ---------------------------------------------------------------
    def propose(self, question: str) -> list[tuple[str, str | None]]:
        """Ask a helper process for shell commands that do ``question``: each proposed
        line with why it is invalid (None when it is a valid command)."""
        admin = self.admin()
        table = "\n".join(
            f"{c.name} {c.usage}".rstrip() + f"  # {c.help}"
            for c in COMMANDS
            if c.name not in INTERACTIVE
        )
        now = time.time()
        ps = "\n".join(
            f"pid {p.pid} name {p.name} state {p.state} waiting {p.wait_s:.0f}s "
            f"age {now - p.created:.0f}s"
            for p in admin.ps()
        )
        system = (
            "You operate the llmos shell. "
            "Answer with the shell commands that do what the user asks, "
            f"one command per string, only from this table:\n{table}\n\nThe processes now:\n{ps}"
        )
        item = {
            "type": "string",
            "pattern": command_pattern(),
        }  # the grammar keeps lines well formed
        schema = {
            "type": "object",
            "required": ["commands"],
            "properties": {
                "commands": {"type": "array", "items": item, "minItems": 1, "maxItems": 5}
            },
        }
        helper = admin.spawn("shell-nl", system=system)
        try:
            res = helper.generate(
                [{"role": "user", "content": question}],
                max_tokens=160,
                temperature=0.0,
                response_format={"type": "json_schema", "schema": schema},
            )
        finally:
            with contextlib.suppress(SyscallError):
                admin.kill(helper.pid, "KILL")
                admin.wait(helper.pid, timeout=10)
        try:
            lines = json.loads(res.text).get("commands", [])
        except (json.JSONDecodeError, AttributeError):
            raise SyscallError.of(
                Errno.EPROTO, f"the model's answer did not parse: {res.text[:200]!r}"
            ) from None
        lines = list(dict.fromkeys(str(line).strip() for line in lines if str(line).strip()))
        return [(line, check(line)) for line in lines]


#: What each kind of argument looks like, for the grammar of proposed commands.
ARG_PATTERNS = {
    "pid": "[0-9]{1,7}",
    "id": "[0-9]{1,9}",
    "signal": "(TERM|KILL|STOP|CONT)",
    "path": "[A-Za-z0-9_./-]{1,64}",
    "search": "search",
    "mcp": "list",  # proposals may list servers, never mount one (it runs code)
}


def command_pattern() -> str:
    """A regex matching the lines the table accepts (bar the interactive commands):
    each command name with its number of arguments, typed where the table says."""
    alts = []
    for c in COMMANDS:
        if c.name in INTERACTIVE:
            continue
        parts = [c.name]
        for i in range(c.max_args if c.max_args is not None else c.min_args + 3):
            kind = c.args[i] if i < len(c.args) else None
            atom = f" {ARG_PATTERNS.get(kind or '', '[^ ]{1,32}')}"
            parts.append(atom if i < c.min_args else f"({atom})?")
        alts.append("".join(parts))
    return f"^({'|'.join(alts)})$"


# -- completion -----------------------------------------------------------------------


def complete(session: Session, text: str) -> Iterator[tuple[str, int]]:
    """Completions for the line ``text`` (the part before the cursor): each a candidate
    and the (negative) position where it starts. Kernel look-ups that fail yield nothing."""
    words = text.split(" ")
    word = words[-1]
    if len(words) == 1:
        for c in COMMANDS:
            if c.name.startswith(word):
                yield c.name, -len(word)
        return
    cmd = BY_NAME.get(words[0])
    if cmd is None:
        return
    index = len([w for w in words[1:-1] if w])
    kind = cmd.args[index] if index < len(cmd.args) else None
    if cmd.name == "spawn" and words[-2:-1] == ["--model"]:
        kind = "model"
    try:
        for cand in _candidates(session, kind, word):
            if cand.startswith(word):
                yield cand, -len(word)
    except SyscallError:
        return


def _candidates(session: Session, kind: str | None, word: str) -> Iterable[str]:
    match kind:
        case "pid":
            return [str(p.pid) for p in session.admin().ps()]
        case "id":
            return [str(p.id) for p in session.admin().pending()]
        case "signal":
            return ["TERM", "KILL", "STOP", "CONT"]
        case "model":
            return [mod.name for mod in session.admin().info().models]
        case "tool":
            return [t.name for t in session.admin().tools()]
        case "call":
            return ["call"]
        case "search":
            return ["search"]
        case "mcp":
            return ["list", "add", "remove"]
        case "mcpname":
            return [s.name for s in session.admin().mcp_list()]
        case "command":
            return [c.name for c in COMMANDS]
        case "path" if session.cwd is not None:
            head, _, _ = word.rpartition("/")
            base = head + "/" if head or word.startswith("/") else ""
            entries = session.handle(session.cwd).files.list(head or "/")
            return [base + e.name + ("/" if e.type == "dir" else "") for e in entries]
    return []


# -- the terminal ---------------------------------------------------------------------


def run_shell(start: Callable[[], int] | None = None) -> int:
    """The interactive loop; ``start`` starts a kernel when none answers."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.history import FileHistory

    console = Console(highlight=False)
    session = Session(console)
    try:
        session.admin().info()
    except SyscallError:
        if start is None or start() != 0:
            return 1
    if not sys.stdin.isatty():
        return run_script(session, sys.stdin)
    console.print(
        "[bold]llmos shell[/]: `help` lists the commands, `? QUESTION` asks the model, "
        "Ctrl-D leaves"
    )

    class _Completer(Completer):
        def get_completions(self, document: Any, complete_event: Any) -> Iterator[Completion]:
            for cand, pos in complete(session, document.text_before_cursor):
                yield Completion(cand, start_position=pos)

    state = paths.ensure_private_dir(paths.state_dir())
    prompt = PromptSession(
        history=FileHistory(str(state / "shell_history")),
        completer=_Completer(),
        complete_while_typing=False,
    )
    while True:
        try:
            line = prompt.prompt(PROMPT)
        except KeyboardInterrupt:
            continue
        except EOFError:
            return 0
        try:
            if line.strip().startswith("?"):
                _ask(session, prompt, line.strip()[1:].strip())
            else:
                session.execute(line)
            if session.chat_pid is not None:
                pid, session.chat_pid = session.chat_pid, None
                _chat(session, pid)
        except ShellExit:
            return 0
        except KeyboardInterrupt:
            console.print("[dim]interrupted[/]")


def run_script(session: Session, lines: Iterable[str]) -> int:
    """Run commands from a pipe or file, one a line (``echo ps | llmos shell``); the
    interactive ones (chat, ``?``) need a terminal. Returns 1 if a command failed."""
    failed = False
    for line in lines:
        if line.strip().startswith("?"):
            session.say("[red]error EINVAL:[/] `?` asks for confirmation: it needs a terminal")
            failed = True
            continue
        try:
            failed |= not session.execute(line)
        except ShellExit:
            break
        if session.chat_pid is not None:
            session.chat_pid = None
            session.say("[red]error EINVAL:[/] chat needs a terminal")
            failed = True
    return 1 if failed else 0


def _ask(session: Session, prompt: Any, question: str) -> None:
    console = session.console
    if not question:
        console.print("[red]error EINVAL:[/] `? QUESTION`, e.g. `? stop every running process`")
        return
    try:
        with console.status("asking the model…"):
            proposed = session.propose(question)
    except SyscallError as exc:
        session.error(exc)
        return
    valid = [line for line, why in proposed if why is None]
    for line, why in proposed:
        console.print(
            f"  [bold]{line}[/]"
            if why is None
            else f"  [dim]{line}[/]  [yellow](skipped: {why})[/]",
            highlight=False,
            markup=True,
        )
    if not valid:
        console.print("the model proposed no valid command")
        return
    try:
        answer = prompt.prompt(
            f"run {'this command' if len(valid) == 1 else f'these {len(valid)} commands'}? [y/N] "
        )
    except (KeyboardInterrupt, EOFError):
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        console.print("nothing run")
        return
    for line in valid:
        console.print(f"[dim]{PROMPT}{line}[/]", highlight=False)
        session.execute(line)


def _chat(session: Session, pid: int) -> None:
    from prompt_toolkit import PromptSession

    console = session.console
    console.print(f"chat with process {pid}: an empty line or /exit leaves, Ctrl-C stops a reply")
    chat_prompt: PromptSession[str] = PromptSession()
    while True:
        try:
            text = chat_prompt.prompt(f"chat {pid}> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            return
        if not text.strip() or text.strip() == "/exit":
            return
        try:
            session.chat_turn(
                pid, text, lambda piece: console.print(piece, end="", markup=False, highlight=False)
            )
            console.print()
            if session.last_turn:
                console.print(f"[dim]({session.last_turn})[/]")
        except KeyboardInterrupt:
            console.print("\n[dim]^C (reply stopped)[/]")
        except SyscallError as exc:
            console.print()
            session.error(exc)
            if exc.code in LOST or pid not in session.procs:
                return
