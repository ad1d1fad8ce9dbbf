"""The simulated driver's timing model, ``--driver-option``, and ``llmos bench sched``.

The sim driver is exercised directly with ``asyncio.run`` (no kernel, no mocks); the
bench smoke test starts real private kernels with the sim driver. Timing is checked only
as lower bounds (a sleep never ends early), never as upper bounds.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drivers.base import Delta, GenerationRequest, SamplingOptions
from drivers.sim import SimDriver
from kernel.daemon import build_driver, driver_options, parse_option_value, parser
from kernel.daemon import parser as daemon_parser
from llmos.ctl import bench_sched, cli
from llmos.ctl.cli import main as cli_main
from tests.conftest import wait_until_async

PROMPT = " ".join(f"word{i}" for i in range(100))  # 100 sim tokens


async def _collect(driver: SimDriver, request: GenerationRequest) -> tuple[list[Delta], float]:
    """All deltas of a request and the seconds until its first output token."""
    t0, first, deltas = time.monotonic(), None, []
    async for delta in driver.generate(request):
        if delta.token_ids and first is None:
            first = time.monotonic() - t0
        deltas.append(delta)
    return deltas, first if first is not None else time.monotonic() - t0


def _request(
    rid: str, max_tokens: int, resume: list[int] | None = None, stop: tuple[str, ...] = ()
) -> GenerationRequest:
    return GenerationRequest(
        rid,
        PROMPT,
        SamplingOptions(temperature=0.0, max_tokens=max_tokens, stop=stop),
        resume_ids=resume or [],
    )


# -- the simulated driver ----------------------------------------------------------


def test_sim_prefill_delays_the_first_token_by_prompt_tokens_over_the_prefill_rate() -> None:
    driver = SimDriver(tokens_per_s=1000, prefill_tokens_per_s=1000)
    deltas, first = asyncio.run(_collect(driver, _request("a", 2)))
    assert driver.prefill_s(100) == pytest.approx(0.1)
    assert first >= 0.1 - 1e-3
    assert deltas[-1].prompt_tokens == 100


def test_sim_resume_prefills_the_resumed_tokens_too() -> None:
    driver = SimDriver(tokens_per_s=1000, prefill_tokens_per_s=1000)
    full, _ = asyncio.run(_collect(driver, _request("full", 6)))
    ids = [t for d in full for t in d.token_ids]
    _, first = asyncio.run(_collect(driver, _request("resumed", 106, resume=ids)))
    assert driver.prefill_s(100, len(ids)) == pytest.approx(0.106)
    assert first >= 0.106 - 1e-3


def test_sim_resume_continues_after_resume_ids_without_re_emitting_them() -> None:
    driver = SimDriver(tokens_per_s=2000, prefill_tokens_per_s=100_000)
    full, _ = asyncio.run(_collect(driver, _request("full", 10)))
    full_ids = [t for d in full for t in d.token_ids]
    full_text = "".join(d.text for d in full)
    rest, _ = asyncio.run(_collect(driver, _request("rest", 10, resume=full_ids[:4])))
    rest_ids = [t for d in rest for t in d.token_ids]
    assert rest_ids == full_ids[4:]  # the 4 resumed tokens are not emitted again
    assert "".join(d.text for d in full[:4]) + "".join(d.text for d in rest) == full_text
    assert rest[-1].output_tokens == full[-1].output_tokens == 10  # they count toward output_tokens
    assert rest[-1].finish_reason == full[-1].finish_reason == "length"  # and toward max_tokens


def test_sim_resume_checks_stop_strings_across_the_boundary() -> None:
    driver = SimDriver(tokens_per_s=2000, prefill_tokens_per_s=100_000)
    full, _ = asyncio.run(_collect(driver, _request("full", 6)))
    ids = [t for d in full for t in d.token_ids]
    stop = f"w{ids[2]} w{ids[3]}"  # spans tokens 3 and 4; resume after token 3
    rest, _ = asyncio.run(_collect(driver, _request("rest", 6, resume=ids[:3], stop=(stop,))))
    assert rest[-1].finish_reason == "stop"
    assert rest[-1].output_tokens == 4


def test_sim_abort_during_a_long_prefill_ends_the_stream_at_once() -> None:
    driver = SimDriver(tokens_per_s=1000, prefill_tokens_per_s=1)  # a 100 s prefill

    async def run() -> list[Delta]:
        task = asyncio.create_task(_collect(driver, _request("slow", 5)))
        await wait_until_async(lambda: "slow" in driver._wakeups)  # it is prefilling
        driver.abort("slow")
        deltas, _ = await asyncio.wait_for(task, 10)
        return deltas

    deltas = asyncio.run(run())
    assert deltas[-1].finish_reason == "abort"
    assert deltas[-1].output_tokens == 0


async def _abort_after(driver: SimDriver, request: GenerationRequest, n: int) -> list[Delta]:
    """Run ``request`` and abort it after ``n`` tokens, as a preempting kernel does."""
    deltas: list[Delta] = []
    async for delta in driver.generate(request):
        deltas.append(delta)
        if delta.output_tokens == n:
            driver.abort(request.request_id)
    return deltas


def _ids(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def test_sim_without_prefix_cache_a_resume_prefills_everything_again() -> None:
    driver = SimDriver(tokens_per_s=2000)
    first = asyncio.run(_abort_after(driver, _request("p.1", 8), 3))
    rest, _ = asyncio.run(_collect(driver, _request("p.2", 8, resume=_ids(first))))
    assert first[-1].finish_reason == "abort" and first[-1].output_tokens == 3
    assert rest[-1].cached_tokens == 0 and rest[-1].output_tokens == 8


def test_sim_prefix_cache_lets_a_preempted_generation_resume_with_one_token_of_prefill() -> None:
    driver = SimDriver(tokens_per_s=2000, prefix_cache_tokens=1000)
    first = asyncio.run(_abort_after(driver, _request("p.1", 8), 3))
    rest, _ = asyncio.run(_collect(driver, _request("p.2", 8, resume=_ids(first))))
    assert rest[-1].cached_tokens == 100 + 3 - 1  # prompt + resumed tokens, all but the last
    whole, _ = asyncio.run(_collect(driver, _request("whole", 8)))
    assert _ids(first) + _ids(rest) == _ids(whole)
    again, _ = asyncio.run(_collect(driver, _request("p.3", 8, resume=_ids(first))))
    assert again[-1].cached_tokens == 0  # the first resume took the kept cache


def test_sim_prefix_cache_drops_the_oldest_sequences_beyond_its_budget() -> None:
    driver = SimDriver(
        tokens_per_s=2000, prefix_cache_tokens=150
    )  # room for one 103-token sequence
    other = GenerationRequest(
        "q.1", PROMPT + " more", SamplingOptions(temperature=0.0, max_tokens=8)
    )
    first = asyncio.run(_abort_after(driver, _request("p.1", 8), 3))
    second = asyncio.run(_abort_after(driver, other, 3))  # kept after the first: pushes it out
    rest, _ = asyncio.run(_collect(driver, _request("p.2", 8, resume=_ids(first))))
    assert rest[-1].cached_tokens == 0
    resumed = GenerationRequest("q.2", other.prompt, other.sampling, resume_ids=_ids(second))
    rest, _ = asyncio.run(_collect(driver, resumed))
    assert rest[-1].cached_tokens == 101 + 3 - 1


def test_sim_answer_length_asked_in_the_prompt_ends_with_stop_across_a_resume() -> None:
    driver = SimDriver(tokens_per_s=2000, prefill_tokens_per_s=100_000)
    asked = [
        {"role": "user", "content": "an old question <sim:reply=99>"},
        {"role": "user", "content": "Question: why? <sim:reply=4>"},
    ]
    whole, _ = asyncio.run(
        _collect(driver, GenerationRequest("a", asked, SamplingOptions(max_tokens=50)))
    )
    assert (whole[-1].finish_reason, whole[-1].output_tokens) == ("stop", 4)
    resumed = GenerationRequest(
        "b", asked, SamplingOptions(max_tokens=50), resume_ids=_ids(whole)[:2]
    )
    rest, _ = asyncio.run(_collect(driver, resumed))
    assert (rest[-1].finish_reason, rest[-1].output_tokens, _ids(rest)) == (
        "stop",
        4,
        _ids(whole)[2:],
    )


def test_sim_jitter_keeps_output_deterministic_and_rejects_bad_fractions() -> None:
    a, _ = asyncio.run(_collect(SimDriver(tokens_per_s=2000, jitter=0.5, seed=7), _request("a", 5)))
    b, _ = asyncio.run(_collect(SimDriver(tokens_per_s=2000, jitter=0.5, seed=7), _request("b", 5)))
    assert [d.token_ids for d in a] == [d.token_ids for d in b]
    with pytest.raises(ValueError):
        SimDriver(jitter=1.5)


# -- --driver-option -----------------------------------------------------------------


def test_driver_option_values_parse_as_int_float_bool_then_text() -> None:
    assert parse_option_value("50") == 50 and isinstance(parse_option_value("50"), int)
    assert parse_option_value("0.5") == 0.5
    assert parse_option_value("true") is True and parse_option_value("False") is False
    assert parse_option_value("fast") == "fast"
    assert driver_options(["tokens_per_s=50", "name=a=b"]) == {"tokens_per_s": 50, "name": "a=b"}


def test_driver_options_reach_the_driver_constructor() -> None:
    args = parser().parse_args(
        [
            "--driver",
            "sim",
            "--driver-option",
            "tokens_per_s=50",
            "--driver-option",
            "prefill_tokens_per_s=4000.5",
        ]
    )
    driver = build_driver(args)
    assert isinstance(driver, SimDriver)
    assert (driver.tokens_per_s, driver.prefill_tokens_per_s, driver.slots) == (50, 4000.5, 4)


def test_driver_option_without_equals_sign_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["--driver-option", "tokens_per_s"])
    assert exc.value.code == 2


def test_unknown_driver_option_exits_2_naming_the_accepted_options(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernel",
            "--driver",
            "sim",
            "--driver-option",
            "bogus=1",
            "--runtime-dir",
            str(tmp_path / "run"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "bogus" in line]
    assert len(lines) == 1
    assert "accepts: slots, tokens_per_s, prefill_tokens_per_s" in lines[0]
    assert not (tmp_path / "run" / "admin.token").exists()


def test_kernel_start_passes_its_options_through_to_the_daemon(monkeypatch) -> None:
    started: list[list[str]] = []
    monkeypatch.setattr(cli, "start_kernel", lambda options, wait: started.append(options) or 0)
    options = ["--driver", "sim", "--driver-option", "tokens_per_s=50", "--unsafe-python"]
    assert cli_main(["kernel", "start", *options, "--no-wait"]) == 0
    assert started == [options]  # verbatim, without start's own --no-wait
    assert daemon_parser().parse_args(started[0]).driver_option == ["tokens_per_s=50"]


# -- the benchmark -------------------------------------------------------------------


def test_workloads_are_a_pure_function_of_the_seed() -> None:
    scale = bench_sched.SCALES["sim"]
    for kind in bench_sched.WORKLOADS:
        assert bench_sched.make_workload(kind, 20, 3, scale) == bench_sched.make_workload(
            kind, 20, 3, scale
        )
    mix = bench_sched.make_workload("mix", 100, 0, scale)
    assert 1 <= sum(p.long for p in mix) <= 5
    assert all(p.steps[-1].after_s == 0.0 for p in mix)


def test_jain_index_is_one_for_equal_shares_and_one_over_n_for_a_monopoly() -> None:
    assert bench_sched.jain([2.0, 2.0, 2.0]) == pytest.approx(1.0)
    assert bench_sched.jain([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)


def test_bench_sched_on_the_simulator_completes_every_program_under_two_policies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc = cli_main(
        [
            "bench",
            "sched",
            "--driver",
            "sim",
            "--programs",
            "3",
            "--policies",
            "fifo,priority",
            "--driver-option",
            "tokens_per_s=1000",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["driver"] == "sim" and report["policies"] == ["fifo", "priority"]
    assert report["driver_options"]["tokens_per_s"] == 1000
    assert set(report["workloads"]) == {"chat", "react", "mix"}
    assert [(r["workload"], r["policy"]) for r in report["runs"]] == [
        (w, p) for w in ("chat", "react", "mix") for p in ("fifo", "priority")
    ]
    for run in report["runs"]:
        assert run["completed"] == run["programs"] == 3, run
        assert run["errors"] == 0 and run["leftover_processes"] == 0
        assert run["calls"] == report["workloads"][run["workload"]]["calls"]
        assert run["output_tokens"] > 0 and run["mean_completion_s"] > 0
        assert 0 < run["jain"] <= 1.0 + 1e-9
        for key in (
            "p95_completion_s",
            "tokens_per_s",
            "mean_ttft_s",
            "p95_ttft_s",
            "preemptions",
            "switch_prefill_tokens",
            "kernel_cpu_us_per_call",
            "kernel_rss_kib_per_process",
        ):
            assert run[key] >= 0, key
    assert set(report["speedup_vs_fifo"]) == {"chat", "react", "mix"}
    assert [(r["workload"], r["policy"]) for r in report["model"]] == [
        (w, p) for w in ("chat", "react", "mix") for p in ("fifo", "priority", "oracle")
    ]
    assert all(report["workloads"][w]["offered_load"] > 0 for w in ("chat", "react", "mix"))
    for wl in ("chat", "react", "mix"):  # the same answers under every policy
        assert len({r["output_tokens"] for r in report["runs"] if r["workload"] == wl}) == 1


def test_sim_last_token_carries_the_finish_reason() -> None:
    driver = SimDriver(tokens_per_s=2000, prefill_tokens_per_s=100_000)
    deltas, _ = asyncio.run(_collect(driver, _request("a", 3)))
    assert deltas[-1].finish_reason == "length" and deltas[-1].token_ids  # no empty closing delta
    assert [d.finish_reason for d in deltas[:-1]] == [None, None]


# -- the ideal model -------------------------------------------------------------------


def _model(kind: str, n: int, policy: object) -> dict:
    scale = bench_sched.SCALES["sim"]
    programs = bench_sched.make_workload(kind, n, 0, scale)
    return bench_sched.model_run(programs, policy, 8, 2000, 100)  # type: ignore[arg-type]


def test_model_is_deterministic_and_completes_every_program() -> None:
    from kernel.scheduler import make_policy

    a, b = _model("react", 30, make_policy("fair")), _model("react", 30, make_policy("fair"))
    assert a == b
    assert a["mean_completion_s"] > 0 and a["p95_completion_s"] >= a["mean_completion_s"] * 0.5


def test_model_preempts_only_under_policies_that_preempt() -> None:
    from kernel.scheduler import make_policy

    assert _model("mix", 120, make_policy("fifo"))["preemptions"] == 0
    assert _model("mix", 120, make_policy("rr", 4))["preemptions"] > 0


def test_clairvoyant_bound_beats_fifo_on_the_mix_in_the_model() -> None:
    from kernel.scheduler import make_policy

    fifo = _model("mix", 300, make_policy("fifo"))
    oracle = _model("mix", 300, bench_sched.OracleSRPT({}))
    assert oracle["mean_completion_s"] < fifo["mean_completion_s"]


def test_bench_workloads_arrive_faster_than_the_slots_serve_them() -> None:
    scale = bench_sched.SCALES["sim"]
    for kind in bench_sched.WORKLOADS:
        programs = bench_sched.make_workload(kind, scale.programs[kind], 0, scale)
        assert bench_sched.offered_load(programs, scale.slots, 2000, 100) > 1.0, kind
