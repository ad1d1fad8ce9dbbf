"""The kernel as an MCP host, against real MCP servers: the PyPI servers ``mcp-server-time``
and ``mcp-server-git`` over stdio, a stdio server this test writes with the official
SDK (destructive, hanging, failing, environment-reporting and hostile-schema tools), and
a streamable-HTTP server it writes with the SDK's ``MCPServer``, each in its own process.

No model is needed (the ``sim`` driver) except for the one ``model`` test, where the
packaged model calls an MCP tool through ``llm.generate(tools=...)`` and the Agent loop.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import psutil
import pytest

from kernel.daemon import mcp_spec
from kernel.mcp import check_schema, irreversible, python_command, tool_name
from llmos.client import Client
from syscalls import limits
from syscalls.errors import ERRORS, Errno
from tests.conftest import wait_until
from tests.kernels import Daemon

EPERM, EIO, ETIMEDOUT, EBUSY, ENOENT = (
    ERRORS[e] for e in (Errno.EPERM, Errno.EIO, Errno.ETIMEDOUT, Errno.EBUSY, Errno.ENOENT)
)
ROOT = Path(__file__).resolve().parent.parent

#: A stdio MCP server on the official SDK's low-level Server, with every tool listed by hand
#: (so its schemas and annotations are exactly what a hostile server could send).
TOY_SERVER = r"""
import os, sys
import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

RO = types.ToolAnnotations(read_only_hint=True, destructive_hint=False)
OBJ = {"type": "object", "properties": {}}
LATE = []


def deep(n):
    s = {"type": "string"}
    for _ in range(n):
        s = {"type": "object", "properties": {"x": s}}
    return s


