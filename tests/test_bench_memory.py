"""``llmos bench memory`` runs end to end on a small size and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.model


def test_bench_memory_reports_put_and_search_figures_as_json() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmos.ctl.cli",
            "bench",
            "memory",
            "--sizes",
            "300,600",
            "--searches",
            "5",
            "--puts",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    report = json.loads(out.stdout)
    assert [r["entries"] for r in report["rows"]] == [300, 600]
    for row in report["rows"]:
        assert row["fill_entries_per_s"] > 0 and row["search_p50_ms"] > 0
        assert row["search_scan_p50_ms"] <= row["search_p50_ms"]
    assert report["goal_met"] is None  # 100k entries were not measured
