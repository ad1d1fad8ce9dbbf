"""``llmos runs``: the kernel's detached generations (llm.runs, llm.stream, llm.wait ...).

llmos runs [--pid N] [--json]          # list them: state, chunks, tokens, age
llmos runs cat RUN [--from N]          # its text so far, then live until it ends (tail -f)
llmos runs wait RUN [--timeout S] [--keep]   # its result text (collects it unless --keep)
llmos runs cancel RUN                  # end it at the next token; its process goes on
llmos runs rm RUN                      # forget a finished run
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich.console import Console
from rich.table import Table

from llmos.client import connect

out = Console()
err = Console(stderr=True, soft_wrap=True)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``llmos runs`` on the ``llmos`` command's subparsers."""
    rp = sub.add_parser("runs", help="detached generations: list, cat, wait, cancel, rm")
    rp.add_argument("--pid", type=int, default=None, help="only this process's runs")
    rp.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    rsub = rp.add_subparsers(dest="rcmd", required=False)
    cat = rsub.add_parser("cat", help="print a run's text, following it until it ends")
    cat.add_argument("run", type=int)
    cat.add_argument(
        "--from", dest="from_seq", type=int, default=0, metavar="N", help="from chunk N"
    )
    wt = rsub.add_parser("wait", help="wait for a run; print its text (and collect it)")
    wt.add_argument("run", type=int)
    wt.add_argument("--timeout", type=float, default=None, help="seconds (default: 10 min)")
    wt.add_argument("--keep", action="store_true", help="leave the result to read again")
    wt.add_argument("--json", action="store_true", help="print the result as JSON")
    for verb, what in (("cancel", "end a run at its next token"), ("rm", "forget a finished run")):
        vp = rsub.add_parser(verb, help=what)
        vp.add_argument("run", type=int)


def run(args: argparse.Namespace) -> int:
    """Run ``llmos runs [SUBCOMMAND]``; a SyscallError is printed by the caller."""
    with connect() as c:
        match args.rcmd:
            case "cat":
                for chunk in c.stream_run(args.run, args.from_seq):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                return 0
            case "wait":
                result = c.wait_run(args.run, timeout=args.timeout, keep=args.keep)
                if args.json:
                    print(json.dumps(result.model_dump()))
                else:
                    print(result.text)
                return 0
            case "cancel":
                done = c.cancel_run(args.run)
                err.print(f"run {args.run}: {'cancelled' if done.cancelled else 'not running'}")
                return 0
            case "rm":
                c.collect_run(args.run)
                return 0
        runs = c.runs(args.pid)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in runs]))
        return 0
    table = Table(box=None)
    for col, justify in (
        ("RUN", "right"),
        ("PID", "right"),
        ("STATE", "left"),
        ("CHUNKS", "right"),
        ("TOK OUT", "right"),
        ("AGE s", "right"),
        ("RESUMED", "right"),
        ("ERROR", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    now = time.time()
    for r in runs:
        table.add_row(
            str(r.run),
            str(r.pid),
            str(r.state),
            str(r.chunks),
            str(r.output_tokens),
            f"{now - r.created:.0f}",
            str(r.resumed),
            f"{r.error.code}: {r.error.message}"[:80] if r.error else "",
        )
    out.print(table)
    return 0