def tools():
    return [
        types.Tool(name="echo", description="Echo a text.", annotations=RO, input_schema={
            "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}),
        types.Tool(name="Wipe-All", description="Delete everything.", input_schema=OBJ,
                   annotations=types.ToolAnnotations(read_only_hint=False, destructive_hint=True)),
        types.Tool(name="env", description="The server's environment variable names.",
                   input_schema=OBJ, annotations=RO),
        types.Tool(name="getenv", description="One variable's value.", annotations=RO,
                   input_schema={"type": "object", "properties": {"name": {"type": "string"}}}),
        types.Tool(name="leak", description="Fails, echoing its token.", input_schema=OBJ,
                   annotations=RO),
        types.Tool(name="sleep", description="Sleep s seconds.", annotations=RO,
                   input_schema={"type": "object", "properties": {"s": {"type": "number"}}}),
        types.Tool(name="fail", description="Always fails.", input_schema=OBJ, annotations=RO),
        types.Tool(name="grow", description="Add a tool.", input_schema=OBJ, annotations=RO),
        types.Tool(name="pointed", description="A local $ref.", annotations=RO, input_schema={
            "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}},
            "$defs": {"P": {"type": "integer"}}}),
        types.Tool(name="huge", description="A huge schema.", input_schema={
            "type": "object",
            "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                           for i in range(2000)}}),
        types.Tool(name="deep", description="A deep schema.", input_schema=deep(40)),
        types.Tool(name="invalid", description="An invalid schema.", input_schema={
            "type": "object", "properties": {"a": {"type": "no-such-type"}}}),
        types.Tool(name="remote", description="A remote $ref.", input_schema={
            "type": "object", "properties": {"a": {"$ref": "http://127.0.0.1:9/evil.json"}}}),
        *LATE,
    ]


async def list_tools(ctx, params):
    return types.ListToolsResult(tools=tools())


def text(s, error=False):
    return types.CallToolResult(content=[types.TextContent(type="text", text=s)], is_error=error)


async def call_tool(ctx, params):
    a = params.arguments or {}
    if params.name == "echo":
        return text(a["text"])
    if params.name == "Wipe-All":
        return text("wiped")
    if params.name == "env":
        return types.CallToolResult(content=[], structured_content={"names": sorted(os.environ)})
    if params.name == "getenv":
        return text(os.environ.get(a["name"], "<unset>"))
    if params.name == "leak":
        return text(f"bad token {os.environ.get('TOY_TOKEN')}", error=True)
    if params.name == "sleep":
        await anyio.sleep(float(a.get("s", 3600)))
        return text("slept")
    if params.name == "fail":
        return text("it broke on purpose", error=True)
    if params.name == "grow":
        LATE.append(types.Tool(name="late", description="Added later.", input_schema=OBJ,
                               annotations=RO))
        await ctx.session.send_tool_list_changed()
        return text("grown")
    return text("ok")


server = Server("toy", on_list_tools=list_tools, on_call_tool=call_tool)


async def main():
    print("toy server starting", file=sys.stderr, flush=True)
    print(f"toy token {os.environ.get('TOY_TOKEN')}", file=sys.stderr, flush=True)
    async with stdio_server() as (r, w):
        await server.run(r, w, server.create_initialization_options())


anyio.run(main)
"""

#: A streamable-HTTP MCP server on the SDK's high-level MCPServer.
HTTP_SERVER = r'''
import sys
import anyio
from mcp.server.mcpserver import MCPServer

app = MCPServer("adder")


@app.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


anyio.run(lambda: app.run_streamable_http_async(host="127.0.0.1", port=int(sys.argv[1])))
'''


#: The same adder behind a check of two headers (its bearer token from $ADDER_TOKEN).
AUTH_HTTP_SERVER = r'''
import os, sys
import uvicorn
from mcp.server.mcpserver import MCPServer

app = MCPServer("adder")


@app.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


inner = app.streamable_http_app()
want = {b"authorization": b"Bearer " + os.environ["ADDER_TOKEN"].encode(), b"x-tenant": b"acme"}


async def guarded(scope, receive, send):
    if scope["type"] == "http" and any(dict(scope["headers"]).get(k) != v for k, v in want.items()):
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b"unauthorized"})
        return
    await inner(scope, receive, send)


uvicorn.run(guarded, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''
#: The secrets the module's kernel gives the toy server (--mcp-env), never to be shown.
TOY_TOKEN = "toy-secret-3f9a1c77d2"
TOY_INHERITED = "inherited-secret-8b2e44"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(c: Client, name: str) -> Any:
    server = next((s for s in c.mcp_list() if s.name == name), None)
    return server if server is not None and server.state == "ready" else None


def _server_pids(d: Daemon, marker: str) -> list[int]:
    """The kernel's child processes whose command line has ``marker`` (the MCP servers)."""
    assert d.proc is not None
    return [
        child.pid
        for child in psutil.Process(d.proc.pid).children()
        if any(marker in part for part in child.cmdline())
    ]


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("mcp-servers")
    (where / "toy_server.py").write_text(TOY_SERVER)
    (where / "http_server.py").write_text(HTTP_SERVER)
    (where / "auth_http_server.py").write_text(AUTH_HTTP_SERVER)
    return where


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, scripts: Path) -> Iterator[Daemon]:
    """A kernel on the simulator with two MCP servers mounted at start (``--mcp``)."""
    toy = shlex.join([sys.executable, str(scripts / "toy_server.py")])
    k = Daemon(
        tmp_path_factory.mktemp("mcp"),
        "--driver",
        "sim",
        "--mcp",
        "time=" + python_command("mcp_server_time"),
        "--mcp",
        f"toy={toy}",
        "--mcp-env",
        f"toy:TOY_TOKEN={TOY_TOKEN}",
        "--mcp-env",
        "toy:TOY_INHERITED",  # its value from the kernel's environment
    )
    k.env["OPENAI_API_KEY"] = "sk-not-for-mcp-servers"  # a key the servers must not see
    k.env["TOY_INHERITED"] = TOY_INHERITED
    k.start()
    with k.admin() as c:
        wait_until(lambda: _ready(c, "time") and _ready(c, "toy"), timeout=60)
    yield k
    k.stop()


@pytest.fixture
def admin(daemon: Daemon) -> Iterator[Client]:
    with daemon.admin() as c:
        yield c


# -- names, schemas, annotations (no kernel) ------------------------------------------------


def test_tool_names_are_openai_legal_stable_and_bounded() -> None:
    assert tool_name("time", "get_current_time", set()) == "time__get_current_time"
    assert tool_name("toy", "Wipe-All", set()) == "toy__wipe_all"
    long = tool_name("srv", "x" * 200, set())
    assert len(long) == 64 and long == tool_name("srv", "x" * 200, set())
    clash = tool_name("toy", "wipe.all", {"toy__wipe_all"})
    assert clash != "toy__wipe_all" and clash.startswith("toy__wipe_all_")
    for name in (long, clash):
        assert jsonschema.Draft202012Validator({"pattern": r"^[a-z][a-z0-9_]{0,63}$"}).is_valid(
            name
        )


def test_check_schema_refuses_huge_deep_invalid_and_remote_schemas() -> None:
    ok = {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {}}}
    assert check_schema(ok) == {"type": "object", "properties": {"p": {}}}
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(limits.MAX_MCP_SCHEMA_DEPTH):
        deep = {"type": "object", "properties": {"x": deep}}
    hostile = {
        "bytes": {"type": "object", "description": "x" * limits.MAX_MCP_SCHEMA_BYTES},
        "deeper": deep,
        "object": {"type": "string"},
        "valid": {"type": "object", "properties": {"a": {"type": 3}}},
        "remote": {"type": "object", "properties": {"a": {"$ref": "https://x.example/s"}}},
        "recursive": {"type": "object", "properties": {"a": {"$ref": "#"}}},
    }
    for why, schema in hostile.items():
        with pytest.raises(ValueError, match=why if why != "recursive" else "recursive"):
            check_schema(schema)


def test_annotations_only_ever_add_confirmation() -> None:
    from mcp_types import ToolAnnotations

    assert irreversible(None)  # MCP's defaults: not read-only, destructive
    assert irreversible(ToolAnnotations())
    assert irreversible(ToolAnnotations(read_only_hint=False, destructive_hint=False))
    assert irreversible(ToolAnnotations(read_only_hint=True, destructive_hint=True))
    assert not irreversible(ToolAnnotations(read_only_hint=True))


def test_a_servers_stderr_reaches_the_log_cut_and_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio

    from kernel import mcp

    async def chatter() -> None:
        err = mcp._StderrLog("noisy")
        err.file.write("x" * 5000 + "\n")
        for i in range(1000):
            err.file.write(f"line {i}\n")
        err.file.flush()
        err.parent_done()  # EOF: the reader closes itself
        for _ in range(200):
            await asyncio.sleep(0.01)
            if err._r < 0:
                break

    with caplog.at_level("INFO", logger="llmos.mcp"):
        asyncio.run(chatter())
    lines = [r.getMessage() for r in caplog.records if "mcp noisy: stderr" in r.getMessage()]
    assert len(lines) == mcp.STDERR_LINES_PER_MIN
    assert max(len(line) for line in lines) <= mcp.STDERR_LINE_CHARS + 40


def test_mcp_option_is_checked_by_the_daemons_parser() -> None:
    assert mcp_spec("time=python -m mcp_server_time") == ("time", "python -m mcp_server_time")
    assert mcp_spec("web=http://127.0.0.1:8000/mcp")[1].startswith("http://")
    for bad in ("time", "Time=x", "a__b=x", "t=", "t='unclosed"):
        with pytest.raises(argparse.ArgumentTypeError):
            mcp_spec(bad)


def test_mcp_env_and_header_options_join_their_servers_checked(tmp_path: Path) -> None:
    from kernel.daemon import mcp_mounts, parser

    token_file = tmp_path / "token"
    token_file.write_text("file-token-0123456789\n")

    def mounts(*argv: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
        found = mcp_mounts(parser().parse_args(list(argv)), environ or {})
        return {
            a.name: (
                {k: v.get_secret_value() for k, v in a.env.items()},
                {k: v.get_secret_value() for k, v in a.headers.items()},
            )
            for a in found
        }

    got = mounts(
        *("--mcp", "t=python -m x", "--mcp-env", "t:TZ=UTC", "--mcp-env", "t:API_KEY"),
        *("--mcp", "w=https://h.example/mcp", "--mcp-header", "w:X-Tenant: acme"),
        *("--mcp-bearer-file", f"w:{token_file}", "--mcp", "v=http://h/mcp"),
        *("--mcp-bearer-env", "v:V_TOKEN"),
        environ={"API_KEY": "from-env", "V_TOKEN": "v-token"},
    )
    assert got == {
        "t": ({"TZ": "UTC", "API_KEY": "from-env"}, {}),
        "w": ({}, {"X-Tenant": "acme", "Authorization": "Bearer file-token-0123456789"}),
        "v": ({}, {"Authorization": "Bearer v-token"}),
    }
    refused = {
        "names no --mcp server": ("--mcp", "t=x", "--mcp-env", "u:A=1"),
        "is not set": ("--mcp", "t=x", "--mcp-env", "t:MISSING"),
        "headers are for http": ("--mcp", "t=x", "--mcp-header", "t:X-A: b"),
        "env is for stdio": ("--mcp", "w=http://h", "--mcp-env", "w:A=b"),
        "cannot read": ("--mcp", "w=http://h", "--mcp-bearer-file", "w:/nonexistent"),
        "kernel's own": ("--mcp", "t=x", "--mcp-env", "t:LLMOS_ADMIN_TOKEN=s3cret-value"),
        "control character": ("--mcp", "w=http://h", "--mcp-header", "w:X-A: a\r\nHost: evil"),
        "set by the MCP transport": ("--mcp", "w=http://h", "--mcp-header", "w:Host: evil"),
    }
    for why, argv in refused.items():
        with pytest.raises(ValueError) as exc:
            mounts(*argv)
        message = str(exc.value)
        assert (why if why != "names no --mcp server" else "one of the --mcp") in message
        assert "s3cret" not in message and "evil" not in message  # never a value


def test_mcp_add_words_take_secrets_from_options_files_and_the_environment(
    tmp_path: Path,
) -> None:
    from llmos.ctl.mcp_cli import parse_add

    token = tmp_path / "token"
    token.write_text("tok-0123456789\n")
    env = {"GH_TOKEN": "gh-secret"}
    spec = parse_add(["--env", "GH_TOKEN", "--env=TZ=UTC", "npx", "srv", "--env", "x"], env)
    assert spec.target == "npx srv --env x"  # the command's own options are its own
    assert spec.env == {"GH_TOKEN": "gh-secret", "TZ": "UTC"}
    spec = parse_add(["https://h/mcp", "--bearer-file", str(token), "--header", "X-T: a"], env)
    assert spec.target == "https://h/mcp"
    assert spec.headers == {"Authorization": "Bearer tok-0123456789", "X-T": "a"}
    spec = parse_add(["python -m x", "--env", "A=1", "--timeout", "5"], env)
    assert (spec.target, spec.env, spec.timeout) == ("python -m x", {"A": "1"}, 5.0)
    for words in (
        ["--env", "NOPE", "cmd"],
        ["https://h/mcp", "extra"],
        ["--bearer-env", "NOPE", "https://h/mcp"],
        ["--header", "no colon here", "https://h/mcp"],
        ["--env"],
        [],
    ):
        with pytest.raises(ERRORS[Errno.EINVAL]) as exc:
            parse_add(words, env)
        assert "no colon here" not in str(exc.value)


# -- a kernel with servers mounted -------------------------------------------------------


def test_the_time_server_mounted_at_start_is_a_kernel_tool(admin: Client) -> None:
    tools = {t.name: t for t in admin.tools()}
    t = tools["time__get_current_time"]
    assert t.mcp == "time" and t.server is None and not t.irreversible
    assert t.parameters["required"] == ["timezone"]
    p = admin.spawn("timer", tools=["time__*"])
    now = p.tools.call("time__get_current_time", {"timezone": "Asia/Tokyo"})
    assert now["timezone"] == "Asia/Tokyo" and "+09:00" in now["datetime"]
    converted = p.tools.call(
        "time__convert_time",
        {"source_timezone": "Etc/UTC", "time": "12:00", "target_timezone": "Europe/Paris"},
    )
    assert converted["target"]["timezone"] == "Europe/Paris"
    p.exit()


def test_capability_patterns_apply_to_mcp_tools(admin: Client) -> None:
    p = admin.spawn("narrow", tools=["time__*"])
    assert {t.mcp for t in p.tools.list()} == {"time"}
    with pytest.raises(EPERM, match="toy__echo"):
        p.tools.call("toy__echo", {"text": "no"})
    q = admin.spawn("calc-only", tools=["calculator"])
    with pytest.raises(EPERM):
        q.tools.call("time__get_current_time", {"timezone": "UTC"})
    child = p.spawn("child", tools=["toy__*"])  # a child narrows; it cannot widen
    with pytest.raises(EPERM):
        child.tools.call("toy__echo", {"text": "no"})
    for proc in (child, p, q):
        proc.exit()


def test_the_agent_loop_takes_a_servers_tools_by_pattern(admin: Client) -> None:
    from llmos.agent import Agent

    p = admin.spawn("agent", tools=["time__*", "toy__echo"])
    assert Agent(p, tools=["time__*"]).tools == ["time__convert_time", "time__get_current_time"]
    assert Agent(p, tools=["toy__echo"]).tools == ["toy__echo"]
    with pytest.raises(ValueError, match="no tools"):
        Agent(p, tools=["git__*"])
    p.exit()


def test_arguments_are_validated_against_the_servers_schema(admin: Client) -> None:
    p = admin.spawn("v", tools=["toy__*"])
    with pytest.raises(ERRORS[Errno.EINVAL], match="text"):
        p.tools.call("toy__echo", {})
    assert p.tools.call("toy__echo", {"text": "hi"}) == "hi"
    assert p.tools.call("toy__pointed", {"p": 3}) == "ok"  # its local $ref was inlined
    with pytest.raises(ERRORS[Errno.EINVAL]):
        p.tools.call("toy__pointed", {"p": "three"})
    p.exit()


def test_is_error_is_eio_with_the_servers_message(admin: Client) -> None:
    p = admin.spawn("f", tools=["toy__*", "time__*"])
    with pytest.raises(EIO, match="it broke on purpose"):
        p.tools.call("toy__fail")
    with pytest.raises(EIO, match="Invalid timezone"):
        p.tools.call("time__get_current_time", {"timezone": "Nowhere/Atlantis"})
    p.exit()


def test_hostile_schemas_are_refused_with_a_reason_and_the_rest_kept(
    admin: Client, daemon: Daemon
) -> None:
    toy = next(s for s in admin.mcp_list() if s.name == "toy")
    refused = {line.split(":")[0]: line for line in toy.refused}
    assert set(refused) == {"huge", "deep", "invalid", "remote"}
    assert "bytes" in refused["huge"] and "deeper" in refused["deep"]
    assert "not a valid JSON Schema" in refused["invalid"] and "not local" in refused["remote"]
    assert {"toy__echo", "toy__wipe_all", "toy__sleep"} <= set(toy.tools)
    assert "toy__huge" not in {t.name for t in admin.tools()}
    assert "tool 'deep' refused" in daemon.log()


def test_a_destructive_tool_is_parked_under_confirm(admin: Client) -> None:
    assert next(t for t in admin.tools() if t.name == "toy__wipe_all").irreversible
    p = admin.spawn("careful", tools=["toy__*"], confirm=True)
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(p.tools.call("toy__wipe_all", timeout_s=20))
        except Exception as exc:  # the verdict, for the assertion below
            outcome.append(exc)

    for approve in (False, True):
        outcome.clear()
        worker = threading.Thread(target=call)
        worker.start()
        wait_until(lambda: any(c.name == "toy__wipe_all" for c in admin.pending()), timeout=10)
        parked = next(c for c in admin.pending() if c.name == "toy__wipe_all")
        assert parked.caller == p.pid
        (admin.approve if approve else admin.deny)(parked.id)
        worker.join(10)
        if approve:
            assert outcome == ["wiped"]
        else:
            assert isinstance(outcome[0], EPERM)
    assert p.tools.call("toy__echo", {"text": "read-only runs at once"})  # not parked
    p.exit()


def test_a_hung_server_call_is_etimedout_never_a_hang(admin: Client) -> None:
    p = admin.spawn("patient", tools=["toy__*"])
    t0 = time.monotonic()
    with pytest.raises(ETIMEDOUT):
        p.tools.call("toy__sleep", {"s": 3600}, timeout_s=1.0)
    assert time.monotonic() - t0 < 3
    assert p.tools.call("toy__echo", {"text": "still here"}) == "still here"
    p.exit()


def test_the_stdio_servers_environment_is_clean(admin: Client, daemon: Daemon) -> None:
    assert "LLMOS_RUNTIME_DIR" in daemon.env  # the kernel has them; its servers do not
    p = admin.spawn("env", tools=["toy__env"])
    names = p.tools.call("toy__env")["names"]
    assert not [n for n in names if n.startswith("LLMOS")]
    assert "OPENAI_API_KEY" not in names and "PYTHONPATH" not in names
    assert "TOY_INHERITED" in names and "TOY_TOKEN" in names  # its own, given with --mcp-env
    clean = {"HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LC_CTYPE"}
    assert set(names) <= clean | {"TOY_TOKEN", "TOY_INHERITED"}
    assert "mcp toy: stderr: toy server starting" in daemon.log()  # its stderr: the log
    p.exit()


def test_tools_list_changed_refreshes_the_table(admin: Client) -> None:
    p = admin.spawn("grower", tools=["toy__*"])
    assert "toy__late" not in {t.name for t in admin.tools()}
    assert p.tools.call("toy__grow") == "grown"
    wait_until(lambda: "toy__late" in {t.name for t in admin.tools()}, timeout=10)
    assert p.tools.call("toy__late") == "ok"
    p.exit()


def test_a_killed_server_fails_its_calls_at_once_and_is_restarted(
    admin: Client, daemon: Daemon
) -> None:
    p = admin.spawn("victim", tools=["toy__*"])
    before = next(s for s in admin.mcp_list() if s.name == "toy").restarts
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(p.tools.call("toy__sleep", {"s": 60}, timeout_s=30))
        except Exception as exc:  # the error, for the assertion below
            outcome.append((exc, time.monotonic()))

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.5)  # the call is at the server
    (pid,) = _server_pids(daemon, "toy_server.py")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    worker.join(10)
    exc, when = outcome[0]
    assert isinstance(exc, EIO) and "went away" in str(exc)
    assert when - killed < 2  # at once, not at the call's timeout
    wait_until(lambda: bool((s := _ready(admin, "toy")) and s.restarts > before), timeout=30)
    server = next(s for s in admin.mcp_list() if s.name == "toy")
    assert server.restarts == before + 1 and server.error
    assert p.tools.call("toy__echo", {"text": "back"}) == "back"
    assert _server_pids(daemon, "toy_server.py") != [pid]
    p.exit()


def test_a_restarting_servers_tools_answer_eio(admin: Client, daemon: Daemon) -> None:
    p = admin.spawn("impatient", tools=["toy__*"])
    before = next(s for s in admin.mcp_list() if s.name == "toy").restarts
    for pid in _server_pids(daemon, "toy_server.py"):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _ready(admin, "toy"), timeout=10)
    with pytest.raises(EIO, match="restarting"):
        p.tools.call("toy__echo", {"text": "x"})
    wait_until(lambda: bool((s := _ready(admin, "toy")) and s.restarts > before), timeout=30)
    assert p.tools.call("toy__echo", {"text": "y"}) == "y"
    p.exit()


def test_git_server_on_a_repository_made_here(admin: Client, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "notes.txt").write_text("hello\n")
    subprocess.run([*git, "add", "notes.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "first note"], check=True)
    (repo / "notes.txt").write_text("hello again\n")
    server = admin.mcp_add("git", python_command("mcp_server_git", "--repository", str(repo)))
    try:
        assert {"git__git_status", "git__git_log", "git__git_reset"} <= set(server.tools)
        tools = {t.name: t for t in admin.tools() if t.mcp == "git"}
        assert not tools["git__git_status"].irreversible and tools["git__git_reset"].irreversible
        p = admin.spawn("gitter", tools=["git__*"])
        status = p.tools.call("git__git_status", {"repo_path": str(repo)})
        assert "notes.txt" in status and "modified" in status
        assert "first note" in p.tools.call("git__git_log", {"repo_path": str(repo)})
        diff = p.tools.call("git__git_diff_unstaged", {"repo_path": str(repo)})
        assert "+hello again" in diff
        p.exit()
    finally:
        admin.mcp_remove("git")
    assert not [t for t in admin.tools() if t.mcp == "git"]


def test_a_streamable_http_server(admin: Client, scripts: Path) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, str(scripts / "http_server.py"), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, timeout=30, every=0.1)
        info = admin.mcp_add("web", f"http://127.0.0.1:{port}/mcp")
        assert info.transport == "http" and info.tools == ["web__add"]
        p = admin.spawn("web", tools=["web__*"])
        assert p.tools.call("web__add", {"a": 2, "b": 40}) == {"result": 42}
        p.exit()
        admin.mcp_remove("web")
    finally:
        server.terminate()
        server.wait(10)


def test_mcp_syscalls_are_the_admins(admin: Client) -> None:
    p = admin.spawn("nosy")
    for name, args in (
        ("mcp.list", {}),
        ("mcp.add", {"name": "evil", "target": "sh -c 'id'"}),
        ("mcp.remove", {"name": "time"}),
    ):
        with pytest.raises(EPERM, match="admin"):
            p.call(name, args)
    p.exit()
    with pytest.raises(EBUSY):
        admin.mcp_add("time", python_command("mcp_server_time"))
    with pytest.raises(EIO, match="did not come up"):
        admin.mcp_add("broken", "/nonexistent/mcp-server --flag", timeout=10)
    assert "broken" not in {s.name for s in admin.mcp_list()}
    with pytest.raises(ENOENT):
        admin.mcp_remove("never")


def _llmos(daemon: Daemon, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The ``llmos`` command on ``daemon`` (``env``: more environment variables)."""
    return subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", *args],
        env={
            **os.environ,
            "LLMOS_RUNTIME_DIR": str(daemon.run_dir),
            "LLMOS_STATE_DIR": str(daemon.state_dir),
            "COLUMNS": "250",  # rich's tables unwrapped
            **env,
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_llmos_mcp_add_list_remove(daemon: Daemon, admin: Client) -> None:
    def llmos(*args: str) -> subprocess.CompletedProcess[str]:
        return _llmos(daemon, *args)

    add = llmos("mcp", "add", "clock", sys.executable, "-m", "mcp_server_time")
    assert add.returncode == 0, add.stderr
    assert "clock__get_current_time" in add.stdout
    listed = json.loads(llmos("mcp", "list", "--json").stdout)
    assert {s["name"]: s["state"] for s in listed}["clock"] == "ready"
    tools = llmos("tools")
    assert "mcp clock" in tools.stdout
    assert llmos("mcp", "remove", "clock").returncode == 0
    assert "clock" not in {s.name for s in admin.mcp_list()}
    gone = llmos("mcp", "remove", "clock")
    assert gone.returncode == 1 and "ENOENT" in gone.stderr


def test_a_stdio_servers_env_reaches_it_and_no_value_is_ever_shown(
    admin: Client, daemon: Daemon, scripts: Path
) -> None:
    p = admin.spawn("secrets", tools=["toy__*", "toyb__*"])
    assert p.tools.call("toy__getenv", {"name": "TOY_TOKEN"}) == TOY_TOKEN
    assert p.tools.call("toy__getenv", {"name": "TOY_INHERITED"}) == TOY_INHERITED
    with pytest.raises(EIO) as leak:  # a server echoing its secret into an error
        p.tools.call("toy__leak")
    assert TOY_TOKEN not in str(leak.value) and "bad token ***" in str(leak.value)
    toy = next(s for s in admin.mcp_list() if s.name == "toy")
    assert toy.env == ["TOY_INHERITED", "TOY_TOKEN"] and toy.headers == []
    # At run time too; then the audit trail, the log, mcp.list and llmos mcp list.
    other = "runtime-secret-5e6f7a8b9c"
    toy_cmd = shlex.join([sys.executable, str(scripts / "toy_server.py")])
    admin.mcp_add("toyb", toy_cmd, env={"TOY_TOKEN": other})
    try:
        assert p.tools.call("toyb__getenv", {"name": "TOY_TOKEN"}) == other
        listed = _llmos(daemon, "mcp", "list")
        assert "env TOY_TOKEN" in listed.stdout
        shown = [
            json.dumps([s.model_dump() for s in admin.mcp_list()]),
            _llmos(daemon, "mcp", "list", "--json").stdout,
            listed.stdout,
            json.dumps(admin.audit(limit=1000).model_dump()),
        ]
        assert any("mcp.add" in text for text in shown)
        wait_until(lambda: "mcp toyb: stderr: toy token ***" in daemon.log(), timeout=10)
        for text in [*shown, daemon.log()]:
            assert TOY_TOKEN not in text and TOY_INHERITED not in text and other not in text
    finally:
        admin.mcp_remove("toyb")
    p.exit()


def test_secrets_are_checked_and_never_echoed_in_errors(admin: Client, daemon: Daemon) -> None:
    cmd = python_command("mcp_server_time")
    admin_token = (daemon.run_dir / "admin.token").read_text().strip()
    refused = [
        ({"env": {"LLMOS_TOKEN": "x-secret-value"}}, cmd, "kernel's own"),
        ({"env": {"K": admin_token}}, cmd, "kernel credential"),
        ({"env": {"1BAD": "x"}}, cmd, "env"),
        ({"headers": {"X-A": "x-secret-value"}}, cmd, "headers are for http"),
        ({"env": {"K": "x-secret-value"}}, "http://127.0.0.1:9/mcp", "env is for stdio"),
        ({"headers": {"X-A": "x-secret\r\nvalue"}}, "http://127.0.0.1:9/mcp", "control"),
        ({"headers": {"Bad Name": "x"}}, "http://127.0.0.1:9/mcp", "headers"),
        ({"env": {"K": "x" * (limits.MAX_MCP_SECRET_CHARS + 1)}}, cmd, "env.K"),
        ({"env": {f"K{i}": "x" for i in range(limits.MAX_MCP_ENV + 1)}}, cmd, "env"),
    ]
    for extra, target, why in refused:
        with pytest.raises(ERRORS[Errno.EINVAL]) as exc:
            admin.call("mcp.add", {"name": "bad", "target": target, **extra})
        assert why in str(exc.value), (why, str(exc.value))
        assert "secret" not in str(exc.value) and admin_token not in str(exc.value)
    assert "bad" not in {s.name for s in admin.mcp_list()}


def test_an_http_server_is_sent_its_headers(
    admin: Client, daemon: Daemon, scripts: Path, tmp_path: Path
) -> None:
    port, token = _free_port(), "adder-token-4d5e6f708192"
    server = subprocess.Popen(
        [sys.executable, str(scripts / "auth_http_server.py"), str(port)],
        env={**os.environ, "ADDER_TOKEN": token},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        wait_until(lambda: _listening(port), timeout=30, every=0.1)
        with pytest.raises(EIO, match="did not come up"):  # no token: the server says 401
            admin.mcp_add("locked", url, timeout=10, headers={"X-Tenant": "acme"})
        headers = {"Authorization": f"Bearer {token}", "X-Tenant": "acme"}
        info = admin.mcp_add("locked", url, headers=headers)
        assert info.tools == ["locked__add"] and info.headers == ["Authorization", "X-Tenant"]
        p = admin.spawn("adder", tools=["locked__*"])
        assert p.tools.call("locked__add", {"a": 2, "b": 40}) == {"result": 42}
        p.exit()
        admin.mcp_remove("locked")
        # llmos mcp add, the token from a variable of the caller's environment
        keyed = f"{url}?tenant_key=query-secret-77aa"  # a key in the URL: listed as ***
        add = _llmos(
            daemon,
            *("mcp", "add", "--bearer-env", "ADDER", "locked", keyed, "--header", "X-Tenant: acme"),
            ADDER=token,
        )
        assert add.returncode == 0, add.stderr
        assert "locked__add" in add.stdout
        listed = _llmos(daemon, "mcp", "list")
        assert "header Authorization" in listed.stdout and token not in listed.stdout
        assert f"{url}?tenant_key=***" in listed.stdout
        assert token not in daemon.log() and "query-secret" not in daemon.log()
        admin.mcp_remove("locked")
    finally:
        server.terminate()
        server.wait(10)


def test_a_kernel_started_with_an_http_server_and_its_bearer_token(
    scripts: Path, tmp_path: Path
) -> None:
    """``--mcp NAME=URL`` with ``--mcp-bearer-env`` and ``--mcp-header``: the token comes
    from the kernel's environment, not its command line, and is shown nowhere."""
    port, token = _free_port(), "start-token-a1b2c3d4e5f6"
    server = subprocess.Popen(
        [sys.executable, str(scripts / "auth_http_server.py"), str(port)],
        env={**os.environ, "ADDER_TOKEN": token},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _listening(port), timeout=30, every=0.1)
        k = Daemon(
            tmp_path,
            *("--driver", "sim", "--mcp", f"web=http://127.0.0.1:{port}/mcp"),
            *("--mcp-bearer-env", "web:WEB_TOKEN", "--mcp-header", "web:X-Tenant: acme"),
        )
        k.env["WEB_TOKEN"] = token
        with k, k.admin() as c:
            wait_until(lambda: bool(_ready(c, "web")), timeout=60)
            web = next(s for s in c.mcp_list() if s.name == "web")
            assert web.transport == "http" and web.headers == ["Authorization", "X-Tenant"]
            p = c.spawn("adder", tools=["web__*"])
            assert p.tools.call("web__add", {"a": 1, "b": 2}) == {"result": 3}
            assert token not in k.log() and token not in json.dumps(web.model_dump())
            assert token not in " ".join(psutil.Process(k.proc.pid).cmdline())  # type: ignore[union-attr]
    finally:
        server.terminate()
        server.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- the packaged model calls an MCP tool -------------------------------------------------


@pytest.mark.model
def test_the_model_calls_an_mcp_tool_through_generate_and_the_agent_loop(
    tmp_path: Path,
) -> None:
    from llmos.agent import Agent

    with (
        Daemon(tmp_path, "--slots", "1", "--mcp", "time=" + python_command("mcp_server_time")) as d,
        d.admin() as c,
    ):
        wait_until(lambda: bool(_ready(c, "time")), timeout=60)
        schema = next(t for t in c.tools() if t.name == "time__get_current_time").parameters
        p = c.spawn("asker", system="Answer with the tools.", tools=["time__*"])
        res = p.generate(
            [{"role": "user", "content": "Call the tool to get the current time in Asia/Tokyo."}],
            tools=["time__get_current_time"],
            max_tokens=64,
            temperature=0.0,
        )
        assert len(res.tool_calls) == 1, res.text  # the call parses...
        call = res.tool_calls[0]
        assert call.name == "time__get_current_time"
        jsonschema.validate(call.arguments, schema)
        result = p.tools.call(call.name, call.arguments)  # ...and runs
        assert "datetime" in result
        steps: list[Any] = []
        Agent(p, tools=["time__get_current_time"], max_steps=2, on_step=steps.append).run(
            "What is the current time in Asia/Tokyo? Use the tool."
        )
        assert any(s.tool == "time__get_current_time" and s.error is None for s in steps), steps

        async def task() -> Any:  # and llmos mcp serve runs the agent loop for an MCP host
            async with _serve_session(d) as s:
                return await s.call_tool(
                    "run_task",
                    {
                        "task": "What time is it in Asia/Tokyo?",
                        "tools": ["time__*"],
                        "max_steps": 2,
                    },
                )

        import asyncio

        ran = asyncio.run(task())
        assert not ran.is_error, ran.content
        out = ran.structured_content
        assert out["stopped"] in ("answered", "max_steps", "stuck") and out["pid"] > 1
        assert all(step["tool"].startswith("time__") for step in out["steps"])


# -- llmos as an MCP server -------------------------------------------------------------


def _serve_session(daemon: Daemon, **env: str) -> Any:
    """An official ``mcp`` client session on ``llmos mcp serve`` for ``daemon``."""
    import contextlib

    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "llmos.ctl.cli", "mcp", "serve"],
        env={
            "LLMOS_RUNTIME_DIR": str(daemon.run_dir),
            "LLMOS_STATE_DIR": str(daemon.state_dir),
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            **env,
        },
        cwd=str(ROOT),
    )

    @contextlib.asynccontextmanager
    async def session() -> Any:
        async with stdio_client(params) as (r, w), ClientSession(r, w) as s:
            await s.initialize()
            yield s

    return session()


def test_llmos_mcp_serve_driven_by_the_official_client(daemon: Daemon, admin: Client) -> None:
    import asyncio

    async def drive() -> dict[str, Any]:
        async with _serve_session(daemon) as s:
            tools = {t.name: t for t in (await s.list_tools()).tools}
            spawned = await s.call_tool("spawn", {"name": "from-mcp"})
            pid = spawned.structured_content["pid"]
            wrote = await s.call_tool(
                "write_file", {"pid": pid, "path": "/notes.txt", "text": "hi from mcp"}
            )
            read = await s.call_tool("read_file", {"pid": pid, "path": "/notes.txt"})
            ps = await s.call_tool("ps", {})
            stranger = await s.call_tool("read_file", {"pid": 1, "path": "/x"})
            chatted = await s.call_tool(
                "chat", {"pid": pid, "message": "hello from the host", "max_tokens": 8}
            )
            found = await s.call_tool("search_files", {"pid": pid, "query": "hi from mcp"})
            recalled = await s.call_tool("search_memory", {"pid": pid, "query": "host"})
            killed = await s.call_tool("kill", {"pid": pid, "signal": "KILL"})
            waited = await s.call_tool("wait", {"pid": pid, "timeout": 10})
            return locals()

    got = asyncio.run(drive())
    assert {"run_task", "spawn", "chat", "ps", "kill", "wait", "read_file", "write_file"} <= set(
        got["tools"]
    )
    assert got["tools"]["ps"].annotations.read_only_hint
    assert got["tools"]["kill"].annotations.destructive_hint
    assert not got["wrote"].is_error
    assert got["read"].content[0].text == "hi from mcp"
    assert got["pid"] in {row["pid"] for row in got["ps"].structured_content["procs"]}
    assert got["stranger"].is_error and "ESRCH" in got["stranger"].content[0].text
    assert not got["chatted"].is_error and got["chatted"].content[0].text
    assert [h["path"] for h in got["found"].structured_content["hits"]] == ["/notes.txt"]
    memory = got["recalled"].structured_content
    assert memory["archival"] == []
    assert any("hello from the host" in h["content"] for h in memory["recall"])
    assert not got["killed"].is_error and got["waited"].structured_content["signal"] == "KILL"


def test_llmos_mcp_serve_acts_as_a_gateway_keys_program(daemon: Daemon, admin: Client) -> None:
    import asyncio

    from llmos.ctl.keys import FILE_NAME, KeyStore

    key = KeyStore(daemon.state_dir / FILE_NAME).create("ide", limits={"max_procs": 2})
    outsider = admin.spawn("outsider")

    async def drive(env: dict[str, str]) -> dict[str, Any]:
        async with _serve_session(daemon, **env) as s:
            first = await s.call_tool("spawn", {"name": "from-ide"})
            pid = first.structured_content["pid"]
            over = await s.call_tool("spawn", {"name": "one-too-many"})  # max_procs=2
            ps = await s.call_tool("ps", {})
            rows = admin.ps()
            foreign = await s.call_tool("kill", {"pid": outsider.pid, "signal": "KILL"})
            killed = await s.call_tool("kill", {"pid": pid, "signal": "KILL"})
            waited = await s.call_tool("wait", {"pid": pid, "timeout": 10})
            return locals()

    got = asyncio.run(drive({"LLMOS_MCP_KEY": key}))
    row = {r.pid: r for r in got["rows"]}[got["pid"]]
    program = {r.pid: r for r in got["rows"]}[row.program]
    assert program.name == "ide" and row.ppid == program.pid  # a child of the key's program
    assert got["over"].is_error and "EAGAIN" in got["over"].content[0].text
    seen = {r["pid"] for r in got["ps"].structured_content["procs"]}
    assert seen == {got["pid"]}  # its program's processes only
    assert got["foreign"].is_error  # it cannot signal the admin's processes
    assert {r.pid: r.state for r in admin.ps()}[outsider.pid] != "ZOMBIE"
    assert not got["killed"].is_error and got["waited"].structured_content["signal"] == "KILL"
    wait_until(lambda: program.pid not in {r.pid for r in admin.ps()}, timeout=20)  # ended
    refused = _llmos(daemon, "mcp", "serve", LLMOS_MCP_KEY="llmos-not-a-key")
    assert refused.returncode == 1 and "EACCES" in refused.stderr
    outsider.exit()


def test_llmos_mcp_serve_over_streamable_http(daemon: Daemon) -> None:
    import asyncio

    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    port = _free_port()
    env = {
        **os.environ,
        "LLMOS_RUNTIME_DIR": str(daemon.run_dir),
        "LLMOS_STATE_DIR": str(daemon.state_dir),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "llmos.ctl.cli", "mcp", "serve", "--http", f"127.0.0.1:{port}"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def drive() -> Any:
        async with (
            streamable_http_client(f"http://127.0.0.1:{port}/mcp") as (r, w),
            ClientSession(r, w) as s,
        ):
            await s.initialize()
            return await s.call_tool("ps", {})

    try:

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, timeout=30, every=0.1)
        ps = asyncio.run(drive())
        rows = ps.structured_content["procs"]
        assert not ps.is_error and isinstance(rows, list)  # a fresh kernel: no processes yet
        assert all({"pid", "ppid", "state"} <= set(r) for r in rows)
    finally:
        server.terminate()
        server.wait(10)


def test_ref_fan_out_is_refused_and_targets_are_shown_without_credentials() -> None:
    from kernel.mcp import shown_target
    from kernel.schema import _inline_refs

    defs = {"d0": {"type": "string"}}
    for i in range(1, 40):  # each level refers to the one below twice: 2**40 nodes inlined
        defs[f"d{i}"] = {"anyOf": [{"$ref": f"#/$defs/d{i - 1}"}, {"$ref": f"#/$defs/d{i - 1}"}]}
    schema = {"type": "object", "properties": {"x": {"$ref": "#/$defs/d39"}}, "$defs": defs}
    with pytest.raises(ValueError, match="expand past"):
        _inline_refs(schema, schema)
    assert shown_target("https://user:secret@host:8443/mcp?key=abc") == "https://host:8443/mcp"
    assert shown_target("server --api-key SECRET") == "server …"
