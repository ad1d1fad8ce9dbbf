"""`llmos top` as a user types it, against the session's real kernel (its runtime dir is
handed to the CLI through the environment, as `llmos kernel start` would leave it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llmos.ctl.top import tok_shares, top_view
from syscalls import models as m
from tests.conftest import wait_until
from tests.kernels import Daemon

ROOT = Path(__file__).resolve().parent.parent


def top(daemon: Daemon, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "top", *args],
        env={**daemon.env, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def row(pid: int, out: int) -> m.ProcInfo:
    return m.ProcInfo(
        pid=pid,
        ppid=1,
        name=f"p{pid}",
        owner="u",
        state="WAITING",
        nice=0,
        model="x",
        context_messages=0,
        generate_calls=1,
        prompt_tokens=1,
        output_tokens=out,
        service_s=0.0,
        wait_s=0.0,
        created=0.0,
    )


def snapshot(*rows: m.ProcInfo) -> m.StatResult:
    return m.StatResult(
        time=0.0,
        uptime_s=1.0,
        policy="fifo",
        models=[m.ModelStat(name="x", driver="sim", slots=1, busy=0, queued=0, state="ready")],
        states={"WAITING": len(rows)},
        tokens=m.TokenStat(window_s=10, prompt_tps=0, output_tps=0, prompt_total=0, output_total=0),
        host=m.HostStat(
            cpus=1,
            cpu_percent=0,
            load_avg=[0, 0, 0],
            mem_total=2,
            mem_available=1,
            kernel_rss=1,
            kernel_cpu_s=0,
            kernel_cpu_percent=0,
        ),
        procs=list(rows),
    )


# -- %TOK, computed client-side -----------------------------------------------------------


def test_tok_share_is_each_process_part_of_the_tokens_made_since_the_last_snapshot():
    prev = snapshot(row(2, 100), row(3, 10))
    now = snapshot(row(2, 110), row(3, 40), row(4, 20))  # 4 is new: all its tokens are recent
    assert tok_shares(now, prev) == {
        2: pytest.approx(100 / 6),
        3: pytest.approx(50.0),
        4: pytest.approx(100 / 3),
    }


def test_tok_share_of_a_first_snapshot_uses_lifetime_totals_and_an_idle_one_is_zero():
    first = snapshot(row(2, 30), row(3, 10))
    assert tok_shares(first, None) == {2: 75.0, 3: 25.0}
    assert tok_shares(first, first) == {2: 0.0, 3: 0.0}


def test_the_view_sorts_processes_by_tok_share():
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(top_view(snapshot(row(2, 100), row(3, 10)), snapshot(row(2, 100), row(3, 0))))
    text = console.export_text()
    assert text.index(" p3") < text.index(" p2") and "%TOK" in text


# -- the command ------------------------------------------------------------------------


@pytest.mark.model
def test_top_once_prints_the_header_and_the_process_table(daemon: Daemon, spawn):
    p = spawn("top-target")
    res = top(daemon, "--once", COLUMNS="160")
    assert res.returncode == 0, res.stderr
    for text in (
        "slots 0/2 busy",
        "NEW",
        "tokens",
        "host",
        "kernel rss",
        "PID",
        "%TOK",
        "top-target",
        str(p.pid),
    ):
        assert text in res.stdout, text


@pytest.mark.model
def test_top_json_prints_the_raw_sys_stat_result(daemon: Daemon, spawn):
    p = spawn("json-target")
    res = top(daemon, "--json")
    assert res.returncode == 0, res.stderr
    stat = m.StatResult.model_validate(json.loads(res.stdout))
    assert p.pid in {r.pid for r in stat.procs} and stat.models[0].slots == 2


@pytest.mark.model
def test_top_refreshes_until_ctrl_c_then_exits_zero(daemon: Daemon):
    env = {
        **daemon.env,
        "TTY_COMPATIBLE": "1",
        "TTY_INTERACTIVE": "1",
        "COLUMNS": "120",
        "LINES": "40",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmos.ctl.cli", "top", "--interval", "0.2"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    reader = threading.Thread(
        target=lambda: seen.extend(iter(lambda: proc.stdout.read(256), "")), daemon=True
    )
    reader.start()
    try:
        wait_until(lambda: "".join(seen).count("llmos top") >= 2, timeout=60)  # two frames drawn
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
    reader.join(10)
    assert rc == 0, proc.stderr.read()


def test_top_without_a_kernel_says_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    env |= {"LLMOS_RUNTIME_DIR": str(tmp_path / "run"), "LLMOS_STATE_DIR": str(tmp_path / "state")}
    res = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "top", "--once"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        res.returncode == 1 and "ECONNREFUSED" in res.stderr and "llmos kernel start" in res.stderr
    )
