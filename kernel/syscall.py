"""Syscall dispatch: frame in -> decode -> authenticate -> validate -> handler -> reply.

Like xv6's syscall.c: the table (name -> handler) is data, built from the ABI's
table plus one handler per row; an unknown name gets one clear ENOSYS. Synchronous
handlers (table lookups) run inline on the loop; asynchronous ones (generation, wait)
run as tasks under the call's deadline, so none of them can stall another caller.

Calls in flight (the asynchronous ones) are a shared table too: the kernel holds at
most ``max_calls`` of them, the last sixteenth for the admin; a process at most its
``max_calls_in_flight`` limit (default MAX_CALLS_IN_FLIGHT_PER_PROCESS), and a program
at most its share (its ``max_calls_in_flight`` program limit, or a quarter). A call
beyond is EAGAIN naming the bound, before any work is done for it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from kernel.audit import AUDITED
from kernel.process import Caller
from syscalls import codec, limits
from syscalls.errors import Errno, SyscallError
from syscalls.table import SYSCALLS, SyscallSpec

if TYPE_CHECKING:
    from kernel.kernel import Kernel

log = logging.getLogger("llmos.kernel")

Handler = Callable[..., Any]
Send = Callable[[bytes, bytes], None]


@dataclass(eq=False)
class Call:
    """One syscall in flight: who asked, its deadline, how to stream back to it."""

    id: int
    name: str
    caller: Caller
    deadline: float  # loop.time() by which the reply must be sent
    identity: bytes  # the ROUTER identity of the client's socket
    send: Send
    seq: int = 0  # chunks sent so far (streaming)
    task: asyncio.Task[None] | None = None
    interrupted: SyscallError | None = field(default=None)  # why it was cancelled, if so
    # tracing (kernel/trace.py): set by the observer when one is on, else left alone
    start_ns: int = 0
    span_id: int = 0  # 0: not traced
    attrs: dict[str, Any] | None = None  # what the handler adds to its span
    links: list[tuple[int, int, str]] | None = None  # (program, span id, kind) it links to

    def chunk(self, data: dict[str, Any]) -> None:
        """Send one streamed chunk to the caller."""
        self.send(self.identity, codec.chunk_frame(self.id, self.seq, data))
        self.seq += 1

    def origin(self) -> tuple[int, int] | None:
        """This call's span as others link to it: ``(program, span id)``; None untraced."""
        proc = self.caller.proc
        if not self.span_id or proc is None:
            return None
        return proc.program.pgid, self.span_id

    def link(self, origin: tuple[int, int] | None, kind: str) -> None:
        """Link this call's span to the span ``origin`` (see :meth:`origin`) as ``kind``."""
        if origin is not None and self.span_id:
            if self.links is None:
                self.links = []
            self.links.append((origin[0], origin[1], kind))

    def note(self, key: str, value: str | int | float | bool) -> None:
        """Add an attribute to this call's span (names, sizes, times: never contents)."""
        if self.span_id:
            if self.attrs is None:
                self.attrs = {}
            self.attrs[key] = value

    def interrupt(self, error: SyscallError) -> None:
        """Cancel this call; its caller receives ``error`` at once."""
        if self.task is not None and not self.task.done() and self.interrupted is None:
            self.interrupted = error
            self.task.cancel()


@dataclass(frozen=True, slots=True)
class Entry:
    """A row of the kernel's dispatch table."""

    spec: SyscallSpec
    handler: Handler
    is_async: bool
    empty: BaseModel | None  # the validated no-argument value, when {} is valid (fast path)


def build_table(handlers: dict[str, Handler]) -> dict[str, Entry]:
    """Join the ABI's table with the kernel's handlers; every syscall needs exactly one."""
    missing = set(SYSCALLS) - set(handlers)
    extra = set(handlers) - set(SYSCALLS)
    if missing or extra:
        raise RuntimeError(f"syscall table mismatch: missing handlers {missing}, unknown {extra}")
    return {
        name: Entry(
            spec, handlers[name], inspect.iscoroutinefunction(handlers[name]), _empty(spec.args)
        )
        for name, spec in SYSCALLS.items()
    }


def _empty(model: type[BaseModel]) -> BaseModel | None:
    try:
        return model.model_validate({})
    except ValidationError:
        return None


#: An internal error is logged (with its traceback) at most once per this many seconds for
#: each peer and syscall; the next line says how many were left out meanwhile.
LOG_INTERVAL_S = 60.0
#: Peers remembered between lines; past this, every other peer shares one entry.
_LOG_PEERS = 1024


