"""``llmos bench driver``: a model driver's tokens/s and time to first token, through the
kernel and called directly, side by side in one run; and its prefix-cache hit rate.

Two paths run the same workload (same prompts, greedy, same ``max_tokens``):

* **kernel** — a private kernel daemon serving the driver; each concurrent client is an
  LLM process streaming ``llm.generate`` over ZeroMQ (SDK → kernel → scheduler → driver);
* **direct** — the same driver built and loaded in this process and called with
  ``driver.generate`` (no kernel, no sockets).

For each concurrency level ``c`` (default 1, 4 and 16), ``c`` clients each make
``--requests`` generations one after another: total output tokens/s over the wall time
and the p50/p95 time to first token per request. The kernel runs first, then stops, so
the two never share the machine (a vLLM engine in each would not fit a small GPU).

Then a multi-turn workload on each path (each client a conversation of ``--turns``
turns, every turn appending to the same context) measures the prefix-cache hit rate:
prompt tokens the driver reused from its cache / prompt tokens read. The kernel keeps a
process's prompt append-only, so turn ``n`` should reuse turn ``n-1``'s whole prompt
where the driver caches prefixes (vLLM; the CPU driver keeps its slot's KV only while
the process holds the slot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

err = Console(stderr=True)

#: The workload's prompts; request ``j`` of client ``i`` uses ``PROMPTS[(i + j) % n]``.
PROMPTS = [
    "Write one sentence about the sea.",
    "List three fruits and their colours.",
    "What is an operating system? Answer briefly.",
    "Give a short tip for writing clean code.",
    "Describe a cat in two sentences.",
    "Name three planets and one fact about each.",
    "Explain what a compiler does.",
    "Suggest a name for a small bakery.",
]
#: Follow-up questions of the multi-turn workload.
FOLLOW_UPS = ["Tell me more.", "Can you give an example?", "Summarise that in one line.", "Why is that?"]


@dataclass
class Run:
    """One path at one concurrency: what it produced and how fast."""

    path: str
    concurrency: int
    requests: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The figures as a JSON-able dict."""
        ttft = sorted(self.ttft_s)
        return {
            "path": self.path, "concurrency": self.concurrency, "requests": self.requests,
            "output_tokens": self.output_tokens, "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.output_tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "ttft_p50_ms": round(1000 * _pct(ttft, 0.50), 1), "ttft_p95_ms": round(1000 * _pct(ttft, 0.95), 1),
        }


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


# -- the kernel path ------------------------------------------------------------------


async def _kernel_client(client: Any, proc: Any, prompts: list[str], max_tokens: int, run: Run) -> None:
    for prompt in prompts:
        args = {"prompt": prompt, "stream": True, "max_tokens": max_tokens, "temperature": 0.0}
        t0 = time.perf_counter()
        first: float | None = None
        async for frame in client.stream("llm.generate", args, pid=proc.pid, token=proc.token):
            if first is None:
                first = time.perf_counter() - t0
            if "finish_reason" in frame:
                run.output_tokens += frame["usage"]["output_tokens"]
        run.ttft_s.append(first or 0.0)
        run.requests += 1


async def _kernel_runs(endpoint: str, token: str, levels: list[int], requests: int, max_tokens: int,
                       turns: int) -> tuple[list[Run], dict[str, Any]]:
    from llmos.client import AsyncClient

    runs: list[Run] = []
    async with AsyncClient(endpoint, pid=0, token=token) as client:
        warm = await client.spawn("bench-warm")
        await _kernel_client(client, warm, ["Hello"], 4, Run("warm", 1))
        await client.kill(warm.pid, "KILL")
        for c in levels:
            procs = [await client.spawn(f"bench{i}") for i in range(c)]
            run = Run("kernel", c)
            t0 = time.perf_counter()
            await asyncio.gather(*(
                _kernel_client(client, p, _prompts(i, requests), max_tokens, run) for i, p in enumerate(procs)))
            run.wall_s = time.perf_counter() - t0
            runs.append(run)
            for p in procs:
                await client.kill(p.pid, "KILL")
                await client.wait(p.pid)
        # Multi-turn: each process's context grows turn by turn (append-only prompts).
        convs = [await client.spawn(f"chat{i}") for i in range(min(4, max(levels)))]
        read = cached = 0

        async def converse(i: int, p: Any) -> tuple[int, int]:
            r = c_ = 0
            for t in range(turns):
                res = await p.generate([{"role": "user", "content": _turn(i, t)}], max_tokens=max_tokens,
                                       temperature=0.0)
                if t:  # the first turn has nothing to reuse
                    r, c_ = r + res.usage.prompt_tokens, c_ + res.usage.cached_tokens
            return r, c_

        for r, c_ in await asyncio.gather(*(converse(i, p) for i, p in enumerate(convs))):
            read, cached = read + r, cached + c_
        for p in convs:
            await client.kill(p.pid, "KILL")
            await client.wait(p.pid)
    return runs, _hit("kernel", len(convs), turns, read, cached)


