"""The kernel's TCP face against a real daemon: CURVE on the wire (a recording proxy
between the SDK and the kernel finds no token, prompt or file content), client keys
admitted and revoked without a restart, a wrong pinned server key and a plain client
refused with errors that say what to do, plain TCP only on loopback with --insecure, and a
flood of hostile frames growing the log by a bounded amount."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from kernel.daemon import daemon_command
from llmos.client import AsyncClient, Client
from syscalls import codec, curve
from syscalls.errors import SyscallError
from tests.kernels import Daemon


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """A TCP proxy on 127.0.0.1 that forwards to ``target`` and keeps every byte."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.data = bytearray()
        self._lock = threading.Lock()
        self._srv = socket.socket()
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen()
        self.port = self._srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self._srv.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                with self._lock:
                    self.data += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._srv.close()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str]]:
    port = _port()
    ep = f"tcp://127.0.0.1:{port}"
    base = tmp_path_factory.mktemp("curve")
    k = Daemon(base, "--driver", "sim", *_listen(base, ep)).start()
    try:
        yield k, ep
    finally:
        k.stop()


async def _ainfo(ep: str, token: str) -> object:
    async with AsyncClient(ep, pid=0, token=token) as c:
        return await asyncio.gather(c.info(), c.info())  # both early calls wait for the handshake


def _listen(base: Path, ep: str) -> list[str]:
    """The private kernel's ipc socket (the test helper's way in) and ``ep``."""
    return ["--listen", f"ipc://{base / 'run' / 'kernel.sock'}", "--listen", ep]


def _client_env(monkeypatch: pytest.MonkeyPatch, server: str, pair_file: Path) -> None:
    monkeypatch.setenv("LLMOS_SERVER_KEY", server)
    monkeypatch.setenv("LLMOS_CURVE_SECRET_KEY_FILE", str(pair_file))


