"""Detached runs against real kernel daemons: a run outlives the program that started it,
a reconnecting stream resumes at the right chunk, a run is cancelled at its next token,
bounds are refused with EAGAIN, a ``kill -9`` of the kernel mid-run loses nothing (the
run ends with the greedy text of an uninterrupted one, on the packaged model), and a
process waiting for a human shows it in ps (WCHAN) and in ``llmos pending``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kernel.runs import JOURNAL_INTERVAL_S
from llmos.client import Client
from syscalls import limits
from syscalls.errors import ERRORS, Errno
from tests.conftest import GREEDY, wait_until
from tests.kernels import Daemon

ECANCELED, EPERM, ENOENT, EAGAIN, EBUSY, EINVAL = (
    ERRORS[e]
    for e in (Errno.ECANCELED, Errno.EPERM, Errno.ENOENT, Errno.EAGAIN, Errno.EBUSY, Errno.EINVAL)
)
ROOT = Path(__file__).resolve().parent.parent

#: A program that starts a run, reads its first chunks and dies without a goodbye.
CLIENT = """
import json, os, sys
from llmos.client import Client
c = Client(os.environ["EP"], pid=int(os.environ["PID"]), token=os.environ["TOKEN"])
p = c.process(c.pid, c.token)
run = p.generate(prompt="<sim:reply=300> count", max_tokens=300, detach=True)
print(run, flush=True)
for chunk in p.stream_run(run):
    print(json.dumps([chunk.seq, chunk.text]), flush=True)
    if chunk.seq == 4:
        os._exit(0)  # gone mid-stream: no close, no reply read
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    """A real kernel daemon on the simulator: runs need no model, only time."""
    k = Daemon(
        tmp_path_factory.mktemp("runs"),
        "--driver",
        "sim",
        "--slots",
        "2",
        "--driver-option",
        "tokens_per_s=150",
    ).start()
    yield k
    k.stop()


def test_a_run_outlives_its_client_and_a_reconnecting_stream_misses_nothing(
    daemon, admin, spawn
) -> None:
    p = spawn("detached")
    env = {**os.environ, "EP": daemon.endpoint, "PID": str(p.pid), "TOKEN": p.token}
    out = subprocess.run(
        [sys.executable, "-c", CLIENT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = out.stdout.split("\n")
    run, first = int(lines[0]), [json.loads(x) for x in lines[1:] if x]
    assert [seq for seq, _ in first] == [0, 1, 2, 3, 4], out.stderr
    assert admin.run_info(run).state in ("queued", "running")  # its client is gone; it is not
    rest = list(p.stream_run(run, from_seq=5))  # reconnect where the dead client stopped
    assert [c.seq for c in rest] == list(range(5, 5 + len(rest)))
    assert p.last is not None and p.last.finish_reason == "stop"
    text = "".join(t for _, t in first) + "".join(c.text for c in rest)
    assert p.last.text == text and p.last.usage.output_tokens == 300
    info = admin.run_info(run)
    assert (info.state, info.chunks, info.output_tokens) == ("done", 5 + len(rest), 300)
    again = list(admin.stream_run(run, from_seq=info.chunks - 2))  # the admin may read it too
    assert [c.seq for c in again] == [info.chunks - 2, info.chunks - 1]
    assert p.wait_run(run).text == text  # its result, and it is collected
    with pytest.raises(ENOENT):
        p.run_info(run)


def test_a_chat_run_commits_its_turn_and_runs_of_a_process_queue(admin, spawn) -> None:
    p = spawn("queued", system="sys")
    first = p.generate(
        [{"role": "user", "content": "<sim:reply=150> one"}], max_tokens=150, detach=True
    )
    second = p.generate(
        [{"role": "user", "content": "<sim:reply=5> two"}], max_tokens=5, detach=True
    )
    assert p.run_info(second).state == "queued"  # one generation at a time per process
    with pytest.raises(EBUSY):  # a plain generate keeps today's rule
        p.chat("<sim:reply=2> now", max_tokens=2)
    assert [r.run for r in p.runs()] == [first, second]
    assert admin.ps(p.pid)[0].wchan == "llm"
    one, two = p.wait_run(first), p.wait_run(second)
    assert (one.usage.output_tokens, two.usage.output_tokens) == (150, 5)
    ctx = [(x["role"], x["content"]) for x in p.context()]
    assert ctx == [
        ("system", "sys"),
        ("user", "<sim:reply=150> one"),
        ("assistant", one.text),
        ("user", "<sim:reply=5> two"),
        ("assistant", two.text),
    ]
    assert admin.ps(p.pid)[0].wchan == ""


def test_cancel_of_a_run_ends_it_with_its_text_and_the_process_goes_on(admin, spawn) -> None:
    parent = spawn("parent")
    p = parent.spawn("worker")
    run = p.generate(prompt="<sim:reply=5000> go", max_tokens=5000, detach=True)
    wait_until(lambda: p.run_info(run).output_tokens >= 10)
    with pytest.raises(EPERM):
        spawn("stranger").cancel_run(run)
    assert parent.cancel_run(run).cancelled == 1  # an ancestor may cancel it
    with pytest.raises(ECANCELED) as got:
        p.wait_run(run, keep=True)
    assert "goes on" in got.value.message and got.value.text
    info = p.run_info(run)
    assert info.state == "cancelled" and info.error is not None and info.error.code == "ECANCELED"
    texts: list[str] = []
    with pytest.raises(ECANCELED):  # its chunks, then the run's error
        texts.extend(c.text for c in p.stream_run(run))
    assert "".join(texts) == got.value.text
    assert info.output_tokens < 5000 and admin.stat().models[0].busy == 0
    assert p.chat("<sim:reply=3> again", max_tokens=3)  # the process is fine
    assert parent.cancel_run(run).cancelled == 0  # nothing left to cancel
    p.collect_run(run)
    with pytest.raises(ENOENT):
        p.wait_run(run)


def test_bounds_and_bad_requests_are_refused_with_their_errno(spawn) -> None:
    p = spawn("greedy")
    long = p.generate(prompt="<sim:reply=5000> x", max_tokens=5000, detach=True)
    with pytest.raises(EBUSY):  # a run that goes on is not collected
        p.collect_run(long)
    runs = [
        p.generate(prompt="<sim:reply=1> x", max_tokens=1, detach=True)
        for _ in range(limits.MAX_RUNS_PER_PROC - 1)
    ]
    with pytest.raises(EAGAIN, match="collect finished ones"):
        p.generate(prompt="<sim:reply=1> x", max_tokens=1, detach=True)
    p.cancel_run(long)
    with pytest.raises(ECANCELED):
        p.wait_run(long)  # collected: there is room again
    runs.append(p.generate(prompt="<sim:reply=1> x", max_tokens=1, detach=True))
    with pytest.raises(EINVAL, match="llm.stream"):
        p.generate(prompt="x", detach=True, stream=True)
    with pytest.raises(ENOENT):
        p.run_info(10**9)
    p.wait_run(runs[1], keep=True)
    with pytest.raises(EINVAL, match="past them"):
        list(p.stream_run(runs[1], from_seq=1000))
    for run in runs[1:]:
        p.wait_run(run)


def test_a_process_waiting_for_a_human_shows_it_in_ps_and_pending(daemon, admin, spawn) -> None:
    server = spawn("server")
    server.tools.register("launch", "Launch it (cannot be undone).", irreversible=True)
    asker = server.spawn("asker", confirm=True)  # a served tool is its program's
    outcome: dict = {}

    def ask() -> None:
        with Client(daemon.endpoint, pid=asker.pid, token=asker.token) as c:
            try:
                c.process(asker.pid, asker.token).tools.call("launch", {}, timeout_s=60)
            except Exception as exc:  # noqa: BLE001 - recorded for the assertion
                outcome["error"] = exc

    thread = threading.Thread(target=ask)
    thread.start()
    wait_until(lambda: admin.ps(asker.pid)[0].wchan == "confirm:launch")
    cli = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "pending"],
        env=daemon.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    row = next(line for line in cli.stdout.splitlines() if "launch" in line).split()
    assert row[1:4] == [str(asker.pid), "asker", "launch"]  # which process, since when
    ps = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "ps", "-o", "pid,wchan,name"],
        env=daemon.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"{asker.pid} confirm:launch asker" in " ".join(ps.stdout.split())
    admin.deny(admin.pending()[0].id)
    thread.join(30)
    assert isinstance(outcome.get("error"), EPERM)
    assert admin.ps(asker.pid)[0].wchan == ""


