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


def test_with_vllm_option_builds_the_same_setup_on_both_sides(tmp_path) -> None:
    """The plumbing of --with-vllm (running it takes minutes: not in CI): `vllm serve` gets
    the kernel vLLM driver's defaults, both engines the same offline, pinned environment,
    and the summary divides the gateway's tokens/s by vllm serve's."""
    from llmos.ctl.bench_gateway import vllm_env, vllm_serve_command, vllm_summary
    from llmos.ctl.cli import build_parser

    args = build_parser().parse_args(["bench", "gateway", "--with-vllm", "--vllm-only"])
    assert args.with_vllm and args.vllm_only and args.vllm_clients == "1,4"
    cmd = vllm_serve_command(tmp_path, 8123, 4)
    assert "vllm.entrypoints.openai.api_server" in cmd  # vLLM's own OpenAI server
    assert cmd[cmd.index("--model") + 1] == str(tmp_path)
    for flag, value in (("--port", "8123"), ("--max-num-seqs", "4"), ("--dtype", "float32"),
                        ("--max-model-len", "4096")):  # fmt: skip
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enforce-eager" in cmd
    env = vllm_env({"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    rows = [
        {"clients": 1, "path": p, "tokens_per_s": t, "ttft_p50_ms": 1.0, "request_p50_ms": 2.0}
        for p, t in (
            ("vllm-serve", 20.0),
            ("gateway", 19.0),
            ("vllm-serve", 22.0),
            ("gateway", 21.0),
        )  # fmt: skip
    ]
    (s,) = vllm_summary(rows)
    assert s["vllm_serve_tokens_per_s"] == 21.0 and s["ratio"] == 20.0 / 21.0
