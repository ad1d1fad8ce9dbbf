"""The ``llmos`` command: kernel control, run agent programs, ps/top/kill/ask, syscalls, bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import llmos
from kernel.daemon import (
    add_kernel_options,
    driver_option,
)
from llmos.calls import opt
from llmos.client import Client, connect, resolve_endpoint
from llmos.ctl import (
    bench_gateway,
    bench_mcp,
    bench_runs,
    bench_scale,
    bench_state,
    bench_trace,
    curve_cli,
    keys,
    mcp_cli,
    runs_cli,
    trace_view,
)
from llmos.ctl.private import kernel_pid, start_kernel, try_info
from llmos.ctl.top import cmd_top
from llmos.ctl.views import parse_limits, pending_table
from syscalls import models as m
from syscalls import paths
from syscalls.errors import Errno, SyscallError

out = Console()
err = Console(stderr=True, soft_wrap=True)  # a sentence is never cut into lines


# -- kernel start / stop / status -----------------------------------------------------


def stop_kernel(timeout_s: float = 30) -> int:
    pid = kernel_pid()
    if pid is None or pid <= 0:
        err.print("no kernel is running")
        return 0
    os.kill(pid, signal.SIGTERM)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if kernel_pid() is None:
            err.print(f"kernel (pid {pid}) stopped")
            return 0
        time.sleep(0.1)
    err.print(
        f"[red]kernel (pid {pid}) did not stop in {timeout_s:.0f} s[/]; `kill -9 {pid}` if it is stuck"
    )
    return 1


def kernel_status(as_json: bool) -> int:
    pid = kernel_pid()
    info = try_info() if pid else None
    if as_json:
        print(
            json.dumps(
                {
                    "running": info is not None,
                    "pid": pid,
                    "info": info.model_dump() if info else None,
                }
            )
        )
        return 0 if info else 3
    if info is None:
        err.print(
            "no kernel is running"
            if pid is None
            else f"kernel pid {pid} holds the lock but does not answer"
        )
        return 3
    out.print(
        f"kernel {info.version} (ABI {info.abi}) pid {info.kernel_pid}, up {info.uptime_s:.0f} s, "
        f"policy {info.policy}, {info.processes} processes, on {', '.join(info.endpoints)}, "
        f"code sandbox {info.sandbox}"
    )
    for mod in info.models:
        out.print(
            f"  model {mod.name}: {mod.driver} driver, {mod.slots} slots, window {mod.max_context}, {mod.state}"
        )
    return 0


# -- ps / kill / ask / run ----------------------------------------------------------


def cmd_models(as_json: bool) -> int:
    """``llmos models``: every model the kernel serves, the default first."""
    with connect() as c:
        info = c.info()
    if as_json:
        print(json.dumps([mod.model_dump() for mod in info.models]))
        return 0
    table = Table(box=None)
    for col in ("MODEL", "DRIVER", "STATE", "SLOTS", "BUSY", "QUEUED", "WINDOW", "DETAIL"):
        table.add_column(
            col, justify="right" if col in ("SLOTS", "BUSY", "QUEUED", "WINDOW") else "left"
        )
    for mod in info.models:
        name = f"{mod.name} [dim](default)[/]" if mod.default else mod.name
        table.add_row(
            name,
            mod.driver,
            mod.state,
            str(mod.slots),
            str(mod.busy),
            str(mod.queued),
            str(mod.max_context),
            mod.detail,
        )
    out.print(table)
    return 0


def cmd_tools(as_json: bool) -> int:
    """``llmos tools``: every tool the kernel has, built in or served."""
    with connect() as c:
        tools = c.tools()
    if as_json:
        print(json.dumps([t.model_dump() for t in tools]))
        return 0
    table = Table(box=None)
    for col in ("TOOL", "SERVED BY", "FOR", "IRREVERSIBLE", "ARGUMENTS", "DESCRIPTION"):
        table.add_column(col)
    for t in tools:
        args = ", ".join(t.parameters.get("properties", {}))
        table.add_row(
            t.name,
            f"mcp {t.mcp}" if t.mcp else "kernel" if t.server is None else f"pid {t.server}",
            "everyone" if t.program is None else f"program {t.program}",
            "yes" if t.irreversible else "",
            args,
            t.description,
        )
    out.print(table)
    return 0


def cmd_pending(as_json: bool) -> int:
    """``llmos pending``: irreversible tool calls waiting for the owner's decision."""
    with connect() as c:
        calls = c.pending()
        names = {p.pid: p.name for p in c.ps()} if calls else {}
    if as_json:
        print(json.dumps([p.model_dump() for p in calls]))
        return 0
    if not calls:
        err.print("no tool call is waiting for approval")
        return 0
    out.print(pending_table(calls, names))
    err.print("[dim]llmos approve ID / llmos deny ID[/]")
    return 0


def cmd_decide(call_id: int, approve: bool) -> int:
    with connect() as c:
        (c.approve if approve else c.deny)(call_id)
    err.print(f"call {call_id} {'approved' if approve else 'denied'}")
    return 0


