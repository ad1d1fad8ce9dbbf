"""``llmos bench mcp``: the latency an MCP tool call gains by going through the kernel.

The same stdio MCP server (a one-tool ``echo`` written here with the official SDK, one
copy per path) is called three ways, one call at a time, interleaved call by call after a
warm-up (so load on the machine falls on every path alike):

* **direct**: the official ``mcp`` client (``ClientSession.call_tool``) in this process;
* **kernel**: ``tool.call`` of ``echo__echo`` from a process over ZeroMQ, on a private
  kernel (``sim`` driver) that mounted the server with ``--mcp``: SDK round trip,
  dispatch, the hop to the kernel's mcp loop and back, the SDK's call, the reply;
* **builtin**: ``tool.call`` of the built-in ``calculator`` through the same kernel: the
  syscall's own cost.

Reports p50/p95/mean of each and the added latency (kernel p50 - direct p50; the issue's
goal: at most 1 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def add_parser(bsub: Any) -> None:
    """``llmos bench mcp`` on the ``llmos bench`` subparsers."""
    bp = bsub.add_parser(
        "mcp", help="an MCP tool call through the kernel vs the mcp client calling it directly"
    )
    bp.add_argument("--calls", type=int, default=500, help="measured calls per path")
    bp.add_argument("--warmup", type=int, default=50, help="unmeasured calls first")
    bp.add_argument("--json", action="store_true", help="print JSON for scripts")


async def _measure(script: Path, calls: int, warmup: int) -> dict[str, list[float]]:
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    from llmos.ctl.private import PrivateKernel

    target = shlex.join([sys.executable, str(script)])
    params = StdioServerParameters(command=sys.executable, args=[str(script)])
    out: dict[str, list[float]] = {"direct": [], "kernel": [], "builtin": []}
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(tempfile.TemporaryDirectory())
        k = stack.enter_context(
            PrivateKernel(Path(base), "--driver", "sim", "--mcp", f"echo={target}")
        )
        c = stack.enter_context(k.admin())
        while not any(s.state == "ready" for s in c.mcp_list()):
            time.sleep(0.05)
        p = c.spawn("bench", tools=["echo__*", "calculator"])
        async with stdio_client(params) as (r, w), ClientSession(r, w) as s:
            await s.initialize()
            await s.list_tools()
            for i in range(calls + warmup):
                t0 = time.perf_counter()
                await s.call_tool("echo", {"text": "hi"})
                t1 = time.perf_counter()
                p.tools.call("echo__echo", {"text": "hi"})
                t2 = time.perf_counter()
                p.tools.call("calculator", {"expression": "1+1"})
                t3 = time.perf_counter()
                if i >= warmup:
                    out["direct"].append(t1 - t0)
                    out["kernel"].append(t2 - t1)
                    out["builtin"].append(t3 - t2)
    return out


def bench_mcp(args: argparse.Namespace) -> int:
    """Run the benchmark; print a table or (``--json``) one JSON object."""
    if args.calls < 20 or args.warmup < 0:
        print("llmos bench mcp: --calls at least 20, --warmup at least 0", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as where:
        script = Path(where) / "echo_server.py"
        script.write_text(SERVER)
        samples = asyncio.run(_measure(script, args.calls, args.warmup))
    rows: dict[str, Any] = {name: _stats(xs) for name, xs in samples.items()}
    rows["calls"] = args.calls
    rows["added_p50_ms"] = round(rows["kernel"]["p50_ms"] - rows["direct"]["p50_ms"], 3)
    if args.json:
        print(json.dumps(rows))
        return 0
    labels = {
        "direct": "mcp client -> server (direct)",
        "kernel": "process -> kernel -> server",
        "builtin": "process -> kernel, built-in",
    }
    for name, label in labels.items():
        r = rows[name]
        print(f"{label:30} p50 {r['p50_ms']:7.3f} ms  p95 {r['p95_ms']:7.3f} ms")
    print(f"added by the kernel (p50): {rows['added_p50_ms']} ms (goal: <= 1 ms)")
    return 0
