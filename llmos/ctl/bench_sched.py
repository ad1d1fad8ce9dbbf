"""``llmos bench sched``: agent-program workloads under every scheduling policy.

For each workload and each policy it starts a fresh private kernel (same driver, same
slots, ``--policy NAME``) and replays the same programs (same seed), then reports what
an agent's user sees and what the kernel costs:

* a *program* is one top-level LLM process spawned by the admin and driven by an asyncio
  coroutine over :class:`llmos.client.AsyncClient` (a thousand programs cannot be OS
  processes on a small machine); programs arrive as a Poisson process, so the kernel
  reaches saturation with every program alive at once;
* workloads: ``chat`` (several turns, ShareGPT-like lognormal output lengths, think time
  between turns), ``react`` (many short calls separated by tool waits, during which the
  process holds no slot), ``mix`` (mostly short programs plus a few very long ones);
* every call streams, so time-to-first-token is measured per call; just before a
  program's process is killed and reaped its ``proc.ps`` row gives its preemptions and
  re-prefilled tokens (context switches);
* the kernel's own cost: CPU seconds of the kernel process (and of its event-loop thread
  alone) per generate call, from ``/proc/<pid>/stat``, and RSS growth per program.

``--driver sim`` runs at scale on the simulator (``drivers/sim.py``: a fixed token rate
per slot and a prefill cost, no model); ``--driver cpu`` runs a small version of the same
workloads on the real packaged model.

On ``sim`` the report adds each workload's offered load (work brought over slot capacity
while the programs arrive) and the *ideal model* (:func:`model_run`): the same programs
under the kernel's own scheduler (its plans, policy and mechanism) in virtual time with no
kernel, deterministic, plus a clairvoyant shortest-remaining-program-first bound
(:class:`OracleSRPT`), so that a measured run can be told apart from the policy's limit
and from the kernel's overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import json
import math
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from kernel.scheduler import LoadView, Plan, Policy, Scheduler, Slot, Waiter
from llmos.client import AsyncClient

err = Console(stderr=True)

#: Deadline of each generate call: under a bad policy a call may wait long at saturation.
DEADLINE_MS = 3_600_000
SYSTEM = "You are a helpful agent. Answer briefly."
WORKLOADS = ("chat", "react", "mix")
#: One program in this many of the mix workload is a long one.
LONG_EVERY = 33
VOCAB = (
    "the",
    "agent",
    "reads",
    "file",
    "data",
    "plan",
    "next",
    "step",
    "tool",
    "call",
    "result",
    "search",
    "web",
    "page",
    "list",
    "items",
    "check",
    "value",
    "error",
    "retry",
    "answer",
    "user",
    "asks",
    "about",
    "weather",
    "code",
    "test",
    "build",
    "run",
    "report",
    "summary",
    "table",
    "row",
    "column",
    "query",
    "database",
    "open",
    "close",
    "write",
    "note",
)
#: Bench defaults of the simulator; ``--driver-option`` overrides them.
SIM_OPTIONS: dict[str, Any] = {
    "tokens_per_s": 100,
    "prefill_tokens_per_s": 2000,
    "prefix_cache_tokens": 8192,
}  # like the CPU driver's KV prefix cache


@dataclass(frozen=True, slots=True)
class Scale:
    """How big the workloads are on one driver."""

    programs: dict[str, int]  # programs per workload
    slots: int  # default --slots
    arrivals_per_s: dict[str, float]  # Poisson arrival rate per workload
    out: float  # multiplier on output lengths
    max_out: int  # clip on one call's output tokens
    long_out: int  # output tokens of each call of the mix's long programs
    words: float  # multiplier on prompt lengths
    #: max_tokens of every call when the driver takes the answer's length from the prompt
    #: (the simulator's ``<sim:reply=N>``), so max_tokens does not tell the scheduler how
    #: long an answer will be; None: max_tokens is the sampled length (a real model may
    #: stop earlier).
    reply_cap: int | None = None


SCALES = {
    "sim": Scale(
        {"chat": 200, "react": 200, "mix": 1200},
        slots=32,
        arrivals_per_s={"chat": 100, "react": 100, "mix": 1000},
        out=1.0,
        max_out=256,
        long_out=200,
        words=1.0,
        reply_cap=512,
    ),
    "cpu": Scale(
        {"chat": 6, "react": 6, "mix": 6},
        slots=2,
        arrivals_per_s={"chat": 3, "react": 3, "mix": 3},
        out=0.5,
        max_out=24,
        long_out=64,
        words=0.5,
    ),
}


# -- workloads ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One ``llm.generate`` of a program, then what the program does before the next."""

    text: str  # the user message this call adds to the context
    max_tokens: int
    after_s: float  # tool wait / think time after the call; the process holds no slot


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    """One agent program: when it arrives and the calls it makes."""

    name: str
    arrival_s: float
    steps: tuple[Step, ...]
    long: bool = False


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))


