"""Scheduling on the real kernel: preemption determinism with the real model, quotas,
slots never leaked; starvation freedom on the simulator (a scheduling invariant)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from llmos.client import Client
from syscalls import errors
from tests.conftest import GREEDY, InThread, wait_until
from tests.kernels import Daemon

pytestmark = pytest.mark.model

PROMPTS = ["List the days of the week:", "Name some colours:", "Count: one, two,"]


@pytest.fixture(scope="module")
def rr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A one-slot kernel with round robin and a 3-token quantum: constant preemption."""
    k = Daemon(
        tmp_path_factory.mktemp("rr"), "--slots", "1", "--policy", "rr", "--quantum", "3"
    ).start()
    yield k
    k.stop()


def test_preempted_generations_yield_exactly_the_uninterrupted_text(rr: Daemon) -> None:
    with rr.admin() as admin:
        solo = {}
        for prompt in PROMPTS:  # one at a time: nothing to preempt them
            p = admin.spawn("solo")
            solo[prompt] = p.generate(prompt=prompt, max_tokens=20, **GREEDY)
        procs = [admin.spawn(f"p{i}") for i in range(len(PROMPTS))]
        runs = [
            InThread(lambda p=p, q=q: p.generate(prompt=q, max_tokens=20, **GREEDY))
            for p, q in zip(procs, PROMPTS, strict=True)
        ]
        results = [r.result() for r in runs]
        for prompt, res in zip(PROMPTS, results, strict=True):
            assert res.text == solo[prompt].text
            assert res.usage.output_tokens == solo[prompt].usage.output_tokens
        rows = {r.pid: r for r in admin.ps()}
        preempted = [rows[p.pid] for p in procs if rows[p.pid].preemptions > 0]
        assert preempted, "three generations on one slot with a 3-token quantum must preempt"
        assert all(r.switch_prefill_tokens > 0 for r in preempted)
        assert admin.info().models[0].busy == 0
        assert admin.info().policy == "rr"


