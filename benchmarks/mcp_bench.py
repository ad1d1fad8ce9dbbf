"""The latency an MCP tool call gains by going through the kernel.

The same stdio MCP server (a one-tool ``echo`` written here with the official SDK) is
called two ways, one call at a time, after a warm-up:

* **direct**: the official ``mcp`` client (``ClientSession.call_tool``) in this process;
* **kernel**: ``tool.call`` from a process over ZeroMQ, on a private kernel (``sim``
  driver) that mounted the server with ``--mcp``: SDK round trip, dispatch, the hop to
  the kernel's mcp loop and back, the SDK's call, the reply.

A built-in tool (``calculator``) through the same kernel gives the syscall's own cost.
Reports p50/p95 of each and the added latency (kernel p50 - direct p50).

Usage::

    .venv/bin/python benchmarks/mcp_bench.py [--calls 500] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

SERVER = r"""
import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

RO = types.ToolAnnotations(read_only_hint=True)


async def list_tools(ctx, params):
    return types.ListToolsResult(tools=[types.Tool(
        name="echo", description="Echo.", annotations=RO,
        input_schema={"type": "object", "properties": {"text": {"type": "string"}}})])


async def call_tool(ctx, params):
    return types.CallToolResult(content=[types.TextContent(type="text",
                                                           text=params.arguments["text"])])


server = Server("echo", on_list_tools=list_tools, on_call_tool=call_tool)


async def main():
    async with stdio_server() as (r, w):
        await server.run(r, w, server.create_initialization_options())


anyio.run(main)
"""


def _stats(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p95_ms": round(ms[int(len(ms) * 0.95) - 1], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


async def direct(script: Path, calls: int) -> list[float]:
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(command=sys.executable, args=[str(script)])
    async with stdio_client(params) as (r, w), ClientSession(r, w) as s:
        await s.initialize()
        await s.list_tools()
        out = []
        for i in range(calls + 50):
            t0 = time.perf_counter()
            await s.call_tool("echo", {"text": "hi"})
            if i >= 50:
                out.append(time.perf_counter() - t0)
        return out


def through_kernel(script: Path, calls: int) -> tuple[list[float], list[float]]:
    from llmos.ctl.private import PrivateKernel

    target = shlex.join([sys.executable, str(script)])
    with (
        tempfile.TemporaryDirectory() as base,
        PrivateKernel(Path(base), "--driver", "sim", "--mcp", f"echo={target}") as k,
        k.admin() as c,
    ):
        while not any(s.state == "ready" for s in c.mcp_list()):
            time.sleep(0.05)
        p = c.spawn("bench", tools=["echo__*", "calculator"])
        mcp, builtin = [], []
        for i in range(calls + 50):
            t0 = time.perf_counter()
            p.tools.call("echo__echo", {"text": "hi"})
            t1 = time.perf_counter()
            p.tools.call("calculator", {"expression": "1+1"})
            t2 = time.perf_counter()
            if i >= 50:
                mcp.append(t1 - t0)
                builtin.append(t2 - t1)
        return mcp, builtin


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as where:
        script = Path(where) / "echo_server.py"
        script.write_text(SERVER)
        d = _stats(asyncio.run(direct(script, args.calls)))
        kernel, builtin = through_kernel(script, args.calls)
    rows = {"direct": d, "kernel": _stats(kernel), "builtin": _stats(builtin)}
    rows["added_p50_ms"] = round(rows["kernel"]["p50_ms"] - d["p50_ms"], 3)  # type: ignore[assignment]
    if args.json:
        print(json.dumps(rows))
        return 0
    for name in ("direct", "kernel", "builtin"):
        r = rows[name]
        print(f"{name:8} p50 {r['p50_ms']:7.3f} ms  p95 {r['p95_ms']:7.3f} ms")  # type: ignore[index]
    print(f"added by the kernel (p50): {rows['added_p50_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