def _text(rng: random.Random, head: str, words: int) -> str:
    return head + " " + " ".join(rng.choice(VOCAB) for _ in range(max(1, words)))


def describe(kind: str, s: Scale) -> str:
    """What workload ``kind`` is made of at scale ``s`` (for the report)."""
    return {
        "chat": f"2-5 turns; user text lognormal (median {24 * s.words:g} words), "
        f"output lognormal (median {20 * s.out:g} tokens, sigma 0.9, at most {s.max_out}), "
        "think time exp(0.3 s) between turns",
        "react": f"3-8 calls; task {30 * s.words:g} words, "
        f"observations {10 * s.words:g}-{60 * s.words:g} words, "
        f"output lognormal (median {10 * s.out:g} tokens, sigma 0.5), "
        "tool wait uniform 0.05-0.5 s",
        "mix": f"1 program in {LONG_EVERY} is long (2 calls of {s.long_out} tokens), "
        f"the others short (1-2 calls, output median {8 * s.out:g} tokens, waits 0.05-0.3 s)",
    }[kind]


def _chat(rng: random.Random, i: int, n: int, s: Scale) -> tuple[list[Step], bool]:
    steps = []
    for _ in range(rng.randint(2, 5)):
        words = _lognormal(rng, 24 * s.words, 0.8, 2, round(160 * s.words))
        out = _lognormal(rng, 20 * s.out, 0.9, 2, s.max_out)
        steps.append(Step(_text(rng, "Question:", words), out, rng.expovariate(1 / 0.3)))
    return steps, False


def _react(rng: random.Random, i: int, n: int, s: Scale) -> tuple[list[Step], bool]:
    steps = [
        Step(
            _text(rng, "Task:", round(30 * s.words)),
            _lognormal(rng, 10 * s.out, 0.5, 2, s.max_out),
            rng.uniform(0.05, 0.5),
        )
    ]
    for _ in range(rng.randint(2, 7)):
        obs = _text(rng, "Observation:", round(rng.randint(10, 60) * s.words))
        steps.append(
            Step(obs, _lognormal(rng, 10 * s.out, 0.5, 2, s.max_out), rng.uniform(0.05, 0.5))
        )
    return steps, False


def _mix(rng: random.Random, i: int, n: int, s: Scale) -> tuple[list[Step], bool]:
    if i % LONG_EVERY == LONG_EVERY // 2 or (n < LONG_EVERY and i == n // 2):
        return [
            Step(_text(rng, "Task:", round(40 * s.words)), s.long_out, 0.2),
            Step(_text(rng, "Continue:", round(10 * s.words)), s.long_out, 0.0),
        ], True
    steps = [
        Step(
            _text(rng, "Question:", round(rng.randint(8, 30) * s.words)),
            _lognormal(rng, 8 * s.out, 0.5, 2, s.max_out),
            rng.uniform(0.05, 0.3),
        )
        for _ in range(rng.randint(1, 2))
    ]
    return steps, False


MAKERS = {"chat": _chat, "react": _react, "mix": _mix}


def make_workload(kind: str, n: int, seed: int, scale: Scale) -> list[ProgramSpec]:
    """The ``n`` programs of workload ``kind``: a pure function of its arguments."""
    rng = random.Random(f"{seed}:{kind}")
    t, programs = 0.0, []
    for i in range(n):
        steps, long = MAKERS[kind](rng, i, n, scale)
        last = steps[-1]
        steps[-1] = Step(last.text, last.max_tokens, 0.0)  # nothing to wait for after the end
        programs.append(ProgramSpec(f"{kind}{i}", t, tuple(steps), long))
        t += rng.expovariate(scale.arrivals_per_s[kind])
    return programs


# -- driving programs -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceModel:
    """How fast one request alone is served: the yardstick of a program's ideal time."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    source: str  # "settings" (simulator) or "measured" (one call alone on the real model)

    def ideal_s(self, prompt_tokens: int, output_tokens: int) -> float:
        return prompt_tokens / self.prefill_tokens_per_s + output_tokens / self.decode_tokens_per_s


@dataclass(slots=True)
class ProgramResult:
    """What one program saw, and its process's ``proc.ps`` row's scheduling counters."""

    name: str
    long: bool
    completion_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    ideal_s: float = 0.0
    preemptions: int = 0
    switch_prefill_tokens: int = 0
    switch_s: float = 0.0
    error: str | None = None


@dataclass(slots=True)
class RunState:
    """Shared by the programs of one run."""

    admin: AsyncClient
    service: ServiceModel
    reply_cap: int | None  # see Scale.reply_cap
    t0: float = 0.0
    active: int = 0
    peak: int = 0
    done: int = 0


async def _timed_generate(
    rs: RunState, pid: int, token: str, step: Step
) -> tuple[float, dict[str, Any]]:
    """One streamed call: (time to first token, final result)."""
    text, max_tokens = step.text, step.max_tokens
    if rs.reply_cap is not None:
        text, max_tokens = f"{text} <sim:reply={step.max_tokens}>", rs.reply_cap
    args = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    sent, first, final = time.perf_counter(), None, {}
    async for frame in rs.admin.stream(
        "llm.generate", args, pid=pid, token=token, deadline_ms=DEADLINE_MS
    ):
        if "finish_reason" in frame:
            final = frame
        elif first is None:
            first = time.perf_counter()
    return (first or time.perf_counter()) - sent, final


async def _record_ps(rs: RunState, pid: int, res: ProgramResult) -> None:
    """Copy the process's scheduling counters (absent from older kernels: 0)."""
    rows = await rs.admin.ps(pid)
    if rows:
        row = rows[0]
        res.preemptions = getattr(row, "preemptions", 0) or 0
        res.switch_prefill_tokens = getattr(row, "switch_prefill_tokens", 0) or 0
        res.switch_s = getattr(row, "switch_s", 0.0) or 0.0


