"""What the openai driver tells each router (drivers/routing.py): pure mappings, checked
per router against the form its documentation gives (cited per test), the option
parsing, and the capacity read from a router's Prometheus metrics."""

from __future__ import annotations

import pytest

from drivers.routing import (
    ROUTERS,
    RouteHints,
    RouterSpec,
    healthy_workers,
    objective_for,
    parse_router,
    route_fields,
    router_capacity,
)

HINTS = RouteHints(
    session="llmos-0a1b2c3d-42",
    program="llmos-0a1b2c3d-prog40",
    priority=5,  # nice -5
    expected_tokens=128,
)


def test_vllm_router_keys_consistent_hash_on_the_session_header_and_user() -> None:
    # vllm-project/router docs/load_balancing/README.md, "Hash Key Priority":
    # 1. X-Session-ID header ... 8. body `user` (OpenAI format).
    headers, body = route_fields(parse_router("vllm-router"), HINTS)
    assert headers == {"X-Session-ID": "llmos-0a1b2c3d-42"}
    assert body == {"user": "llmos-0a1b2c3d-42"}


def test_vllm_router_program_scheduling_sends_the_canonical_agentic_context() -> None:
    # vllm-project/router docs/program_scheduling.md, "Canonical request metadata":
    # vllm_xargs.agentic_context {program_id, session_id, priority, expected_output_length}.
    _, body = route_fields(parse_router("vllm-router", program_scheduling="true"), HINTS)
    assert body["vllm_xargs"] == {
        "agentic_context": {
            "program_id": "llmos-0a1b2c3d-prog40",
            "session_id": "llmos-0a1b2c3d-42",
            "priority": 5,
            "expected_output_length": 128,
        }
    }


def test_sglang_gateway_keys_on_the_smg_routing_key_header() -> None:
    # SGLang Model Gateway docs/configuration/routing.md, "Consistent Hashing Policy":
    # X-SMG-Routing-Key is the consistent-hash (and manual policy) session key.
    headers, body = route_fields(parse_router("sglang"), HINTS)
    assert headers == {"X-SMG-Routing-Key": "llmos-0a1b2c3d-42"}
    assert body == {"user": "llmos-0a1b2c3d-42"}


def test_llm_d_gets_the_program_as_fairness_id_and_the_nice_band_as_objective() -> None:
    # Gateway API Inference Extension (llm-d's EPP): x-gateway-inference-fairness-id is
    # the flow's fairness key; x-gateway-inference-objective names an InferenceObjective
    # CRD whose spec.priority the EPP resolves (no numeric priority header exists).
    spec = parse_router("llm-d", objectives="-1:premium,9:standard,19:batch")
    headers, body = route_fields(spec, HINTS)  # nice -5: the first band
    assert headers == {
        "x-gateway-inference-fairness-id": "llmos-0a1b2c3d-prog40",
        "x-gateway-inference-objective": "premium",
        # llm-d's own spelling (its llm-d.ai/v1alpha2 API group), sent alongside.
        "x-llm-d-inference-fairness-id": "llmos-0a1b2c3d-prog40",
        "x-llm-d-inference-objective": "premium",
    }
    assert body == {"user": "llmos-0a1b2c3d-42"}
    niced = RouteHints(HINTS.session, HINTS.program, priority=-10)  # nice 10
    assert route_fields(spec, niced)[0]["x-gateway-inference-objective"] == "batch"
    bare, _ = route_fields(parse_router("llm-d"), HINTS)
    assert "x-gateway-inference-objective" not in bare
    assert "x-llm-d-inference-objective" not in bare


