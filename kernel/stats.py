"""Kernel-wide counters for monitoring (sys.stat, llmos top): token rates and totals."""

from __future__ import annotations

import time
from collections import deque


class RateMeter:
    """Events per second over a sliding window, plus the all-time total."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.total = 0
        self._events: deque[tuple[float, int]] = deque()
        self._in_window = 0

    def add(self, n: int, now: float | None = None) -> None:
        if n <= 0:
            return
        now = time.monotonic() if now is None else now
        self.total += n
        self._events.append((now, n))
        self._in_window += n
        self._expire(now)

    def rate(self, now: float | None = None) -> float:
        """Events per second over the last ``window_s`` seconds."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        return self._in_window / self.window_s

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._in_window -= self._events.popleft()[1]


class KernelStats:
    """What the kernel has done: prompt tokens prefilled, output tokens generated."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.prompt = RateMeter(window_s)
        self.output = RateMeter(window_s)

    def add_prompt(self, n: int) -> None:
        self.prompt.add(n)

    def add_output(self, n: int) -> None:
        self.output.add(n)
