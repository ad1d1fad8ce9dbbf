"""The SDK follows the contract: every syscall in the table has an SDK method, the blocking
and asyncio flavours have the same methods, and both run against the real kernel."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys

import pytest

from llmos.client import (
    AsyncClient,
    AsyncProcess,
    Client,
    Files,
    Memory,
    Process,
    Tools,
)
from syscalls.errors import ERRORS, Errno
from syscalls.table import SYSCALLS
from tests.kernels import Daemon

EINVAL = ERRORS[Errno.EINVAL]
SDK_CLASSES = (Client, AsyncClient, Process, AsyncProcess, Files, Memory, Tools)


def _public(cls: type) -> set[str]:
    return {n for n, v in inspect.getmembers(cls) if not n.startswith("_") and callable(v)}


def _syscalls_of(cls: type) -> set[str]:
    return {
        name
        for _, member in inspect.getmembers(cls)
        for name in getattr(member, "__llmos_syscalls__", ())
    }


def test_every_syscall_in_the_table_has_an_sdk_method() -> None:
    covered = set().union(*(_syscalls_of(cls) for cls in SDK_CLASSES))
    assert sorted(set(SYSCALLS) - covered) == []


def test_every_public_method_has_an_asyncio_twin_and_vice_versa() -> None:
    assert _public(Client) == _public(AsyncClient)
    assert _public(Process) == _public(AsyncProcess)
    # On the asyncio handles every method makes its calls through the asyncio runner (a
    # table-driven method), is itself async, or only builds a handle / delegates to one.
    builders = {"memory", "memory_of", "process", "fork", "call"}
    for cls in (AsyncClient, AsyncProcess):
        for name in _public(cls) - builders:
            member = getattr(cls, name)
            assert (
                hasattr(member, "__llmos_syscalls__")
                or inspect.iscoroutinefunction(member)
                or inspect.isasyncgenfunction(member)
                or (
                    name == "stream" and cls is AsyncClient
                )  # returns the transport's async iterator
            ), (cls.__name__, name)


def test_importing_the_sdk_loads_nothing_of_the_kernel_or_the_drivers() -> None:
    code = (
        "import llmos, sys; "
        "print([m for m in sys.modules if m.split('.')[0] in ('kernel', 'drivers', 'llmos') "
        "and (m.split('.')[0] != 'llmos' or m.startswith('llmos.ctl'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    """A real kernel daemon on the simulator (the contract needs no model)."""
    k = Daemon(tmp_path_factory.mktemp("sdk"), "--driver", "sim", "--slots", "2").start()
    yield k
    k.stop()


def test_named_methods_check_arguments_before_the_round_trip(admin: Client, spawn) -> None:
    p = spawn("checked")
    with pytest.raises(EINVAL, match="path"):
        p.files.read(path=["not", "a", "path"])  # type: ignore[arg-type]
    with pytest.raises(EINVAL):
        p.memory.put("")  # empty text
    with pytest.raises(ERRORS[Errno.ENOSYS]):
        p.call("no.such.syscall")


def test_the_asyncio_flavour_does_files_memory_tools_and_serving(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.endpoint, pid=0, token=daemon.token) as c:
            p = await c.spawn("async-user", tools=["*"])
            server = await p.spawn("async-server")  # a served tool serves its own program
            assert isinstance(p, AsyncProcess)
            written = await p.files.write("notes.txt", "hello")
            assert written.version >= 1 and await p.files.read("notes.txt") == "hello"
            assert "notes.txt" in [e.name for e in await p.files.list("/")]
            await p.memory.set_block("user", "likes tea")
            assert await p.memory.blocks() == {"user": "likes tea"}
            assert (await p.getpid()).pid == p.pid
            child = await p.spawn("kid")
            assert child.parent is p and (await child.getpid()).ppid == p.pid
            await server.tools.register(
                "shout", "upper-case a text", {"type": "object", "properties": {"t": {}}}
            )
            served = asyncio.Event()

            async def shout(t: str) -> str:
                served.set()
                return t.upper()

            serving = asyncio.ensure_future(
                server.tools.serve({"shout": shout}, stop=served.is_set, poll_s=0.2)
            )
            assert await p.tools.call("shout", {"t": "hi"}) == "HI"
            assert await asyncio.wait_for(serving, 10) == 1
            assert (await child.reap()).pid == child.pid
            await server.reap()
            assert (await p.reap()).pid == p.pid

    asyncio.run(main())


def test_user_space_has_no_import_cycles_and_the_sdk_never_imports_the_operator_room() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    graph: dict[str, set[str]] = {}
    for path in sorted((root / "llmos").rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d.startswith("llmos")}
    graph = {
        n: {d for d in ds if d in graph and d != n and d != "llmos"} for n, ds in graph.items()
    }
    sdk = [n for n in graph if not n.startswith("llmos.ctl")]
    for n in sdk:
        assert not any(d.startswith("llmos.ctl") for d in graph[n]), (n, graph[n])
    state: dict[str, int] = {}

    def visit(n: str, trail: list[str]) -> None:
        state[n] = 1
        for d in graph[n]:
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*trail, n, d])}"
            if d not in state:
                visit(d, [*trail, n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])