def test_dynamo_gets_the_session_header_and_agent_hints_with_priority_and_osl() -> None:
    # NVIDIA Dynamo docs agents/session-ids (x-dynamo-session-id) and agents/agent-hints:
    # nvext.agent_hints.priority (higher: more urgent) and .osl (expected output tokens).
    headers, body = route_fields(parse_router("dynamo"), HINTS)
    assert headers == {"x-dynamo-session-id": "llmos-0a1b2c3d-42"}
    assert body == {
        "user": "llmos-0a1b2c3d-42",
        "nvext": {"agent_hints": {"priority": 5, "osl": 128}},
    }
    unknown = RouteHints(HINTS.session, HINTS.program, priority=-3, expected_tokens=None)
    assert route_fields(parse_router("dynamo"), unknown)[1]["nvext"] == {
        "agent_hints": {"priority": -3}
    }


def test_generic_sends_the_widely_read_session_header_and_user() -> None:
    headers, body = route_fields(RouterSpec("generic"), HINTS)
    assert headers == {"X-Session-ID": HINTS.session}
    assert body == {"user": HINTS.session}


def test_every_router_is_deterministic_in_the_session_alone() -> None:
    """Two turns of one process (different priorities, lengths) map to the same affinity
    key for every router: only the session and program enter it."""
    later = RouteHints(HINTS.session, HINTS.program, priority=-2, expected_tokens=7)
    for kind in ROUTERS:
        spec = parse_router(kind)
        first, second = route_fields(spec, HINTS), route_fields(spec, later)
        assert first[1]["user"] == second[1]["user"] == HINTS.session
        keys = {k: v for k, v in first[0].items() if "objective" not in k}
        assert keys == {k: v for k, v in second[0].items() if "objective" not in k}


def test_objective_bands_pick_the_first_band_at_or_above_the_nice() -> None:
    bands = ((-1, "premium"), (9, "standard"))
    assert [objective_for(n, bands) for n in (-20, -1, 0, 9, 10)] == [
        "premium", "premium", "standard", "standard", None,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "haproxy"}, "router must be one of"),
        ({"kind": "llm-d", "objectives": "5"}, "NICE:NAME"),
        ({"kind": "llm-d", "objectives": "30:batch"}, "NICE:NAME"),
        ({"kind": "llm-d", "objectives": "0:Not_A_Name"}, "InferenceObjective name"),
        ({"kind": "llm-d", "objectives": "9:b,0:a"}, "ascending"),
        ({"kind": "sglang", "objectives": "0:a"}, "router=llm-d"),
        ({"kind": "dynamo", "program_scheduling": True}, "router=vllm-router"),
        ({"kind": "vllm-router", "program_scheduling": "maybe"}, "true or false"),
    ],
)
def test_bad_router_options_say_what_is_wrong(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_router(**kwargs)  # type: ignore[arg-type]


VLLM_ROUTER_METRICS = """\
# TYPE vllm_router_active_workers gauge
vllm_router_active_workers 2
# TYPE vllm_router_worker_health gauge
vllm_router_worker_health{worker="http://127.0.0.1:18100"} 1
vllm_router_worker_health{worker="http://127.0.0.1:18101"} 0
vllm_router_worker_health{worker="http://127.0.0.1:18102"} 1
"""


def test_healthy_workers_counts_the_gauge_samples_at_one() -> None:
    # The text is vllm-router 0.1.17's own /metrics (--prometheus-port), one sample per worker.
    assert healthy_workers(VLLM_ROUTER_METRICS, "vllm_router_worker_health") == 2
    assert healthy_workers(VLLM_ROUTER_METRICS, "no_such_gauge") is None
    with pytest.raises(ValueError, match="not Prometheus text"):
        healthy_workers("vllm_router_worker_health{worker= 1\n", "vllm_router_worker_health")


def test_router_capacity_is_bounded_by_healthy_workers_and_never_above_configured() -> None:
    assert router_capacity(8, None, 4) == 8  # nothing reported: as configured
    assert router_capacity(8, 2, None) == 8
    assert router_capacity(8, 1, 4) == 4
    assert router_capacity(8, 3, 4) == 8  # never above the kernel's slots
    assert router_capacity(8, 0, 4) == 0
