"""The OpenAI-compatible driver: one or more HTTP servers are the driver's slots.

Each *endpoint* is an OpenAI-compatible server (``vllm serve`` on another machine,
llama.cpp's server, any compatible endpoint) with a *capacity*: how many sequences the
driver may run on it at once. The driver's slots are the endpoints' capacities summed.
This is how a user outgrows one machine: many vLLM servers, one kernel.

Shape (after the vLLM driver):

* :class:`OpenAIDriver` is the front end on the kernel's asyncio loop. It tokenises
  prompts locally with the model's own tokenizer and chat template (the folder given
  by ``--model``), so ``count_tokens`` and ``prompt_tokens`` agree exactly, and reads
  finished :class:`Delta` items from a per-request ``asyncio.Queue``.
* :class:`_Pool` lives on one dedicated thread with its own asyncio loop (the *I/O
  loop*): the ``httpx.AsyncClient``, each endpoint's state and load, a background health
  check, and one pump task per request. Keeping HTTP and detokenisation there lets the
  driver serve any event loop (the kernel's, or a fresh one per call in tests).
* A pump sends the prompt as token ids to ``/completions`` (streamed; vLLM's
  ``return_token_ids`` asks for the generated ids back), turns the ids into text with the
  CPU driver's incremental detokeniser and stop-string matcher, and hands deltas to the
  front end (the per-request stream is ``drivers.stream``'s, shared with the vLLM
  driver). If the endpoint fails (cannot connect, HTTP 5xx, the stream breaks, a read
  times out) the endpoint is marked down and the pump goes on from the tokens already
  received, on another endpoint: the caller sees one stream, no token twice.
* Placement is policy apart from mechanism: :func:`pick_endpoint` (a pure function)
  chooses the healthy endpoint with the least utilisation after placing, ``(a_i+1)/R_i``,
  never above capacity -- the allocation rule: spread a demand ``D`` over endpoints of
  capacity ``R_i`` with ``sum(a_i) = D`` and ``0 <= a_i <= R_i`` (:func:`allocate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from drivers.base import (
    Delta,
    DriverError,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    Progress,
)
from drivers.loopthread import LoopThread
from drivers.routing import (
    HEALTH_GAUGES,
    RouteHints,
    RouterSpec,
    healthy_workers,
    parse_router,
    route_fields,
    router_capacity,
)

# Shared with the CPU and vLLM drivers so every driver cuts text, stop strings and
# resumes alike.
from drivers.stream import StreamTable, TokenStream, submit
from drivers.text import PromptEncoder as _PromptEncoder
from drivers.text import TokenizingDriver, load_tokenizer
from drivers.text import resolve_model_dir as _resolve_model_dir

if TYPE_CHECKING:
    import httpx
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("llmos.driver.openai")
T = TypeVar("T")

#: Where endpoints come from when the ``endpoints`` option is not given.
ENDPOINTS_ENV = "LLMOS_OPENAI_ENDPOINTS"
#: ``vllm serve``'s default address.
DEFAULT_ENDPOINT = "http://127.0.0.1:8000/v1"
#: Environment variables read for the API key (first set wins) when ``api_key`` is not given.
API_KEY_ENVS = ("LLMOS_OPENAI_API_KEY", "OPENAI_API_KEY")
#: The context window assumed when neither the servers nor the model folder give one.
FALLBACK_CONTEXT = 2048
#: Seconds between health checks of a down endpoint: doubles from the first to the last.
BACKOFF_S = (1.0, 30.0)
#: Router mode: seconds before retrying a request a replica behind the router failed
#: (doubles from the first to the last), so the router's health check can notice first.
ROUTER_RETRY_S = (0.5, 4.0)
#: What to do when the model folder's tokenizer does not load.
_TOKENIZER_HINT = (
    "The openai driver tokenises locally: pass --model the folder of the model the servers serve."
)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One configured endpoint: its base URL (ending in ``/v1`` as a rule) and capacity."""

    url: str
    capacity: int


def parse_endpoints(
    endpoints: str | Sequence[str],
    capacity: int | str | Sequence[int] | None = None,
    default_capacity: int = 4,
) -> tuple[EndpointSpec, ...]:
    """Endpoints from the driver's options.

    ``endpoints``: URLs, as a list or one comma-separated string; ``URL#N`` gives that
    endpoint capacity N. ``capacity``: one number for every endpoint, or one per endpoint
    (a list or ``"8,4"``). An endpoint with neither gets ``default_capacity`` (the
    kernel's ``--slots``). A URL without a path gets ``/v1``. Raises ValueError saying
    what is wrong.
    """
    items = (
        [u.strip() for u in endpoints.split(",")] if isinstance(endpoints, str) else list(endpoints)
    )
    items = [u for u in items if u]
    if not items:
        raise ValueError("endpoints is empty; give at least one URL, e.g. http://127.0.0.1:8000/v1")
    capacities = _capacities(capacity, len(items))
    specs: list[EndpointSpec] = []
    for i, item in enumerate(items):
        url, own = _parse_url(item)
        if own is not None and capacities is not None:
            raise ValueError(
                f"endpoint {item!r} has a capacity of its own (#N) and the capacity option "
                f"gives one too; use one of the two"
            )
        cap = (
            own
            if own is not None
            else capacities[i]
            if capacities is not None
            else default_capacity
        )
        if cap < 1:
            raise ValueError(f"capacity of {url} must be at least 1, got {cap}")
        if any(s.url == url for s in specs):
            raise ValueError(f"endpoint {url} is listed twice")
        specs.append(EndpointSpec(url, cap))
    return tuple(specs)


