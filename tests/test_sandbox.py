"""The python tool's sandbox against the real kernel daemon: code execution is granted
only by name, and granted code cannot reach the kernel's secrets, its state, other
processes' files or the network, cannot outlive its wall-clock limit, and cannot stall
the kernel with a fork bomb or a memory hog."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest

from kernel.sandbox import SandboxConfig, run_code
from syscalls.errors import ERRORS, Errno
from tests.conftest import needs_bwrap
from tests.kernels import Daemon

EPERM, ENOTSUP = ERRORS[Errno.EPERM], ERRORS[Errno.ENOTSUP]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    """A real kernel daemon on the simulator (no model needed to run tools)."""
    k = Daemon(tmp_path_factory.mktemp("sandbox"), "--driver", "sim", "--slots", "1").start()
    yield k
    k.stop()


def run(p, code: str, timeout_s: float = 10.0) -> dict:
    return p.tools.call("python", {"code": code, "timeout_s": timeout_s}, timeout_s=timeout_s + 30)


def test_code_execution_is_off_until_granted_by_name(spawn) -> None:
    default = spawn("default")
    assert "python" not in {t.name for t in default.tools.list()}
    with pytest.raises(EPERM, match="granted by name"):
        run(default, "print(1)")
    everything = spawn("wildcard", tools=["*"])
    with pytest.raises(EPERM):
        run(everything, "print(1)")
    child = everything.spawn("asks", tools=["python"])  # a parent without it cannot grant it
    with pytest.raises(EPERM):
        run(child, "print(1)")
    granted = spawn("granted", tools=["python", "calculator"])
    assert "python" in {t.name for t in granted.tools.list()}
    kid = granted.spawn("inherits")  # no tools=: the parent's layers, python named in each
    assert "python" in {t.name for t in kid.tools.list()}
    assert "python" not in {t.name for t in granted.spawn("narrow", tools=["calc*"]).tools.list()}


@needs_bwrap
def test_granted_code_sees_only_its_own_file_root(daemon: Daemon, spawn) -> None:
    other = spawn("other")
    other.files.write("secret.txt", "other's secret")
    p = spawn("boxed", tools=["python"])
    out = run(p, "open('made.txt', 'w').write('hi'); import os; print(os.getcwd())")
    assert (out["exit_code"], out["stdout"].strip(), out["sandbox"]) == (0, "/work", "bwrap")
    assert p.files.read("made.txt") == "hi"
    targets = [
        daemon.run_dir / "admin.token",
        daemon.run_dir,
        daemon.state_dir / "state.db",
        daemon.state_dir,
        Path("/etc/passwd"),
        Path("/etc/shadow"),
    ]
    probe = (
        "import os, sys\n"
        "for path in sys.argv[1:] if len(sys.argv) > 1 else %r:\n"
        "    try:\n"
        "        print(path, 'READ', open(path, 'rb').read(64) if os.path.isfile(path) "
        "else os.listdir(path))\n"
        "    except OSError as exc:\n"
        "        print(path, 'DENIED', type(exc).__name__)\n"
    ) % [str(t) for t in targets]
    out = run(p, probe)
    lines = out["stdout"].splitlines()
    assert len(lines) == len(targets) and all("DENIED" in line for line in lines), lines
    token = daemon.token
    assert token not in out["stdout"]
    # No other process is visible, the kernel's included; nothing of the kernel's env.
    out = run(p, "import os; print(sorted(int(d) for d in os.listdir('/proc') if d.isdigit()))")
    assert max(eval(out["stdout"])) < 10, out["stdout"]  # its own pid namespace
    out = run(p, "import os; print(os.environ)")
    assert "LLMOS" not in out["stdout"] and token not in out["stdout"]
    # Another process's root is not mounted: nothing there reads the other's file.
    out = run(p, "import os\nfor d, _, fs in os.walk('/'):\n    pass\nprint('walked')", 30)
    assert out["exit_code"] == 0
    out = run(p, "import glob; print(glob.glob('/**/secret.txt', recursive=True))", 30)
    assert "secret.txt" not in out["stdout"]


@needs_bwrap
def test_granted_code_cannot_open_a_network_connection(spawn) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        p = spawn("offline", tools=["python"])
        out = run(
            p,
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('CONNECTED')\n"
            "except OSError as exc:\n"
            "    print('refused', exc)\n",
        )
        assert "refused" in out["stdout"] and "CONNECTED" not in out["stdout"]
    finally:
        listener.close()


@needs_bwrap
def test_nothing_the_code_starts_outlives_its_wall_clock_limit(spawn) -> None:
    p = spawn("escaper", tools=["python"])
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    while True:\n"
        "        with open('beat.txt', 'a') as f: f.write('x')\n"
        "        time.sleep(0.05)\n"
        "time.sleep(60)\n"
    )
    out = run(p, code, timeout_s=1.5)
    assert out["timed_out"]
    size = len(p.files.read("beat.txt"))
    time.sleep(0.5)
    assert len(p.files.read("beat.txt")) == size  # the setsid child died with the sandbox


@needs_bwrap
def test_a_fork_bomb_and_a_memory_hog_leave_the_kernel_responsive(admin, spawn) -> None:
    p = spawn("bomber", tools=["python"])
    prober = spawn("prober")
    bombs = {
        "fork": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
        "        pass\n",
        "memory": "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n",
    }
    for name, code in bombs.items():
        results: dict = {}
        thread = threading.Thread(
            target=lambda c=code, out=results: out.update(run(p, c, timeout_s=3))
        )
        thread.start()
        latencies = []
        while thread.is_alive():
            t0 = time.perf_counter()
            prober.getpid()
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.005)
        thread.join()
        assert results["timed_out"] or results["exit_code"] != 0, (name, results)
        p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 2 else latencies[0]
        # The kernel kept answering all along (a generous bound: a loaded 2-core box).
        assert len(latencies) > 20 and p99 < 0.5, (name, len(latencies), p99)
    assert admin.info().processes >= 1


def test_without_bwrap_code_execution_is_enotsup_unless_the_operator_opts_in(
    tmp_path: Path,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "env"):  # a PATH without bwrap
        if found := shutil.which(tool):
            os.symlink(found, bin_dir / tool)
    for unsafe, expect in ((False, "off"), (True, "unsafe")):
        k = Daemon(tmp_path / f"k{unsafe}", "--driver", "sim", "--slots", "1")
        k.env["PATH"] = str(bin_dir)
        if unsafe:
            k.args = (*k.args, "--unsafe-python")
        k.start()
        try:
            with k.admin() as c:
                assert c.info().sandbox == expect
                p = c.spawn("coder", tools=["python"])
                if unsafe:
                    assert run(p, "print(6 * 7)")["stdout"].strip() == "42"
                else:
                    with pytest.raises(ENOTSUP, match="bubblewrap"):
                        run(p, "print(1)")
        finally:
            k.stop()


@needs_bwrap
@pytest.mark.parametrize(
    ("code", "timeout_s", "cpu_s", "limit"),
    [
        ("while True: pass", 1.5, None, "wall_clock"),
        ("while True: pass", 10, 1, "cpu_time"),
        ("x = bytearray(8 << 30)", 10, None, "memory"),
        ("open('big', 'wb').write(b'x' * (300 << 20))", 10, None, "file_size"),
        ("import os; os.kill(os.getpid(), 9)", 10, None, None),
        ("raise SystemExit(3)", 10, None, None),
    ],
)
def test_a_run_ended_by_a_limit_says_which_every_time(
    tmp_path: Path, code: str, timeout_s: float, cpu_s: int | None, limit: str | None
) -> None:
    config = SandboxConfig.detect()
    for _ in range(2):  # the same program, the same answer
        out = asyncio.run(run_code(config, code, tmp_path, timeout_s, cpu_s=cpu_s))
        assert out["limit"] == limit, out
        assert out["timed_out"] == (limit == "wall_clock")


def test_the_task_cap_is_computed_in_the_parent_not_in_the_forked_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preexec_fn runs between fork and exec: it only sets limits the parent computed
    (scanning /proc there is not fork-safe work). The cap still reaches the code."""
    from kernel import sandbox

    scans = tmp_path / "scans"

    def counted() -> int:
        with open(scans, "a") as f:
            f.write(f"{os.getpid()}\n")
        return 7

    monkeypatch.setattr(sandbox, "_tasks_of_user", counted)
    monkeypatch.setattr(sandbox.os, "getuid", lambda: 4242)  # the cap applies to non-root
    code = "import resource; print(resource.getrlimit(resource.RLIMIT_NPROC)[0])"
    out = asyncio.run(run_code(SandboxConfig(unsafe=True), code, tmp_path / "root", 10))
    assert out["exit_code"] == 0, out
    assert int(out["stdout"]) == 7 + sandbox.MAX_EXTRA_TASKS
    assert scans.read_text().split() == [str(os.getpid())]  # in this process, once
