"""``llmos bench runs``: what journaling a detached run's tokens costs.

Two private kernels on the same driver: one journals runs (the default), one runs with
``--no-run-journal``. The same workload — N processes, each making ``--tokens`` greedy
tokens, all at once — runs three ways in alternating order per round:

* **plain**: ``llm.generate`` as today (not detached), on the kernel without the journal;
* **detached**: ``detach=True`` then ``llm.wait``, on the kernel without the journal;
* **journaled**: the same on the kernel that journals (the SQLite store thread writes each
  run's chunks and token ids in batches).

It reports output tokens/s and the kernel's CPU per output token (its process's user +
system time from ``/proc``), and the journal's cost as journaled vs detached. On the sim
driver (default: 16 slots at 2,000 tokens/s each) the kernel is the bottleneck, so a cost
per token shows; ``--driver cpu`` measures it behind the packaged model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("plain", "detached", "journaled")


def add_parser(bsub: Any) -> None:
    """``llmos bench runs`` on the ``llmos bench`` subparsers."""
    br = bsub.add_parser("runs", help="detached runs with the token journal on vs off")
    br.add_argument("--clients", default="1,16", help="comma-separated process counts")
    br.add_argument("--tokens", type=int, default=512, help="output tokens per run")
    br.add_argument("--rounds", type=int, default=3, help="rounds, order alternating")
    br.add_argument("--driver", choices=["sim", "cpu"], default="sim")
    br.add_argument("--slots", type=int, default=16, help="slots of each kernel")
    br.add_argument(
        "--tokens-per-s", type=float, default=2000.0, help="the sim driver's rate per slot"
    )
    br.add_argument("--json", action="store_true", help="print JSON for scripts")


async def _workload(endpoint: str, token: str, mode: str, n: int, tokens: int) -> int:
    """N processes, each one generation of ``tokens``; the output tokens made."""
    from llmos.client import AsyncClient

    async with AsyncClient(endpoint, pid=0, token=token) as admin:
        procs = [await admin.spawn(f"bench-{i}") for i in range(n)]
        prompt = f"<sim:reply={tokens}> go"
        opts: dict[str, Any] = {"max_tokens": tokens, "temperature": 0.0}
        try:
            if mode == "plain":
                results = await asyncio.gather(*(p.generate(prompt=prompt, **opts) for p in procs))
            else:
                runs = await asyncio.gather(
                    *(p.generate(prompt=prompt, detach=True, **opts) for p in procs)
                )
                results = await asyncio.gather(
                    *(p.wait_run(r, timeout=600) for p, r in zip(procs, runs, strict=True))
                )
        finally:
            for p in procs:
                await p.reap()
        return sum(r.usage.output_tokens for r in results)


def _measure(kernel: Any, mode: str, n: int, tokens: int) -> dict[str, Any]:
    import psutil

    daemon = psutil.Process(kernel.proc.pid)
    cpu0, t0 = sum(daemon.cpu_times()[:2]), time.perf_counter()
    made = asyncio.run(_workload(kernel.endpoint, kernel.token, mode, n, tokens))
    wall, cpu = time.perf_counter() - t0, sum(daemon.cpu_times()[:2]) - cpu0
    return {"tok_s": made / wall, "cpu_us_per_tok": cpu / max(made, 1) * 1e6, "tokens": made}


def bench_runs(args: argparse.Namespace) -> int:
    """Run the comparison; print a table (or JSON)."""
    from rich.console import Console
    from rich.table import Table

    from llmos.ctl.private import PrivateKernel

    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    common = ["--driver", args.driver, "--slots", str(args.slots)]
    if args.driver == "sim":
        common += ["--driver-option", f"tokens_per_s={args.tokens_per_s}"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="llmos-bench-runs-") as tmp:
        off = PrivateKernel(Path(tmp) / "off", *common, "--no-run-journal").start()
        try:
            on = PrivateKernel(Path(tmp) / "on", *common).start()
            try:
                kernels = {"plain": off, "detached": off, "journaled": on}
                for n in clients:
                    got: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
                    _measure(on, "journaled", n, min(args.tokens, 32))  # warm both up
                    _measure(off, "detached", n, min(args.tokens, 32))
                    for r in range(args.rounds):
                        order = MODES if r % 2 == 0 else tuple(reversed(MODES))
                        for mode in order:
                            got[mode].append(_measure(kernels[mode], mode, n, args.tokens))
                    for mode in MODES:
                        rows.append(
                            {
                                "mode": mode,
                                "clients": n,
                                "tok_s": statistics.median(x["tok_s"] for x in got[mode]),
                                "cpu_us_per_tok": statistics.median(
                                    x["cpu_us_per_tok"] for x in got[mode]
                                ),
                            }
                        )
            finally:
                on.stop()
        finally:
            off.stop()
    for n in clients:
        by = {r["mode"]: r for r in rows if r["clients"] == n}
        base, jr = by["detached"], by["journaled"]
        jr["journal_tok_s_pct"] = (jr["tok_s"] / base["tok_s"] - 1) * 100
        jr["journal_cpu_us_per_tok"] = jr["cpu_us_per_tok"] - base["cpu_us_per_tok"]
    if args.json:
        print(json.dumps({"driver": args.driver, "tokens": args.tokens, "rows": rows}))
        return 0
    table = Table(title=f"detached runs, {args.tokens} tokens each, {args.driver} driver")
    for col in (
        "mode",
        "clients",
        "tok/s",
        "kernel CPU µs/tok",
        "journal Δ tok/s",
        "journal Δ µs/tok",
    ):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        table.add_row(
            r["mode"],
            str(r["clients"]),
            f"{r['tok_s']:.0f}",
            f"{r['cpu_us_per_tok']:.1f}",
            f"{r['journal_tok_s_pct']:+.1f} %" if "journal_tok_s_pct" in r else "",
            f"{r['journal_cpu_us_per_tok']:+.1f}" if "journal_cpu_us_per_tok" in r else "",
        )
    Console().print(table)
    return 0