def _capacities(capacity: int | str | Sequence[int] | None, count: int) -> list[int] | None:
    if capacity is None:
        return None
    if isinstance(capacity, bool):
        raise ValueError(f"capacity must be a number or a list of numbers, got {capacity!r}")
    if isinstance(capacity, int):
        return [capacity] * count
    parts = capacity.split(",") if isinstance(capacity, str) else list(capacity)
    try:
        values = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(
            f"capacity must be whole numbers, e.g. capacity=8 or capacity=8,4; got {capacity!r}"
        ) from None
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"capacity lists {len(values)} numbers for {count} endpoints")
    return values


def _parse_url(item: str) -> tuple[str, int | None]:
    """``URL[#N]`` -> (normalised URL, capacity or None)."""
    parts = urlsplit(item)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint {item!r} is not an http(s) URL like http://host:8000/v1")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"endpoint {item!r} has a bad port") from None
    if parts.query:
        raise ValueError(f"endpoint {item!r} has a query string; give the base URL only")
    own: int | None = None
    if parts.fragment:
        try:
            own = int(parts.fragment)
        except ValueError:
            raise ValueError(
                f"endpoint {item!r}: the part after # must be its capacity, a whole number"
            ) from None
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", "")), own


def _metrics_url(item: str) -> str:
    """A router's metrics URL (``http://host:29000``: ``/metrics`` is added)."""
    parts = urlsplit(item)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise ValueError(f"metrics {item!r} is not an http(s) URL like http://router:29000/metrics")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"metrics {item!r} has a bad port") from None
    path = parts.path.rstrip("/") or "/metrics"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


# --------------------------------------------------------------------------- placement


def pick_endpoint(load: Sequence[int], capacity: Sequence[int]) -> int | None:
    """Where one more sequence goes: the index of the endpoint whose utilisation after
    placing, ``(a_i + 1) / R_i``, is least (ties: the larger capacity, then the first), or
    None when every endpoint is full. Never places above capacity (``a_i < R_i``).

    Placing sequences one at a time this way fills endpoints in proportion to their
    capacities, as far as whole sequences allow: see :func:`allocate`.
    """
    best: int | None = None
    for i, (a, r) in enumerate(zip(load, capacity, strict=True)):
        if a >= r:
            continue
        if best is None:
            best = i
            continue
        # (a+1)/r < (b+1)/s, compared without division.
        b, s = load[best], capacity[best]
        mine, theirs = (a + 1) * s, (b + 1) * r
        if mine < theirs or (mine == theirs and r > s):
            best = i
    return best


def allocate(demand: int, capacity: Sequence[int]) -> list[int]:
    """The allocation rule: spread ``demand`` sequences over endpoints of ``capacity``,
    ``a_i`` with ``sum(a_i) = min(demand, sum(capacity))`` and ``0 <= a_i <= R_i``, by
    placing them one at a time with :func:`pick_endpoint`. For every demand the result
    has the lowest possible highest utilisation ``max(a_i / R_i)`` (tested against brute
    force), so no endpoint is loaded more, relative to its size, than it must be."""
    load = [0] * len(capacity)
    for _ in range(max(demand, 0)):
        i = pick_endpoint(load, capacity)
        if i is None:
            break
        load[i] += 1
    return load


# --------------------------------------------------------------------------- endpoints


class EndpointState(enum.Enum):
    """Health of an endpoint. ``UNKNOWN`` until its first check."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class EndpointView:
    """A snapshot of one endpoint (``OpenAIDriver.endpoints()``)."""

    url: str
    capacity: int
    state: EndpointState
    load: int
    #: Most sequences it ever ran at once (never above ``capacity``).
    peak: int
    #: Why it is down (the last failure), else "".
    error: str
    #: The served model's context window as the endpoint reports it (None: not reported).
    max_model_len: int | None
    #: False once the endpoint streamed text without token ids: its resumes are approximate.
    exact: bool
    #: Requests that moved off this endpoint after it failed them.
    failures: int
    #: Router mode with a metrics endpoint: its healthy workers (None: not reported).
    workers: int | None = None
    #: The capacity in force now: ``capacity``, bounded by the router's healthy workers.
    room: int | None = None


@dataclass(eq=False)
class _Endpoint:
    """An endpoint's live state; only the I/O loop touches it."""

    spec: EndpointSpec
    state: EndpointState = EndpointState.UNKNOWN
    load: int = 0
    peak: int = 0
    error: str = ""
    #: Model ids the endpoint serves -> their context window (None if not reported).
    models: dict[str, int | None] = field(default_factory=dict)
    next_check: float = 0.0
    backoff: float = BACKOFF_S[0]
    exact: bool = True
    failures: int = 0
    #: Router mode: healthy workers per the router's metrics (None: not known).
    workers: int | None = None
    #: The capacity in force (``spec.capacity`` unless the router's metrics bound it).
    room: int = -1

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def capacity(self) -> int:
        return self.spec.capacity if self.room < 0 else self.room

    def view(self, served: str | None) -> EndpointView:
        return EndpointView(
            self.url,
            self.spec.capacity,
            self.state,
            self.load,
            self.peak,
            self.error,
            self.models.get(served) if served is not None else None,
            self.exact,
            self.failures,
            self.workers,
            self.capacity,
        )


