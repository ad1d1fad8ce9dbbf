"""``llmos bench driver`` runs both paths (kernel and direct) in one run and reports them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _bench(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "llmos.cli", "bench", "driver", *args, "--json"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _check_pairs(report: dict, levels: list[int], requests: int) -> None:
    runs = report["runs"]
    assert [(r["path"], r["concurrency"]) for r in runs] == [
        (path, c) for c in levels for path in ("kernel", "direct")]
    for r in runs:
        assert r["requests"] == r["concurrency"] * requests
        assert r["output_tokens"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p95_ms"]
    assert set(report["overhead_pct"]) == {str(c) for c in levels}


def test_bench_driver_on_the_simulator_compares_kernel_and_direct_paths() -> None:
    report = _bench("--driver", "sim", "--concurrency", "1,3", "--requests", "2", "--tokens", "8", "--turns", "3",
                    "--driver-option", "tokens_per_s=500")
    _check_pairs(report, [1, 3], 2)
    kernel, direct = report["prefix_cache"]
    assert (kernel["path"], direct["path"]) == ("kernel", "direct")
    # The kernel's prompts are exactly the ones a program would send the driver itself.
    assert kernel["prompt_tokens"] == direct["prompt_tokens"] > 0


@pytest.mark.model
def test_bench_driver_on_the_real_cpu_model() -> None:
    report = _bench("--driver", "cpu", "--concurrency", "1,2", "--requests", "1", "--tokens", "6", "--turns", "2")
    _check_pairs(report, [1, 2], 1)
    assert report["slots"] == 2
    kernel, direct = report["prefix_cache"]
    assert kernel["prompt_tokens"] == direct["prompt_tokens"] > 0
    assert 0.0 <= kernel["hit_rate"] <= 1.0


def test_bench_driver_refuses_a_bad_concurrency_list() -> None:
    out = subprocess.run([sys.executable, "-m", "llmos.cli", "bench", "driver", "--concurrency", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "positive integers" in out.stderr
