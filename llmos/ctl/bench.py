"""``llmos bench syscalls``: syscall round trips and the kernel's cost on generation.

It starts a private kernel daemon (its own runtime dir, the default ipc transport, the
CPU driver with the packaged model), then measures:

* ``proc.getpid`` (a no-op) and ``ctx.get`` round trips, with 1 and 16 concurrent clients,
  each client a separate OS process with its own LLM process: p50/p99 latency (µs) and
  total syscalls/s;
* ``llm.generate`` output tokens/s through the kernel vs the same driver called directly
  in this process, same prompts, greedy, one after the other on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

err = Console(stderr=True)

PROMPTS = [
    "Write one sentence about the sea.",
    "List three fruits.",
    "What is an operating system?",
    "Give a short tip for writing clean code.",
]


def _client_worker(
    endpoint: str, pid: int, token: str, call: str, n: int, barrier: Any, q: Any
) -> None:
    from llmos.client import Client

    c = Client(endpoint, pid=pid, token=token)
    args: dict[str, Any] = {"last": 2} if call == "ctx.get" else {}
    for _ in range(min(200, n)):  # warm up the connection and both processes' caches
        c.call(call, args)
    barrier.wait()
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        s = time.perf_counter_ns()
        c.call(call, args)
        lat.append(time.perf_counter_ns() - s)
    q.put((t0, time.perf_counter(), lat))
    c.close()


def _echo_server(endpoint: str) -> None:
    """The floor: a bare ZeroMQ ROUTER that sends every frame straight back."""
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        sock.send_multipart(sock.recv_multipart())


def _echo_worker(endpoint: str, frame: bytes, n: int, barrier: Any, q: Any) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    for _ in range(min(200, n)):
        sock.send(frame)
        sock.recv()
    barrier.wait()
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        s = time.perf_counter_ns()
        sock.send(frame)
        sock.recv()
        lat.append(time.perf_counter_ns() - s)
    q.put((t0, time.perf_counter(), lat))


def run_echo_floor(run_dir: Path, clients: int, n: int) -> dict[str, Any]:
    """Round trips to a bare ZeroMQ echo (no kernel): what the transport alone costs here."""
    from syscalls import codec

    endpoint = f"ipc://{run_dir / 'echo.sock'}"
    frame = codec.encode_request(1, "proc.getpid", {}, 2, "x" * 32)
    ctx = mp.get_context("spawn")
    server = ctx.Process(target=_echo_server, args=(endpoint,), daemon=True)
    server.start()
    try:
        return _measure(ctx, _echo_worker, [(endpoint, frame, n)] * clients, "zmq echo (no kernel)")
    finally:
        server.kill()
        server.join()


def _measure(ctx: Any, target: Any, argss: list[tuple[Any, ...]], label: str) -> dict[str, Any]:
    barrier, q = ctx.Barrier(len(argss)), ctx.Queue()
    workers = [ctx.Process(target=target, args=(*a, barrier, q)) for a in argss]
    for w in workers:
        w.start()
    results = [q.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    lat = sorted(x for _, _, lats in results for x in lats)
    wall = max(e for _, e, _ in results) - min(s for s, _, _ in results)
    return {
        "syscall": label,
        "clients": len(argss),
        "calls": len(lat),
        "p50_us": round(_pct(lat, 0.50), 1),
        "p99_us": round(_pct(lat, 0.99), 1),
        "mean_us": round(statistics.fmean(lat) / 1000, 1),
        "per_s": round(len(lat) / wall),
    }


def _pct(sorted_ns: list[int], p: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(p * len(sorted_ns)))] / 1000


def run_round_trips(endpoint: str, admin: Any, call: str, clients: int, n: int) -> dict[str, Any]:
    """``clients`` OS processes each making ``n`` calls of ``call`` back to back."""
    procs = [admin.spawn(f"bench{i}", system="You are a benchmark.") for i in range(clients)]
    for p in procs:
        p.append([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    ctx = mp.get_context("spawn")
    try:
        return _measure(
            ctx, _client_worker, [(endpoint, p.pid, p.token, call, n) for p in procs], call
        )
    finally:
        for p in procs:
            admin.kill(p.pid, "KILL")
            admin.wait(p.pid)


def gen_through_kernel(admin: Any, max_tokens: int) -> dict[str, Any]:
    p = admin.spawn("bench-gen")
    p.generate(prompt="Hello", max_tokens=4, temperature=0.0)  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for prompt in PROMPTS:
        tokens += p.generate(
            prompt=prompt, max_tokens=max_tokens, temperature=0.0
        ).usage.output_tokens
    wall = time.perf_counter() - t0
    admin.kill(p.pid, "KILL")
    admin.wait(p.pid)
    return {
        "path": "kernel (SDK -> ZeroMQ -> kernel -> driver)",
        "output_tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
    }


async def _gen_direct(max_tokens: int, slots: int) -> dict[str, Any]:
    from drivers import make_driver
    from drivers.base import GenerationRequest, SamplingOptions

    driver = make_driver("cpu", None, slots=slots)
    await driver.load()

    async def one(rid: str, prompt: str, n: int) -> int:
        last = 0
        async for d in driver.generate(
            GenerationRequest(rid, prompt, SamplingOptions(temperature=0.0, max_tokens=n))
        ):
            last = d.output_tokens
        return last

    await one("warm", "Hello", 4)
    tokens, t0 = 0, time.perf_counter()
    for i, prompt in enumerate(PROMPTS):
        tokens += await one(f"r{i}", prompt, max_tokens)
    wall = time.perf_counter() - t0
    await driver.shutdown()
    return {
        "path": "driver called directly, same process",
        "output_tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
    }


def bench_syscalls(args: argparse.Namespace) -> int:
    """Entry point of ``llmos bench syscalls``."""
    from llmos.ctl.private import PrivateKernel

    client_counts = [int(x) for x in str(args.clients).split(",") if x.strip()]
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count()},
        "round_trips": [],
        "generation": [],
    }
    with tempfile.TemporaryDirectory(prefix="llmos-bench-") as tmp:
        kernel = PrivateKernel(Path(tmp), "--slots", "1")
        with err.status("starting a private kernel (CPU driver, packaged model)…"):
            kernel.start()
        try:
            admin = kernel.admin()
            for n_clients in client_counts:
                with err.status(f"ZeroMQ echo floor with {n_clients} client(s)…"):
                    report["round_trips"].append(run_echo_floor(Path(tmp), n_clients, args.calls))
            for call in ("proc.getpid", "ctx.get"):
                for n_clients in client_counts:
                    with err.status(f"{call} with {n_clients} client(s)…"):
                        report["round_trips"].append(
                            run_round_trips(kernel.endpoint, admin, call, n_clients, args.calls)
                        )
            if args.gen_tokens > 0:
                with err.status("llm.generate through the kernel…"):
                    report["generation"].append(gen_through_kernel(admin, args.gen_tokens))
            admin.close()
        finally:
            kernel.stop()
    if args.gen_tokens > 0:
        with err.status("llm.generate on the driver directly…"):
            report["generation"].append(asyncio.run(_gen_direct(args.gen_tokens, 1)))
        k, d = report["generation"]
        report["kernel_generation_overhead_pct"] = round(
            100 * (1 - k["tokens_per_s"] / d["tokens_per_s"]), 2
        )
    _print(report, args.json)
    return 0


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    t = Table(title="syscall round trips (ipc, each client a separate process)")
    for col in ("syscall", "clients", "calls", "p50 µs", "p99 µs", "syscalls/s"):
        t.add_column(col, justify="right")
    for r in report["round_trips"]:
        t.add_row(
            r["syscall"],
            str(r["clients"]),
            str(r["calls"]),
            f"{r['p50_us']:.0f}",
            f"{r['p99_us']:.0f}",
            f"{r['per_s']:,}",
        )
    Console().print(t)
    if report["generation"]:
        g = Table(title="llm.generate, greedy, same prompts")
        for col in ("path", "output tokens", "seconds", "tokens/s"):
            g.add_column(col)
        for r in report["generation"]:
            g.add_row(
                r["path"],
                str(r["output_tokens"]),
                f"{r['seconds']:.2f}",
                f"{r['tokens_per_s']:.2f}",
            )
        Console().print(g)
        Console().print(
            "kernel overhead on generation: "
            f"{report['kernel_generation_overhead_pct']:+.2f}% tokens/s"
        )
