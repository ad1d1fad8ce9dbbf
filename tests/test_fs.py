"""File syscalls against the real kernel daemon: a root per process it cannot escape, the
program's shared home, mounts as capabilities, versions and rollback, search by meaning
with the real embedding model, and durability across kill -9."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llmos.client import Client, Process
from syscalls import limits
from syscalls.errors import ERRORS, Errno, SyscallError
from tests.conftest import wait_until
from tests.kernels import Daemon

pytestmark = pytest.mark.model

EINVAL, EPERM, ENOENT, EROFS, EFBIG = (
    ERRORS[e] for e in (Errno.EINVAL, Errno.EPERM, Errno.ENOENT, Errno.EROFS, Errno.EFBIG)
)
Spawn = Callable[..., Process]


def root_of(daemon: Daemon, p: Process) -> Path:
    """The real directory behind process ``p``'s root (for planting hostile objects)."""
    return daemon.state_dir / "files" / "proc" / str(p.pid)


def test_files_are_written_read_appended_listed_and_versioned(spawn: Spawn) -> None:
    f = spawn("files").files
    assert f.write("notes/todo.txt", "buy milk").version == 1
    assert f.append("/notes/todo.txt", "\ncall Ada").version == 2
    assert f.read("notes/todo.txt") == "buy milk\ncall Ada"
    assert f.read("notes/todo.txt", offset=4, length=4) == "milk"
    st = f.stat("notes/todo.txt")
    assert (st.type, st.size, st.versions, st.writable) == ("file", 17, 2, True)
    assert [(e.name, e.type) for e in f.list("/")] == [
        ("home", "dir"),
        ("mnt", "dir"),
        ("notes", "dir"),
    ]
    assert [e.name for e in f.list("notes")] == ["todo.txt"]
    f.write("blob.bin", b"\xff\x00\xfe")
    assert f.read("blob.bin") == b"\xff\x00\xfe"
    before = time.time()
    wait_until(lambda: time.time() > before)  # the next write is stamped after `before`
    f.write("notes/todo.txt", "nothing to do")
    history = f.history("notes/todo.txt")
    assert [(v.version, v.op) for v in history] == [(3, "write"), (2, "append"), (1, "write")]
    assert f.rollback("notes/todo.txt", version=1).version == 4
    assert f.read("notes/todo.txt") == "buy milk"
    f.rollback("notes/todo.txt", time=before)  # the content as it was before the third write
    assert f.read("notes/todo.txt") == "buy milk\ncall Ada"
    assert f.history("notes/todo.txt")[0].op == "rollback to v2"
    # Identical contents are stored once (content-addressed): versions 1 and 4 share a hash.
    hashes = {v.version: v.sha256 for v in f.history("notes/todo.txt")}
    assert hashes[1] == hashes[4] and hashes[2] == hashes[5]


def test_removed_and_renamed_files_keep_their_history(spawn: Spawn) -> None:
    f = spawn("rm").files
    f.write("d/a.txt", "alpha")
    f.write("d/sub/b.txt", "beta")
    with pytest.raises(EINVAL, match="not empty"):
        f.remove("d")
    assert f.remove("d", recursive=True) == 2
    with pytest.raises(ENOENT):
        f.read("d/a.txt")
    assert [v.op for v in f.history("d/a.txt")] == ["remove", "write"]
    f.rollback("d/a.txt", version=1)
    assert f.read("d/a.txt") == "alpha"
    f.rename("d/a.txt", "/home/a-moved.txt")
    assert f.read("/home/a-moved.txt") == "alpha"
    assert f.history("/home/a-moved.txt")[0].op == "renamed from /d/a.txt"
    assert f.history("d/a.txt")[0].op == "renamed to /home/a-moved.txt"
    with pytest.raises(EINVAL, match="exists"):
        f.write("x.txt", "x") and f.rename("x.txt", "/home/a-moved.txt")


