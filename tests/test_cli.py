"""The `llmos` command as a user types it: kernel start/status/stop, run, ps, kill, ask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmos.client import Client
from tests.conftest import needs_bwrap

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parent.parent


class Shell:
    """Runs ``llmos ...`` with a private runtime/state dir, like a user's terminal."""

    def __init__(self, base: Path) -> None:
        self.env = {
            **os.environ,
            "LLMOS_RUNTIME_DIR": str(base / "run"),
            "LLMOS_STATE_DIR": str(base / "state"),
        }
        self.run_dir = base / "run"

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llmos.ctl.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def admin(self) -> Client:
        return Client(
            f"ipc://{self.run_dir / 'kernel.sock'}",
            pid=0,
            token=(self.run_dir / "admin.token").read_text().strip(),
        )


@pytest.fixture(scope="module")
def sh(tmp_path_factory: pytest.TempPathFactory):
    shell = Shell(tmp_path_factory.mktemp("cli"))
    started = shell("kernel", "start", "--slots", "2")
    assert started.returncode == 0, started.stderr
    assert "kernel ready" in started.stderr
    yield shell
    shell("kernel", "stop")


def test_kernel_status_reports_the_running_kernel(sh):
    res = sh("kernel", "status", "--json")
    assert res.returncode == 0
    status = json.loads(res.stdout)
    assert status["running"] and status["info"]["models"][0]["state"] == "ready"
    human = sh("kernel", "status")
    assert "SmolLM2" in human.stdout and "2 slots" in human.stdout


def test_the_runtime_dir_and_credentials_are_private(sh):
    assert (sh.run_dir.stat().st_mode & 0o777) == 0o700
    assert ((sh.run_dir / "admin.token").stat().st_mode & 0o777) == 0o600
    assert ((sh.run_dir / "kernel.sock").stat().st_mode & 0o077) == 0


