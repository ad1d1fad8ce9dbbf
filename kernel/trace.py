"""Tracing and the syscall observer: every syscall a program's processes make becomes
an OpenTelemetry span, in one trace per program.

The dispatcher (kernel/syscall.py) calls :meth:`Observer.begin` when a call starts and
:meth:`Observer.end` when it is answered. On the loop that is all that happens: a start
time, a span id from a counter, and a tuple appended to a bounded deque (about a
microsecond; building an OpenTelemetry SDK span there costs ~25 µs, over the 10 µs budget
of a null syscall, see docs/BENCHMARKS.md). The observer's own thread drains the deque
every :data:`FLUSH_S`: it feeds the syscall metrics (kernel/metrics.py) and turns each
record into an SDK :class:`~opentelemetry.sdk.trace.ReadableSpan` for the exporters —
:class:`FileSpanExporter` (the state directory, bounded and rotated, 0600: what
``llmos trace`` reads) and, with ``--otlp-endpoint``, the OTLP/HTTP exporter behind the
SDK's ``BatchSpanProcessor`` (its own thread, its own bounded queue).

The tree of a program's trace:

* the admin's ``proc.spawn`` that started the program is the root;
* each process is a span (``process N``: spawn to exit) under the ``proc.spawn`` span
  that made it; its syscalls are its children;
* a served tool's ``tool.next`` and ``tool.reply`` link to the caller's ``tool.call``
  span, an ``ipc.recv`` links to the ``ipc.send`` (or ``ipc.publish``) of the message it
  got (OpenTelemetry span links: the server may be in another program's trace).

Spans carry names, pids, sizes, counts and durations: never arguments, prompts, file
contents, message bodies, tool results, credentials or error messages (which may quote
input); an error is its errno.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags

from syscalls.errors import SyscallError

if TYPE_CHECKING:
    from kernel.process import Proc
    from kernel.syscall import Call

log = logging.getLogger("llmos.trace")

#: The observer's thread drains the loop's records this often (seconds).
FLUSH_S = 0.25
#: The thread lets the loop run (releases the GIL) after this many records.
YIELD_EVERY = 32
#: Records waiting for the thread, at most; beyond, new ones are dropped and counted.
MAX_PENDING = 65536
#: A trace file rotates at this size, keeping this many old ones (spans.jsonl.1, ...).
FILE_MAX_BYTES, FILE_BACKUPS = 8 << 20, 4
#: Spawn spans remembered for the process spans of processes still alive, at most.
MAX_SPAWNED = 65536
#: The name of the traces folder in the state directory and of its files.
TRACE_DIR, TRACE_FILE = "traces", "spans.jsonl"

_MASK64 = (1 << 64) - 1
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = Status(StatusCode.OK)
_FAILED = Status(StatusCode.ERROR)
#: Syscalls that block by design: their whole duration is a wait (shown as such).
BLOCKING = frozenset({"ipc.recv", "tool.next", "proc.wait"})
_QUOTA_LIMIT = re.compile(r"over its quota: ([a-z_]+)=")


class TraceIds:
    """Trace and span ids that need no table: a program's trace id and a process's span
    id are functions of the pid and a salt kept in the traces folder (so they stay the
    same across kernel restarts); syscall spans count up from a random 32-bit prefix
    chosen at each start."""

    def __init__(self, salt: int) -> None:
        self.salt = salt & _MASK64 or 1
        self.boot = (secrets.randbits(31) | 1 << 31) << 32

    @classmethod
    def in_dir(cls, folder: Path | None) -> TraceIds:
        """The ids of the traces kept in ``folder`` (its ``salt`` file made on first use)."""
        if folder is None:
            return cls(secrets.randbits(64))
        path = folder / "salt"
        with contextlib.suppress(OSError, ValueError):
            return cls(int(path.read_text().strip(), 16))
        salt = secrets.randbits(64)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{salt:016x}\n")
        return cls(salt)

    def trace(self, program: int) -> int:
        """The trace id of program ``program`` (128 bits: the salt, then the program id)."""
        return self.salt << 64 | program

    def process(self, pid: int) -> int:
        """The span id of process ``pid``'s own span."""
        return ((pid * 0x9E3779B97F4A7C15) ^ self.salt) & _MASK64 or 1


def _errno(outcome: object) -> str:
    return str(outcome.code) if isinstance(outcome, SyscallError) else "ok"