FORMATS = [
    {
        "type": "json_schema",
        "schema": {
            "type": "object",
            "properties": {"day": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
            "required": ["day", "n"],
        },
    },
    {"type": "regex", "pattern": r"[A-Z][a-z]+(, [A-Z][a-z]+){2,4}\."},
    {"type": "json_object"},
]


def test_preempted_constrained_generations_yield_exactly_the_uninterrupted_text(rr: Daemon) -> None:
    with rr.admin() as admin:
        jobs = list(zip(PROMPTS, FORMATS, strict=True))
        solo = [
            admin.spawn("solo").generate(prompt=q, response_format=f, max_tokens=24, **GREEDY)
            for q, f in jobs
        ]
        procs = [admin.spawn(f"c{i}") for i in range(len(jobs))]
        runs = [
            InThread(
                lambda p=p, q=q, f=f: p.generate(
                    prompt=q, response_format=f, max_tokens=24, **GREEDY
                )
            )
            for p, (q, f) in zip(procs, jobs, strict=True)
        ]
        for alone, res in zip(solo, [r.result() for r in runs], strict=True):
            assert (res.text, res.usage.output_tokens) == (alone.text, alone.usage.output_tokens)
        assert any(row.preemptions > 0 for row in admin.ps() if row.pid in {p.pid for p in procs})
        assert solo[0].finish_reason != "stop" or json.loads(solo[0].text)["n"] is not None


def test_the_output_token_quota_clips_then_refuses(spawn, admin: Client) -> None:
    p = spawn(limits={"max_output_tokens": 10})
    first = p.generate(prompt="1, 2, 3, 4,", max_tokens=7, **GREEDY)
    assert first.usage.output_tokens == 7
    second = p.generate(prompt="1, 2, 3, 4,", max_tokens=7, **GREEDY)
    assert second.usage.output_tokens <= 3 and second.finish_reason in ("length", "stop")
    with pytest.raises(errors.EDQUOT) as exc:
        p.generate(prompt="1, 2, 3, 4,", max_tokens=7, **GREEDY)
    assert "max_output_tokens=10" in exc.value.message
    row = admin.ps(p.pid)[0]
    assert row.quota_exceeded == "max_output_tokens" and row.limits == {"max_output_tokens": 10}


def test_the_call_rate_and_context_size_quotas(spawn) -> None:
    p = spawn(limits={"max_calls_per_min": 2, "max_context_tokens": 30})
    p.generate(prompt="Hi", max_tokens=1, **GREEDY)
    with pytest.raises(errors.EDQUOT) as exc:
        p.generate(prompt="word " * 40, max_tokens=1)
    assert "max_context_tokens=30" in exc.value.message
    with pytest.raises(errors.EDQUOT) as exc:
        p.generate(prompt="Hi", max_tokens=1)
    assert "max_calls_per_min=2" in exc.value.message


def test_wall_time_quota_ends_a_long_generation_and_frees_the_slot(spawn, admin: Client) -> None:
    p = spawn(limits={"max_wall_s": 1.5})
    with pytest.raises(errors.EDQUOT) as exc:
        p.generate(prompt="Count to a thousand:", max_tokens=4000, **GREEDY)
    assert "max_wall_s" in exc.value.message
    wait_until(lambda: admin.info().models[0].busy == 0)
    assert p.context() == []


def test_a_program_quota_is_shared_by_all_its_processes(spawn) -> None:
    root = spawn(program_limits={"max_output_tokens": 6})
    kid = root.spawn("kid")
    assert root.ps()[1].program == root.pid
    used = root.generate(prompt="1, 2, 3,", max_tokens=6, **GREEDY).usage.output_tokens
    assert used == 6
    with pytest.raises(errors.EDQUOT) as exc:
        kid.generate(prompt="1, 2, 3,", max_tokens=2, **GREEDY)
    assert f"program {root.pid}" in exc.value.message


def test_a_child_cannot_get_more_than_its_parent(spawn) -> None:
    parent = spawn(limits={"max_output_tokens": 50})
    with pytest.raises(errors.EPERM):
        parent.spawn("greedy", limits={"max_output_tokens": 51})
    kid = parent.spawn("kid")
    assert kid.ps()[0].limits == {"max_output_tokens": 50}
    with pytest.raises(errors.EPERM):
        parent.spawn("x", program_limits={"max_wall_s": 5})


def test_a_failing_generation_returns_its_slot(spawn, admin: Client) -> None:
    p = spawn()
    with pytest.raises(errors.EIO):
        p.generate(prompt="", max_tokens=4)  # the driver refuses an empty prompt
    assert admin.info().models[0].busy == 0
    assert p.generate(prompt="Hi", max_tokens=2, **GREEDY).text is not None


def test_a_low_priority_process_is_never_starved(tmp_path) -> None:
    """Priority with aging on the simulator: nice-0 work keeps arriving on the one slot,
    yet a nice-3 process gets it after about 3 s of waiting."""
    k = Daemon(
        tmp_path,
        "--driver",
        "sim",
        "--slots",
        "1",
        "--policy",
        "priority",
        "--driver-option",
        "tokens_per_s=200",
    ).start()
    try:
        with k.admin() as admin:
            highs = [admin.spawn(f"high{i}", nice=0) for i in range(3)]
            low = admin.spawn("low", nice=3)
            stop = threading.Event()

            def hog(p) -> None:
                while not stop.is_set():
                    p.generate(prompt="busy", max_tokens=20)

            hogs = [threading.Thread(target=hog, args=(p,), daemon=True) for p in highs]
            for t in hogs:
                t.start()
            # the contention is on: one hog on the slot, the other two queued for it
            wait_until(lambda: (m := admin.stat(procs=False).models[0]).busy == 1 and m.queued == 2)
            low_call = InThread(lambda: low.generate(prompt="me too", max_tokens=5))
            res = low_call.result(timeout=60)
            assert res.usage.output_tokens == 5 and not stop.is_set()  # the hogs were still running
            stop.set()
            for t in hogs:
                t.join(10)
    finally:
        k.stop()


def test_fast_streams_are_coalesced_into_fewer_frames_without_losing_text(tmp_path) -> None:
    """At simulator speed (2,000 tokens/s) one frame per token would be wasteful."""
    k = Daemon(
        tmp_path, "--driver", "sim", "--slots", "1", "--driver-option", "tokens_per_s=2000"
    ).start()
    try:
        with k.admin() as admin:
            p = admin.spawn("fast")
            chunks = list(p.stream("go", max_tokens=300))
            assert "".join(chunks) == p.last.text and p.last.usage.output_tokens == 300
            assert 1 < len(chunks) < 300
    finally:
        k.stop()
