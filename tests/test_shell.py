"""``llmos shell``: the command table and parser alone, then the shell as a user types it
in a real pseudo-terminal against a real kernel (the packaged model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.client import Client
from llmos.ctl import shell
from syscalls.errors import Errno, SyscallError
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "llmos>"
ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


# -- the command table and the parser (no kernel) ---------------------------------------------


def test_every_command_in_the_table_has_a_handler_and_one_line_of_help():
    for cmd in shell.COMMANDS:
        assert callable(getattr(shell.Session, f"do_{cmd.name}")), cmd.name
        assert cmd.help and "\n" not in cmd.help
    assert len(shell.BY_NAME) == len(shell.COMMANDS)


def test_parse_splits_with_shell_quoting():
    cmd, args = shell.parse('write "my notes.txt" hello   world')
    assert cmd.name == "write" and args == ["my notes.txt", "hello", "world"]
    assert (
        shell.parse('tools call calculator \'{"expression": "1+2"}\'')[1][2]
        == '{"expression": "1+2"}'
    )


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("frob 1", Errno.ENOSYS),
        ("kill", Errno.EINVAL),
        ("kill 1 TERM extra", Errno.EINVAL),
        ("ps -a", Errno.EINVAL),
        ('cat "unclosed', Errno.EINVAL),
        ("", Errno.EINVAL),
    ],
)
def test_parse_refuses_bad_lines_with_a_code(line, code):
    with pytest.raises(SyscallError) as exc:
        shell.parse(line)
    assert exc.value.code is code


def test_check_accepts_valid_commands_and_says_why_not_otherwise():
    assert shell.check("kill 3 KILL") is None
    assert shell.check("ps") is None
    assert "ENOSYS" in shell.check("sudo reboot")
    assert "EINVAL" in shell.check("rm -rf /tmp; ls")
    assert "EINVAL" in shell.check("kill")
    assert "interactive" in shell.check("chat 2")  # proposals never take over the terminal


def test_tools_call_takes_the_rest_of_the_line_as_its_json_argument():
    cmd, args = shell.parse('tools call calculator {"expression": "2*21"}')
    assert (cmd.name, args) == ("tools", ["call", "calculator", '{"expression": "2*21"}'])
    assert shell.parse("tools call datetime")[1] == ["call", "datetime"]
    assert shell.parse("tools")[1] == []


def test_mcp_takes_a_subcommand_and_the_rest_of_the_line_as_the_servers_command():
    cmd, args = shell.parse("mcp add time python -m mcp_server_time --local-timezone UTC")
    assert (cmd.name, args) == (
        "mcp",
        ["add", "time", "python -m mcp_server_time --local-timezone UTC"],
    )
    assert shell.parse("mcp add web http://127.0.0.1:8000/mcp")[1][2] == "http://127.0.0.1:8000/mcp"
    assert shell.parse("mcp list")[1] == ["list"] and shell.parse("mcp remove t")[1] == [
        "remove",
        "t",
    ]
    with pytest.raises(SyscallError) as exc:
        shell.parse("mcp")
    assert exc.value.code is Errno.EINVAL and "mcp list | add NAME" in exc.value.message
    session = shell.Session(connect=lambda: pytest.fail("no kernel needed"))
    for line in ("mcp frob", "mcp add time", "mcp remove", "mcp list extra", "mcp add t --env"):
        with pytest.raises(SyscallError) as exc:
            session.do_mcp(shell.parse(line)[1])
        assert exc.value.code is Errno.EINVAL, line
    assert [c for c, _ in shell.complete(session, "mcp re")] == ["remove"]
    pattern = re.compile(shell.command_pattern())  # proposals may list, never mount
    assert pattern.fullmatch("mcp list") and not pattern.fullmatch("mcp add x sh")


def test_help_shows_every_usage_column_verbatim():
    session = shell.Session.__new__(shell.Session)
    from rich.console import Console

    session.console = Console(record=True, width=200)
    session.do_help(["tools"])
    assert "[call NAME [JSON]]" in session.console.export_text()


def test_the_proposal_grammar_admits_only_lines_the_table_accepts():
    pattern = re.compile(shell.command_pattern())
    for line in (
        "ps",
        "kill 3 KILL",
        "stop 12",
        "write a.txt hi there",
        "mem search x y",
        "ls",
        "ls /home",
    ):
        assert pattern.fullmatch(line) and shell.check(line) is None, line
    for line in ("kill", "kill x", "stop 1 2", "chat 2", "top", "exit", "rm", "reboot", "ps; rm x"):
        assert not pattern.fullmatch(line), line


def test_command_names_complete_without_a_kernel():
    session = shell.Session(connect=lambda: pytest.fail("no kernel needed"))
    assert [c for c, _ in shell.complete(session, "sp")] == ["spawn"]
    assert {c for c, _ in shell.complete(session, "s")} == {"spawn", "stop", "stat", "syscalls"}
    assert list(shell.complete(session, "kill 3 ")) == [
        ("TERM", 0),
        ("KILL", 0),
        ("STOP", 0),
        ("CONT", 0),
    ]


def test_spawn_options_and_numbers_are_checked():
    assert shell._spawn_options(["a", "--system", "Be brief.", "--model", "m"]) == (
        "a",
        {"system": "Be brief.", "model": "m"},
    )
    with pytest.raises(SyscallError):
        shell._spawn_options(["a", "--nice"])
    with pytest.raises(SyscallError) as exc:
        shell._int("x", "PID")
    assert exc.value.code is Errno.EINVAL


def test_a_process_not_spawned_in_this_shell_cannot_be_attached():
    class Offline:
        def close(self) -> None: ...

    session = shell.Session(connect=Offline)  # type: ignore[arg-type]
    with pytest.raises(SyscallError) as exc:
        session.handle(7)
    assert exc.value.code is Errno.EPERM and "spawned in this shell" in exc.value.message


def test_a_failing_command_prints_one_line_and_the_session_goes_on():
    import io

    from rich.console import Console

    class Broken:
        def ps(self):
            raise SyscallError.of(Errno.EIO, "the disk is on fire")

        def info(self):
            raise ValueError("not a syscall error")

        def close(self) -> None: ...

    buf = io.StringIO()
    session = shell.Session(Console(file=buf, width=200), connect=Broken)  # type: ignore[arg-type]
    assert not session.execute("ps")
    assert not session.execute("models")
    assert session.execute("help ps") and session.execute("# a comment") and session.execute("")
    lines = buf.getvalue().splitlines()
    assert lines[:2] == ["error EIO: the disk is on fire", "error: ValueError: not a syscall error"]
    with pytest.raises(shell.ShellExit):
        session.execute("quit")


# -- the shell in a terminal, on a real kernel -------------------------------------------------

pexpect = pytest.importorskip("pexpect")


class Kernel:
    """A private runtime/state dir and the ``llmos`` command on it."""

    def __init__(self, base: Path) -> None:
        self.run_dir = base / "run"
        self.env = {
            **os.environ,
            "LLMOS_RUNTIME_DIR": str(self.run_dir),
            "LLMOS_STATE_DIR": str(base / "state"),
            "PROMPT_TOOLKIT_NO_CPR": "1",
            "NO_COLOR": "1",
            "TERM": "xterm",
        }

    def llmos(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llmos.ctl.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def admin(self) -> Client:
        return Client(
            f"ipc://{self.run_dir / 'kernel.sock'}",
            pid=0,
            token=(self.run_dir / "admin.token").read_text().strip(),
        )

    def shell(self) -> pexpect.spawn:
        term = pexpect.spawn(
            sys.executable,
            ["-m", "llmos.ctl.cli", "shell"],
            env=self.env,
            cwd=str(ROOT),
            encoding="utf-8",
            timeout=60,
            dimensions=(50, 200),
        )
        if log := os.environ.get(
            "LLMOS_TEST_SHELL_LOG"
        ):  # what the terminal showed, to debug a test
            term.logfile_read = open(log, "a")  # noqa: SIM115
        term.expect(PROMPT)
        return term


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    k = Kernel(tmp_path_factory.mktemp("shell"))
    started = k.llmos("kernel", "start", "--slots", "2")
    assert started.returncode == 0, started.stderr
    yield k
    k.llmos("kernel", "stop")


def run(term: pexpect.spawn, line: str, *expect: str, timeout: float = 60) -> None:
    """Type ``line``, see each of ``expect`` in order, then the next prompt."""
    term.sendline(line)
    for pattern in expect:
        term.expect(pattern, timeout=timeout)
    term.expect(PROMPT, timeout=timeout)


def spawned_pid(term: pexpect.spawn, name: str) -> int:
    term.sendline(f"spawn {name}")
    term.expect(r"spawned (\d+) ")
    pid = int(term.match.group(1))
    term.expect(PROMPT)
    return pid


def reap_all(kernel: Kernel) -> None:
    with kernel.admin() as admin:
        for p in admin.ps():
            admin.kill(p.pid, "KILL")
            admin.wait(p.pid, timeout=10)


def leave(term: pexpect.spawn) -> None:
    term.sendcontrol("d")
    term.expect(pexpect.EOF, timeout=30)


@pytest.mark.model
def test_ps_spawn_models_and_an_unknown_command(kernel):
    term = kernel.shell()
    pid = spawned_pid(term, "bob")
    run(term, "ps", "PID", rf"{pid}\s+1\s+NEW.*bob\*")
    run(term, "models", "SmolLM2-135M-Instruct \\(default\\)")
    run(term, "top 2", "procs", "procs")
    term.sendline("frobnicate now")
    term.expect(r"error ENOSYS: unknown command 'frobnicate'")
    term.expect(PROMPT)
    run(term, "kill 999999", "error ESRCH")
    run(term, f"kill {pid} KILL", f"process {pid}: ZOMBIE")
    run(term, f"wait {pid}", f"process {pid} exited")
    leave(term)
    history = (kernel.run_dir.parent / "state" / "shell_history").read_text()
    assert "\n+ps\n" in history and "\n+frobnicate now\n" in history  # kept in the state dir


@pytest.mark.model
def test_tab_completes_command_names_and_pids(kernel):
    reap_all(kernel)
    with kernel.admin() as admin:
        solo = admin.spawn("solo")
    term = kernel.shell()
    term.send("mode\t")
    term.expect("ls")  # completions are computed off the UI thread: wait for "mode" + "ls"
    run(term, "", "SmolLM2")  # Enter ran `models`
    term.send("kill \t")
    term.expect(rf"(?<![\d\[;?]){solo.pid}(?!\d)")  # the only pid (not a digit of an escape code)
    run(term, "", f"process {solo.pid}: ZOMBIE")  # the only pid was completed
    leave(term)


@pytest.mark.model
def test_write_cat_ls_history_in_the_current_process(kernel):
    term = kernel.shell()
    run(term, "cat notes.txt", "error ESRCH: no current process")
    spawned_pid(term, "files")
    run(term, "write notes.txt 'hello from the shell'", "notes.txt: version 1")
    run(term, "write notes.txt second", "version 2")
    run(term, "cat notes.txt", "second")
    run(term, "ls", "notes.txt")
    run(term, "rollback notes.txt 1", "version 3")
    run(term, "cat notes.txt", "hello from the shell")
    run(term, "history notes.txt", "rollback to v1")
    run(term, 'tools call calculator \'{"expression": "6*7"}\'', "42")
    run(term, "cd 999999", "error EPERM.*not spawned in this shell")
    run(term, "mem", "no core memory block")
    leave(term)


def piped_shell(kernel, script: str) -> subprocess.CompletedProcess[str]:
    """``llmos shell`` reading ``script`` from a pipe, as a script would feed it."""
    return subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "shell"],
        input=script,
        env={**kernel.env, "COLUMNS": "250"},  # rich's tables unwrapped
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.model
def test_a_tool_call_with_json_arguments_from_a_pipe(kernel):
    script = 'spawn caller\ntools call calculator {"expression": "2*21"}\nexit\n'
    res = piped_shell(kernel, script)
    assert res.returncode == 0, res.stdout + res.stderr
    assert '"value": 42' in res.stdout


def test_commands_from_a_pipe_run_in_order(kernel):
    script = "spawn piped\nwrite a.txt 'from a pipe'\ncat a.txt\nfrob\nchat\nexit\nps\n"
    res = piped_shell(kernel, script)
    assert res.returncode == 1  # frob and chat failed
    assert (
        "from a pipe" in res.stdout
        and "error ENOSYS" in res.stdout
        and "chat needs a terminal" in res.stdout
    )
    assert "PID" not in res.stdout  # nothing after exit


def test_mcp_add_list_remove_from_a_pipe(kernel):
    """The shell mounts the PyPI time server, lists it, calls its tool, unmounts it."""
    script = (
        f"mcp add clock {sys.executable} -m mcp_server_time --local-timezone UTC\n"
        "mcp list\n"
        "tools\n"
        "spawn timer\n"
        'tools call clock__get_current_time {"timezone": "Asia/Tokyo"}\n'
        "mcp remove clock\n"
        "mcp list\n"
        "mcp remove clock\n"
    )
    res = piped_shell(kernel, script)
    out = res.stdout
    assert "mounted clock: 2 tools" in out and "clock__convert_time" in out
    assert re.search(r"clock\s+stdio\s+ready\s+2", out)
    assert re.search(r"clock__get_current_time\s+mcp clock", out)  # the tools table says whose
    assert '"timezone": "Asia/Tokyo"' in out
    assert "unmounted clock" in out and "no MCP server is mounted" in out
    assert "error ENOENT" in out and res.returncode == 1  # the second remove


@pytest.mark.model
def test_chat_streams_and_ctrl_c_stops_the_reply_not_the_shell(kernel):
    term = kernel.shell()
    term.sendline("chat")
    term.expect(r"chat (\d+)>")
    pid = int(term.match.group(1))
    term.sendline("Count from 1 to 1000, separated by commas.")
    with kernel.admin() as admin:  # the turn runs on the process: wait until it is mid-reply
        wait_until(
            lambda: any(p.pid == pid and p.output_tokens >= 8 for p in admin.ps()), timeout=60
        )
    term.sendintr()
    term.expect(r"reply stopped")
    shown = ANSI.sub("", term.before).rsplit("separated by commas.", 1)[-1]
    assert re.search(r"\w\W+\w", shown), shown  # tokens were on the screen before the reply ended
    term.expect(f"chat {pid}>")
    term.sendline("Say hello.")
    term.expect(r"\w+", timeout=60)
    term.expect(f"chat {pid}>", timeout=120)  # the process is free for the next turn
    term.sendline("")
    term.expect(PROMPT)
    with kernel.admin() as admin:
        rows = admin.ps()
        assert pid in {p.pid for p in rows}
        assert all(p.ppid != pid for p in rows)  # the interrupted turn left nothing behind
        me = next(p for p in rows if p.pid == pid)
        assert me.state == "WAITING" and me.generate_calls == 2 and me.output_tokens > 8
        assert me.context_messages == 4  # both turns, the interrupted one as far as it went
    leave(term)


@pytest.mark.model
def test_question_mode_shows_proposals_and_runs_nothing_on_no(kernel):
    reap_all(kernel)  # a short ps snapshot keeps the helper's prompt small
    term = kernel.shell()
    victim = spawned_pid(term, "victim")
    term.sendline(f"? stop process {victim}")
    term.expect(r"\[y/N\]", timeout=240)
    term.sendline("n")
    term.expect("nothing run")
    term.expect(PROMPT)
    with kernel.admin() as admin:
        assert {p.pid: p.state for p in admin.ps()}[victim] == "NEW"
        assert all(p.name != "shell-nl" for p in admin.ps())  # the helper is gone
    leave(term)


@pytest.mark.model
def test_the_shell_reconnects_after_a_kernel_restart(kernel):
    term = kernel.shell()
    spawned_pid(term, "before")
    assert kernel.llmos("kernel", "stop").returncode == 0
    run(term, "ps", r"error (ECONNREFUSED|ETIMEDOUT|ESHUTDOWN)")
    assert kernel.llmos("kernel", "start", "--slots", "2").returncode == 0
    run(term, "ps", "kernel restarted", "PID")
    run(term, "models", "SmolLM2")
    leave(term)
