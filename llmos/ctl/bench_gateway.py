"""``llmos bench gateway``: what the HTTP gateway adds to a streamed chat.

One private kernel on the sim driver (fixed token rate, no model: only the paths differ)
and one ``llmos gateway`` subprocess on it. The same workload — N clients, each streaming
``--requests`` chats of ``--tokens`` tokens one after another — runs

* **sdk**: over the SDK (one ``AsyncClient``), doing what the gateway does per stateless
  request: spawn a child of a program, stream ``llm.generate``, then kill and reap it
  behind the answer (the clock stops at the answer on both paths);
* **http**: through HTTP → gateway → kernel (``httpx`` streaming ``/v1/chat/completions``,
  SSE parsed as it comes),

in alternating order per round, and reports output tokens/s, TTFT p50/p95, request time
p50, the gateway's added latency per request (p50 http − p50 sdk) and its CPU per token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL = "sim"


def add_parser(bsub: Any) -> None:
    """``llmos bench gateway`` on the ``llmos bench`` subparsers."""
    bg = bsub.add_parser("gateway", help="streaming chat through HTTP→gateway→kernel vs the SDK")
    bg.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    bg.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    bg.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    bg.add_argument("--rounds", type=int, default=2, help="rounds, order alternating")
    bg.add_argument(
        "--tokens-per-s", type=float, default=200.0, help="the sim driver's rate per slot"
    )
    bg.add_argument("--json", action="store_true", help="print JSON for scripts")


@dataclass
class Run:
    path: str
    clients: int
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    cpu_s: float = 0.0  # the gateway's CPU over the run (http only)
    reaps: list[Any] = field(default_factory=list)  # the sdk path's reaps behind its answers

    def row(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "clients": self.clients,
            "requests": len(self.total),
            "tokens_per_s": self.tokens / self.wall if self.wall else 0.0,
            "ttft_p50_ms": _pct(self.ttft, 50) * 1e3,
            "ttft_p95_ms": _pct(self.ttft, 95) * 1e3,
            "request_p50_ms": _pct(self.total, 50) * 1e3,
            "gateway_cpu_us_per_token": self.cpu_s / self.tokens * 1e6 if self.tokens else None,
        }


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def _messages(i: int, j: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"client {i} request {j}: tell me a story"}]


async def _sdk_client(prog: Any, i: int, n: int, max_tokens: int, run: Run) -> None:
    for j in range(n):
        t0 = time.perf_counter()
        p = await prog.spawn("chat", model=MODEL)
        first = None
        async for _ in p.stream(messages=_messages(i, j), max_tokens=max_tokens, temperature=0):
            if first is None:
                first = time.perf_counter() - t0
        run.total.append(time.perf_counter() - t0)  # the answer is complete
        run.ttft.append(first or 0.0)
        run.tokens += p.last.usage.output_tokens
        run.reaps.append(asyncio.ensure_future(p.reap()))  # behind it, as the gateway does


async def _http_client(http: Any, key: str, i: int, n: int, max_tokens: int, run: Run) -> None:
    for j in range(n):
        body = {
            "model": MODEL,
            "messages": _messages(i, j),
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        first = None
        headers = {"Authorization": f"Bearer {key}"}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    run.tokens += chunk["usage"]["completion_tokens"]
                elif (
                    first is None
                    and chunk["choices"]
                    and chunk["choices"][0]["delta"].get("content")
                ):
                    first = time.perf_counter() - t0
        run.total.append(time.perf_counter() - t0)
        run.ttft.append(first or 0.0)


async def _bench(
    args: argparse.Namespace, endpoint: str, token: str, url: str, key: str, gw_pid: int
) -> list[dict[str, Any]]:
    import httpx
    import psutil

    from llmos.client import AsyncClient

    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    gw = psutil.Process(gw_pid)
    rows: list[dict[str, Any]] = []
    async with AsyncClient(endpoint, pid=0, token=token) as admin:
        prog = await admin.spawn("bench-sdk", host_pid=os.getpid())
        limits = httpx.Limits(max_connections=max(levels) + 4)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
            await _http_client(http, key, 0, 1, 4, Run("warm", 1))  # the key's program
            for rnd in range(args.rounds):
                for n in levels:
                    order = ["sdk", "http"] if (rnd + n) % 2 == 0 else ["http", "sdk"]
                    for path in order:
                        run = Run(path, n)
                        cpu0 = sum(gw.cpu_times()[:2])
                        t0 = time.perf_counter()
                        if path == "sdk":
                            jobs = [
                                _sdk_client(prog, i, args.requests, args.tokens, run)
                                for i in range(n)
                            ]
                        else:
                            jobs = [
                                _http_client(http, key, i, args.requests, args.tokens, run)
                                for i in range(n)
                            ]
                        await asyncio.gather(*jobs)
                        await asyncio.gather(*run.reaps)
                        run.wall = time.perf_counter() - t0
                        if path == "http":
                            run.cpu_s = sum(gw.cpu_times()[:2]) - cpu0
                        rows.append({"round": rnd, **run.row()})
        await prog.reap()
    return rows


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per client count: the median over rounds of each path, and what http adds."""
    out = []
    for n in sorted({r["clients"] for r in rows}):

        def med(path: str, col: str, n: int = n) -> float:
            vals = [r[col] for r in rows if r["clients"] == n and r["path"] == path]
            return statistics.median(vals) if vals else 0.0

        sdk_tps, http_tps = med("sdk", "tokens_per_s"), med("http", "tokens_per_s")
        out.append(
            {
                "clients": n,
                "sdk_tokens_per_s": sdk_tps,
                "http_tokens_per_s": http_tps,
                "tokens_per_s_loss_pct": (1 - http_tps / sdk_tps) * 100 if sdk_tps else None,
                "sdk_ttft_p50_ms": med("sdk", "ttft_p50_ms"),
                "http_ttft_p50_ms": med("http", "ttft_p50_ms"),
                "sdk_ttft_p95_ms": med("sdk", "ttft_p95_ms"),
                "http_ttft_p95_ms": med("http", "ttft_p95_ms"),
                "added_ms_p50": med("http", "request_p50_ms") - med("sdk", "request_p50_ms"),
                "gateway_cpu_us_per_token": med("http", "gateway_cpu_us_per_token"),
            }
        )
    return out