class Observer:
    """The dispatcher's hook: cheap records on the loop, spans and metrics off it.

    ``folder``: where :class:`FileSpanExporter` writes (None: no trace files);
    ``trace``: build spans at all (False: metrics only); ``otlp_endpoint``: also export
    to that OTLP/HTTP collector; ``on_call``: called in the observer's thread with
    ``(syscall, errno, seconds, error)`` per call (the metrics)."""

    def __init__(
        self,
        folder: Path | None,
        trace: bool = True,
        otlp_endpoint: str | None = None,
        on_call: Callable[[str, str, float, SyscallError | None], None] | None = None,
        version: str = "",
    ) -> None:
        self.trace = trace
        self.folder = folder
        if folder is not None:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ids = TraceIds.in_dir(folder)
        self.on_call = on_call
        self.max_pending = MAX_PENDING
        self.dropped = 0  # records refused because the thread fell behind
        self.exported = 0  # spans handed to the exporters
        self._count = itertools.count(1)
        self._q: collections.deque[tuple[Any, Any, Any, int]] = collections.deque()
        self._spawned: dict[int, tuple[int, int]] = {}  # child pid -> (program, spawn span)
        self._statuses: dict[str, Status] = {}
        self._parents: dict[int, SpanContext] = {}  # pid -> its process span's context
        self._lock = threading.Lock()  # one drain at a time (the thread, or a scrape)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exporters: list[Any] = []
        self._processors: list[Any] = []
        self._version = version
        self._resource: Any = None
        self._scope: Any = None
        if trace:
            self._setup_otel(otlp_endpoint)

    def _setup_otel(self, otlp_endpoint: str | None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self._resource = Resource.create(
            {
                "service.name": "llmos-kernel",
                "service.version": self._version,
                "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
            }
        )
        self._scope = InstrumentationScope("llmos.kernel", self._version)
        if self.folder is not None:
            self._exporters.append(FileSpanExporter(self.folder))
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            self._processors.append(
                BatchSpanProcessor(
                    OTLPSpanExporter(endpoint=otlp_traces_url(otlp_endpoint), timeout=5),
                    max_queue_size=8192,
                    schedule_delay_millis=1000,
                )
            )

    # -- the loop's side ---------------------------------------------------------------
    def begin(self, call: Call) -> None:
        """A call starts: its start time and span id (and what llm.generate measures)."""
        call.start_ns = time.time_ns()
        call.span_id = self.ids.boot | (next(self._count) & 0xFFFFFFFF)
        if call.name == "llm.generate" and (proc := call.caller.proc) is not None:
            call.attrs = {"_w": proc.wait_s, "_p": proc.preemptions, "_o": proc.output_tokens}

    def end(self, call: Call, args: Any, outcome: Any) -> None:
        """A call was answered with ``outcome`` (its result, or the SyscallError)."""
        if call.name == "llm.generate" and (proc := call.caller.proc) is not None and call.attrs:
            a = call.attrs
            a["llmos.queue_wait_s"] = round(proc.wait_s - a.pop("_w"), 6)
            a["llmos.preemptions"] = proc.preemptions - a.pop("_p")
            a["gen_ai.usage.output_tokens"] = proc.output_tokens - a.pop("_o")
            a["gen_ai.request.model"] = proc.model
        if len(self._q) >= self.max_pending:
            self.dropped += 1
            return
        self._q.append((call, args, outcome, time.time_ns()))

    def exited(self, proc: Proc) -> None:
        """Process ``proc`` exited: its own span ends now."""
        if not self.trace:
            return
        if len(self._q) >= self.max_pending:
            self.dropped += 1
            return
        info = (proc.pid, proc.program.pgid, proc.name, proc.created, proc.exit_status)
        self._q.append((None, info, proc.signal, time.time_ns()))

    # -- the thread's side -------------------------------------------------------------
    def start(self) -> None:
        """Start the observer's thread."""
        self._thread = threading.Thread(target=self._loop, name="llmos-trace", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(FLUSH_S):
            try:
                self.drain()
            except Exception:  # the kernel goes on without its traces
                log.exception("exporting spans failed")

    def drain(self) -> int:
        """Process every record queued so far (thread-safe); how many there were."""
        with self._lock:
            q, n = self._q, 0
            spans: list[ReadableSpan] = []
            for _ in range(len(q)):  # what is queued now: a busy loop cannot keep it here
                call, args, outcome, end_ns = q.popleft()
                n += 1
                if not n % YIELD_EVERY:
                    time.sleep(0)  # give the GIL back: the loop never waits a switch interval
                if call is None:
                    spans.append(self._process_span(args, outcome, end_ns))
                    continue
                if self.on_call is not None:
                    err = outcome if isinstance(outcome, SyscallError) else None
                    self.on_call(call.name, _errno(outcome), (end_ns - call.start_ns) / 1e9, err)
                if self.trace and (span := self._span(call, args, outcome, end_ns)) is not None:
                    spans.append(span)
            if spans:
                for exporter in self._exporters:
                    exporter.export(spans)
                for processor in self._processors:
                    for span in spans:
                        processor.on_end(span)
                self.exported += len(spans)
            return n

    def close(self) -> None:
        """Stop the thread, export what is left, flush and shut the exporters (blocking:
        call it off the loop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.drain()
        except Exception:
            log.exception("exporting the last spans failed")
        for processor in self._processors:
            processor.shutdown()
        for exporter in self._exporters:
            exporter.shutdown()

    # -- spans -------------------------------------------------------------------------
    def _ctx(self, program: int, span_id: int) -> SpanContext:
        return SpanContext(self.ids.salt << 64 | program, span_id, False, _SAMPLED)

    def _status(self, errno: str) -> Status:
        status = self._statuses.get(errno)
        if status is None:
            status = self._statuses[errno] = Status(StatusCode.ERROR, errno)
        return status

    def _span(self, call: Call, args: Any, outcome: Any, end_ns: int) -> ReadableSpan | None:
        errno = _errno(outcome)
        proc = call.caller.proc
        if proc is None:  # the admin: only the spawn that starts a program is its trace's
            if call.name != "proc.spawn" or errno != "ok":
                return None
            program, parent = outcome.pid, None
        else:
            program = proc.program.pgid
            parent = self._parents.get(proc.pid)
            if parent is None:  # made once per process (forgotten at its exit)
                if len(self._parents) >= MAX_SPAWNED:
                    self._parents.clear()
                parent = self._parents[proc.pid] = self._ctx(program, self.ids.process(proc.pid))
        attrs: dict[str, Any] = {
            "llmos.syscall": call.name,
            "llmos.pid": call.caller.pid,
            "llmos.program": program,
        }
        if call.attrs:
            attrs.update(call.attrs)
        if errno != "ok":
            attrs["llmos.errno"] = errno
        elif call.name in BLOCKING:
            attrs["llmos.wait_s"] = round((end_ns - call.start_ns) / 1e9, 6)
        extract = _EXTRACT.get(call.name)
        if extract is not None and args is not None:  # None: the arguments were invalid
            with contextlib.suppress(Exception):  # a kernel bug here costs attributes only
                extract(attrs, args, outcome if errno == "ok" else None)
        if call.name == "proc.spawn" and errno == "ok":
            self._remember_spawn(outcome.pid, program, call.span_id)
        links = (
            [Link(self._ctx(p, s), {"llmos.link": kind}) for p, s, kind in call.links]
            if call.links
            else ()
        )
        return ReadableSpan(
            call.name,
            context=self._ctx(program, call.span_id),
            parent=parent,
            resource=self._resource,
            attributes=attrs,
            links=links,
            status=self._status(errno) if errno != "ok" else _OK,
            start_time=call.start_ns,
            end_time=end_ns,
            instrumentation_scope=self._scope,
        )

    def _remember_spawn(self, pid: int, program: int, span_id: int) -> None:
        spawned = self._spawned
        if len(spawned) >= MAX_SPAWNED:
            spawned.pop(next(iter(spawned)))
        spawned[pid] = (program, span_id)

    def _process_span(self, info: tuple[Any, ...], signal: str | None, end_ns: int) -> Any:
        pid, program, name, created, status = info
        made = self._spawned.pop(pid, None)
        self._parents.pop(pid, None)
        attrs: dict[str, Any] = {
            "llmos.pid": pid,
            "llmos.program": program,
            "llmos.process": name,
            "llmos.exit_status": -1 if status is None else status,
        }
        if signal:
            attrs["llmos.signal"] = signal
        return ReadableSpan(
            f"process {pid}",
            context=self._ctx(program, self.ids.process(pid)),
            parent=self._ctx(made[0], made[1]) if made is not None else None,
            resource=self._resource,
            attributes=attrs,
            status=_OK if status == 0 else _FAILED,
            start_time=min(int(created * 1e9), end_ns),
            end_time=end_ns,
            instrumentation_scope=self._scope,
        )


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of ``endpoint``: a bare collector address gets the
    standard ``/v1/traces`` path (as OTEL_EXPORTER_OTLP_ENDPOINT does)."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def check_otlp_endpoint(endpoint: str) -> None:
    """ValueError unless ``endpoint`` is an http(s) URL with a host (and no credentials:
    they would end up in logs)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(endpoint)
        _ = parts.port  # a port that is not a number raises here
    except ValueError as exc:
        raise ValueError(f"--otlp-endpoint {endpoint!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"--otlp-endpoint {endpoint!r}: expected an http(s) URL of an OTLP/HTTP "
            "collector, e.g. http://127.0.0.1:4318"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(
            f"--otlp-endpoint: give the collector's URL without credentials, query or "
            f"fragment (got {parts.scheme}://…{parts.path})"
        )


# -- what each syscall's span says (names, sizes, counts; never contents) ---------------
def _fs(attrs: dict[str, Any], a: Any, r: Any) -> None:
    for key in ("path", "src"):
        if isinstance(getattr(a, key, None), str):
            attrs["llmos.fs.path"] = getattr(a, key)
            break
    content = getattr(a, "content", None)
    if isinstance(content, str | bytes):
        attrs["llmos.bytes"] = len(content)


def _generate(attrs: dict[str, Any], a: Any, r: Any) -> None:
    attrs["llmos.stream"] = bool(a.stream)
    if a.tools:
        attrs["llmos.tools"] = len(a.tools)
    if r is not None:
        attrs["gen_ai.usage.input_tokens"] = r.usage.prompt_tokens
        attrs["gen_ai.usage.output_tokens"] = r.usage.output_tokens
        attrs["llmos.cached_tokens"] = r.usage.cached_tokens
        attrs["gen_ai.response.finish_reasons"] = (r.finish_reason,)
        if r.tool_calls:
            attrs["llmos.tool_calls"] = len(r.tool_calls)


def _spawn(attrs: dict[str, Any], a: Any, r: Any) -> None:
    attrs["llmos.process"] = a.name
    if a.model:
        attrs["gen_ai.request.model"] = a.model
    if r is not None:
        attrs["llmos.child"] = r.pid


def _tool_call(attrs: dict[str, Any], a: Any, r: Any) -> None:
    attrs["llmos.tool"] = a.name
    attrs["llmos.bytes"] = len(json.dumps(a.args, default=str))


def _tool_next(attrs: dict[str, Any], a: Any, r: Any) -> None:
    if r is not None and r.id is not None:
        attrs.update({"llmos.tool": r.name, "llmos.tool.caller": r.caller, "llmos.tool.id": r.id})


def _tool_reply(attrs: dict[str, Any], a: Any, r: Any) -> None:
    attrs["llmos.tool.id"] = a.id
    if a.error is not None:
        attrs["llmos.tool.error"] = True


def _send(attrs: dict[str, Any], a: Any, r: Any) -> None:
    attrs["llmos.ipc.peer"] = a.pid
    if r is not None:
        attrs["llmos.ipc.message"] = r.id


def _recv(attrs: dict[str, Any], a: Any, r: Any) -> None:
    if r is not None and r.message is not None:
        attrs["llmos.ipc.peer"] = r.message.sender
        attrs["llmos.ipc.message"] = r.message.id
        if r.message.topic is not None:
            attrs["llmos.ipc.topic"] = r.message.topic


def _publish(attrs: dict[str, Any], a: Any, r: Any) -> None:
    attrs["llmos.ipc.topic"] = a.topic
    if r is not None:
        attrs["llmos.ipc.message"] = r.id
        attrs["llmos.ipc.delivered"] = r.delivered


def _target(attrs: dict[str, Any], a: Any, r: Any) -> None:
    if getattr(a, "pid", None) is not None:
        attrs["llmos.target"] = a.pid


_EXTRACT: dict[str, Callable[[dict[str, Any], Any, Any], None]] = {
    "llm.generate": _generate,
    "proc.spawn": _spawn,
    "proc.wait": _target,
    "proc.kill": _target,
    "tool.call": _tool_call,
    "tool.next": _tool_next,
    "tool.reply": _tool_reply,
    "ipc.send": _send,
    "ipc.recv": _recv,
    "ipc.publish": _publish,
    **{
        f"fs.{n}": _fs
        for n in ("read", "write", "append", "list", "stat", "mkdir", "remove", "rename")
    },
    **{f"fs.{n}": _fs for n in ("history", "rollback")},
}


def quota_limit(err: SyscallError | None) -> str:
    """The limit an EDQUOT names (``max_output_tokens``...), or ``other``."""
    found = _QUOTA_LIMIT.search(err.message) if err is not None else None
    return found.group(1) if found else "other"


# -- the default exporter: JSON lines in the state directory ----------------------------
class FileSpanExporter:
    """An OpenTelemetry ``SpanExporter`` writing one JSON line per span to
    ``folder/spans.jsonl`` (0600), rotated at :data:`FILE_MAX_BYTES` with
    :data:`FILE_BACKUPS` old files kept: at most ~40 MiB of traces on disk."""

    def __init__(
        self, folder: Path, max_bytes: int = FILE_MAX_BYTES, backups: int = FILE_BACKUPS
    ) -> None:
        self.path = folder / TRACE_FILE
        self.max_bytes, self.backups = max_bytes, backups
        self._fd: int | None = None
        self._size = 0
        self._hexes: dict[int, str] = {}

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.fchmod(self._fd, 0o600)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._size = 0
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{TRACE_FILE}.{i}")
            if src.exists():
                src.replace(self.path.with_name(f"{TRACE_FILE}.{i + 1}"))
        if self.path.exists():
            self.path.replace(self.path.with_name(f"{TRACE_FILE}.1"))

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        """Append the spans, rotating first whenever the next piece would pass the bound."""
        hexes = self._hexes
        lines = [orjson.dumps(span_record(s, hexes)) + b"\n" for s in spans]
        try:
            start = 0
            while start < len(lines):
                fd = self._open()  # knows the size of a file left by an earlier start
                room = self.max_bytes - self._size
                end, size = start, 0
                while end < len(lines) and size + len(lines[end]) <= room:
                    size += len(lines[end])
                    end += 1
                if end == start:  # the file is full (or one line is over the bound)
                    if self._size:
                        self._rotate()
                        continue
                    end, size = start + 1, len(lines[start])
                os.write(fd, b"".join(lines[start:end]))
                self._size += size
                start = end
        except OSError as exc:
            log.error("cannot write traces to %s: %s", self.path, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_record(span: ReadableSpan, hexes: dict[int, str] | None = None) -> dict[str, Any]:
    """A span as one line of a trace file (``hexes``: a cache of trace ids in hex). It
    reads the SDK span's fields directly: its properties copy (links, attributes)."""
    ctx, parent, status, links = span._context, span._parent, span._status, span._links
    assert ctx is not None
    trace_id = ctx.trace_id
    trace = hexes.get(trace_id) if hexes is not None else None
    if trace is None:
        trace = f"{trace_id:032x}"
        if hexes is not None:
            if len(hexes) > 4096:
                hexes.clear()
            hexes[trace_id] = trace
    attrs = span._attributes
    return {
        "trace": trace,
        "span": f"{ctx.span_id:016x}",
        "parent": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span._name,
        "start": span._start_time,
        "end": span._end_time,
        "status": "ok"
        if status.status_code is not StatusCode.ERROR
        else (status.description or "ERROR"),
        "attrs": attrs if type(attrs) is dict else dict(attrs or {}),
        "links": [
            {
                "trace": f"{link.context.trace_id:032x}",
                "span": f"{link.context.span_id:016x}",
                "kind": (link.attributes or {}).get("llmos.link", ""),
            }
            for link in links
        ]
        if links
        else [],
    }


# -- reading traces back (llmos trace) --------------------------------------------------
def trace_files(folder: Path) -> list[Path]:
    """The trace files in ``folder``, oldest first."""
    olds = sorted(
        folder.glob(f"{TRACE_FILE}.*"),
        key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
    )
    return [p for p in (*olds, folder / TRACE_FILE) if p.is_file()]


def read_spans(
    folder: Path, keep: Callable[[dict[str, Any]], bool] | None = None
) -> Iterator[dict[str, Any]]:
    """Every span in ``folder``'s trace files (oldest first) that ``keep`` accepts; a
    torn or foreign line is skipped."""
    for path in trace_files(folder):
        with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    span = json.loads(line)
                except ValueError:
                    continue
                if (
                    isinstance(span, dict)
                    and isinstance(span.get("attrs"), dict)
                    and (keep is None or keep(span))
                ):
                    yield span


def program_spans(folder: Path, program: int) -> list[dict[str, Any]]:
    """The spans of program ``program``'s trace."""
    return list(read_spans(folder, lambda s: s["attrs"].get("llmos.program") == program))


def find_program(folder: Path, ref: str) -> int | None:
    """The program ``ref`` names: the program of pid ``ref``, or the latest program whose
    first process is named ``ref``."""
    if ref.isdigit():
        pid = int(ref)
        for span in read_spans(folder, lambda s: s["attrs"].get("llmos.pid") == pid):
            return int(span["attrs"]["llmos.program"])
        return None
    found = None
    for span in read_spans(
        folder,
        lambda s: s["name"] == "proc.spawn" and s["parent"] is None,
    ):
        if span["attrs"].get("llmos.process") == ref:
            found = int(span["attrs"]["llmos.program"])
    return found


def tree(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The spans of one trace as a forest: each node its span plus ``children`` (by start
    time) and ``linked`` (spans elsewhere that link to it: a served tool's ``tool.next``/
    ``tool.reply``, the ``ipc.recv`` of a message it sent). A span whose parent is not in
    the files (a process still alive: its span ends at exit) hangs under a stand-in node
    ``{"name": "process N", "open": true}``."""
    nodes = {s["span"]: {**s, "children": [], "linked": []} for s in spans}
    roots: list[dict[str, Any]] = []
    for node in list(nodes.values()):
        parent = node["parent"]
        if parent is None:
            roots.append(node)
            continue
        if parent not in nodes:  # an open process span: stand in for it
            pid = node["attrs"].get("llmos.pid")
            nodes[parent] = {
                "trace": node["trace"],
                "span": parent,
                "parent": None,
                "name": f"process {pid}",
                "start": node["start"],
                "end": None,
                "status": "ok",
                "attrs": {"llmos.pid": pid, "llmos.program": node["attrs"].get("llmos.program")},
                "links": [],
                "open": True,
                "children": [],
                "linked": [],
            }
            roots.append(nodes[parent])
        stand_in = nodes[parent]
        stand_in["children"].append(node)
        if stand_in.get("open"):
            stand_in["start"] = min(stand_in["start"], node["start"])
    for node in nodes.values():
        for link in node.get("links", ()):
            target = nodes.get(link["span"])
            if target is not None:
                target["linked"].append(
                    {k: node[k] for k in ("span", "name", "start", "end", "status", "attrs")}
                    | {"kind": link["kind"]}
                )
    # An open process whose spawn span is known: hang it under that spawn span.
    for root in list(roots):
        if root.get("open"):
            pid = root["attrs"].get("llmos.pid")
            spawn = next(
                (
                    n
                    for n in nodes.values()
                    if n["name"] == "proc.spawn" and n["attrs"].get("llmos.child") == pid
                ),
                None,
            )
            if spawn is not None:
                root["parent"] = spawn["span"]
                root["attrs"]["llmos.process"] = spawn["attrs"].get("llmos.process")
                spawn["children"].append(root)
                roots.remove(root)
    for node in nodes.values():
        node["children"].sort(key=lambda n: n["start"])
        node["linked"].sort(key=lambda n: n["start"])
    roots.sort(key=lambda n: n["start"])
    return roots


def subtree(roots: list[dict[str, Any]], pid: int) -> list[dict[str, Any]]:
    """The nodes of process ``pid``'s own span in a forest (its spawn span when there is
    one, so the tree says who made it)."""
    out: list[dict[str, Any]] = []

    def walk(node: dict[str, Any]) -> None:
        if node["name"] == "proc.spawn" and node["attrs"].get("llmos.child") == pid:
            out.append(node)
            return
        if node["name"] == f"process {pid}":
            out.append(node)
            return
        for child in node["children"]:
            walk(child)

    for root in roots:
        walk(root)
    return out