class _EndpointFailed(Exception):
    """The endpoint, not the request, failed: mark it down and go on elsewhere.

    ``unreachable``: the endpoint itself could not be reached (as opposed to an answer
    or a stream that failed). Behind a router only that marks the router down; any
    other failure is a replica's, and the request is retried through the router."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


# --------------------------------------------------------------------------- I/O loop


class _IoLoop(LoopThread):
    """One thread running an asyncio loop; all HTTP work and endpoint state live on it."""

    def __init__(self) -> None:
        super().__init__("llmos-openai-io", join_timeout=30)


@dataclass(eq=False)
class _Stream(TokenStream):
    """One request on the I/O loop, and where it runs. After submission only the I/O
    loop touches it."""

    #: The finish reason the server sent; the usage chunk may still follow it.
    server_finish: FinishReason | None = None
    endpoint: _Endpoint | None = None


@dataclass(frozen=True, slots=True)
class _Settings:
    """The driver's network options, as the pool uses them."""

    served_model: str | None
    api_key: str | None
    return_token_ids: bool
    connect_timeout: float
    read_timeout: float
    health_interval: float
    retries: int
    queue_timeout: float
    #: Router mode: the router's kind and options (None: the endpoints are servers).
    router: RouterSpec | None = None
    #: Router mode: its Prometheus metrics URL, the per-worker health gauge, and the
    #: sequences each healthy worker may run.
    metrics_url: str | None = None
    metrics_gauge: str | None = None
    per_worker: int | None = None