#: ``llmos ps`` columns: header -> (alignment, cell of a row).
PS_COLUMNS: dict[str, tuple[str, Any]] = {
    "pid": ("right", lambda p: str(p.pid)),
    "ppid": ("right", lambda p: str(p.ppid)),
    "prog": ("right", lambda p: str(p.program)),
    "state": (
        "left",
        lambda p: p.state if p.exit_status is None else f"{p.state}({p.exit_status})",
    ),
    "ni": ("right", lambda p: str(p.nice)),
    "model": ("left", lambda p: p.model),
    "calls": ("right", lambda p: str(p.generate_calls)),
    "tok_in": ("right", lambda p: str(p.prompt_tokens)),
    "tok_out": ("right", lambda p: str(p.output_tokens)),
    "run_s": ("right", lambda p: f"{p.service_s:.2f}"),
    "wait_s": ("right", lambda p: f"{p.wait_s:.2f}"),
    "preempt": ("right", lambda p: str(p.preemptions)),
    "mbox": ("right", lambda p: str(p.mailbox)),
    "wchan": ("left", lambda p: p.wchan or "-"),
    "ctx": ("right", lambda p: str(p.context_messages)),
    "quota": (
        "left",
        lambda p: (
            f"[red]{p.quota_exceeded}[/]" if p.quota_exceeded else ("set" if p.limits else "-")
        ),
    ),
    "name": ("left", lambda p: p.name),
}
_PS_DEFAULT = [c for c in PS_COLUMNS if c != "ctx"]


def ps_columns(text: str) -> list[str]:
    """argparse type of ``ps -o``: comma-separated column names."""
    cols = [c.strip().lower() for c in text.split(",") if c.strip()]
    unknown = [c for c in cols if c not in PS_COLUMNS]
    if unknown or not cols:
        raise argparse.ArgumentTypeError(
            f"unknown column(s) {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(PS_COLUMNS)}"
        )
    return cols


def cmd_ps(args: argparse.Namespace) -> int:
    """``llmos ps [--state S] [--program N] [-o COLS]``: the process table."""
    with connect() as c:
        procs = c.ps()
        if args.state is None and args.program is None:
            procs = [*c.ps(1), *procs]  # init, the parent top-level processes name
    states = {s.upper() for s in (args.state or "").split(",") if s}
    procs = [
        p
        for p in procs
        if (not states or p.state in states) and (args.program is None or p.program == args.program)
    ]
    if args.json:
        print(json.dumps([p.model_dump() for p in procs]))
        return 0
    cols = args.columns or _PS_DEFAULT
    table = Table(box=None)
    for col in cols:
        table.add_column(col.upper().replace("_", " "), justify=PS_COLUMNS[col][0])
    for p in procs:
        table.add_row(*(PS_COLUMNS[col][1](p) for col in cols))
    (out if out.is_terminal else Console(width=200)).print(
        table
    )  # a pipe gets whole rows, not 80 columns
    return 0


def cmd_ctx(args: argparse.Namespace) -> int:
    """``llmos ctx PID [--last N]``: a process's context, as the admin."""
    with connect() as c:
        res = m.CtxGetResult(**c.call("ctx.get", opt(pid=args.pid, last=args.last)))
    if args.json:
        print(json.dumps(res.model_dump()))
        return 0
    if res.summary:
        out.print(f"[dim]summary of {res.evicted} earlier messages:[/] {res.summary}")
    for msg in res.messages:
        out.print(f"[bold]{msg.role}[/]: ", end="")
        out.print(msg.content, markup=False, highlight=False)
    err.print(f"[dim]{len(res.messages)} of {res.total} messages[/]")
    return 0


def cmd_mem(args: argparse.Namespace) -> int:
    """``llmos mem PID [--search Q] [-k N]``: a process's core memory blocks, or the
    archival entries closest to a query, as the admin."""
    with connect() as c:
        mem = c.memory(f"pid:{args.pid}")
        if args.search is None:
            blocks = mem.blocks()
            if args.json:
                print(json.dumps(blocks))
                return 0
            for label, value in blocks.items():
                out.print(f"[bold]{label}[/]: ", end="")
                out.print(value, markup=False, highlight=False)
            if not blocks:
                err.print(f"[dim]process {args.pid} has no core memory blocks[/]")
            return 0
        hits = mem.search(args.search, k=args.k)
    if args.json:
        print(json.dumps([h.model_dump() for h in hits]))
        return 0
    for h in hits:
        out.print(f"[cyan]{h.score:.3f}[/] #{h.id} ", end="")
        out.print(h.text, markup=False, highlight=False)
    return 0


