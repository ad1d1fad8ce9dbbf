"""``llmos bench driver`` runs both paths (kernel and direct) in one run and reports them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _bench(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "bench", "driver", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _check_pairs(report: dict, levels: list[int], requests: int, rounds: int = 1) -> None:
    runs = report["runs"]
    assert [(r["round"], r["path"], r["concurrency"]) for r in runs] == [
        (n, path, c) for n in range(rounds) for c in levels for path in ("kernel", "direct")
    ]
    for r in runs:
        assert r["requests"] == r["concurrency"] * requests
        assert r["output_tokens"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p95_ms"]
        # CPU comes from /proc in clock ticks (10 ms): a short run may read 0.
        assert r["cpu_ms_per_token"] >= 0 and r["loop_cpu_us_per_token"] >= 0
        # Interleaved rounds alternate which path goes first.
        assert r["ran_first"] == ((r["path"] == "kernel") == (r["round"] % 2 == 0))
    assert set(report["overhead_pct"]) == {str(c) for c in levels}
    assert [s["concurrency"] for s in report["summary"]] == levels
    for s in report["summary"]:
        assert s["rounds"] == rounds and len(s["overhead_pct_rounds"]) == rounds
        assert s["overhead_pct"] == report["overhead_pct"][str(s["concurrency"])]
        added = s["kernel_loop_cpu_us_per_token"] - s["direct_loop_cpu_us_per_token"]
        assert abs(s["added_loop_cpu_us_per_token"] - added) < 0.2


def test_bench_driver_on_the_simulator_compares_kernel_and_direct_paths() -> None:
    report = _bench(
        "--driver",
        "sim",
        "--concurrency",
        "1,3",
        "--requests",
        "2",
        "--tokens",
        "8",
        "--turns",
        "3",
        "--driver-option",
        "tokens_per_s=500",
        "--rounds",
        "2",
    )
    _check_pairs(report, [1, 3], 2, rounds=2)
    assert report["mode"] == "interleaved"
    kernel, direct = report["prefix_cache"]
    assert (kernel["path"], direct["path"]) == ("kernel", "direct")
    # The kernel's prompts are exactly the ones a program would send the driver itself.
    assert kernel["prompt_tokens"] == direct["prompt_tokens"] > 0


@pytest.mark.model
def test_bench_driver_on_the_real_cpu_model() -> None:
    report = _bench(
        "--driver",
        "cpu",
        "--concurrency",
        "1,2",
        "--requests",
        "1",
        "--tokens",
        "6",
        "--turns",
        "2",
        "--rounds",
        "1",
    )
    _check_pairs(report, [1, 2], 1)
    assert report["slots"] == 2
    kernel, direct = report["prefix_cache"]
    assert kernel["prompt_tokens"] == direct["prompt_tokens"] > 0
    assert 0.0 <= kernel["hit_rate"] <= 1.0


def test_bench_driver_refuses_a_bad_concurrency_list() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "bench", "driver", "--concurrency", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "positive integers" in out.stderr


def test_bench_driver_sequential_mode_runs_the_kernel_then_the_direct_path() -> None:
    report = _bench(
        "--driver",
        "sim",
        "--concurrency",
        "2",
        "--requests",
        "1",
        "--tokens",
        "4",
        "--turns",
        "2",
        "--driver-option",
        "tokens_per_s=500",
        "--rounds",
        "1",
        "--sequential",
    )
    assert report["mode"] == "sequential"
    assert [(r["path"], r["concurrency"]) for r in report["runs"]] == [("kernel", 2), ("direct", 2)]
    assert all(r["ran_first"] for r in report["runs"])  # each path ran alone


def test_bench_driver_refuses_zero_rounds() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "bench", "driver", "--rounds", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--rounds" in out.stderr


def test_bench_driver_versus_compares_two_kernels_with_different_driver_options() -> None:
    """``--versus`` runs a second kernel whose driver options differ (here the simulated
    decode rate; for the openai driver: a router vs two endpoints) interleaved with the
    first, and reports both side by side, the prefix-cache workload on each too."""
    report = _bench(
        "--driver", "sim", "--concurrency", "2", "--requests", "1", "--tokens", "6",
        "--turns", "2", "--rounds", "2", "--driver-option", "tokens_per_s=400",
        "--driver-option", "seed=3", "--versus", "tokens_per_s=800", "--versus", "seed=",
    )  # fmt: skip
    assert report["paths"] == ["kernel", "versus"]
    assert report["driver_options"] == ["tokens_per_s=400", "seed=3"]
    assert report["versus_options"] == ["tokens_per_s=800"]
    runs = report["runs"]
    assert [(r["round"], r["path"]) for r in runs] == [
        (0, "kernel"), (0, "versus"), (1, "kernel"), (1, "versus"),
    ]  # fmt: skip
    assert [r["ran_first"] for r in runs] == [True, False, False, True]
    assert all(r["output_tokens"] > 0 and r["ttft_p50_ms"] > 0 for r in runs)
    (summary,) = report["summary"]
    assert summary["kernel_tokens_per_s"] > 0 and summary["versus_tokens_per_s"] > 0
    assert summary["kernel_ttft_p50_ms"] > 0 and summary["versus_ttft_p50_ms"] > 0
    kernel, versus = report["prefix_cache"]
    assert (kernel["path"], versus["path"]) == ("kernel", "versus")
    assert kernel["prompt_tokens"] == versus["prompt_tokens"] > 0


def test_bench_driver_refuses_versus_with_sequential() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "bench", "driver", "--driver", "sim",
         "--versus", "tokens_per_s=9", "--sequential"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "--versus runs two kernels interleaved" in out.stderr