class _Pool:
    """The endpoints, their HTTP client and health, and the live requests (I/O loop)."""

    def __init__(
        self,
        specs: Sequence[EndpointSpec],
        settings: _Settings,
        tokenizer: PreTrainedTokenizerBase,
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        self.endpoints = [_Endpoint(s) for s in specs]
        self.settings = settings
        self.served = settings.served_model
        self.max_context = 0
        self.tokenizer = tokenizer
        self.streams: StreamTable[_Stream] = StreamTable(self._describe)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._changed: asyncio.Condition | None = None
        self._health: asyncio.Task[None] | None = None
        self._metrics: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None

    # -- life

    async def open(self) -> None:
        """Create the HTTP client (on the I/O loop, which it then belongs to)."""
        import httpx

        s = self.settings
        headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(s.read_timeout, connect=s.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            transport=self._transport,
        )
        self._changed = asyncio.Condition()

    async def wait_until_up(self, timeout: float, report: Progress) -> None:
        """Check every endpoint until one is up (then start the background health
        check), or raise DriverError after ``timeout`` seconds naming each one's fault."""
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.gather(
                *(self._check(ep) for ep in self.endpoints if ep.state is not EndpointState.UP)
            )
            up = [ep for ep in self.endpoints if ep.state is EndpointState.UP]
            report(f"{len(up)}/{len(self.endpoints)} endpoints up", None)
            if up:
                break
            if time.monotonic() >= deadline:
                raise DriverError(
                    f"no endpoint answered within {timeout:g} s: {self._faults()}. Start a "
                    f"server (e.g. `vllm serve MODEL`) or check --driver-option endpoints."
                )
            await asyncio.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        lengths = [ep.models.get(self.served or "") for ep in up]
        known = [n for n in lengths if isinstance(n, int) and n > 1]
        self.max_context = min(known) if known else 0
        self._health = asyncio.get_running_loop().create_task(self._health_loop())
        if self.settings.metrics_url is not None:
            await self._read_metrics()
            self._metrics = asyncio.get_running_loop().create_task(self._metrics_loop())

    async def close(self) -> None:
        """End live requests with ``abort``, stop the health check, close the client."""
        for task in (self._health, self._metrics, self._probe):
            if task is not None:
                task.cancel()
        await self.streams.close()
        if self._client is not None:
            await self._client.aclose()

    # -- health

    async def _health_loop(self) -> None:
        """Check each endpoint when it is due: up ones every ``health_interval``, down
        ones with a doubling backoff."""
        while True:
            now = time.monotonic()
            due = [ep for ep in self.endpoints if ep.next_check <= now]
            if due:
                await asyncio.gather(*(self._check(ep) for ep in due))
            wake = min(ep.next_check for ep in self.endpoints)
            await asyncio.sleep(
                min(max(wake - time.monotonic(), 0.05), self.settings.health_interval)
            )

    async def _check(self, ep: _Endpoint) -> bool:
        """GET ``/models`` on ``ep``; mark it up (serving our model) or down. Returns up."""
        assert self._client is not None
        try:
            response = await self._client.get(
                f"{ep.url}/models", timeout=max(self.settings.connect_timeout, 10.0)
            )
            if response.status_code != 200:
                raise _EndpointFailed(
                    f"GET /models answered HTTP {response.status_code}: {_brief(response.text)}"
                )
            models = {
                str(m["id"]): _whole(m.get("max_model_len"))
                for m in response.json().get("data", [])
            }
        except _EndpointFailed as exc:
            if self.settings.router is not None and ep.state is EndpointState.UP:
                # The router answered: it is up; a replica behind it failed the check.
                # Requests it fails are retried through it (and count as failures).
                log.warning("router %s: health check: %s", ep.url, exc)
                ep.next_check = time.monotonic() + self.settings.health_interval
                return True
            self._set_down(ep, str(exc) or type(exc).__name__)
            return False
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._set_down(ep, str(exc) or type(exc).__name__)
            return False
        except Exception as exc:  # noqa: BLE001 - any transport failure means down
            self._set_down(ep, _describe(exc))
            return False
        ep.models = models
        if self.served is None and models:
            self.served = next(iter(models))  # the first endpoint to answer names the model
        if self.served not in models:
            served = ", ".join(models) or "nothing"
            self._set_down(ep, f"does not serve model {self.served!r} (it serves {served})")
            return False
        self._set_up(ep)
        return True

    async def _metrics_loop(self) -> None:
        """Router mode: read the router's metrics every ``health_interval`` (I/O loop;
        the kernel's loop never waits on it)."""
        while True:
            await asyncio.sleep(self.settings.health_interval)
            await self._read_metrics()

    async def _read_metrics(self) -> None:
        """Bound the router endpoint's capacity by its healthy workers × ``per_worker``;
        if the metrics cannot be read, the configured capacity holds."""
        s = self.settings
        assert self._client is not None and s.metrics_url is not None and s.metrics_gauge
        ep = self.endpoints[0]
        try:
            response = await self._client.get(
                s.metrics_url, timeout=max(self.settings.connect_timeout, 10.0)
            )
            if response.status_code != 200:
                raise ValueError(f"GET {s.metrics_url} answered HTTP {response.status_code}")
            workers = healthy_workers(response.text, s.metrics_gauge)
        except Exception as exc:  # noqa: BLE001 - unreadable metrics: configured capacity
            if ep.room >= 0 or ep.workers is not None:
                log.warning("router metrics unreadable (%s); capacity %d as configured",
                            _brief(str(exc) or type(exc).__name__, 160), ep.spec.capacity)  # fmt: skip
            ep.workers, ep.room = None, -1
            self._notify()
            return
        room = router_capacity(ep.spec.capacity, workers, s.per_worker)
        if (workers, room) != (ep.workers, ep.capacity):
            log.info("router %s: %s healthy workers, capacity %d", ep.url, workers, room)
        ep.workers, ep.room = workers, room if workers is not None else -1
        self._notify()

    def _set_up(self, ep: _Endpoint) -> None:
        if ep.state is not EndpointState.UP:
            log.info("endpoint %s is up", ep.url)
        ep.state, ep.error, ep.backoff = EndpointState.UP, "", BACKOFF_S[0]
        ep.next_check = time.monotonic() + self.settings.health_interval
        self._notify()

    def _set_down(self, ep: _Endpoint, reason: str) -> None:
        if ep.state is not EndpointState.DOWN:
            log.warning("endpoint %s is down: %s", ep.url, reason)
            ep.backoff = BACKOFF_S[0]
        else:
            ep.backoff = min(ep.backoff * 2, BACKOFF_S[1])
        ep.state, ep.error = EndpointState.DOWN, reason
        ep.next_check = time.monotonic() + ep.backoff
        self._notify()

    def _notify(self) -> None:
        """Wake requests waiting for room (a slot freed or an endpoint's state changed)."""
        changed = self._changed
        if changed is None:
            return

        async def wake() -> None:
            async with changed:
                changed.notify_all()

        asyncio.get_running_loop().create_task(wake())

    def _faults(self) -> str:
        return "; ".join(f"{ep.url}: {ep.error or ep.state.value}" for ep in self.endpoints)

    # -- placement

    async def _acquire(self) -> _Endpoint:
        """A healthy endpoint with room, its load counted; waits while every healthy one
        is full. Raises DriverError when none is reachable."""
        assert self._changed is not None
        deadline = time.monotonic() + self.settings.queue_timeout
        while True:
            up = [ep for ep in self.endpoints if ep.state is EndpointState.UP]
            if not up:
                await self._probe_all()
                up = [ep for ep in self.endpoints if ep.state is EndpointState.UP]
            if not up:
                raise DriverError(
                    f"no endpoint reachable: {self._faults()}. Start a server or check "
                    f"--driver-option endpoints."
                )
            i = pick_endpoint([ep.load for ep in up], [ep.capacity for ep in up])
            if i is not None:
                ep = up[i]
                ep.load += 1
                ep.peak = max(ep.peak, ep.load)
                return ep
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DriverError(
                    f"every reachable endpoint stayed full for {self.settings.queue_timeout:g} s "
                    f"({self._faults()})."
                )
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))

    def _release(self, ep: _Endpoint) -> None:
        ep.load -= 1
        self._notify()

    async def _probe_all(self) -> None:
        """Check every endpoint now (once, shared by the requests that ask meanwhile)."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(
                _gather(self._check(ep) for ep in self.endpoints)
            )
        await asyncio.shield(self._probe)

    # -- requests

    def start(self, stream: _Stream) -> None:
        """Register ``stream`` and start its pump (I/O loop)."""
        self.streams.start(stream, self._pump)

    def abort(self, request_id: str) -> None:
        """End ``request_id`` now with ``abort``; closing its HTTP stream makes the
        server drop the request (I/O loop)."""
        self.streams.abort(request_id)

    async def _pump(self, stream: _Stream) -> None:
        """Run the request on endpoints until it finishes, moving on when one fails."""
        stream.replay(self.max_context)
        failures = 0
        while not stream.status.is_finished():
            ep = await self._acquire()
            stream.endpoint = ep
            behind_router = False
            try:
                await self._attempt(ep, stream)
            except _EndpointFailed as exc:
                ep.failures += 1
                failures += 1
                # Behind a router a failed answer or stream is a replica's: the router
                # stays up and routes the retry (its health check drops the replica).
                behind_router = self.settings.router is not None and not exc.unreachable
                if not behind_router:
                    self._set_down(ep, str(exc))
                if failures > self.settings.retries:
                    raise DriverError(
                        f"the request failed on {failures} endpoint attempts; the last: "
                        f"{ep.url}: {exc}"
                    ) from None
                log.warning(
                    "request %s: %s failed after %d tokens (%s); continuing %s",
                    stream.request_id,
                    ep.url,
                    len(stream.output_ids),
                    exc,
                    "through the router" if behind_router else "elsewhere",
                )
            finally:
                stream.endpoint = None
                self._release(ep)
            if behind_router:
                lo, hi = ROUTER_RETRY_S
                await asyncio.sleep(min(lo * 2 ** (failures - 1), hi))

    @staticmethod
    def _describe(stream: _Stream, exc: Exception) -> DriverError:
        """The error a request's consumer raises for an unexpected ``exc`` (logged: it
        is a bug here or a server answer this driver does not understand)."""
        log.error("request %s failed", stream.request_id, exc_info=exc)
        return DriverError(f"Generation failed: {type(exc).__name__}: {exc}")

    def _budget(self, ep: _Endpoint, stream: _Stream) -> int:
        """Tokens the endpoint may still generate: what max_tokens and its window leave."""
        budget = stream.request.sampling.max_tokens - len(stream.output_ids)
        windows = [n for n in (ep.models.get(self.served or ""), self.max_context) if n]
        if windows:
            budget = min(budget, min(windows) - len(stream.prompt_ids) - len(stream.output_ids))
        return budget

    async def _attempt(self, ep: _Endpoint, stream: _Stream) -> None:
        """One streamed ``/completions`` call on ``ep`` from the tokens so far. Returns
        with the stream finished; raises _EndpointFailed if the endpoint failed it."""
        import httpx

        assert self._client is not None
        budget = self._budget(ep, stream)
        if budget <= 0:  # max_tokens 0, or a resumed request that is already complete
            self.streams.finish(stream, "length", stream.stop_text.flush())
            return
        headers, extra = self._route(stream)
        try:
            async with self._client.stream(
                "POST",
                f"{ep.url}/completions",
                json={**self._body(stream, budget), **extra},
                headers=headers,
            ) as response:
                if response.status_code != 200:
                    await self._refused(ep, response)
                async with contextlib.aclosing(response.aiter_lines()) as lines:
                    async for line in lines:
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        self._take(ep, stream, _chunk(data))
                        if stream.status.is_finished():
                            return  # a stop string: closing the response aborts the request
        except httpx.HTTPError as exc:
            if stream.server_finish is None:
                unreachable = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                raise _EndpointFailed(_describe(exc), unreachable) from None
            # The finish arrived; only the usage chunk was lost.
        if stream.server_finish is None:
            raise _EndpointFailed("the stream ended without a finish reason")
        self.streams.finish(stream, stream.server_finish, stream.stop_text.flush())

    def _route(self, stream: _Stream) -> tuple[dict[str, str], dict[str, Any]]:
        """Router mode: the headers and body fields that tell the router who asks."""
        spec, request = self.settings.router, stream.request
        if spec is None or request.session is None:
            return {}, {}
        hints = RouteHints(
            session=request.session,
            program=request.program or request.session,
            priority=request.priority,
            expected_tokens=request.expected_tokens
            or request.sampling.max_tokens - len(stream.output_ids),
        )
        return route_fields(spec, hints)

    def _body(self, stream: _Stream, budget: int) -> dict[str, Any]:
        options = stream.request.sampling
        greedy = options.temperature <= 0
        body: dict[str, Any] = {
            "model": self.served,
            "prompt": [*stream.prompt_ids, *stream.output_ids],
            "max_tokens": budget,
            "temperature": 0.0 if greedy else options.temperature,
            "top_p": 1.0 if greedy else max(min(options.top_p, 1.0), 1e-6),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if options.seed is not None:
            body["seed"] = options.seed
        if self.settings.return_token_ids:
            body["return_token_ids"] = True  # vLLM's extension: the generated ids, exactly
        return body

    async def _refused(self, ep: _Endpoint, response: httpx.Response) -> None:
        """Raise for a non-200 answer: the endpoint's fault (5xx, 408, 429) moves the
        request elsewhere; any other is the request's fault and ends it."""
        text = _brief((await response.aread()).decode(errors="replace"))
        status = response.status_code
        if status >= 500 or status in (408, 429):
            raise _EndpointFailed(f"HTTP {status}: {text}")
        hint = " (check api_key)" if status in (401, 403) else ""
        raise DriverError(f"{ep.url} refused the request with HTTP {status}{hint}: {text}")

    def _take(self, ep: _Endpoint, stream: _Stream, chunk: dict[str, Any]) -> None:
        """Apply one streamed chunk: new tokens (and their text), finish reason, usage."""
        if "error" in chunk and not chunk.get("choices"):
            raise _EndpointFailed(
                f"the server reported an error: {_brief(json.dumps(chunk['error']))}"
            )
        usage = chunk.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if isinstance(cached, int):
            stream.cached_tokens = max(stream.cached_tokens, cached)
        for choice in chunk.get("choices") or []:
            ids = choice.get("token_ids")
            if ids is None and choice.get("text"):
                ep.exact = False  # no ids from this server: count by tokenising its text
                text = choice["text"]
                tokens = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                text, stopped = stream.accept_text(text, tokens)
            else:
                text, stopped = stream.accept(ids or [])
            if stopped:
                self.streams.finish(stream, "stop", text)
                return
            if text:
                self.streams.send(stream, stream.delta(text))
            reason = choice.get("finish_reason")
            if reason is not None:
                if reason == "abort":
                    raise _EndpointFailed("the server aborted the request")
                stream.server_finish = "length" if reason == "length" else "stop"


