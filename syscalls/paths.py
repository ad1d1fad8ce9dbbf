"""Where the kernel keeps its socket, credentials, lock, log and state.

runtime dir (0700): ``kernel.sock`` (default ipc endpoint), ``kernel.lock`` (pid + flock),
``admin.token`` (0600, the user's credential), ``kernel.endpoint`` (where it listens).
state dir: ``kernel.log`` (and, later, the persistent tables).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def runtime_dir() -> Path:
    """``$LLMOS_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/llmos``, else ``/tmp/llmos-$UID``."""
    if env := os.environ.get("LLMOS_RUNTIME_DIR"):
        return Path(env)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "llmos"
    return Path(f"/tmp/llmos-{os.getuid()}")


def state_dir() -> Path:
    """``$LLMOS_STATE_DIR``, else ``$XDG_STATE_HOME/llmos``, else ``~/.local/state/llmos``."""
    if env := os.environ.get("LLMOS_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "llmos"


def default_endpoint(run: Path | None = None) -> str:
    """The kernel's ipc endpoint inside the runtime dir."""
    return f"ipc://{(run or runtime_dir()) / 'kernel.sock'}"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700, or check an existing one is ours and private.

    Raises PermissionError when another user owns it or others can enter it: the
    socket inside is the kernel's front door.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(
            f"{path} belongs to uid {st.st_uid}, not to you; set LLMOS_RUNTIME_DIR"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write a file only the owner can read (atomic replace)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