async def _kill_and_reap(admin: AsyncClient, pid: int) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(15):
            await admin.kill(pid, "KILL")
            await admin.wait(pid, timeout=10)


async def run_program(rs: RunState, spec: ProgramSpec) -> ProgramResult:
    """Arrive, spawn, make every call (waiting between them), read ps, kill and reap."""
    res = ProgramResult(spec.name, spec.long)
    await asyncio.sleep(max(0.0, rs.t0 + spec.arrival_s - time.perf_counter()))
    start = time.perf_counter()
    rs.active += 1
    rs.peak = max(rs.peak, rs.active)
    pid = None
    try:
        proc = await rs.admin.spawn(spec.name, system=SYSTEM)
        pid = proc.pid
        for step in spec.steps:
            ttft, final = await _timed_generate(rs, proc.pid, proc.token, step)
            usage = final.get("usage", {})
            res.ttft_s.append(ttft)
            res.prompt_tokens += usage.get("prompt_tokens", 0)
            res.output_tokens += usage.get("output_tokens", 0)
            res.ideal_s += rs.service.ideal_s(
                usage.get("prompt_tokens", 0), usage.get("output_tokens", 0)
            )
            res.ideal_s += step.after_s
            if step.after_s:
                await asyncio.sleep(step.after_s)
        res.completion_s = time.perf_counter() - start
        await _record_ps(rs, proc.pid, res)
    except Exception as exc:  # noqa: BLE001 - one failed program is reported, not fatal
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        rs.active -= 1
        rs.done += 1
        if pid is not None:
            await _kill_and_reap(rs.admin, pid)
    return res


# -- the kernel's own cost ------------------------------------------------------------


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of process ``pid`` (or of its thread ``tid``), in seconds."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _sample(
    pid: int, rs: RunState, total: int, peak: list[int], show: Callable[[str], None]
) -> None:
    """Track the kernel's peak RSS and show progress until cancelled."""
    while True:
        with contextlib.suppress(OSError):
            peak[0] = max(peak[0], rss_kib(pid))
        show(f"{rs.done}/{total} programs done, {rs.active} alive")
        await asyncio.sleep(0.1)


# -- one run: a workload under a policy on a fresh kernel ------------------------------


async def calibrate(admin: AsyncClient) -> ServiceModel:
    """One call alone on an idle kernel: prefill and decoding rates of the real model."""
    proc = await admin.spawn("calibrate")
    try:
        rs = RunState(admin, ServiceModel(1.0, 1.0, "unknown"), None)
        step = Step(_text(random.Random(0), "Task:", 60), 24, 0.0)
        t0 = time.perf_counter()
        ttft, final = await _timed_generate(rs, proc.pid, proc.token, step)
        total = time.perf_counter() - t0
        usage = final["usage"]
        decode = max(usage["output_tokens"] - 1, 1) / max(total - ttft, 1e-3)
        return ServiceModel(usage["prompt_tokens"] / max(ttft, 1e-3), decode, "measured")
    finally:
        await _kill_and_reap(admin, proc.pid)


async def drive(
    endpoint: str,
    token: str,
    programs: list[ProgramSpec],
    service: ServiceModel | None,
    reply_cap: int | None,
    show: Callable[[str], None],
) -> dict[str, Any]:
    """Run ``programs`` against the kernel at ``endpoint``; the run's raw measurements."""
    admin = AsyncClient(endpoint, pid=0, token=token)
    try:
        kpid = (await admin.info()).kernel_pid
        if service is None:
            show("calibrating the model's speed alone…")
            service = await calibrate(admin)
        rs = RunState(admin, service, reply_cap)
        cpu0, loop0, rss0 = cpu_seconds(kpid), cpu_seconds(kpid, kpid), rss_kib(kpid)
        peak = [rss0]
        sampler = asyncio.create_task(_sample(kpid, rs, len(programs), peak, show))
        rs.t0 = time.perf_counter()
        results = await asyncio.gather(*(run_program(rs, p) for p in programs))
        wall = time.perf_counter() - rs.t0
        sampler.cancel()
        cpu1, loop1 = cpu_seconds(kpid), cpu_seconds(kpid, kpid)
        live = [p for p in await admin.ps() if p.pid > 1 and p.state != "ZOMBIE"]
        return {
            "results": results,
            "wall_s": wall,
            "service": service,
            "peak_concurrent": rs.peak,
            "kernel_cpu_s": cpu1 - cpu0,
            "kernel_loop_cpu_s": loop1 - loop0,
            "rss_growth_kib": max(0, peak[0] - rss0),
            "leftover_processes": len(live),
        }
    finally:
        await admin.close()


