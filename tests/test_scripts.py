"""Spawning agents from scripts: ``llmos.spawn`` from threads and asyncio, ``with`` /
``async with`` blocks that reap what they spawned, and ``llmos spawn`` / ``llmos wait``
with Unix exit codes, against a real kernel daemon (simulated model: no model needed)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import llmos
from llmos.client import AsyncClient
from tests.kernels import Daemon


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    k = Daemon(tmp_path_factory.mktemp("scripts"), "--driver", "sim").start()
    yield k
    k.stop()


@pytest.fixture(autouse=True)
def _runtime(sim: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_RUNTIME_DIR", str(sim.run_dir))
    monkeypatch.setenv("LLMOS_STATE_DIR", str(sim.state_dir))


def _alive(sim: Daemon) -> set[int]:
    with sim.admin() as admin:
        return {p.pid for p in admin.ps() if p.pid > 1}


def test_with_blocks_reap_what_they_spawned(sim: Daemon) -> None:
    with llmos.spawn("scripted") as p:
        assert p.generate(prompt="hi", max_tokens=3).usage.output_tokens == 3
        with p.spawn("kid") as kid:
            assert kid.pid in _alive(sim)
        assert kid.pid not in _alive(sim)  # killed and reaped by its parent
        assert p.pid in _alive(sim)
    assert p.pid not in _alive(sim)
    assert p.reap() is None  # reaping twice is harmless


def test_many_processes_spawned_from_threads_and_asyncio(sim: Daemon) -> None:
    pids: list[int] = []

    def worker(i: int) -> None:
        with llmos.spawn(f"thread{i}") as p:
            p.generate(prompt=f"task {i}", max_tokens=2)
            pids.append(p.pid)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(pids)) == 8

    async def main() -> list[int]:
        async with AsyncClient(sim.endpoint, pid=0, token=sim.token) as c:
            procs = await asyncio.gather(*(c.spawn(f"async{i}") for i in range(8)))

            async def run(p: llmos.AsyncProcess) -> int:
                async with p:
                    await p.generate(prompt="go", max_tokens=2)
                    return p.pid

            return await asyncio.gather(*(run(p) for p in procs))

    async_pids = asyncio.run(main())
    assert len(set(async_pids)) == 8
    assert not (set(pids) | set(async_pids)) & _alive(sim)


def test_llmos_spawn_and_wait_follow_unix_exit_codes(sim: Daemon) -> None:
    env = {
        **os.environ,
        "LLMOS_RUNTIME_DIR": str(sim.run_dir),
        "LLMOS_STATE_DIR": str(sim.state_dir),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llmos.ctl.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parent.parent,
        )

    spawned = cli("spawn", "--name", "waited", "--json")
    assert spawned.returncode == 0
    pid = __import__("json").loads(spawned.stdout)["pid"]
    assert cli("wait", str(pid), "--timeout", "0.5").returncode == 124  # still running
    with sim.admin() as admin:
        admin.kill(pid, "TERM")
    done = cli("wait", str(pid))
    assert done.returncode == 143 and "SIGTERM" in done.stderr  # 128 + 15, as a shell reports it
    missing = cli("wait", "999999")
    assert missing.returncode == 1 and ("ECHILD" in missing.stderr or "ESRCH" in missing.stderr)