def since_time(text: str) -> float:
    """argparse type of ``--since``: a Unix time, or an age such as ``90s``, ``10m``, ``2h``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return time.time() - float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a Unix time or an age like 10m, not {text!r}"
        ) from None


def cmd_audit(args: argparse.Namespace) -> int:
    """``llmos audit``: the audit trail's newest rows; ``--verify`` exits 1 at a broken link."""
    with connect() as c:
        res = c.audit(args.pid, args.program, args.since, args.limit, args.verify)
    verdict = res.verified
    if args.json:
        print(json.dumps(res.model_dump()))
    else:
        table = Table(box=None)
        for col in ("SEQ", "TIME", "ACTOR", "PROG", "CALL", "TARGET", "OUTCOME", "DETAIL"):
            table.add_column(col)
        for r in res.rows:
            table.add_row(
                str(r.seq),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.ts)),
                r.actor,
                "" if r.program is None else str(r.program),
                r.call,
                r.target,
                r.outcome if r.outcome == "ok" else f"[red]{r.outcome}[/]",
                r.detail,
            )
        (out if out.is_terminal else Console(width=200)).print(table)
        if verdict is not None:
            if verdict.ok:
                err.print(f"[green]audit trail intact[/]: {verdict.rows} rows chained")
            else:
                err.print(
                    f"[red]audit trail broken at row {verdict.first_broken}[/]: {verdict.reason}"
                )
    return 1 if verdict is not None and not verdict.ok else 0


def cmd_fs(args: argparse.Namespace) -> int:
    """``llmos fs PID ls [PATH]`` / ``llmos fs PID cat PATH``: a process's files, read-only,
    as the admin (in that process's view: its root, /home, its mounts)."""
    with connect() as c:
        if args.op == "cat":
            if not args.path:
                raise SyscallError.of(Errno.EINVAL, "llmos fs PID cat PATH: name the file")
            res = m.FsReadResult(**c.call("fs.read", {"pid": args.pid, "path": args.path}))
            if args.json:
                print(json.dumps(res.model_dump(mode="json")))
            elif res.text is not None:
                sys.stdout.write(res.text)
            else:
                sys.stdout.buffer.write(res.data or b"")
            return 0
        listing = m.FsListResult(**c.call("fs.list", {"pid": args.pid, "path": args.path or "/"}))
    if args.json:
        print(json.dumps(listing.model_dump()))
        return 0
    for e in listing.entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime))
        name = f"{e.name}/" if e.type == "dir" else e.name
        out.print(f"{e.size:>10} {when} ", end="")
        out.print(name, markup=False, highlight=False)
    return 0


def cmd_logs(follow: bool, lines: int) -> int:
    """``llmos logs [-f] [-n N]``: the kernel log's last lines (and, with -f, what follows)."""
    log = paths.state_dir() / "kernel.log"
    try:
        with open(log, errors="replace") as f:
            tail = f.readlines()[-lines:] if lines else []
            sys.stdout.writelines(tail)
            sys.stdout.flush()
            while follow:
                line = f.readline()
                if line:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                else:
                    time.sleep(0.2)
    except FileNotFoundError:
        err.print(f"no kernel log at {log} (has a kernel run with this state dir?)")
        return 1
    return 0


# -- top ------------------------------------------------------------------------------


#: The signals the kernel knows, with the numbers a Unix user types (``kill -9``).
SIGNALS = {"TERM": 15, "KILL": 9, "STOP": 19, "CONT": 18}


def signal_name(text: str) -> str:
    """``KILL`` from ``KILL``, ``kill``, ``SIGKILL`` or ``9``; ValueError naming the
    known ones otherwise."""
    name = text.upper().removeprefix("SIG")
    by_number = {str(n): s for s, n in SIGNALS.items()}
    name = by_number.get(name, name)
    if name not in SIGNALS:
        known = ", ".join(f"{s} ({n})" for s, n in SIGNALS.items())
        raise argparse.ArgumentTypeError(f"unknown signal {text!r}; llmos knows {known}")
    return name


def unix_kill_argv(argv: list[str]) -> list[str]:
    """``kill -9 PID`` / ``kill -KILL PID`` / ``kill -SIGSTOP PID`` as ``kill -s NAME PID``."""
    if not argv or argv[0] != "kill":
        return argv
    rewritten = ["kill"]
    for token in argv[1:]:
        bare = token[1:]
        if token.startswith("-") and bare and not bare.startswith("-") and bare not in "sl":
            with contextlib.suppress(argparse.ArgumentTypeError):
                rewritten += ["-s", signal_name(bare)]
                continue
        rewritten.append(token)
    return rewritten


def cmd_kill(pids: list[int], sig: str, as_json: bool = False) -> int:
    """``llmos kill [-s SIG | -SIG] PID...``: signal each; 1 if any failed (like kill(1))."""
    status = 0
    rows = []
    with connect() as c:
        for pid in pids:
            try:
                res = c.kill(pid, sig)
            except SyscallError as exc:
                err.print(f"[red]llmos: kill {pid}: {exc.code}:[/] {exc.message}", highlight=False)
                status = 1
                continue
            rows.append(res.model_dump())
            if not as_json:
                err.print(f"process {res.pid}: {res.state}")
    if as_json:
        print(json.dumps(rows))
    return status


def cmd_kill_list() -> int:
    """``llmos kill -l``: the signal names and numbers."""
    print(" ".join(f"{n}) SIG{s}" for s, n in SIGNALS.items()))
    return 0