def _stop(kernel: Any) -> None:
    """Stop a private kernel; SIGKILL it if it does not stop in time."""
    try:
        kernel.stop(timeout=30)
    except subprocess.TimeoutExpired:
        kernel.proc.kill()
        kernel.proc.wait()


def run_one(
    base: Path,
    driver: str,
    policy: str,
    slots: int,
    options: dict[str, Any],
    programs: list[ProgramSpec],
    service: ServiceModel | None,
    reply_cap: int | None,
    label: str,
) -> dict[str, Any]:
    """A fresh private kernel with ``policy``; drive ``programs``; stop it whatever happens."""
    from llmos.ctl.private import PrivateKernel

    argv = ["--driver", driver, "--policy", policy, "--slots", str(slots)]
    for key, value in options.items():
        argv += ["--driver-option", f"{key}={value}"]
    kernel = PrivateKernel(base / f"{label}-{policy}", *argv)
    try:
        with err.status(f"{label} · {policy}: starting a private kernel…") as status:
            kernel.start()
            return asyncio.run(
                drive(
                    kernel.endpoint,
                    kernel.token,
                    programs,
                    service,
                    reply_cap,
                    lambda text: status.update(f"{label} · {policy}: {text}"),
                )
            )
    finally:
        _stop(kernel)