def test_a_programs_processes_share_home_but_not_their_roots(spawn: Spawn, admin: Client) -> None:
    parent = spawn("parent")
    child = parent.spawn("child")
    parent.files.write("/home/plan.md", "step 1")
    parent.files.write("/private.txt", "mine")
    assert child.files.read("/home/plan.md") == "step 1"
    child.files.append("/home/plan.md", "\nstep 2")
    assert parent.files.read("home/plan.md") == "step 1\nstep 2"
    with pytest.raises(ENOENT):
        child.files.read("/private.txt")
    other = spawn("other-program")
    with pytest.raises(ENOENT):
        other.files.read("/home/plan.md")
    with pytest.raises(SyscallError, match="must name the target process"):
        admin.call("fs.read", {"path": "x"})  # the admin has no files of its own
    assert admin.call("fs.read", {"pid": child.pid, "path": "home/plan.md"})["text"]
    with pytest.raises(SyscallError, match="acts on the calling process"):
        admin.call("fs.write", {"path": "x", "text": "y"})  # and writes only as a process


HOSTILE = [
    ("../outside", EPERM),
    ("a/../../outside", EPERM),
    ("/../etc/passwd", EPERM),
    ("..", EPERM),
    ("home/../../x", EPERM),
    ("mnt/../../x", EPERM),
    ("a/./../b", EPERM),
    ("..\\..\\windows", EPERM),
    ("x\x00y", EINVAL),
    ("bell\x07", EINVAL),
    ("a" * (limits.MAX_NAME_BYTES + 1), EINVAL),
    ("é" * 200, EINVAL),
    ("/".join(["d"] * 2100), EINVAL),
    ("/mnt/nothing/x", ENOENT),
]


@pytest.mark.parametrize(("path", "error"), HOSTILE, ids=[repr(p)[:40] for p, _ in HOSTILE])
def test_hostile_paths_are_refused_and_never_reach_the_host(
    spawn: Spawn, path: str, error: type
) -> None:
    f = spawn("hostile").files
    for attempt in (
        lambda: f.read(path),
        lambda: f.write(path, "pwned"),
        lambda: f.stat(path),
        lambda: f.history(path),
        lambda: f.rename("seed.txt", path),
    ):
        f.write("seed.txt", "seed")
        with pytest.raises(error) as caught:
            attempt()
        assert caught.value.message  # a sentence, not just a code
    assert not Path("/outside").exists() and "pwned" not in Path("/etc/hostname").read_text(
        errors="replace"
    )


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "/proc/self/environ", "/dev/null", "//etc//shadow"]
)
def test_absolute_host_paths_mean_paths_inside_the_root(
    spawn: Spawn, daemon: Daemon, path: str
) -> None:
    p = spawn("chrooted")
    with pytest.raises(ENOENT):
        p.files.read(path)  # not the host's file
    p.files.write(path, "confined")
    inside = root_of(daemon, p) / path.strip("/").replace("//", "/")
    assert inside.read_text() == "confined" and p.files.read(path) == "confined"
    assert "confined" not in Path("/etc/passwd").read_text()


def test_symlinks_fifos_and_devices_planted_in_a_root_are_refused(
    spawn: Spawn, daemon: Daemon
) -> None:
    p = spawn("planted")
    p.files.write("ok.txt", "fine")
    root = root_of(daemon, p)
    (root / "to-etc").symlink_to("/etc")
    (root / "to-passwd").symlink_to("/etc/passwd")
    (root / "inside").symlink_to(root / "ok.txt")
    os.mkfifo(root / "pipe")
    for path in ("to-etc/passwd", "to-passwd", "inside", "pipe"):
        for call in (p.files.read, p.files.stat, lambda x: p.files.write(x, "pwned")):
            with pytest.raises(EPERM, match="symlinks are not followed|not a regular file"):
                call(path)
    assert "pwned" not in Path("/etc/passwd").read_text()
    with pytest.raises(EPERM):
        p.files.remove("to-etc")
    assert Path("/etc/passwd").exists()
    assert p.files.read("ok.txt") == "fine"