class LogThrottle:
    """Once per peer per interval: what the dispatcher logs about hostile input, so a
    flood of bad frames grows the log by a bounded amount (never by one line a frame)."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S, max_keys: int = _LOG_PEERS) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._seen: dict[tuple[bytes, str], list[float]] = {}  # key -> [logged at, left out]

    def allow(self, peer: bytes, kind: str) -> int | None:
        """None: leave this one out; else log it, with how many were left out before."""
        now = time.monotonic()
        key = (peer, kind)
        entry = self._seen.get(key)
        if entry is None and len(self._seen) >= self.max_keys:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval_s}
            if len(self._seen) >= self.max_keys:
                key = (b"*", kind)
                entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.interval_s:
            entry[1] += 1
            return None
        self._seen[key] = [now, 0]
        return 0 if entry is None else int(entry[1])


class Dispatcher:
    """Turns request frames into handler calls and handler outcomes into reply frames."""

    def __init__(self, kernel: Kernel, table: dict[str, Entry], send: Send) -> None:
        self.kernel = kernel
        self.table = table
        self.send = send
        self.calls: set[Call] = set()  # async calls in flight
        self.max_calls = limits.MAX_CALLS_IN_FLIGHT
        self.by_program: dict[int, int] = {}  # program id -> its async calls in flight
        self.accepting = True
        self.observer = kernel.observer  # spans and metrics (kernel/trace.py), None: off
        self.throttle = LogThrottle()

    def _log_internal(self, peer: bytes, name: str) -> None:
        """Log the exception being handled, once per peer and call per interval."""
        left_out = self.throttle.allow(peer, name)
        if left_out is not None:
            more = f" ({left_out} more from this peer left out)" if left_out else ""
            log.exception("internal error handling %s%s", name, more)

    def on_frames(self, parts: list[bytes]) -> None:
        """Handle one ROUTER message: ``[identity, frame]``. Never raises."""
        identity = parts[0]
        rid: int | None = None
        try:
            if len(parts) != 2:
                raise SyscallError(
                    Errno.EPROTO, f"expected one frame per request, got {len(parts) - 1}"
                )
            try:
                req = codec.decode_request(parts[1])
            except SyscallError:
                rid = _salvage(parts[1])
                raise
            rid = req.id
            self._dispatch(identity, req)
        except SyscallError as err:
            self.send(identity, codec.error_reply(rid, err))
        except Exception:  # a kernel bug must not take the kernel down
            self._log_internal(identity, "a frame")
            self.send(
                identity,
                codec.error_reply(
                    rid, SyscallError(Errno.EIO, "internal kernel error; see the kernel log")
                ),
            )

    def _dispatch(self, identity: bytes, req: codec.Request) -> None:
        if not self.accepting:
            raise SyscallError(Errno.ESHUTDOWN, "the kernel is shutting down")
        entry = self.table.get(req.call)
        if entry is None:
            raise SyscallError(
                Errno.ENOSYS, f"no syscall named {req.call!r} (see `llmos syscalls`)"
            )
        try:
            caller = self.kernel.authenticate(req.pid, req.token, entry.spec)
        except SyscallError as err:
            if err.code is Errno.EACCES:
                self.kernel.audit.auth_failure(identity)
            raise
        budget_ms = req.deadline_ms or (
            limits.DEFAULT_GENERATE_DEADLINE_MS if entry.spec.chunk else limits.DEFAULT_DEADLINE_MS
        )
        loop = asyncio.get_running_loop()
        call = Call(req.id, req.call, caller, loop.time() + budget_ms / 1000, identity, self.send)
        obs = self.observer
        if obs is not None:
            obs.begin(call)
        try:
            args = (
                entry.empty
                if not req.args and entry.empty is not None
                else _validate(entry.spec.args, req.args)
            )
        except SyscallError as err:
            if obs is not None:
                obs.end(call, None, err)
            raise
        if not entry.is_async:
            try:
                result = entry.handler(self.kernel, call, args)
            except SyscallError as err:
                self._audit(call, args, err.code)
                if obs is not None:
                    obs.end(call, args, err)
                raise
            except Exception:  # answered EIO by on_frames; audited like the async path
                self._audit(call, args, Errno.EIO)
                if obs is not None:
                    obs.end(call, args, _INTERNAL)
                raise
            self._audit(call, args, "ok")
            self.send(identity, _fits(req.id, req.call, codec.ok_reply(req.id, _dump(result))))
            if obs is not None:
                obs.end(call, args, result)
            return
        self._admit(caller)
        call.task = loop.create_task(self._run(entry, call, args), name=f"{req.call}#{req.id}")
        call.task.add_done_callback(lambda _: self._unstarted(entry, call, args))
        self.calls.add(call)
        self.kernel.track(call)
        if caller.proc is not None:
            pgid = caller.proc.program.pgid
            self.by_program[pgid] = self.by_program.get(pgid, 0) + 1

    def _admit(self, caller: Caller) -> None:
        """EAGAIN if ``caller`` may not have one more call in flight (see the module doc)."""
        total = len(self.calls)
        if total >= self.max_calls:
            raise SyscallError(
                Errno.EAGAIN,
                f"the kernel has {total} calls in flight, the most it takes; try again shortly",
            )
        proc = caller.proc
        if proc is None:
            return
        reserve = max(1, self.max_calls // 16)
        if total >= self.max_calls - reserve:
            raise SyscallError(
                Errno.EAGAIN,
                f"the kernel has {total} calls in flight; the last {reserve} of "
                f"{self.max_calls} are kept for the admin; try again shortly",
            )
        mine = self.kernel.calls_in_flight(proc.pid)
        bound = proc.account.limits.max_calls_in_flight or limits.MAX_CALLS_IN_FLIGHT_PER_PROCESS
        if mine >= bound:
            raise SyscallError(
                Errno.EAGAIN,
                f"process {proc.pid} has {mine} calls in flight, the most it may "
                f"(max_calls_in_flight={bound}); wait for some to finish",
            )
        program = proc.program
        share = program.account.limits.max_calls_in_flight or max(1, self.max_calls // 4)
        held = self.by_program.get(program.pgid, 0)
        if held >= share:
            raise SyscallError(
                Errno.EAGAIN,
                f"program {program.pgid} has {held} calls in flight, its share of the kernel's "
                f"(max_calls_in_flight={share}); wait for some to finish",
            )

    def _release(self, call: Call) -> bool:
        """``call`` is no longer in flight; False if it already was not."""
        if call not in self.calls:
            return False
        self.calls.discard(call)
        self.kernel.untrack(call)
        proc = call.caller.proc
        if proc is not None:
            pgid = proc.program.pgid
            left = self.by_program[pgid] - 1
            if left:
                self.by_program[pgid] = left
            else:
                del self.by_program[pgid]
        return True

    def _unstarted(self, entry: Entry, call: Call, args: BaseModel) -> None:
        # A task cancelled before its first step never runs _run (not even its finally):
        # a kill in the same transport batch as the call. Answer it here instead.
        if not self._release(call):
            return  # _run finished and replied
        if call.interrupted is not None:
            self.send(
                call.identity,
                codec.error_reply(
                    call.id, call.interrupted, call.seq if entry.spec.chunk else None
                ),
            )
            if self.observer is not None:
                self.observer.end(call, args, call.interrupted)

    async def _run(self, entry: Entry, call: Call, args: BaseModel) -> None:
        outcome: Any = _INTERNAL
        try:
            try:
                async with asyncio.timeout_at(call.deadline):
                    result = await entry.handler(self.kernel, call, args)
                outcome = result
                frame = _fits(
                    call.id,
                    call.name,
                    codec.ok_reply(call.id, _dump(result), call.seq if entry.spec.chunk else None),
                )
            except TimeoutError:
                raise SyscallError(
                    Errno.ETIMEDOUT, f"{call.name} did not finish before its deadline"
                ) from None
            except asyncio.CancelledError:
                if call.interrupted is None:
                    raise  # kernel shutdown: stop() answers the caller
                raise call.interrupted from None
            self._audit(call, args, "ok")
        except SyscallError as err:
            self._audit(call, args, err.code)
            outcome = err
            frame = codec.error_reply(call.id, err, call.seq if entry.spec.chunk else None)
        except Exception:
            self._audit(call, args, Errno.EIO)
            self._log_internal(call.identity, call.name)
            frame = codec.error_reply(
                call.id,
                SyscallError(
                    Errno.EIO, f"internal kernel error in {call.name}; see the kernel log"
                ),
            )
        finally:
            self._release(call)
        self.send(call.identity, frame)
        if self.observer is not None:
            self.observer.end(call, args, outcome)

    def _audit(self, call: Call, args: BaseModel, outcome: str) -> None:
        """One audit row for a call of an audited syscall (who, what, which, result)."""
        if call.name in AUDITED:
            detail = self.kernel.audit_detail(call.name, args, call.caller)
            self.kernel.audit.record(call.caller, call.name, str(outcome), args, detail)

    async def shutdown(self) -> None:
        """Refuse new calls; answer every call in flight with ESHUTDOWN."""
        self.accepting = False
        pending = list(self.calls)
        for call in pending:
            call.interrupt(SyscallError(Errno.ESHUTDOWN, "the kernel is shutting down"))
        tasks = [c.task for c in pending if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)


def _fits(call_id: int, name: str, frame: bytes) -> bytes:
    """A reply no client could decode (over the codec's frame limit) becomes E2BIG."""
    if len(frame) <= limits.MAX_FRAME_BYTES:
        return frame
    return codec.error_reply(
        call_id,
        SyscallError(
            Errno.E2BIG,
            f"the result of {name} is {len(frame)} bytes, over the "
            f"{limits.MAX_FRAME_BYTES}-byte frame limit: ask for less (a page, a limit)",
        ),
    )


#: What a span records for a handler that raised something other than a SyscallError.
_INTERNAL = SyscallError(Errno.EIO, "internal kernel error")


def _salvage(frame: bytes) -> int | None:
    try:
        return codec.salvage_id(codec.unpackb(frame))
    except SyscallError:
        return None


def _validate(model: type[BaseModel], args: dict[str, Any]) -> BaseModel:
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        raise SyscallError(Errno.EINVAL, codec.describe_validation(exc, model=model)) from None


def _dump(result: BaseModel | dict[str, Any] | None) -> dict[str, Any]:
    if result is None:
        return {}
    if isinstance(result, BaseModel):
        return result.model_dump(mode="python")
    return result
