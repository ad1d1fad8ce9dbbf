"""``llmos bench gateway`` runs both paths (SDK and HTTP) in one run and reports them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")


def test_bench_gateway_reports_both_paths_side_by_side() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "bench", "gateway", "--clients", "1,4",
         "--requests", "2", "--tokens", "16", "--rounds", "2", "--tokens-per-s", "400", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    runs = report["rounds"]
    assert sorted((r["round"], r["clients"], r["path"]) for r in runs) == sorted(
        (n, c, p) for n in range(2) for c in (1, 4) for p in ("sdk", "http")
    )
    for r in runs:
        assert r["requests"] == r["clients"] * 2 and r["tokens_per_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p95_ms"] < r["request_p50_ms"] * 10
    assert [s["clients"] for s in report["summary"]] == [1, 4]
    for s in report["summary"]:
        assert s["http_tokens_per_s"] > 0 and s["sdk_tokens_per_s"] > 0
        assert s["gateway_cpu_us_per_token"] is not None