def _prompts(i: int, requests: int) -> list[str]:
    return [PROMPTS[(i + j) % len(PROMPTS)] for j in range(requests)]


def _turn(i: int, t: int) -> str:
    return PROMPTS[i % len(PROMPTS)] if t == 0 else FOLLOW_UPS[(i + t) % len(FOLLOW_UPS)]


def _hit(path: str, conversations: int, turns: int, read: int, cached: int) -> dict[str, Any]:
    return {"path": path, "conversations": conversations, "turns": turns, "prompt_tokens": read,
            "cached_tokens": cached, "hit_rate": round(cached / read, 3) if read else 0.0}


# -- the direct path ------------------------------------------------------------------


async def _direct_runs(driver: Any, levels: list[int], requests: int, max_tokens: int,
                       turns: int) -> tuple[list[Run], dict[str, Any]]:
    from drivers.base import GenerationRequest, SamplingOptions

    ids = iter(range(1, 1 << 30))

    async def one(prompt: Any, run: Run) -> tuple[str, int, int]:
        t0 = time.perf_counter()
        first: float | None = None
        text, last = [], None
        request = GenerationRequest(f"d{next(ids)}", prompt, SamplingOptions(temperature=0.0, max_tokens=max_tokens))
        async for delta in driver.generate(request):
            if first is None:
                first = time.perf_counter() - t0
            text.append(delta.text)
            last = delta
        run.ttft_s.append(first or 0.0)
        run.requests += 1
        run.output_tokens += last.output_tokens if last else 0
        return "".join(text), last.prompt_tokens if last else 0, last.cached_tokens if last else 0

    await one("Hello", Run("warm", 1))
    runs = []
    for c in levels:
        run = Run("direct", c)

        async def client(i: int, run: Run = run) -> None:
            for prompt in _prompts(i, requests):
                await one(prompt, run)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(c)))
        run.wall_s = time.perf_counter() - t0
        runs.append(run)
    n_conv = min(4, max(levels))

    async def converse(i: int) -> tuple[int, int]:
        messages: list[dict[str, str]] = []
        r = c_ = 0
        for t in range(turns):
            messages.append({"role": "user", "content": _turn(i, t)})
            text, prompt_tokens, cached = await one(list(messages), Run("chat", 1))
            messages.append({"role": "assistant", "content": text})
            if t:
                r, c_ = r + prompt_tokens, c_ + cached
        return r, c_

    read = cached = 0
    for r, c_ in await asyncio.gather(*(converse(i) for i in range(n_conv))):
        read, cached = read + r, cached + c_
    return runs, _hit("direct", n_conv, turns, read, cached)


async def _direct(args: argparse.Namespace, options: dict[str, Any], levels: list[int]) -> tuple[list[Run], dict]:
    from drivers import make_driver

    driver = make_driver(args.driver, args.model, **options)
    await driver.load()
    try:
        return await _direct_runs(driver, levels, args.requests, args.tokens, args.turns)
    finally:
        await driver.shutdown()


# -- entry point ----------------------------------------------------------------------