@pytest.mark.model
def test_kill_9_mid_run_then_restart_finishes_with_the_uninterrupted_greedy_text(
    tmp_path: Path,
) -> None:
    base = tmp_path / "k"
    first = Daemon(base, "--slots", "1").start()
    ask = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    options = dict(max_tokens=64, **GREEDY)
    with first.admin() as admin:
        ref = admin.spawn("reference", system="You are a storyteller.")
        expected = ref.generate(ask, **options).text
        p = admin.spawn("survivor", system="You are a storyteller.")
        run = p.generate(ask, detach=True, **options)
        wait_until(lambda: p.run_info(run).output_tokens >= 16, timeout=300)
        seen = list(_take(p.stream_run(run), 3))  # a client saw its first chunks
        time.sleep(2 * JOURNAL_INTERVAL_S)  # they are journaled by now
        assert p.run_info(run).state == "running"
    assert first.proc is not None
    os.kill(first.proc.pid, signal.SIGKILL)  # mid-run, no shutdown of any kind
    first.proc.wait(10)

    second = Daemon(base, "--slots", "1").start()
    try:
        with Client(second.endpoint, pid=p.pid, token=p.token) as c:
            again = c.process(p.pid, p.token)
            info = again.run_info(run)
            assert info.resumed == 1 and info.state in ("queued", "running", "done")
            assert info.chunks >= 3  # it went on from journaled tokens, not from nothing
            replay = list(_take(again.stream_run(run), 3))
            assert [(x.seq, x.text) for x in replay] == [(x.seq, x.text) for x in seen]
            result = again.wait_run(run, timeout=600)
            assert result.text == expected  # exactly what an uninterrupted run made
            assert again.context()[-1] == {"role": "assistant", "content": expected}
            assert again.context()[-2] == ask[0]  # the chat turn is committed, as today
        with second.admin() as admin:
            row = admin.ps(p.pid)[0]
            assert row.state == "WAITING" and row.output_tokens >= result.usage.output_tokens
    finally:
        second.stop()


def _take(chunks, n: int):
    for i, chunk in enumerate(chunks):
        yield chunk
        if i + 1 == n:
            return