def test_mounts_are_capabilities_passed_only_downwards(
    spawn: Spawn, admin: Client, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data.csv").write_text("a,b\n1,2\n")
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "report.txt").write_text("draft by a human")
    p = spawn(
        "mounted",
        mounts=[
            {"name": "data", "path": str(shared), "mode": "ro"},
            {"name": "out", "path": str(outbox), "mode": "rw"},
        ],
    )
    assert [e.name for e in p.files.list("/mnt")] == ["data", "out"]
    assert p.files.read("/mnt/data/data.csv") == "a,b\n1,2\n"
    with pytest.raises(EROFS):
        p.files.write("/mnt/data/data.csv", "overwritten")
    assert (shared / "data.csv").read_text() == "a,b\n1,2\n"
    p.files.write("/mnt/out/report.txt", "final by the agent")
    assert (outbox / "report.txt").read_text() == "final by the agent"
    # The human's draft was not written through llmos, yet it is kept as a version.
    assert [(v.version, v.op) for v in p.files.history("/mnt/out/report.txt")] == [
        (2, "write"),
        (1, "external"),
    ]
    assert p.files.rollback("/mnt/out/report.txt", version=1).size == len("draft by a human")
    kid = p.spawn("kid")  # inherits both mounts
    assert kid.files.read("/mnt/data/data.csv").startswith("a,b")
    narrowed = p.spawn("narrowed", mounts=[{"name": "out", "mode": "ro"}])
    with pytest.raises(EROFS):
        narrowed.files.write("/mnt/out/report.txt", "x")
    with pytest.raises(ENOENT):
        narrowed.files.read("/mnt/data/data.csv")
    with pytest.raises(EPERM, match="cannot get it read-write"):
        p.spawn("escalate", mounts=[{"name": "data", "mode": "rw"}])
    with pytest.raises(EPERM, match="only the admin"):
        p.spawn("hostdir", mounts=[{"name": "etc", "path": "/etc"}])
    with pytest.raises(ENOENT):
        admin.spawn("bad", mounts=[{"name": "x", "path": str(tmp_path / "missing")}])
    with pytest.raises(EINVAL, match="absolute"):
        admin.spawn("bad", mounts=[{"name": "x", "path": "relative/dir"}])


