"""Tool syscalls against the real kernel: built-in tools, argument validation, the Python
runner's limits, tools served by user-space programs (failing, hanging, returning
garbage, exiting), capabilities and the owner's confirmation of irreversible calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

from llmos.client import Client, Process
from syscalls.errors import ERRORS, Errno
from tests.conftest import needs_bwrap, wait_until
from tests.kernels import Daemon

pytestmark = pytest.mark.model

EINVAL, EPERM, ENOENT, EIO, ETIMEDOUT, EBUSY = (
    ERRORS[e]
    for e in (Errno.EINVAL, Errno.EPERM, Errno.ENOENT, Errno.EIO, Errno.ETIMEDOUT, Errno.EBUSY)
)
Spawn = Callable[..., Process]


def test_tool_list_describes_the_builtin_tools_with_schemas(spawn: Spawn) -> None:
    tools = {t.name: t for t in spawn("lister", tools=["*", "python"]).tools.list()}
    assert {
        "calculator",
        "datetime",
        "python",
        "fs_read",
        "fs_write",
        "fs_search",
        "memory_search",
    } <= set(tools)
    assert tools["calculator"].parameters["required"] == ["expression"]
    assert tools["python"].irreversible and not tools["calculator"].irreversible


def test_calculator_computes_and_refuses_anything_but_arithmetic(spawn: Spawn) -> None:
    t = spawn("calc").tools
    assert t.call("calculator", {"expression": "(17 * 23) + sqrt(16)"})["value"] == 395.0
    for bad in (
        "__import__('os').system('id')",
        "open('/etc/passwd').read()",
        "2 ** 10 ** 10",
        "[1, 2]",
    ):
        with pytest.raises(EINVAL):
            t.call("calculator", {"expression": bad})
    with pytest.raises(EINVAL, match="expression"):
        t.call("calculator", {})  # validated before anything runs
    with pytest.raises(EINVAL, match="expression"):
        t.call("calculator", {"expression": 42})
    with pytest.raises(ENOENT, match="tool.list"):
        t.call("no_such_tool")


def test_datetime_tool_answers_in_a_time_zone(spawn: Spawn) -> None:
    t = spawn("clock").tools
    now = t.call("datetime", {"timezone": "Asia/Tokyo"})
    assert now["iso"].endswith("+09:00") and abs(now["unix"] - time.time()) < 60
    with pytest.raises(EINVAL, match="time zone"):
        t.call("datetime", {"timezone": "Mars/Olympus"})


@needs_bwrap
def test_python_runner_runs_in_the_file_root_within_its_limits(spawn: Spawn) -> None:
    p = spawn("py", tools=["python", "calculator"])
    out = p.tools.call("python", {"code": "open('made.txt', 'w').write('hi'); print(6 * 7)"})
    assert (out["exit_code"], out["stdout"].strip(), out["timed_out"]) == (0, "42", False)
    assert p.files.read("made.txt") == "hi"
    slow = p.tools.call("python", {"code": "import time; time.sleep(30)", "timeout_s": 1.5})
    assert slow["timed_out"] and slow["wall_s"] < 10
    spin = p.tools.call("python", {"code": "while True: pass", "timeout_s": 20}, timeout_s=40)
    assert spin["signal"] in (9, 24) or spin["timed_out"]  # SIGXCPU at the CPU limit
    assert spin["wall_s"] < 30
    hog = p.tools.call("python", {"code": "x = bytearray(4 << 30)"})
    assert hog["exit_code"] != 0 and "MemoryError" in hog["stderr"]
    crash = p.tools.call("python", {"code": "raise SystemExit(3)"})
    assert crash["exit_code"] == 3
    assert p.tools.call("calculator", {"expression": "1+1"})["value"] == 2  # the kernel is fine


class Reverse(BaseModel):
    text: str


def _serve(
    admin: Client,
    name: str,
    handlers: dict[str, Any],
    ready: threading.Event,
    stop: threading.Event,
    box: dict[str, Any],
) -> None:
    with Client(admin.endpoint, pid=0, token=admin.token) as c:
        server = c.spawn(name)
        box["pid"] = server.pid
        # The admin registers them for every process (a process's own serve its program).
        c.register_tool("reverse", "Reverse a text.", Reverse, server=server.pid)
        c.register_tool("slow", "Never answers.", {"type": "object"}, server=server.pid)
        c.register_tool("huge", "Answers too much.", {"type": "object"}, server=server.pid)
        ready.set()
        box["answered"] = server.tools.serve(handlers, stop=stop.is_set, poll_s=0.2)


def test_tools_served_by_a_user_space_program(spawn: Spawn, admin: Client) -> None:
    ready, stop, box = threading.Event(), threading.Event(), {}
    seen: list[dict[str, Any]] = []

    def reverse(text: str) -> str:
        seen.append({"text": text})
        if text == "boom":
            raise ValueError("cannot reverse boom")
        return text[::-1]

    def slow() -> None:
        time.sleep(3)

    handlers = {"reverse": reverse, "slow": slow, "huge": lambda: "x" * (600 << 10)}
    thread = threading.Thread(
        target=_serve, args=(admin, "server", handlers, ready, stop, box), daemon=True
    )
    thread.start()
    assert ready.wait(30)
    caller = spawn("caller")
    try:
        assert caller.tools.call("reverse", {"text": "llmos"}) == "somll"
        with pytest.raises(EINVAL, match="text"):
            caller.tools.call(
                "reverse", {"text": 7}
            )  # refused by the kernel: the server never sees it
        assert seen == [{"text": "llmos"}]
        with pytest.raises(EIO, match="cannot reverse boom"):
            caller.tools.call("reverse", {"text": "boom"})
        with pytest.raises(ETIMEDOUT):
            caller.tools.call("slow", timeout_s=1)
        with pytest.raises(EIO, match="limit"):
            caller.tools.call("huge")
        with pytest.raises(EBUSY, match="already provided"):
            caller.tools.register("reverse", "mine now", {"type": "object"})
        with pytest.raises(EBUSY):
            caller.tools.register("calculator", "shadow the kernel's", {"type": "object"})
        assert caller.tools.call("reverse", {"text": "ab"}) == "ba"  # still serving after all that
    finally:
        stop.set()
        thread.join(10)
        admin.kill(box["pid"], "KILL")
        admin.wait(box["pid"])
    assert "reverse" not in {t.name for t in caller.tools.list()}  # gone with its server


def test_callers_of_a_server_that_exits_get_an_error_at_once(spawn: Spawn, admin: Client) -> None:
    server = spawn("lazy-server")
    admin.register_tool(  # for every process: the waiter is another program
        "later", "Answers never: its server exits first.", {"type": "object"}, server=server.pid
    )
    caller = spawn("waiter")
    result: dict[str, Any] = {}

    def call() -> None:
        with Client(admin.endpoint, pid=caller.pid, token=caller.token) as c:
            try:
                c.process(caller.pid, caller.token).tools.call("later", timeout_s=60)
            except Exception as exc:  # noqa: BLE001 - recorded for the assertion
                result["error"] = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.5)
    admin.kill(server.pid, "KILL")
    thread.join(30)
    assert isinstance(result.get("error"), EIO) and "exited" in str(result["error"])
    assert time.monotonic() - t0 < 10


def test_tool_capabilities_only_narrow_down_the_tree(spawn: Spawn) -> None:
    p = spawn("limited", tools=["calculator", "fs_*"])
    assert {t.name for t in p.tools.list()} == {
        "calculator",
        "fs_read",
        "fs_write",
        "fs_list",
        "fs_search",
    }
    with pytest.raises(EPERM, match="may not use tool 'python'"):
        p.tools.call("python", {"code": "print(1)"})
    child = p.spawn("wider", tools=["*"])  # asks for everything, gets what its parent has
    with pytest.raises(EPERM):
        child.tools.call("python", {"code": "print(1)"})
    narrower = p.spawn("narrower", tools=["fs_read"])
    assert [t.name for t in narrower.tools.list()] == ["fs_read"]


@needs_bwrap
def test_irreversible_calls_wait_for_the_owner(spawn: Spawn, admin: Client) -> None:
    p = spawn("careful", confirm=True, tools=["python", "calculator"])
    kid = p.spawn("kid", confirm=False)  # cannot switch it off
    outcomes: dict[str, Any] = {}

    def call(label: str, proc: Process, timeout_s: float) -> None:
        with Client(admin.endpoint, pid=proc.pid, token=proc.token) as c:
            try:
                outcomes[label] = c.process(proc.pid, proc.token).tools.call(
                    "python", {"code": "print('ran')"}, timeout_s=timeout_s
                )
            except Exception as exc:  # noqa: BLE001
                outcomes[label] = exc

    assert p.tools.call("calculator", {"expression": "2*3"})["value"] == 6  # reversible: no wait
    for label, proc, approve in (("approved", p, True), ("denied", kid, False)):
        thread = threading.Thread(target=call, args=(label, proc, 30))
        thread.start()
        wait_until(lambda: len(admin.pending()) == 1)
        parked = admin.pending()[0]
        assert (parked.name, parked.caller, parked.args) == (
            "python",
            proc.pid,
            {"code": "print('ran')"},
        )
        (admin.approve if approve else admin.deny)(parked.id)
        thread.join(30)
    assert outcomes["approved"]["stdout"] == "ran\n"
    assert isinstance(outcomes["denied"], EPERM) and "did not approve" in str(outcomes["denied"])
    t0 = time.monotonic()
    call("unanswered", p, 1.0)
    assert isinstance(outcomes["unanswered"], EPERM) and time.monotonic() - t0 < 10
    assert admin.pending() == []
    with pytest.raises(EPERM, match="only the kernel's owner"):
        p.call("tool.approve", {"id": 1})


def test_served_tools_and_capabilities_survive_nothing_they_should_not(tmp_path) -> None:
    """Capabilities are part of the durable process table; served tools end with the kernel."""
    k = Daemon(tmp_path, "--driver", "sim").start()
    try:
        with k.admin() as admin:
            p = admin.spawn("capped", tools=["calculator"], confirm=True)
            p.tools.register("mine", "a served tool", {"type": "object"})
            pid, token = p.pid, p.token
        k.stop()
        k.start()
        with Client(k.endpoint, pid=pid, token=token) as c:
            again = c.process(pid, token)
            assert [t.name for t in again.tools.list()] == ["calculator"]
            with pytest.raises(ENOENT):
                again.tools.call("mine")
    finally:
        k.stop()
