"""Kernel-wide counters for monitoring (sys.stat, llmos top): token rates and totals,
and the host figures (CPU, memory, the kernel process itself).

Everything here is called on the kernel's event loop and must never block: psutil reads
``/proc`` files (microseconds) and every CPU percentage is computed against the sample
kept from the previous call, never by sleeping for an interval.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import psutil

#: Two CPU samples closer than this give a meaningless percentage: the previous figure
#: is reported again instead (several monitors polling at once do not zero each other).
MIN_CPU_SAMPLE_S = 0.2


class RateMeter:
    """Events per second over a sliding window, plus the all-time total."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.total = 0
        self.started = time.monotonic()
        self._events: deque[tuple[float, int]] = deque()
        self._in_window = 0

    def add(self, n: int, now: float | None = None) -> None:
        """Count ``n`` events (ignored unless positive)."""
        if n <= 0:
            return
        now = time.monotonic() if now is None else now
        self.total += n
        self._events.append((now, n))
        self._in_window += n
        self._expire(now)

    def rate(self, now: float | None = None) -> float:
        """Events per second over the last ``window_s`` seconds (over the meter's whole
        life while it is younger than the window, so a fresh kernel is not under-reported)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        span = max(min(self.window_s, now - self.started), 1.0)
        return self._in_window / span

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._in_window -= self._events.popleft()[1]


@dataclass(frozen=True, slots=True)
class HostSample:
    """The host and the kernel process at one moment (see :meth:`HostMeter.sample`)."""

    cpus: int
    cpu_percent: float  # system-wide, 0..100, since the previous sample
    load_avg: tuple[float, float, float]
    mem_total: int
    mem_available: int
    kernel_rss: int
    kernel_cpu_s: float  # user + system seconds of the kernel process
    kernel_cpu_percent: float  # of one core, 0..100*cpus, since the previous sample

    def as_dict(self) -> dict[str, Any]:
        """The sample as plain values (for the sys.stat result)."""
        return {name: getattr(self, name) for name in self.__slots__}


class HostMeter:
    """Non-blocking host figures: each sample's CPU percentages cover the time since the
    previous sample (or since the meter was made, for the first)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._proc = psutil.Process(self._pid)
        self.cpus = psutil.cpu_count() or 1
        self._last_at = time.monotonic()
        self._last_sys = psutil.cpu_times()
        self._last_proc = self._proc_cpu_s()
        self._sys_pct = 0.0
        self._proc_pct = 0.0

    def _proc_cpu_s(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    def sample(self) -> HostSample:
        """Read the host now; never sleeps."""
        if os.getpid() != self._pid:  # forked: measure this process, start afresh
            self._reset()
        now = time.monotonic()
        sys_times, proc_cpu = psutil.cpu_times(), self._proc_cpu_s()
        elapsed = now - self._last_at
        if elapsed >= MIN_CPU_SAMPLE_S:
            self._sys_pct = _busy_percent(self._last_sys, sys_times)
            self._proc_pct = round(max(proc_cpu - self._last_proc, 0.0) / elapsed * 100, 1)
            self._last_at, self._last_sys, self._last_proc = now, sys_times, proc_cpu
        mem = psutil.virtual_memory()
        load = psutil.getloadavg()
        return HostSample(
            cpus=self.cpus,
            cpu_percent=self._sys_pct,
            load_avg=(round(load[0], 2), round(load[1], 2), round(load[2], 2)),
            mem_total=int(mem.total),
            mem_available=int(mem.available),
            kernel_rss=int(self._proc.memory_info().rss),
            kernel_cpu_s=round(proc_cpu, 3),
            kernel_cpu_percent=min(self._proc_pct, 100.0 * self.cpus),
        )


def _total(t: Any) -> float:
    """All CPU time in a ``psutil.cpu_times()`` sample. On Linux guest time is already
    counted in user/nice, so it is left out (as psutil and htop do)."""
    total = sum(t)
    return total - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _busy_percent(before: Any, after: Any) -> float:
    """System-wide busy share between two ``psutil.cpu_times()`` samples, 0..100."""
    total = _total(after) - _total(before)
    idle = (after.idle - before.idle) + (
        getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0)
    )
    if total <= 0:
        return 0.0
    return round(min(max((total - idle) / total * 100, 0.0), 100.0), 1)


class KernelStats:
    """What the kernel has done: prompt tokens prefilled, output tokens generated; and
    the host it runs on."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.prompt = RateMeter(window_s)
        self.output = RateMeter(window_s)
        self.cached = 0  # prompt tokens drivers reused from their prefix caches
        self.host = HostMeter()
        self.prompt_by_model: dict[str, int] = {}  # totals per model (the metrics)
        self.output_by_model: dict[str, int] = {}

    def add_prompt(self, n: int, model: str = "") -> None:
        """Count ``n`` prompt tokens read by ``model``'s driver."""
        self.prompt.add(n)
        if n > 0:
            self.prompt_by_model[model] = self.prompt_by_model.get(model, 0) + n

    def add_output(self, n: int, model: str = "") -> None:
        """Count ``n`` output tokens generated by ``model``'s driver."""
        self.output.add(n)
        if n > 0:
            self.output_by_model[model] = self.output_by_model.get(model, 0) + n