def read_prompt(text: str | None, file: str | None, what: str = "prompt") -> str:
    """The prompt from the argument, ``-`` (stdin) or ``--file PATH``; EINVAL if empty."""
    if file is not None:
        if text is not None:
            raise SyscallError.of(Errno.EINVAL, f"give the {what} or --file, not both")
        try:
            text = Path(file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise SyscallError.of(Errno.EINVAL, f"cannot read {file}: {exc}") from None
    elif text == "-":
        text = sys.stdin.read()
    if not text or not text.strip():
        raise SyscallError.of(
            Errno.EINVAL, f"the {what} is empty: give text, - to read stdin, or --file PATH"
        )
    return text


def cmd_ask(args: argparse.Namespace) -> int:
    args.prompt = read_prompt(args.prompt, args.file)
    if kernel_pid() is None and start_kernel([]) != 0:
        return 1
    with connect() as c:
        proc = c.spawn("ask", system=args.system, model=args.model)
        try:
            opts = {"max_tokens": args.max_tokens, "temperature": args.temperature}
            if args.json:
                res = proc.generate([{"role": "user", "content": args.prompt}], **opts)
                print(json.dumps({"pid": proc.pid, **res.model_dump()}))
            else:
                t0 = time.monotonic()
                for piece in proc.stream(args.prompt, **opts):
                    out.print(piece, end="", markup=False, highlight=False)
                out.print()
                if err.is_terminal and proc.last is not None:  # progress for people, not pipes
                    n, spent = proc.last.usage.output_tokens, time.monotonic() - t0
                    err.print(f"[dim]({n} tokens in {spent:.1f} s, {n / spent:.1f} tok/s)[/]")
        finally:
            c.kill(proc.pid, "KILL")
            c.wait(proc.pid, timeout=10)
    return 0


def cmd_spawn(args: argparse.Namespace) -> int:
    """``llmos spawn``: a process for scripts (prints its pid), or with ``--task`` the
    default agent loop on it (exit 0 when it answered, 1 when it did not)."""
    if args.task is not None:
        args.task = read_prompt(args.task, None, "task")
    if kernel_pid() is None and start_kernel([]) != 0:
        return 1
    from llmos.agent import Agent, Step

    tools = [t for t in (args.tools or "").split(",") if t] or None
    redact = [t for t in (args.redact or "").split(",") if t]
    with connect() as c:
        proc = c.spawn(
            args.name,
            system=args.system,
            model=args.model,
            nice=args.nice,
            **({"tools": tools} if tools else {}),
            **({"redact": redact, "redact_model": args.redact_model} if redact else {}),
        )
        if args.task is None:
            print(
                json.dumps({"pid": proc.pid, "token": proc.token}) if args.json else proc.pid,
                flush=True,
            )
            return cmd_wait(proc.pid, None, False) if args.wait else 0
        try:

            def show(step: Step) -> None:
                if not args.json:
                    got = step.error or json.dumps(step.result, ensure_ascii=False)[:300]
                    err.print(
                        f"[cyan]{step.tool}[/]({json.dumps(step.arguments, ensure_ascii=False)}) -> {got}",
                        highlight=False,
                        markup=True,
                    )

            result = Agent(proc, tools=tools, max_steps=args.max_steps, on_step=show).run(args.task)
        finally:
            if not args.keep:
                c.kill(proc.pid, "KILL")
                c.wait(proc.pid, timeout=10)
    if args.json:
        print(
            json.dumps(
                {
                    "pid": proc.pid,
                    "answer": result.answer,
                    "stopped": result.stopped,
                    "output_tokens": result.output_tokens,
                    "steps": [s.__dict__ for s in result.steps],
                },
                default=str,
            )
        )
    elif result.answer is not None:
        out.print(result.answer, markup=False, highlight=False)
    else:
        err.print(f"[yellow]no answer[/] ({result.stopped} after {len(result.steps)} tool calls)")
    return 0 if result.answer is not None else 1


#: Longest single proc.wait the CLI makes; a wait with no timeout re-issues it.
WAIT_SLICE_S = 600.0


def wait_for(c: Client, pid: int, timeout: float | None) -> m.WaitResult | None:
    """Wait until ``pid`` exits, across call deadlines (each proc.wait is a bounded
    slice, re-issued); None when ``timeout`` seconds pass first."""
    t0 = time.monotonic()
    while True:
        left = None if timeout is None else timeout - (time.monotonic() - t0)
        if left is not None and left <= 0:
            return None
        try:
            return c.wait(pid, timeout=WAIT_SLICE_S if left is None else min(left, WAIT_SLICE_S))
        except SyscallError as exc:
            if exc.code is not Errno.ETIMEDOUT:
                raise


def cmd_wait(pid: int, timeout: float | None, as_json: bool) -> int:
    """``llmos wait PID``: block until PID exits (however long, unless ``--timeout``);
    exit with its status, 124 on timeout."""
    with connect() as c:
        res = wait_for(c, pid, timeout)
    if res is None:
        if as_json:
            print(json.dumps({"pid": pid, "timed_out": True, "timeout_s": timeout}))
        err.print(f"process {pid} is still running after {timeout:g} s")
        return 124
    if as_json:
        print(json.dumps(res.model_dump()))
    else:
        err.print(
            f"process {res.pid} exited with status {res.exit_status}"
            + (f" (SIG{res.signal})" if res.signal else "")
        )
    return min(int(res.exit_status), 255)


def cmd_run(args: argparse.Namespace) -> int:
    """Run PROGRAM as a child OS process with its own LLM process."""
    program = Path(args.program)
    if not program.is_file():
        err.print(f"[red]no such program:[/] {program}")
        return 2
    started = kernel_pid() is None
    if started and start_kernel([]) != 0:
        return 1
    with connect() as c:
        proc = c.spawn(
            args.name or program.stem[:64],
            system=args.system,
            nice=args.nice,
            model=args.model,
            program_limits=parse_limits(args.limit),
            namespace=args.namespace,
            host_pid=os.getpid(),
        )  # if `llmos run` dies with the kernel down, the process is hung up
        env = {
            **os.environ,
            "LLMOS_PID": str(proc.pid),
            "LLMOS_TOKEN": proc.token,
            "LLMOS_ENDPOINT": resolve_endpoint(),
        }
        child = subprocess.Popen(
            [sys.executable, "-m", "llmos.ctl.launch", str(program), *args.args], env=env
        )
        try:
            status = child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
            status = child.wait()
        finally:
            _kill_tree(c, proc.pid)
        code = status if status >= 0 else 128 - status  # as a shell reports a signal
        if not args.quiet:
            how = (
                f"was killed by {signal.Signals(-status).name} (status {code}; "
                if status < 0
                else f"exited with status {code} ("
            )
            err.print(f"[dim]{program.name} {how}LLM process {proc.pid} reaped)[/]")
            if started:
                err.print("[dim]the kernel keeps running; `llmos kernel stop` stops it[/]")
    return code


def _kill_tree(c: Client, pid: int) -> None:
    """The program is gone: kill its LLM process and every descendant, reap the top."""
    try:
        procs = c.ps()
    except SyscallError:
        return
    tree, frontier = [], {pid}
    for p in sorted(procs, key=lambda p: p.pid):  # children have larger pids than parents
        if p.pid in frontier or p.ppid in frontier:
            frontier.add(p.pid)
            tree.append(p)
    for p in tree:
        if p.state != "ZOMBIE":
            with contextlib.suppress(SyscallError):
                c.kill(p.pid, "KILL")
    with contextlib.suppress(SyscallError):
        c.wait(pid, timeout=10)


def cmd_syscalls(args: argparse.Namespace) -> int:
    from syscalls.table import markdown_table, table_rows

    if args.json:
        print(json.dumps(table_rows()))
    elif args.markdown:
        print(markdown_table(), end="")
    else:
        table = Table(show_lines=True)
        for col in ("syscall", "arguments", "result", "errors"):
            table.add_column(col)
        for r in table_rows():
            table.add_row(
                f"[bold]{r['name']}[/]\n[dim]{r['doc']}[/]", r["args"], r["result"], r["errors"]
            )
        out.print(table)
    return 0


# -- argument parsing ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmos", description="llmos: an operating system for LLM agents"
    )
    p.add_argument("--version", action="version", version=f"llmos {llmos.__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    kp = sub.add_parser("kernel", help="start, stop or inspect the kernel daemon")
    ksub = kp.add_subparsers(dest="kcmd", required=True)
    ks = ksub.add_parser(
        "start", help="start the kernel (detached unless --foreground)", allow_abbrev=False
    )
    add_kernel_options(ks)
    ks.add_argument("--foreground", action="store_true", help="run in this terminal, log to stderr")
    ks.add_argument(
        "--no-wait", action="store_true", help="return without waiting for the model to load"
    )
    ksub.add_parser("stop", help="stop the running kernel (SIGTERM)")
    kst = ksub.add_parser("status", help="is a kernel running, with what")
    kst.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")

    rp = sub.add_parser("run", help="run an agent program with its own LLM process")
    rp.add_argument("program", help="the agent program (a Python file)")
    rp.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the program")
    rp.add_argument("--name", default=None, help="process name (default: the program's)")
    rp.add_argument("--system", default=None, help="system prompt of its process")
    rp.add_argument(
        "--nice", type=int, default=0, help="priority of its process, -20..19 (default: 0)"
    )
    rp.add_argument(
        "--model",
        default=None,
        help="model its process runs on (default: the kernel's first; see `llmos models`)",
    )
    rp.add_argument(
        "--namespace",
        default=None,
        metavar="NAME",
        help="name of the program's memory namespace: a later run with the same name finds its memory",
    )
    rp.add_argument(
        "--limit",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a quota for the whole program: max_output_tokens, max_context_tokens, "
        "max_wall_s, max_calls_per_min, and its shares of the kernel's tables: max_procs, "
        "max_calls_in_flight, max_ipc_bytes, max_topics, max_parked (repeatable)",
    )
    rp.add_argument("--quiet", action="store_true", help="print nothing of llmos's own")

    mp = sub.add_parser("models", help="list the kernel's models: driver, state, slots, queue")
    mp.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")

    tl = sub.add_parser("tools", help="list the kernel's tools (built in and served by programs)")
    tl.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    pe = sub.add_parser("pending", help="irreversible tool calls waiting for your approval")
    pe.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    for verb, what in (
        ("approve", "let a parked tool call run"),
        ("deny", "refuse a parked tool call"),
    ):
        dp = sub.add_parser(verb, help=what)
        dp.add_argument("id", type=int, help="the call's id (llmos pending)")

    pp = sub.add_parser("ps", help="list processes")
    pp.add_argument("--state", default=None, help="only these states, e.g. READY,RUNNING")
    pp.add_argument("--program", type=int, default=None, help="only this program's processes")
    pp.add_argument(
        "-o",
        dest="columns",
        type=ps_columns,
        default=None,
        metavar="COLS",
        help=f"columns to show, comma-separated ({', '.join(PS_COLUMNS)})",
    )
    pp.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")

    cx = sub.add_parser("ctx", help="a process's context (its conversation)")
    cx.add_argument("pid", type=int, help="the process")
    cx.add_argument("--last", type=int, default=None, help="only the last N messages")
    cx.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")

    me = sub.add_parser("mem", help="a process's core memory blocks, or search its archive")
    me.add_argument("pid", type=int, help="the process")
    me.add_argument("--search", default=None, metavar="QUERY", help="archival entries closest")
    me.add_argument("-k", type=int, default=5, help="how many entries --search shows")
    me.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")

    au = sub.add_parser("audit", help="the audit trail: who did what, with which result")
    au.add_argument("--pid", type=int, default=None, help="rows by or about this process")
    au.add_argument("--program", type=int, default=None, help="rows of this program")
    au.add_argument(
        "--since", type=since_time, default=None, help="Unix time, or an age: 90s, 10m, 2h, 1d"
    )
    au.add_argument("-n", "--limit", type=int, default=100, help="the newest N rows (100)")
    au.add_argument(
        "--verify", action="store_true", help="check the hash chain; exit 1 at a broken link"
    )
    au.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")

    fsp = sub.add_parser("fs", help="a process's files, read-only: ls [PATH] or cat PATH")
    fsp.add_argument("pid", type=int, help="the process (its view: root, /home, /mnt)")
    fsp.add_argument("op", choices=["ls", "cat"], help="list a directory or print a file")
    fsp.add_argument("path", nargs="?", default=None, help="the path (ls: default /)")
    fsp.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")

    trace_view.add_parser(sub)  # llmos trace
    lg = sub.add_parser("logs", help="the kernel's log (-f to follow it)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    lg.add_argument("-n", "--lines", type=int, default=50, help="last N lines (default: 50)")

    tp = sub.add_parser("top", help="live view of models, processes, token rates and the host")
    tp.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)"
    )
    tp.add_argument("--once", action="store_true", help="print one snapshot and exit")
    tp.add_argument(
        "--json", action="store_true", help="print the raw sys.stat result as JSON (implies --once)"
    )

    kl = sub.add_parser(
        "kill",
        help="signal processes (kill -9 PID, kill -s STOP PID, kill -l)",
        description="Send a signal to LLM processes. SIG: TERM (15, default), KILL (9), "
        "STOP (19), CONT (18); given as -s SIG, -SIG or -NUMBER.",
    )
    kl.add_argument("pid", type=int, nargs="*", help="process ids")
    kl.add_argument(
        "-s", "--signal", default="TERM", type=signal_name, help="TERM, KILL, STOP or CONT"
    )
    kl.add_argument("-l", "--list", action="store_true", help="list the signals")
    kl.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")

    ap = sub.add_parser("ask", help="one-shot generation in a fresh process")
    ap.add_argument("prompt", nargs="?", help="what to ask; - reads it from stdin")
    ap.add_argument("--file", default=None, metavar="PATH", help="read the prompt from a file")
    ap.add_argument("--system", default=None, help="system prompt of the process")
    ap.add_argument(
        "--model",
        default=None,
        help="model to ask (default: the kernel's first; see `llmos models`)",
    )
    ap.add_argument(
        "--max-tokens", type=int, default=128, help="longest answer in tokens (default: 128)"
    )
    ap.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)"
    )
    ap.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")

    sn = sub.add_parser(
        "spawn", help="spawn a process; with --task, run the default agent loop on it"
    )
    sn.add_argument("--name", default="agent", help="process name (default: agent)")
    sn.add_argument(
        "--model", default=None, help="model of the process (default: the kernel's first)"
    )
    sn.add_argument("--system", default=None, help="system prompt")
    sn.add_argument("--nice", type=int, default=0, help="priority, -20..19 (default: 0)")
    sn.add_argument(
        "--task", default=None, help="a task for the agent loop (ReAct over the kernel's tools)"
    )
    sn.add_argument(
        "--tools", default=None, help="comma-separated tools it may use (default: all it may)"
    )
    sn.add_argument(
        "--redact",
        default=None,
        metavar="KINDS",
        help="mask personal data in what is stored for it: comma-separated "
        "email,phone,card,iban,ip",
    )
    sn.add_argument(
        "--redact-model",
        action="store_true",
        help="with --redact: the model is given the masked text too",
    )
    sn.add_argument(
        "--max-steps", type=int, default=6, help="tool calls before giving up (default: 6)"
    )
    sn.add_argument(
        "--keep", action="store_true", help="keep the process after the task (default: reap it)"
    )
    sn.add_argument(
        "--wait",
        action="store_true",
        help="without --task: wait for the process to exit and exit with its status",
    )
    sn.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    wt = sub.add_parser(
        "wait", help="wait for a process to exit; exit with its status (like a shell's wait)"
    )
    wt.add_argument("pid", type=int, help="the process to wait for")
    wt.add_argument(
        "--timeout", type=float, default=None, help="give up after this many seconds (exit 124)"
    )
    wt.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")

    sub.add_parser("shell", help="an interactive shell on the kernel (started if none runs)")
    keys.add_parsers(sub)  # llmos gateway, llmos keys
    curve_cli.add_parsers(sub, ksub)  # llmos kernel key, llmos keygen, llmos clients
    sp = sub.add_parser("syscalls", help="print the syscall table")
    sp.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    sp.add_argument("--markdown", action="store_true", help="as a Markdown table")

    bp = sub.add_parser("bench", help="benchmarks")
    bsub = bp.add_subparsers(dest="bcmd", required=True)
    bs = bsub.add_parser("syscalls", help="syscall round trips and generation overhead")
    bs.add_argument(
        "--clients", default="1,16", help="comma-separated client counts (default: 1,16)"
    )
    bs.add_argument("--calls", type=int, default=5000, help="calls per client per syscall")
    bs.add_argument("--gen-tokens", type=int, default=64, help="tokens per generation (0 skips it)")
    bs.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    bsc = bsub.add_parser("sched", help="agent-program workloads under every scheduling policy")
    bsc.add_argument(
        "--driver",
        choices=["sim", "cpu"],
        default="sim",
        help="sim: the simulator at scale (default); cpu: a small run on the real model",
    )
    bsc.add_argument(
        "--policies",
        default=None,
        help="comma-separated policies (default: every one the kernel has)",
    )
    bsc.add_argument(
        "--workloads",
        default="chat,react,mix",
        help="comma-separated workloads (default: chat,react,mix)",
    )
    bsc.add_argument(
        "--programs",
        type=int,
        default=None,
        help="programs per workload (default: sim 200/200/1200, cpu 6)",
    )
    bsc.add_argument("--slots", type=int, default=None, help="model slots (default: sim 32, cpu 2)")
    bsc.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    bsc.add_argument(
        "--driver-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        type=driver_option,
        help="driver option, e.g. tokens_per_s=100 (repeatable)",
    )
    bsc.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    bd = bsub.add_parser(
        "driver", help="a driver's tokens/s and time to first token, through the kernel and direct"
    )
    bd.add_argument("--driver", default="cpu", help="cpu (default), vllm, openai or sim")
    bd.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model folder (default: the packaged model)",
    )
    bd.add_argument(
        "--concurrency", default="1,4,16", help="comma-separated client counts (default: 1,4,16)"
    )
    bd.add_argument("--requests", type=int, default=2, help="generations per client (default: 2)")
    bd.add_argument(
        "--tokens", type=int, default=32, help="max output tokens per generation (default: 32)"
    )
    bd.add_argument(
        "--turns", type=int, default=4, help="turns per conversation of the prefix-cache workload"
    )
    bd.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of every level on both paths, order alternating (default: 3)",
    )
    bd.add_argument(
        "--sequential",
        action="store_true",
        help="run the kernel's rounds, stop it, then the direct ones (one engine loaded at a time)",
    )
    bd.add_argument(
        "--slots", type=int, default=None, help="driver slots (default: the highest concurrency)"
    )
    bd.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    bd.add_argument(
        "--driver-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        type=driver_option,
        help="driver option (repeatable), e.g. endpoints=http://host:8000/v1 for openai",
    )
    bd.add_argument(
        "--versus",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        type=driver_option,
        help="compare with a second kernel whose driver options differ by these (repeatable; "
        "KEY= drops an option) instead of the driver called directly, e.g. a router vs the "
        "driver's own placement over two endpoints",
    )
    bd.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    bench_gateway.add_parser(bsub)  # llmos bench gateway
    bench_scale.add_parser(bsub)  # llmos bench scale
    bench_mcp.add_parser(bsub)  # llmos bench mcp
    bench_runs.add_parser(bsub)  # llmos bench runs
    bench_trace.add_parser(bsub)  # llmos bench trace
    bench_state.add_parser(bsub)  # llmos bench state
    bm = bsub.add_parser(
        "memory", help="archival memory put/search latency and throughput at growing sizes"
    )
    bm.add_argument(
        "--sizes", default="1000,10000,100000", help="entry counts (default: 1000,10000,100000)"
    )
    bm.add_argument("--searches", type=int, default=200, help="searches per size (default: 200)")
    bm.add_argument("--puts", type=int, default=50, help="single-entry puts per size (default: 50)")
    bm.add_argument("--seed", type=int, default=0)
    bm.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="keep the kernel's state (and the filled entries) in DIR: a later run measures "
        "again without refilling (default: a temporary directory)",
    )
    bm.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    mcp_cli.add_parser(sub)
    runs_cli.add_parser(sub)
    return p


