"""Quotas: limits set at spawn, charged per process and per program.

A *program* is a top-level process and all its descendants (``llmos run`` gives each
agent program one). Each process and each program has an :class:`Account`; a call is
charged to both. Limits are inherited downwards and can only narrow: a child never
gets more than its parent. Exceeding one is ``EDQUOT`` naming the limit.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, fields

from syscalls.errors import Errno, SyscallError


@dataclass(frozen=True, slots=True)
class Limits:
    """Ceilings of one account; ``None`` means unlimited."""

    max_output_tokens: int | None = None  # output tokens over the account's life
    max_context_tokens: int | None = None  # prompt tokens of any one generation
    max_wall_s: float | None = None  # seconds since the account was opened
    max_calls_per_min: int | None = None  # llm.generate calls in any 60 s
    max_procs: int | None = None  # processes (zombies too) the program holds at once
    # Shares of the kernel's other shared tables (a program's; a process's for calls):
    max_ipc_bytes: int | None = None  # bytes of its messages queued in mailboxes
    max_topics: int | None = None  # topics it subscribes to or owns
    max_parked: int | None = None  # its tool calls waiting for confirmation
    max_calls_in_flight: int | None = None  # its asynchronous syscalls in flight

    def narrowed(self, asked: Limits, who: str) -> Limits:
        """``asked`` with unset fields inherited from ``self``; EPERM if it asks for more."""
        out = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(asked, f.name)
            if theirs is None:
                out[f.name] = mine
            elif mine is not None and theirs > mine:
                raise SyscallError(
                    Errno.EPERM,
                    f"{f.name}={theirs} exceeds {who}'s own limit of {mine}; "
                    "a child never gets more",
                )
            else:
                out[f.name] = theirs
        return Limits(**out)

    def as_dict(self) -> dict[str, int | float]:
        """The limits that are set."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}


@dataclass(eq=False)
class Account:
    """Usage charged against one :class:`Limits` (a process's or a program's)."""

    name: str  # "process 7" / "program 3": who is over quota, in error messages
    limits: Limits = field(default_factory=Limits)
    opened: float = field(default_factory=time.monotonic)
    output_tokens: int = 0
    service_s: float = 0.0  # time on a slot: the attained service the fair policy ranks by
    reserved: int = 0  # output tokens promised to generations in flight
    calls: deque[float] = field(default_factory=deque)
    exceeded: str | None = None  # the last limit hit, shown by ps

    def _over(self, limit: str, detail: str) -> SyscallError:
        self.exceeded = limit
        value = getattr(self.limits, limit)
        return SyscallError(
            Errno.EDQUOT, f"{self.name} is over its quota: {limit}={value} ({detail})"
        )

    def wall_left(self, now: float | None = None) -> float | None:
        """Seconds until max_wall_s runs out (None: no wall limit)."""
        if self.limits.max_wall_s is None:
            return None
        return self.limits.max_wall_s - ((time.monotonic() if now is None else now) - self.opened)

    def wall_exceeded(self) -> SyscallError:
        """The EDQUOT error for running out of wall time."""
        return self._over("max_wall_s", f"it has run {time.monotonic() - self.opened:.1f} s")

    def admit_call(self, now: float | None = None) -> None:
        """Charge one generate call: EDQUOT if out of wall time or over the call rate."""
        now = time.monotonic() if now is None else now
        left = self.wall_left(now)
        if left is not None and left <= 0:
            raise self.wall_exceeded()
        rate = self.limits.max_calls_per_min
        if rate is not None:
            while self.calls and now - self.calls[0] >= 60.0:
                self.calls.popleft()
            if len(self.calls) >= rate:
                raise self._over(
                    "max_calls_per_min", f"retry in {60.0 - (now - self.calls[0]):.1f} s"
                )
            self.calls.append(now)

    def check_context(self, prompt_tokens: int) -> None:
        limit = self.limits.max_context_tokens
        if limit is not None and prompt_tokens > limit:
            raise self._over("max_context_tokens", f"this prompt is {prompt_tokens} tokens")

    def reserve(self, want: int) -> int:
        """Promise up to ``want`` output tokens to a generation; EDQUOT if none are left."""
        limit = self.limits.max_output_tokens
        if limit is None:
            return want
        left = limit - self.output_tokens - self.reserved
        if left <= 0:
            raise self._over("max_output_tokens", f"{self.output_tokens} used")
        grant = min(want, left)
        self.reserved += grant
        return grant

    def charge(self, n: int) -> None:
        """Output tokens just generated (charged as they come, so usage is live)."""
        self.output_tokens += n
        if self.limits.max_output_tokens is not None:
            self.reserved -= n  # they were promised at reserve()

    def settle(self, granted: int, used: int) -> None:
        """A generation of ``used`` (already charged) tokens ended: release the rest of
        its promise."""
        if self.limits.max_output_tokens is not None:
            self.reserved -= granted - used