def test_file_size_limits_give_clear_errors(spawn: Spawn) -> None:
    p = spawn("big")
    f = p.files
    with pytest.raises(EINVAL):
        f.write("too-big-at-once.bin", b"x" * (limits.MAX_IO_BYTES + 1))
    chunk = b"y" * limits.MAX_IO_BYTES
    with pytest.raises(EFBIG, match="file limit"):
        for _ in range(limits.MAX_FILE_BYTES // limits.MAX_IO_BYTES + 1):
            f.append("grows.bin", chunk)
    assert f.stat("grows.bin").size <= limits.MAX_FILE_BYTES
    with pytest.raises(EINVAL, match="exactly one"):
        p.call("fs.write", {"path": "x", "text": "a", "data": b"b"})


def test_search_finds_files_by_meaning_across_root_and_home(spawn: Spawn) -> None:
    p = spawn("search")
    p.files.write(
        "recipes/bread.txt",
        "Mix flour, water, yeast and salt; knead the dough and bake it for 40 minutes.",
    )
    p.files.write("/home/cars.txt", "The engine needs an oil change every ten thousand kilometres.")
    p.files.write(
        "travel.txt", "Our flight to Lisbon leaves at seven; pack sunscreen and a light jacket."
    )
    p.files.write("binary.bin", b"\x00\x01\x02")
    hits = p.files.search("how do I bake a loaf?", k=3)
    assert hits[0].path == "/recipes/bread.txt" and "yeast" in hits[0].text
    assert p.files.search("vehicle maintenance", k=1)[0].path == "/home/cars.txt"
    p.files.remove("recipes/bread.txt")
    assert all(h.path != "/recipes/bread.txt" for h in p.files.search("baking bread", k=5))
    other = spawn("nosy")
    assert all(h.path != "/travel.txt" for h in other.files.search("flight to Lisbon", k=5))


def test_committed_file_writes_survive_kill_9_of_the_kernel(tmp_path: Path) -> None:
    k = Daemon(tmp_path, "--driver", "sim").start()
    try:
        with k.admin() as admin:
            p = admin.spawn("durable")
            for i in range(5):
                p.files.write("log.txt", f"entry {i}")
            p.files.write("/home/keep.md", "kept")
            pid, token = p.pid, p.token
        os.kill(k.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        k.proc.wait()  # type: ignore[union-attr]
        k.start()
        with Client(k.endpoint, pid=pid, token=token) as me:
            f = me.process(pid, token).files
            assert f.read("log.txt") == "entry 4"
            assert [v.version for v in f.history("log.txt")] == [5, 4, 3, 2, 1]
            assert f.read("/home/keep.md") == "kept"
            assert f.rollback("log.txt", version=2).size == len("entry 1")
    finally:
        k.stop()


def test_a_reaped_process_root_is_deleted_but_a_named_home_outlives_its_program(
    admin: Client, daemon: Daemon
) -> None:
    from tests.conftest import wait_until

    p = admin.spawn("short-lived", namespace="files-that-stay")
    p.files.write("scratch.txt", "temporary")
    p.files.write("/home/kept.txt", "stays")
    root = root_of(daemon, p)
    assert (root / "scratch.txt").exists()
    admin.kill(p.pid, "KILL")
    admin.wait(p.pid)
    wait_until(lambda: not root.exists())
    again = admin.spawn("next-run", namespace="files-that-stay")
    try:
        assert again.files.read("/home/kept.txt") == "stays"
        with pytest.raises(ENOENT):
            again.files.read("scratch.txt")
    finally:
        admin.kill(again.pid, "KILL")
        admin.wait(again.pid)


def test_the_file_tools_answer_like_the_fs_syscalls(spawn: Spawn, tmp_path: Path) -> None:
    """fs_read/fs_write/fs_list act on the caller's view through the same mechanism as
    fs.*: the same paths, results shaped for a model, the very same errors."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "a.txt").write_text("mounted")
    p = spawn("tooled", tools=["fs_*"], mounts=[{"name": "ro", "path": str(ro), "mode": "ro"}])
    t = p.tools
    wrote = t.call("fs_write", {"path": "notes/a.md", "text": "héllo"})
    assert wrote == {"path": "/notes/a.md", "size": 6, "version": 1}
    assert t.call("fs_write", {"path": "/notes/a.md", "text": "hello"})["version"] == 2
    assert p.files.history("notes/a.md")[0].op == "write"
    assert t.call("fs_read", {"path": "notes/a.md"}) == {"path": "/notes/a.md", "text": "hello"}
    p.files.write("/home/blob.bin", b"\xff\x00\xfe")
    assert t.call("fs_read", {"path": "/home/blob.bin"}) == {
        "path": "/home/blob.bin",
        "text": "<3 bytes of binary data>",
    }
    assert t.call("fs_list", {}) == {"path": "/", "entries": ["home/", "mnt/", "notes/"]}
    assert t.call("fs_list", {"path": "/mnt"}) == {"path": "/mnt", "entries": ["ro/"]}
    assert t.call("fs_read", {"path": "/mnt/ro/a.txt"})["text"] == "mounted"
    for tool, syscall, args, code in [
        ("fs_read", "fs.read", {"path": "/mnt"}, "EINVAL"),
        ("fs_write", "fs.write", {"path": "/mnt", "text": "x"}, "EPERM"),
        ("fs_write", "fs.write", {"path": "/mnt/ro/a.txt", "text": "x"}, "EROFS"),
        ("fs_write", "fs.write", {"path": "/", "text": "x"}, "EINVAL"),
        ("fs_read", "fs.read", {"path": "missing.txt"}, "ENOENT"),
        ("fs_read", "fs.read", {"path": "notes"}, "EINVAL"),
        ("fs_read", "fs.read", {"path": "../etc/passwd"}, "EPERM"),
        ("fs_list", "fs.list", {"path": "notes/a.md"}, "EINVAL"),
        ("fs_list", "fs.list", {"path": "/mnt/nothing"}, "ENOENT"),
    ]:
        with pytest.raises(SyscallError) as by_tool:
            t.call(tool, args)
        with pytest.raises(SyscallError) as by_syscall:
            p.call(syscall, args)
        assert by_tool.value.code == by_syscall.value.code == code, (tool, args)
        assert by_tool.value.message == by_syscall.value.message, (tool, args)
