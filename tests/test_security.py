"""Secrets at rest against the real daemon: the state dir, database, WAL, log and file
areas are owner-only, even for a state dir made before with looser modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.kernels import Daemon


def _loose(path: Path) -> list[str]:
    """Everything under ``path`` that a group or other user could read or enter."""
    found = []
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            full = Path(root) / name
            mode = full.lstat().st_mode
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077:
                found.append(f"{full} {oct(stat.S_IMODE(mode))}")
    return found


def test_state_is_owner_only_even_when_it_was_made_loose(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    (state / "kernel.log").write_text("an older kernel's log\n")
    (state / "kernel.log").chmod(0o644)
    old_root = state / "files" / "pid:9" / "deep"  # an older kernel's process root
    old_root.mkdir(parents=True)
    for d in (state / "files", old_root.parent, old_root):
        d.chmod(0o755)
    (old_root / "report.txt").write_text("an older process's file")
    (old_root / "report.txt").chmod(0o644)
    k = Daemon(tmp_path, "--driver", "sim").start()
    try:
        with k.admin() as c:
            p = c.spawn("writer")
            p.files.write("notes/secret.txt", "a secret")
            p.files.write("/home/shared.txt", "program-wide")
            p.append([{"role": "user", "content": "private words"}])
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert (state / "state.db").exists() and (state / "files").is_dir()
        assert _loose(state) == []
        assert _loose(k.run_dir) == []
    finally:
        k.stop()