def test_a_second_kernel_on_the_same_runtime_dir_is_refused(sh):
    again = sh("kernel", "start")
    assert again.returncode == 0 and "already running" in again.stderr
    direct = subprocess.run(
        [sys.executable, "-m", "kernel"],
        env=sh.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert direct.returncode == 1
    assert sh("kernel", "status").returncode == 0  # the first one is unharmed


def test_run_hello_example_talks_to_the_model_and_exits_zero(sh):
    res = sh("run", "examples/hello.py")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[hello] model:" in res.stdout
    assert "user -> assistant -> user -> assistant" in res.stdout
    assert "exited with status 0" in res.stderr


def test_run_reports_the_program_status_and_reaps_its_process_tree(sh, tmp_path):
    prog = tmp_path / "spawner.py"
    prog.write_text(
        textwrap.dedent("""
        import sys, llmos
        me = llmos.this_process()
        kid = me.spawn("kid")
        kid.spawn("grandkid")
        print(me.pid, flush=True)
        sys.exit(3)
    """)
    )
    res = sh("run", str(prog))
    assert res.returncode == 3, res.stderr
    pid = int(res.stdout.split()[0])
    with sh.admin() as c:
        assert all(p.pid < pid or p.pid > pid + 2 for p in c.ps())


def test_a_program_without_a_process_gets_a_clear_error(tmp_path):
    prog = tmp_path / "p.py"
    prog.write_text("import llmos\nllmos.this_process()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    res = subprocess.run(
        [sys.executable, str(prog)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode != 0 and "llmos run" in res.stderr


def test_ps_json_and_kill(sh, tmp_path):
    prog = tmp_path / "sleeper.py"
    prog.write_text("import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    runner = subprocess.Popen(
        [sys.executable, "-m", "llmos.ctl.cli", "run", "--name", "sleeper", str(prog)],
        env=sh.env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert runner.stdout.readline().strip() == "up"
        rows = json.loads(sh("ps", "--json").stdout)
        me = next(r for r in rows if r["name"] == "sleeper")
        assert me["state"] == "NEW" and me["ppid"] == 1
        assert "sleeper" in sh("ps").stdout
        killed = sh("kill", "-s", "STOP", str(me["pid"]))
        assert killed.returncode == 0 and "STOPPED" in killed.stderr
        assert sh("kill", str(me["pid"]), "-s", "KILL").returncode == 0
        gone = sh("kill", "99999")
        assert gone.returncode == 1 and "ESRCH" in gone.stderr
    finally:
        runner.send_signal(signal.SIGINT)
        runner.wait(30)
    rows = json.loads(sh("ps", "--json").stdout)
    assert all(r["name"] != "sleeper" for r in rows)  # reaped after its program ended


def test_ask_answers_in_a_fresh_process_and_cleans_up(sh):
    res = sh("ask", "--json", "--max-tokens", "8", "Say hello.")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["text"] and out["usage"]["output_tokens"] <= 8
    with sh.admin() as c:
        assert all(p.pid != out["pid"] for p in c.ps())
    streamed = sh("ask", "--max-tokens", "8", "Say hello.")
    assert streamed.stdout.strip() == out["text"].strip()


def test_syscalls_prints_the_table(sh):
    res = sh("syscalls", "--json")
    names = {r["name"] for r in json.loads(res.stdout)}
    assert {"proc.spawn", "llm.generate", "ctx.get", "sys.info", "proc.kill"} <= names
    assert "llm.generate" in sh("syscalls").stdout


def test_kernel_stop_shuts_down_cleanly_and_answers_calls_in_flight(tmp_path):
    from syscalls import errors
    from tests.conftest import InThread, wait_until

    shell = Shell(tmp_path)
    assert shell("kernel", "start", "--slots", "1").returncode == 0
    pid = json.loads(shell("kernel", "status", "--json").stdout)["info"]["kernel_pid"]
    admin = shell.admin()
    p = admin.spawn("long")
    gen = InThread(
        lambda: p.generate(prompt="Count to a thousand:", max_tokens=4000, temperature=0)
    )
    wait_until(lambda: admin.ps(p.pid)[0].state == "RUNNING")
    stopped = shell("kernel", "stop")
    with pytest.raises(errors.ESHUTDOWN):
        gen.result(timeout=60)
    assert stopped.returncode == 0 and "stopped" in stopped.stderr
    status = shell("kernel", "status", "--json")
    assert status.returncode == 3 and not json.loads(status.stdout)["running"]
    assert (
        not (shell.run_dir / "kernel.sock").exists()
        and not (shell.run_dir / "admin.token").exists()
    )
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
    log = (tmp_path / "state" / "kernel.log").read_text()
    assert "kernel stopped" in log


def test_commands_without_a_kernel_say_how_to_start_one(tmp_path):
    res = Shell(tmp_path)("ps")
    assert res.returncode == 1 and "llmos kernel start" in res.stderr


def test_a_kernel_on_tcp_with_a_local_model_folder(tmp_path):
    import socket

    from drivers.packaged import ensure_exported

    folder = ensure_exported()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shell = Shell(tmp_path)
    ep = f"tcp://127.0.0.1:{port}"
    started = shell(
        "kernel",
        "start",
        "--listen",
        ep,
        "--model",
        str(folder),
        "--model-name",
        "smol",
        "--slots",
        "1",
    )
    assert started.returncode == 0, started.stderr
    try:
        info = json.loads(shell("kernel", "status", "--json").stdout)["info"]
        assert info["endpoints"] == [ep] and info["models"][0]["name"] == "smol"
        assert not (shell.run_dir / "kernel.sock").exists()
        res = shell(
            "ask", "--json", "--max-tokens", "4", "Hi"
        )  # clients find the endpoint by themselves
        assert res.returncode == 0 and json.loads(res.stdout)["usage"]["output_tokens"] <= 4
    finally:
        assert shell("kernel", "stop").returncode == 0


def test_run_sets_program_limits_that_the_program_sees(sh, tmp_path):
    prog = tmp_path / "quota.py"
    prog.write_text(
        textwrap.dedent("""
        import llmos
        me = llmos.this_process()
        try:
            me.generate(prompt="1, 2, 3,", max_tokens=3, temperature=0)
            me.generate(prompt="1, 2, 3,", max_tokens=3, temperature=0)
        except llmos.errors.EDQUOT as exc:
            print("EDQUOT", exc.message)
    """)
    )
    res = sh("run", "--limit", "max_calls_per_min=1", str(prog))
    assert res.returncode == 0, res.stderr
    assert "EDQUOT" in res.stdout and "max_calls_per_min=1" in res.stdout
    bad = sh("run", "--limit", "max_speed=3", str(prog))
    assert bad.returncode == 1 and "EINVAL" in bad.stderr


def test_a_program_that_dies_mid_generation_gives_its_slot_back(sh, tmp_path):
    prog = tmp_path / "dies.py"
    prog.write_text(
        textwrap.dedent("""
        import os, llmos
        me = llmos.this_process()
        print(os.getpid(), me.pid, flush=True)
        me.generate(prompt="Count to a thousand:", max_tokens=4000, temperature=0)
    """)
    )
    runner = subprocess.Popen(
        [sys.executable, "-m", "llmos.ctl.cli", "run", str(prog)],
        env=sh.env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os_pid, pid = map(int, runner.stdout.readline().split())
    with sh.admin() as c:
        t0 = time.monotonic()
        while c.info().models[0].busy == 0:
            assert time.monotonic() - t0 < 60
            time.sleep(0.05)
        os.kill(os_pid, signal.SIGKILL)  # the agent program dies without a word
        assert runner.wait(60) == 128 + 9
        assert c.info().models[0].busy == 0
        assert all(p.pid != pid for p in c.ps())


def test_a_kernel_serves_several_models_and_processes_pick_theirs(tmp_path):
    shell = Shell(tmp_path)
    started = shell(
        "kernel",
        "start",
        "--slots",
        "1",
        "--serve",
        "name=sim-fast,driver=sim,slots=3,tokens_per_s=400",
    )
    assert started.returncode == 0, started.stderr
    assert "SmolLM2-135M-Instruct" in started.stderr and "sim-fast" in started.stderr
    try:
        models = json.loads(shell("models", "--json").stdout)
        assert [(m["name"], m["driver"], m["slots"], m["default"]) for m in models] == [
            ("SmolLM2-135M-Instruct", "cpu", 1, True),
            ("sim-fast", "sim", 3, False),
        ]
        table = shell("models")
        assert table.returncode == 0 and "sim-fast" in table.stdout and "(default)" in table.stdout
        on_sim = json.loads(
            shell("ask", "--json", "--model", "sim-fast", "--max-tokens", "5", "Hi").stdout
        )
        assert on_sim["usage"]["output_tokens"] == 5
        on_cpu = json.loads(shell("ask", "--json", "--max-tokens", "3", "Hi").stdout)
        assert 1 <= on_cpu["usage"]["output_tokens"] <= 3
        with shell.admin() as admin:
            p = admin.spawn("picker", model="sim-fast")
            assert {r.pid: r.model for r in admin.ps()}[p.pid] == "sim-fast"
        missing = shell("ask", "--model", "nope", "Hi")
        assert (
            missing.returncode == 1 and "ENOENT" in missing.stderr and "sim-fast" in missing.stderr
        )
    finally:
        assert shell("kernel", "stop").returncode == 0


def test_serve_specs_that_cannot_work_are_refused_before_the_kernel_starts(tmp_path):
    shell = Shell(tmp_path)
    for spec, says in (
        ("driver=sim", "lacks name"),
        ("name=a,driver=warp", "unknown driver"),
        ("name=SmolLM2-135M-Instruct,driver=sim", "two models are named"),
        ("name=a,driver=sim,bogus=1", "rejected its options"),
        ("name=a b,driver=sim", "must be"),
    ):
        res = shell("kernel", "start", "--foreground", "--serve", spec, timeout=120)
        assert res.returncode == 2, (spec, res.stderr)
        assert says in res.stderr, (spec, res.stderr)


def test_a_failed_start_prints_only_its_own_log_lines(tmp_path):
    shell = Shell(tmp_path)
    for driver in ("first-bogus", "second-bogus"):  # fails in the daemon, not before
        res = shell("kernel", "start", "--serve", f"name=x,driver={driver}", timeout=120)
        assert res.returncode == 1, res.stderr
    assert "exited with status 2" in res.stderr
    assert "second-bogus" in res.stderr and "first-bogus" not in res.stderr


@needs_bwrap
def test_tools_pending_approve_and_deny_commands(sh):
    tools = json.loads(sh("tools", "--json").stdout)
    assert {"calculator", "python"} <= {t["name"] for t in tools}  # the admin sees all
    assert "calculator" in sh("tools").stdout
    assert json.loads(sh("pending", "--json").stdout) == []
    with sh.admin() as admin:
        p = admin.spawn("careful", confirm=True, tools=["python"])
        import threading

        box = {}
        t = threading.Thread(
            target=lambda: box.setdefault(
                "r",
                Client(admin.endpoint, pid=p.pid, token=p.token)
                .process(p.pid, p.token)
                .tools.call("python", {"code": "print(1)"}, timeout_s=60),
            )
        )
        t.start()
        deadline = time.monotonic() + 30
        while (
            not (pending := json.loads(sh("pending", "--json").stdout))
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert pending and pending[0]["name"] == "python"
        assert sh("approve", str(pending[0]["id"])).returncode == 0
        t.join(60)
        assert box["r"]["stdout"] == "1\n"
        missing = sh("deny", "999999")
        assert missing.returncode == 1 and "ENOENT" in missing.stderr
        admin.kill(p.pid, "KILL")