def _llmos(k: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from llmos.ctl.cli import main; sys.exit(main())",
            *args,
        ],
        env=k.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_wire_carries_no_token_prompt_or_file_content(
    kernel: tuple[Daemon, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k, ep = kernel
    server = _llmos(k, "kernel", "key").stdout.strip()
    assert curve.is_key(server) and server == (k.run_dir / "kernel.server_key").read_text().strip()
    gen = _llmos(k, "keygen", str(tmp_path / "me.key_secret"))
    assert gen.returncode == 0, gen.stderr
    public = gen.stdout.split()[0]
    added = _llmos(k, "clients", "add", "laptop", public)
    assert added.returncode == 0, added.stderr
    assert "laptop" in _llmos(k, "clients", "list").stdout
    _client_env(monkeypatch, server, tmp_path / "me.key_secret")
    proxy = Recorder(int(ep.rsplit(":", 1)[1]))
    secret_prompt = "the launch code is PLAINTEXT-PROMPT-7f3a"
    # Binary (not embedded for fs.search: no embedding model to load in this test).
    secret_file = b"\xff\x00" + b"PLAINTEXT-FILE-CONTENT-91c2 " * 20
    try:
        with Client(f"tcp://127.0.0.1:{proxy.port}", pid=0, token=k.token) as c:
            info = c.info()
            p = c.spawn("wire", system=secret_prompt)
            p.append([{"role": "user", "content": secret_prompt}])
            p.files.write("notes/secret.bin", secret_file)
            assert p.files.read("notes/secret.bin") == secret_file
            assert secret_prompt in str(p.context())
            p.kill()
    finally:
        proxy.close()
    assert info.curve_server_key == server
    wire = bytes(proxy.data)
    assert len(wire) > 2000  # the calls above did cross the proxy
    for needle in (k.token, p.token, secret_prompt, "PLAINTEXT-FILE-CONTENT", "llm.generate"):
        assert needle.encode() not in wire
    assert b"proc.spawn" not in wire and b"CURVE" in wire[:200]  # ZMTP greeting: mechanism


def test_keys_are_admitted_and_revoked_without_a_restart(
    kernel: tuple[Daemon, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k, ep = kernel
    server = (k.run_dir / "kernel.server_key").read_text().strip()
    pair_file = tmp_path / "stranger.key_secret"
    pair = curve.new_pair()
    curve.write_pair(pair_file, pair)
    _client_env(monkeypatch, server, pair_file)
    with pytest.raises(SyscallError) as refused, Client(ep, pid=0, token=k.token) as c:
        c.info()
    assert refused.value.code == "EACCES" and "llmos clients add" in refused.value.message
    assert _llmos(k, "clients", "add", "stranger", pair.public).returncode == 0
    with Client(ep, pid=0, token=k.token) as c:
        assert c.info().processes >= 0
    assert _llmos(k, "clients", "revoke", "stranger").returncode == 0
    with pytest.raises(SyscallError) as again, Client(ep, pid=0, token=k.token) as c:
        c.info()
    assert again.value.code == "EACCES"


def test_a_wrong_pinned_server_key_or_a_plain_client_fails_saying_what_to_do(
    kernel: tuple[Daemon, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k, ep = kernel
    pair_file = tmp_path / "c.key_secret"
    curve.write_pair(pair_file, curve.new_pair())
    _client_env(monkeypatch, curve.new_pair().public, pair_file)
    with pytest.raises(SyscallError) as wrong, Client(ep, pid=0, token=k.token) as c:
        c.info()
    assert wrong.value.code == "ECONNREFUSED" and "llmos kernel key" in wrong.value.message
    with pytest.raises(SyscallError) as awrong:  # the asyncio flavour says the same
        asyncio.run(_ainfo(ep, k.token))
    assert awrong.value.code == "ECONNREFUSED" and "llmos kernel key" in awrong.value.message
    for var in ("LLMOS_SERVER_KEY", "LLMOS_CURVE_SECRET_KEY_FILE"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("LLMOS_RUNTIME_DIR", str(tmp_path / "elsewhere"))  # no local keys
    with pytest.raises(SyscallError) as plain, Client(ep, pid=0, token=k.token) as c:
        c.info()
    assert plain.value.code == "ECONNREFUSED" and "LLMOS_SERVER_KEY" in plain.value.message
    # The kernel's own user, with the runtime dir: no set-up at all.
    monkeypatch.setenv("LLMOS_RUNTIME_DIR", str(k.run_dir))
    with Client(ep, pid=0, token=k.token) as c:
        assert ep in c.info().endpoints
    first, _ = asyncio.run(_ainfo(ep, k.token))  # type: ignore[misc]
    assert first.curve_server_key  # type: ignore[attr-defined]


def test_plain_tcp_needs_loopback_and_insecure(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LLMOS_RUNTIME_DIR": str(tmp_path / "r"),
        "LLMOS_STATE_DIR": str(tmp_path / "s"),
    }
    res = subprocess.run(
        daemon_command(["--driver", "sim", "--listen", "tcp://0.0.0.0:7", "--insecure"]),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "loopback" in res.stderr
    ep = f"tcp://127.0.0.1:{_port()}"
    base = tmp_path / "plain"
    k = Daemon(base, "--driver", "sim", *_listen(base, ep), "--insecure").start()
    try:
        assert not (k.run_dir / "kernel.server_key").exists()
        with Client(ep, pid=0, token=k.token) as c:
            assert c.info().curve_server_key is None
    finally:
        k.stop()


def test_a_flood_of_hostile_frames_grows_the_log_by_a_bounded_amount(
    kernel: tuple[Daemon, str],
) -> None:
    k, ep = kernel
    log = k.state_dir / "kernel.log"
    before = log.stat().st_size
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(k.endpoint)  # the ipc socket: no CURVE in the way
    bad = [
        b"\xc1garbage",
        codec.packb({"v": 1, "id": 1, "call": "sys.info", "pid": 0, "token": "é" * 40, "args": {}}),
        codec.packb({"v": 1, "id": 2, "call": "sys.info", "pid": 7, "token": "x", "args": {}}),
        codec.packb({"v": 1, "id": 3, "call": "nope", "pid": 0, "token": "x", "args": {}}),
    ]
    n = 2000
    for i in range(n):
        sock.send(bad[i % len(bad)])
    got = 0
    while got < n and sock.poll(30_000):
        sock.recv()
        got += 1
    sock.close()
    # Unknown CURVE keys hammering the TCP endpoint: logged once per interval, not per try.
    for _ in range(20):
        d = ctx.socket(zmq.DEALER)
        d.linger = 0
        curve.ClientCurve(
            (k.run_dir / "kernel.server_key").read_text().strip(), curve.new_pair(), "test"
        ).apply(d)
        d.connect(ep)
        d.send(b"x")
        d.poll(200)
        d.close()
    with Client(k.endpoint, pid=0, token=k.token) as c:
        c.info()  # still serving
    assert got == n
    grown = log.stat().st_size - before
    assert grown < 8192, log.read_text()[before:][-3000:]
    assert k.token not in log.read_text()
