"""llm.cancel against the real daemon (simulator): one generation ends at the next token,
its caller gets ECANCELED, and the process goes on; only the caller, its ancestors and the
admin may cancel it."""

from __future__ import annotations

import threading

import pytest

from syscalls.errors import ERRORS, Errno
from tests.conftest import wait_until
from tests.kernels import Daemon

ECANCELED, EPERM = ERRORS[Errno.ECANCELED], ERRORS[Errno.EPERM]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    """A real kernel daemon on the simulator, slow enough to cancel mid-generation."""
    k = Daemon(
        tmp_path_factory.mktemp("cancel"),
        "--driver",
        "sim",
        "--slots",
        "2",
        "--driver-option",
        "tokens_per_s=50",
    ).start()
    yield k
    k.stop()


def test_cancel_ends_one_generation_and_the_process_goes_on(admin, spawn) -> None:
    parent = spawn("parent")
    p = parent.spawn("talker")
    outcome: dict = {}

    def talk() -> None:
        try:
            outcome["text"] = p.chat("<sim:reply=2000> go on", max_tokens=2000)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            outcome["error"] = exc

    thread = threading.Thread(target=talk)
    thread.start()
    wait_until(lambda: admin.ps(p.pid)[0].output_tokens >= 5)
    assert parent.cancel(p.pid).cancelled == 1  # an ancestor may cancel it
    thread.join(30)
    assert isinstance(outcome.get("error"), ECANCELED), outcome
    assert "goes on" in str(outcome["error"])
    row = admin.ps(p.pid)[0]
    assert row.state == "WAITING" and row.output_tokens >= 5
    assert p.context() == []  # a cancelled chat turn is not kept
    assert admin.stat().models[0].busy == 0  # the slot is free
    assert p.chat("<sim:reply=3> again", max_tokens=3)  # the process is fine
    assert p.cancel().cancelled == 0  # nothing to cancel now
    with pytest.raises(EPERM):
        spawn("stranger").cancel(p.pid)


def test_a_generation_cancelled_while_stopped_leaves_the_process_idle(admin, spawn) -> None:
    p = spawn("stopped-talker")
    thread = threading.Thread(
        target=lambda: pytest.raises(ECANCELED, p.chat, "<sim:reply=2000> go", max_tokens=2000)
    )
    thread.start()
    wait_until(lambda: admin.ps(p.pid)[0].output_tokens >= 3)
    admin.kill(p.pid, "STOP")
    wait_until(lambda: admin.ps(p.pid)[0].state == "STOPPED")
    assert admin.cancel(p.pid).cancelled == 1
    thread.join(30)
    admin.kill(p.pid, "CONT")
    assert admin.ps(p.pid)[0].state == "WAITING"  # not READY for a slot it no longer wants