def bench_driver(args: argparse.Namespace) -> int:
    """Entry point of ``llmos bench driver``."""
    from kernel.daemon import driver_options
    from llmos.private import PrivateKernel

    # vLLM's engine, started in this process for the direct path, may point fd 1 elsewhere:
    # keep our own copy of standard output for the report.
    stdout = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    levels = sorted({int(x) for x in str(args.concurrency).split(",") if x.strip()})
    if not levels or levels[0] < 1:
        err.print("[red]--concurrency needs positive integers, e.g. 1,4,16[/]")
        return 2
    slots = args.slots or max(levels)
    options: dict[str, Any] = {"slots": slots} | ({"dtype": args.dtype} if args.dtype else {})
    options |= driver_options(args.driver_option)
    argv = ["--driver", args.driver, "--slots", str(slots)]
    argv += ["--model", args.model] if args.model else []
    argv += ["--dtype", args.dtype] if args.dtype else []
    for option in args.driver_option or []:
        argv += ["--driver-option", option]
    report: dict[str, Any] = {"bench": "driver", "driver": args.driver, "model": args.model or "packaged default",
                              "slots": slots, "max_tokens": args.tokens, "requests_per_client": args.requests,
                              "machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="llmos-bench-driver-") as tmp:
        kernel = PrivateKernel(Path(tmp), *argv)
        with err.status(f"starting a private kernel with the {args.driver} driver…"):
            kernel.start()
        try:
            with err.status(f"through the kernel at concurrency {', '.join(map(str, levels))}…"):
                k_runs, k_hit = asyncio.run(
                    _kernel_runs(kernel.endpoint, kernel.token, levels, args.requests, args.tokens, args.turns))
        finally:
            helpers = _children(kernel.proc.pid if kernel.proc else None)
            kernel.stop()
            # An engine process of the kernel's (vLLM's) still winding down would slow the
            # direct half: wait until every process the kernel started is gone.
            with err.status("waiting for the kernel's engine processes to exit…"):
                import psutil

                psutil.wait_procs(helpers, timeout=120)
    with err.status(f"the {args.driver} driver called directly…"):
        d_runs, d_hit = asyncio.run(_direct(args, options, levels))
    report["runs"] = [r.row() for pair in zip(k_runs, d_runs, strict=True) for r in pair]
    report["overhead_pct"] = {
        str(k.concurrency): round(100 * (1 - k.row()["tokens_per_s"] / d.row()["tokens_per_s"]), 2)
        for k, d in zip(k_runs, d_runs, strict=True) if d.row()["tokens_per_s"]}
    report["prefix_cache"] = [k_hit, d_hit]
    _print(report, args.json, stdout)
    stdout.close()
    return 0


def _children(pid: int | None) -> list[Any]:
    """The processes ``pid`` started (engine cores, workers), to wait for after it stops."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True) if pid else []
    except psutil.NoSuchProcess:
        return []


def _print(report: dict[str, Any], as_json: bool, stdout: Any) -> None:
    if as_json:
        print(json.dumps(report, indent=2), file=stdout, flush=True)
        return
    out = Console(file=stdout)
    t = Table(title=f"{report['driver']} driver: greedy, {report['max_tokens']} tokens max, "
                    f"{report['requests_per_client']} requests per client, {report['slots']} slots")
    for col in ("path", "clients", "requests", "output tokens", "seconds", "tokens/s", "TTFT p50 ms",
                "TTFT p95 ms"):
        t.add_column(col, justify="left" if col == "path" else "right")
    for r in report["runs"]:
        t.add_row(r["path"], str(r["concurrency"]), str(r["requests"]), str(r["output_tokens"]),
                  f"{r['wall_s']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['ttft_p50_ms']:.0f}",
                  f"{r['ttft_p95_ms']:.0f}")
    out.print(t)
    for c, pct in report["overhead_pct"].items():
        out.print(f"kernel overhead at {c} client(s): {pct:+.2f}% tokens/s")
    h = Table(title="prefix cache on a multi-turn workload (turns after the first)")
    for col in ("path", "conversations", "turns", "prompt tokens", "cached", "hit rate"):
        h.add_column(col, justify="left" if col == "path" else "right")
    for r in report["prefix_cache"]:
        h.add_row(r["path"], str(r["conversations"]), str(r["turns"]), str(r["prompt_tokens"]),
                  str(r["cached_tokens"]), f"{r['hit_rate']:.1%}")
    out.print(h)
