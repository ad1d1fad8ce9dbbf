"""``llmos bench driver``: a model driver's tokens/s and time to first token, through the
kernel and called directly, side by side in one run; and its prefix-cache hit rate.

Two paths run the same workload (same prompts, greedy, same ``max_tokens``):

* **kernel** — a private kernel daemon serving the driver; each concurrent client is an
  LLM process streaming ``llm.generate`` over ZeroMQ (SDK → kernel → scheduler → driver);
* **direct** — the same driver built and loaded in this process and called with
  ``driver.generate`` (no kernel, no sockets).

For each concurrency level ``c`` (default 1, 4 and 16), ``c`` clients each make
``--requests`` generations one after another: total output tokens/s over the wall time,
the p50/p95 time to first token per request, and the CPU time both paths burned per
output token: all of it (the kernel path counts the kernel's processes and this
process's clients, the direct path this process and the driver's own engine
processes), and the *loop* part: the event-loop (main) threads and ZeroMQ I/O threads
of this process and the kernel, i.e. everything but the model's own threads. On a
machine whose cores the model keeps busy (torch's threads spin between matmuls), all
CPU follows the wall time; the loop part is what the kernel path really adds.

Single runs on a shared machine vary by more than the kernel costs, so by default the
two paths are *interleaved*: both stay loaded, and each of ``--rounds`` rounds runs every
level on both paths, the order alternating between rounds (kernel first, then direct
first). The report gives every round and, per level, the median tokens/s of each path
and the median of the rounds' overheads. ``--sequential`` instead runs every kernel
round, stops the kernel (and waits for its engine processes), then loads the driver
here: for a GPU that cannot hold two engines.

Then a multi-turn workload on each path (each client a conversation of ``--turns``
turns, every turn appending to the same context) measures the prefix-cache hit rate:
prompt tokens the driver reused from its cache / prompt tokens read. The kernel keeps a
process's prompt append-only, so turn ``n`` should reuse turn ``n-1``'s whole prompt
where the driver caches prefixes (vLLM; the CPU driver keeps its slot's KV only while
the process holds the slot).

``--versus KEY=VALUE`` (repeatable) compares two *kernels* instead: the second one's
driver options are the first's changed by these (``KEY=`` drops one). Both stay loaded
and run interleaved like the two paths above (``kernel`` and ``versus``): e.g. the
openai driver through a router in front of two replicas against the driver's own
placement over the same two replicas, tokens/s, TTFT and prefix-cache hit rate side by
side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
FOLLOW_UPS = [
    "Tell me more.",
    "Can you give an example?",
    "Summarise that in one line.",
    "Why is that?",
]


@dataclass
class Run:
    """One path at one concurrency in one round: what it produced, how fast, at what CPU."""

    path: str
    concurrency: int
    round: int = 0
    first: bool = True  # this path ran before the other one in its round
    requests: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    loop_cpu_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    def row(self) -> dict[str, Any]:
        """The figures as a JSON-able dict."""
        ttft = sorted(self.ttft_s)
        return {
            "path": self.path,
            "concurrency": self.concurrency,
            "round": self.round,
            "ran_first": self.first,
            "requests": self.requests,
            "output_tokens": self.output_tokens,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "ttft_p50_ms": round(1000 * _pct(ttft, 0.50), 1),
            "ttft_p95_ms": round(1000 * _pct(ttft, 0.95), 1),
            "cpu_s": round(self.cpu_s, 3),
            "cpu_ms_per_token": round(1000 * self.cpu_s / self.output_tokens, 3)
            if self.output_tokens
            else 0.0,
            "loop_cpu_s": round(self.loop_cpu_s, 3),
            "loop_cpu_us_per_token": round(1e6 * self.loop_cpu_s / self.output_tokens, 1)
            if self.output_tokens
            else 0.0,
        }


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


class BenchPath(Protocol):
    """What the bench needs of a path (kernel or direct)."""

    name: str

    async def run(self, run: Run, requests: int, max_tokens: int) -> None: ...
    async def converse(
        self, conversations: int, turns: int, max_tokens: int
    ) -> tuple[int, int]: ...
    def cpu(self) -> tuple[float, float]: ...


# -- CPU accounting ---------------------------------------------------------------------


class CpuMeter:
    """CPU seconds (user + system, all threads) of this process and of the process trees
    it started, split into the kernel's tree and everything else (a direct driver's
    engine processes)."""

    def __init__(self, kernel_pid: int | None) -> None:
        import psutil

        self._me = psutil.Process()
        self._kernel_pid = kernel_pid

    @staticmethod
    def _seconds(procs: list[Any]) -> float:
        import psutil

        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def mine(self) -> float:
        """This process's CPU seconds."""
        return self._seconds([self._me])

    def loop(self, kernel: bool) -> float:
        """CPU seconds of the event-loop and ZeroMQ I/O threads of this process, and of
        the kernel's with ``kernel``."""
        pids = [self._me.pid] + ([self._kernel_pid] if kernel and self._kernel_pid else [])
        return sum(_loop_threads_cpu(pid) for pid in pids)

    def kernel(self) -> float:
        """The kernel daemon's CPU seconds, with its engine processes."""
        return self._seconds(self._tree(self._kernel_pid)) if self._kernel_pid else 0.0

    def others(self) -> float:
        """CPU seconds of this process's children outside the kernel's tree."""
        import psutil

        kernel = {p.pid for p in self._tree(self._kernel_pid)} if self._kernel_pid else set()
        try:
            kids = self._me.children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        return self._seconds([p for p in kids if p.pid not in kernel])

    @staticmethod
    def _tree(pid: int | None) -> list[Any]:
        import psutil

        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _loop_threads_cpu(pid: int) -> float:
    """CPU seconds of ``pid``'s main thread (where its asyncio loop runs) and its ZeroMQ
    I/O threads (``ZMQbg/*``), from /proc; 0 where /proc is missing."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            comm = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        if task.name == str(pid) or comm.startswith("ZMQbg"):
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLOCK_TICKS


# -- the kernel path ------------------------------------------------------------------


class KernelPath:
    """Clients are LLM processes of a private kernel, streaming over ZeroMQ."""

    name = "kernel"

    def __init__(self, client: Any, meter: CpuMeter) -> None:
        self.client = client
        self.meter = meter
        #: Put before each conversation's first turn: with ``--versus`` both kernels may
        #: share the servers, and distinct first blocks keep one from reusing the other's
        #: cached prefixes.
        self.salt = ""

    def cpu(self) -> tuple[float, float]:
        return self.meter.mine() + self.meter.kernel(), self.meter.loop(kernel=True)

    async def _client(self, proc: Any, prompts: list[str], max_tokens: int, run: Run) -> None:
        for prompt in prompts:
            args = {"prompt": prompt, "stream": True, "max_tokens": max_tokens, "temperature": 0.0}
            t0 = time.perf_counter()
            first: float | None = None
            async for frame in self.client.stream(
                "llm.generate", args, pid=proc.pid, token=proc.token
            ):
                if first is None:
                    first = time.perf_counter() - t0
                if "finish_reason" in frame:
                    run.output_tokens += frame["usage"]["output_tokens"]
            run.ttft_s.append(first or 0.0)
            run.requests += 1

    async def warm(self) -> None:
        proc = await self.client.spawn("bench-warm")
        await self._client(proc, ["Hello"], 4, Run("warm", 1))
        await self.client.kill(proc.pid, "KILL")
        await self.client.wait(proc.pid)

    async def run(self, run: Run, requests: int, max_tokens: int) -> None:
        procs = [await self.client.spawn(f"bench{i}") for i in range(run.concurrency)]
        try:
            await _timed(
                run,
                self.cpu,
                [
                    self._client(p, _prompts(i, requests), max_tokens, run)
                    for i, p in enumerate(procs)
                ],
            )
        finally:
            await self._reap(procs)

    async def converse(self, conversations: int, turns: int, max_tokens: int) -> tuple[int, int]:
        # Each process's context grows turn by turn (append-only prompts).
        procs = [await self.client.spawn(f"chat{i}") for i in range(conversations)]

        async def one(i: int, p: Any) -> tuple[int, int]:
            r = c_ = 0
            for t in range(turns):
                res = await p.generate(
                    [{"role": "user", "content": (self.salt if t == 0 else "") + _turn(i, t)}],
                    max_tokens=max_tokens,
                    temperature=0.0,
                )
                if t:  # the first turn has nothing to reuse
                    r, c_ = r + res.usage.prompt_tokens, c_ + res.usage.cached_tokens
            return r, c_

        try:
            return _sum_pairs(await asyncio.gather(*(one(i, p) for i, p in enumerate(procs))))
        finally:
            await self._reap(procs)

    async def _reap(self, procs: list[Any]) -> None:
        for p in procs:
            await self.client.kill(p.pid, "KILL")
            await self.client.wait(p.pid)


# -- the direct path ------------------------------------------------------------------


class DirectPath:
    """Clients are coroutines calling the driver's ``generate`` in this process."""

    name = "direct"

    def __init__(self, driver: Any, meter: CpuMeter) -> None:
        self.driver = driver
        self.meter = meter
        self._ids = iter(range(1, 1 << 30))

    def cpu(self) -> tuple[float, float]:
        return self.meter.mine() + self.meter.others(), self.meter.loop(kernel=False)

    async def _one(self, prompt: Any, run: Run, max_tokens: int) -> tuple[str, int, int]:
        from drivers.base import GenerationRequest, SamplingOptions

        t0 = time.perf_counter()
        first: float | None = None
        text, last = [], None
        request = GenerationRequest(
            f"d{next(self._ids)}", prompt, SamplingOptions(temperature=0.0, max_tokens=max_tokens)
        )
        async for delta in self.driver.generate(request):
            if first is None:
                first = time.perf_counter() - t0
            text.append(delta.text)
            last = delta
        run.ttft_s.append(first or 0.0)
        run.requests += 1
        run.output_tokens += last.output_tokens if last else 0
        return "".join(text), last.prompt_tokens if last else 0, last.cached_tokens if last else 0

    async def warm(self) -> None:
        await self._one("Hello", Run("warm", 1), 4)

    async def run(self, run: Run, requests: int, max_tokens: int) -> None:
        async def client(i: int) -> None:
            for prompt in _prompts(i, requests):
                await self._one(prompt, run, max_tokens)

        await _timed(run, self.cpu, [client(i) for i in range(run.concurrency)])

    async def converse(self, conversations: int, turns: int, max_tokens: int) -> tuple[int, int]:
        async def one(i: int) -> tuple[int, int]:
            messages: list[dict[str, str]] = []
            r = c_ = 0
            for t in range(turns):
                messages.append({"role": "user", "content": _turn(i, t)})
                text, prompt_tokens, cached = await self._one(
                    list(messages), Run("chat", 1), max_tokens
                )
                messages.append({"role": "assistant", "content": text})
                if t:
                    r, c_ = r + prompt_tokens, c_ + cached
            return r, c_

        return _sum_pairs(await asyncio.gather(*(one(i) for i in range(conversations))))