#: ``llmos kernel start``'s own options; every other option is the daemon's, passed through.
_START_ONLY = ("--foreground", "--no-wait")


def _subcommand_parser(
    parser: argparse.ArgumentParser, names: list[str]
) -> argparse.ArgumentParser:
    """The parser of ``llmos NAME [NAME]`` (for its own usage line in errors)."""
    for name in names:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or name not in subs[0].choices:
            break
        parser = subs[0].choices[name]
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = unix_kill_argv(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.cmd is None:
        parser.print_help(sys.stderr)
        return 2
    if extra:  # the subcommand's usage, not the top-level one
        names = [args.cmd, *([args.kcmd] if getattr(args, "kcmd", None) else [])]
        _subcommand_parser(parser, names).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "kernel" and args.kcmd == "start":
        rest = argv[argv.index("start") + 1 :]
        args.kernel_options = [t for t in rest if t not in _START_ONLY]
    try:
        return _run(args)
    except SyscallError as exc:
        if getattr(args, "json", False):  # scripts read the error as JSON, the status stays
            print(json.dumps({"error": {"code": str(exc.code), "message": exc.message}}))
        err.print(f"[red]llmos: {exc.code}:[/] {exc.message}", highlight=False)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    match args.cmd:
        case "kernel":
            if args.kcmd == "start":
                if args.foreground:
                    import asyncio

                    from kernel.daemon import run_kernel

                    return asyncio.run(run_kernel(args))
                return start_kernel(args.kernel_options, wait=not args.no_wait)
            if args.kcmd == "stop":
                return stop_kernel()
            if args.kcmd == "key":
                return curve_cli.cmd_kernel_key(args)
            return kernel_status(args.json)
        case "run":
            return cmd_run(args)
        case "models":
            return cmd_models(args.json)
        case "tools":
            return cmd_tools(args.json)
        case "pending":
            return cmd_pending(args.json)
        case "approve" | "deny":
            return cmd_decide(args.id, args.cmd == "approve")
        case "ps":
            return cmd_ps(args)
        case "ctx":
            return cmd_ctx(args)
        case "mem":
            return cmd_mem(args)
        case "logs":
            return cmd_logs(args.follow, args.lines)
        case "trace":
            return trace_view.cmd_trace(args)
        case "audit":
            return cmd_audit(args)
        case "fs":
            return cmd_fs(args)
        case "top":
            return cmd_top(args)
        case "kill":
            if args.list:
                return cmd_kill_list()
            if not args.pid:
                err.print("llmos kill: name at least one PID (or -l to list signals)")
                return 2
            return cmd_kill(args.pid, args.signal, args.json)
        case "ask":
            return cmd_ask(args)
        case "spawn":
            return cmd_spawn(args)
        case "wait":
            return cmd_wait(args.pid, args.timeout, args.json)
        case "syscalls":
            return cmd_syscalls(args)
        case "mcp":
            return mcp_cli.run(args)
        case "runs":
            return runs_cli.run(args)
        case "gateway":
            from llmos.ctl.gateway import cmd_gateway  # FastAPI only when it serves

            return cmd_gateway(args)
        case "keys":
            return keys.cmd_keys(args)
        case "keygen":
            return curve_cli.cmd_keygen(args)
        case "clients":
            return curve_cli.cmd_clients(args)
        case "shell":
            from llmos.ctl.shell import run_shell

            return run_shell(start=lambda: start_kernel([]))
        case "bench":
            if args.bcmd == "trace":
                return bench_trace.bench_trace(args)
            if args.bcmd == "sched":
                from llmos.ctl.bench_sched import bench_sched

                return bench_sched(args)
            if args.bcmd == "driver":
                from llmos.ctl.bench_driver import bench_driver

                return bench_driver(args)
            if args.bcmd == "gateway":
                return bench_gateway.bench_gateway(args)
            if args.bcmd == "scale":
                return bench_scale.bench_scale(args)
            if args.bcmd == "mcp":
                return bench_mcp.bench_mcp(args)
            if args.bcmd == "runs":
                return bench_runs.bench_runs(args)
            if args.bcmd == "memory":
                from llmos.ctl.bench_memory import bench_memory

                return bench_memory(args)
            if args.bcmd == "state":
                return bench_state.bench_state(args)
            from llmos.ctl.bench import bench_syscalls

            return bench_syscalls(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