async def _gather(coros: Iterable[Coroutine[Any, Any, Any]]) -> None:
    await asyncio.gather(*coros)


def _chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise _EndpointFailed(f"the server sent a line that is not JSON: {_brief(data)}") from None
    if not isinstance(chunk, dict):
        raise _EndpointFailed(f"the server sent an unexpected chunk: {_brief(data)}")
    return chunk


def _whole(value: Any) -> int | None:
    """A positive whole number from a server's JSON, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _brief(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(exc: BaseException) -> str:
    """A transport failure in words (httpx's messages are sometimes empty)."""
    import httpx

    kind = {
        httpx.ConnectError: "cannot connect",
        httpx.ConnectTimeout: "connect timed out",
        httpx.ReadTimeout: "no data within the read timeout",
        httpx.RemoteProtocolError: "the connection broke",
        httpx.ReadError: "the connection broke",
    }.get(type(exc), type(exc).__name__)
    detail = str(exc)
    return f"{kind}: {_brief(detail, 120)}" if detail else kind


# --------------------------------------------------------------------------- driver


class OpenAIDriver(TokenizingDriver):
    """Generates on one or more OpenAI-compatible servers; their capacities are its slots.

    Args:
        model: the local Hugging Face folder of the model the servers serve (its
            tokenizer and chat template are used here); None means the packaged
            SmolLM2-135M-Instruct.
        endpoints: base URLs (``http://host:8000/v1``), a list or one comma-separated
            string; ``URL#N`` gives an endpoint capacity N. None: ``$LLMOS_OPENAI_ENDPOINTS``,
            else ``http://127.0.0.1:8000/v1``.
        capacity: sequences run at once on each endpoint: one number for all, or one per
            endpoint (``"8,4"``).
        slots: the capacity of an endpoint given none (the kernel passes ``--slots``).
        served_model: the model name the servers serve; None asks ``/v1/models``.
        api_key: sent as ``Authorization: Bearer``; None reads ``$LLMOS_OPENAI_API_KEY``,
            then ``$OPENAI_API_KEY``.
        return_token_ids: ask for the generated token ids (vLLM's ``return_token_ids``);
            turn off for a server that rejects the field (then counts and resumes are
            approximate: tokens come from tokenising the server's text).
        max_context: the context window in tokens; None takes the smallest
            ``max_model_len`` the endpoints report, else the model's config.
        connect_timeout / read_timeout: seconds to connect, and to wait for the next
            streamed bytes, before an endpoint counts as failed.
        load_timeout: seconds ``load()`` waits for the first endpoint to answer.
        health_interval: seconds between checks of a healthy endpoint.
        retries: endpoints a request may move to after failures (the first try aside);
            None: 2, or 4 in router mode (retries through the router).
        queue_timeout: seconds a request waits for room when every healthy endpoint is full.
        router: router mode: the one endpoint is a router in front of many replicas
            (``vllm-router``, ``sglang``, ``llm-d``, ``dynamo`` or ``generic``); every
            request carries the process's session key, program, priority and expected
            output length in that router's form (drivers/routing.py).
        objectives: (llm-d) ``NICE:NAME`` bands mapping a process's nice to an
            InferenceObjective, e.g. ``-1:premium,9:standard,19:batch``.
        program_scheduling: (vllm-router) also send ``vllm_xargs.agentic_context``
            (for a router started with ``--enable-program-scheduling`` in front of
            engines that read it; plain vLLM refuses the field).
        metrics: router mode: the router's Prometheus metrics URL; its healthy workers
            times ``per_worker`` bound the capacity in force (read in the background).
        metrics_gauge: the per-worker health gauge in those metrics (default per router:
            ``vllm_router_worker_health`` for vllm-router).
        per_worker: sequences each healthy worker may run (with ``metrics``).
        transport: (Python API only) an ``httpx`` transport, for tests.
    """

    name = "openai"

    def __init__(
        self,
        model: str | None = None,
        endpoints: str | Sequence[str] | None = None,
        capacity: int | str | Sequence[int] | None = None,
        slots: int = 4,
        served_model: str | None = None,
        api_key: str | None = None,
        return_token_ids: bool = True,
        max_context: int | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        load_timeout: float = 120.0,
        health_interval: float = 5.0,
        retries: int | None = None,
        queue_timeout: float = 60.0,
        router: str | None = None,
        objectives: str | None = None,
        program_scheduling: bool | str = False,
        metrics: str | None = None,
        metrics_gauge: str | None = None,
        per_worker: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("read_timeout", read_timeout),
            ("load_timeout", load_timeout),
            ("health_interval", health_interval),
            ("queue_timeout", queue_timeout),
        ):
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        spec = parse_router(router, objectives, program_scheduling) if router is not None else None
        if spec is None and (objectives or program_scheduling or metrics or per_worker):
            raise ValueError(
                "objectives, program_scheduling, metrics and per_worker are router-mode "
                "options: give router=vllm-router|sglang|llm-d|dynamo|generic too"
            )
        if retries is None:
            retries = 4 if spec is not None else 2
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries!r}")
        gauge = None
        if metrics is not None:
            metrics = _metrics_url(str(metrics))
            gauge = metrics_gauge or HEALTH_GAUGES.get(spec.kind if spec else "")
            if not gauge:
                raise ValueError(
                    f"router {spec.kind if spec else ''} has no known health gauge; give "
                    f"metrics_gauge=NAME (a per-worker gauge, 1 when healthy)"
                )
            if not isinstance(per_worker, int) or isinstance(per_worker, bool) or per_worker < 1:
                raise ValueError(
                    f"metrics needs per_worker=N, the sequences one healthy worker may run "
                    f"(a whole number, at least 1); got {per_worker!r}"
                )
        elif metrics_gauge is not None or per_worker is not None:
            raise ValueError("metrics_gauge and per_worker go with metrics=URL (the router's)")
        if max_context is not None and max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {max_context}")
        if endpoints is None:
            endpoints = os.environ.get(ENDPOINTS_ENV) or DEFAULT_ENDPOINT
        self._specs = parse_endpoints(endpoints, capacity, slots)
        if spec is not None and len(self._specs) != 1:
            raise ValueError(
                f"router mode takes one endpoint, the router's URL; got {len(self._specs)}"
            )
        if api_key is None:
            api_key = next((os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), None)
        self._settings = _Settings(
            served_model=str(served_model) if served_model is not None else None,
            api_key=str(api_key) if api_key is not None else None,
            return_token_ids=bool(return_token_ids),
            connect_timeout=float(connect_timeout),
            read_timeout=float(read_timeout),
            health_interval=float(health_interval),
            retries=int(retries),
            queue_timeout=float(queue_timeout),
            router=spec,
            metrics_url=str(metrics) if metrics is not None else None,
            metrics_gauge=gauge,
            per_worker=per_worker,
        )
        super().__init__(model)
        self._max_context_arg = max_context
        self._load_timeout = float(load_timeout)
        self._transport = transport
        self._io: _IoLoop | None = None
        self._pool: _Pool | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def slots(self) -> int:
        """Sequences run at once: every configured endpoint's capacity summed. Constant,
        because the kernel sizes its scheduler once; while an endpoint is down, requests
        beyond the healthy endpoints' room wait in the driver (``queue_timeout``)."""
        return sum(s.capacity for s in self._specs)

    def endpoints(self) -> tuple[EndpointView, ...]:
        """A snapshot of each endpoint: state, load, peak load, last error."""
        pool = self._pool
        if pool is None:
            return tuple(
                EndpointView(
                    s.url, s.capacity, EndpointState.UNKNOWN, 0, 0, "", None, True, 0, None, None
                )
                for s in self._specs
            )
        return tuple(ep.view(pool.served) for ep in pool.endpoints)

    def healthy_slots(self) -> int:
        """The capacity of the endpoints that are up now (behind a router with metrics:
        bounded by its healthy workers)."""
        return sum(
            v.room if v.room is not None else v.capacity
            for v in self.endpoints()
            if v.state is EndpointState.UP
        )

    @property
    def router(self) -> str | None:
        """Router mode's router kind, else None."""
        spec = self._settings.router
        return spec.kind if spec is not None else None

    def serving(self, request_id: str) -> str | None:
        """The URL of the endpoint running ``request_id`` now (None: waiting, or unknown)."""
        pool = self._pool
        stream = pool.streams.live.get(request_id) if pool is not None else None
        endpoint = stream.endpoint if stream is not None else None
        return endpoint.url if endpoint is not None else None

    def live_request_ids(self) -> frozenset[str]:
        """Requests submitted and not finished yet (a snapshot; for tests and tools)."""
        return frozenset(self._pool.streams.live) if self._pool is not None else frozenset()

    # -- life

    async def load(self, progress: Progress | None = None) -> None:
        """Load the tokenizer and wait (``load_timeout``) until an endpoint answers.

        Raises :class:`DriverError` naming each endpoint's fault if none does; the state
        is then ``failed``.
        """
        if self._state in ("ready", "loading"):
            return
        self._state, self._detail = "loading", ""
        note, report = self._load_progress(progress)
        with self._load_failures():
            path = await asyncio.to_thread(_resolve_model_dir, self._model_arg, report)
            tokenizer, config_context = await asyncio.to_thread(_load_tokenizer, path)
            report(f"Waiting for {len(self._specs)} endpoint(s)", None)
            await self._close_pool()
            io = self._io or _IoLoop()
            self._io = io
            pool = _Pool(self._specs, self._settings, tokenizer, self._transport)
            await io.run(pool.open())
            self._pool = pool
            await io.run(pool.wait_until_up(self._load_timeout, report))
        self._max_context = self._max_context_arg or pool.max_context or config_context
        if not self._max_context:
            self._max_context = FALLBACK_CONTEXT
            log.warning(
                "no endpoint reports max_model_len and %s has no max_position_embeddings; "
                "assuming a %d-token window (set --driver-option max_context=N)",
                path, FALLBACK_CONTEXT,
            )  # fmt: skip
        pool.max_context = self._max_context
        self._tokenizer = tokenizer
        self._encoder = _PromptEncoder(tokenizer)
        self._state = "ready"
        note(
            f"{pool.served} on {sum(1 for v in self.endpoints() if v.state is EndpointState.UP)}"
            f"/{len(self._specs)} endpoints",
            1.0,
        )

    async def shutdown(self) -> None:
        """End live requests with ``abort``, close connections, stop the I/O thread."""
        await self._close_pool()
        io, self._io = self._io, None
        if io is not None:
            await asyncio.to_thread(io.stop)
        self._encoder = self._tokenizer = None
        self._state, self._detail = "unloaded", ""

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and self._io is not None:
            with contextlib.suppress(Exception):
                await self._io.run(pool.close())

    # -- info

    def info(self) -> ModelInfo:
        """Driver, served model, context window, slots, state; ``detail`` lists each
        endpoint with its state and load (``url up 1/4``) once ready."""
        info = super().info()
        pool = self._pool
        served = (pool.served if pool is not None else None) or self._settings.served_model
        if served:
            info = dataclasses.replace(info, model=served)
        if self._state == "ready":
            detail = "; ".join(_describe_endpoint(v, self.router) for v in self.endpoints())
            info = dataclasses.replace(info, detail=detail)
        return info

    # -- generation

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream deltas for ``request``; the last has ``finish_reason`` and final usage.

        Stopping iteration early (``aclose``, cancellation) aborts the request.
        Raises :class:`DriverError` if the request fails on every endpoint it tries.
        """
        pool, encoder = self._ready()
        assert self._io is not None and self._tokenizer is not None
        io = self._io
        prompt_ids = await asyncio.to_thread(encoder.encode, request.prompt)
        stream = _Stream.open(request, prompt_ids, self._tokenizer)
        async with contextlib.aclosing(submit(io, stream, pool.start, pool.abort)) as deltas:
            async for delta in deltas:
                yield delta

    def abort(self, request_id: str) -> None:
        """End ``request_id`` at once (its stream ends with ``abort``) and close its HTTP
        stream, which makes the server drop it. Unknown or finished ids are ignored."""
        pool, io = self._pool, self._io
        if pool is not None and io is not None:
            io.call(lambda: pool.abort(request_id))

    def _ready(self) -> tuple[_Pool, _PromptEncoder]:
        pool, encoder = self._pool, self._encoder
        if pool is None or encoder is None or self._state != "ready":
            raise self._not_ready()
        return pool, encoder


def _describe_endpoint(view: EndpointView, router: str | None = None) -> str:
    room = view.room if view.room is not None else view.capacity
    text = f"{view.url} {view.state.value} {view.load}/{room}"
    if router is not None:
        text = f"router {router} {text}"
        if view.workers is not None:
            text += f" ({view.workers} healthy workers)"
    if not view.exact:
        text += " (no token ids: approximate counts)"
    return text + (f" ({view.error})" if view.error else "")


def _load_tokenizer(path: Path) -> tuple[PreTrainedTokenizerBase, int]:
    """The folder's tokenizer and its config's context length (blocking; off the loop)."""
    tokenizer = load_tokenizer(path, _TOKENIZER_HINT)
    try:
        config = json.loads((path / "config.json").read_text())
        context = int(config.get("max_position_embeddings") or 0)
    except (OSError, ValueError, TypeError):
        context = 0
    return tokenizer, context
