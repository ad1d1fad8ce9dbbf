"""What the ``openai`` driver tells a router in front of a model fleet: pure mappings.

In *router mode* (``--driver-option router=KIND``) the driver's one endpoint is a router
(vLLM's ``vllm-router``, SGLang's model gateway, llm-d's inference gateway, NVIDIA
Dynamo's frontend) in front of many replicas. The kernel's scheduler still decides
*who* runs next; the router decides *where*. To decide well it needs, per request:

* a **session key**, stable for one LLM process across its turns and across the
  kernel's preemption resumes, so a router with session affinity keeps the process's
  KV cache on one replica;
* the **program** (llmos's unit of fairness, the pgid), for routers that queue fairly
  between tenants;
* the process's **priority** (the kernel's ``-nice``: higher is more urgent) and its
  **expected output length** (``max_tokens`` left, or the process's running mean).

Each router reads these in its own documented form; :func:`route_fields` is the one
place that knows them (a pure function of :class:`RouteHints` and the router's
:class:`RouterSpec`, unit-tested per router against what its docs say). Nothing here
does I/O.

Capacity: a router hides its replicas, so the kernel's slots come from configuration
(``slots=N``) or from the router's metrics endpoint where it has one
(:func:`healthy_workers` parses its Prometheus text; the driver polls it in the
background and never blocks on it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: The routers the driver knows, and ``generic`` (any router reading ``X-Session-ID``).
ROUTERS = ("vllm-router", "sglang", "llm-d", "dynamo", "generic")

#: The Prometheus gauge per worker (1 healthy, 0 not) each router's metrics expose, where
#: known. vllm-router 0.1.17: ``vllm_router_worker_health{worker="URL"}`` on its
#: ``--prometheus-port`` (read from the shipped binary's metric names and a live router).
HEALTH_GAUGES: dict[str, str] = {"vllm-router": "vllm_router_worker_health"}

#: llm-d objective names are Kubernetes object names (InferenceObjective CRDs).
_OBJECTIVE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class RouteHints:
    """What one request tells the router about the LLM process it comes from."""

    #: Stable per process: ``llmos-<kernel instance>-<pid>`` (same on every turn and resume).
    session: str
    #: Stable per program (the pgid): ``llmos-<kernel instance>-prog<pgid>``.
    program: str
    #: The kernel's priority, ``-nice`` (-19 … 20): higher is more urgent.
    priority: int = 0
    #: Output tokens this request is expected to make (None: unknown).
    expected_tokens: int | None = None

    @property
    def nice(self) -> int:
        """The process's nice value (-20 … 19): the priority's negation."""
        return -self.priority


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """A router kind and its options, checked by :func:`parse_router`."""

    kind: str
    #: llm-d: ``(highest nice, objective name)`` bands, ascending by nice.
    objectives: tuple[tuple[int, str], ...] = ()
    #: vllm-router: send Program identity (``vllm_xargs.agentic_context``); only for a
    #: router started with ``--enable-program-scheduling`` in front of engines that read
    #: it: vllm-router 0.1.17 forwards it unchanged and plain vLLM 0.32 refuses it (400).
    program_scheduling: bool = False


def parse_router(
    kind: str, objectives: str | None = None, program_scheduling: bool | str = False
) -> RouterSpec:
    """A :class:`RouterSpec` from the driver's options; ValueError says what is wrong.

    ``objectives`` (llm-d only): ``NICE:NAME`` bands, e.g. ``-1:premium,9:standard,19:batch``
    -- a process of nice ``n`` gets the first band whose NICE is at least ``n``; a nice
    above every band gets no objective header.
    """
    kind = str(kind).strip().lower()
    if kind not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}; got {kind!r}")
    bands: list[tuple[int, str]] = []
    if objectives:
        if kind != "llm-d":
            raise ValueError("objectives is for router=llm-d (its InferenceObjective names)")
        for part in str(objectives).split(","):
            nice_text, sep, name = part.strip().partition(":")
            try:
                nice = int(nice_text)
            except ValueError:
                nice = None  # type: ignore[assignment]
            if not sep or nice is None or not -20 <= nice <= 19:
                raise ValueError(
                    f"objectives: {part.strip()!r} is not NICE:NAME with NICE in -20..19, "
                    f"e.g. objectives=-1:premium,9:standard,19:batch"
                )
            if not _OBJECTIVE.match(name):
                raise ValueError(
                    f"objectives: {name!r} is not an InferenceObjective name (lower-case "
                    f"letters, digits, '-' and '.')"
                )
            bands.append((nice, name))
        if [b[0] for b in bands] != sorted({b[0] for b in bands}):
            raise ValueError("objectives: list the bands once each, by ascending NICE")
    flag = _flag(program_scheduling, "program_scheduling")
    if flag and kind != "vllm-router":
        raise ValueError("program_scheduling is for router=vllm-router")
    return RouterSpec(kind, tuple(bands), flag)


def _flag(value: bool | str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def objective_for(nice: int, bands: Sequence[tuple[int, str]]) -> str | None:
    """The llm-d objective of a process of ``nice``: the first band whose NICE is at
    least ``nice``, else None."""
    for highest, name in bands:
        if nice <= highest:
            return name
    return None


def route_fields(spec: RouterSpec, hints: RouteHints) -> tuple[dict[str, str], dict[str, Any]]:
    """The HTTP headers and the extra ``/completions`` body fields that tell ``spec``'s
    router about ``hints``: ``(headers, body)``.

    Every router's body gets ``user`` (the OpenAI field, the session key): vLLM accepts
    it and several routers hash on it. The rest is per router, in its documented form.
    """
    headers: dict[str, str] = {}
    body: dict[str, Any] = {"user": hints.session}
    expected = (
        hints.expected_tokens if hints.expected_tokens and hints.expected_tokens > 0 else None
    )
    if spec.kind in ("vllm-router", "generic"):
        # vllm-router docs/load_balancing/README.md, "Hash Key Priority": consistent_hash
        # keys on the X-Session-ID header first (then X-User-ID, ..., body `user`).
        headers["X-Session-ID"] = hints.session
        if spec.program_scheduling:
            # vllm-router docs/program_scheduling.md, "Canonical request metadata":
            # vllm_xargs.agentic_context with program_id, session_id, and the
            # request-scoped priority (larger resumes first) and expected_output_length.
            context: dict[str, Any] = {
                "program_id": hints.program,
                "session_id": hints.session,
                "priority": hints.priority,
            }
            if expected is not None:
                context["expected_output_length"] = expected
            body["vllm_xargs"] = {"agentic_context": context}
    elif spec.kind == "sglang":
        # SGLang Model Gateway (sgl-model-gateway / smg) docs/configuration/routing.md,
        # "Consistent Hashing Policy" and "Manual Policy": X-SMG-Routing-Key is the
        # session-affinity key (the request body is not read for it).
        headers["X-SMG-Routing-Key"] = hints.session
    elif spec.kind == "llm-d":
        # Gateway API Inference Extension (llm-d's endpoint picker): the fairness id
        # header names the flow (tenant) queued fairly against others -- the program;
        # the objective header names an InferenceObjective whose spec.priority orders
        # and sheds requests (the EPP resolves the name; a number is not sent).
        # llm-d's own API group (llm-d.ai/v1alpha2 InferenceObjectives) spells the same
        # two headers x-llm-d-inference-*: both are sent, each release reads its own.
        objective = objective_for(hints.nice, spec.objectives)
        for prefix in ("x-gateway-inference", "x-llm-d-inference"):
            headers[f"{prefix}-fairness-id"] = hints.program
            if objective is not None:
                headers[f"{prefix}-objective"] = objective
    elif spec.kind == "dynamo":
        # NVIDIA Dynamo docs, agents/session-ids and agents/agent-hints: the
        # x-dynamo-session-id header is the session (for session-aware routing where a
        # policy opts in); nvext.agent_hints.priority (higher is more urgent) orders the
        # router's queue; nvext.agent_hints.osl is the expected output length in tokens.
        headers["x-dynamo-session-id"] = hints.session
        agent_hints: dict[str, Any] = {"priority": hints.priority}
        if expected is not None:
            agent_hints["osl"] = expected
        body["nvext"] = {"agent_hints": agent_hints}
    return headers, body


def healthy_workers(metrics_text: str, gauge: str) -> int | None:
    """How many workers a router's Prometheus text reports healthy: the samples of
    ``gauge`` (one per worker) with a value of 1 or more. None when the gauge is absent
    (the router does not report it: capacity stays as configured). Raises ValueError
    for text that is not Prometheus exposition format."""
    from prometheus_client.parser import text_string_to_metric_families

    found = False
    healthy = 0
    try:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                if sample.name != gauge:
                    continue
                found = True
                if sample.value >= 1:
                    healthy += 1
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"the metrics are not Prometheus text: {exc}") from None
    return healthy if found else None


def router_capacity(configured: int, healthy: int | None, per_worker: int | None) -> int:
    """The sequences the driver may run through the router now: ``configured`` (the
    kernel's slots, fixed at start) bounded by ``healthy × per_worker`` when both are
    known. Never above ``configured``; 0 when the router reports no healthy worker."""
    if healthy is None or per_worker is None:
        return configured
    return max(min(configured, healthy * per_worker), 0)