# -- metrics --------------------------------------------------------------------------


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one gets everything."""
    total, squares = sum(values), sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 0.0


def summarize(raw: dict[str, Any], workload: str, policy: str) -> dict[str, Any]:
    """One row of the report from a run's raw measurements."""
    results: list[ProgramResult] = raw["results"]
    ok = [r for r in results if r.error is None]
    ttfts = [t for r in ok for t in r.ttft_s]
    calls = sum(len(r.ttft_s) for r in results)
    prompt = sum(r.prompt_tokens for r in ok)
    switch = sum(r.switch_prefill_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    completion = [r.completion_s for r in ok]
    errors = [r.error for r in results if r.error]
    return {
        "workload": workload,
        "policy": policy,
        "programs": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "peak_concurrent": raw["peak_concurrent"],
        "wall_s": round(raw["wall_s"], 3),
        "mean_completion_s": round(mean(completion), 3),
        "p95_completion_s": round(p95(completion), 3),
        "mean_completion_long_s": round(mean([r.completion_s for r in ok if r.long]), 3),
        "calls": calls,
        "output_tokens": output,
        "tokens_per_s": round(output / raw["wall_s"], 1),
        "mean_ttft_s": round(mean(ttfts), 4),
        "p95_ttft_s": round(p95(ttfts), 4),
        "jain": round(jain([r.ideal_s / r.completion_s for r in ok if r.completion_s > 0]), 4),
        "preemptions": sum(r.preemptions for r in ok),
        "switch_prefill_tokens": switch,
        "switch_prefill_pct": round(100 * switch / (prompt + switch), 2)
        if prompt + switch
        else 0.0,
        "switch_s": round(sum(r.switch_s for r in ok), 3),
        "kernel_cpu_us_per_call": round(1e6 * raw["kernel_cpu_s"] / max(calls, 1), 1),
        "kernel_loop_cpu_us_per_call": round(1e6 * raw["kernel_loop_cpu_s"] / max(calls, 1), 1),
        "kernel_cpu_us_per_output_token": round(1e6 * raw["kernel_cpu_s"] / max(output, 1), 1),
        "kernel_rss_kib_per_process": round(raw["rss_growth_kib"] / max(len(results), 1), 2),
        "leftover_processes": raw["leftover_processes"],
    }


def speedups(runs: list[dict[str, Any]], policy: str) -> dict[str, dict[str, Any]]:
    """Per workload: fifo's mean/p95 completion over ``policy``'s, and the best policy."""
    out: dict[str, dict[str, Any]] = {}
    for wl in dict.fromkeys(r["workload"] for r in runs):
        rows = {r["policy"]: r for r in runs if r["workload"] == wl and r["mean_completion_s"] > 0}
        if "fifo" not in rows or not rows:
            continue
        best = min(rows.values(), key=lambda r: r["mean_completion_s"])
        fifo = rows["fifo"]
        entry: dict[str, Any] = {
            "best_policy": best["policy"],
            "best_mean_speedup": round(fifo["mean_completion_s"] / best["mean_completion_s"], 2),
        }
        if policy in rows:
            own = rows[policy]
            entry |= {
                "policy": policy,
                "mean_speedup": round(fifo["mean_completion_s"] / own["mean_completion_s"], 2),
                "p95_speedup": round(
                    fifo["p95_completion_s"] / max(own["p95_completion_s"], 1e-9), 2
                ),
            }
        out[wl] = entry
    return out


# -- the ideal model: the same programs and policies, no kernel -----------------------


class OracleSRPT(Policy):
    """NOT a kernel policy: shortest remaining *program* first, told every program's
    remaining output tokens, which no kernel knows. The model runs it as a bound on what
    any ordering of these programs could achieve."""

    name = "oracle"

    def __init__(self, remaining: dict[int, int], quantum: int = 8) -> None:
        self.remaining = remaining  # pgid -> output tokens the program has still to make
        self.quantum = quantum

    def _key(self, w: Waiter) -> tuple[int, int, int]:
        return (self.remaining[w.proc.program.pgid], w.proc.program.pgid, w.seq)

    def pick(self, queue: list[Waiter], now: float, load: LoadView) -> Waiter:
        return min(queue, key=self._key)

    def should_preempt(self, slot: Slot, queue: list[Waiter], now: float, load: LoadView) -> bool:
        assert slot.proc is not None and self.quantum is not None
        mine = self.remaining[slot.proc.program.pgid]
        return slot.tokens >= self.quantum and any(self._key(w)[0] < mine for w in queue)


@dataclass(eq=False)
class _Call:
    """One generate call in the model."""

    prog: int  # index of its program
    answer: int  # tokens it will make (the <sim:reply=N> length)
    prompt: int  # prompt tokens as the simulator counts them
    sent: float
    made: int = 0
    first: float | None = None
    stretch: int = 0  # bumped at every grant, so stale token events are dropped


def model_run(
    programs: list[ProgramSpec],
    policy: Policy,
    slots: int,
    prefill_tokens_per_s: float,
    decode_tokens_per_s: float,
    reply_cap: int = 512,
) -> dict[str, Any]:
    """Replay ``programs`` in virtual time on an ideal kernel running ``policy``.

    The timing is the simulator's (``drivers/sim.py``: prefill at ``prefill_tokens_per_s``,
    then one token every ``1 / decode_tokens_per_s`` per slot, a resumed generation
    prefilling one token as with its prefix cache) and the scheduling is the kernel's
    own: a :class:`Scheduler` on a virtual clock, its ``schedule(now)`` plans carried out
    at the same events as in the kernel (a call queues, a slot is released, a holder
    reaches its next look), a flagged holder yielding at its next token. What is left out
    is everything the kernel, the client and the shared CPU cost: the difference from a
    measured run is the kernel's overhead on program completion. Deterministic: no clock,
    no noise.
    """
    from kernel.process import INIT_PID, ProcessTable

    table = ProcessTable(owner="model")
    procs = [table.spawn(INIT_PID, p.name, "m", 0, SYSTEM) for p in programs]
    for proc, spec in zip(procs, programs, strict=True):
        proc.program.account.opened = spec.arrival_s  # spawned on arrival, in virtual time
    if isinstance(policy, OracleSRPT):
        policy.remaining.update(
            {
                pr.program.pgid: sum(s.max_tokens for s in p.steps)
                for pr, p in zip(procs, programs, strict=True)
            }
        )
    clock = _VirtualClock()
    sched = Scheduler({"m": slots}, policy, procs=table, clock=clock)
    ctx = [2 + len(SYSTEM.split())] * len(programs)  # the system message, + 1 per prompt
    step_of = [0] * len(programs)
    done_at = [0.0] * len(programs)
    ttfts: list[float] = []
    events: list[tuple[float, int, str, Any]] = []
    tick = itertools.count()
    holders: list[_Call | None] = [None] * slots  # the call on each slot
    waiting: dict[Waiter, _Call] = {}
    preemptions, step_s = 0, 1.0 / decode_tokens_per_s

    def enqueue(call: _Call) -> None:
        proc = procs[call.prog]
        expected = round(min(proc.mean_output or reply_cap, reply_cap))
        waiting[sched.enqueue(proc, max(expected - call.made, 1))] = call

    def started(plan: Plan, now: float) -> None:
        """The grants of a plan the scheduler carried out: prefill, then tokens."""
        for grant in plan.grants:
            call = waiting.pop(grant.waiter)
            call.stretch += 1
            holders[grant.slot.index] = call
            prefill = (call.prompt if call.made == 0 else 1) / prefill_tokens_per_s
            heapq.heappush(
                events,
                (now + prefill + step_s, next(tick), "token", (grant.slot.index, call.stretch)),
            )

    slot_objs = [sched.slot("m", i) for i in range(slots)]
    for i, p in enumerate(programs):
        heapq.heappush(events, (p.arrival_s, next(tick), "call", i))
    while events:
        now, _, kind, data = heapq.heappop(events)
        clock.now = now
        if kind == "call":
            spec = programs[data].steps[step_of[data]]
            ctx[data] += 1 + len(spec.text.split()) + 1  # the user message and its reply hint
            enqueue(_Call(data, spec.max_tokens, ctx[data], now))
            started(sched.dispatch("m"), now)
            continue
        index, stretch = data
        call = holders[index]
        if call is None or call.stretch != stretch:
            continue
        s = slot_objs[index]
        proc = s.proc
        assert proc is not None
        call.made += 1
        s.tokens += 1
        proc.account.charge(1)
        proc.program.account.charge(1)
        if isinstance(policy, OracleSRPT):
            policy.remaining[proc.program.pgid] -= 1
        if call.first is None:
            call.first = now
            ttfts.append(now - call.sent)
        if call.made >= call.answer:  # the answer is complete: release the slot
            holders[index] = None
            proc.mean_output = (
                call.made if proc.mean_output is None else 0.7 * proc.mean_output + 0.3 * call.made
            )
            spec = programs[call.prog].steps[step_of[call.prog]]
            ctx[call.prog] += 1 + call.made
            step_of[call.prog] += 1
            plan = sched.release(s)
            table.idle(proc)
            if step_of[call.prog] == len(programs[call.prog].steps):
                done_at[call.prog] = now
                table.exit(proc, 0)
            else:
                heapq.heappush(events, (now + spec.after_s, next(tick), "call", call.prog))
            started(plan, now)
            continue
        if s.tokens >= s.next_check:
            started(sched.tick(s), now)
        if s.preempt is not None:  # a plan flagged this slot: yield at this token boundary
            preemptions += 1
            holders[index] = None
            started(sched.release(s), now)
            enqueue(call)  # back to the run queue, as the kernel's generation loop does
            started(sched.dispatch("m"), now)
            continue
        heapq.heappush(events, (now + step_s, next(tick), "token", (index, stretch)))
    completion = [done_at[i] - p.arrival_s for i, p in enumerate(programs)]
    span = max(done_at) - programs[0].arrival_s if programs else 0.0
    output = sum(s.max_tokens for p in programs for s in p.steps)
    return {
        "policy": policy.name,
        "mean_completion_s": round(mean(completion), 3),
        "p95_completion_s": round(p95(completion), 3),
        "mean_completion_long_s": round(
            mean([c for c, p in zip(completion, programs, strict=True) if p.long]), 3
        ),
        "mean_ttft_s": round(mean(ttfts), 4),
        "p95_ttft_s": round(p95(ttfts), 4),
        "preemptions": preemptions,
        "tokens_per_s": round(output / span, 1) if span else 0.0,
    }


class _VirtualClock:
    """The model's time: the scheduler reads it where the kernel's reads the monotonic."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def offered_load(
    programs: list[ProgramSpec], slots: int, prefill_tokens_per_s: float, decode_tokens_per_s: float
) -> float:
    """Slot-seconds of work the programs bring (each call's prefill of its whole context,
    as the simulator counts it, and its decoding) over the slot-seconds the model has
    while they arrive: above 1 the arrivals outrun the slots, i.e. the run is at
    saturation and a backlog builds up."""
    work = 0.0
    for p in programs:
        ctx = 2 + len(SYSTEM.split())
        for step in p.steps:
            ctx += 2 + len(step.text.split())
            work += ctx / prefill_tokens_per_s + step.max_tokens / decode_tokens_per_s
            ctx += 1 + step.max_tokens
    span = programs[-1].arrival_s - programs[0].arrival_s if len(programs) > 1 else 0.0
    return work / (slots * span) if span > 0 else math.inf


def model_rows(
    programs: list[ProgramSpec],
    policies: list[str],
    slots: int,
    service: ServiceModel,
    reply_cap: int,
    workload: str,
) -> list[dict[str, Any]]:
    """:func:`model_run` for every policy and the clairvoyant bound, with speed-ups."""
    from kernel.scheduler import make_policy

    rows = [
        model_run(
            programs,
            make_policy(name),
            slots,
            service.prefill_tokens_per_s,
            service.decode_tokens_per_s,
            reply_cap,
        )
        for name in policies
    ]
    rows.append(
        model_run(
            programs,
            OracleSRPT({}),
            slots,
            service.prefill_tokens_per_s,
            service.decode_tokens_per_s,
            reply_cap,
        )
    )
    fifo = next((r for r in rows if r["policy"] == "fifo"), None)
    for r in rows:
        r["workload"] = workload
        if fifo is not None:
            r["mean_speedup"] = round(fifo["mean_completion_s"] / r["mean_completion_s"], 2)
            r["p95_speedup"] = round(fifo["p95_completion_s"] / r["p95_completion_s"], 2)
    return rows


# -- entry point ----------------------------------------------------------------------


def _policies(arg: str | None) -> list[str]:
    from kernel.scheduler import POLICIES

    names = [p.strip() for p in arg.split(",") if p.strip()] if arg else list(POLICIES)
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)}; known: {', '.join(POLICIES)}")
    return names


def _options(driver: str, items: list[str] | None) -> dict[str, Any]:
    from kernel.daemon import driver_options

    return (dict(SIM_OPTIONS) if driver == "sim" else {}) | driver_options(items)


def _default_policy() -> str:
    from kernel.daemon import parser

    return str(parser().get_default("policy"))


def bench_sched(args: argparse.Namespace) -> int:
    """Entry point of ``llmos bench sched``."""
    try:
        policies = _policies(args.policies)
        workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
        if bad := [w for w in workloads if w not in WORKLOADS]:
            raise ValueError(f"unknown workload {', '.join(bad)}; known: {', '.join(WORKLOADS)}")
    except ValueError as exc:
        err.print(f"[red]llmos bench sched:[/] {exc}")
        return 2
    scale = SCALES[args.driver]
    slots = args.slots or scale.slots
    options = _options(args.driver, args.driver_option)
    service = (
        ServiceModel(
            float(options["prefill_tokens_per_s"]), float(options["tokens_per_s"]), "settings"
        )
        if args.driver == "sim"
        else None
    )
    report: dict[str, Any] = {
        "bench": "sched",
        "driver": args.driver,
        "slots": slots,
        "seed": args.seed,
        "driver_options": options,
        "policies": policies,
        "default_policy": _default_policy(),
        "max_tokens": (
            f"{scale.reply_cap} on every call; each answer's length is asked in its prompt"
            if scale.reply_cap
            else "the sampled answer length (the model may stop earlier)"
        ),
        "machine": {"cpus": os.cpu_count()},
        "workloads": {},
        "runs": [],
        "model": [],
    }
    with tempfile.TemporaryDirectory(prefix="llmos-bench-sched-") as tmp:
        for wl in workloads:
            n = args.programs or scale.programs[wl]
            programs = make_workload(wl, n, args.seed, scale)
            report["workloads"][wl] = {
                "programs": n,
                "calls": sum(len(p.steps) for p in programs),
                "description": describe(wl, scale),
                "arrivals_per_s": scale.arrivals_per_s[wl],
            }
            if (
                service is not None and scale.reply_cap is not None
            ):  # the simulator: its rates are known
                report["workloads"][wl]["offered_load"] = round(
                    offered_load(
                        programs, slots, service.prefill_tokens_per_s, service.decode_tokens_per_s
                    ),
                    2,
                )
                report["model"] += model_rows(
                    programs, policies, slots, service, scale.reply_cap, wl
                )
            for policy in policies:
                raw = run_one(
                    Path(tmp),
                    args.driver,
                    policy,
                    slots,
                    options,
                    programs,
                    service,
                    scale.reply_cap,
                    wl,
                )
                service = raw["service"]
                report["runs"].append(summarize(raw, wl, policy))
    report["service_model"] = asdict(service) if service else None
    report["speedup_vs_fifo"] = speedups(report["runs"], report["default_policy"])
    modelled = {(r["workload"], r["policy"]): r for r in report["model"]}
    for run in report["runs"]:  # how much the kernel (and the shared CPU) slows programs down
        ideal = modelled.get((run["workload"], run["policy"]))
        if ideal and ideal["mean_completion_s"] > 0 and run["mean_completion_s"] > 0:
            run["vs_model_mean_completion"] = round(
                run["mean_completion_s"] / ideal["mean_completion_s"], 3
            )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if all(r["errors"] == 0 for r in report["runs"]) else 1


# -- printing -------------------------------------------------------------------------


def _f(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


#: The three printed tables: (title, [(column, cell of a run's row)]).
TABLES: list[tuple[str, list[tuple[str, Callable[[dict[str, Any]], str]]]]] = [
    (
        "programs: completion time (CT, s from arrival to last answer) and fairness",
        [
            (
                "done",
                lambda r: (
                    str(r["completed"])
                    if r["completed"] == r["programs"]
                    else f"{r['completed']}/{r['programs']}"
                ),
            ),
            ("peak alive", lambda r: str(r["peak_concurrent"])),
            ("mean CT", lambda r: _f(r["mean_completion_s"], 2)),
            ("p95 CT", lambda r: _f(r["p95_completion_s"], 2)),
            (
                "long CT",
                lambda r: (
                    _f(r["mean_completion_long_s"], 2) if r["mean_completion_long_s"] else "-"
                ),
            ),
            ("Jain", lambda r: _f(r["jain"], 3)),
            (
                "÷ model",
                lambda r: (
                    _f(r["vs_model_mean_completion"], 2) if "vs_model_mean_completion" in r else "-"
                ),
            ),
        ],
    ),
    (
        "calls: throughput, time to first token, context switches",
        [
            ("out tok/s", lambda r: _f(r["tokens_per_s"])),
            ("TTFT ms", lambda r: _f(1000 * r["mean_ttft_s"])),
            ("p95 TTFT ms", lambda r: _f(1000 * r["p95_ttft_s"])),
            ("preempt", lambda r: _f(r["preemptions"])),
            ("switch tok", lambda r: _f(r["switch_prefill_tokens"])),
            ("% prefill", lambda r: _f(r["switch_prefill_pct"], 1)),
        ],
    ),
    (
        "the kernel's own cost (CPU from /proc/<pid>/stat, RSS growth at peak)",
        [
            ("loop µs/call", lambda r: _f(r["kernel_loop_cpu_us_per_call"])),
            ("process µs/call", lambda r: _f(r["kernel_cpu_us_per_call"])),
            ("process µs/token", lambda r: _f(r["kernel_cpu_us_per_output_token"])),
            ("KiB/program", lambda r: _f(r["kernel_rss_kib_per_process"], 1)),
        ],
    ),
]


MODEL_TITLE = (
    "the ideal model: the same programs and policies in virtual time, no kernel "
    "(oracle: shortest remaining program first, told each program's length: a bound, not a policy)"
)
MODEL_COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("mean CT", lambda r: _f(r["mean_completion_s"], 2)),
    ("p95 CT", lambda r: _f(r["p95_completion_s"], 2)),
    (
        "long CT",
        lambda r: _f(r["mean_completion_long_s"], 2) if r["mean_completion_long_s"] else "-",
    ),
    ("× fifo mean", lambda r: _f(r.get("mean_speedup", 0), 2)),
    ("× fifo p95", lambda r: _f(r.get("p95_speedup", 0), 2)),
    ("TTFT ms", lambda r: _f(1000 * r["mean_ttft_s"])),
    ("preempt", lambda r: _f(r["preemptions"])),
    ("out tok/s", lambda r: _f(r["tokens_per_s"])),
]


def _table(
    title: str,
    columns: list[tuple[str, Callable[[dict[str, Any]], str]]],
    runs: list[dict[str, Any]],
) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("workload")
    t.add_column("policy")
    for name, _ in columns:
        t.add_column(name, justify="right")
    previous = None
    for r in runs:
        if previous is not None and r["workload"] != previous:
            t.add_section()
        t.add_row(
            r["workload"] if r["workload"] != previous else "",
            r["policy"],
            *(cell(r) for _, cell in columns),
        )
        previous = r["workload"]
    return t


def print_report(report: dict[str, Any]) -> None:
    """Rich tables (programs, calls, kernel cost), then the speed-ups over fifo."""
    out = Console()
    svc = report["service_model"] or {}
    setting = ", ".join(f"{k}={v}" for k, v in report["driver_options"].items()) or "defaults"
    out.print(
        f"[bold]llmos bench sched[/] — driver [bold]{report['driver']}[/] ({setting}), "
        f"{report['slots']} slots, seed {report['seed']}; one request alone: prefill "
        f"{svc.get('prefill_tokens_per_s', 0):,.0f} tok/s, "
        f"decode {svc.get('decode_tokens_per_s', 0):,.1f} tok/s ({svc.get('source', '?')})"
    )
    if report["driver"] == "sim":
        out.print(
            "[dim]sim is a simulator: no model, a fixed token rate per slot and a prefill cost per "
            "prompt token (drivers/sim.py)[/]"
        )
    out.print(f"max_tokens: {report['max_tokens']}")
    for wl, meta in report["workloads"].items():
        load = (
            f", offered load {meta['offered_load']:.1f}× the slots"
            if "offered_load" in meta
            else ""
        )
        out.print(
            f"[bold]{wl}[/]: {meta['programs']} programs, {meta['calls']} calls, Poisson arrivals "
            f"{meta.get('arrivals_per_s', 0):g}/s{load} — {meta['description']}"
        )
    for title, columns in TABLES:
        out.print(_table(title, columns, report["runs"]))
    if report.get("model"):
        out.print(_table(MODEL_TITLE, MODEL_COLUMNS, report["model"]))
    for wl, s in report["speedup_vs_fifo"].items():
        best = f"best {s['best_policy']} {s['best_mean_speedup']:.2f}× mean completion vs fifo"
        if "policy" in s:
            best = (
                f"default policy {s['policy']}: {s['mean_speedup']:.2f}× mean, "
                f"{s['p95_speedup']:.2f}× p95 completion vs fifo; {best}"
            )
        out.print(f"{wl}: {best}")
    for r in report["runs"]:
        if r["errors"]:
            out.print(
                f"[red]{r['workload']} · {r['policy']}: {r['errors']} program(s) failed[/]: "
                f"{r['first_error']}"
            )