async def _timed(run: Run, cpu: Any, clients: list[Any]) -> None:
    """Run ``clients`` together; record their wall time and the path's CPU seconds."""
    (c0, l0), t0 = cpu(), time.perf_counter()
    await asyncio.gather(*clients)
    run.wall_s = time.perf_counter() - t0
    c1, l1 = cpu()
    run.cpu_s, run.loop_cpu_s = c1 - c0, l1 - l0


def _prompts(i: int, requests: int) -> list[str]:
    return [PROMPTS[(i + j) % len(PROMPTS)] for j in range(requests)]


def _turn(i: int, t: int) -> str:
    return PROMPTS[i % len(PROMPTS)] if t == 0 else FOLLOW_UPS[(i + t) % len(FOLLOW_UPS)]


def _sum_pairs(pairs: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def _hit(path: str, conversations: int, turns: int, read: int, cached: int) -> dict[str, Any]:
    return {
        "path": path,
        "conversations": conversations,
        "turns": turns,
        "prompt_tokens": read,
        "cached_tokens": cached,
        "hit_rate": round(cached / read, 3) if read else 0.0,
    }


# -- orchestration --------------------------------------------------------------------


@dataclass
class Plan:
    """What to run: levels, rounds, the workload's size."""

    levels: list[int]
    rounds: int
    requests: int
    max_tokens: int
    turns: int
    progress: Callable[[str], None] = field(default=lambda _: None)  # what runs now

    @property
    def conversations(self) -> int:
        return min(4, max(self.levels))


async def _rounds(paths: list[BenchPath], plan: Plan, rounds: range, alternate: bool) -> list[Run]:
    """Every level on every path in each round; with ``alternate`` the paths' order flips
    each round."""
    runs: list[Run] = []
    for r in rounds:
        order = paths[::-1] if alternate and r % 2 else paths
        for c in plan.levels:
            for i, path in enumerate(order):
                plan.progress(
                    f"round {r + 1} of {plan.rounds}: {path.name} path, {c} concurrent "
                    f"stream{'s' if c > 1 else ''}…"
                )
                run = Run(path.name, c, r, first=i == 0)
                await path.run(run, plan.requests, plan.max_tokens)
                runs.append(run)
    return runs


async def _prefix(path: BenchPath, plan: Plan) -> dict[str, Any]:
    read, cached = await path.converse(plan.conversations, plan.turns, plan.max_tokens)
    return _hit(path.name, plan.conversations, plan.turns, read, cached)


@contextlib.asynccontextmanager
async def _direct_path(
    args: argparse.Namespace, options: dict[str, Any], meter: CpuMeter
) -> AsyncIterator[DirectPath]:
    from drivers import make_driver

    driver = make_driver(args.driver, args.model, **options)
    await driver.load()
    try:
        path = DirectPath(driver, meter)
        await path.warm()
        yield path
    finally:
        await driver.shutdown()


@contextlib.asynccontextmanager
async def _kernel_path(kernel: Any, meter: CpuMeter) -> AsyncIterator[KernelPath]:
    from llmos.client import AsyncClient

    async with AsyncClient(kernel.endpoint, pid=0, token=kernel.token) as client:
        path = KernelPath(client, meter)
        await path.warm()
        yield path


async def _interleaved(
    args: argparse.Namespace, options: dict[str, Any], kernel: Any, plan: Plan
) -> tuple[list[Run], list[dict[str, Any]]]:
    meter = CpuMeter(kernel.proc.pid)
    async with _kernel_path(kernel, meter) as kp, _direct_path(args, options, meter) as dp:
        runs = await _rounds([kp, dp], plan, range(plan.rounds), alternate=True)
        return runs, [await _prefix(kp, plan), await _prefix(dp, plan)]


async def _kernel_only(kernel: Any, plan: Plan) -> tuple[list[Run], dict[str, Any]]:
    async with _kernel_path(kernel, CpuMeter(kernel.proc.pid)) as kp:
        return await _rounds([kp], plan, range(plan.rounds), alternate=False), await _prefix(
            kp, plan
        )


async def _direct_only(
    args: argparse.Namespace, options: dict[str, Any], plan: Plan
) -> tuple[list[Run], dict]:
    async with _direct_path(args, options, CpuMeter(None)) as dp:
        return await _rounds([dp], plan, range(plan.rounds), alternate=False), await _prefix(
            dp, plan
        )


async def _versus(kernel: Any, other: Any, plan: Plan) -> tuple[list[Run], list[dict[str, Any]]]:
    """Two kernels (two driver configurations), both loaded, rounds interleaved."""
    async with (
        _kernel_path(kernel, CpuMeter(kernel.proc.pid)) as kp,
        _kernel_path(other, CpuMeter(other.proc.pid)) as vp,
    ):
        vp.name = "versus"
        kp.salt, vp.salt = "Conversation A. ", "Conversation B. "  # same length in tokens
        runs = await _rounds([kp, vp], plan, range(plan.rounds), alternate=True)
        return runs, [await _prefix(kp, plan), await _prefix(vp, plan)]


def versus_options(base: list[str] | None, changes: list[str]) -> list[str]:
    """``--driver-option`` items of the second kernel: ``base`` changed by ``changes``
    (``KEY=VALUE`` replaces or adds KEY; ``KEY=`` drops it)."""
    options = dict(item.partition("=")[::2] for item in base or [])
    for item in changes:
        key, _, value = item.partition("=")
        if value:
            options[key] = value
        else:
            options.pop(key, None)
    return [f"{k}={v}" for k, v in options.items()]


def _summary(
    runs: list[Run], levels: list[int], paths: tuple[str, str] = ("kernel", "direct")
) -> list[dict[str, Any]]:
    """Per level: each path's median tokens/s, the median and spread of the rounds'
    overheads (how much slower the first path is), and the CPU the first path burned per
    token beyond the second."""
    a, b = paths
    out = []
    for c in levels:
        k = {r.round: r for r in runs if r.concurrency == c and r.path == a}
        d = {r.round: r for r in runs if r.concurrency == c and r.path == b}
        pcts = [
            100 * (1 - k[i].tokens_per_s / d[i].tokens_per_s)
            for i in sorted(k)
            if d[i].tokens_per_s
        ]
        k_tok = max(sum(r.output_tokens for r in k.values()), 1)
        d_tok = max(sum(r.output_tokens for r in d.values()), 1)
        k_cpu, d_cpu = (
            sum(r.cpu_s for r in k.values()) / k_tok,
            sum(r.cpu_s for r in d.values()) / d_tok,
        )
        k_loop, d_loop = (
            sum(r.loop_cpu_s for r in k.values()) / k_tok,
            sum(r.loop_cpu_s for r in d.values()) / d_tok,
        )
        out.append(
            {
                "concurrency": c,
                "rounds": len(pcts),
                f"{a}_tokens_per_s": round(
                    statistics.median(r.tokens_per_s for r in k.values()), 2
                ),
                f"{b}_tokens_per_s": round(
                    statistics.median(r.tokens_per_s for r in d.values()), 2
                ),
                f"{a}_ttft_p50_ms": _median_ttft(k.values()),
                f"{b}_ttft_p50_ms": _median_ttft(d.values()),
                "overhead_pct": round(statistics.median(pcts), 2) if pcts else None,
                "overhead_pct_rounds": [round(p, 2) for p in pcts],
                f"{a}_cpu_ms_per_token": round(1000 * k_cpu, 3),
                f"{b}_cpu_ms_per_token": round(1000 * d_cpu, 3),
                "added_cpu_us_per_token": round(1e6 * (k_cpu - d_cpu), 1),
                f"{a}_loop_cpu_us_per_token": round(1e6 * k_loop, 1),
                f"{b}_loop_cpu_us_per_token": round(1e6 * d_loop, 1),
                "added_loop_cpu_us_per_token": round(1e6 * (k_loop - d_loop), 1),
                # The added loop CPU as a share of one core at this level's tokens/s.
                "added_loop_core_pct": round(
                    100 * (k_loop - d_loop) * statistics.median(r.tokens_per_s for r in k.values()),
                    2,
                ),
            }
        )
    return out


def _median_ttft(runs: Any) -> float:
    """The median over rounds of each round's p50 time to first token, in ms."""
    p50s = [1000 * _pct(sorted(r.ttft_s), 0.50) for r in runs if r.ttft_s]
    return round(statistics.median(p50s), 1) if p50s else 0.0


def bench_driver(args: argparse.Namespace) -> int:
    """Entry point of ``llmos bench driver``."""
    from kernel.daemon import driver_options
    from llmos.ctl.private import PrivateKernel

    # vLLM's engine, started in this process for the direct path, may point fd 1 elsewhere:
    # keep our own copy of standard output for the report.
    stdout = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    levels = sorted({int(x) for x in str(args.concurrency).split(",") if x.strip()})
    if not levels or levels[0] < 1:
        err.print("[red]--concurrency needs positive integers, e.g. 1,4,16[/]")
        return 2
    if args.rounds < 1:
        err.print("[red]--rounds needs a positive integer[/]")
        return 2
    versus = getattr(args, "versus", None)
    if versus and args.sequential:
        err.print("[red]--versus runs two kernels interleaved; drop --sequential[/]")
        return 2
    plan = Plan(levels, args.rounds, args.requests, args.tokens, args.turns)
    slots = args.slots or max(levels)
    options: dict[str, Any] = {"slots": slots} | ({"dtype": args.dtype} if args.dtype else {})
    options |= driver_options(args.driver_option)
    argv = ["--driver", args.driver, "--slots", str(slots)]
    argv += ["--model", args.model] if args.model else []
    argv += ["--dtype", args.dtype] if args.dtype else []
    other = list(argv)
    for option in args.driver_option or []:
        argv += ["--driver-option", option]
    for option in versus_options(args.driver_option, versus or []):
        other += ["--driver-option", option]
    mode = "sequential" if args.sequential else "interleaved"
    paths = ("kernel", "versus") if versus else ("kernel", "direct")
    report: dict[str, Any] = {
        "bench": "driver",
        "driver": args.driver,
        "model": args.model or "packaged default",
        "slots": slots,
        "max_tokens": args.tokens,
        "requests_per_client": args.requests,
        "rounds": args.rounds,
        "mode": mode,
        "paths": list(paths),
        "machine": {"cpus": os.cpu_count(), "load_avg_start": _load()},
    }
    if versus:
        report["driver_options"] = list(args.driver_option or [])
        report["versus_options"] = versus_options(args.driver_option, versus)
    with tempfile.TemporaryDirectory(prefix="llmos-bench-driver-") as tmp:
        kernel = PrivateKernel(Path(tmp) / "kernel", *argv)
        with err.status(f"starting a private kernel with the {args.driver} driver…"):
            kernel.start()
        second = PrivateKernel(Path(tmp) / "versus", *other) if versus else None
        try:
            if second is not None:
                with err.status("starting the second kernel (--versus)…"):
                    second.start()
            with err.status(
                f"{mode} rounds at concurrency {', '.join(map(str, levels))}…"
            ) as status:
                plan.progress = status.update
                if second is not None:
                    runs, (k_hit, d_hit) = asyncio.run(_versus(kernel, second, plan))
                elif args.sequential:
                    runs, k_hit = asyncio.run(_kernel_only(kernel, plan))
                else:
                    runs, (k_hit, d_hit) = asyncio.run(_interleaved(args, options, kernel, plan))
        finally:
            _stop(kernel)
            if second is not None and second.proc is not None:
                _stop(second)
    if args.sequential:
        with err.status(f"the {args.driver} driver called directly…"):
            d_runs, d_hit = asyncio.run(_direct_only(args, options, plan))
        runs += d_runs
    runs.sort(key=lambda r: (r.round, r.concurrency, r.path != "kernel"))
    report["machine"]["load_avg_end"] = _load()
    report["runs"] = [r.row() for r in runs]
    report["summary"] = _summary(runs, levels, paths)
    report["overhead_pct"] = {str(s["concurrency"]): s["overhead_pct"] for s in report["summary"]}
    report["prefix_cache"] = [k_hit, d_hit]
    _print(report, args.json, stdout)
    stdout.close()
    return 0


def _stop(kernel: Any) -> None:
    """Stop the kernel and wait until every process it started (engine cores) is gone."""
    import psutil

    helpers = _children(kernel.proc.pid if kernel.proc else None)
    kernel.stop()
    with err.status("waiting for the kernel's engine processes to exit…"):
        psutil.wait_procs(helpers, timeout=120)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


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
    out = Console(file=stdout, width=max(Console(file=stdout).width, 130))
    t = Table(
        title=f"{report['driver']} driver: greedy, {report['max_tokens']} tokens max, "
        f"{report['requests_per_client']} requests per client, {report['slots']} slots, "
        f"{report['rounds']} {report['mode']} round(s)"
    )
    for col in (
        "round",
        "path",
        "clients",
        "output tokens",
        "seconds",
        "tokens/s",
        "TTFT p50 ms",
        "TTFT p95 ms",
        "CPU ms/token",
        "loop CPU µs/token",
    ):
        t.add_column(col, justify="left" if col == "path" else "right")
    for r in report["runs"]:
        t.add_row(
            str(r["round"]),
            r["path"] + ("" if r["ran_first"] else "*"),
            str(r["concurrency"]),
            str(r["output_tokens"]),
            f"{r['wall_s']:.2f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['ttft_p50_ms']:.0f}",
            f"{r['ttft_p95_ms']:.0f}",
            f"{r['cpu_ms_per_token']:.1f}",
            f"{r['loop_cpu_us_per_token']:.0f}",
        )
    out.print(t)
    out.print("* ran second in its round")
    a, b = report.get("paths", ("kernel", "direct"))
    if "versus_options" in report:
        out.print(f"kernel: {' '.join(report['driver_options'])}")
        out.print(f"versus: {' '.join(report['versus_options'])}")
    s = Table(title="per level: medians over the rounds")
    for col in (
        "clients",
        f"{a} tok/s",
        f"{b} tok/s",
        f"{a} TTFT p50 ms",
        f"{b} TTFT p50 ms",
        f"{a} slower by",
        "per round",
        "added loop CPU µs/token",
        "= % of a core",
    ):
        s.add_column(col, justify="right")
    for row in report["summary"]:
        pct = row["overhead_pct"]
        s.add_row(
            str(row["concurrency"]),
            f"{row[f'{a}_tokens_per_s']:.1f}",
            f"{row[f'{b}_tokens_per_s']:.1f}",
            f"{row[f'{a}_ttft_p50_ms']:.0f}",
            f"{row[f'{b}_ttft_p50_ms']:.0f}",
            "n/a" if pct is None else f"{pct:+.2f}%",
            " ".join(f"{p:+.1f}" for p in row["overhead_pct_rounds"]),
            f"{row['added_loop_cpu_us_per_token']:.0f}",
            f"{row['added_loop_core_pct']:.2f}%",
        )
    out.print(s)
    h = Table(title="prefix cache on a multi-turn workload (turns after the first)")
    for col in ("path", "conversations", "turns", "prompt tokens", "cached", "hit rate"):
        h.add_column(col, justify="left" if col == "path" else "right")
    for r in report["prefix_cache"]:
        h.add_row(
            r["path"],
            str(r["conversations"]),
            str(r["turns"]),
            str(r["prompt_tokens"]),
            str(r["cached_tokens"]),
            f"{r['hit_rate']:.1%}",
        )
    out.print(h)
