"""--encrypt-state against the real daemon: the raw database and its WAL hold no
plaintext of a context message, a memory block, a recalled message or a file version; the
state survives a restart with the key; no key, a wrong key or a loose key file is a start
error that says what to do."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

from kernel.daemon import daemon_command
from tests.kernels import Daemon

SECRETS = ("PLAINTEXT-CONTEXT-5e1d", "PLAINTEXT-BLOCK-77aa", "PLAINTEXT-FILE-0c39")


def _raw(state: Path) -> bytes:
    return b"".join(
        (state / name).read_bytes()
        for name in ("state.db", "state.db-wal")
        if (state / name).exists()
    )


def _start_fails(base: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        daemon_command(["--driver", "sim", *args]),
        env={
            **os.environ,
            "LLMOS_RUNTIME_DIR": str(base / "run"),
            "LLMOS_STATE_DIR": str(base / "state"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_encrypted_database_and_wal_hold_no_plaintext(tmp_path: Path) -> None:
    key = secrets.token_hex(32)
    keyfile = tmp_path / "state.key"
    keyfile.write_text(key + "\n")
    keyfile.chmod(0o600)
    k = Daemon(tmp_path, "--driver", "sim", "--encrypt-state", "--state-key-file", str(keyfile))
    k.start()
    try:
        with k.admin() as c:
            p = c.spawn("keeper")
            p.append([{"role": "user", "content": f"remember {SECRETS[0]} for me"}])
            p.memory.set_block("notes", f"the code is {SECRETS[1]}")
            p.files.write("vault.bin", b"\xff\x00" + SECRETS[2].encode() * 8)
            p.files.write("vault.bin", b"\xff\x01" + SECRETS[2].encode() * 9)  # a version
            assert p.memory.recall(SECRETS[0].split("-")[1])  # the FTS index works
            live = _raw(k.state_dir)  # while it runs: the WAL holds the latest pages
            pid = p.pid
    finally:
        assert k.stop() == 0
    assert len(live) > 4096 and not live.startswith(b"SQLite format 3")
    for raw in (live, _raw(k.state_dir)):
        for needle in (*SECRETS, "keeper", "remember"):
            assert needle.encode() not in raw
    assert key not in k.log()

    # No key, a wrong key, a loose key file: each refused, saying what to do.
    none = _start_fails(tmp_path, {})
    assert none.returncode == 1 and "--encrypt-state" in none.stderr
    missing = _start_fails(tmp_path, {}, "--encrypt-state")
    assert missing.returncode == 2 and "openssl rand -hex 32" in missing.stderr
    wrong = _start_fails(tmp_path, {"LLMOS_STATE_KEY": secrets.token_hex(32)}, "--encrypt-state")
    assert wrong.returncode == 1 and "cannot decrypt" in wrong.stderr
    keyfile.chmod(0o644)
    loose = _start_fails(tmp_path, {}, "--encrypt-state", "--state-key-file", str(keyfile))
    assert loose.returncode == 2 and "chmod 600" in loose.stderr

    # The right key (from the environment this time) opens it all again.
    k.env["LLMOS_STATE_KEY"] = key
    k.args = ("--driver", "sim", "--encrypt-state")
    k.start()
    try:
        with k.admin() as c:
            rows = c.ps()
            assert any(r.pid == pid for r in rows)
    finally:
        k.stop()
