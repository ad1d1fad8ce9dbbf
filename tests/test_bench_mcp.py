"""``llmos bench mcp`` calls the same MCP server directly and through the kernel in one
run and reports both, with the difference."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_mcp_reports_direct_and_kernel_paths_side_by_side() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "bench", "mcp", "--calls", "20", "--warmup", "5",
         "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["calls"] == 20
    for path in ("direct", "kernel", "builtin"):
        r = report[path]
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["mean_ms"] > 0, (path, r)
    assert report["added_p50_ms"] == round(
        report["kernel"]["p50_ms"] - report["direct"]["p50_ms"], 3
    )
