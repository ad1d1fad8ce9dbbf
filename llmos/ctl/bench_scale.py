"""``llmos bench scale``: one kernel holding a very large process table.

On a private kernel with the **simulated** driver (no model: the table is what is
measured), in four phases:

1. **spawn** ``--idle`` idle processes from ``--clients`` client OS processes, each with
   ``--concurrency`` spawns in flight: spawns/s, the kernel's CPU per spawn, and its
   RSS per process (the growth over the phase);
2. **active**: ``--active`` more processes, each looping short generations (a raw
   prompt, ``--tokens`` tokens) so they are on a slot or queued for one the whole time;
3. **queries** while they run: latency (p50/p99) of ``sys.stat`` without rows (the
   counts ``llmos top`` heads its view with), of ``sys.stat`` with ``--rows`` rows (what
   top polls), of one ``proc.ps`` page, and of a filtered ``proc.ps`` (one state);
4. **recovery**: the kernel is stopped and started again on the same state; the time
   until it answers with every process back, and its RSS after.

Goals (docs/BENCHMARKS.md): 100k idle processes in ≤ 2 GiB RSS, ≥ 2,000 spawns/s,
``sys.stat`` ≤ 50 ms at 10k active.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from llmos.client import AsyncClient
from llmos.ctl.private import PrivateKernel

err = Console(stderr=True)


def add_parser(sub: Any) -> None:
    """``llmos bench scale``'s options."""
    p = sub.add_parser("scale", help="a very large process table: spawn rate, RSS, ps/stat latency")
    p.add_argument("--idle", type=int, default=100_000, help="idle processes (default 100000)")
    p.add_argument(
        "--active", type=int, default=10_000, help="processes generating meanwhile (default 10000)"
    )
    p.add_argument("--clients", type=int, default=2, help="client OS processes (default 2)")
    p.add_argument(
        "--concurrency", type=int, default=32, help="spawns in flight per client (default 32)"
    )
    p.add_argument("--slots", type=int, default=64, help="simulated model slots (default 64)")
    p.add_argument("--tokens", type=int, default=4, help="tokens per generation (default 4)")
    p.add_argument("--samples", type=int, default=30, help="samples per query (default 30)")
    p.add_argument("--rows", type=int, default=1000, help="rows of sys.stat (default 1000)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def rss_kib(pid: int) -> int:
    """Resident memory of OS process ``pid`` in KiB (from /proc)."""
    from llmos.ctl.bench_sched import rss_kib as read

    return read(pid)


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) OS process ``pid`` has used."""
    from llmos.ctl.bench_sched import cpu_seconds as read

    return read(pid)


# -- the client processes -----------------------------------------------------------------
def _client(
    endpoint: str, token: str, phase: str, n: int, concurrency: int, tokens: int, q: Any, stop: Any
) -> None:
    """One client OS process: spawn ``n`` idle processes, or ``n`` active ones that loop
    generations until ``stop`` is set; reports counts on ``q``."""

    async def run() -> None:
        c = AsyncClient(endpoint, pid=0, token=token)
        todo = list(range(n))
        made = 0
        gens = 0

        async def spawner() -> None:
            nonlocal made
            while todo:
                todo.pop()
                await c.spawn("idle" if phase == "idle" else "busy")
                made += 1

        async def busy() -> None:
            nonlocal gens
            p = await c.spawn("busy")
            q.put(("up", 1))
            while not stop.is_set():
                await p.generate(prompt=f"<sim:reply={tokens}> go", max_tokens=tokens)
                gens += 1

        t0 = time.perf_counter()
        if phase == "idle":
            await asyncio.gather(*(spawner() for _ in range(concurrency)))
            q.put(("spawned", made, time.perf_counter() - t0))
        else:
            tasks = [asyncio.create_task(busy()) for _ in range(n)]
            while not stop.is_set():
                await asyncio.sleep(0.2)
            await asyncio.gather(*tasks, return_exceptions=True)
            q.put(("generated", gens, time.perf_counter() - t0))
        await c.close()

    asyncio.run(run())


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _lat(fn: Any, samples: int) -> dict[str, float]:
    """p50/p99/max of ``fn()`` in ms."""
    got = []
    for _ in range(samples):
        t = time.perf_counter()
        fn()
        got.append((time.perf_counter() - t) * 1000)
    got.sort()
    return {
        "p50_ms": round(statistics.median(got), 2),
        "p99_ms": round(got[min(len(got) - 1, int(len(got) * 0.99))], 2),
        "max_ms": round(got[-1], 2),
    }


# -- the phases -----------------------------------------------------------------------------
def _spawn_idle(k: PrivateKernel, args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    kpid = k.proc.pid  # type: ignore[union-attr]
    q, stop = ctx.Queue(), ctx.Event()
    rss0, cpu0 = rss_kib(kpid), cpu_seconds(kpid)
    t0 = time.perf_counter()
    workers = [
        ctx.Process(
            target=_client,
            args=(k.endpoint, k.token, "idle", n, args.concurrency, args.tokens, q, stop),
        )
        for n in _split(args.idle, args.clients)
    ]
    for w in workers:
        w.start()
    with Progress(console=err, transient=True) as progress, k.admin() as admin:
        task = progress.add_task(f"spawning {args.idle:,} idle processes", total=args.idle)
        while any(w.is_alive() for w in workers):
            have = admin.stat(procs=False).procs_total
            progress.update(task, completed=have)
            time.sleep(0.5)
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    made = 0
    while not q.empty():
        kind, n, *_ = q.get()
        made += n if kind == "spawned" else 0
    rss1, cpu1 = rss_kib(kpid), cpu_seconds(kpid)
    return {
        "idle": made,
        "spawn_s": round(wall, 2),
        "spawns_per_s": round(made / wall, 1),
        "kernel_cpu_us_per_spawn": round((cpu1 - cpu0) / max(made, 1) * 1e6, 1),
        "kernel_rss_mib": round(rss1 / 1024, 1),
        "rss_kib_per_process": round((rss1 - rss0) / max(made, 1), 2),
        "rss_mib_per_100k": round((rss1 - rss0) / max(made, 1) * 100_000 / 1024, 1),
    }


def _active_queries(k: PrivateKernel, args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    q, stop = ctx.Queue(), ctx.Event()
    workers = [
        ctx.Process(
            target=_client,
            args=(k.endpoint, k.token, "active", n, args.concurrency, args.tokens, q, stop),
        )
        for n in _split(args.active, args.clients)
    ]
    for w in workers:
        w.start()
    out: dict[str, Any] = {}
    try:
        with k.admin() as admin:
            with Progress(console=err, transient=True) as progress:
                task = progress.add_task(
                    f"starting {args.active:,} active processes", total=args.active
                )
                up = 0
                while up < args.active and any(w.is_alive() for w in workers):
                    with contextlib.suppress(Exception):
                        while True:
                            kind, n = q.get(timeout=0.2)[:2]
                            up += n if kind == "up" else 0
                    progress.update(task, completed=up)
            time.sleep(1.0)  # every loop is generating or queued now
            snap = admin.stat(procs=False)
            out["states"] = snap.states
            out["active"] = snap.states["RUNNING"] + snap.states["READY"]
            with err.status("measuring ps and sys.stat while they run"):
                out["stat_counts"] = _lat(lambda: admin.stat(procs=False), args.samples)
                out["stat_rows"] = _lat(
                    lambda: admin.call("sys.stat", {"limit": args.rows}), args.samples
                )
                out["ps_page"] = _lat(lambda: admin.call("proc.ps", {"limit": 1000}), args.samples)
                out["ps_ready_page"] = _lat(
                    lambda: admin.call("proc.ps", {"state": "READY", "limit": 100}), args.samples
                )
                out["getpid_like"] = _lat(lambda: admin.call("sys.info", {}), args.samples)
            out["tokens_per_s"] = round(admin.stat(procs=False).tokens.output_tps, 1)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
            if w.is_alive():
                w.kill()
    return out


def _recover(k: PrivateKernel) -> dict[str, Any]:
    with err.status("restarting the kernel on the same state"):
        k.stop(timeout=300)
        t0 = time.perf_counter()
        k.start(timeout=900)
        took = time.perf_counter() - t0
        with k.admin() as admin:
            total = admin.stat(procs=False).procs_total
    return {
        "recovered": total,
        "restart_s": round(took, 2),
        "kernel_rss_mib_after": round(rss_kib(k.proc.pid) / 1024, 1),  # type: ignore[union-attr]
    }


def bench_scale(args: argparse.Namespace) -> int:
    """Run the four phases; print a table (or ``--json``)."""
    if min(args.idle, args.active, args.clients, args.concurrency, args.slots, args.samples) < 1:
        err.print(
            "llmos bench scale: --idle, --active, --clients, --concurrency, --slots and --samples must be ≥ 1"
        )
        return 2
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="llmos-bench-scale-") as tmp:
        opts = [
            "--driver",
            "sim",
            "--slots",
            str(args.slots),
            "--max-procs",
            str(args.idle + args.active + 1000),
            "--driver-option",
            "tokens_per_s=1000",
            "--driver-option",
            "prefill_tokens_per_s=100000",
        ]
        with err.status("starting a private kernel (simulated driver)"):
            k = PrivateKernel(Path(tmp), *opts).start()
        try:
            report: dict[str, Any] = {"bench": "scale", "options": opts, "cpus": os.cpu_count()}
            report["spawn"] = _spawn_idle(k, args, ctx)
            report["active"] = _active_queries(k, args, ctx)
            report["recovery"] = _recover(k)
        finally:
            k.stop(timeout=300)
    sp, ac = report["spawn"], report["active"]
    report["goals"] = {
        "rss_100k_le_2GiB": sp["rss_mib_per_100k"] <= 2048,
        "spawns_ge_2000_per_s": sp["spawns_per_s"] >= 2000,
        "stat_le_50ms": ac["stat_rows"]["p50_ms"] <= 50,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    t = Table(title=f"llmos bench scale: {sp['idle']:,} idle + {ac['active']:,} active processes")
    t.add_column("measure")
    t.add_column("value", justify="right")
    rows = [
        ("spawns/s", f"{sp['spawns_per_s']:,.0f}"),
        ("kernel CPU per spawn", f"{sp['kernel_cpu_us_per_spawn']:,.0f} µs"),
        ("RSS per process", f"{sp['rss_kib_per_process']:.2f} KiB"),
        ("RSS for 100k processes", f"{sp['rss_mib_per_100k']:,.0f} MiB"),
        ("kernel RSS", f"{sp['kernel_rss_mib']:,.0f} MiB"),
        ("sys.stat (counts) p50/p99", _pp(ac["stat_counts"])),
        (f"sys.stat ({args.rows} rows) p50/p99", _pp(ac["stat_rows"])),
        ("proc.ps page (1000) p50/p99", _pp(ac["ps_page"])),
        ("proc.ps state=READY (100) p50/p99", _pp(ac["ps_ready_page"])),
        ("sys.info p50/p99", _pp(ac["getpid_like"])),
        ("tokens/s while measuring", f"{ac['tokens_per_s']:,.0f}"),
        ("restart with the table", f"{report['recovery']['restart_s']:.1f} s"),
        ("RSS after recovery", f"{report['recovery']['kernel_rss_mib_after']:,.0f} MiB"),
    ]
    for name, value in rows:
        t.add_row(name, value)
    Console().print(t)
    Console().print(f"goals: {report['goals']}")
    return 0


def _pp(lat: dict[str, float]) -> str:
    return f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f} ms"
