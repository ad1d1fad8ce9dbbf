"""``llmos bench trace`` runs kernels with tracing off, on and on with metrics side by side."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_trace_compares_tracing_on_and_off_in_one_run() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "bench", "trace", "--calls", "300",
         "--rounds", "2", "--streams", "4", "--requests", "1", "--tokens", "16", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    configs = ("off", "trace", "trace+metrics")
    assert sorted((r["round"], r["config"]) for r in report["runs"]) == sorted(
        (n, c) for n in range(2) for c in configs
    )
    for r in report["runs"]:
        assert r["mean_us"] > 0 and r["kernel_cpu_us_per_call"] >= 0
        assert r["output_tokens"] == 4 * 16 and r["tokens_per_s"] > 0
    summary = {s["config"]: s for s in report["summary"]}
    assert set(summary) == set(configs)
    assert "tokens_per_s_cost_pct" in summary["trace"] and "added_us_per_call" not in summary["off"]
    parts = report["parts"]
    assert parts["loop_record_us"] > 0 and parts["thread_export_us"] > 0
