"""Prometheus metrics: ``--metrics 127.0.0.1:PORT`` serves the kernel's figures as
Prometheus text (``prometheus-client``) on a registry of its own (no global state).

The HTTP server runs in its own threads (prometheus-client's WSGI server), never on the
loop. Two kinds of figure:

* **per call**, fed by the dispatcher's observer (kernel/trace.py) in the observer's
  thread: syscalls by name and errno (counter) and their latency (histogram), quota
  refusals by limit; a scrape first drains the observer's queue so they are current;
* **state**, read at scrape time: the HTTP thread asks the loop for a snapshot (a few
  dict reads, one ``call_soon_threadsafe``) and waits for it at most
  :data:`SNAPSHOT_TIMEOUT_S`: tokens in/out per model, slots busy/total per model, the
  run queue per model and state, preemptions, processes by state; the store's queue
  depth (two counters) and commit latency (a histogram the store thread observes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from syscalls.errors import SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel
    from kernel.trace import Observer

log = logging.getLogger("llmos.metrics")

#: A scrape waits this long for the loop's snapshot before leaving those figures out.
SNAPSHOT_TIMEOUT_S = 2.0
#: Latency buckets (seconds): a null syscall's tens of µs to a long generation's minutes.
CALL_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

_ADDRESS = re.compile(r"(?:(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]*):)?(?P<port>\d{1,5})")


class MetricsError(RuntimeError):
    """The metrics server cannot start (its address is taken, or not this host's)."""


def metrics_address(text: str) -> tuple[str, int]:
    """``--metrics``'s value as ``(host, port)``: ``[HOST:]PORT`` with an IP address (or
    ``localhost``) and a port 1-65535; no host means loopback (127.0.0.1). ValueError
    with the reason otherwise."""
    found = _ADDRESS.fullmatch(text.strip())
    if found is None:
        raise ValueError(
            f"--metrics {text!r}: expected [HOST:]PORT, e.g. 127.0.0.1:9464 (HOST an IP "
            "address or localhost; no HOST: 127.0.0.1)"
        )
    host = (found.group("host") or "127.0.0.1").strip("[]")
    port = int(found.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"--metrics {text!r}: the port must be 1-65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"--metrics {text!r}: {host!r} is not an IP address (or localhost)"
            ) from None
    return host, port


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


class _Registry(CollectorRegistry):
    """The kernel's own registry: each scrape first brings the per-call figures up to date."""

    def __init__(self, metrics: KernelMetrics) -> None:
        super().__init__(auto_describe=True)
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        observer = self._metrics.observer
        if observer is not None:
            try:
                observer.drain()
            except Exception:
                log.exception("draining the observer for a scrape failed")
        yield from super().collect()


class KernelMetrics:
    """The kernel's Prometheus registry and, once started, its HTTP server at ``address``."""

    def __init__(self, kernel: Kernel, address: tuple[str, int]) -> None:
        self.kernel = kernel
        self.address = address
        self.observer: Observer | None = None  # set by the kernel: drained at each scrape
        self.registry = _Registry(self)
        r = self.registry
        self.syscalls = Counter(
            "llmos_syscalls", "Syscalls answered, by name and errno (ok: success)",
            ["syscall", "errno"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "llmos_syscall_duration_seconds", "Syscall latency in the kernel, receipt to reply",
            ["syscall"], buckets=CALL_BUCKETS, registry=r,
        )  # fmt: skip
        self.quota = Counter(
            "llmos_quota_refusals", "Calls refused with EDQUOT, by the limit they hit",
            ["limit"], registry=r,
        )  # fmt: skip
        self.commit = Histogram(
            "llmos_store_commit_seconds",
            "State-database transactions, from being queued to committed",
            buckets=COMMIT_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_StateCollector(self))
        self._counted: dict[tuple[str, str], Any] = {}  # label children, by their labels
        self._timed: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None

    # -- feeds (other threads) ------------------------------------------------------------
    def on_call(self, name: str, errno: str, seconds: float, err: SyscallError | None) -> None:
        """One answered call (the observer's thread)."""
        from kernel.trace import quota_limit

        counter = self._counted.get((name, errno))
        if counter is None:  # labels() takes a lock and builds a key: once per pair
            counter = self._counted[(name, errno)] = self.syscalls.labels(name, errno)
        counter.inc()
        latency = self._timed.get(name)
        if latency is None:
            latency = self._timed[name] = self.latency.labels(name)
        latency.observe(seconds)
        if errno == "EDQUOT":
            self.quota.labels(quota_limit(err)).inc()

    def on_commit(self, seconds: float) -> None:
        """One committed transaction (the store thread)."""
        self.commit.observe(seconds)

    # -- life ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve ``/metrics`` at the address (OSError if it cannot be bound)."""
        from prometheus_client import start_http_server

        self._loop = loop
        host, port = self.address
        if not is_loopback(host):
            log.warning(
                "metrics on %s:%d are served to anyone who can reach it (no authentication)",
                host,
                port,
            )
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {host}:{port}: {exc}") from None
        log.info("metrics at http://%s:%d/metrics", host, port)

    def close(self) -> None:
        """Stop serving (blocking: call it off the loop)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- the snapshot -------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The state figures, read on the loop (a few dict reads)."""
        k = self.kernel
        states: dict[str, int] = {}
        for proc in k.procs:
            states[proc.state.value] = states.get(proc.state.value, 0) + 1
        sched = k.scheduler
        return {
            "prompt": dict(k.stats.prompt_by_model),
            "output": dict(k.stats.output_by_model),
            "cached": k.stats.cached,
            "models": {
                name: (sched.load(name).slots, sched.busy(name), sched.queue_states(name))
                for name in k.drivers
            },
            "preempted": dict(sched.preempted),
            "procs": states,
        }

    def loop_snapshot(self) -> dict[str, Any] | None:
        """:meth:`snapshot` taken on the kernel's loop, from another thread; None if the
        loop does not answer in time."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return None
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def take() -> None:
            try:
                fut.set_result(self.snapshot())
            except BaseException as exc:
                fut.set_exception(exc)

        try:
            loop.call_soon_threadsafe(take)
            return fut.result(timeout=SNAPSHOT_TIMEOUT_S)
        except (RuntimeError, concurrent.futures.TimeoutError):
            return None
        except Exception:
            log.exception("taking the metrics snapshot failed")
            return None


class _StateCollector:
    """The state figures, from the loop's snapshot at each scrape."""

    def __init__(self, metrics: KernelMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # collected fresh at every scrape, nothing to pre-declare

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        depth = GaugeMetricFamily(
            "llmos_store_queue_depth", "State-database transactions queued or running"
        )
        depth.add_metric([], m.kernel.store.depth)
        yield depth
        obs = m.observer
        if obs is not None:
            spans = CounterMetricFamily(
                "llmos_trace_spans_exported", "Spans handed to the trace exporters"
            )
            spans.add_metric([], obs.exported)
            yield spans
            dropped = CounterMetricFamily(
                "llmos_trace_records_dropped",
                "Syscall records dropped because the observer's thread fell behind",
            )
            dropped.add_metric([], obs.dropped)
            yield dropped
        snap = m.loop_snapshot()
        if snap is None:
            return
        tokens_in = CounterMetricFamily(
            "llmos_prompt_tokens", "Prompt tokens prefilled by the model's driver", labels=["model"]
        )
        tokens_out = CounterMetricFamily(
            "llmos_output_tokens", "Output tokens generated", labels=["model"]
        )
        slots = GaugeMetricFamily(
            "llmos_slots", "Sequences a model decodes at once", labels=["model"]
        )
        busy = GaugeMetricFamily(
            "llmos_slots_busy", "Slots held by a process now", labels=["model"]
        )
        queue = GaugeMetricFamily(
            "llmos_run_queue", "Processes waiting for a slot, by state", labels=["model", "state"]
        )
        preempt = CounterMetricFamily(
            "llmos_preemptions", "Slots the scheduler took back mid-generation", labels=["model"]
        )
        for name, (total, held, waiting) in snap["models"].items():
            tokens_in.add_metric([name], snap["prompt"].get(name, 0))
            tokens_out.add_metric([name], snap["output"].get(name, 0))
            slots.add_metric([name], total)
            busy.add_metric([name], held)
            for state in ("READY", "STOPPED"):
                queue.add_metric([name, state], waiting.get(state, 0))
            preempt.add_metric([name], snap["preempted"].get(name, 0))
        procs = GaugeMetricFamily("llmos_processes", "Processes by state", labels=["state"])
        for state in ("NEW", "READY", "RUNNING", "WAITING", "STOPPED", "ZOMBIE"):
            procs.add_metric([state], snap["procs"].get(state, 0))
        cached = CounterMetricFamily(
            "llmos_cached_prompt_tokens", "Prompt tokens drivers reused from their prefix caches"
        )
        cached.add_metric([], snap["cached"])
        yield from (tokens_in, tokens_out, cached, slots, busy, queue, preempt, procs)
