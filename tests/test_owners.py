"""Names and topics have owners (issue 21, item 7): a served tool's name is its program's,
topics can be restricted at creation, served-tool schemas are checked at registration,
deep frames are refused, and a failed fs.rename moves nothing. Real daemon, sim driver."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from llmos.client import AsyncClient
from syscalls import codec, limits
from syscalls.errors import ERRORS, Errno, SyscallError
from tests.kernels import Daemon

EBUSY, EPERM, ENOENT, EINVAL, ESRCH = (
    ERRORS[e] for e in (Errno.EBUSY, Errno.EPERM, Errno.ENOENT, Errno.EINVAL, Errno.ESRCH)
)
TEXT = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    k = Daemon(tmp_path_factory.mktemp("owners"), "--driver", "sim").start()
    yield k
    k.stop()


async def _serve_once(server, timeout: float = 10.0) -> dict | None:
    """Answer the next call ``server`` receives with who asked and what; None if none came."""
    req = await server.tools.next(timeout_s=timeout)
    if req.id is None:
        return None
    await server.tools.reply(req.id, {"served_by": server.pid, "q": req.args.get("q")})
    return {"name": req.name, "args": req.args, "caller": req.caller}


def test_a_program_registering_another_programs_tool_name_receives_none_of_its_calls(
    daemon: Daemon,
) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.endpoint, pid=0, token=daemon.token) as admin:
            a, b, c = [await admin.spawn(n) for n in ("prog-a", "prog-b", "prog-c")]
            a_srv, b_srv = await a.spawn("a-server"), await b.spawn("b-server")
            await a_srv.tools.register("lookup", "A's lookup", TEXT)
            await b_srv.tools.register("lookup", "B's squat", TEXT)  # its own: allowed
            with pytest.raises(EBUSY, match="of your program"):
                await a.tools.register("lookup", "a second one in A", TEXT)
            seen_b: list[dict | None] = []
            for i in range(3):  # A's calls, secrets in the arguments
                served, got = await asyncio.gather(
                    _serve_once(a_srv), a.tools.call("lookup", {"q": f"secret-{i}"})
                )
                assert got == {"served_by": a_srv.pid, "q": f"secret-{i}"}
                assert served == {"name": "lookup", "args": {"q": f"secret-{i}"}, "caller": a.pid}
            seen_b.append(await _serve_once(b_srv, timeout=0))
            assert seen_b == [None]  # B's server received nothing of A's
            served, got = await asyncio.gather(
                _serve_once(b_srv), b.tools.call("lookup", {"q": "b's own"})
            )
            assert got["served_by"] == b_srv.pid and served["caller"] == b.pid
            with pytest.raises(ENOENT):  # a third program sees neither
                await c.tools.call("lookup", {"q": "x"})
            mine = [t for t in await a.tools.list() if t.name == "lookup"]
            assert [(t.program, t.server) for t in mine] == [(a.pid, a_srv.pid)]
            every = [(t.program, t.server) for t in await admin.tools() if t.name == "lookup"]
            assert sorted(every) == sorted([(a.pid, a_srv.pid), (b.pid, b_srv.pid)])

            # A tool for everyone is the admin's to register, naming its server.
            with pytest.raises(EPERM, match="only the admin"):
                await a_srv.call(
                    "tool.register", {"name": "w", "description": "d", "scope": "global"}
                )
            await admin.register_tool("weather", "for everyone", TEXT, server=a_srv.pid)
            served, got = await asyncio.gather(
                _serve_once(a_srv), c.tools.call("weather", {"q": "Paris"})
            )
            assert served["caller"] == c.pid and got["q"] == "Paris"
            row = next(t for t in await c.tools.list() if t.name == "weather")
            assert row.program is None and row.server == a_srv.pid
            for who in (b_srv, c):  # a name of everyone is taken in every program
                with pytest.raises(EBUSY, match="for every program"):
                    await who.tools.register("weather", "capture it", TEXT)
            with pytest.raises(EBUSY, match="the kernel"):
                await b_srv.tools.register("calculator", "shadow the kernel's", TEXT)
            # Capability patterns still apply to program tools.
            narrow = await a.spawn("narrow", tools=["calculator"])
            with pytest.raises(EPERM, match="narrowed"):
                await narrow.tools.call("lookup", {"q": "x"})
            with pytest.raises(EINVAL, match="server=PID"):
                await admin.call("tool.register", {"name": "x", "description": "d"})
            await admin.unregister_tool("weather")
            with pytest.raises(ENOENT):
                await c.tools.call("weather", {"q": "x"})
            for p in (a, b, c):
                await p.reap()

    asyncio.run(main())


def test_served_tool_schemas_are_checked_when_registered(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        p = admin.spawn("schemas")
        for schema, why in (
            ({"type": "object", "properties": 5}, "not a valid JSON Schema"),
            ({"type": 5}, "type .object."),
            ({"type": "string"}, "type 'object'"),
            ({"type": "object", "properties": {"x": {"$ref": "http://127.0.0.1:9/s"}}}, "remote"),
            ({"type": "object", "properties": {"x": {"$ref": "#/$defs/nope"}}}, "points nowhere"),
            (
                {"type": "object", "$defs": {"n": {"$ref": "#/$defs/n"}}, "$ref": "#/$defs/n"},
                "recursive",
            ),
        ):
            with pytest.raises(EINVAL, match=why):
                p.tools.register("bad", "a bad schema", schema)
        assert "bad" not in {t.name for t in p.tools.list()}
        p.tools.register(  # local $refs are fine: inlined at registration
            "good",
            "a fine schema",
            {
                "type": "object",
                "$defs": {"q": {"type": "string"}},
                "properties": {"q": {"$ref": "#/$defs/q"}},
            },
        )
        good = next(t for t in p.tools.list() if t.name == "good")
        assert good.parameters["properties"]["q"] == {"type": "string"}
        with pytest.raises(EINVAL, match="good.*q"):
            p.tools.call("good", {"q": 5}, timeout_s=2)
        p.reap()


def test_every_frame_deeper_than_64_levels_is_einval_not_an_internal_error(
    daemon: Daemon,
) -> None:
    import zmq

    with daemon.admin() as admin:
        p = admin.spawn("deep")
        deep: object = "x"
        for _ in range(990):
            deep = {"a": deep}
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(daemon.endpoint)
        try:
            for i, (call, args) in enumerate(
                [
                    ("tool.call", {"name": "calculator", "args": deep}),
                    ("tool.register", {"name": "d", "description": "d", "parameters": deep}),
                    ("ipc.publish", {"topic": "t", "message": [deep]}),
                    ("fs.write", {"path": "x", "data": deep}),
                ]
            ):
                frame = {"v": limits.ABI_VERSION, "id": i + 1, "call": call}
                sock.send(codec.packb({**frame, "pid": p.pid, "token": p.token, "args": args}))
                assert sock.poll(10_000), "no reply"
                reply = codec.unpackb(sock.recv())
                assert reply["id"] == i + 1 and reply["error"]["code"] == "EINVAL", reply
                assert "deeper than 64" in reply["error"]["message"]
        finally:
            sock.close(0)
        p.reap()


def test_restricted_topics_admit_only_their_program_and_allow_list(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        a, b, c = (admin.spawn(n) for n in ("topic-a", "topic-b", "topic-c"))
        a_kid = a.spawn("a-kid")
        made = a.create_topic("a.private")
        assert (made.owner, made.created, made.allow) == (a.pid, True, [])
        a_kid.subscribe("a.private")  # its own program: fine
        for call in (lambda: b.subscribe("a.private"), lambda: b.publish("a.private", "spam")):
            with pytest.raises(EPERM, match="belongs to program"):
                call()
        assert a.publish("a.private", {"n": 1}).delivered == 1
        assert admin.publish("a.private", "from the admin").delivered == 1  # admin: always
        assert [a_kid.recv(timeout=5).body for _ in range(2)] == [{"n": 1}, "from the admin"]
        with pytest.raises(EBUSY, match=f"belongs to program {a.pid}"):
            b.create_topic("a.private")

        # An allow-list, and an announcement channel everyone may read but not write.
        a.create_topic("a.shared", allow=[b.pid])
        b.subscribe("a.shared")
        assert b.publish("a.shared", "b may").delivered == 1
        with pytest.raises(EPERM):
            c.subscribe("a.shared")
        a.create_topic("a.news", others="subscribe")
        c.subscribe("a.news")
        with pytest.raises(EPERM, match="may not publish"):
            c.publish("a.news", "c may not")
        assert a.publish("a.news", "headline").delivered == 1
        assert c.recv(timeout=5).body == "headline"
        # Changing the rules shuts out subscribers they no longer admit.
        again = a.create_topic("a.news", others="none")
        assert again.created is False and again.subscribers == 0
        with pytest.raises(EPERM):
            c.subscribe("a.news")

        # An open topic other programs use cannot be taken from them.
        c.subscribe("open.chat")
        with pytest.raises(EBUSY, match="cannot be taken"):
            a.create_topic("open.chat")
        assert b.publish("open.chat", "open as before").delivered == 1

        # Deleting: the owner or the admin; the topic goes with its program's last process.
        with pytest.raises(EPERM):
            b.call("ipc.topic.delete", {"topic": "a.shared"})
        with pytest.raises(ENOENT):
            b.delete_topic("open.chat")
        assert admin.delete_topic("a.shared") == 1
        a_kid.reap()
        a.reap()
        c.subscribe("a.private")  # its owner is gone: an open name again
        admin.create_topic("admin.only", allow=[b.pid])
        b.subscribe("admin.only")
        with pytest.raises(EPERM, match="belongs to the admin"):
            c.publish("admin.only", "x")
        for p in (b, c):
            p.reap()


def test_a_rename_that_cannot_complete_leaves_the_disk_as_it_was(
    daemon: Daemon, tmp_path: Path
) -> None:
    host = tmp_path / "host"
    (host / "sub").mkdir(parents=True)
    (host / "sub" / "a.txt").write_text("kept")
    (host / "sub" / "link").symlink_to("/etc/passwd")
    (host / "pipes").mkdir()
    os.mkfifo(host / "pipes" / "fifo")
    with daemon.admin() as admin:
        p = admin.spawn("mover", mounts=[{"name": "out", "path": str(host), "mode": "rw"}])
        with pytest.raises(EPERM, match="holds a symlink"):
            p.files.rename("/mnt/out/sub", "/mnt/out/moved")
        with pytest.raises(EPERM, match="special file"):
            p.files.rename("/mnt/out/pipes", "/home/pipes")
        assert (host / "sub" / "a.txt").read_text() == "kept" and (
            host / "sub" / "link"
        ).is_symlink()
        assert not (host / "moved").exists() and (host / "pipes" / "fifo").exists()
        p.files.write("/mnt/out/sub2/b.txt", "fine")
        p.files.rename("/mnt/out/sub2", "/mnt/out/deeper/sub3")  # a clean one moves
        assert (host / "deeper" / "sub3" / "b.txt").read_text() == "fine"
        p.reap()


def test_a_rename_failing_after_the_move_is_undone_on_disk(tmp_path: Path, monkeypatch) -> None:
    """Fault injection in-process: the move succeeded, then reading a moved file failed;
    the transaction rolls back and the directory is back where it was."""
    from drivers.sim import SimDriver
    from kernel import fs as kfs
    from kernel.kernel import Kernel

    async def go() -> None:
        k = Kernel({"sim": SimDriver()}, ["inproc://rename-undo"], embedder=None)
        try:
            await check(k)
        finally:
            await k.transport.close()  # its zmq context must not be left for the GC to end
            k.memory.close()
            k.redactor.close()
            await asyncio.to_thread(k.store.close)

    async def check(k: Kernel) -> None:
        proc = k.procs.spawn(1, "p", "sim", 0, None)
        src, dst = k.fs.place(proc, "/home/dir"), k.fs.place(proc, "/home/new/place/dir")
        await k.fs.write(k.fs.place(proc, "/home/dir/f.txt"), b"data", False, True)
        real = kfs._read_all

        def failing(path: Path) -> bytes:
            if "new" in path.parts:
                raise OSError("injected failure")
            return real(path)

        monkeypatch.setattr(kfs, "_read_all", failing)
        with pytest.raises(OSError, match="injected"):
            await k.fs.rename(src, dst)
        assert (src.real / "f.txt").read_bytes() == b"data"
        assert not (src.base / "new").exists()  # the parents it made are gone too
        monkeypatch.setattr(kfs, "_read_all", real)
        await k.fs.rename(src, dst)
        assert (dst.real / "f.txt").read_bytes() == b"data"

    asyncio.run(go())


def test_topic_and_tool_errors_are_sentences_not_internal_errors(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        p = admin.spawn("errs")
        for call, args, code in (
            ("ipc.topic.delete", {"topic": "never"}, "ENOENT"),
            ("tool.register", {"name": "x", "description": "d", "server": 1 << 30}, "EPERM"),
            ("tool.register", {"name": "x", "description": "d", "scope": "global"}, "EPERM"),
            ("ipc.topic.create", {"topic": "t", "others": "everything"}, "EINVAL"),
        ):
            with pytest.raises(SyscallError) as err:
                p.call(call, args)
            assert err.value.code == code and len(err.value.message) > 10
        with pytest.raises(ESRCH):
            admin.call("tool.register", {"name": "x", "description": "d", "server": p.pid + 10_000})
        p.reap()