def bench_gateway(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from llmos.ctl.keys import KeyStore
    from llmos.ctl.private import PrivateKernel

    err = Console(stderr=True)
    slots = max(int(x) for x in args.clients.split(","))
    with tempfile.TemporaryDirectory(prefix="llmos-bench-gw-") as tmp:
        base = Path(tmp)
        k = PrivateKernel(
            base,
            "--driver", "sim",
            "--model-name", MODEL,
            "--slots", str(slots),
            "--driver-option", f"tokens_per_s={args.tokens_per_s}",
        )  # fmt: skip
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with k:
            key = KeyStore(k.state_dir / "gateway-keys.json").create("bench")
            gw = subprocess.Popen(
                [sys.executable, "-m", "llmos.ctl.cli", "gateway", "--listen", f"127.0.0.1:{port}"],
                env=k.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                url = f"http://127.0.0.1:{port}"
                _wait_http(url + "/health", gw)
                err.print(f"[dim]sim kernel ({slots} slots) + gateway on {url}[/]")
                rows = asyncio.run(_bench(args, k.endpoint, k.token, url, key, gw.pid))
            finally:
                gw.terminate()
                gw.wait(30)
    summary = _summary(rows)
    if args.json:
        print(json.dumps({"rounds": rows, "summary": summary}))
        return 0
    table = Table(title=f"streaming chat, {args.tokens} tokens/request, sim at "
                  f"{args.tokens_per_s:g} tok/s/slot")  # fmt: skip
    for col in ("clients", "tok/s sdk", "tok/s http", "loss %", "TTFT p50 sdk/http ms",
                "TTFT p95 sdk/http ms", "added p50 ms", "gw CPU µs/tok"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in summary:
        table.add_row(
            str(r["clients"]),
            f"{r['sdk_tokens_per_s']:.0f}",
            f"{r['http_tokens_per_s']:.0f}",
            f"{r['tokens_per_s_loss_pct']:.1f}",
            f"{r['sdk_ttft_p50_ms']:.1f} / {r['http_ttft_p50_ms']:.1f}",
            f"{r['sdk_ttft_p95_ms']:.1f} / {r['http_ttft_p95_ms']:.1f}",
            f"{r['added_ms_p50']:.1f}",
            f"{r['gateway_cpu_us_per_token']:.0f}",
        )
    Console().print(table)
    return 0


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with status {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the gateway did not answer in time")
